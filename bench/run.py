"""
``python -m bench.run``: every benchmark of issue 3, measured in one run.

::

    python -m bench.run                 # the full run (a few minutes on 2 cores)
    python -m bench.run --quick         # a smoke run (about a minute)
    python -m bench.run --only wire     # one benchmark: wire, crypto, data, hello, memory
    python -m bench.run --profile DIR   # also cProfile the gateway's timed phases

Each benchmark prints its figures, the ratio asked for and whether the target
is met.  Servers and the load generator are separate processes talking over
127.0.0.1; everything stops by itself (bounded durations and counts, and
timeouts on every step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from bench import crypto_limit, wire
from bench.common import Fleet, machine_cpu, machine_facts

BENCHMARKS = ("wire", "crypto", "data", "hello", "memory")
#: The suites whose server keys the gateways have.
SUITES = ("p256", "p256-ccm8")
#: The module key suite of every fleet.
FLEET_SUITE = "p256"

TARGETS = {
    "data_memory": 0.50,
    "data_sqlite": 0.30,
    "hello_sig": 0.60,
    "hello_sdh": 0.60,
}


class BenchError(Exception):
    """A benchmark step failed (a process did not start, answer or stop in time)."""


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run."""

    quick: bool
    #: Seconds of each timed DATA and echo phase.
    duration: float
    #: Seconds of each timed HELLO phase.
    hello_duration: float
    window: int
    data_modules: int
    hello_modules: int
    memory_provisioned: int
    memory_sessions: int
    crypto_seconds: float
    crypto_rounds: int
    #: Seconds to wait, before each timed phase, for other processes to quieten.
    quiet_wait: float
    #: Expected rates, only to size the pre-built datagrams (generously).
    data_rate_guess: float
    hello_rate_guess: float

    @classmethod
    def make(
        cls, quick: bool, duration: float | None, window: int, quiet_wait: float | None = None
    ) -> Settings:
        """The quick or the full settings, ``duration`` and ``quiet_wait`` overriding defaults."""
        if quick:
            return cls(
                quick=True,
                duration=duration or 1.5,
                hello_duration=duration or 1.5,
                window=window,
                data_modules=200,
                hello_modules=100,
                memory_provisioned=20_000,
                memory_sessions=1_000,
                crypto_seconds=0.25,
                crypto_rounds=2,
                quiet_wait=0.0 if quiet_wait is None else quiet_wait,
                data_rate_guess=6_000,
                hello_rate_guess=2_200,
            )
        return cls(
            quick=False,
            duration=duration or 10.0,
            hello_duration=duration or 5.0,
            window=window,
            data_modules=1000,
            hello_modules=500,
            memory_provisioned=100_000,
            memory_sessions=10_000,
            crypto_seconds=1.0,
            crypto_rounds=3,
            quiet_wait=8.0 if quiet_wait is None else quiet_wait,
            data_rate_guess=6_000,
            hello_rate_guess=2_200,
        )


# -- child processes -----------------------------------------------------------------------------


class Child:
    """
    A benchmark process speaking JSON lines on its standard output and
    reading commands on its standard input.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "a", encoding="utf-8")  # noqa: SIM115
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            cwd=root,
            env=env,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name} stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                self._log.write(f"[bench.run] unexpected output: {line}")
        self._lines.put(None)

    def send(self, line: str) -> None:
        """Write one command line."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise BenchError(f"{self.name} is gone ({e}); see {self.log_path}") from None

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """
        The next line whose event is ``event`` (other events are skipped).

        :raise BenchError: an ``error`` event, the process ended, or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no {event!r} within {timeout:.0f} s")
            try:
                message = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if message is None:
                raise BenchError(f"{self.name} ended before {event!r}; see {self.log_path}")
            if message.get("event") == "error":
                raise BenchError(f"{self.name}: {message.get('message')}")
            if message.get("event") == event:
                return message

    def request(self, command: str, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Send ``command`` and wait for its ``event`` answer."""
        self.send(command)
        return self.expect(event, timeout)

    def close(self, timeout: float = 30.0) -> int:
        """Ask the process to quit; kill it if it has not ended within ``timeout``."""
        if self.process.poll() is None:
            with contextlib.suppress(BenchError):
                self.send("quit")
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


class Context:
    """Where a run keeps its files, and how it talks to the reader."""

    def __init__(self, settings: Settings, work_dir: str, profile_dir: str | None) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.profile_dir = profile_dir
        self.children: list[Child] = []
        self.jobs = 0
        #: HELLO ts counters of each job start far above those of the previous one.
        self.ts_base = int(time.time())

    def path(self, name: str) -> str:
        """A file of this run."""
        return os.path.join(self.work_dir, name)

    def child(self, name: str, argv: Sequence[str]) -> Child:
        """Start a benchmark process (logged to ``<work dir>/<name>.log``)."""
        process = Child(name, argv, self.path(f"{name}.log"))
        self.children.append(process)
        return process

    def close_all(self) -> None:
        """Stop every process still running."""
        for process in reversed(self.children):
            process.close(timeout=15)
        self.children.clear()

    def next_ts_base(self) -> int:
        """A ``ts`` floor above every ``ts`` any earlier job could have used."""
        self.jobs += 1
        return self.ts_base + self.jobs * 10_000_000


def say(text: str = "") -> None:
    """Print a line at once."""
    print(text, flush=True)


def write_config(
    ctx: Context, name: str, store: str, sign_replies: bool, data_dir: str | None = None
) -> str:
    """A gateway configuration file on 127.0.0.1 ephemeral ports."""
    path = ctx.path(f"{name}.conf")
    data_dir = data_dir or ctx.path(f"{name}-data")
    with open(path, "w", encoding="utf-8") as conf:
        conf.write(
            f"""[gateway]
data_dir = {data_dir}
node_name = bench
suites = {", ".join(SUITES)}

[modules]
address = 127.0.0.1
port = 0

[apps]
address = 127.0.0.1
port = 0
key_type = ec

[store]
backend = {store}

[protocol]
sign_replies = {"yes" if sign_replies else "no"}

[jobs]
expiry_interval = 3600
housekeeping_interval = 3600
security_interval = 10
"""
        )
    return path


def start_gateway(
    ctx: Context, name: str, store: str, sign_replies: bool, fleet: Fleet
) -> tuple[Child, dict[str, Any]]:
    """
    A gateway process with ``fleet`` provisioned: for SQLite by a first
    process that provisions and exits (so the measured one starts clean),
    for the memory store in the process itself.
    """
    config = write_config(ctx, name, store, sign_replies)
    fleet_json = json.dumps(fleet.to_json())
    # Provisioning takes about 0.1 ms per module, 0.5 ms per keyed one; far more is a hang.
    limit = 60.0 + fleet.count / 200 + fleet.keyed / 100
    base = ["-m", "bench.gateway", "--config", config, "--log", ctx.path(f"{name}.log")]
    if store == "sqlite":
        setup = ctx.child(
            f"{name}-provision",
            [*base, "--fleet", fleet_json, "--provision-only", "--start-timeout", str(limit)],
        )
        provisioned = setup.expect("provisioned", timeout=limit + 10)
        setup.process.wait(60)
        gateway = ctx.child(name, [*base, "--start-timeout", "60"])
        ready = gateway.expect("ready", timeout=70)
        ready["provisioned"] = provisioned["provisioned"]
    else:
        gateway = ctx.child(name, [*base, "--fleet", fleet_json, "--start-timeout", str(limit)])
        ready = gateway.expect("ready", timeout=limit + 10)
    return gateway, ready


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a server did between two ``stats`` answers."""
    delta: dict[str, Any] = {
        "cpu": after["cpu"] - before["cpu"],
        "wall": after["wall"] - before["wall"],
        "rss_before": before["rss"],
        "rss_after": after["rss"],
        "answered": {
            kind: after["answered"][kind] - before["answered"].get(kind, 0)
            for kind in after["answered"]
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
            name: after["store"][name] - before["store"][name] for name in after["store"]
        }
    for name in ("reply_cache", "session_cache", "zss_cache"):
        if name in after:
            delta[name] = after[name]
    return delta


def run_load(
    ctx: Context, name: str, job: dict[str, Any], server: Child, profile: bool = True
) -> dict[str, Any]:
    """
    One load generator job against ``server``: prepare (untimed), then the
    timed phase between two ``stats`` of the server.
    """
    job_path = ctx.path(f"{name}.job.json")
    with open(job_path, "w", encoding="utf-8") as out:
        json.dump(job, out)
    generator = ctx.child(f"{name}-loadgen", ["-m", "bench.loadgen", job_path])
    preparing = time.monotonic()
    try:
        prepared = generator.expect("prepared", timeout=900)
        prepared["seconds"] = round(time.monotonic() - preparing, 2)
        before = server.request("stats", "stats")["stats"]
        profile_path = None
        if profile and ctx.profile_dir is not None:
            profile_path = os.path.join(ctx.profile_dir, f"{name}.pstats")
            server.request("profile-start", "profiling")
        quiet = wait_for_quiet(ctx.settings.quiet_wait)
        machine_before = machine_cpu()
        generator.send("go")
        limit = (job.get("duration") or 300.0) + 120.0
        result = generator.expect("result", timeout=limit)
        machine_after = machine_cpu()
        if profile_path is not None:
            server.request(f"profile-stop {profile_path}", "profiled", timeout=120)
        after = server.request("stats", "stats")["stats"]
    finally:
        generator.close(timeout=30)
    prepared.pop("event", None)
    result.pop("event", None)
    server_delta = _delta(before, after)
    elapsed = result["elapsed"]
    server_delta["cpu_share"] = server_delta["cpu"] / elapsed if elapsed else None
    result["cpu_share"] = result["cpu"] / elapsed if elapsed else None
    busy = machine_after[0] - machine_before[0]
    others = busy - server_delta["cpu"] - result["cpu"]
    machine = {
        "busy_cpus": busy / elapsed if elapsed else None,
        "other_processes_cpus": max(0.0, others) / elapsed if elapsed else None,
        "interrupt_cpus": (machine_after[1] - machine_before[1]) / elapsed if elapsed else None,
        "steal_cpus": (machine_after[2] - machine_before[2]) / elapsed if elapsed else None,
        "quiet_wait": quiet,
    }
    return {"prepared": prepared, "result": result, "server": server_delta, "machine": machine}


#: Other processes using less than this many CPUs count as a quiet machine.
QUIET_CPUS = 0.25


def wait_for_quiet(max_wait: float) -> dict[str, float]:
    """
    Wait, up to ``max_wait`` seconds, until the machine is nearly idle (our
    own processes are idle then, so what is busy is someone else's).

    :return: how long it waited and the busy CPUs last seen.
    """
    started = time.monotonic()
    busy_cpus = -1.0
    while True:
        before, at = machine_cpu()[0], time.monotonic()
        time.sleep(0.5)
        busy_cpus = (machine_cpu()[0] - before) / (time.monotonic() - at)
        waited = time.monotonic() - started
        if busy_cpus < QUIET_CPUS or waited >= max_wait:
            return {"waited": round(waited, 2), "busy_cpus": round(busy_cpus, 3)}


def per_module(rate_guess: float, duration: float, modules: int) -> int:
    """Datagrams to pre-build per module so that the timed phase cannot run out."""
    return math.ceil(rate_guess * duration * 1.3 / modules) + 2


def load_job(
    ctx: Context,
    mode: str,
    target: tuple[str, int],
    fleet: Fleet,
    modules: int,
    ready: dict[str, Any] | None,
    **changes: Any,
) -> dict[str, Any]:
    """A load generator job with this run's window and duration."""
    settings = ctx.settings
    job: dict[str, Any] = {
        "mode": mode,
        "target": list(target),
        "fleet": fleet.to_json(),
        "modules": modules,
        "server_keys": ready["server_keys"] if ready else [],
        "window": settings.window,
        "duration": settings.duration,
        "timeout": 1.0,
        "ts_base": ctx.next_ts_base(),
    }
    job.update(changes)
    return job


# -- the benchmarks ------------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    """A rate for a table."""
    return "-" if value is None else f"{value:,.0f}/s"


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    """``met`` or ``MISSED``."""
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def bench_wire(ctx: Context, results: dict[str, Any]) -> None:
    """Bytes on the wire, in-process."""
    say("== Bytes on the wire (UDP payload; module client + gateway engine, in-process) ==")
    measured = wire.measure()
    results["wire"] = wire.rows_as_json(measured)
    for line in wire.report_lines(measured):
        say(line)


def bench_crypto(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    """The per-core HELLO crypto limits."""
    if "crypto" in results:
        return dict(results["crypto"])
    settings = ctx.settings
    say("== Per-core crypto limit of a HELLO (p256, this process, best of rounds) ==")
    measured = crypto_limit.measure(settings.crypto_seconds, settings.crypto_rounds)
    results["crypto"] = measured
    for name, micros in measured["operations_us"].items():
        say(f"  {name:<34} {micros:8.1f} µs")
    say(f"  SIG HELLO crypto limit (ECDH + verify + sign + HKDFs): {fmt_rate(measured['sig'])}")
    say(f"  SDH HELLO crypto limit (ECDH + HKDFs + HMAC):          {fmt_rate(measured['sdh'])}")

    return measured


def _echo_run(ctx: Context, name: str, fleet: Fleet) -> dict[str, Any]:
    echo = ctx.child(name, ["-m", "bench.echo"])
    try:
        ready = echo.expect("ready", timeout=60)
        job = load_job(
            ctx,
            "echo",
            ("127.0.0.1", ready["port"]),
            fleet,
            ctx.settings.data_modules,
            None,
            per_module=20,
            warm=False,
        )
        return run_load(ctx, name, job, echo, profile=False)
    finally:
        echo.close()


def _print_load(label: str, run: dict[str, Any]) -> None:
    result, server = run["result"], run["server"]
    latency = result["latency_ms"]
    handled = sum(server["answered"].values())
    per_cpu = handled / server["cpu"] if server["cpu"] > 0 else 0.0
    run["server"]["per_cpu_second"] = per_cpu
    say(
        f"  {label:<30} {fmt_rate(result['rate']):>10}   answered {result['answered']:,} "
        f"in {result['elapsed']:.1f} s, lost {result['lost']}; "
        f"latency p50 {latency['p50']} ms, p99 {latency['p99']} ms"
    )
    say(
        f"      CPU: server {100 * (server['cpu_share'] or 0):.0f} % "
        f"({per_cpu:,.0f} answered per server CPU-second), "
        f"load generator {100 * (result['cpu_share'] or 0):.0f} %, "
        f"other processes {100 * (run['machine']['other_processes_cpus'] or 0):.0f} %, "
        f"interrupts {100 * (run['machine']['interrupt_cpus'] or 0):.0f} %; "
        f"prepared in {run['prepared']['seconds']:.1f} s"
    )
    others = run["machine"]["other_processes_cpus"] or 0.0
    if others > QUIET_CPUS:
        say(
            f"    !! other processes used {others:.2f} CPUs during this run: "
            "its figures are depressed by the sharing"
        )
    if result["verify_failures"]:
        say(f"    !! {result['verify_failures']} of {result['verified']} checked replies were bad")
    if server.get("drops"):
        say(f"    !! the server dropped: {server['drops']}")


def bench_data(ctx: Context, results: dict[str, Any]) -> None:
    """
    Warm DATA through the real UDP listener against a bare Twisted echo
    server, measured just before and just after each gateway run with the
    same load generator: each ratio uses the mean of its two neighbouring
    echo runs (the machine is shared; adjacent runs see the same conditions).
    """
    settings = ctx.settings
    modules = settings.data_modules
    say(
        f"== Warm DATA exchanges per second: {modules} modules, window {settings.window}, "
        f"{settings.duration:g} s each, DATA carrying a 16-byte report (p256) =="
    )
    fleet = Fleet(count=modules, keyed=modules, suite=FLEET_SUITE, seed=os.urandom(8).hex())
    runs: dict[str, Any] = {"echo": []}

    def echo(label: str) -> tuple[float, float]:
        run = _echo_run(ctx, f"echo-{len(runs['echo']) + 1}", fleet)
        runs["echo"].append(run)
        _print_load(f"Twisted UDP echo ({label})", run)
        return run["result"]["rate"], run["server"]["per_cpu_second"]

    before = echo("before memory")
    for store, key in (("memory", "data_memory"), ("sqlite", "data_sqlite")):
        name = f"data-{store}"
        gateway, ready = start_gateway(ctx, name, store, True, fleet)
        try:
            target = ("127.0.0.1", ready["port"])
            count = per_module(settings.data_rate_guess, settings.duration, modules)
            job = load_job(ctx, "data", target, fleet, modules, ready, per_module=count)
            run = run_load(ctx, name, job, gateway)
        finally:
            gateway.close()
        _print_load(f"gateway, {store} store", run)
        warm = run["prepared"]["warm_up"]["warm"]
        if warm < modules:
            say(f"    !! only {warm} of {modules} sessions opened in the warm-up")
        if run["result"]["ended_by"] != "duration":
            say(f"    !! the run ended early: {run['result']['ended_by']}")
        after = echo(f"after {store}")
        echo_rate = (before[0] + after[0]) / 2
        ratio = run["result"]["rate"] / echo_rate if echo_rate else None
        run["echo_rate"], run["ratio"], run["target"] = echo_rate, ratio, TARGETS[key]
        echo_per_cpu = (before[1] + after[1]) / 2
        run["cpu_ratio"] = run["server"]["per_cpu_second"] / echo_per_cpu if echo_per_cpu else None
        runs[store] = run
        say(
            f"    {store} / echo (mean of the neighbouring echo runs, {fmt_rate(echo_rate)}) = "
            f"{ratio:.3f}   target >= {TARGETS[key]:.2f}: {verdict(ratio, TARGETS[key])}"
        )
        say(
            f"    (per server CPU-second: {run['server']['per_cpu_second']:,.0f} vs "
            f"{echo_per_cpu:,.0f} = {run['cpu_ratio'] or 0:.3f}, less sensitive to sharing)"
        )
        before = after
    floor = crypto_limit.data_floor(settings.crypto_seconds / 2, settings.crypto_rounds)
    echo_us = [
        1e6 / run["server"]["per_cpu_second"]
        for run in runs["echo"]
        if run["server"]["per_cpu_second"]
    ]
    echo_cost = sum(echo_us) / len(echo_us) if echo_us else 0.0
    floor_us = echo_cost + floor["aead"] + floor["cbor"]
    runs["floor_us"] = {"echo": echo_cost, **floor}
    say(
        f"  floor of a warm DATA, per datagram: echo server {echo_cost:.1f} µs of CPU (recvfrom + "
        f"sendto), AEAD open + seal {floor['aead']:.1f} µs, CBOR decode (checked) + encode "
        f"{floor['cbor']:.1f} µs = {floor_us:.1f} µs"
    )
    best_ratio = echo_cost / floor_us if floor_us else 0.0
    runs["floor_ratio"] = best_ratio
    gateway_us = ", ".join(
        f"{store} {1e6 / runs[store]['server']['per_cpu_second']:.0f} µs"
        for store in ("memory", "sqlite")
        if runs[store]["server"]["per_cpu_second"]
    )
    say(
        f"    a gateway doing nothing else would answer at most {best_ratio:.2f} of the echo "
        f"rate per CPU-second; measured CPU per DATA: {gateway_us}"
    )
    server = runs["sqlite"]["server"]
    store_delta = server.get("store")
    if store_delta:
        answered = server["answered"].get("data", 0)
        transactions, operations = store_delta["transactions"], store_delta["operations"]
        per_datagram = transactions / answered if answered else None
        runs["sqlite_transactions_per_datagram"] = per_datagram
        say(
            f"  SQLite store: {transactions:,} transactions holding {operations:,} operations "
            f"for {answered:,} DATA = {per_datagram or 0:.3f} transactions per datagram "
            f"({operations / max(1, transactions):.1f} operations per transaction; "
            "synchronous = full, WAL)"
        )
    results["data"] = runs


def bench_hello(ctx: Context, results: dict[str, Any]) -> None:
    """
    HELLOs per second through the UDP listener against the per-core limit of
    their crypto, measured in this process just before and just after each
    gateway run (the mean of the two is the limit of that run).
    """
    settings = ctx.settings
    bench_crypto(ctx, results)
    modules = settings.hello_modules
    say(
        f"== HELLOs per second: {modules} modules, window {settings.window}, "
        f"{settings.hello_duration:g} s each (p256; one untimed warm-up HELLO per module "
        "first; the crypto limit measured just before and after each run) =="
    )
    fleet = Fleet(count=modules, keyed=modules, suite=FLEET_SUITE, seed=os.urandom(8).hex())
    material = crypto_limit.HelloCrypto()
    runs: dict[str, Any] = {}

    def limit(method: str) -> float:
        return crypto_limit.limit(
            method, settings.crypto_seconds / 2, settings.crypto_rounds, material
        )

    for method, signed in (("sig", True), ("sdh", False)):
        for store in ("memory", "sqlite"):
            name = f"hello-{method}-{store}"
            gateway, ready = start_gateway(ctx, name, store, signed, fleet)
            try:
                target = ("127.0.0.1", ready["port"])
                count = per_module(settings.hello_rate_guess, settings.hello_duration, modules)
                job = load_job(
                    ctx,
                    "hello",
                    target,
                    fleet,
                    modules,
                    ready,
                    method=method,
                    sign_replies=signed,
                    per_module=count,
                    duration=settings.hello_duration,
                    timeout=2.0,
                    verify_every=50,
                )
                limit_before = limit(method)
                run = run_load(ctx, name, job, gateway)
                limit_after = limit(method)
            finally:
                gateway.close()
            run["limit"] = (limit_before + limit_after) / 2
            run["limits"] = [limit_before, limit_after]
            run["ratio"] = run["result"]["rate"] / run["limit"]
            target_value = TARGETS[f"hello_{method}"]
            run["target"] = target_value
            runs[f"{method}_{store}"] = run
            label = f"{method.upper()} {'signed' if signed else 'unsigned'}, {store}"
            _print_load(label, run)
            if run["result"]["ended_by"] != "duration":
                say(f"    !! the run ended early: {run['result']['ended_by']}")
            say(
                f"    / crypto limit {fmt_rate(run['limit'])} (before {fmt_rate(limit_before)}, "
                f"after {fmt_rate(limit_after)}) = {run['ratio']:.3f}   "
                f"target >= {target_value:.2f}: {verdict(run['ratio'], target_value)}"
            )
            run["cpu_ratio"] = run["server"]["per_cpu_second"] / run["limit"]
            say(
                f"    (per server CPU-second: {run['server']['per_cpu_second']:,.0f} / "
                f"{run['limit']:,.0f} = {run['cpu_ratio']:.3f}, less sensitive to sharing)"
            )
    results["hello"] = runs
    _hello_floor(ctx, results, fleet)


def _hello_floor(ctx: Context, results: dict[str, Any], fleet: Fleet) -> None:
    """
    The floor of a HELLO: its crypto (the limit), the AEAD open and seal, the
    CBOR no implementation can skip and the echo server's cost per datagram
    (from the DATA benchmark of this run, else one echo run here).  The
    limit over that floor is the best ratio a gateway doing nothing else
    could reach.
    """
    settings = ctx.settings
    runs = results["hello"]
    found: dict[str, Any] = {}
    results["hello_floor"] = found
    data = results.get("data")
    if data and data.get("floor_us"):
        echo_cost = data["floor_us"]["echo"]
        source = "the DATA benchmark's echo runs"
    else:
        echo = _echo_run(ctx, "echo-hello", fleet)
        _print_load("Twisted UDP echo (for the floor)", echo)
        per_cpu = echo["server"]["per_cpu_second"]
        echo_cost = 1e6 / per_cpu if per_cpu else 0.0
        source = "one echo run"
    floor = crypto_limit.hello_floor(settings.crypto_seconds / 2, settings.crypto_rounds)
    aead = results["crypto"]["operations_us"]["AEAD open HELLO + seal reply"]
    found["parts_us"] = {"echo": echo_cost, "aead": aead, **floor}
    for method in ("sig", "sdh"):
        limits = [runs[f"{method}_{store}"]["limit"] for store in ("memory", "sqlite")]
        crypto_us = 1e6 / (sum(limits) / len(limits))
        floor_us = crypto_us + aead + floor[f"cbor_{method}"] + echo_cost
        best = crypto_us / floor_us
        found[method] = {"crypto_us": crypto_us, "floor_us": floor_us, "ratio": best}
        gateway_us = ", ".join(
            f"{store} {1e6 / runs[f'{method}_{store}']['server']['per_cpu_second']:.0f} µs"
            for store in ("memory", "sqlite")
            if runs[f"{method}_{store}"]["server"]["per_cpu_second"]
        )
        say(
            f"  floor of a {method.upper()} HELLO: crypto {crypto_us:.1f} µs (the limit) + AEAD "
            f"{aead:.1f} + CBOR decode (checked) and encode {floor[f'cbor_{method}']:.1f} + echo "
            f"server {echo_cost:.1f} µs of CPU ({source}) = {floor_us:.1f} µs: at most "
            f"{best:.2f} of the limit per CPU-second; measured CPU per HELLO: {gateway_us}"
        )


def bench_memory(ctx: Context, results: dict[str, Any]) -> None:
    """Resident size with many provisioned modules and many live sessions (SQLite)."""
    settings = ctx.settings
    provisioned, sessions = settings.memory_provisioned, settings.memory_sessions
    say(
        f"== Memory: {provisioned:,} provisioned modules (SQLite), "
        f"{sessions:,} live sessions opened by SIG HELLOs =="
    )
    fleet = Fleet(count=provisioned, keyed=sessions, suite=FLEET_SUITE, seed=os.urandom(8).hex())
    gateway, ready = start_gateway(ctx, "memory", "sqlite", True, fleet)
    try:
        target = ("127.0.0.1", ready["port"])
        job = load_job(
            ctx,
            "hello",
            target,
            fleet,
            sessions,
            ready,
            per_module=1,
            warm=False,
            duration=None,
            timeout=2.0,
            verify_every=50,
        )
        run = run_load(ctx, "memory", job, gateway, profile=False)
    finally:
        gateway.close()
    server, result = run["server"], run["result"]
    opened = server["answered"].get("hello", 0)
    grown = server["rss_after"] - server["rss_before"]
    run["provisioned"] = ready.get("provisioned")
    run["rss_ready"] = ready["stats"]["rss"]
    run["sessions_opened"] = opened
    run["bytes_per_session"] = grown / opened if opened else None
    results["memory"] = run
    mib = 1 << 20
    say(f"  provisioning {provisioned:,} modules took {ready['provisioned']['seconds']:.1f} s")
    say(f"  RSS with {provisioned:,} modules, no session:   {server['rss_before'] / mib:8.1f} MiB")
    say(f"  RSS with {opened:,} live sessions:            {server['rss_after'] / mib:8.1f} MiB")
    if opened:
        say(f"  bytes per live session: {grown / opened:,.0f}")
    say(
        f"  (caches at the end: {server.get('reply_cache')} retransmission entries, "
        f"{server.get('session_cache')} session keys; HELLOs at {fmt_rate(result['rate'])})"
    )


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per target of issue 3: what was measured and whether it is met."""
    lines = ["== Summary: the targets of issue 3 =="]
    data = results.get("data")
    if data:
        for store in ("memory", "sqlite"):
            run = data.get(store)
            if run:
                lines.append(
                    f"  warm DATA, {store} store / echo: {run['ratio']:.3f} "
                    f"({fmt_rate(run['result']['rate'])} / {fmt_rate(run['echo_rate'])}), "
                    f"target >= {run['target']:.2f}: {verdict(run['ratio'], run['target'])}"
                )
        per_datagram = data.get("sqlite_transactions_per_datagram")
        if per_datagram is not None:
            lines.append(f"  SQLite transactions per DATA: {per_datagram:.3f}")
    hello = results.get("hello")
    if hello:
        for key, run in hello.items():
            method, store = key.split("_")
            lines.append(
                f"  {method.upper()} HELLOs, {store} store / crypto limit: {run['ratio']:.3f} "
                f"({fmt_rate(run['result']['rate'])} / {fmt_rate(run['limit'])}), "
                f"target >= {run['target']:.2f}: {verdict(run['ratio'], run['target'])}; "
                f"per server CPU-second {run['cpu_ratio']:.3f}"
            )
    for method, floor in (results.get("hello_floor") or {}).items():
        if method in ("sig", "sdh"):
            lines.append(
                f"  floor of a {method.upper()} HELLO: at most {floor['ratio']:.2f} of the "
                f"crypto limit per CPU-second ({floor['floor_us']:.0f} µs, of which crypto "
                f"{floor['crypto_us']:.0f} µs)"
            )
    for row in results.get("wire", []):
        if row["target"] is not None:
            up_ok, down_ok = row["met"]
            lines.append(
                f"  {row['name']} ({row['variant']}): {row['up']} B up / {row['down']} B down, "
                f"target <= {row['target'][0]} / <= {row['target'][1]}: "
                f"up {'met' if up_ok else 'MISSED'}, down {'met' if down_ok else 'MISSED'}"
            )
    memory = results.get("memory")
    if memory and memory.get("bytes_per_session") is not None:
        lines.append(
            f"  memory: {memory['bytes_per_session']:,.0f} bytes per live session "
            f"({memory['sessions_opened']:,} sessions, "
            f"{memory['server']['rss_after'] / (1 << 20):.1f} MiB RSS; no target)"
        )
    return lines


# -- the run -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)"
    )
    parser.add_argument("--duration", type=float, help="seconds of each timed phase")
    parser.add_argument("--window", type=int, default=64, help="requests outstanding (64)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before each timed phase for other processes to quieten "
        "(default 8, 0 with --quick)",
    )
    parser.add_argument("--profile", metavar="DIR", help="cProfile the gateway's timed phases")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick, args.duration, args.window, args.quiet_wait)
    chosen = args.only or list(BENCHMARKS)
    facts = machine_facts()
    say(
        f"m2mgw benchmarks, {facts['date']}: {facts['nproc']} CPUs ({facts['cpu_model']}), "
        f"Python {facts['python']}, load average {facts['loadavg']}"
    )
    say(
        "Servers and the load generator run in separate processes on the same machine "
        "and share its CPUs.\n"
    )
    results: dict[str, Any] = {"machine": facts, "settings": settings.__dict__}
    work_dir = tempfile.mkdtemp(prefix="m2mgw-bench-")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    ctx = Context(settings, work_dir, os.path.abspath(args.profile) if args.profile else None)
    started = time.monotonic()
    status = 0
    steps = {
        "wire": bench_wire,
        "crypto": bench_crypto,
        "data": bench_data,
        "hello": bench_hello,
        "memory": bench_memory,
    }
    try:
        for name in BENCHMARKS:
            if name in chosen:
                section_started = time.monotonic()
                steps[name](ctx, results)
                say(f"  ({name}: {time.monotonic() - section_started:.0f} s)\n")
        for line in summary_lines(results):
            say(line)
    except BenchError as e:
        say(f"benchmark failed: {e}")
        status = 1
    finally:
        ctx.close_all()
        results["seconds"] = time.monotonic() - started
        results["load_after"] = [round(value, 2) for value in os.getloadavg()]
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(results, out, indent=2, sort_keys=True, default=str)
        if args.keep or status:
            say(f"work directory (logs, configurations, jobs): {work_dir}")
        else:
            _remove_tree(work_dir)
    say(f"done in {results['seconds']:.0f} s; load average now {results['load_after']}")
    return status


def _remove_tree(path: str) -> None:
    """Remove the work directory."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
