"""
The application listener's handshake rules over in-memory TLS
(``TLSMemoryBIOFactory`` + ``twisted.test.iosim``): a client certificate is
required and must come from the application CA and be valid now; the
gateway's certificate may be RSA or ECC; the principal is the certificate's
common name, and reserved names and foreign networks are turned away.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from m2mgw import tls
from m2mgw.apps.listener import AppFactory, Dispatcher, hello
from m2mgw.apps.policy import AppPolicies, AppPolicy, parse_networks

DAY = 86400


@dataclass
class PKI:
    """An application CA of one key type, its gateway certificate and client certificates."""

    directory: Path
    key_type: str

    def __post_init__(self) -> None:
        self.ca_key = self._key()
        self.ca = tls.make_ca_certificate(self.ca_key, "test CA", time.time())
        self.ca_path = self._write("ca.pem", tls.dump_certificate(self.ca))
        key = self._key()
        cert = tls.issue_certificate(
            self.ca_key,
            self.ca,
            key.public_key(),
            "localhost",
            time.time(),
            30,
            server_names=["localhost"],
            server=True,
        )
        self.server_cert = self._write("server.pem", tls.dump_certificate(cert))
        self.server_key = self._write("server-key.pem", tls.dump_private_key(key))

    def _key(self) -> Any:
        return tls.generate_tls_key(self.key_type, 2048)

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return str(path)

    def client(self, name: str, issued: float | None = None, days: int = 30) -> tuple[str, str]:
        """A client certificate for ``name`` (issued at ``issued``, valid ``days``)."""
        key = tls.generate_tls_key("ec")
        when = time.time() if issued is None else issued
        cert = tls.issue_certificate(self.ca_key, self.ca, key.public_key(), name, when, days)
        return (
            self._write(f"{name}-{when}.pem", tls.dump_certificate(cert)),
            self._write(f"{name}-{when}-key.pem", tls.dump_private_key(key)),
        )


@pytest.fixture(scope="module", params=["rsa", "ec"])
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp(f"pki-{request.param}"), request.param)


class LineClient(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(json.loads(line))


def connect(pki: PKI, client_options: Any, policies: AppPolicies | None = None) -> Any:
    """A TLS connection in memory; returns (client, server, pump, factory)."""
    clock = Clock()
    datadir = SimpleNamespace(
        tls_paths=(pki.server_cert, pki.server_key, pki.ca_path), clock=time.time
    )
    server_options = tls.app_server_tls_options(datadir)  # type: ignore[arg-type]
    factory = AppFactory(Dispatcher({"hello": hello}), clock=clock, policies=policies)
    server_factory = TLSMemoryBIOFactory(server_options, False, factory, clock=clock)
    client = LineClient()
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: client), clock=clock
    )
    _, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    return client, server, pump, factory, clock


def say_hello(client: LineClient, pump: Any, clock: Clock) -> None:
    client.transport.write(b'{"id":1,"op":"hello"}\n')
    for _ in range(3):
        clock.advance(0)
        pump.flush()


def test_a_valid_client_certificate_names_the_principal(pki: PKI) -> None:
    cert, key = pki.client("billing")
    options = tls.app_client_tls_options(cert, key, pki.ca_path, "localhost")
    client, server, pump, factory, clock = connect(pki, options)
    say_hello(client, pump, clock)
    assert client.lines == [{"id": 1, "ok": True, "result": {"version": 1, "principal": "billing"}}]
    (connection,) = factory.connections
    assert connection.principal == "billing"
    assert not server.transport.disconnected


def refused(pki: PKI, options: Any) -> tuple[Any, Any, list[dict[str, Any]]]:
    with capturedLogs() as events:
        client, server, pump, factory, clock = connect(pki, options)
        say_hello(client, pump, clock)
    assert client.lines == []
    assert factory.connections == set()
    assert server.transport.disconnected
    return client, factory, list(events)


def refusal_logged(events: list[dict[str, Any]]) -> bool:
    return any(e.get("log_format", "").startswith("refused a TLS connection") for e in events)


def test_no_client_certificate_is_refused_in_the_handshake(pki: PKI) -> None:
    with open(pki.ca_path, "rb") as f:
        authority = Certificate.loadPEM(f.read())
    _, _, events = refused(pki, optionsForClientTLS("localhost", authority))
    assert refusal_logged(events)


def test_a_certificate_from_another_ca_is_refused(pki: PKI, tmp_path: Path) -> None:
    stranger = PKI(tmp_path, "ec")
    cert, key = stranger.client("billing")
    options = tls.app_client_tls_options(cert, key, pki.ca_path, "localhost")
    _, _, events = refused(pki, options)
    assert refusal_logged(events)


def test_an_expired_certificate_is_refused(pki: PKI) -> None:
    cert, key = pki.client("billing", issued=time.time() - 10 * DAY, days=2)
    options = tls.app_client_tls_options(cert, key, pki.ca_path, "localhost")
    _, _, events = refused(pki, options)
    assert refusal_logged(events)


def test_a_reserved_name_is_turned_away(pki: PKI) -> None:
    cert, key = pki.client("spool")
    options = tls.app_client_tls_options(cert, key, pki.ca_path, "localhost")
    client, _server, pump, factory, clock = connect(pki, options)
    say_hello(client, pump, clock)
    assert [line["error"]["code"] for line in client.lines] == ["unauthenticated"]
    assert factory.connections == set()


def test_an_application_outside_its_networks_is_turned_away(pki: PKI) -> None:
    cert, key = pki.client("billing")
    options = tls.app_client_tls_options(cert, key, pki.ca_path, "localhost")
    policy = AppPolicy(networks=parse_networks("10.0.0.0/8"))
    client, server, pump, factory, clock = connect(
        pki, options, AppPolicies(by_app={"billing": policy})
    )
    say_hello(client, pump, clock)
    assert [line["error"]["code"] for line in client.lines] == ["network-refused"]
    assert factory.connections == set()
    assert server.transport.disconnected
