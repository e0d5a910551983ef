"""
The module transports (:mod:`m2mgw.client.transport`): the blocking one
against a UDP server on 127.0.0.1 that drops what a test says, and the
Twisted one on a ``task.Clock`` with an in-memory UDP transport.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock as ReactorClock

from m2mgw.client.module import ModuleEndpoint
from m2mgw.client.transport import (
    BlockingTransport,
    DataOperation,
    Exchange,
    HelloOperation,
    RetryPolicy,
    TwistedTransport,
    parse_address,
    run_blocking,
    run_twisted,
    wake_plan,
)
from m2mgw.protocol.bodies import InstructionItem, Payload
from m2mgw.protocol.messages import Data, Hello, parse_request
from tests.client_helpers import result_of, warm_endpoint

FAST = RetryPolicy(timeout=0.04, backoff=2.0)


class DroppingServer:
    """
    A UDP server on 127.0.0.1 that records every datagram with its arrival
    time, drops the first ``drop`` ones and answers the others with ``answer``.
    """

    def __init__(self, answer: Callable[[bytes], bytes | None], drop: int = 0) -> None:
        self.answer = answer
        self.drop = drop
        self.received: list[tuple[float, bytes]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), data))
            if len(self.received) <= self.drop:
                continue
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    @property
    def datagrams(self) -> list[bytes]:
        return [data for _, data in self.received]


@pytest.fixture
def servers() -> Iterator[list[DroppingServer]]:
    started: list[DroppingServer] = []
    yield started
    for server in started:
        server.close()


def start(
    servers: list[DroppingServer], answer: Callable[[bytes], bytes | None], drop: int = 0
) -> DroppingServer:
    server = DroppingServer(answer, drop)
    servers.append(server)
    return server


# -- addresses and policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("gw.example:6000", ("gw.example", 6000)),
        ("gw.example", ("gw.example", 5740)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", 5740)),
        ("::1", ("::1", 5740)),
    ],
)
def test_addresses_parse(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", ":80", "host:0", "host:99999", "host:http", "[::1", "[::1]x"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_the_policy_doubles_its_waits_up_to_a_cap() -> None:
    policy = RetryPolicy(timeout=2.0, backoff=2.0, max_timeout=10.0)
    assert [policy.wait(i) for i in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    with pytest.raises(ValueError):
        RetryPolicy(fec_copies=4)
    with pytest.raises(ValueError):
        RetryPolicy(timeout=0)


# -- the blocking transport ---------------------------------------------------------------------


def test_blocking_retransmits_identical_bytes_then_under_a_new_ctr(
    servers: list[DroppingServer],
) -> None:
    endpoint, gateway, _ = warm_endpoint()
    server = start(servers, gateway.answer, drop=2)
    with BlockingTransport([server.address], policy=FAST) as transport:
        outcome = transport.run(Exchange(endpoint, DataOperation(Payload(data=[{0: "t", 2: 1}]))))
    assert outcome.ok and outcome.sent == 3 and len(outcome.replies) == 1
    (t0, first), (t1, second), (t2, third) = server.received
    assert first == second and third != first
    ctrs = [parse_request(d).ctr for d in (first, third)]  # type: ignore[union-attr]
    assert ctrs == [1, 2]
    assert gateway.open_data(first)[1].encode() == gateway.open_data(third)[1].encode()
    # 40 ms, then twice that: the backoff (a little slack for the scheduler).
    assert t1 - t0 >= 0.035 and t2 - t1 >= 0.075
    assert outcome.elapsed >= 0.11
    assert endpoint.state.outbox is None


def test_blocking_falls_back_to_a_new_hello(servers: list[DroppingServer]) -> None:
    endpoint, gateway, _ = warm_endpoint()
    server = start(servers, gateway.answer, drop=3)
    with BlockingTransport([server.address], policy=FAST) as transport:
        outcome = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
    assert outcome.ok and outcome.hellos == 1
    kinds = [type(parse_request(d)) for d in server.datagrams]
    assert kinds == [Data, Data, Data, Hello, Data]
    toks = {gateway.open_data(d)[1].tok for d in server.datagrams if d[2] == 3}
    assert len(toks) == 1


def test_blocking_gives_up_after_the_budget_and_keeps_the_body(
    servers: list[DroppingServer],
) -> None:
    endpoint, gateway, _ = warm_endpoint()
    server = start(servers, gateway.answer, drop=1000)
    policy = RetryPolicy(timeout=0.02)
    with BlockingTransport([server.address], policy=policy) as transport:
        result = run_blocking(transport, wake_plan(endpoint, data=1))
    assert not result.ok and result.failure == "no answer"
    time.sleep(0.05)
    assert len(server.datagrams) == 7 == result.sent
    assert endpoint.state.outbox is not None


def test_blocking_sends_fec_copies(servers: list[DroppingServer]) -> None:
    endpoint, gateway, _ = warm_endpoint()
    server = start(servers, gateway.answer)
    policy = RetryPolicy(timeout=0.5, fec_copies=3)
    with BlockingTransport([server.address], policy=policy) as transport:
        outcome = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
        assert outcome.ok and outcome.sent == 3
        time.sleep(0.05)
        assert len(set(server.datagrams)) == 1 and len(server.datagrams) == 3
        # The extra replies are dropped by the next exchange, which still works.
        outcome = transport.run(Exchange(endpoint, DataOperation(Payload(data=2))))
    assert outcome.ok and outcome.dropped == 2


def test_blocking_tries_the_next_gateway_node_for_a_new_datagram(
    servers: list[DroppingServer],
) -> None:
    endpoint, gateway, _ = warm_endpoint()
    silent = start(servers, gateway.answer, drop=1000)
    alive = start(servers, gateway.answer)
    with BlockingTransport([silent.address, alive.address], policy=FAST) as transport:
        outcome = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
    assert outcome.ok
    assert len(silent.datagrams) == 2 and len(alive.datagrams) == 1
    assert parse_request(alive.datagrams[0]).ctr == 2  # type: ignore[union-attr]


def test_blocking_runs_a_whole_wake_with_instructions(servers: list[DroppingServer]) -> None:
    calls: list[str] = []

    def execute(kind: str, body: Any) -> tuple[int, Any]:
        calls.append(kind)
        return 0, None

    endpoint, gateway, _ = warm_endpoint(execute=execute)
    first = [True]

    def answer(data: bytes) -> bytes:
        if first[0]:
            first[0] = False
            return gateway.data_reply(data, ins=(InstructionItem(1, "set", 1),), more=True)
        return gateway.answer(data)

    server = start(servers, answer)
    with BlockingTransport([server.address], policy=FAST) as transport:
        result = run_blocking(transport, wake_plan(endpoint, data=5, confirm_now=True))
    assert result.ok and calls == ["set"]
    # more: another round; it carried the confirmation.
    assert len(result.exchanges) == 2
    _, body = gateway.open_data(server.datagrams[1])
    assert body.pl is not None and [c.iid for c in body.pl.conf] == [1]
    assert endpoint.state.pending_confs == []


def test_an_unresolvable_gateway_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot resolve"):
        BlockingTransport([("no-such-host.invalid", 5740)])


# -- the Twisted transport ------------------------------------------------------------------------


class MemoryUDP:
    """An in-memory UDP transport; ``respond`` may answer a written datagram."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []
        self.respond: Callable[[bytes], bytes | None] | None = None
        self.protocol: TwistedTransport | None = None

    def write(self, packet: bytes, addr: Any = None) -> None:
        self.written.append((packet, addr))
        if self.respond is not None and self.protocol is not None:
            reply = self.respond(packet)
            if reply is not None:
                self.protocol.datagramReceived(reply, addr)


def twisted_transport(
    policy: RetryPolicy | None = None,
) -> tuple[TwistedTransport, MemoryUDP, ReactorClock]:
    clock = ReactorClock()
    transport = TwistedTransport(clock, [("192.0.2.1", 5740)], policy=policy or RetryPolicy())
    memory = MemoryUDP()
    memory.protocol = transport
    transport.makeConnection(memory)  # type: ignore[arg-type]
    return transport, memory, clock


def test_twisted_retransmits_on_the_clock() -> None:
    endpoint, gateway, _ = warm_endpoint()
    transport, memory, clock = twisted_transport()
    done = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
    assert len(memory.written) == 1 and memory.written[0][1] == ("192.0.2.1", 5740)
    clock.advance(1.9)
    assert len(memory.written) == 1
    clock.advance(0.1)
    assert len(memory.written) == 2 and memory.written[1][0] == memory.written[0][0]
    clock.advance(4)
    third = memory.written[2][0]
    assert third != memory.written[0][0] and parse_request(third).ctr == 2  # type: ignore[union-attr]
    transport.datagramReceived(b"junk", ("192.0.2.1", 5740))
    assert not done.called
    clock.advance(1)
    transport.datagramReceived(gateway.data_reply(memory.written[0][0]), ("192.0.2.1", 5740))
    outcome = result_of(done)
    assert outcome.ok and outcome.sent == 3 and outcome.dropped == 1
    assert outcome.elapsed == 7.0
    assert clock.getDelayedCalls() == []


def test_twisted_runs_a_wake_plan() -> None:
    endpoint, gateway, _ = warm_endpoint()
    endpoint.state.session = None
    transport, memory, _ = twisted_transport()
    memory.respond = gateway.answer
    result = result_of(run_twisted(transport, wake_plan(endpoint, data=[{0: "t", 2: 1}])))
    assert result.ok and result.sent == 2 and result.answered == 2
    assert [type(parse_request(p)) for p, _ in memory.written] == [Hello, Data]


def test_twisted_reports_no_answer_after_the_budget() -> None:
    endpoint, _, _ = warm_endpoint()
    transport, _, clock = twisted_transport(RetryPolicy(timeout=1, hello_attempts=1))
    done = transport.run(Exchange(endpoint, HelloOperation()))
    clock.advance(1)
    clock.advance(2)
    outcome = result_of(done)
    assert (outcome.ok, outcome.failure, outcome.sent) == (False, "no answer", 2)


def test_twisted_runs_one_exchange_at_a_time_and_can_be_cancelled() -> None:
    endpoint, _, _ = warm_endpoint()
    transport, _, clock = twisted_transport()
    done = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
    with pytest.raises(RuntimeError, match="one exchange at a time"):
        transport.run(Exchange(endpoint, HelloOperation()))
    done.cancel()
    with pytest.raises(CancelledError):
        result_of(done)
    assert clock.getDelayedCalls() == []


def test_a_stopped_twisted_transport_ends_the_exchange() -> None:
    endpoint, _, _ = warm_endpoint()
    transport, _, clock = twisted_transport()
    done = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
    transport.doStop()
    outcome = result_of(done)
    assert not outcome.ok and outcome.failure == "transport stopped"
    assert clock.getDelayedCalls() == []


def test_twisted_needs_a_listening_transport() -> None:
    endpoint, _, _ = warm_endpoint()
    transport = TwistedTransport(ReactorClock(), [("192.0.2.1", 5740)])
    with pytest.raises(RuntimeError, match="not listening"):
        transport.run(Exchange(endpoint, HelloOperation()))


def test_exchange_errors_from_the_endpoint_end_it() -> None:
    endpoint: ModuleEndpoint
    endpoint, _, _ = warm_endpoint()
    transport, _, _ = twisted_transport()
    outcome = result_of(transport.run(Exchange(endpoint, DataOperation(resend=True))))
    assert outcome.failure == "error: no DATA is waiting for an answer"
