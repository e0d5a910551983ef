"""
The closed-loop load generator, in a process of its own.

``python -m bench.loadgen JOB.json`` reads a job (see :class:`Job`), prepares
everything untimed -- the modules' states, the warm-up HELLOs that open their
sessions, and every datagram of the timed phase, pre-built -- prints
``{"event": "prepared", ...}``, waits for a ``go`` line on standard input,
runs the timed phase and prints ``{"event": "result", ...}``.

During the timed phase it only sends pre-built datagrams and matches replies,
on plain non-blocking sockets and :mod:`selectors`: a fixed window of
``window`` slots, each with one request outstanding; a slot sends its next
request when the reply to the last one arrives, or when it is given up as
lost after ``timeout`` seconds.  Each slot owns a subset of the modules and
sends each module's datagrams in order (DATA counters and HELLO ``ts``
ascending, one outstanding per module).

- ``echo`` and ``data``: one socket; a reply is matched by its envelope
  (``sid`` and ``ctr``, for ``echo`` the whole datagram) to the slot waiting
  for it.  ``echo`` sends DATA datagrams of the same shape and size, sealed
  under made-up session keys, and cycles through them.
- ``hello``: one connected socket per slot (a HELLO_REPLY names a new ``sid``,
  so the socket says which HELLO it answers); every ``verify_every``-th reply
  is fully checked by the module client (tag, ``ack``, server signature).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import MODULE_KID, Fleet, cipher_suite, cpu_seconds, emit, percentile
from m2mgw.client.module import (
    HelloContext,
    KeyState,
    ModuleEndpoint,
    ModuleKeyPair,
    ModuleState,
    Outgoing,
    ServerPublicKey,
)
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import keyschedule
from m2mgw.protocol.bodies import DataBody, Payload, parse_reply_body
from m2mgw.protocol.messages import Data, parse_reply

#: Bytes of a DATA's ``tok`` in the throughput runs (what the module client draws).
DATA_TOK_BYTES = 8
#: Largest datagram read.
MAX_READ = 2048
#: How often lost requests are looked for, in seconds.
TIMEOUT_CHECK = 0.05
#: Socket buffer sizes asked for.
SOCKET_BUFFER = 4 << 20
#: Warm-up rounds (HELLOs re-sent for modules whose session did not open).
WARM_ROUNDS = 3
#: The CBOR lengths of a uint by its head byte, for heads 0x18-0x1b.
_UINT_EXTRA = {0x18: 1, 0x19: 2, 0x1A: 4, 0x1B: 8}


class BenchEndpoint(ModuleEndpoint):
    """
    The module client with its suite lookups cached: ``ModuleEndpoint.suite``
    asks the plugin registry on every call (about 1 ms each, several per
    HELLO), which would make pre-building thousands of HELLOs slow.  The
    datagrams are the same.
    """

    @staticmethod
    def suite(name: str) -> ICipherSuite:
        """A cipher suite by name (cached)."""
        return cipher_suite(name)


@dataclass(frozen=True)
class Job:
    """
    What the load generator is asked to do.

    :ivar mode: ``echo``, ``data`` or ``hello``.
    :ivar target: the server's ``[host, port]``.
    :ivar modules: how many modules (the fleet's first ones) take part.
    :ivar server_keys: ``[{"skid", "suite", "public"}]`` from the gateway.
    :ivar method: HELLO authentication, ``sig`` or ``sdh``.
    :ivar sign_replies: the gateway signs HELLO_REPLYs (the modules require it).
    :ivar window: requests outstanding at any time.
    :ivar duration: seconds of the timed phase, or ``None``: until every
        pre-built datagram is answered or lost.
    :ivar per_module: datagrams pre-built per module for the timed phase.
    :ivar warm: open every module's session with a HELLO first (untimed).
    :ivar ts_base: the HELLO ``ts`` counters start above it.
    :ivar payload_bytes: size of the opaque ``data`` a DATA carries.
    :ivar verify_every: fully check one reply in this many.
    """

    mode: str
    target: tuple[str, int]
    fleet: Fleet
    modules: int
    server_keys: Sequence[dict[str, Any]] = ()
    method: str = "sig"
    sign_replies: bool = True
    window: int = 64
    duration: float | None = 10.0
    timeout: float = 1.0
    per_module: int = 10
    warm: bool = True
    ts_base: int = 0
    payload_bytes: int = 16
    verify_every: int = 64

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Job:
        """The job a JSON document describes."""
        fields = dict(value)
        fields["target"] = (str(value["target"][0]), int(value["target"][1]))
        fields["fleet"] = Fleet.from_json(value["fleet"])
        return cls(**fields)


# -- pre-built datagrams -------------------------------------------------------------------------


def build_data_datagram(
    suite: ICipherSuite, sid: bytes, k_up: bytes, ctr: int, body: bytes
) -> bytes:
    """
    A DATA datagram, as the module client seals one (MGP/1 §8).

    :param body: the DataBody bytes.
    """
    nonce = keyschedule.nonce_for_ctr(suite, ctr)
    ct = suite.seal(k_up, nonce, Data.aad_for(sid, ctr), body)
    return Data(sid, ctr, ct).encode()


def envelope_key(datagram: bytes) -> bytes:
    """
    The bytes of a DATA's or DATA_REPLY's ``sid`` and ``ctr``, as encoded:
    equal for a DATA and its reply (``[1, 3 or 4, sid, ctr, ct]``).

    :raise ValueError: the datagram is too short to hold them.
    """
    sid_len = datagram[3] - 0x40
    head_at = 4 + sid_len
    if not 0 <= sid_len < 24 or len(datagram) <= head_at:
        raise ValueError("not a DATA envelope")
    head = datagram[head_at]
    return datagram[3 : head_at + 1 + _UINT_EXTRA.get(head, 0)]


@dataclass(frozen=True)
class DataRequest:
    """A pre-built DATA and what checks its reply."""

    datagram: bytes
    key: bytes
    tok: bytes
    ctr: int
    k_down: bytes = field(repr=False)


def data_body(payload_bytes: int, now: int) -> tuple[bytes, bytes]:
    """``(tok, DataBody bytes)``: a fresh ``tok``, ``ts`` and ``payload_bytes`` opaque bytes."""
    tok = os.urandom(DATA_TOK_BYTES)
    body = DataBody(ts=now, tok=tok, pl=Payload(data=os.urandom(payload_bytes))).encode()
    return tok, body


def build_session_data(
    suite: ICipherSuite,
    sid: bytes,
    k_up: bytes,
    k_down: bytes,
    first_ctr: int,
    count: int,
    payload_bytes: int,
) -> list[DataRequest]:
    """``count`` DATA of one session, counters ascending from ``first_ctr``."""
    now = int(time.time())
    requests = []
    for ctr in range(first_ctr, first_ctr + count):
        tok, body = data_body(payload_bytes, now)
        datagram = build_data_datagram(suite, sid, k_up, ctr, body)
        requests.append(DataRequest(datagram, envelope_key(datagram), tok, ctr, k_down))
    return requests


def check_data_reply(suite: ICipherSuite, request: DataRequest, reply: bytes) -> bool:
    """True if ``reply`` is a DATA_REPLY to ``request`` that decrypts and acknowledges its tok."""
    try:
        parsed = parse_reply(reply)
        plaintext = suite.open(
            request.k_down, keyschedule.nonce_for_ctr(suite, request.ctr), parsed.aad, parsed.ct
        )
        return parse_reply_body(plaintext).ack == request.tok
    except Exception:
        return False


def interleave(per_module: Sequence[Sequence[Any]], slots: int) -> list[list[Any]]:
    """
    The send order of each slot: slot ``j`` owns modules ``j, j + slots, ...``
    and sends their items round-robin, each module's in order.
    """
    orders: list[list[Any]] = []
    for slot in range(slots):
        owned = per_module[slot::slots]
        rounds = max((len(items) for items in owned), default=0)
        orders.append([items[r] for r in range(rounds) for items in owned if r < len(items)])
    return orders


# -- the module side -----------------------------------------------------------------------------


def module_endpoints(job: Job) -> list[ModuleEndpoint]:
    """One module client per module of the job, its key derived from the fleet."""
    fleet = job.fleet
    suite = fleet.cipher_suite()
    servers = [key for key in job.server_keys if key["suite"] == fleet.suite]
    if not servers:
        raise SystemExit(f"the gateway has no {fleet.suite} server key")
    server = ServerPublicKey(servers[0]["skid"], fleet.suite, bytes.fromhex(servers[0]["public"]))
    endpoints: list[ModuleEndpoint] = []
    for index in range(job.modules):
        private = bytes(suite.dump_signing_key(fleet.private_key(index)))
        state = ModuleState(
            identity=fleet.module_id(index),
            suite=fleet.suite,
            server_keys={server.skid: server},
            skid=server.skid,
            keys={MODULE_KID: ModuleKeyPair(MODULE_KID, fleet.suite, private, KeyState.ACTIVE)},
            require_server_signature=job.sign_replies,
            hello_method=job.method,
            last_ts=job.ts_base,
        )
        endpoints.append(BenchEndpoint(state))
    return endpoints


@dataclass(frozen=True)
class HelloRequest:
    """A pre-built HELLO and the module that sent it."""

    outgoing: Outgoing
    endpoint: ModuleEndpoint


def build_hellos(endpoints: Sequence[ModuleEndpoint], count: int) -> list[list[HelloRequest]]:
    """``count`` HELLOs per module (fresh ``epk``, ``ts`` ascending), module by module."""
    return [
        [HelloRequest(endpoint.build_hello(), endpoint) for _ in range(count)]
        for endpoint in endpoints
    ]


# -- the timed loops -----------------------------------------------------------------------------


@dataclass
class PhaseResult:
    """What one phase measured."""

    sent: int = 0
    answered: int = 0
    lost: int = 0
    stale: int = 0
    refused: int = 0
    send_errors: int = 0
    verified: int = 0
    verify_failures: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    ended_by: str = "duration"
    latencies: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """A JSON-compatible summary (rates, latency percentiles in ms)."""
        ordered = sorted(self.latencies)

        def ms(fraction: float) -> float | None:
            value = percentile(ordered, fraction)
            return None if value is None else round(value * 1000, 3)

        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "stale": self.stale,
            "refused": self.refused,
            "send_errors": self.send_errors,
            "verified": self.verified,
            "verify_failures": self.verify_failures,
            "elapsed": round(self.elapsed, 4),
            "rate": self.answered / self.elapsed if self.elapsed > 0 else 0.0,
            "cpu": round(self.cpu, 3),
            "ended_by": self.ended_by,
            "latency_ms": {"p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99)},
        }


def _udp_socket(target: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.connect(target)
    sock.setblocking(False)
    return sock


def run_envelope_phase(
    target: tuple[str, int],
    orders: Sequence[Sequence[DataRequest]],
    *,
    duration: float | None,
    timeout: float,
    cycle: bool,
    whole_datagram_key: bool,
    check: Callable[[DataRequest, bytes], bool] | None = None,
    verify_every: int = 64,
) -> PhaseResult:
    """
    Echo and DATA: one socket, replies matched by envelope to their slot.

    :param orders: per slot, the requests in sending order.
    :param duration: stop after this many seconds (``None``: when every
        request is answered or lost).
    :param cycle: start a slot's requests over when they run out (echo).
    :param whole_datagram_key: match a reply by all its bytes (echo).
    :param check: fully checks one reply in ``verify_every``.
    """
    result = PhaseResult()
    slots = len(orders)
    position = [0] * slots
    sent_at = [0.0] * slots
    waiting_key: list[bytes | None] = [None] * slots
    waiting_request: list[DataRequest | None] = [None] * slots
    outstanding: dict[bytes, int] = {}
    sock = _udp_socket(target)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    clock = time.monotonic
    active = slots

    def send(slot: int, now: float) -> bool:
        nonlocal active
        order = orders[slot]
        index = position[slot]
        if index >= len(order):
            if not cycle or not order:
                waiting_key[slot] = None
                active -= 1
                return False
            index = 0
        request = order[index]
        position[slot] = index + 1
        key = request.datagram if whole_datagram_key else request.key
        outstanding[key] = slot
        waiting_key[slot] = key
        waiting_request[slot] = request
        sent_at[slot] = now
        result.sent += 1
        try:
            sock.send(request.datagram)
        except OSError:
            result.send_errors += 1
        return True

    cpu_start = cpu_seconds()
    start = clock()
    end = start + duration if duration is not None else float("inf")
    for slot in range(slots):
        send(slot, start)
    next_check = start + TIMEOUT_CHECK
    stop = False
    now = start
    while not stop and active > 0:
        now = clock()
        if now >= end:
            break
        if now >= next_check:
            next_check = now + TIMEOUT_CHECK
            for slot in range(slots):
                key = waiting_key[slot]
                if key is not None and now - sent_at[slot] > timeout:
                    outstanding.pop(key, None)
                    result.lost += 1
                    if not send(slot, now) and duration is not None:
                        stop, result.ended_by = True, "exhausted"
        if not selector.select(TIMEOUT_CHECK):
            continue
        while True:
            try:
                reply = sock.recv(MAX_READ)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                result.refused += 1
                continue
            try:
                key = reply if whole_datagram_key else envelope_key(reply)
            except (ValueError, IndexError):
                result.stale += 1
                continue
            slot_or_none = outstanding.pop(key, None)
            if slot_or_none is None:
                result.stale += 1
                continue
            slot = slot_or_none
            now = clock()
            result.latencies.append(now - sent_at[slot])
            result.answered += 1
            request = waiting_request[slot]
            if check is not None and request is not None and result.answered % verify_every == 1:
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
    sock.close()
    return result


def run_hello_phase(
    target: tuple[str, int],
    orders: Sequence[Sequence[HelloRequest]],
    *,
    duration: float | None,
    timeout: float,
    verify_every: int,
) -> PhaseResult:
    """
    HELLOs: one connected socket per slot; the reply on a slot's socket
    answers its outstanding HELLO.  ``verify_every`` 1 checks (and handles)
    every reply, which opens the module's session.
    """
    result = PhaseResult()
    slots = len(orders)
    socks = [_udp_socket(target) for _ in range(slots)]
    selector = selectors.DefaultSelector()
    for slot, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, slot)
    position = [0] * slots
    sent_at = [0.0] * slots
    waiting: list[HelloRequest | None] = [None] * slots
    clock = time.monotonic
    active = slots

    def send(slot: int, now: float) -> bool:
        nonlocal active
        order = orders[slot]
        index = position[slot]
        if index >= len(order):
            waiting[slot] = None
            active -= 1
            return False
        request = order[index]
        position[slot] = index + 1
        waiting[slot] = request
        sent_at[slot] = now
        result.sent += 1
        try:
            socks[slot].send(request.outgoing.datagram)
        except OSError:
            result.send_errors += 1
        return True

    cpu_start = cpu_seconds()
    start = clock()
    end = start + duration if duration is not None else float("inf")
    for slot in range(slots):
        send(slot, start)
    next_check = start + TIMEOUT_CHECK
    stop = False
    while not stop and active > 0:
        now = clock()
        if now >= end:
            break
        if now >= next_check:
            next_check = now + TIMEOUT_CHECK
            for slot in range(slots):
                if waiting[slot] is not None and now - sent_at[slot] > timeout:
                    result.lost += 1
                    if not send(slot, now) and duration is not None:
                        stop, result.ended_by = True, "exhausted"
        for key, _ in selector.select(TIMEOUT_CHECK):
            slot = key.data
            try:
                reply = socks[slot].recv(MAX_READ)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:
                result.refused += 1
                continue
            request = waiting[slot]
            if request is None or reply[:3] != b"\x84\x01\x02":
                result.stale += 1
                continue
            now = clock()
            result.latencies.append(now - sent_at[slot])
            result.answered += 1
            if result.answered % verify_every == 0 or verify_every == 1:
                result.verified += 1
                context = request.outgoing.context
                assert isinstance(context, HelloContext)
                outcome = request.endpoint.handle_hello_reply(reply, context)
                if not outcome.accepted:
                    result.verify_failures += 1
            if not send(slot, now) and duration is not None:
                stop, result.ended_by = True, "exhausted"
    finished = clock()
    if duration is None:
        result.ended_by = "all answered or lost"
    result.elapsed = min(finished, end) - start
    result.cpu = cpu_seconds() - cpu_start
    selector.close()
    for sock in socks:
        sock.close()
    return result


# -- the job ---------------------------------------------------------------------------------------


def warm_up(job: Job, endpoints: Sequence[ModuleEndpoint]) -> dict[str, Any]:
    """Open every module's session with a HELLO (re-sent for up to :data:`WARM_ROUNDS` rounds)."""
    started = time.monotonic()
    rounds = []
    for _ in range(WARM_ROUNDS):
        cold = [endpoint for endpoint in endpoints if endpoint.state.session is None]
        if not cold:
            break
        orders = interleave(build_hellos(cold, 1), min(job.window, len(cold)))
        phase = run_hello_phase(
            job.target, orders, duration=None, timeout=max(job.timeout, 2.0), verify_every=1
        )
        rounds.append(phase.summary())
    warm = sum(1 for endpoint in endpoints if endpoint.state.session is not None)
    return {"warm": warm, "seconds": round(time.monotonic() - started, 3), "rounds": rounds}


def prepare(job: Job) -> tuple[Callable[[], PhaseResult], dict[str, Any]]:
    """Everything untimed; returns the timed phase to run and what preparing did."""
    info: dict[str, Any] = {"mode": job.mode}
    started = time.monotonic()
    suite = cipher_suite(job.fleet.suite)
    if job.mode == "echo":
        # DATA of the same shape and size as the gateway's, under made-up keys.
        per_module = []
        for _ in range(job.modules):
            sid, k_up = os.urandom(6), os.urandom(suite.key_len)
            per_module.append(
                build_session_data(suite, sid, k_up, k_up, 1, job.per_module, job.payload_bytes)
            )
        orders = interleave(per_module, min(job.window, job.modules))
        info["built"] = sum(len(items) for items in per_module)

        def run_echo() -> PhaseResult:
            return run_envelope_phase(
                job.target,
                orders,
                duration=job.duration,
                timeout=job.timeout,
                cycle=True,
                whole_datagram_key=True,
            )

        info["prepare_seconds"] = round(time.monotonic() - started, 3)
        return run_echo, info

    endpoints = module_endpoints(job)
    info["keys_seconds"] = round(time.monotonic() - started, 3)
    if job.warm:
        info["warm_up"] = warm_up(job, endpoints)
    if job.mode == "data":
        built = time.monotonic()
        per_data: list[list[DataRequest]] = []
        for endpoint in endpoints:
            session = endpoint.state.session
            if session is None:
                continue
            per_data.append(
                build_session_data(
                    suite,
                    session.sid,
                    session.k_up,
                    session.k_down,
                    session.next_ctr,
                    job.per_module,
                    job.payload_bytes,
                )
            )
        data_orders = interleave(per_data, min(job.window, len(per_data)))
        info["built"] = sum(len(items) for items in per_data)
        info["build_seconds"] = round(time.monotonic() - built, 3)
        info["datagram_bytes"] = len(per_data[0][0].datagram) if per_data else None

        def run_data() -> PhaseResult:
            return run_envelope_phase(
                job.target,
                data_orders,
                duration=job.duration,
                timeout=job.timeout,
                cycle=False,
                whole_datagram_key=False,
                check=lambda request, reply: check_data_reply(suite, request, reply),
                verify_every=job.verify_every,
            )

        return run_data, info
    if job.mode == "hello":
        built = time.monotonic()
        hellos = build_hellos(endpoints, job.per_module)
        hello_orders = interleave(hellos, min(job.window, len(hellos)))
        info["built"] = sum(len(items) for items in hellos)
        info["build_seconds"] = round(time.monotonic() - built, 3)
        info["datagram_bytes"] = len(hellos[0][0].outgoing.datagram) if hellos else None

        def run_hellos() -> PhaseResult:
            return run_hello_phase(
                job.target,
                hello_orders,
                duration=job.duration,
                timeout=job.timeout,
                verify_every=job.verify_every,
            )

        return run_hellos, info
    raise SystemExit(f"unknown mode {job.mode!r}")


def main(argv: list[str] | None = None) -> int:
    """Prepare, wait for ``go``, run, report."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m bench.loadgen JOB.json\n")
        return 2
    with open(args[0], encoding="utf-8") as job_file:
        job = Job.from_json(json.load(job_file))
    run, info = prepare(job)
    emit("prepared", **info)
    line = sys.stdin.readline().strip()
    if line != "go":
        return 1
    result = run()
    emit("result", **result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
