"""
Tests for :mod:`m2mgw.tls`: certificates and the mutual-TLS options, with
real handshakes over in-memory transports (``twisted.test.iosim``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL.crypto import X509
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from m2mgw import tls
from m2mgw.datadir import DataDir
from m2mgw.errors import ConfigError

# pyOpenSSL deprecates its own key and certificate objects (anchors P9): any
# DeprecationWarning raised while these tests build options fails them.
pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")

NOW = 1_750_000_000.0


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Records the handshake, the data and the end of a TLS connection."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.received = b""
        self.lost: Failure | None = None
        self.principal: str | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.principal = tls.peer_principal(self.transport)
        self.transport.write(b"hello from " + (self.principal or "?").encode())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason


class OneProtocol(Factory):
    """A factory that hands out one given protocol (so a test keeps hold of it)."""

    def __init__(self, protocol: Recorder) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Recorder:
        return self.protocol_instance


def handshake(server_options: Any, client_options: Any) -> tuple[Recorder, Recorder]:
    """Connect a server and a client in memory and run the TLS exchange to the end."""
    server, client = Recorder(), Recorder()
    clock = Clock()  # TLS transports aggregate small writes until the clock moves
    server_factory = TLSMemoryBIOFactory(server_options, False, OneProtocol(server), clock)
    client_factory = TLSMemoryBIOFactory(client_options, True, OneProtocol(client), clock)
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    for _ in range(3):
        pump.flush()
    return server, client


@pytest.fixture(scope="module")
def datadir(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    """A data directory with EC TLS keys (fast) and no server keys."""
    directory = DataDir(str(tmp_path_factory.mktemp("tls") / "data"))
    directory.ensure([], tls_key_type="ec")
    return directory


@pytest.fixture(scope="module")
def app_files(datadir: DataDir, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(cert, key, ca) of an application server named ``billing``."""
    out = str(tmp_path_factory.mktemp("app"))
    cert, key = datadir.issue_app_cert("billing", out, key_type="ec")
    return cert, key, datadir.tls_paths[2]


# -- certificates ----------------------------------------------------------------------------


def test_generate_tls_key_types() -> None:
    assert isinstance(tls.generate_tls_key("ec"), ec.EllipticCurvePrivateKey)
    key = tls.generate_tls_key("rsa", 2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048


@pytest.mark.parametrize(
    ("key_type", "bits", "message"),
    [("dsa", 3072, "unknown TLS key type 'dsa'"), ("rsa", 1024, "out of range")],
)
def test_generate_tls_key_refuses(key_type: str, bits: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tls.generate_tls_key(key_type, bits)


def test_ca_and_leaf_certificates() -> None:
    ca_key = tls.generate_tls_key("ec")
    authority = tls.make_ca_certificate(ca_key, "test CA", NOW, days=10)
    constraints = authority.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert tls.is_issued_by(authority, authority)
    assert authority.not_valid_before_utc.timestamp() == NOW - 3600
    assert authority.not_valid_after_utc.timestamp() == NOW + 10 * 86400

    server_key = tls.generate_tls_key("ec")
    server = tls.issue_certificate(
        ca_key,
        authority,
        server_key.public_key(),
        "gw",
        NOW,
        30,
        server_names=["localhost", "127.0.0.1", "::1", "gw.example", "localhost"],
        server=True,
    )
    assert tls.is_issued_by(server, authority)
    assert tls.certificate_common_name(server) == "gw"
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "gw.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    client = tls.issue_certificate(
        ca_key, authority, tls.generate_tls_key("ec").public_key(), "app", NOW, 30
    )
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    other_ca = tls.make_ca_certificate(tls.generate_tls_key("ec"), "other", NOW)
    assert not tls.is_issued_by(client, other_ca)
    assert tls.key_matches_certificate(server_key, server)
    assert not tls.key_matches_certificate(server_key, client)


def test_certificate_validity_must_be_positive() -> None:
    key = tls.generate_tls_key("ec")
    with pytest.raises(ConfigError, match="at least one day"):
        tls.make_ca_certificate(key, "x", NOW, days=0)


def test_loading_errors_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"^/some/key\.pem: not an unencrypted PEM private key"):
        tls.load_private_key(b"garbage", "/some/key.pem")
    with pytest.raises(ConfigError, match=r"^/some/cert\.pem: "):
        tls.load_certificates(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "/some/cert.pem"
        )
    with pytest.raises(ConfigError, match=r"^/some/cert\.pem: not a PEM certificate"):
        tls.load_certificates(b"", "/some/cert.pem")


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("billing", True),
        ("app-1.example_x", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("-app", False),
        ("two words", False),
        ("é", False),
    ],
)
def test_app_names(name: str, valid: bool) -> None:
    assert tls.is_valid_app_name(name) is valid


# -- mutual TLS ------------------------------------------------------------------------------------


def test_mutual_tls_handshake_names_the_principal(
    datadir: DataDir, app_files: tuple[str, str, str]
) -> None:
    server_options = tls.app_server_tls_options(datadir)
    assert isinstance(server_options, CertificateOptions)
    server, client = handshake(server_options, tls.app_client_tls_options(*app_files))
    assert server.handshake_done and client.handshake_done
    assert server.principal == "billing"
    assert client.received == b"hello from billing"
    assert server.lost is None


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1", os.uname().nodename])
def test_client_accepts_each_name_of_the_gateway(
    datadir: DataDir, app_files: tuple[str, str, str], hostname: str
) -> None:
    client_options = tls.app_client_tls_options(*app_files, hostname=hostname)
    server, client = handshake(tls.app_server_tls_options(datadir), client_options)
    assert client.handshake_done and server.principal == "billing"


def test_client_refuses_a_wrong_hostname(datadir: DataDir, app_files: tuple[str, str, str]) -> None:
    client_options = tls.app_client_tls_options(*app_files, hostname="gateway.invalid")
    server, client = handshake(tls.app_server_tls_options(datadir), client_options)
    assert not client.handshake_done
    assert client.lost is not None
    assert server.principal is None


def test_server_requires_a_client_certificate(datadir: DataDir) -> None:
    ca_path = datadir.tls_paths[2]
    with open(ca_path, "rb") as f:
        authority = tls.load_certificates(f.read(), ca_path)[0]
    root = trustRootFromCertificates([Certificate(X509.from_cryptography(authority))])
    anonymous = optionsForClientTLS("localhost", root)
    server, _ = handshake(tls.app_server_tls_options(datadir), anonymous)
    assert not server.handshake_done
    assert server.received == b""
    assert server.lost is not None


def test_server_refuses_a_certificate_from_another_ca(datadir: DataDir, tmp_path: Any) -> None:
    stranger = DataDir(str(tmp_path / "stranger"))
    stranger.ensure([], tls_key_type="ec")
    cert, key = stranger.issue_app_cert("billing", str(tmp_path / "out"), key_type="ec")
    # The client trusts the real gateway but presents a certificate of another CA.
    client_options = tls.app_client_tls_options(cert, key, datadir.tls_paths[2])
    server, _ = handshake(tls.app_server_tls_options(datadir), client_options)
    assert not server.handshake_done
    assert server.principal is None


def test_server_refuses_its_own_certificate_as_a_client_certificate(datadir: DataDir) -> None:
    cert, key, ca = datadir.tls_paths
    client_options = tls.app_client_tls_options(cert, key, ca)
    server, _ = handshake(tls.app_server_tls_options(datadir), client_options)
    assert not server.handshake_done  # serverAuth only: not a client certificate


def test_server_and_client_refuse_tls_below_1_2(
    datadir: DataDir, app_files: tuple[str, str, str]
) -> None:
    from OpenSSL import SSL

    server_options = tls.app_server_tls_options(datadir)
    # set_options(0) adds nothing and returns the context's option bits.
    bits = server_options.getContext().set_options(0)
    for flag in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
        assert bits & flag
    assert not bits & SSL.OP_NO_TLSv1_2
    server, _ = handshake(server_options, tls.app_client_tls_options(*app_files))
    assert server.transport is not None
    assert server.transport.getHandle().get_protocol_version_name() == "TLSv1.3"  # type: ignore[attr-defined]


def test_rsa_gateway_end_to_end(tmp_path: Any) -> None:
    directory = DataDir(str(tmp_path / "data"))
    directory.ensure([], tls_key_type="rsa", rsa_bits=2048)
    cert, key = directory.issue_app_cert(
        "ops", str(tmp_path / "out"), key_type="rsa", rsa_bits=2048
    )
    with open(directory.tls_paths[0], "rb") as f:
        gateway = tls.load_certificates(f.read(), "gateway")[0]
    assert isinstance(gateway.public_key(), rsa.RSAPublicKey)
    client_options = tls.app_client_tls_options(cert, key, directory.tls_paths[2])
    server, client = handshake(tls.app_server_tls_options(directory), client_options)
    assert server.principal == "ops" and client.received == b"hello from ops"


def test_server_options_report_bad_files(tmp_path: Any) -> None:
    directory = DataDir(str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"gateway\.pem does not exist"):
        tls.app_server_tls_options(directory)
    directory.ensure([], tls_key_type="ec")
    cert, key, ca = directory.tls_paths
    other = tls.generate_tls_key("ec")
    os.unlink(key)
    with open(key, "wb") as f:
        f.write(tls.dump_private_key(other))
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        tls.app_server_tls_options(directory)
    os.unlink(key)
    os.mkdir(key)  # unreadable as a file
    with pytest.raises(ConfigError, match=f"cannot read gateway TLS key {key}"):
        tls.app_server_tls_options(directory)
    with open(ca, "wb") as f:
        f.write(b"not a certificate")
    with pytest.raises(ConfigError):
        tls.app_client_tls_options(cert, key, ca)


def test_server_options_serve_a_chain(tmp_path: Any, app_files: tuple[str, str, str]) -> None:
    """A gateway.pem holding the leaf and an intermediate is served whole."""
    directory = DataDir(str(tmp_path / "data"))
    directory.ensure([], tls_key_type="ec")
    cert_path, _, ca_path = directory.tls_paths
    with open(cert_path, "rb") as f:
        leaf = f.read()
    with open(ca_path, "rb") as f:
        authority = f.read()
    os.unlink(cert_path)
    with open(cert_path, "wb") as f:
        f.write(leaf + authority)
    options = tls.app_server_tls_options(directory)
    assert len(options.extraCertChain) == 1


def test_peer_principal_without_tls() -> None:
    assert tls.peer_principal(object()) is None

    class NoCertificate:
        def getPeerCertificate(self) -> None:
            return None

    assert tls.peer_principal(NoCertificate()) is None

    class Broken:
        def getPeerCertificate(self) -> None:
            raise RuntimeError("handshake not done")

    assert tls.peer_principal(Broken()) is None


def test_peer_principal_refuses_bad_names() -> None:
    ca_key = tls.generate_tls_key("ec")
    authority = tls.make_ca_certificate(ca_key, "ca", NOW)
    bad = tls.issue_certificate(ca_key, authority, ca_key.public_key(), "two words", NOW, 1)

    class Transport:
        def getPeerCertificate(self) -> x509.Certificate:
            return bad

    assert tls.peer_principal(Transport()) is None


def test_expiring_gateway_certificate_is_logged(tmp_path: Any) -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    directory = DataDir(str(tmp_path / "data"), clock=lambda: NOW)
    directory.ensure([], tls_key_type="ec")
    later = DataDir(directory.path, clock=lambda: NOW + 820 * 86400)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        tls.app_server_tls_options(later)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert warnings and warnings[0]["days"] == 5
