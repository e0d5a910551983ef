"""Tests for m2mgw.apps.listener: JSON-lines framing, dispatch and mutual TLS."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from m2mgw import tls
from m2mgw.apps.listener import (
    APP_PROTOCOL_VERSION,
    AppFactory,
    AppProtocol,
    AppRequest,
    AppRequestError,
    Dispatcher,
    hello,
)
from tests.doubles import InProcessPKI, fired


def connect(
    factory: AppFactory,
) -> tuple[AppProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def answers(transport: StringTransport) -> list[dict[str, Any]]:
    data = transport.value()
    assert data.endswith(b"\n") or data == b""
    return [json.loads(line) for line in data.splitlines()]


def make_factory(operations: dict[str, Any] | None = None, **kwargs: Any) -> AppFactory:
    ops = {"hello": hello, **(operations or {})}
    kwargs.setdefault("clock", Clock())
    kwargs.setdefault("principal_of", lambda transport: "billing")
    return AppFactory(Dispatcher(ops), **kwargs)


def test_hello_names_the_principal() -> None:
    protocol, transport = connect(make_factory())
    protocol.dataReceived(b'{"id":1,"op":"hello"}\n')
    assert answers(transport) == [
        {"id": 1, "ok": True, "result": {"version": APP_PROTOCOL_VERSION, "principal": "billing"}}
    ]


@pytest.mark.parametrize(
    ("line", "expected_id", "code"),
    [
        (b'{"id":7,"op":"launch"}', 7, "unknown-op"),
        (b"{not json", None, "bad-json"),
        (b"\xff\xfe{}", None, "bad-json"),
        (b'{"id":1,"op":"hello","x":NaN}', None, "bad-json"),
        (b"[" * 100_000 + b"]" * 100_000, None, "line-too-long"),
        (b'["id", "op"]', None, "bad-request"),
        (b'{"op":"hello"}', None, "bad-request"),
        (b'{"id":true,"op":"hello"}', None, "bad-request"),
        (b'{"id":1.5,"op":"hello"}', None, "bad-request"),
        (b'{"id":"a","op":3}', "a", "bad-request"),
        (b'{"id":"a"}', "a", "bad-request"),
    ],
)
def test_errors_leave_the_connection_usable(line: bytes, expected_id: object, code: str) -> None:
    protocol, transport = connect(make_factory())
    protocol.dataReceived(line + b"\n" + b'{"id":"next","op":"hello"}\n')
    first, second = answers(transport)
    assert first["id"] == expected_id
    assert first["ok"] is False
    assert first["error"]["code"] == code
    assert isinstance(first["error"]["message"], str) and first["error"]["message"]
    assert second["id"] == "next" and second["ok"] is True
    assert not transport.disconnecting


def test_deeply_nested_json_within_the_limit_is_bad_json() -> None:
    protocol, transport = connect(make_factory(max_line=1 << 20))
    protocol.dataReceived(b"[" * 200_000 + b"\n")
    assert answers(transport)[0]["error"]["code"] == "bad-json"


def test_long_line_arriving_in_pieces_is_skipped_to_its_end() -> None:
    protocol, transport = connect(make_factory(max_line=1024))
    protocol.dataReceived(b'{"id":1,"op":"hello","pad":"' + b"x" * 600)
    protocol.dataReceived(b"x" * 600)
    assert [a["error"]["code"] for a in answers(transport)] == ["line-too-long"]
    protocol.dataReceived(b"x" * 5000)  # still the same line: skipped, no new answer
    protocol.dataReceived(b'x"}\n{"id":2,"op":"hello"}\n')
    result = answers(transport)
    assert [a.get("error", {}).get("code") for a in result] == ["line-too-long", None]
    assert result[1]["id"] == 2


def test_line_at_the_limit_is_accepted() -> None:
    protocol, transport = connect(make_factory(max_line=1024))
    request = b'{"id":1,"op":"hello","pad":"'
    request += b"x" * (1024 - len(request) - 2) + b'"}'
    assert len(request) == 1024
    protocol.dataReceived(request + b"\n")
    assert answers(transport)[0]["ok"] is True


def test_crlf_and_blank_lines_are_tolerated() -> None:
    protocol, transport = connect(make_factory())
    protocol.dataReceived(b'\r\n\n{"id":1,"op":"hello"}\r\n')
    assert [a["id"] for a in answers(transport)] == [1]


def test_request_split_across_reads() -> None:
    protocol, transport = connect(make_factory())
    for byte in b'{"id":1,"op":"hello"}\n':
        protocol.dataReceived(bytes([byte]))
    assert answers(transport)[0]["ok"] is True


def test_operations_see_params_and_principal() -> None:
    seen: list[AppRequest] = []

    def echo(request: AppRequest) -> dict[str, Any]:
        seen.append(request)
        return {"params": dict(request.params)}

    protocol, transport = connect(make_factory({"echo": echo}))
    protocol.dataReceived(b'{"id":"e","op":"echo","a":1,"b":[true]}\n')
    assert answers(transport) == [
        {"id": "e", "ok": True, "result": {"params": {"a": 1, "b": [True]}}}
    ]
    assert seen[0].principal == "billing" and seen[0].op == "echo"


def test_refusal_and_crash_of_an_operation() -> None:
    def refuse(request: AppRequest) -> None:
        raise AppRequestError("unknown-module", "no module 'x'")

    def crash(request: AppRequest) -> None:
        raise KeyError("secret-ish detail")

    def not_json(request: AppRequest) -> float:
        return float("nan")

    protocol, transport = connect(make_factory({"refuse": refuse, "crash": crash, "nan": not_json}))
    with capturedLogs() as events:
        protocol.dataReceived(
            b'{"id":1,"op":"refuse"}\n{"id":2,"op":"crash"}\n{"id":3,"op":"nan"}\n'
            b'{"id":4,"op":"hello"}\n'
        )
    first, second, third, fourth = answers(transport)
    assert first["error"] == {"code": "unknown-module", "message": "no module 'x'"}
    assert second["id"] == 2 and second["error"]["code"] == "internal-error"
    assert "secret-ish" not in second["error"]["message"]
    assert third["id"] == 3 and third["error"]["code"] == "internal-error"
    assert fourth["ok"] is True
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [KeyError, ValueError]


def test_slow_operations_are_answered_in_order_and_pause_reading() -> None:
    pending: list[Deferred[Any]] = []

    def slow(request: AppRequest) -> Deferred[Any]:
        waiting: Deferred[Any] = Deferred()
        pending.append(waiting)
        return waiting

    protocol, transport = connect(make_factory({"slow": slow}))
    protocol.dataReceived(b'{"id":1,"op":"slow"}\n{"id":2,"op":"hello"}\n{"id":3,"op":"slow"}\n')
    assert len(pending) == 1
    assert transport.producerState == "paused"
    assert answers(transport) == []
    pending[0].callback("one")
    assert [a["id"] for a in answers(transport)] == [1, 2]
    assert len(pending) == 2 and transport.producerState == "paused"
    pending[1].errback(AppRequestError("busy", "try later"))
    assert [a["id"] for a in answers(transport)] == [1, 2, 3]
    assert transport.producerState == "producing"


def test_coroutine_operations_are_supported() -> None:
    async def later(request: AppRequest) -> str:
        return "done"

    protocol, transport = connect(make_factory({"later": later}))
    protocol.dataReceived(b'{"id":1,"op":"later"}\n')
    assert answers(transport)[0]["result"] == "done"


def test_answer_after_disconnect_is_dropped() -> None:
    pending: list[Deferred[Any]] = []

    def slow(request: AppRequest) -> Deferred[Any]:
        pending.append(Deferred())
        return pending[-1]

    factory = make_factory({"slow": slow})
    protocol, transport = connect(factory)
    protocol.dataReceived(b'{"id":1,"op":"slow"}\n')
    protocol.connectionLost(None)  # type: ignore[arg-type]
    pending[0].callback("late")
    assert transport.value() == b""
    assert protocol not in factory.connections


def test_idle_connection_is_closed() -> None:
    clock = Clock()
    protocol, transport = connect(make_factory(clock=clock, idle_timeout=300))
    clock.advance(299)
    protocol.dataReceived(b'{"id":1,"op":"hello"}\n')
    clock.advance(299)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_no_idle_timeout_when_zero() -> None:
    clock = Clock()
    _protocol, transport = connect(make_factory(clock=clock, idle_timeout=0))
    clock.advance(10**6)
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_without_a_principal_the_request_is_refused_and_the_connection_closed() -> None:
    protocol, transport = connect(make_factory(principal_of=lambda transport: None))
    protocol.dataReceived(b'{"id":1,"op":"hello"}\n')
    assert answers(transport)[0]["error"]["code"] == "unauthenticated"
    assert transport.disconnecting


def test_disconnect_all_closes_and_then_aborts() -> None:
    clock = Clock()
    factory = make_factory(clock=clock)
    first, first_transport = connect(factory)
    second, second_transport = connect(factory)
    assert factory.connections == {first, second}
    aborted: list[AppProtocol] = []
    second_transport.abortConnection = lambda: aborted.append(second)  # type: ignore[method-assign]

    closed = factory.disconnect_all(grace=5)
    assert first_transport.disconnecting and second_transport.disconnecting
    first.connectionLost(None)  # type: ignore[arg-type]
    assert not fired(closed)
    clock.advance(5)
    assert aborted == [second]
    second.connectionLost(None)  # type: ignore[arg-type]
    assert fired(closed)
    assert factory.connections == set()


def test_disconnect_all_with_no_connections() -> None:
    assert fired(make_factory().disconnect_all())


# -- over real (in-memory) mutual TLS ------------------------------------------------


class LineClient(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(json.loads(line))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> InProcessPKI:
    pki = InProcessPKI(str(tmp_path_factory.mktemp("pki")))
    pki.client("billing")
    return pki


def tls_pair(pki: InProcessPKI, client_options: Any) -> tuple[LineClient, Any, Any, AppFactory]:
    clock = Clock()
    fake_datadir = SimpleNamespace(
        tls_paths=(pki.server_cert_path, pki.server_key_path, pki.ca_cert_path),
        clock=time.time,
    )
    server_options = tls.app_server_tls_options(fake_datadir)  # type: ignore[arg-type]
    app_factory = AppFactory(clock=clock)
    server_factory = TLSMemoryBIOFactory(server_options, False, app_factory, clock=clock)
    client = LineClient()
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: client), clock=clock
    )
    _, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    return client, server, pump, app_factory


def test_hello_over_mutual_tls(pki: InProcessPKI) -> None:
    cert, key = pki.clients["billing"]
    options = tls.app_client_tls_options(cert, key, pki.ca_cert_path, "localhost")
    client, server, pump, app_factory = tls_pair(pki, options)
    assert len(app_factory.connections) == 1
    (connection,) = app_factory.connections
    assert connection.principal == "billing"
    client.transport.write(b'{"id":1,"op":"hello"}\n')
    pump.flush()
    assert client.lines == [
        {"id": 1, "ok": True, "result": {"version": APP_PROTOCOL_VERSION, "principal": "billing"}}
    ]
    assert not server.transport.disconnected


def test_client_without_certificate_is_refused(pki: InProcessPKI) -> None:
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    with open(pki.ca_cert_path, "rb") as f:
        authority = Certificate.loadPEM(f.read())
    options = optionsForClientTLS("localhost", authority)
    client, server, pump, app_factory = tls_pair(pki, options)
    client.transport.write(b'{"id":1,"op":"hello"}\n')
    pump.flush()
    assert client.lines == []
    # The handshake failed: the server side is gone and never learnt a principal.
    assert app_factory.connections == set()
    assert server.transport.disconnected


def test_client_certificate_from_another_ca_is_refused(pki: InProcessPKI, tmp_path: Any) -> None:
    stranger = InProcessPKI(str(tmp_path))
    cert, key = stranger.client("billing")
    options = tls.app_client_tls_options(cert, key, pki.ca_cert_path, "localhost")
    client, server, pump, app_factory = tls_pair(pki, options)
    client.transport.write(b'{"id":1,"op":"hello"}\n')
    pump.flush()
    assert client.lines == []
    assert app_factory.connections == set()
    assert server.transport.disconnected


def test_factory_applies_the_line_limit() -> None:
    protocol = make_factory(max_line=2048).buildProtocol(None)
    assert isinstance(protocol, Protocol) and protocol.MAX_LENGTH == 2048
