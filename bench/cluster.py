"""
``python -m bench.cluster``: warm DATA on PostgreSQL, one node and two nodes
sharing the UDP port, against the bare Twisted UDP echo and the SQLite store,
measured in one run (issue 6).

::

    python -m bench.cluster                  # the full run (about 2.5 minutes on 2 cores)
    python -m bench.cluster --quick          # a smoke run (under a minute)
    python -m bench.cluster --dsn DSN        # use that PostgreSQL server, not a throwaway one

The runs, in this order, each against fresh stores and with the same load
generator, window and fleet: echo, SQLite (one node), echo, PostgreSQL (one
node), echo, PostgreSQL (two nodes sharing the port with ``SO_REUSEPORT``),
echo.  Every gateway run is compared with the mean of its two neighbouring
echo runs.

Without ``--dsn`` a throwaway PostgreSQL cluster is made with ``initdb`` and
``pg_ctl`` (as the ``postgres`` user when run as root), listening only on a
unix socket, with durability ON (``fsync``, ``synchronous_commit`` and
``full_page_writes`` at their defaults), so that the comparison with SQLite
(``synchronous = full``) is fair.  The settings used are printed.

The load generator is the project's module client, as in :mod:`bench.loadgen`,
but every slot of the window has a UDP socket of its own, used for its
modules' HELLOs and DATA alike: the kernel spreads the nodes sharing a port
by source address, so one socket would keep every DATA on one node, and a
module keeps its source address, so its DATA reach the node that opened its
session.  ``python -m bench.cluster --loadgen JOB.json`` is that process.

Database round trips per DATA come from the store's own counters
(``round_trips``, ``transactions``, ``operations``; read by
``bench.gateway``'s ``stats``), cross-checked by PostgreSQL's own
``pg_stat_database.xact_commit`` and ``pg_stat_wal.wal_sync`` deltas (those
statistics reach the server up to 10 s late, so a full run waits for them).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import loadgen
from bench.common import Fleet, cipher_suite, cpu_seconds, emit, machine_cpu, machine_facts
from bench.run import BenchError, Child, fmt_rate, per_module, verdict, wait_for_quiet
from m2mgw.client.module import HelloContext, ModuleEndpoint

#: The suites whose server keys the gateways have.
SUITES = ("p256", "p256-ccm8")
#: The module key suite of the fleet.
FLEET_SUITE = "p256"
#: The first byte pair of a HELLO_REPLY: ``[1, 2, ...]`` (an array of four).
HELLO_REPLY_PREFIX = b"\x84\x01\x02"
#: Issue 6's targets.
TARGET_PG1_VS_SQLITE = 0.50
TARGET_ROUND_TRIPS = 0.05
#: Seconds a PostgreSQL backend may keep its statistics before reporting them
#: when it goes idle (``PGSTAT_IDLE_INTERVAL``), plus a margin.
PG_STATS_DELAY = 10.5
#: The settings of the throwaway cluster: durable, as SQLite's ``synchronous = full``.
PG_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "50",
}
#: The settings printed (``SHOW``).
PG_SHOWN = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "commit_delay",
    "shared_buffers",
)


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run."""

    quick: bool
    duration: float
    window: int
    modules: int
    quiet_wait: float
    #: Seconds to wait for PostgreSQL's statistics before and after each timed phase.
    stats_delay: float
    #: Only to size the pre-built datagrams (generously).
    rate_guess: float

    @classmethod
    def make(
        cls, quick: bool, duration: float | None, window: int, quiet_wait: float | None
    ) -> Settings:
        """The quick or the full settings, the arguments overriding defaults."""
        if quick:
            return cls(
                quick=True,
                duration=duration or 1.5,
                window=window,
                modules=200,
                quiet_wait=0.0 if quiet_wait is None else quiet_wait,
                stats_delay=1.2,
                rate_guess=8_000,
            )
        return cls(
            quick=False,
            duration=duration or 10.0,
            window=window,
            modules=1000,
            quiet_wait=3.0 if quiet_wait is None else quiet_wait,
            stats_delay=PG_STATS_DELAY,
            rate_guess=8_000,
        )


def say(text: str = "") -> None:
    """Print a line at once."""
    print(text, flush=True)


# -- PostgreSQL ----------------------------------------------------------------------------------


def _find_binaries() -> str | None:
    """The directory of ``initdb`` and ``pg_ctl`` (the test harness's search, if importable)."""
    try:
        from tests.pgharness import _find_binaries as harness_find

        return harness_find()
    except ImportError:
        pass
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return os.path.dirname(initdb)
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return directory
    return None


def _connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


@dataclass
class PostgresServer:
    """
    The server the PostgreSQL runs use: a schema per run, dropped at the end.

    :ivar admin_dsn: connects to the database the schemas are made in.
    :ivar origin: what it is, for the report.
    :ivar postmaster_pid_file: ``postmaster.pid`` of a cluster this run
        started (its processes' CPU time is then measured), else ``None``.
    """

    admin_dsn: str
    origin: str
    postmaster_pid_file: str | None = None
    stop_commands: list[list[str]] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)

    def new_schema(self, label: str) -> str:
        """A new empty schema, as the DSN whose ``search_path`` it is."""
        import psycopg

        name = f"m2mgw_bench_{os.getpid()}_{label}"
        with _connect(self.admin_dsn) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            admin.execute(f"CREATE SCHEMA {name}")
        self.schemas.append(name)
        params = psycopg.conninfo.conninfo_to_dict(self.admin_dsn)
        params["options"] = f"{params.get('options') or ''} -csearch_path={name}".strip()
        return str(psycopg.conninfo.make_conninfo("", **params))

    def settings(self) -> dict[str, str]:
        """The settings that matter for the comparison (``SHOW``)."""
        with _connect(self.admin_dsn) as connection:
            return {
                name: str(connection.execute(f"SHOW {name}").fetchone()[0]) for name in PG_SHOWN
            }

    def counters(self) -> dict[str, float]:
        """
        The database's commits and rollbacks (``pg_stat_database``), the
        cluster's WAL syncs and writes (``pg_stat_wal``) and WAL position.
        """
        with _connect(self.admin_dsn) as connection:
            commits, rollbacks = connection.execute(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database"
                " WHERE datname = current_database()"
            ).fetchone()
            wal_sync, wal_write = connection.execute(
                "SELECT wal_sync, wal_write FROM pg_stat_wal"
            ).fetchone()
            lsn = connection.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"
            ).fetchone()[0]
        return {
            "xact_commit": float(commits),
            "xact_rollback": float(rollbacks),
            "wal_sync": float(wal_sync),
            "wal_write": float(wal_write),
            "wal_bytes": float(lsn),
            "cpu": self.cpu() or 0.0,
        }

    def cpu(self) -> float | None:
        """CPU seconds of the cluster's processes (postmaster and children), if it is ours."""
        if self.postmaster_pid_file is None:
            return None
        try:
            with open(self.postmaster_pid_file, encoding="ascii") as pid_file:
                postmaster = int(pid_file.readline())
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for path in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(path, encoding="ascii", errors="replace") as stat:
                    text = stat.read()
            except OSError:
                continue
            pid = int(path.split("/")[2])
            rest = text[text.rfind(")") + 2 :].split()
            if pid == postmaster or int(rest[1]) == postmaster:
                total += int(rest[11]) + int(rest[12])
        return total / ticks

    def stop(self) -> None:
        """Drop the schemas made; stop the cluster if this run started it."""
        for name in self.schemas:
            with contextlib.suppress(Exception), _connect(self.admin_dsn) as admin:
                admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        self.schemas.clear()
        for command in self.stop_commands:
            subprocess.run(command, capture_output=True, check=False, timeout=120)
        self.stop_commands.clear()


def external_postgres(dsn: str) -> PostgresServer:
    """The server ``dsn`` names.

    :raise BenchError: it cannot be reached.
    """
    try:
        _connect(dsn).close()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"cannot connect to --dsn: {first}") from None
    return PostgresServer(dsn, "the server --dsn names (its CPU time is not measured apart)")


def start_postgres() -> PostgresServer:
    """
    A throwaway cluster in a temporary directory, durable (see
    :data:`PG_SETTINGS`), on a unix socket only.

    :raise BenchError: no binaries, or the cluster did not start.
    """
    binaries = _find_binaries()
    if binaries is None:
        raise BenchError("no PostgreSQL binaries (initdb, pg_ctl): install them or give --dsn")
    directory = tempfile.mkdtemp(prefix="m2mgw-bench-pg-")
    run_as: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(directory, ignore_errors=True)
            raise BenchError(
                "initdb refuses to run as root and there is no 'postgres' user"
            ) from None
        os.chown(directory, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(directory, ignore_errors=True)
            raise BenchError("running as root, and no runuser to start PostgreSQL as postgres")
        run_as = [runuser, "-u", "postgres", "--"]
    data = os.path.join(directory, "data")
    port = random.randint(20000, 60000)

    def run(*args: str) -> None:
        done = subprocess.run(
            [*run_as, *args], capture_output=True, text=True, check=False, timeout=180
        )
        if done.returncode != 0:
            shutil.rmtree(directory, ignore_errors=True)
            message = (done.stderr or done.stdout).strip()[-400:]
            raise BenchError(f"{os.path.basename(args[0])} failed: {message}")

    initdb = os.path.join(binaries, "initdb")
    pg_ctl = os.path.join(binaries, "pg_ctl")
    run(initdb, "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C")
    options = f"-c listen_addresses='' -k {directory} -p {port} " + " ".join(
        f"-c {name}={value}" for name, value in PG_SETTINGS.items()
    )
    log_file = os.path.join(directory, "server.log")
    run(pg_ctl, "-D", data, "-l", log_file, "-w", "-t", "60", "-o", options, "start")
    stop = [[*run_as, pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], ["rm", "-rf", directory]]
    dsn = f"host={directory} port={port} user=postgres dbname=postgres"
    return PostgresServer(
        dsn,
        f"a throwaway PostgreSQL cluster in {directory} (unix socket)",
        postmaster_pid_file=os.path.join(data, "postmaster.pid"),
        stop_commands=stop,
    )


# -- the load generator (its own process) --------------------------------------------------------


def slot_sockets(target: tuple[str, int], count: int) -> list[socket.socket]:
    """One non-blocking UDP socket per slot, connected to ``target``."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, loadgen.SOCKET_BUFFER)
        sock.bind(("127.0.0.1", 0))
        sock.connect(target)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def run_slot_phase(
    sockets: Sequence[socket.socket],
    orders: Sequence[Sequence[Any]],
    datagram: Callable[[Any], bytes],
    accept: Callable[[Any, bytes], bool],
    *,
    duration: float | None,
    timeout: float,
    cycle: bool = False,
    check: Callable[[Any, bytes], bool] | None = None,
    verify_every: int = 64,
) -> loadgen.PhaseResult:
    """
    A closed loop: slot ``i`` sends ``orders[i]`` in order on ``sockets[i]``,
    one request outstanding; a datagram on its socket that ``accept``
    matches to the outstanding request answers it.

    :param datagram: the bytes of a request.
    :param duration: stop after this many seconds (``None``: when every
        request is answered or lost).
    :param cycle: start a slot's requests over when they run out (echo).
    :param check: fully checks one answer in ``verify_every`` (every one if 1).
    """
    result = loadgen.PhaseResult()
    slots = len(orders)
    selector = selectors.DefaultSelector()
    for slot in range(slots):
        selector.register(sockets[slot], selectors.EVENT_READ, slot)
    position = [0] * slots
    sent_at = [0.0] * slots
    waiting: list[Any] = [None] * slots
    clock = time.monotonic
    active = slots

    def send(slot: int, now: float) -> bool:
        nonlocal active
        order = orders[slot]
        index = position[slot]
        if index >= len(order):
            if not cycle or not order:
                waiting[slot] = None
                active -= 1
                return False
            index = 0
        request = order[index]
        position[slot] = index + 1
        waiting[slot] = request
        sent_at[slot] = now
        result.sent += 1
        try:
            sockets[slot].send(datagram(request))
        except OSError:
            result.send_errors += 1
        return True

    cpu_start = cpu_seconds()
    start = clock()
    end = start + duration if duration is not None else float("inf")
    for slot in range(slots):
        send(slot, start)
    next_check = start + loadgen.TIMEOUT_CHECK
    stop = False
    while not stop and active > 0:
        now = clock()
        if now >= end:
            break
        if now >= next_check:
            next_check = now + loadgen.TIMEOUT_CHECK
            for slot in range(slots):
                if waiting[slot] is not None and now - sent_at[slot] > timeout:
                    result.lost += 1
                    if not send(slot, now) and duration is not None:
                        stop, result.ended_by = True, "exhausted"
        for key, _ in selector.select(loadgen.TIMEOUT_CHECK):
            slot = key.data
            while True:
                try:
                    reply = sockets[slot].recv(loadgen.MAX_READ)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    result.refused += 1
                    continue
                request = waiting[slot]
                if request is None or not accept(request, reply):
                    result.stale += 1
                    continue
                now = clock()
                result.latencies.append(now - sent_at[slot])
                result.answered += 1
                if check is not None and (verify_every == 1 or result.answered % verify_every == 1):
                    result.verified += 1
                    if not check(request, reply):
                        result.verify_failures += 1
                if not send(slot, now) and duration is not None:
                    stop, result.ended_by = True, "exhausted"
    finished = clock()
    if duration is None:
        result.ended_by = "all answered or lost"
    result.elapsed = min(finished, end) - start
    result.cpu = cpu_seconds() - cpu_start
    selector.close()
    return result


def _hello_datagram(request: loadgen.HelloRequest) -> bytes:
    return request.outgoing.datagram


def _hello_accept(request: loadgen.HelloRequest, reply: bytes) -> bool:
    return reply[:3] == HELLO_REPLY_PREFIX


def _hello_check(request: loadgen.HelloRequest, reply: bytes) -> bool:
    context = request.outgoing.context
    assert isinstance(context, HelloContext)
    return bool(request.endpoint.handle_hello_reply(reply, context).accepted)


def _data_datagram(request: loadgen.DataRequest) -> bytes:
    return request.datagram


def _data_accept(request: loadgen.DataRequest, reply: bytes) -> bool:
    try:
        return loadgen.envelope_key(reply) == request.key
    except (ValueError, IndexError):
        return False


def _echo_accept(request: loadgen.DataRequest, reply: bytes) -> bool:
    return reply == request.datagram


def owned_modules(modules: int, slots: int) -> list[list[int]]:
    """The modules of each slot (whose source address is its socket's): ``j, j + slots, ...``."""
    return [list(range(slot, modules, slots)) for slot in range(slots)]


def warm_up_slots(
    job: loadgen.Job,
    endpoints: Sequence[ModuleEndpoint],
    sockets: Sequence[socket.socket],
    owned: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Open every module's session with a HELLO from its slot's socket (a few rounds)."""
    started = time.monotonic()
    rounds = []
    for _ in range(loadgen.WARM_ROUNDS):
        orders = [
            [
                loadgen.HelloRequest(endpoints[i].build_hello(), endpoints[i])
                for i in modules
                if endpoints[i].state.session is None
            ]
            for modules in owned
        ]
        if not any(orders):
            break
        phase = run_slot_phase(
            sockets,
            orders,
            _hello_datagram,
            _hello_accept,
            duration=None,
            timeout=max(job.timeout, 2.0),
            check=_hello_check,
            verify_every=1,
        )
        rounds.append(phase.summary())
    warm = sum(1 for endpoint in endpoints if endpoint.state.session is not None)
    return {"warm": warm, "seconds": round(time.monotonic() - started, 3), "rounds": rounds}


def prepare(job: loadgen.Job) -> tuple[Callable[[], loadgen.PhaseResult], dict[str, Any]]:
    """Everything untimed (sockets, warm-up, datagrams); returns the timed phase."""
    info: dict[str, Any] = {"mode": job.mode}
    suite = cipher_suite(job.fleet.suite)
    slots = min(job.window, job.modules)
    sockets = slot_sockets(job.target, slots)
    owned = owned_modules(job.modules, slots)
    started = time.monotonic()
    if job.mode == "echo":
        per_module = [
            loadgen.build_session_data(
                suite, os.urandom(6), key, key, 1, job.per_module, job.payload_bytes
            )
            for key in (os.urandom(suite.key_len) for _ in range(job.modules))
        ]
        orders = [loadgen.interleave([per_module[i] for i in modules], 1)[0] for modules in owned]
        info["built"] = sum(len(items) for items in per_module)
        info["prepare_seconds"] = round(time.monotonic() - started, 3)

        def run_echo() -> loadgen.PhaseResult:
            return run_slot_phase(
                sockets,
                orders,
                _data_datagram,
                _echo_accept,
                duration=job.duration,
                timeout=job.timeout,
                cycle=True,
            )

        return run_echo, info
    if job.mode != "data":
        raise SystemExit(f"unknown mode {job.mode!r}")
    endpoints = loadgen.module_endpoints(job)
    info["warm_up"] = warm_up_slots(job, endpoints, sockets, owned)
    built = time.monotonic()
    per_data: dict[int, list[loadgen.DataRequest]] = {}
    for index, endpoint in enumerate(endpoints):
        session = endpoint.state.session
        if session is not None:
            per_data[index] = loadgen.build_session_data(
                suite,
                session.sid,
                session.k_up,
                session.k_down,
                session.next_ctr,
                job.per_module,
                job.payload_bytes,
            )
    data_orders = [
        loadgen.interleave([per_data[i] for i in modules if i in per_data], 1)[0]
        for modules in owned
    ]
    info["built"] = sum(len(items) for items in per_data.values())
    info["build_seconds"] = round(time.monotonic() - built, 3)

    def check(request: loadgen.DataRequest, reply: bytes) -> bool:
        return loadgen.check_data_reply(suite, request, reply)

    def run_data() -> loadgen.PhaseResult:
        return run_slot_phase(
            sockets,
            data_orders,
            _data_datagram,
            _data_accept,
            duration=job.duration,
            timeout=job.timeout,
            check=check,
            verify_every=job.verify_every,
        )

    return run_data, info


def loadgen_main(path: str) -> int:
    """The load generator process: prepare, wait for ``go``, run, report."""
    with open(path, encoding="utf-8") as job_file:
        job = loadgen.Job.from_json(json.load(job_file))
    run, info = prepare(job)
    emit("prepared", **info)
    if sys.stdin.readline().strip() != "go":
        return 1
    emit("result", **run().summary())
    return 0


# -- the orchestrator ------------------------------------------------------------------------------


class Run:
    """Where one run keeps its files and processes."""

    def __init__(self, settings: Settings, work_dir: str, profile_dir: str | None = None) -> None:
        self.settings = settings
        self.work_dir = work_dir
        #: cProfile the gateways' timed phases into this directory.
        self.profile_dir = profile_dir
        self.children: list[Child] = []
        self.jobs = 0
        self.ts_base = int(time.time())

    def path(self, name: str) -> str:
        """A file of this run."""
        return os.path.join(self.work_dir, name)

    def child(self, name: str, argv: Sequence[str]) -> Child:
        """Start a benchmark process (logged to ``<work dir>/<name>.log``)."""
        process = Child(name, argv, self.path(f"{name}.log"))
        self.children.append(process)
        return process

    def close(self, process: Child) -> None:
        """Stop one process."""
        process.close(timeout=30)
        if process in self.children:
            self.children.remove(process)

    def close_all(self) -> None:
        """Stop every process still running."""
        for process in reversed(self.children):
            process.close(timeout=15)
        self.children.clear()

    def next_ts_base(self) -> int:
        """A HELLO ``ts`` floor above any earlier job's."""
        self.jobs += 1
        return self.ts_base + self.jobs * 10_000_000


def write_config(
    path: str,
    data_dir: str,
    node: str,
    store: str,
    dsn: str | None = None,
    port: int = 0,
    reuse_port: bool = False,
) -> None:
    """A gateway configuration on 127.0.0.1 (signed HELLO_REPLYs, as ``bench.run``'s DATA runs)."""
    postgres = f"\n[store.postgres]\ndsn = {dsn}\n" if dsn else ""
    with open(path, "w", encoding="utf-8") as conf:
        conf.write(
            f"""[gateway]
data_dir = {data_dir}
node_name = {node}
suites = {", ".join(SUITES)}

[modules]
address = 127.0.0.1
port = {port}
reuse_port = {"yes" if reuse_port else "no"}

[apps]
address = 127.0.0.1
port = 0
key_type = ec

[store]
backend = {store}
{postgres}
[protocol]
sign_replies = yes

[jobs]
expiry_interval = 3600
housekeeping_interval = 3600
security_interval = 10
"""
        )


def start_nodes(
    run: Run, name: str, store: str, fleet: Fleet, nodes: int, dsn: str | None = None
) -> tuple[list[Child], dict[str, Any]]:
    """
    ``nodes`` gateway processes on one port, the fleet provisioned first by a
    process that exits (so that the measured ones start clean).  Nodes after
    the first get a copy of the first's data directory (server keys, TLS),
    without any database file, as ``docs/operations.md`` says.

    :return: the nodes and the first one's ``ready`` answer.
    """
    shared = nodes > 1
    data_dir = run.path(f"{name}-data")
    first_conf = run.path(f"{name}-1.conf")
    write_config(first_conf, data_dir, f"{name}-1", store, dsn, 0, shared)
    limit = 60.0 + fleet.count / 100
    base = ["-m", "bench.gateway", "--config", first_conf, "--log", run.path(f"{name}-1.log")]
    setup = run.child(
        f"{name}-provision",
        [
            *base,
            "--fleet",
            json.dumps(fleet.to_json()),
            "--provision-only",
            "--start-timeout",
            str(limit),
        ],
    )
    provisioned = setup.expect("provisioned", timeout=limit + 10)
    setup.process.wait(60)
    run.close(setup)
    first = run.child(f"{name}-1", [*base, "--start-timeout", "60"])
    ready = first.expect("ready", timeout=70)
    ready["provisioned"] = provisioned["provisioned"]
    started = [first]
    for number in range(2, nodes + 1):
        node_dir = run.path(f"{name}-data-{number}")
        shutil.copytree(data_dir, node_dir, ignore=shutil.ignore_patterns("*.sqlite*", ".lock"))
        conf = run.path(f"{name}-{number}.conf")
        write_config(conf, node_dir, f"{name}-{number}", store, dsn, ready["port"], True)
        node = run.child(
            f"{name}-{number}",
            [
                "-m",
                "bench.gateway",
                "--config",
                conf,
                "--start-timeout",
                "60",
                "--log",
                run.path(f"{name}-{number}.log"),
            ],
        )
        node_ready = node.expect("ready", timeout=70)
        if node_ready["port"] != ready["port"]:
            raise BenchError(f"node {number} listens on {node_ready['port']}, not {ready['port']}")
        started.append(node)
    return started, ready


def _server_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one server did between two ``stats`` answers."""
    delta: dict[str, Any] = {
        "cpu": after["cpu"] - before["cpu"],
        "answered": {
            kind: count - before["answered"].get(kind, 0)
            for kind, count in after["answered"].items()
        },
    }
    if "drops" in after:
        delta["drops"] = {
            reason: count - before["drops"].get(reason, 0)
            for reason, count in after["drops"].items()
            if count - before["drops"].get(reason, 0)
        }
    if "store" in after:
        delta["store"] = {
            name: after["store"][name] - before["store"].get(name, 0) for name in after["store"]
        }
    return delta


def run_load(
    run: Run,
    name: str,
    job: dict[str, Any],
    servers: Sequence[Child],
    postgres: PostgresServer | None = None,
) -> dict[str, Any]:
    """
    One load generator job against ``servers``: prepared untimed, then the
    timed phase between two ``stats`` of every server (and, for PostgreSQL,
    two readings of its own counters).
    """
    settings = run.settings
    job_path = run.path(f"{name}.job.json")
    with open(job_path, "w", encoding="utf-8") as out:
        json.dump(job, out)
    generator = run.child(f"{name}-loadgen", ["-m", "bench.cluster", "--loadgen", job_path])
    try:
        preparing = time.monotonic()
        prepared = generator.expect("prepared", timeout=900)
        prepared["seconds"] = round(time.monotonic() - preparing, 2)
        quiet = wait_for_quiet(settings.quiet_wait)
        pg_before = None
        if postgres is not None:
            # The backends report their statistics up to PG_STATS_DELAY late.
            time.sleep(max(0.0, settings.stats_delay - quiet["waited"]))
            pg_before = postgres.counters()
        before = [server.request("stats", "stats")["stats"] for server in servers]
        profiling = run.profile_dir is not None and job["mode"] == "data"
        if profiling:
            for server in servers:
                server.request("profile-start", "profiling")
        threads_before = [thread_cpu(server.pid) for server in servers]
        machine_before = machine_cpu()
        generator.send("go")
        result = generator.expect("result", timeout=(job.get("duration") or 300.0) + 120.0)
        machine_after = machine_cpu()
        if profiling:
            for server in servers:
                path = os.path.join(str(run.profile_dir), f"{server.name}.pstats")
                server.request(f"profile-stop {path}", "profiled", timeout=120)
        after = [server.request("stats", "stats")["stats"] for server in servers]
        db_cpu_after = postgres.cpu() if postgres is not None else None
        threads_after = [thread_cpu(server.pid) for server in servers]
        pg_after = None
        if postgres is not None:
            time.sleep(settings.stats_delay)
            pg_after = postgres.counters()
    finally:
        run.close(generator)
    prepared.pop("event", None)
    result.pop("event", None)
    elapsed = result["elapsed"] or 1e-9
    nodes = [_server_delta(b, a) for b, a in zip(before, after, strict=True)]
    server_cpu = sum(node["cpu"] for node in nodes)
    answered = sum(sum(node["answered"].values()) for node in nodes)
    data = sum(node["answered"].get("data", 0) for node in nodes)
    store: dict[str, int] = {}
    for node in nodes:
        for key, value in node.get("store", {}).items():
            store[key] = store.get(key, 0) + value
    db_cpu = None
    database: dict[str, Any] | None = None
    if pg_before is not None and pg_after is not None:
        database = {key: pg_after[key] - pg_before[key] for key in pg_after}
        if db_cpu_after is not None and postgres is not None and postgres.postmaster_pid_file:
            db_cpu = db_cpu_after - pg_before["cpu"]
    busy = machine_after[0] - machine_before[0]
    others = busy - server_cpu - result["cpu"] - (db_cpu or 0.0)
    return {
        "prepared": prepared,
        "result": result,
        "nodes": nodes,
        "answered": answered,
        "data": data,
        "store": store,
        "database": database,
        "cpu": {
            "nodes": [node["cpu"] / elapsed for node in nodes],
            "servers": server_cpu / elapsed,
            "loadgen": result["cpu"] / elapsed,
            "database": None if db_cpu is None else db_cpu / elapsed,
            "others": max(0.0, others) / elapsed,
            "interrupts": (machine_after[1] - machine_before[1]) / elapsed,
            "busy": busy / elapsed,
        },
        "per_server_cpu_second": answered / server_cpu if server_cpu > 0 else 0.0,
        # The nodes' main (reactor) thread and their other threads (the store's).
        "threads": [
            sum(
                after[0] - before[0]
                for before, after in zip(threads_before, threads_after, strict=True)
            ),
            sum(
                after[1] - before[1]
                for before, after in zip(threads_before, threads_after, strict=True)
            ),
        ],
        "quiet": quiet,
    }


def print_run(label: str, measured: dict[str, Any]) -> None:
    """Two or three lines about one run."""
    result, cpu = measured["result"], measured["cpu"]
    latency = result["latency_ms"]
    say(
        f"  {label:<34} {fmt_rate(result['rate']):>10}   answered {result['answered']:,} in "
        f"{result['elapsed']:.1f} s, lost {result['lost']}; "
        f"latency p50 {latency['p50']} ms, p99 {latency['p99']} ms"
    )
    nodes = " + ".join(f"{100 * share:.0f}" for share in cpu["nodes"])
    database = "-" if cpu["database"] is None else f"{100 * cpu['database']:.0f} %"
    say(
        f"      CPU: server(s) {nodes} % ({measured['per_server_cpu_second']:,.0f} answered per "
        f"server CPU-second), load generator {100 * cpu['loadgen']:.0f} %, database {database}, "
        f"other processes {100 * cpu['others']:.0f} %, interrupts {100 * cpu['interrupts']:.0f} %"
    )
    if len(measured["nodes"]) > 1:
        split = ", ".join(f"{node['answered'].get('data', 0):,}" for node in measured["nodes"])
        say(f"      DATA answered per node: {split}")
    if cpu["others"] > 0.25:
        say(f"    !! other processes used {cpu['others']:.2f} CPUs: figures depressed by sharing")
    if result["verify_failures"]:
        say(f"    !! {result['verify_failures']} of {result['verified']} checked replies were bad")
    for node in measured["nodes"]:
        if node.get("drops"):
            say(f"    !! a node dropped: {node['drops']}")
    warm = measured["prepared"].get("warm_up")
    if warm is not None and warm["warm"] < measured["modules"]:
        say(f"    !! only {warm['warm']} of {measured['modules']} sessions opened in the warm-up")
    if result["ended_by"] != "duration":
        say(f"    !! the run ended early: {result['ended_by']}")


def job_for(
    run: Run, mode: str, port: int, fleet: Fleet, ready: dict[str, Any] | None
) -> dict[str, Any]:
    """A load generator job with this run's window, duration and fleet."""
    settings = run.settings
    return {
        "mode": mode,
        "target": ["127.0.0.1", port],
        "fleet": fleet.to_json(),
        "modules": settings.modules,
        "server_keys": ready["server_keys"] if ready else [],
        "window": settings.window,
        "duration": settings.duration,
        "timeout": 1.0,
        "ts_base": run.next_ts_base(),
        "per_module": (
            20
            if mode == "echo"
            else per_module(settings.rate_guess, settings.duration, settings.modules)
        ),
    }


def echo_run(run: Run, name: str, fleet: Fleet) -> dict[str, Any]:
    """The bare Twisted UDP echo, driven by the same load generator."""
    echo = run.child(name, ["-m", "bench.echo"])
    try:
        ready = echo.expect("ready", timeout=60)
        measured = run_load(run, name, job_for(run, "echo", ready["port"], fleet, None), [echo])
    finally:
        run.close(echo)
    measured["modules"] = run.settings.modules
    return measured


def gateway_run(
    run: Run,
    name: str,
    store: str,
    fleet: Fleet,
    nodes: int,
    postgres: PostgresServer | None,
) -> dict[str, Any]:
    """Warm DATA against ``nodes`` gateways on ``store`` (a fresh database)."""
    dsn = postgres.new_schema(name.replace("-", "_")) if postgres is not None else None
    servers, ready = start_nodes(run, name, store, fleet, nodes, dsn)
    try:
        job = job_for(run, "data", ready["port"], fleet, ready)
        measured = run_load(run, name, job, servers, postgres)
    finally:
        for server in servers:
            run.close(server)
    measured["modules"] = run.settings.modules
    return measured


def thread_cpu(pid: int) -> tuple[float, float]:
    """
    CPU seconds of a process's main thread (the reactor's) and of its other
    threads together (``/proc/PID/task``); zeros if it is gone.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    main = others = 0
    for path in glob.glob(f"/proc/{pid}/task/[0-9]*/stat"):
        try:
            with open(path, encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()
        used = int(rest[11]) + int(rest[12])
        if int(path.split("/")[4]) == pid:
            main += used
        else:
            others += used
    return main / ticks, others / ticks


def cpu_per_datagram(measured: dict[str, Any]) -> dict[str, Any] | None:
    """
    CPU microseconds per DATA answered: the nodes', the database's (a
    cluster this run started; 0 for SQLite, which runs in the node) and both.
    """
    if not measured["data"]:
        return None
    elapsed = measured["result"]["elapsed"]
    cpu = measured["cpu"]
    nodes = 1e6 * cpu["servers"] * elapsed / measured["data"]
    database = (
        None if cpu["database"] is None else 1e6 * cpu["database"] * elapsed / measured["data"]
    )
    threads = measured.get("threads") or [0.0, 0.0]
    return {
        "nodes": nodes,
        "reactor_thread": 1e6 * threads[0] / measured["data"],
        "other_threads": 1e6 * threads[1] / measured["data"],
        "database": database,
        "total": nodes + (database or 0.0),
    }


def per_datagram(measured: dict[str, Any], count: float | None) -> float | None:
    """``count`` per DATA answered."""
    if count is None or not measured["data"]:
        return None
    return float(count) / int(measured["data"])


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print its figures."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--loadgen"]:
        if len(arguments) != 2:
            sys.stderr.write("usage: python -m bench.cluster --loadgen JOB.json\n")
            return 2
        return loadgen_main(arguments[1])
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--dsn", help="use this PostgreSQL server (a schema per run)")
    parser.add_argument("--duration", type=float, help="seconds of each timed phase")
    parser.add_argument("--window", type=int, default=64, help="requests outstanding (64)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before each timed phase for other processes to quieten "
        "(default 3, 0 with --quick)",
    )
    parser.add_argument("--modules", type=int, help="modules (sessions) per run")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--profile", metavar="DIR", help="cProfile the gateways' timed phases")
    args = parser.parse_args(arguments)
    settings = Settings.make(args.quick, args.duration, args.window, args.quiet_wait)
    if args.modules:
        settings = Settings(**{**asdict(settings), "modules": args.modules})
    facts = machine_facts()
    say(
        f"m2mgw cluster benchmark, {facts['date']}: {facts['nproc']} CPUs ({facts['cpu_model']}), "
        f"Python {facts['python']}, load average {facts['loadavg']}"
    )
    say(
        "The load generator, PostgreSQL and the gateway nodes run in separate processes on "
        "this machine and share its CPUs.\n"
    )
    results: dict[str, Any] = {"machine": facts, "settings": asdict(settings)}
    work_dir = tempfile.mkdtemp(prefix="m2mgw-bench-cluster-")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    run = Run(settings, work_dir, os.path.abspath(args.profile) if args.profile else None)
    started = time.monotonic()
    status = 0
    postgres: PostgresServer | None = None
    try:
        postgres = external_postgres(args.dsn) if args.dsn else start_postgres()
        pg_settings = postgres.settings()
        results["postgres"] = {"origin": postgres.origin, "settings": pg_settings}
        say(f"PostgreSQL: {postgres.origin}")
        say("  " + ", ".join(f"{key} = {value}" for key, value in pg_settings.items()))
        say("SQLite: synchronous = full, WAL (the store's defaults)\n")
        results["runs"] = measure(run, postgres, results)
        for line in summary(results["runs"]):
            say(line)
    except BenchError as exc:
        say(f"benchmark failed: {exc}")
        status = 1
    finally:
        run.close_all()
        if postgres is not None:
            postgres.stop()
        results["seconds"] = time.monotonic() - started
        results["load_after"] = [round(value, 2) for value in os.getloadavg()]
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(results, out, indent=2, sort_keys=True, default=str)
        if args.keep or status:
            say(f"work directory (logs, configurations, jobs): {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    say(f"done in {results['seconds']:.0f} s; load average now {results['load_after']}")
    return status


def measure(run: Run, postgres: PostgresServer, results: dict[str, Any]) -> dict[str, Any]:
    """Echo, SQLite, echo, PostgreSQL one node, echo, two nodes, echo."""
    settings = run.settings
    say(
        f"== Warm DATA exchanges per second: {settings.modules} modules (sessions opened by "
        f"untimed SIG HELLOs), window {settings.window} (one socket per slot), "
        f"{settings.duration:g} s each, a 16-byte report per DATA (p256) =="
    )
    fleet = Fleet(
        count=settings.modules, keyed=settings.modules, suite=FLEET_SUITE, seed=os.urandom(8).hex()
    )
    runs: dict[str, Any] = {"echo": [], "window": settings.window}

    def echo(label: str) -> dict[str, Any]:
        measured = echo_run(run, f"echo-{len(runs['echo']) + 1}", fleet)
        runs["echo"].append(measured)
        print_run(f"Twisted UDP echo ({label})", measured)
        return measured

    before = echo("first")
    plan = (
        ("sqlite", "sqlite", 1, "SQLite store, one node"),
        ("pg1", "postgres", 1, "PostgreSQL store, one node"),
        ("pg2", "postgres", 2, "PostgreSQL store, two nodes"),
    )
    for key, store, nodes, label in plan:
        measured = gateway_run(
            run, key, store, fleet, nodes, postgres if store == "postgres" else None
        )
        print_run(label, measured)
        after = echo(f"after {key}")
        echo_rate = (before["result"]["rate"] + after["result"]["rate"]) / 2
        echo_cpu = (before["per_server_cpu_second"] + after["per_server_cpu_second"]) / 2
        measured["echo_rate"] = echo_rate
        measured["echo_ratio"] = measured["result"]["rate"] / echo_rate if echo_rate else None
        measured["echo_cpu_ratio"] = (
            measured["per_server_cpu_second"] / echo_cpu if echo_cpu else None
        )
        store_counts = measured["store"]
        measured["transactions_per_datagram"] = per_datagram(
            measured, store_counts.get("transactions")
        )
        measured["operations_per_datagram"] = per_datagram(measured, store_counts.get("operations"))
        measured["round_trips_per_datagram"] = per_datagram(
            measured, store_counts.get("round_trips")
        )
        say(
            f"    / echo (mean of neighbours, {fmt_rate(echo_rate)}) = "
            f"{measured['echo_ratio'] or 0:.3f}; per server CPU-second "
            f"{measured['per_server_cpu_second']:,.0f} / {echo_cpu:,.0f} = "
            f"{measured['echo_cpu_ratio'] or 0:.3f}"
        )
        parts = [
            f"{store_counts.get('transactions', 0):,} transactions "
            f"({measured['transactions_per_datagram'] or 0:.4f}/DATA) holding "
            f"{store_counts.get('operations', 0):,} operations"
        ]
        if "round_trips" in store_counts:
            parts.append(
                f"{store_counts['round_trips']:,} round trips "
                f"({measured['round_trips_per_datagram'] or 0:.3f}/DATA)"
            )
        say(f"    store: {', '.join(parts)} for {measured['data']:,} DATA")
        cost = cpu_per_datagram(measured)
        measured["cpu_us_per_datagram"] = cost
        if cost is not None:
            say(
                f"    CPU per DATA: node(s) {cost['nodes']:.0f} µs (reactor thread "
                f"{cost['reactor_thread']:.0f}, store thread {cost['other_threads']:.0f}), "
                "database "
                f"{_us(cost['database'])}, together {cost['total']:.0f} µs"
            )
        database = measured.get("database")
        if database is not None:
            measured["xact_commit_per_datagram"] = per_datagram(measured, database["xact_commit"])
            measured["wal_sync_per_datagram"] = per_datagram(measured, database["wal_sync"])
            measured["wal_bytes_per_datagram"] = per_datagram(measured, database["wal_bytes"])
            say(
                f"    PostgreSQL itself: {database['xact_commit']:,.0f} commits "
                f"({measured['xact_commit_per_datagram'] or 0:.4f}/DATA), "
                f"{database['xact_rollback']:,.0f} rollbacks, {database['wal_sync']:,.0f} WAL "
                f"syncs ({measured['wal_sync_per_datagram'] or 0:.4f}/DATA), "
                f"{measured['wal_bytes_per_datagram'] or 0:,.0f} WAL bytes/DATA"
            )
        runs[key] = measured
        before = after
    return runs


def summary(runs: dict[str, Any]) -> list[str]:
    """The figures issue 6 asks for, and whether the targets are met."""
    sqlite, pg1, pg2 = runs["sqlite"], runs["pg1"], runs["pg2"]
    rate = {key: runs[key]["result"]["rate"] for key in ("sqlite", "pg1", "pg2")}
    pg1_sqlite = rate["pg1"] / rate["sqlite"] if rate["sqlite"] else None
    cpu_pg1_sqlite = (
        pg1["per_server_cpu_second"] / sqlite["per_server_cpu_second"]
        if sqlite["per_server_cpu_second"]
        else None
    )
    factor = rate["pg2"] / rate["pg1"] if rate["pg1"] else None
    cost = {key: runs[key].get("cpu_us_per_datagram") for key in ("sqlite", "pg1", "pg2")}
    machine_ratio = None
    if cost["sqlite"] and cost["pg1"] and cost["pg1"]["database"] is not None:
        # SQLite runs inside the node: its whole cost is the node's.
        machine_ratio = cost["sqlite"]["total"] / cost["pg1"]["total"]
    runs["pg1_vs_sqlite_machine_cpu"] = machine_ratio
    runs["pg1_vs_sqlite"], runs["pg2_vs_pg1"] = pg1_sqlite, factor
    lines = ["== Summary: issue 6 ==", ""]
    lines.append(
        f"  rates: echo {fmt_rate(pg1['echo_rate'])} (neighbours of PG1), "
        f"SQLite {fmt_rate(rate['sqlite'])}, PG1 {fmt_rate(rate['pg1'])}, "
        f"PG2 {fmt_rate(rate['pg2'])}"
    )
    lines.append(
        f"  PG1 / SQLite: {pg1_sqlite or 0:.3f}   target >= {TARGET_PG1_VS_SQLITE:.2f}: "
        f"{verdict(pg1_sqlite, TARGET_PG1_VS_SQLITE)}   "
        f"(per server CPU-second: {cpu_pg1_sqlite or 0:.3f})"
    )
    if machine_ratio is not None and cost["pg1"] and cost["sqlite"]:
        lines.append(
            f"  CPU per DATA: SQLite node {cost['sqlite']['total']:.0f} µs "
            f"({_threads(cost['sqlite'])}); PG1 node {cost['pg1']['nodes']:.0f} µs "
            f"({_threads(cost['pg1'])}) + database {_us(cost['pg1']['database'])} = "
            f"{cost['pg1']['total']:.0f} µs: PG1 / SQLite per machine CPU-second "
            f"{machine_ratio:.3f}"
        )
    lines.append(
        f"  PG1 / echo: {pg1['echo_ratio'] or 0:.3f}; "
        f"SQLite / echo: {sqlite['echo_ratio'] or 0:.3f}; PG2 / echo: {pg2['echo_ratio'] or 0:.3f}"
    )
    cpu2, cpu1 = pg2["cpu"], pg1["cpu"]
    lines.append(
        f"  PG2 / PG1 (1 -> 2 nodes): {factor or 0:.2f}; the 2 CPUs are shared: one node "
        f"{100 * cpu1['servers']:.0f} %, database {_pct(cpu1['database'])}, load generator "
        f"{100 * cpu1['loadgen']:.0f} %, others {100 * cpu1['others']:.0f} %; two nodes "
        f"{' + '.join(f'{100 * s:.0f}' for s in cpu2['nodes'])} %, database "
        f"{_pct(cpu2['database'])}, load generator {100 * cpu2['loadgen']:.0f} %, others "
        f"{100 * cpu2['others']:.0f} %"
    )
    for key, label in (("pg1", "one node"), ("pg2", "two nodes")):
        measured = runs[key]
        trips = measured.get("round_trips_per_datagram")
        met = verdict(trips, TARGET_ROUND_TRIPS, higher_is_better=False)
        lines.append(
            f"  PostgreSQL {label}: round trips per DATA {_num(trips)}   target <= "
            f"{TARGET_ROUND_TRIPS:.2f}: {met}"
            f"; transactions per DATA {_num(measured.get('transactions_per_datagram'))} "
            f"(pg_stat_database commits per DATA {_num(measured.get('xact_commit_per_datagram'))}, "
            f"WAL syncs per DATA {_num(measured.get('wal_sync_per_datagram'))}; "
            f"{_per_transaction(measured)} DATA per transaction, window "
            f"{runs.get('window', '?')} over {len(measured.get('nodes', [])) or '?'} node(s))"
        )
    lines.append(f"  SQLite: transactions per DATA {_num(sqlite.get('transactions_per_datagram'))}")
    return lines


def _per_transaction(measured: dict[str, Any]) -> str:
    per_datagram = measured.get("transactions_per_datagram")
    return "-" if not per_datagram else f"{1 / per_datagram:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _threads(cost: dict[str, Any]) -> str:
    reactor, store = cost.get("reactor_thread"), cost.get("other_threads")
    if reactor is None or store is None:
        return "threads not measured"
    return f"reactor thread {reactor:.0f} + store thread {store:.0f}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} µs"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
