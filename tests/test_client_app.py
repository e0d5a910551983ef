"""
Tests for m2mgw.client.app: the pure message helpers, the Twisted
:class:`AppClient` against a scripted gateway in memory (``iosim``, once over
real in-memory mutual TLS), and :class:`BlockingAppClient` against the same
gateway on socket pairs and on a TLS socket.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import error as twisted_error
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from m2mgw import tls
from m2mgw.client.app import (
    AppClient,
    AppConnectionError,
    AppCredentials,
    AppError,
    AppEvent,
    AppProtocolError,
    AppResponse,
    BlockingAppClient,
    EventCursor,
    describe_failure,
    encode_request,
    keepalive_timing,
    parse_message,
)
from m2mgw.client.transport import wake_plan
from m2mgw.errors import ConfigError
from m2mgw.records import Module
from tests.app_client_helpers import (
    PSK,
    MemoryEndpoint,
    Refusal,
    SocketGateway,
    World,
    real_gateway,
    real_module,
    server_ssl_context,
    wake,
)
from tests.doubles import InProcessPKI, fired

# -- pure helpers ----------------------------------------------------------------------------------


def test_encode_request_is_one_compact_line() -> None:
    line = encode_request(7, "submit", {"module": "m", "body": {"a": [1, "é"]}})
    assert line == '{"id":7,"op":"submit","module":"m","body":{"a":[1,"é"]}}'.encode()
    assert b"\n" not in encode_request(1, "submit", {"body": "two\nlines"})


@pytest.mark.parametrize(
    "params", [{"x": float("nan")}, {"x": object()}, {"id": 3}, {"op": "ack"}, {"x": b"raw"}]
)
def test_encode_request_refuses_what_is_not_json(params: dict[str, Any]) -> None:
    with pytest.raises(AppError) as caught:
        encode_request(1, "submit", params)
    assert caught.value.code == "bad-request"


def test_parse_responses() -> None:
    ok = parse_message(b'{"id":3,"ok":true,"result":{"iid":42},"extra":1}')
    assert ok == AppResponse(3, True, result={"iid": 42})
    refused = parse_message(b'{"id":"a","ok":false,"error":{"code":"forbidden","message":"no\\n"}}')
    assert isinstance(refused, AppResponse) and not refused.ok and refused.id == "a"
    assert refused.error is not None
    assert (refused.error.code, refused.error.message) == ("forbidden", "no")
    anonymous = parse_message(b'{"id":null,"ok":false,"error":{}}')
    assert isinstance(anonymous, AppResponse) and anonymous.id is None
    assert anonymous.error is not None and anonymous.error.code == "unknown-error"


def test_parse_events() -> None:
    event = parse_message(
        b'{"event":"report","seq":18,"module":"m","at":5,"payload":{"data":[1]},"new":true}'
    )
    assert isinstance(event, AppEvent)
    assert (event.kind, event.seq, event.module, event.at) == ("report", 18, "m", 5)
    assert event.payload == {"data": [1]}
    assert event.message["new"] is True
    ping = parse_message(b'{"event":"ping","at":7}')
    assert isinstance(ping, AppEvent) and ping.seq is None and ping.payload == {}


@pytest.mark.parametrize(
    "line",
    [
        b"{nope",
        b"\xff",
        b"[1,2]",
        b'{"id":1}',
        b'{"hello":1}',
        b'{"event":"report","seq":0}',
        b'{"id":1.5,"ok":true}',
        b'{"id":1,"ok":true,"result":NaN}',
    ],
)
def test_parse_refuses_what_is_not_the_protocol(line: bytes) -> None:
    with pytest.raises(AppProtocolError):
        parse_message(line)


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        ({"ping_interval": 60, "idle_timeout": 300}, (60.0, 130.0)),
        ({"ping_interval": 60, "idle_timeout": 100}, (50.0, 130.0)),
        ({"idle_timeout": 300}, (150.0, None)),
        ({"ping_interval": 0, "idle_timeout": 0}, (None, None)),
        ({"ping_interval": True, "idle_timeout": "300"}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_keepalive_timing(hello: dict[str, Any], expected: tuple[Any, Any]) -> None:
    assert keepalive_timing(hello) == expected


def test_event_cursor() -> None:
    cursor = EventCursor()
    assert cursor.accept(1) and cursor.accept(2) and not cursor.accept(2) and not cursor.accept(1)
    cursor.mark_processed(1)
    assert cursor.unacked == 1
    cursor.rewind()
    assert cursor.received == 1 and cursor.accept(2)
    cursor.mark_acked(1)
    assert cursor.unacked == 0
    assert cursor.resume(acked_seq=1, last_seq=10)
    assert (cursor.received, cursor.processed, cursor.acked) == (2, 1, 1)
    # A gateway whose outbox restarted knows fewer events than we saw.
    assert not cursor.resume(acked_seq=0, last_seq=1)
    assert (cursor.received, cursor.processed, cursor.acked) == (0, 0, 0)


def test_describe_failure() -> None:
    gw = "gw.example:5741"
    assert "connection refused by gw.example:5741" in describe_failure(
        ConnectionRefusedError(111, "refused"), gw
    )
    assert "connection refused" in describe_failure(twisted_error.ConnectionRefusedError(), gw)
    assert "cannot resolve" in describe_failure(socket.gaierror(-2, "Name unknown"), gw)
    assert "closed the connection" in describe_failure(twisted_error.ConnectionDone(), gw)
    assert "in time" in describe_failure(TimeoutError(), gw)
    alert = SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")])
    assert describe_failure(alert, gw) == (
        "TLS with gw.example:5741 failed: the gateway requires a client certificate "
        "(tlsv13 alert certificate required)"
    )
    unknown_ca = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
    assert "not issued by its application CA" in describe_failure(unknown_ca, gw)
    expired = SSL.Error([("SSL routines", "", "sslv3 alert certificate expired")])
    assert "client certificate: it has expired" in describe_failure(expired, gw)
    verify = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert "gateway's certificate is not signed by the trusted CA" in describe_failure(verify, gw)
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert "does not speak TLS" in describe_failure(plain, gw)
    assert describe_failure(AppError("forbidden", "no"), gw) == "forbidden: no"


def test_credentials_from_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        AppCredentials.from_directory(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no client certificate"):
        AppCredentials.from_directory(str(tmp_path))
    for name in ("billing", "ops"):
        (tmp_path / f"{name}.pem").write_text("x")
        (tmp_path / f"{name}-key.pem").write_text("x")
    (tmp_path / "m2mgw-ca.pem").write_text("x")
    with pytest.raises(ConfigError, match="billing, ops"):
        AppCredentials.from_directory(str(tmp_path))
    chosen = AppCredentials.from_directory(str(tmp_path), "ops")
    assert chosen == AppCredentials(
        str(tmp_path / "ops.pem"), str(tmp_path / "ops-key.pem"), str(tmp_path / "m2mgw-ca.pem")
    )
    (tmp_path / "ops.pem").unlink()
    assert AppCredentials.from_directory(str(tmp_path)).cert_path == str(tmp_path / "billing.pem")


def test_credentials_name_the_missing_file(tmp_path: Path) -> None:
    credentials = AppCredentials(str(tmp_path / "a.pem"), str(tmp_path / "b.pem"), "/x")
    with pytest.raises(ConfigError, match=r"client certificate .*a\.pem does not exist"):
        credentials.tls_options("localhost")
    with pytest.raises(ConfigError, match="does not exist"):
        credentials.ssl_context()


# -- the Twisted client ----------------------------------------------------------------------------


class Harness:
    """An :class:`AppClient` connected to a scripted gateway in memory."""

    def __init__(self, handler: Any = None, **kwargs: Any) -> None:
        self.clock = Clock()
        self.world = World()
        self.endpoint = MemoryEndpoint(self.world, self.clock, **kwargs.pop("endpoint", {}))
        self.events: list[AppEvent] = []
        kwargs.setdefault("retry_policy", lambda attempt: 2.0)
        self.client = AppClient(
            self.endpoint,
            handler if handler is not None else self.events.append,
            clock=self.clock,
            gateway="gw:5741",
            **kwargs,
        )

    def start(self) -> None:
        self.client.startService()
        self.endpoint.flush()

    def flush(self) -> None:
        self.endpoint.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.endpoint.flush()

    def acks(self) -> list[int]:
        return [r["seq"] for r in self.world.requests if r["op"] == "ack"]


def result_of(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any]) -> BaseException:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box and isinstance(box[0], Failure), box
    value = box[0].value
    assert value is not None
    return value


def test_connects_says_hello_subscribes_and_delivers_events_in_order() -> None:
    h = Harness()
    h.world.add_event("report", data=[1])
    h.world.add_event("instruction", iid=1, state="queued")
    h.client.subscribe(events=["report", "instruction"], modules=["meter-1"])
    h.start()
    assert h.world.requests[0] == {"id": 1, "op": "hello", "versions": [1]}
    assert h.world.requests[1] == {
        "id": 2,
        "op": "subscribe",
        "modules": ["meter-1"],
        "events": ["report", "instruction"],
    }
    assert fired(h.client.when_connected())
    assert [(e.seq, e.kind) for e in h.events] == [(1, "report"), (2, "instruction")]
    assert h.client.hello is not None and h.client.hello["principal"] == "billing"
    h.world.add_event("report", data=[2])
    h.flush()
    assert [e.seq for e in h.events] == [1, 2, 3]


def test_acknowledgements_are_cumulative_and_batched() -> None:
    h = Harness(ack_batch=3, ack_delay=1.0)
    h.client.subscribe()
    h.start()
    for value in range(5):
        h.world.add_event("report", data=[value])
    h.flush()
    assert len(h.events) == 5
    assert h.acks() == [3]  # a batch of three, at once
    assert h.world.acked == 3
    h.advance(0.9)
    assert h.acks() == [3]
    h.advance(0.2)  # the rest after ack_delay
    assert h.acks() == [3, 5] and h.world.acked == 5
    h.advance(10)
    assert h.acks() == [3, 5]  # nothing more is due


def test_the_gateways_window_limits_the_batch() -> None:
    h = Harness(ack_batch=100)
    h.world.hello["max_unacked"] = 4
    h.client.subscribe()
    h.start()
    for _ in range(4):
        h.world.add_event()
    h.flush()
    assert h.acks() == [2, 4]


def test_a_handler_deferred_holds_back_the_next_event_and_its_ack() -> None:
    waiting: list[Deferred[None]] = []
    seen: list[int] = []

    def handler(event: AppEvent) -> Deferred[None]:
        assert event.seq is not None
        seen.append(event.seq)
        waiting.append(Deferred())
        return waiting[-1]

    h = Harness(handler, ack_batch=1)
    h.client.subscribe()
    h.start()
    h.world.add_event()
    h.world.add_event()
    h.flush()
    assert seen == [1] and h.acks() == []
    waiting[0].callback(None)
    h.flush()
    assert seen == [1, 2] and h.acks() == [1]
    waiting[1].callback(None)
    h.flush()
    assert h.acks() == [1, 2]


def test_subscribing_again_does_not_repeat_the_event_in_hand() -> None:
    waiting: list[Deferred[None]] = []
    seen: list[int] = []

    def handler(event: AppEvent) -> Deferred[None]:
        assert event.seq is not None
        seen.append(event.seq)
        waiting.append(Deferred())
        return waiting[-1]

    h = Harness(handler, ack_batch=100)
    h.client.subscribe()
    h.start()
    h.world.add_event()
    h.world.add_event()
    h.flush()
    assert seen == [1]  # 2 is queued behind it
    h.client.subscribe(events=["report"])  # the gateway sends 1 and 2 again
    h.flush()
    waiting[0].callback(None)
    h.flush()
    waiting[1].callback(None)
    h.flush()
    assert seen == [1, 2]


def test_requests_are_matched_by_id_even_out_of_order() -> None:
    h = Harness()
    held: list[tuple[Any, dict[str, Any]]] = []
    h.world.handlers["get"] = lambda c, r: held.append((c, r))  # answer later
    h.start()
    first = h.client.get("meter-1", 1)
    second = h.client.get("meter-1", 2)
    h.flush()
    assert len(held) == 2
    (conn, r2) = held[1]
    conn.answer(r2["id"], {"iid": 2})
    h.flush()
    assert result_of(second) == {"iid": 2} and not fired(first)
    conn.refuse(held[0][1]["id"], "not-found", "no such instruction")
    h.flush()
    error = failure_of(first)
    assert isinstance(error, AppError) and error.code == "not-found"


def test_an_error_without_id_belongs_to_the_oldest_request() -> None:
    h = Harness()
    held: list[Any] = []
    h.world.handlers["submit"] = lambda c, r: held.append(c)
    h.start()
    pending = h.client.submit("meter-1", "set", {"x": 1})
    h.flush()
    held[0].refuse(None, "line-too-long", "request lines are limited")
    h.flush()
    error = failure_of(pending)
    assert isinstance(error, AppError) and error.code == "line-too-long"


def test_a_request_longer_than_the_gateways_limit_is_refused_locally() -> None:
    h = Harness()
    h.world.hello["max_line"] = 200
    h.start()
    error = failure_of(h.client.submit("meter-1", "set", "x" * 300))
    assert isinstance(error, AppError) and error.code == "line-too-long"
    assert "submit" not in h.world.ops()


def test_operations_send_their_parameters() -> None:
    h = Harness()
    for op in ("submit", "cancel", "modules", "rotate", "approve", "refuse"):
        h.world.handlers[op] = lambda c, r: {"echo": {k: v for k, v in r.items() if k != "id"}}
    h.start()

    def sent(d: Deferred[dict[str, Any]]) -> Any:
        h.flush()
        return result_of(d)["echo"]

    assert sent(h.client.submit("m", "set", [1], ttl=60, idempotency_key="k")) == {
        "op": "submit",
        "module": "m",
        "kind": "set",
        "body": [1],
        "ttl": 60,
        "idempotency_key": "k",
    }
    assert sent(h.client.cancel("m", 4)) == {"op": "cancel", "module": "m", "iid": 4}
    assert sent(h.client.modules()) == {"op": "modules", "offset": 0, "limit": 100}
    assert sent(h.client.modules("m")) == {"op": "modules", "module": "m"}
    assert sent(h.client.rotate("m", "fast")) == {"op": "rotate", "module": "m", "params": "fast"}
    assert sent(h.client.rotate("m")) == {"op": "rotate", "module": "m"}
    assert sent(h.client.approve("m")) == {"op": "approve", "module": "m"}
    assert sent(h.client.refuse("m")) == {"op": "refuse", "module": "m"}


def test_a_refusal_is_an_app_error_with_its_code() -> None:
    h = Harness()

    def forbid(c: Any, r: dict[str, Any]) -> None:
        raise Refusal("forbidden", "module 'x' is not one of yours")

    h.world.handlers["submit"] = forbid
    h.start()
    pending = h.client.submit("x", "set")
    h.flush()
    error = failure_of(pending)
    assert isinstance(error, AppError)
    assert (error.code, error.message) == ("forbidden", "module 'x' is not one of yours")


def test_reconnects_with_backoff_acks_what_was_processed_and_resumes() -> None:
    h = Harness(ack_batch=100)
    h.client.subscribe()
    h.start()
    for _ in range(3):
        h.world.add_event()
    h.flush()
    assert [e.seq for e in h.events] == [1, 2, 3] and h.acks() == []
    held: list[Any] = []
    h.world.handlers["get"] = lambda c, r: held.append(r)
    pending = h.client.get("meter-1", 1)
    h.flush()
    requests_before = len(h.world.requests)

    h.endpoint.drop()
    error = failure_of(pending)
    assert isinstance(error, AppConnectionError)
    assert "closed the connection" in str(error)
    h.world.add_event()  # created while the client is away
    h.advance(1.9)
    assert h.endpoint.attempts == 1
    h.advance(0.2)
    assert h.endpoint.attempts == 2
    # hello, then the acknowledgement of what was processed, then the subscription.
    assert [r["op"] for r in h.world.requests[requests_before:]] == ["hello", "ack", "subscribe"]
    assert h.world.requests[requests_before + 1]["seq"] == 3
    # Delivery resumed after the acknowledged position: no duplicates, no gap.
    assert [e.seq for e in h.events] == [1, 2, 3, 4]


def test_duplicates_of_events_taken_in_are_dropped() -> None:
    h = Harness(ack_batch=100)
    h.client.subscribe()
    h.start()
    h.world.add_event()
    h.world.add_event()
    h.flush()
    # The gateway sends the backlog again (another subscribe, or a bug): dropped.
    h.world.connections[0].deliver_backlog()
    h.flush()
    assert [e.seq for e in h.events] == [1, 2]


def test_a_failing_handler_gets_the_event_again_after_reconnecting() -> None:
    calls: list[int] = []

    def handler(event: AppEvent) -> None:
        assert event.seq is not None
        calls.append(event.seq)
        if event.seq == 2 and calls.count(2) == 1:
            raise RuntimeError("database down")

    h = Harness(handler, ack_batch=1)
    h.client.subscribe()
    h.start()
    for _ in range(3):
        h.world.add_event()
    h.flush()
    assert calls == [1, 2] and h.world.acked == 1
    assert h.world.connections == []  # the client closed the connection
    h.advance(2.1)
    assert calls == [1, 2, 2, 3]
    assert h.world.acked == 3


def test_unsequenced_events_are_delivered_and_never_acknowledged() -> None:
    h = Harness(ack_batch=1)
    h.client.subscribe()
    h.start()
    h.world.push({"event": "instruction-wanted", "module": "meter-1", "at": 1, "wait_ms": 50})
    h.world.push({"event": "ping", "at": 2})
    h.world.push({"event": "something-new", "at": 3})
    h.flush()
    assert [(e.kind, e.seq) for e in h.events] == [
        ("instruction-wanted", None),
        ("something-new", None),
    ]
    assert h.acks() == []


def test_keepalive_pings_and_a_dead_gateway() -> None:
    h = Harness()
    h.start()
    assert h.world.ops() == ["hello"]
    h.advance(59)
    assert h.world.ops() == ["hello"]
    h.advance(1.5)  # 60 s without sending: a ping request
    assert h.world.ops() == ["hello", "ping"]
    # A ping event from the gateway is answered when we were quiet for a while.
    h.advance(40)
    h.world.connections[0].subscribed = True
    h.world.push({"event": "ping", "at": 1})
    h.flush()
    assert h.world.ops() == ["hello", "ping", "ping"]
    # The gateway stops answering: silence for 2 x 60 + 10 s ends the connection.
    h.world.handlers["ping"] = lambda c, r: None
    for _ in range(3):
        h.advance(60)
    assert h.world.connections == []  # dropped after 130 s of silence
    h.advance(2.1)
    assert h.endpoint.attempts == 2  # reconnected after the dead peer was dropped
    assert len(h.world.connections) == 1


def test_the_connection_must_say_hello_in_time() -> None:
    h = Harness(connect_timeout=5.0)
    h.world.handlers["hello"] = lambda c, r: None  # never answered
    h.start()
    waiting = h.client.when_connected(fail_after_failures=1)
    h.advance(5.1)
    error = failure_of(waiting)
    assert isinstance(error, AppConnectionError)
    assert "no data from the gateway for 5 s" in str(error)


def test_connection_refused_is_reported_to_who_waits_and_retried() -> None:
    h = Harness()
    h.endpoint.refuse = True
    h.start()
    waiting = h.client.when_connected(fail_after_failures=1)
    patient = h.client.when_connected()
    h.advance(2.1)
    error = failure_of(waiting)
    assert isinstance(error, AppConnectionError)
    assert "connection refused by gw:5741" in str(error)
    assert h.endpoint.attempts == 2 and not fired(patient)
    request = h.client.request("ping")  # waits for a connection
    h.endpoint.refuse = False
    h.advance(2.1)
    assert fired(patient)
    assert result_of(request) == {"time": 1_750_000_000}


def test_requests_time_out() -> None:
    h = Harness(request_timeout=10.0)
    h.world.handlers["get"] = lambda c, r: None
    h.start()
    pending = h.client.get("m", 1)
    h.advance(10.5)
    error = failure_of(pending)
    assert isinstance(error, AppConnectionError) and "no answer to get" in str(error)


def test_stopping_acknowledges_what_was_processed_then_disconnects() -> None:
    h = Harness(ack_batch=100)
    h.client.subscribe()
    h.start()
    h.world.add_event()
    h.world.add_event()
    h.flush()
    assert h.world.acked == 0
    stopped = h.client.stopService()
    h.flush()
    assert fired(stopped)
    assert h.world.acked == 2
    assert h.world.connections == []
    h.advance(100)
    assert h.endpoint.attempts == 1  # no reconnection after stopping


def test_a_gateway_that_forgot_its_events_restarts_the_cursor() -> None:
    h = Harness(ack_batch=1)
    h.client.subscribe()
    h.start()
    for _ in range(3):
        h.world.add_event()
    h.flush()
    assert h.client.cursor.acked == 3
    h.world.outbox.clear()  # a new outbox (a fresh database)
    h.world.acked = 0
    h.endpoint.drop()
    h.advance(2.1)
    h.world.add_event()
    h.flush()
    assert [e.seq for e in h.events] == [1, 2, 3, 1]


def test_subscribe_again_changes_the_filters_on_the_live_connection() -> None:
    h = Harness(ack_batch=100)
    h.client.subscribe(events=["alert"])
    h.start()
    h.world.add_event("report")
    h.flush()
    assert h.events == []
    resubscribed = h.client.subscribe(events=["report"])
    h.flush()
    assert result_of(resubscribed) == {"acked_seq": 0, "last_seq": 1}
    assert [e.kind for e in h.events] == ["report"]
    unsubscribed = h.client.unsubscribe()
    h.flush()
    assert result_of(unsubscribed) == {}
    h.world.add_event("report")
    h.flush()
    assert len(h.events) == 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> InProcessPKI:
    pki = InProcessPKI(str(tmp_path_factory.mktemp("pki")))
    pki.client("billing")
    return pki


def gateway_tls(pki: InProcessPKI) -> Any:
    fake_datadir = SimpleNamespace(
        tls_paths=(pki.server_cert_path, pki.server_key_path, pki.ca_cert_path), clock=time.time
    )
    return tls.app_server_tls_options(fake_datadir)  # type: ignore[arg-type]


def test_over_in_memory_mutual_tls(pki: InProcessPKI) -> None:
    cert, key = pki.clients["billing"]
    credentials = AppCredentials(cert, key, pki.ca_cert_path)
    h = Harness(
        endpoint={
            "server_tls": gateway_tls(pki),
            "client_tls": credentials.tls_options("localhost"),
        }
    )
    h.client.subscribe()
    h.start()
    h.world.add_event()
    h.flush()
    assert fired(h.client.when_connected())
    assert [e.seq for e in h.events] == [1]


def test_a_certificate_from_another_ca_fails_with_the_reason(
    pki: InProcessPKI, tmp_path: Path
) -> None:
    stranger = InProcessPKI(str(tmp_path))
    cert, key = stranger.client("billing")
    credentials = AppCredentials(cert, key, pki.ca_cert_path)
    h = Harness(
        endpoint={
            "server_tls": gateway_tls(pki),
            "client_tls": credentials.tls_options("localhost"),
        }
    )
    h.client.startService()
    waiting = h.client.when_connected(fail_after_failures=1)
    h.flush()
    error = failure_of(waiting)
    assert isinstance(error, AppConnectionError)
    assert "TLS with gw:5741 failed" in str(error)
    assert "not issued by its application CA" in str(error)


@pytest_twisted.inlineCallbacks
def test_for_gateway_reports_a_refused_connection(pki: InProcessPKI) -> Iterator[Any]:
    from twisted.internet import reactor

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cert, key = pki.clients["billing"]
    client = AppClient.for_gateway(
        reactor, "127.0.0.1", port, AppCredentials(cert, key, pki.ca_cert_path)
    )
    client.startService()
    try:
        with pytest.raises(AppConnectionError, match=f"connection refused by 127.0.0.1:{port}"):
            yield client.when_connected(fail_after_failures=1)
    finally:
        yield client.stopService()


# -- the blocking client ---------------------------------------------------------------------------


@pytest.fixture
def gateway() -> Iterator[SocketGateway]:
    served = SocketGateway(World())
    yield served
    served.close()


def blocking(gateway: SocketGateway, **kwargs: Any) -> BlockingAppClient:
    kwargs.setdefault("timeout", 5.0)
    return BlockingAppClient("gw", 5741, opener=gateway.opener, **kwargs)


def test_blocking_request_and_events(gateway: SocketGateway) -> None:
    gateway.world.add_event("report", data=[1])
    with blocking(gateway) as client:
        assert client.hello is not None and client.hello["principal"] == "billing"
        result = client.subscribe(events=["report"])
        assert result == {"acked_seq": 0, "last_seq": 1}
        # An event arriving while a request waits for its answer is kept.
        assert client.request("ping") == {"time": 1_750_000_000}
        event = client.next_event(timeout=5)
        assert event is not None and (event.seq, event.payload["data"]) == (1, [1])
        assert client.next_event(timeout=0.05) is None
        gateway.add_event("report", data=[2])
        event = client.next_event(timeout=5)
        assert event is not None and event.seq == 2
    assert gateway.world.requests[0] == {"id": 1, "op": "hello", "versions": [1]}


def test_blocking_refusals_and_unknown_ops(gateway: SocketGateway) -> None:
    with blocking(gateway) as client:
        with pytest.raises(AppError) as caught:
            client.request("get", module="x", iid=1)
        assert caught.value.code == "forbidden"
        with pytest.raises(AppError, match="unknown-op"):
            client.request("launch")
        assert client.request("ping")["time"] == 1_750_000_000  # still usable


def test_blocking_error_without_id_goes_to_the_waiting_request(gateway: SocketGateway) -> None:
    gateway.world.handlers["submit"] = lambda c, r: c.refuse(None, "bad-json", "not JSON")
    with blocking(gateway) as client, pytest.raises(AppError, match="bad-json"):
        client.submit("m", "set", 1)


def test_blocking_network_refused_is_a_connection_error(gateway: SocketGateway) -> None:
    def refuse(c: Any, r: dict[str, Any]) -> None:
        c.refuse(None, "network-refused", "not from this network")

    gateway.world.handlers["hello"] = refuse
    client = blocking(gateway)
    with pytest.raises(AppConnectionError, match="network-refused: not from this network"):
        client.connect()
    assert not client.connected


def test_blocking_events_acknowledge_in_batches(gateway: SocketGateway) -> None:
    for value in range(5):
        gateway.world.add_event("report", data=[value])
    client = blocking(gateway, ack_batch=2)
    with client:
        client.subscribe()
        seen = []
        for event in client.events(timeout=5):
            seen.append(event.seq)
            if event.seq == 4:
                break
        assert seen == [1, 2, 3, 4]
    # A batch of two went out on the way; closing acknowledged the rest of
    # what was processed; the event in hand (4) was not.
    acks = [r["seq"] for r in gateway.world.requests if r["op"] == "ack"]
    assert acks == [2, 3]
    assert gateway.world.acked == 3


def test_blocking_events_reconnect_and_resume(gateway: SocketGateway) -> None:
    for _ in range(2):
        gateway.world.add_event()
    notices: list[str] = []
    sleeps: list[float] = []
    client = blocking(gateway, ack_batch=100, on_notice=notices.append, sleep=sleeps.append)
    with client:
        client.subscribe()
        seen = []
        for event in client.events(timeout=5):
            seen.append(event.seq)
            if event.seq == 2:
                gateway.drop()
                gateway.add_event()
            if event.seq == 3:
                client.mark_processed(3)
                break
        assert seen == [1, 2, 3]
        assert gateway.opened == 2
        assert len(sleeps) == 1 and 0.5 < sleeps[0] < 1.5
        assert notices and "connecting again" in notices[0]
        ops = [r["op"] for r in gateway.world.requests]
        # The new connection acknowledged events 1 and 2 before subscribing again.
        assert ops[-3:] == ["hello", "ack", "subscribe"]
    assert gateway.world.acked == 3


def test_blocking_answers_ping_events_and_keeps_the_connection_alive(
    gateway: SocketGateway,
) -> None:
    offset = [0.0]  # how much later than the real monotonic clock it is

    def clock() -> float:
        return time.monotonic() + offset[0]

    synced = [0]

    def pings() -> int:
        """Keep-alive pings sent so far (a ping of ours is answered after all of them)."""
        client.request("ping")
        synced[0] += 1
        return gateway.world.ops().count("ping") - synced[0]

    with blocking(gateway, clock=clock) as client:  # ping_interval 60
        client.subscribe()
        gateway.world.push({"event": "ping", "at": 1})
        assert client.next_event(timeout=0.1) is None
        assert pings() == 0  # we spoke a moment ago: no answer needed
        offset[0] += 40
        gateway.world.push({"event": "ping", "at": 2})
        assert client.next_event(timeout=0.1) is None
        assert pings() == 1  # quiet for 40 s: answered
        offset[0] += 61
        assert client.next_event(timeout=0.05) is None
        assert pings() == 2  # 61 s without sending anything: a ping request
        offset[0] += 131
        with pytest.raises(AppConnectionError, match="no data from the gateway for 130 s"):
            client.next_event(timeout=0.05)


def test_blocking_ack_after_the_delay(gateway: SocketGateway) -> None:
    gateway.world.add_event()
    with blocking(gateway, ack_delay=0.05) as client:
        client.subscribe()
        event = client.next_event(timeout=5)
        assert event is not None and event.seq is not None
        client.mark_processed(event.seq)
        deadline = time.monotonic() + 5
        while client.cursor.acked < 1 and time.monotonic() < deadline:
            assert client.next_event(timeout=0.05) is None
        assert gateway.world.acked == 1


def test_blocking_wait_for_outcome(gateway: SocketGateway) -> None:
    gateway.world.instructions[("m", 7)] = [
        {"iid": 7, "state": "queued"},
        {"iid": 7, "state": "sent"},
        {"iid": 7, "state": "confirmed", "exec_ts": 1_750_000_298, "status": 0},
    ]
    with blocking(gateway) as client:
        outcome = client.wait_for_outcome("m", 7, poll=(0.01, 0.02))
        assert outcome["exec_ts"] == 1_750_000_298
        gateway.world.instructions[("m", 8)] = [{"iid": 8, "state": "sent"}]
        with pytest.raises(AppConnectionError, match=r"still sent after 0\.1 s"):
            client.wait_for_outcome("m", 8, timeout=0.1, poll=(0.01, 0.02))


def test_blocking_line_too_long_is_refused_locally(gateway: SocketGateway) -> None:
    gateway.world.hello["max_line"] = 100
    with blocking(gateway) as client:
        with pytest.raises(AppError, match="line-too-long"):
            client.submit("m", "set", "x" * 200)
        assert "submit" not in gateway.world.ops()


def test_blocking_a_gateway_that_goes_away(gateway: SocketGateway) -> None:
    with blocking(gateway) as client:
        gateway.drop()
        with pytest.raises(AppConnectionError, match="closed the connection"):
            client.request("ping")
        assert not client.connected
        with pytest.raises(AppConnectionError, match="not connected"):
            client.request("ping")


def test_blocking_over_tls(pki: InProcessPKI, tmp_path: Path) -> None:
    served = SocketGateway(World())
    port = served.listen_tls(
        server_ssl_context(pki.server_cert_path, pki.server_key_path, pki.ca_cert_path)
    )
    try:
        cert, key = pki.clients["billing"]
        good = AppCredentials(cert, key, pki.ca_cert_path)
        with BlockingAppClient("127.0.0.1", port, good, timeout=5) as client:
            assert client.request("ping") == {"time": 1_750_000_000}

        stranger = InProcessPKI(str(tmp_path))
        scert, skey = stranger.client("billing")
        with pytest.raises(AppConnectionError, match="not issued by its application CA"):
            BlockingAppClient(
                "127.0.0.1", port, AppCredentials(scert, skey, pki.ca_cert_path), timeout=5
            ).connect()
        with pytest.raises(AppConnectionError, match="not signed by the trusted CA"):
            BlockingAppClient(
                "127.0.0.1", port, AppCredentials(cert, key, stranger.ca_cert_path), timeout=5
            ).connect()
        with pytest.raises(AppConnectionError, match=r"not valid for 'example\.org'"):
            BlockingAppClient(
                "127.0.0.1", port, good, server_name="example.org", timeout=5
            ).connect()
    finally:
        served.close()


# -- what the clients send conforms to the published schemas ---------------------------------------


def test_every_request_of_the_twisted_client_conforms_to_its_schema() -> None:
    from tests.app_protocol_helpers import validate

    h = Harness(ack_batch=1)
    for op in ("submit", "cancel", "modules", "rotate", "approve", "refuse"):
        h.world.handlers[op] = lambda c, r: {}
    h.client.subscribe(modules=["meter-1"], groups=["north"], events=["report"])
    h.start()
    h.world.add_event()
    h.flush()
    calls: list[Deferred[Any]] = [
        h.client.submit("meter-1", "set", {"a": 1}, ttl=5, idempotency_key="k"),
        h.client.submit("meter-1", "rehello", not_after=1_750_000_000),
        h.client.cancel("meter-1", 3),
        h.client.get("meter-1", 3),
        h.client.modules(),
        h.client.modules("meter-1"),
        h.client.rotate("meter-1"),
        h.client.rotate("meter-1", 2),
        h.client.approve("meter-1"),
        h.client.refuse("meter-1"),
        h.client.ping(),
        h.client.unsubscribe(),
    ]
    h.advance(61)  # a keep-alive ping
    for call in calls:
        call.addErrback(lambda _: None)
    ops = {validate(request) for request in h.world.requests}
    assert ops >= {
        f"request-{op}"
        for op in ("hello", "subscribe", "ack", "submit", "cancel", "get", "modules", "rotate",
                   "approve", "refuse", "ping", "unsubscribe")
    }  # fmt: skip


def test_every_request_of_the_blocking_client_conforms_to_its_schema(
    gateway: SocketGateway,
) -> None:
    from tests.app_protocol_helpers import validate

    gateway.world.add_event()
    gateway.world.instructions[("m", 1)] = [{"iid": 1, "state": "expired"}]
    with blocking(gateway, ack_batch=1) as client:
        client.subscribe(events=["report", "alert"])
        for event in client.events(timeout=0.2):
            assert event.seq == 1
        client.wait_for_outcome("m", 1)
        client.ack(1)
    ops = {validate(request) for request in gateway.world.requests}
    assert ops == {"request-hello", "request-subscribe", "request-ack", "request-get"}


# -- against the real gateway ----------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "gw.conf").write_text("[apps]\nkey_type = ec\n", encoding="utf-8")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest_twisted.ensureDeferred
async def test_the_twisted_client_against_the_real_gateway(workdir: Path) -> None:
    from twisted.internet import reactor

    async with real_gateway(workdir) as gw:
        await gw.store.add_modules([Module("meter-tw", psk=PSK)], apps={"meter-tw": ["billing"]})
        _, port = gw.app_address.rsplit(":", 1)
        credentials = AppCredentials.from_directory(gw.certs)
        endpoint = real_module(gw.datadir, "meter-tw")

        def connect(reports: list[AppEvent]) -> AppClient:
            def on_event(event: AppEvent) -> None:
                if event.kind == "report":
                    reports.append(event)

            client = AppClient.for_gateway(
                reactor, "127.0.0.1", int(port), credentials, on_event, ack_delay=0.05
            )
            client.subscribe(modules=["meter-tw"])
            client.startService()
            return client

        async def until(condition: Any) -> None:
            for _ in range(200):
                if condition():
                    return
                await deferLater(reactor, 0.05, lambda: None)
            raise AssertionError("timed out")

        first: list[AppEvent] = []
        client = connect(first)
        try:
            await client.when_connected(fail_after_failures=1)
            assert client.hello is not None and client.hello["principal"] == "billing"
            woke = await threads.deferToThread(
                wake, gw.module_port, wake_plan(endpoint, data=[{0: "t", 2: 1}])
            )
            assert woke.ok, woke
            await until(lambda: first)
            assert first[0].payload["data"] == [{"n": "t", "v": 1}]
            queued = await client.submit("meter-tw", "set", {"led": 1})
            assert queued["state"] == "queued" and queued["module"] == "meter-tw"
            with pytest.raises(AppError) as caught:
                await client.submit("someone-elses", "set")
            assert caught.value.code == "forbidden"
        finally:
            await client.stopService()
        seq = first[0].seq
        assert seq is not None and client.cursor.acked == client.cursor.processed >= seq

        # A new client resumes after the acknowledged position: the first
        # report is not delivered again, the next one is.
        woke = await threads.deferToThread(
            wake, gw.module_port, wake_plan(endpoint, data=[{0: "t", 2: 2}], confirm_now=True)
        )
        assert woke.ok, woke
        second: list[AppEvent] = []
        client = connect(second)
        try:
            await until(lambda: second)
            await deferLater(reactor, 0.2, lambda: None)
            assert [e.payload["data"] for e in second] == [[{"n": "t", "v": 2}]]
        finally:
            await client.stopService()
