"""
The NIST elliptic-curve suites of MGP/1: ``p256``, ``p256-ccm8`` and ``p384``.

One class, :class:`ECSuite`, three instances.  Public keys are SEC1 points:
compressed and uncompressed are accepted, hybrid (``0x06``/``0x07``), the
identity and points off the curve are refused.  ECDH yields the x-coordinate;
signatures are ECDSA with the suite's hash, RFC 6979 deterministic nonces, as
the fixed-length raw ``r || s``.  A private key derived from random material
(ephemeral keys, module keys) takes ``field size + 8`` bytes and reduces them
as ``d = m mod (n - 1) + 1`` (FIPS 186-5 A.2.1), as the MGP/1 vectors do.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from m2mgw.crypto.primitives import (
    AeadAlgorithm,
    CipherSuiteBase,
    hash_algorithm,
    load_private_key,
    pkcs8_der,
    pkcs8_pem,
)
from m2mgw.errors import BadKey, BadPoint, BadSignature
from m2mgw.interfaces import ICipherSuite, RandomSource

__all__ = ["P256", "P256_CCM8", "P384", "ECSuite", "ECVerifier", "NamedCurve", "compress_point"]

#: Bytes drawn beyond the field size when deriving a private key (FIPS 186-5 A.2.1).
EXTRA_RANDOM_BYTES = 8


@dataclass(frozen=True)
class NamedCurve:
    """
    A NIST curve as MGP/1 uses it.

    :ivar name: the Params/ICipherSuite name (``"P-256"``).
    :ivar order: the group order ``n``.
    :ivar field_len: bytes of a field element (and of ``r``, ``s`` and ``Z``).
    """

    name: str
    curve_class: type[ec.EllipticCurve]
    order: int
    field_len: int

    @property
    def material_len(self) -> int:
        """Random bytes drawn to derive one private key."""
        return self.field_len + EXTRA_RANDOM_BYTES

    def new_curve(self) -> ec.EllipticCurve:
        """A ``cryptography`` curve object."""
        return self.curve_class()

    def decode_point(self, data: bytes) -> ec.EllipticCurvePublicKey:
        """
        A SEC1 compressed or uncompressed point of this curve.

        :raise m2mgw.errors.BadPoint: wrong length or prefix (hybrid, the
            identity), or not on the curve.
        """
        if not data:
            raise BadPoint("empty point")
        prefix = data[0]
        if prefix in (0x06, 0x07):
            raise BadPoint("hybrid points are not accepted")
        if prefix in (0x02, 0x03):
            expected = 1 + self.field_len
        elif prefix == 0x04:
            expected = 1 + 2 * self.field_len
        else:
            raise BadPoint(f"not a SEC1 point of {self.name} (prefix 0x{prefix:02x})")
        if len(data) != expected:
            raise BadPoint(f"a {self.name} point with prefix 0x{prefix:02x} has {expected} bytes")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(self.new_curve(), data)
        except ValueError:
            raise BadPoint(f"not a point on {self.name}") from None

    def derive_private_key(self, material: bytes) -> ec.EllipticCurvePrivateKey:
        """``d = int(material) mod (n - 1) + 1`` as a private key of this curve."""
        d = int.from_bytes(material, "big") % (self.order - 1) + 1
        return ec.derive_private_key(d, self.new_curve())


P256_CURVE = NamedCurve(
    "P-256",
    ec.SECP256R1,
    0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    32,
)
P384_CURVE = NamedCurve(
    "P-384",
    ec.SECP384R1,
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
    48,
)


def compress_point(point: bytes) -> bytes:
    """
    The SEC1 compressed form ``02/03 || x`` of an uncompressed point
    ``04 || x || y`` (MGP/1 §3: receivers accept both).  Only the encoding
    changes: the point was valid, it stays so.

    :raise ValueError: ``point`` is not an uncompressed SEC1 point.
    """
    if not point or point[0] != 0x04 or len(point) % 2 != 1:
        raise ValueError("not an uncompressed SEC1 point")
    half = (len(point) - 1) // 2
    return bytes((0x02 | (point[-1] & 1),)) + point[1 : 1 + half]


def _uncompressed(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@implementer(IPlugin, ICipherSuite)
class ECSuite(CipherSuiteBase):
    """
    An MGP/1 suite on a NIST curve: ECDH, ECDSA, HKDF and one AEAD.

    In these suites one key pair per ``skid`` serves both ECDH and ECDSA, so
    a server key and a module key are both an
    :class:`~cryptography.hazmat.primitives.asymmetric.ec.EllipticCurvePrivateKey`
    of the suite's curve.
    """

    supports_sdh = True

    def __init__(
        self, name: str, named_curve: NamedCurve, *, hash_name: str, aead: AeadAlgorithm
    ) -> None:
        super().__init__(
            name,
            hash_name=hash_name,
            aead=aead,
            curve=named_curve.name,
            signature_len=2 * named_curve.field_len,
        )
        self.named_curve = named_curve
        self._ecdsa = ec.ECDSA(hash_algorithm(hash_name), deterministic_signing=True)

    def _private_key(self, key: object) -> ec.EllipticCurvePrivateKey:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, self.named_curve.curve_class
        ):
            raise BadKey(f"not a {self.named_curve.name} private key")
        return key

    def _ecdh(self, private_key: object, peer_public: bytes) -> bytes:
        own = self._private_key(private_key)
        peer = self.named_curve.decode_point(peer_public)
        try:
            return own.exchange(ec.ECDH(), peer)
        except ValueError:
            raise BadPoint("ECDH failed on this point") from None

    # -- server key pairs ------------------------------------------------------

    def generate_server_key(self) -> ec.EllipticCurvePrivateKey:
        """A fresh key pair of the suite's curve from the system source."""
        return ec.generate_private_key(self.named_curve.new_curve())

    def dump_server_key(self, key: object) -> bytes:
        """The key pair as unencrypted PKCS#8 PEM."""
        return pkcs8_pem(self._private_key(key))

    def load_server_key(self, data: bytes) -> ec.EllipticCurvePrivateKey:
        """
        Parse a PKCS#8 (PEM or DER) key of the suite's curve.

        :raise m2mgw.errors.BadKey: not such a key.
        """
        return self._private_key(load_private_key(data))

    def server_public(self, key: object) -> tuple[bytes, None]:
        """``(uncompressed SEC1 point, None)``."""
        return _uncompressed(self._private_key(key).public_key()), None

    # -- key agreement -----------------------------------------------------------

    def agree(self, server_key: object, epk: bytes) -> bytes:
        """
        ``Z_es``: the x-coordinate of ECDH(server key, ``epk``).

        :raise m2mgw.errors.BadPoint: ``epk`` is not a valid point.
        :raise m2mgw.errors.BadKey: ``server_key`` is not a key of this suite.
        """
        return self._ecdh(server_key, epk)

    def encapsulate(self, server_public: bytes, random: RandomSource) -> tuple[bytes, bytes]:
        """
        Draw ``field size + 8`` bytes for the ephemeral key and agree with
        ``server_public``.

        :return: ``(epk as an uncompressed point, Z_es)``.
        :raise m2mgw.errors.BadPoint: ``server_public`` is not a valid point.
        """
        server = self.named_curve.decode_point(server_public)
        ephemeral = self.named_curve.derive_private_key(random(self.named_curve.material_len))
        z_es = ephemeral.exchange(ec.ECDH(), server)
        return _uncompressed(ephemeral.public_key()), z_es

    def static_agree(self, private_key: object, peer_public: bytes) -> bytes:
        """
        ``Z_ss`` for SDH: the x-coordinate of static-static ECDH.

        :raise m2mgw.errors.BadPoint: ``peer_public`` is not a valid point.
        :raise m2mgw.errors.BadKey: ``private_key`` is not a key of this suite.
        """
        return self._ecdh(private_key, peer_public)

    # -- signatures ----------------------------------------------------------------

    def generate_signing_key(
        self, random: RandomSource | None = None
    ) -> ec.EllipticCurvePrivateKey:
        """
        A module key of the suite's curve: from the system source, or derived
        from ``field size + 8`` bytes drawn from ``random``.
        """
        if random is None:
            return self.generate_server_key()
        return self.named_curve.derive_private_key(random(self.named_curve.material_len))

    def load_signing_key(self, data: bytes) -> ec.EllipticCurvePrivateKey:
        """
        Parse a PKCS#8 (DER or PEM) private key of the suite's curve.

        :raise m2mgw.errors.BadKey: not such a key.
        """
        return self._private_key(load_private_key(data))

    def dump_signing_key(self, key: object) -> bytes:
        """The module private key as unencrypted PKCS#8 DER."""
        return pkcs8_der(self._private_key(key))

    def signing_public(self, key: object) -> bytes:
        """The uncompressed SEC1 point of a module or server key."""
        return _uncompressed(self._private_key(key).public_key())

    def sign(self, private_key: object, data: bytes, random: RandomSource | None = None) -> bytes:
        """
        ECDSA with the suite's hash and RFC 6979 deterministic nonces, as raw
        ``r || s``.  ``random`` is not used: the nonce is deterministic.

        :raise m2mgw.errors.BadKey: not a private key of this suite.
        """
        der = self._private_key(private_key).sign(data, self._ecdsa)
        r, s = decode_dss_signature(der)
        size = self.named_curve.field_len
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    def verify(self, public_key: bytes, signature: bytes, data: bytes) -> None:
        """
        Check a raw ``r || s`` ECDSA signature.

        :raise m2mgw.errors.BadSignature: it does not verify or has the wrong length.
        :raise m2mgw.errors.BadPoint: ``public_key`` is not a valid point.
        """
        self.verifier(public_key).verify(signature, data)

    def verifier(self, public_key: bytes) -> ECVerifier:
        """
        ``public_key`` decoded and validated once, to check many signatures
        (:meth:`verify` without decoding the point again).

        :raise m2mgw.errors.BadPoint: ``public_key`` is not a valid point.
        """
        return ECVerifier(self, self.named_curve.decode_point(public_key))

    def _verify_with(
        self, public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes
    ) -> None:
        size = self.named_curve.field_len
        if len(signature) != 2 * size:
            raise BadSignature(f"a {self.name} signature has {2 * size} bytes")
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        try:
            public.verify(encode_dss_signature(r, s), data, self._ecdsa)
        except InvalidSignature:
            raise BadSignature("ECDSA signature does not verify") from None

    def validate_public_key(self, public_key: bytes) -> None:
        """
        :raise m2mgw.errors.BadPoint: ``public_key`` is not a valid point of the curve.
        """
        self.named_curve.decode_point(public_key)


class ECVerifier:
    """
    A public key of an :class:`ECSuite`, decoded and validated (a point of
    the suite's curve), that checks signatures as :meth:`ECSuite.verify`.
    """

    __slots__ = ("_public", "_suite")

    def __init__(self, suite: ECSuite, public: ec.EllipticCurvePublicKey) -> None:
        self._suite = suite
        self._public = public

    def verify(self, signature: bytes, data: bytes) -> None:
        """
        Check a raw ``r || s`` ECDSA signature of ``data``.

        :raise m2mgw.errors.BadSignature: it does not verify or has the wrong length.
        """
        self._suite._verify_with(self._public, signature, data)


#: The default suite: P-256, AES-128-GCM.
P256 = ECSuite("p256", P256_CURVE, hash_name="SHA-256", aead=AeadAlgorithm("AES-GCM", 16, 12, 16))
#: The lean suite: P-256, AES-128-CCM with an 8-byte tag and a 13-byte nonce.
P256_CCM8 = ECSuite(
    "p256-ccm8", P256_CURVE, hash_name="SHA-256", aead=AeadAlgorithm("AES-CCM", 16, 13, 8)
)
#: P-384, SHA-384, AES-256-GCM.
P384 = ECSuite("p384", P384_CURVE, hash_name="SHA-384", aead=AeadAlgorithm("AES-GCM", 32, 12, 16))
