"""Tests for m2mgw.modules.udp: the thin datagram protocol ."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import LogLevel, capturedLogs

from m2mgw.modules.udp import (
    DEFAULT_MAX_REPLY,
    MAX_RECEIVED_DATAGRAM,
    ModuleDatagramProtocol,
)
from tests.doubles import RecordingHandler, fired

ADDR = ("192.0.2.7", 40123)
OTHER = ("198.51.100.9", 5683)


def connected(
    handler: object, **kwargs: int
) -> tuple[ModuleDatagramProtocol, FakeDatagramTransport]:
    protocol = ModuleDatagramProtocol(handler, **kwargs)  # type: ignore[arg-type]
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_reply_goes_to_the_source_address_only() -> None:
    handler = RecordingHandler()
    protocol, transport = connected(handler)
    protocol.datagramReceived(b"one", ADDR)
    protocol.datagramReceived(b"two", OTHER)
    assert handler.received == [(b"one", ADDR), (b"two", OTHER)]
    assert transport.written == [(b"re:one", ADDR), (b"re:two", OTHER)]
    assert protocol.counters.received == 2
    assert protocol.counters.answered == 2


def test_late_reply_still_goes_to_its_own_source() -> None:
    handler = RecordingHandler(hold=True)
    protocol, transport = connected(handler)
    protocol.datagramReceived(b"first", ADDR)
    protocol.datagramReceived(b"second", OTHER)
    handler.pending[1].callback(b"for-other")
    handler.pending[0].callback(b"for-addr")
    assert transport.written == [(b"for-other", OTHER), (b"for-addr", ADDR)]


def test_oversized_datagram_is_dropped_and_counted() -> None:
    handler = RecordingHandler()
    protocol, transport = connected(handler)
    protocol.datagramReceived(b"x" * (MAX_RECEIVED_DATAGRAM + 1), ADDR)
    assert handler.received == []
    assert transport.written == []
    assert protocol.counters.oversized == 1
    protocol.datagramReceived(b"x" * MAX_RECEIVED_DATAGRAM, ADDR)
    assert len(handler.received) == 1
    assert protocol.counters.oversized == 1


def test_silence_sends_nothing() -> None:
    protocol, transport = connected(RecordingHandler(reply=lambda data: None))
    protocol.datagramReceived(b"hello", ADDR)
    assert transport.written == []
    assert protocol.counters.unanswered == 1
    assert protocol.counters.answered == 0


class RaisingHandler:
    def __init__(self) -> None:
        self.calls = 0

    def handle(self, data: bytes, addr: tuple[str, int]) -> Deferred[bytes | None]:
        self.calls += 1
        if data == b"boom":
            raise ValueError("handler bug")
        if data == b"fail":
            return fail(RuntimeError("async handler bug"))
        return succeed(b"ok")


def test_handler_exceptions_are_contained_logged_and_counted() -> None:
    handler = RaisingHandler()
    protocol, transport = connected(handler)
    with capturedLogs() as events:
        protocol.datagramReceived(b"boom", ADDR)
        protocol.datagramReceived(b"fail", ADDR)
        protocol.datagramReceived(b"fine", ADDR)
    assert handler.calls == 3
    assert transport.written == [(b"ok", ADDR)]
    assert protocol.counters.handler_errors == 2
    failures = [e for e in events if "log_failure" in e]
    assert [e["log_failure"].type for e in failures] == [ValueError, RuntimeError]
    assert all(e["log_level"] is LogLevel.critical for e in failures)
    assert all(e["host"] == ADDR[0] for e in failures)


def test_reply_over_the_configured_maximum_is_not_sent() -> None:
    protocol, transport = connected(RecordingHandler(reply=lambda data: b"y" * 101), max_reply=100)
    with capturedLogs() as events:
        protocol.datagramReceived(b"q", ADDR)
    assert transport.written == []
    assert protocol.counters.oversized_replies == 1
    assert any(e.get("size") == 101 for e in events)


def test_default_reply_limit_is_the_spec_default() -> None:
    protocol, transport = connected(RecordingHandler(reply=lambda data: b"z" * DEFAULT_MAX_REPLY))
    protocol.datagramReceived(b"q", ADDR)
    assert len(transport.written) == 1
    assert DEFAULT_MAX_REPLY == 1232


class BrokenTransport(FakeDatagramTransport):
    def write(self, packet: bytes, addr: object = None) -> None:
        raise OSError(90, "Message too long")


def test_send_error_is_contained() -> None:
    protocol = ModuleDatagramProtocol(RecordingHandler())
    protocol.makeConnection(BrokenTransport())
    with capturedLogs():
        protocol.datagramReceived(b"a", ADDR)
        protocol.datagramReceived(b"b", ADDR)
    assert protocol.counters.send_errors == 2
    assert protocol.counters.answered == 0


def test_reply_after_the_listener_stopped_is_dropped() -> None:
    handler = RecordingHandler(hold=True)
    protocol, transport = connected(handler)
    protocol.datagramReceived(b"a", ADDR)
    protocol.doStop()
    with capturedLogs():
        handler.pending[0].callback(b"late")
    assert transport.written == []
    assert protocol.counters.send_errors == 1


def test_stop_accepting_and_drain() -> None:
    handler = RecordingHandler(hold=True)
    protocol, transport = connected(handler)
    protocol.datagramReceived(b"a", ADDR)
    protocol.datagramReceived(b"b", OTHER)
    protocol.stop_accepting()
    protocol.datagramReceived(b"c", ADDR)
    assert len(handler.received) == 2
    assert protocol.counters.refused == 1

    drained = protocol.drain()
    assert not fired(drained)
    handler.pending[0].callback(b"ra")
    assert not fired(drained)
    handler.pending[1].errback(RuntimeError("x"))
    assert fired(drained)
    # The reply in flight still went out; the failure was contained.
    assert transport.written == [(b"ra", ADDR)]
    assert protocol.counters.handler_errors == 1


def test_drain_with_nothing_in_flight_fires_at_once() -> None:
    protocol, _ = connected(RecordingHandler())
    protocol.datagramReceived(b"a", ADDR)
    assert fired(protocol.drain())
