"""
The module client with several gateway addresses (nodes sharing one
database): a node that stops answering is left for the next one, under a
new ``ctr`` with the same DataBody, and later exchanges start at the node
that answered last instead of paying the dead node's timeouts again.
"""

from __future__ import annotations

from twisted.internet.task import Clock as ReactorClock

from m2mgw.client.transport import (
    BlockingTransport,
    DataOperation,
    Exchange,
    RetryPolicy,
    TwistedTransport,
    run_blocking,
    wake_plan,
)
from m2mgw.protocol.bodies import Payload
from m2mgw.protocol.messages import Data, parse_request
from tests.client_helpers import result_of, warm_endpoint
from tests.test_client_transport import FAST, DroppingServer, MemoryUDP, servers, start

__all__ = ["servers"]  # the fixture, imported for the tests below


def ctr_of(datagram: bytes) -> int:
    message = parse_request(datagram)
    assert isinstance(message, Data)
    return message.ctr


def test_blocking_stays_with_the_node_that_answered(servers: list[DroppingServer]) -> None:
    endpoint, gateway, _ = warm_endpoint()
    dead = start(servers, gateway.answer, drop=1000)
    alive = start(servers, gateway.answer)
    with BlockingTransport([dead.address, alive.address], policy=FAST) as transport:
        first = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
        assert first.ok and first.address == 1 and transport.address == 1
        # The dead node got the DATA and its byte-identical retransmission;
        # the live one the same DataBody under the next counter.
        assert [ctr_of(d) for d in dead.datagrams] == [1, 1]
        assert [ctr_of(d) for d in alive.datagrams] == [2]
        for value in (2, 3):
            outcome = transport.run(Exchange(endpoint, DataOperation(Payload(data=value))))
            assert outcome.ok and outcome.sent == 1 and outcome.address == 1
    assert len(dead.datagrams) == 2  # nothing more went to the dead node
    assert [ctr_of(d) for d in alive.datagrams] == [2, 3, 4]
    assert [gateway.open_data(d)[1].pl.data for d in alive.datagrams] == [1, 2, 3]  # type: ignore[union-attr]


def test_blocking_moves_on_when_the_preferred_node_dies(servers: list[DroppingServer]) -> None:
    endpoint, gateway, _ = warm_endpoint()
    first = start(servers, gateway.answer)
    second = start(servers, gateway.answer)
    with BlockingTransport([first.address, second.address], policy=FAST) as transport:
        assert run_blocking(transport, wake_plan(endpoint, data=1)).ok
        assert transport.address == 0 and len(first.datagrams) == 1
        first.drop = 1000  # the first node dies
        result = run_blocking(transport, wake_plan(endpoint, data=2))
        assert result.ok and transport.address == 1
        assert run_blocking(transport, wake_plan(endpoint, data=3)).ok
    assert len(first.datagrams) == 3 and len(second.datagrams) == 2
    assert endpoint.state.outbox is None


def test_twisted_starts_each_exchange_at_the_node_that_answered_last() -> None:
    endpoint, gateway, _ = warm_endpoint()
    clock = ReactorClock()
    nodes = [("192.0.2.1", 5740), ("192.0.2.2", 5740), ("192.0.2.3", 5740)]
    transport = TwistedTransport(clock, nodes, policy=RetryPolicy(timeout=1.0))
    memory = MemoryUDP()
    memory.protocol = transport
    transport.makeConnection(memory)  # type: ignore[arg-type]
    memory.respond = lambda data: None

    done = transport.run(Exchange(endpoint, DataOperation(Payload(data=1))))
    clock.advance(1)  # same bytes to node 0
    clock.advance(2)  # a new ctr to node 1
    assert [addr for _, addr in memory.written] == [nodes[0], nodes[0], nodes[1]]
    assert [ctr_of(d) for d, _ in memory.written] == [1, 1, 2]
    transport.datagramReceived(gateway.data_reply(memory.written[2][0]), nodes[1])
    outcome = result_of(done)
    assert outcome.ok and outcome.address == 1 and transport.address == 1

    memory.respond = gateway.answer
    outcome = result_of(transport.run(Exchange(endpoint, DataOperation(Payload(data=2)))))
    assert outcome.ok and outcome.sent == 1
    assert memory.written[-1][1] == nodes[1]
    assert clock.getDelayedCalls() == []
