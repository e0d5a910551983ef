"""
Smoke tests of ``bench/``: the pure parts run, quickly, with no timing assertion.

The benchmarks themselves run with ``python -m bench.run``; these tests make
sure the pieces they are made of still work with the code they measure: the
wire sizes are built and accepted on both sides, the fleet the gateway
provisions is the fleet the load generator signs for, and the load
generator's loops match replies to requests over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench import common, crypto_limit, loadgen, run, wire
from bench.common import Fleet
from m2mgw.client.module import HelloContext
from m2mgw.config import ProtocolPolicy
from m2mgw.datadir import LoadedServerKey
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol.engine import ModuleController
from m2mgw.protocol.messages import Data, DataReply
from m2mgw.registry import all_plugins
from m2mgw.store.memory import MemoryStore

SEED = "0011223344556677"


def fired(deferred: Any) -> Any:
    """The result of a Deferred that has already fired (memory store: synchronous)."""
    box: list[Any] = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


# -- bytes on the wire -------------------------------------------------------------------------


def test_wire_sizes_are_built_and_accepted_by_both_sides() -> None:
    rows = {(row.name, row.variant): row for row in wire.measure()}
    # The smallest warm wake is fixed by MGP/1: [1, 3, sid(6), ctr 1, ct] around
    # {4: tok(4), 5: {10: bstr(16)}}; the ack is {1: tok(4)}.
    assert (
        rows["warm p256-ccm8", "4-byte tok, no ts, ctr 1"].up,
        rows["warm p256-ccm8", "4-byte tok, no ts, ctr 1"].down,
    ) == (48, 27)
    lean_gcm = rows["warm p256", "4-byte tok, no ts, ctr 1"]
    assert (lean_gcm.up, lean_gcm.down) == (56, 35)
    for name in ("warm p256-ccm8", "warm p256"):
        assert rows[name, "as the client builds it"].up > rows[name, "4-byte tok, no ts, ctr 1"].up
    for name in ("cold SDH p256-ccm8", "cold SIG p256"):
        default = rows[name, "as the client builds it (default)"]
        client = rows[name, "as the client builds it, compress_points=True"]
        lean = rows[name, "leanest MGP/1 allows"]
        assert client.target == wire.TARGETS[name]
        assert default.target is None and lean.target is None
        # Compressing the epk saves 32 bytes, the shorter tok 8.
        assert default.up - client.up == 32
        assert client.up - lean.up == 8
    compact = "as the client builds it, compress_points=True"
    assert rows["cold SIG p256", compact].down > rows["cold SDH p256-ccm8", compact].down
    assert rows["cold SDH p256-ccm8", compact].met == (True, True)
    lines = wire.report_lines(list(rows.values()))
    assert any("CoAP + OSCORE" in line for line in lines)
    assert json.dumps(wire.rows_as_json(list(rows.values())))


def test_compress_point() -> None:
    x, y = bytes(range(32)), bytes(31) + b"\x03"
    assert wire.compress_point(b"\x04" + x + y) == b"\x03" + x
    assert wire.compress_point(b"\x04" + x + bytes(32)) == b"\x02" + x
    with pytest.raises(ValueError):
        wire.compress_point(b"\x02" + x)


# -- crypto limit --------------------------------------------------------------------------------


def test_crypto_limit_operations_run() -> None:
    crypto = crypto_limit.HelloCrypto()
    material = crypto.materials[0]
    crypto.sig_hello(material)
    crypto.sdh_hello(material)
    for operation in crypto.operations().values():
        operation(material)
    assert crypto_limit.rate(crypto.sdh_hello, crypto.materials[:2], 0.0, 1) > 0


# -- fleet, envelope keys, send orders -----------------------------------------------------------


def test_fleet_is_deterministic_and_json_round_trips() -> None:
    fleet = Fleet(count=5, keyed=2, suite="p256", seed=SEED)
    suite = fleet.cipher_suite()
    assert Fleet.from_json(json.loads(json.dumps(fleet.to_json()))) == fleet
    first = suite.signing_public(fleet.private_key(1))
    assert first == suite.signing_public(fleet.private_key(1))
    assert first != suite.signing_public(fleet.private_key(0))
    assert fleet.psk(3) == fleet.psk(3) != fleet.psk(4)
    assert len(fleet.psk(3)) == common.PSK_BYTES
    (modules, keys, apps), *rest = list(fleet.records(now=1, chunk=10))
    assert not rest
    assert [m.module_id for m in modules] == [f"m{i:06d}" for i in range(5)]
    assert [k.module_id for k in keys] == ["m000000", "m000001"]
    assert modules[0].psk is None and modules[4].psk == fleet.psk(4)
    assert apps == {m.module_id: ["bench-app"] for m in modules}
    with pytest.raises(ValueError):
        Fleet(count=1, keyed=2, suite="p256", seed=SEED)


@pytest.mark.parametrize("ctr", [1, 23, 24, 255, 256, 65535, 65536, 2**32, 2**63 - 1])
def test_envelope_key_is_shared_by_a_data_and_its_reply(ctr: int) -> None:
    sid = b"\x01\x02\x03\x04\x05\x06"
    request = Data(sid, ctr, b"\xaa" * 20).encode()
    reply = DataReply(sid, ctr, b"\xbb" * 9).encode()
    assert loadgen.envelope_key(request) == loadgen.envelope_key(reply)
    assert loadgen.envelope_key(request) != loadgen.envelope_key(
        Data(sid, ctr + 1, b"\xaa" * 20).encode()
    )


def test_interleave_keeps_each_modules_order() -> None:
    per_module = [[(m, i) for i in range(3)] for m in range(5)]
    orders = loadgen.interleave(per_module, 2)
    assert orders[0] == [(0, 0), (2, 0), (4, 0), (0, 1), (2, 1), (4, 1), (0, 2), (2, 2), (4, 2)]
    assert sorted(item for order in orders for item in order) == sorted(
        item for items in per_module for item in items
    )


def test_settings_and_verdicts() -> None:
    quick, full = run.Settings.make(True, None, 64), run.Settings.make(False, None, 64)
    assert quick.duration < full.duration and quick.memory_sessions < full.memory_sessions
    assert run.Settings.make(False, 3.0, 8).duration == 3.0
    assert run.verdict(0.5, 0.5) == "met" and run.verdict(0.49, 0.5) == "MISSED"
    assert run.verdict(None, 0.5) == "n/a"
    assert run.per_module(1000, 10, 100) >= 130
    assert common.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert common.percentile([], 0.5) is None


# -- a tiny exchange, in-process and over 127.0.0.1 ------------------------------------------------


def _gateway(fleet: Fleet, policy: ProtocolPolicy) -> tuple[ModuleController, list[dict[str, Any]]]:
    """A module controller on a memory store holding ``fleet``, as bench.gateway provisions it."""
    suite = fleet.cipher_suite()
    key = suite.generate_server_key()
    public, _ = suite.server_public(key)
    store = MemoryStore()
    for modules, keys, apps in fleet.records(now=1):
        fired(store.add_modules(modules, keys, apps))
    controller = ModuleController(
        store,
        all_plugins(ICipherSuite),
        [LoadedServerKey(7, fleet.suite, key, public, None)],
        policy,
        now=lambda: 1_800_000_000.0,
    )
    return controller, [{"skid": 7, "suite": fleet.suite, "public": public.hex()}]


def _job(fleet: Fleet, server_keys: list[dict[str, Any]], **changes: Any) -> loadgen.Job:
    value: dict[str, Any] = {
        "mode": "hello",
        "target": ["127.0.0.1", 1],
        "fleet": fleet.to_json(),
        "modules": fleet.keyed,
        "server_keys": server_keys,
    }
    value.update(changes)
    return loadgen.Job.from_json(json.loads(json.dumps(value)))


@pytest.mark.parametrize("method", ["sig", "sdh"])
def test_load_generator_datagrams_are_accepted_by_the_engine(method: str) -> None:
    fleet = Fleet(count=4, keyed=2, suite="p256", seed=SEED)
    signed = method == "sig"
    controller, server_keys = _gateway(fleet, ProtocolPolicy(sign_replies=signed))
    job = _job(fleet, server_keys, method=method, sign_replies=signed)
    endpoints = loadgen.module_endpoints(job)
    for requests in loadgen.build_hellos(endpoints, 2):
        for request in requests:
            reply = fired(controller.handle(request.outgoing.datagram, ("127.0.0.1", 9)))
            assert reply is not None
            context = request.outgoing.context
            assert isinstance(context, HelloContext)
            assert request.endpoint.handle_hello_reply(reply, context).accepted
    suite = fleet.cipher_suite()
    for endpoint in endpoints:
        session = endpoint.state.session
        assert session is not None
        data_requests = loadgen.build_session_data(
            suite, session.sid, session.k_up, session.k_down, session.next_ctr, 3, 16
        )
        for data in data_requests:
            reply = fired(controller.handle(data.datagram, ("127.0.0.1", 9)))
            assert loadgen.envelope_key(reply) == data.key
            assert loadgen.check_data_reply(suite, data, reply)
        assert not loadgen.check_data_reply(suite, data_requests[0], reply)
    assert controller.answered["hello"] == 4 and controller.answered["data"] == 6


class _UDPServer:
    """A UDP server thread answering each datagram with ``answer(datagram)`` (or nothing)."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.answer = answer
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def _serve(self) -> None:
        while self.running:
            try:
                datagram, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            reply = self.answer(datagram)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def udp_server() -> Iterator[Callable[[Callable[[bytes], bytes | None]], _UDPServer]]:
    servers: list[_UDPServer] = []

    def start(answer: Callable[[bytes], bytes | None]) -> _UDPServer:
        server = _UDPServer(answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_envelope_phase_matches_echoed_datagrams(
    udp_server: Callable[[Callable[[bytes], bytes | None]], _UDPServer],
) -> None:
    suite = common.cipher_suite("p256")
    per_module = [
        loadgen.build_session_data(suite, bytes([m]) * 6, bytes(16), bytes(16), 1, 4, 16)
        for m in range(3)
    ]
    # Every third datagram goes unanswered: it must be counted lost, not matched.
    dropped = {items[1].datagram for items in per_module}
    server = udp_server(lambda datagram: None if datagram in dropped else datagram)
    result = loadgen.run_envelope_phase(
        server.address,
        loadgen.interleave(per_module, 2),
        duration=None,
        timeout=0.2,
        cycle=False,
        whole_datagram_key=True,
    )
    assert (result.sent, result.answered, result.lost, result.stale) == (12, 9, 3, 0)
    assert result.summary()["ended_by"] == "all answered or lost"


def test_hello_phase_against_the_engine_over_udp(
    udp_server: Callable[[Callable[[bytes], bytes | None]], _UDPServer],
) -> None:
    fleet = Fleet(count=3, keyed=3, suite="p256", seed=SEED)
    controller, server_keys = _gateway(fleet, ProtocolPolicy())
    server = udp_server(lambda datagram: fired(controller.handle(datagram, ("127.0.0.1", 9))))
    job = _job(fleet, server_keys, target=list(server.address), window=2, timeout=2.0)
    endpoints = loadgen.module_endpoints(job)
    warm = loadgen.warm_up(job, endpoints)
    assert warm["warm"] == 3
    orders = loadgen.interleave(loadgen.build_hellos(endpoints, 2), 2)
    result = loadgen.run_hello_phase(
        server.address, orders, duration=None, timeout=2.0, verify_every=1
    )
    assert (result.sent, result.answered, result.verified, result.verify_failures) == (6, 6, 6, 0)
    assert controller.answered["hello"] == 9


def test_data_floor_parts_run_on_real_datagrams() -> None:
    floor = crypto_limit.DataFloor()
    material = floor.materials[0]
    floor.aead(material)
    floor.cbor(material)
    parts = crypto_limit.data_floor(seconds=0.01, rounds=1)
    assert set(parts) == {"aead", "cbor"} and all(value > 0 for value in parts.values())
