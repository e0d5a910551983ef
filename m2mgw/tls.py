"""
The application side's TLS: certificates, keys and the mutual-TLS options.

Application servers reach the gateway over mutual TLS.  The data directory
(:mod:`m2mgw.datadir`) holds one local certificate authority, the
*application CA*, which signs both the gateway's TLS certificate (extended key
usage ``serverAuth`` only) and every application server's client certificate
(``clientAuth`` only).  An application server is therefore configured with a
single trust anchor, the CA certificate, and the gateway's certificate can be
renewed without touching any application.  The key usages keep the two roles
apart: OpenSSL refuses a client certificate as a server certificate and the
other way round.

The functions that build certificates are pure (time is passed in).  The
options builders pass ``cryptography`` key and certificate objects straight to
:class:`twisted.internet.ssl.CertificateOptions`: pyOpenSSL deprecates its own
``PKey``/``X509`` objects there, and Twisted still annotates the parameters
with them, so this module is the one place that adapts (and silences mypy for)
that mismatch.  The negotiated ECDH group is left to OpenSSL's automatic
choice: application servers are not constrained devices.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from zope.interface import implementer

from m2mgw.errors import ConfigError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

    from m2mgw.datadir import DataDir

__all__ = [
    "TLS_KEY_TYPES",
    "ReloadableServerTLS",
    "TLSPrivateKey",
    "app_client_tls_options",
    "app_server_tls_options",
    "certificate_common_name",
    "dump_certificate",
    "dump_private_key",
    "generate_tls_key",
    "is_valid_app_name",
    "issue_certificate",
    "load_certificates",
    "load_private_key",
    "make_ca_certificate",
    "peer_principal",
]

log = Logger()

#: The key types the application side supports: RSA (default) or EC P-256.
TLS_KEY_TYPES = ("rsa", "ec")

#: RSA modulus sizes accepted for TLS keys.
RSA_BITS_RANGE = (2048, 8192)

#: A private key the TLS side can use.
TLSPrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: Certificates are back-dated by this much to absorb clock skew between peers.
BACKDATE = datetime.timedelta(hours=1)

#: Largest key or certificate file read (a PEM chain is a few kilobytes).
MAX_PEM_SIZE = 1 << 20

_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def is_valid_app_name(name: str) -> bool:
    """
    Whether ``name`` may be an application principal (a client certificate's
    common name): 1-64 ASCII letters, digits, ``.``, ``_`` or ``-``, starting
    with a letter or digit.  No spaces, so that lists of them can be written
    space-separated.
    """
    return _APP_NAME.match(name) is not None


# -- keys and certificates (pure) --------------------------------------------


def generate_tls_key(key_type: str = "rsa", rsa_bits: int = 3072) -> TLSPrivateKey:
    """
    Create a TLS private key.

    :param key_type: ``"rsa"`` or ``"ec"`` (P-256).
    :param rsa_bits: the modulus size for ``"rsa"``, 2048-8192.
    :raise m2mgw.errors.ConfigError: an unknown type or a bad size.
    """
    if key_type == "rsa":
        low, high = RSA_BITS_RANGE
        if not low <= rsa_bits <= high:
            raise ConfigError(f"RSA key size {rsa_bits} is out of range ({low}-{high})")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigError(f"unknown TLS key type {key_type!r} (known: {', '.join(TLS_KEY_TYPES)})")


def dump_private_key(key: TLSPrivateKey) -> bytes:
    """Serialise a TLS private key as unencrypted PKCS#8 PEM (for a file of mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def dump_certificate(certificates: x509.Certificate | Sequence[x509.Certificate]) -> bytes:
    """Serialise one certificate, or a chain leaf first, as concatenated PEM blocks."""
    if isinstance(certificates, x509.Certificate):
        certificates = [certificates]
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def load_private_key(data: bytes, path: str) -> TLSPrivateKey:
    """
    Parse a PEM (PKCS#8 or traditional) RSA or EC private key.

    :param path: named in the error message.
    :raise m2mgw.errors.ConfigError: not an unencrypted RSA or EC private key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({e})") from None
    except Exception as e:  # cryptography raises UnsupportedAlgorithm and Rust errors
        raise ConfigError(f"{path}: unreadable private key ({type(e).__name__})") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(f"{path}: only RSA and EC keys are supported for TLS")
    return key


def load_certificates(data: bytes, path: str) -> list[x509.Certificate]:
    """
    Parse one or more PEM certificates (a chain is leaf first).

    :param path: named in the error message.
    :raise m2mgw.errors.ConfigError: no certificate could be read.
    """
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{path}: not a PEM certificate ({e})") from None
    if not certificates:
        raise ConfigError(f"{path}: holds no certificate")
    return certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _public_key_of(key: TLSPrivateKey) -> Any:
    return key.public_key()


def _validity(builder: x509.CertificateBuilder, now: float, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise ConfigError(f"a certificate must be valid for at least one day, not {days}")
    start = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
    return builder.not_valid_before(start - BACKDATE).not_valid_after(
        start + datetime.timedelta(days=days)
    )


def make_ca_certificate(
    key: TLSPrivateKey, common_name: str, now: float, days: int = 3650
) -> x509.Certificate:
    """
    A self-signed CA certificate that may sign end-entity certificates only
    (``pathLen`` 0).

    :param now: the current time, seconds since the epoch.
    """
    public = _public_key_of(key)
    builder = x509.CertificateBuilder().subject_name(_name(common_name))
    builder = _validity(builder.issuer_name(_name(common_name)), now, days)
    builder = (
        builder.serial_number(x509.random_serial_number())
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def issue_certificate(
    ca_key: TLSPrivateKey,
    ca_certificate: x509.Certificate,
    public_key: Any,
    common_name: str,
    now: float,
    days: int,
    *,
    server_names: Sequence[str] = (),
    server: bool = False,
) -> x509.Certificate:
    """
    Sign an end-entity certificate with the CA.

    :param public_key: the subject's ``cryptography`` public key.
    :param server_names: DNS names and IP addresses for the subjectAltName.
    :param server: a TLS server certificate (``serverAuth``) if true, else a
        client certificate (``clientAuth``).
    """
    builder = x509.CertificateBuilder().subject_name(_name(common_name))
    builder = _validity(builder.issuer_name(ca_certificate.subject), now, days)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        builder.serial_number(x509.random_serial_number())
        .public_key(public_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa and server,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_general_names(server_names)), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        if not name or name in seen:
            continue
        seen.add(name)
        address: IPv4Address | IPv6Address | None
        try:
            address = ip_address(name)
        except ValueError:
            address = None
        if address is not None:
            result.append(x509.IPAddress(address))
        else:
            result.append(x509.DNSName(name))
    return result


def certificate_common_name(certificate: x509.Certificate) -> str | None:
    """The subject's single common name, or ``None`` if it has none or several."""
    attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else None


def key_matches_certificate(key: TLSPrivateKey, certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` certifies the public half of ``key``."""
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == certificate.public_key().public_bytes(
        der, spki
    )


def is_issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``certificate`` (names and signature)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- files -------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist (run m2mgw-admin init)") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > MAX_PEM_SIZE:
        raise ConfigError(f"{what} {path} is larger than {MAX_PEM_SIZE} bytes")
    return data


def _load_pair(
    cert_path: str, key_path: str, what: str
) -> tuple[TLSPrivateKey, list[x509.Certificate]]:
    chain = load_certificates(_read(cert_path, f"{what} certificate"), cert_path)
    key = load_private_key(_read(key_path, f"{what} key"), key_path)
    if not key_matches_certificate(key, chain[0]):
        raise ConfigError(f"the key {key_path} does not belong to the certificate {cert_path}")
    return key, chain


def _warn_if_expiring(certificate: x509.Certificate, path: str, now: float) -> None:
    remaining = certificate.not_valid_after_utc.timestamp() - now
    if remaining <= 0:
        log.error("TLS certificate {path} has expired", path=path)
    elif remaining < 30 * 86400:
        log.warn(
            "TLS certificate {path} expires in {days} days", path=path, days=int(remaining // 86400)
        )


# -- Twisted options -----------------------------------------------------------


def _certificate_options(**kwargs: Any) -> CertificateOptions:
    # Twisted annotates privateKey/certificate/extraCertChain with pyOpenSSL
    # types; pyOpenSSL deprecates those and accepts cryptography objects.
    try:
        return CertificateOptions(**kwargs)
    except ValueError as e:
        raise ConfigError(f"unusable TLS settings: {e}") from None


def app_server_tls_options(datadir: DataDir) -> CertificateOptions:
    """
    The gateway's TLS server options for application servers: TLS 1.2 or
    newer, the gateway certificate (and any chain after it in the file), and a
    client certificate issued by the application CA required from every peer.

    :raise m2mgw.errors.ConfigError: a file is missing, unreadable, corrupt, or
        the key does not match the certificate.
    """
    cert_path, key_path, ca_path = datadir.tls_paths
    key, chain = _load_pair(cert_path, key_path, "gateway TLS")
    authorities = load_certificates(_read(ca_path, "application CA certificate"), ca_path)
    _warn_if_expiring(chain[0], cert_path, datadir.clock())
    options = _certificate_options(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        verify=True,
        caCerts=[X509.from_cryptography(c) for c in authorities],
        requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    _check_context(options, cert_path)
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    Server TLS settings that can be replaced while the listener runs
    (certificate renewal on SIGHUP, no restart): every new connection is
    set up with the settings current when it arrives; connections already
    open keep theirs, and the listening socket is never closed.

    :param load: builds the settings (e.g. ``lambda:
        app_server_tls_options(datadir)``); called now and by :meth:`reload`.
    :raise m2mgw.errors.ConfigError: the first load failed.
    """

    def __init__(self, load: Callable[[], CertificateOptions]) -> None:
        self._load = load
        #: The settings new connections get.
        self.options = load()

    def reload(self) -> None:
        """
        Build the settings again (from the files as they are now) and use
        them for new connections.

        :raise m2mgw.errors.ConfigError: the files are unusable; the current
            settings stay.
        """
        self.options = self._load()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A TLS connection for a new client, with the current settings."""
        connection: SSL.Connection = self.options.serverConnectionForTLS(tlsProtocol)
        return connection


def _check_context(options: CertificateOptions, path: str) -> None:
    try:
        options.getContext()
    except Exception as e:  # pyOpenSSL raises OpenSSL.SSL.Error with a list of reasons
        raise ConfigError(f"OpenSSL refused the TLS settings from {path}: {e}") from None


def app_client_tls_options(
    cert_path: str, key_path: str, ca_cert_path: str, hostname: str = "localhost"
) -> IOpenSSLClientConnectionCreator:
    """
    Client options for an application server: present the client certificate
    and verify the gateway's certificate against the CA in ``ca_cert_path``
    and ``hostname`` (a DNS name or an IP address).

    :raise m2mgw.errors.ConfigError: a file is missing, unreadable, corrupt, or
        the key does not match the certificate.
    """
    key, chain = _load_pair(cert_path, key_path, "client")
    authorities = load_certificates(_read(ca_cert_path, "CA certificate"), ca_cert_path)
    trust_root = trustRootFromCertificates(
        [Certificate(X509.from_cryptography(c)) for c in authorities]
    )
    extra: dict[str, Any] = {
        "privateKey": key,
        "certificate": chain[0],
        "extraCertChain": chain[1:],
        "raiseMinimumTo": TLSVersion.TLSv1_2,
    }
    try:
        return optionsForClientTLS(hostname, trust_root, extraCertificateOptions=extra)
    except ValueError as e:
        raise ConfigError(f"unusable TLS client settings: {e}") from None


def peer_principal(transport: Any) -> str | None:
    """
    The application principal of a TLS connection: the common name of the
    verified client certificate, or ``None`` before the handshake, without a
    certificate, or when the name is not a valid principal.

    :param transport: a TLS transport (``getPeerCertificate()``).
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        peer = get()
    except Exception:  # not a TLS transport, or the handshake is not done
        return None
    if peer is None:
        return None
    certificate = peer.to_cryptography() if isinstance(peer, X509) else peer
    if not isinstance(certificate, x509.Certificate):
        return None
    name = certificate_common_name(certificate)
    if name is None or not is_valid_app_name(name):
        return None
    return name
