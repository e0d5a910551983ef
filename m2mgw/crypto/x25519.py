"""
The ``x25519`` suite of MGP/1: X25519 for ``epk``, Ed25519 signatures,
HKDF-SHA-256 and ChaCha20-Poly1305.

A server ``skid`` names two key pairs (:class:`X25519ServerKey`): X25519 for
key agreement and Ed25519 for signatures; module keys are Ed25519.  Keys are
the 32 raw bytes of RFC 7748 / RFC 8032.  An all-zero X25519 output (a
low-order ``epk``) is refused.  There is no SDH in this suite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from twisted.plugin import IPlugin
from zope.interface import implementer

from m2mgw.crypto.primitives import (
    AeadAlgorithm,
    CipherSuiteBase,
    load_private_key,
    pkcs8_der,
    pkcs8_pem,
)
from m2mgw.errors import BadKey, BadPoint, BadSignature, UnsupportedOperation
from m2mgw.interfaces import ICipherSuite, RandomSource

__all__ = ["X25519", "X25519ServerKey", "X25519Suite"]

#: Raw size of X25519 and Ed25519 keys, private and public; also the random draw.
KEY_BYTES = 32
SIGNATURE_BYTES = 64

_PEM_BLOCK = re.compile(rb"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----\s*", re.DOTALL)


@dataclass(frozen=True)
class X25519ServerKey:
    """The two key pairs one ``x25519`` ``skid`` names."""

    agreement: x25519.X25519PrivateKey = field(repr=False)
    signature: ed25519.Ed25519PrivateKey = field(repr=False)


def _raw_public(key: x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _x25519_public(data: bytes) -> x25519.X25519PublicKey:
    if len(data) != KEY_BYTES:
        raise BadPoint(f"an X25519 public key has {KEY_BYTES} bytes")
    return x25519.X25519PublicKey.from_public_bytes(data)


def _ed25519_public(data: bytes) -> ed25519.Ed25519PublicKey:
    if len(data) != KEY_BYTES:
        raise BadKey(f"an Ed25519 public key has {KEY_BYTES} bytes")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    except ValueError:
        raise BadKey("not an Ed25519 public key") from None


def _exchange(private_key: x25519.X25519PrivateKey, peer: x25519.X25519PublicKey) -> bytes:
    # OpenSSL refuses an all-zero shared secret (a low-order peer key); check
    # it here too, so that no backend can let one through.
    try:
        shared = private_key.exchange(peer)
    except ValueError:
        raise BadPoint("X25519 output is all zero (low-order point)") from None
    if not any(shared):
        raise BadPoint("X25519 output is all zero (low-order point)")
    return shared


@implementer(IPlugin, ICipherSuite)
class X25519Suite(CipherSuiteBase):
    """MGP/1 suite ``x25519``: X25519, Ed25519, HKDF-SHA-256, ChaCha20-Poly1305."""

    supports_sdh = False

    def __init__(self) -> None:
        super().__init__(
            "x25519",
            hash_name="SHA-256",
            aead=AeadAlgorithm("ChaCha20-Poly1305", 32, 12, 16),
            curve="Ed25519",
            signature_len=SIGNATURE_BYTES,
        )

    @staticmethod
    def _server_key(key: object) -> X25519ServerKey:
        if not isinstance(key, X25519ServerKey):
            raise BadKey("not an x25519 server key pair")
        return key

    @staticmethod
    def _signing_key(key: object) -> ed25519.Ed25519PrivateKey:
        if isinstance(key, X25519ServerKey):
            return key.signature
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise BadKey("not an Ed25519 private key")
        return key

    # -- server key pairs ------------------------------------------------------

    def generate_server_key(self) -> X25519ServerKey:
        """A fresh X25519 and Ed25519 pair from the system source."""
        return X25519ServerKey(
            x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        )

    def dump_server_key(self, key: object) -> bytes:
        """Two PKCS#8 PEM blocks: the X25519 key, then the Ed25519 key."""
        pair = self._server_key(key)
        return pkcs8_pem(pair.agreement) + pkcs8_pem(pair.signature)

    def load_server_key(self, data: bytes) -> X25519ServerKey:
        """
        Parse PEM holding exactly one X25519 and one Ed25519 private key, in
        either order (what :meth:`dump_server_key` writes).

        :raise m2mgw.errors.BadKey: anything else (a single DER key cannot
            hold both halves).
        """
        blocks = _PEM_BLOCK.findall(data) if data.lstrip().startswith(b"-----BEGIN") else []
        if len(blocks) != 2:
            raise BadKey("an x25519 server key is two PEM blocks: an X25519 and an Ed25519 key")
        agreement = signature = None
        for block in blocks:
            key = load_private_key(block)
            if isinstance(key, x25519.X25519PrivateKey) and agreement is None:
                agreement = key
            elif isinstance(key, ed25519.Ed25519PrivateKey) and signature is None:
                signature = key
        if agreement is None or signature is None:
            raise BadKey("an x25519 server key is one X25519 and one Ed25519 key")
        return X25519ServerKey(agreement, signature)

    def server_public(self, key: object) -> tuple[bytes, bytes]:
        """``(raw X25519 public key, raw Ed25519 public key)``."""
        pair = self._server_key(key)
        return _raw_public(pair.agreement), _raw_public(pair.signature)

    # -- key agreement -----------------------------------------------------------

    def agree(self, server_key: object, epk: bytes) -> bytes:
        """
        ``Z_es`` = X25519(server agreement key, ``epk``).

        :raise m2mgw.errors.BadPoint: ``epk`` is not 32 bytes or gives an all-zero output.
        """
        return _exchange(self._server_key(server_key).agreement, _x25519_public(epk))

    def encapsulate(self, server_public: bytes, random: RandomSource) -> tuple[bytes, bytes]:
        """
        Draw a 32-byte X25519 private key and agree with ``server_public``
        (the X25519 half of the server key).

        :return: ``(epk, Z_es)``.
        :raise m2mgw.errors.BadPoint: ``server_public`` is invalid or of low order.
        """
        server = _x25519_public(server_public)
        ephemeral = x25519.X25519PrivateKey.from_private_bytes(random(KEY_BYTES))
        return _raw_public(ephemeral), _exchange(ephemeral, server)

    def static_agree(self, private_key: object, peer_public: bytes) -> bytes:
        """
        :raise m2mgw.errors.UnsupportedOperation: always; ``x25519`` has no SDH.
        """
        raise UnsupportedOperation("suite x25519 has no SDH authentication")

    # -- signatures ----------------------------------------------------------------

    def generate_signing_key(self, random: RandomSource | None = None) -> ed25519.Ed25519PrivateKey:
        """An Ed25519 module key: from the system source, or 32 bytes of ``random`` as the seed."""
        if random is None:
            return ed25519.Ed25519PrivateKey.generate()
        return ed25519.Ed25519PrivateKey.from_private_bytes(random(KEY_BYTES))

    def load_signing_key(self, data: bytes) -> ed25519.Ed25519PrivateKey:
        """
        Parse a PKCS#8 (DER or PEM) Ed25519 private key.

        :raise m2mgw.errors.BadKey: not such a key.
        """
        key = load_private_key(data)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise BadKey("not an Ed25519 private key")
        return key

    def dump_signing_key(self, key: object) -> bytes:
        """The Ed25519 module key as unencrypted PKCS#8 DER."""
        return pkcs8_der(self._signing_key(key))

    def signing_public(self, key: object) -> bytes:
        """The raw Ed25519 public key of a module key or of a server pair's signature half."""
        return _raw_public(self._signing_key(key))

    def sign(self, private_key: object, data: bytes, random: RandomSource | None = None) -> bytes:
        """Ed25519 (deterministic; ``random`` is not used)."""
        return self._signing_key(private_key).sign(data)

    def verify(self, public_key: bytes, signature: bytes, data: bytes) -> None:
        """
        Check an Ed25519 signature.

        :raise m2mgw.errors.BadSignature: it does not verify or is not 64 bytes.
        :raise m2mgw.errors.BadKey: ``public_key`` is not an Ed25519 key.
        """
        public = _ed25519_public(public_key)
        if len(signature) != SIGNATURE_BYTES:
            raise BadSignature(f"an Ed25519 signature has {SIGNATURE_BYTES} bytes")
        try:
            public.verify(signature, data)
        except InvalidSignature:
            raise BadSignature("Ed25519 signature does not verify") from None

    def validate_public_key(self, public_key: bytes) -> None:
        """
        :raise m2mgw.errors.BadKey: not a 32-byte Ed25519 public key.
        """
        _ed25519_public(public_key)


#: The ``x25519`` suite.
X25519 = X25519Suite()
