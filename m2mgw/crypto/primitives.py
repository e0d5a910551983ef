"""
What every MGP/1 cipher suite shares: HKDF, HMAC, the AEADs, PKCS#8 key
(de)serialisation and the check of a Params map (MGP/1 §9).

:class:`CipherSuiteBase` holds the symmetric half of
:class:`~m2mgw.interfaces.ICipherSuite` (KDF, MAC, AEAD, Params); the suite
classes of :mod:`m2mgw.crypto.ec`, :mod:`m2mgw.crypto.x25519` and
:mod:`m2mgw.crypto.rsa` add the public-key half.  Every ``cryptography``
exception is translated to :mod:`m2mgw.errors` here.
"""

from __future__ import annotations

import hmac as hmac_module
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from m2mgw.crypto.curves import validate_weierstrass
from m2mgw.errors import BadKey, BadParameters, BadTag, CryptoError

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "AeadAlgorithm",
    "CipherSuiteBase",
    "KeyedAead",
    "Verifier",
    "check_params",
    "hash_algorithm",
    "hkdf",
    "hkdf_expand",
    "hkdf_extract",
    "hmac_digest",
    "load_private_key",
    "pkcs8_der",
    "pkcs8_pem",
]

#: The largest key file :func:`load_private_key` parses (an RSA-3072 PEM is ~2.5 KiB).
MAX_KEY_FILE_BYTES = 64 * 1024

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
}
_HASHLIB_NAMES = {"SHA-256": "sha256", "SHA-384": "sha384"}


def hash_algorithm(hash_name: str) -> hashes.HashAlgorithm:
    """
    The ``cryptography`` hash object for an MGP/1 hash name.

    :param hash_name: ``"SHA-256"`` or ``"SHA-384"``.
    :raise m2mgw.errors.CryptoError: another name.
    """
    try:
        return _HASHES[hash_name]()
    except KeyError:
        raise CryptoError(f"unsupported hash {hash_name!r}") from None


def _hashlib_name(hash_name: str) -> str:
    try:
        return _HASHLIB_NAMES[hash_name]
    except KeyError:
        raise CryptoError(f"unsupported hash {hash_name!r}") from None


def hmac_digest(hash_name: str, key: bytes, data: bytes) -> bytes:
    """
    HMAC (RFC 2104) of ``data`` under ``key`` with the named hash.

    :raise m2mgw.errors.CryptoError: unsupported hash.
    """
    return hmac_module.digest(key, data, _hashlib_name(hash_name))


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """
    RFC 5869 HKDF-Extract: ``HMAC(salt, ikm)`` (an empty salt acts as
    ``HashLen`` zero bytes, as the RFC requires, since HMAC zero-pads its key).
    """
    return hmac_digest(hash_name, salt, ikm)


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """
    RFC 5869 HKDF-Expand.

    :raise m2mgw.errors.CryptoError: ``length`` is not in 1..255·HashLen, or
        ``prk`` is shorter than HashLen.
    """
    algorithm = hash_algorithm(hash_name)
    if not 1 <= length <= 255 * algorithm.digest_size:
        raise CryptoError(f"HKDF-Expand cannot produce {length} bytes")
    if len(prk) < algorithm.digest_size:
        raise CryptoError("HKDF-Expand needs a PRK of at least HashLen bytes")
    return HKDFExpand(algorithm, length, info).derive(prk)


def hkdf(hash_name: str, salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF: Extract then Expand."""
    return hkdf_expand(hash_name, hkdf_extract(hash_name, salt, ikm), info, length)


# -- AEAD -------------------------------------------------------------------------

_AEAD_KINDS = ("AES-GCM", "AES-CCM", "ChaCha20-Poly1305")


@dataclass(frozen=True)
class AeadAlgorithm:
    """
    One AEAD of MGP/1 §3 with its sizes, sealing and opening per RFC 5116.

    :ivar kind: ``"AES-GCM"``, ``"AES-CCM"`` or ``"ChaCha20-Poly1305"``.
    """

    kind: str
    key_len: int
    nonce_len: int
    tag_len: int

    def __post_init__(self) -> None:
        if self.kind not in _AEAD_KINDS:
            raise ValueError(f"unknown AEAD {self.kind!r}")

    def _cipher(self, key: bytes, nonce: bytes) -> AESGCM | AESCCM | ChaCha20Poly1305:
        if len(key) != self.key_len:
            raise CryptoError(f"{self.kind} needs a {self.key_len}-byte key, got {len(key)}")
        if len(nonce) != self.nonce_len:
            raise CryptoError(f"{self.kind} needs a {self.nonce_len}-byte nonce, got {len(nonce)}")
        if self.kind == "AES-GCM":
            return AESGCM(key)
        if self.kind == "AES-CCM":
            return AESCCM(key, tag_length=self.tag_len)
        return ChaCha20Poly1305(key)

    def seal(self, key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """
        Encrypt and authenticate; the ciphertext followed by the tag.

        :raise m2mgw.errors.CryptoError: wrong key or nonce size, or a
            plaintext too long for the algorithm.
        """
        cipher = self._cipher(key, nonce)
        try:
            return cipher.encrypt(nonce, plaintext, aad)
        except (ValueError, OverflowError) as e:
            raise CryptoError(f"{self.kind} encryption failed: {e}") from None

    def open(self, key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        """
        Check and decrypt.

        :raise m2mgw.errors.BadTag: authentication failed, or ``ciphertext``
            is shorter than the tag.
        :raise m2mgw.errors.CryptoError: wrong key or nonce size.
        """
        cipher = self._cipher(key, nonce)
        if len(ciphertext) < self.tag_len:
            raise BadTag("ciphertext shorter than the tag")
        try:
            return cipher.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise BadTag("authentication failed") from None
        except (ValueError, OverflowError) as e:
            raise CryptoError(f"{self.kind} decryption failed: {e}") from None

    def keyed(self, key: bytes) -> KeyedAead:
        """
        This AEAD with ``key`` set up once, for the many messages of a session.

        :raise m2mgw.errors.CryptoError: wrong key size.
        """
        return KeyedAead(self, key)


class KeyedAead:
    """
    An :class:`AeadAlgorithm` with its key set up (``cryptography``'s cipher
    object, built once): :meth:`seal` and :meth:`open` as the algorithm's,
    without the key.

    :raise m2mgw.errors.CryptoError: wrong key size.
    """

    __slots__ = ("_cipher", "_kind", "_nonce_len", "_tag_len")

    def __init__(self, algorithm: AeadAlgorithm, key: bytes) -> None:
        self._cipher = algorithm._cipher(key, bytes(algorithm.nonce_len))
        self._kind = algorithm.kind
        self._nonce_len = algorithm.nonce_len
        self._tag_len = algorithm.tag_len

    def seal(self, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """
        Encrypt and authenticate, as :meth:`AeadAlgorithm.seal`.

        :raise m2mgw.errors.CryptoError: wrong nonce size, or a plaintext too long.
        """
        if len(nonce) != self._nonce_len:
            raise CryptoError(f"{self._kind} needs a {self._nonce_len}-byte nonce")
        try:
            return self._cipher.encrypt(nonce, plaintext, aad)
        except (ValueError, OverflowError) as e:
            raise CryptoError(f"{self._kind} encryption failed: {e}") from None

    def open(self, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        """
        Check and decrypt, as :meth:`AeadAlgorithm.open`.

        :raise m2mgw.errors.BadTag: authentication failed, or ``ciphertext``
            is shorter than the tag.
        :raise m2mgw.errors.CryptoError: wrong nonce size.
        """
        if len(nonce) != self._nonce_len:
            raise CryptoError(f"{self._kind} needs a {self._nonce_len}-byte nonce")
        if len(ciphertext) < self._tag_len:
            raise BadTag("ciphertext shorter than the tag")
        try:
            return self._cipher.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise BadTag("authentication failed") from None
        except (ValueError, OverflowError) as e:
            raise CryptoError(f"{self._kind} decryption failed: {e}") from None


# -- key files ----------------------------------------------------------------------


def load_private_key(data: bytes) -> PrivateKeyTypes:
    """
    Parse an unencrypted private key: PKCS#8 PEM or DER (a PEM file may also
    hold a traditional SEC1/PKCS#1 key).  The caller checks its type.

    :raise m2mgw.errors.BadKey: too large, encrypted, malformed or of an
        algorithm ``cryptography`` does not know.
    """
    if len(data) > MAX_KEY_FILE_BYTES:
        raise BadKey("private key data too large")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadKey(f"not an unencrypted private key: {e.__class__.__name__}") from None


def pkcs8_der(key: PrivateKeyTypes) -> bytes:
    """A private key as unencrypted PKCS#8 DER."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pkcs8_pem(key: PrivateKeyTypes) -> bytes:
    """A private key as one unencrypted PKCS#8 PEM block."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- Params (MGP/1 §9) ----------------------------------------------------------------

RSA_BITS_MIN = 2048
RSA_BITS_MAX = 3072


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_params(
    params: Mapping[int, Any],
    *,
    suite_name: str,
    curve: str | None,
    hash_name: str,
    has_rsa_bits: bool,
    custom_curves: bool = False,
) -> None:
    """
    Validate a Params map for one suite (MGP/1 §9).  Unknown keys are
    ignored (forward compatibility).

    :param curve: the suite's curve name, ``None`` if it has none (RSA).
    :param has_rsa_bits: whether key ``4`` (``rsa_bits``) may appear.
    :param custom_curves: whether the suite supports custom curves (``3``
        eq); a custom curve is then validated completely
        (:func:`m2mgw.crypto.curves.validate_weierstrass`) and may not come
        with a named curve (``2``).
    :raise m2mgw.errors.BadParameters: with the first problem found.
    """
    if not isinstance(params, Mapping):
        raise BadParameters("Params must be a map")
    for key, what in ((1, "suite"), (5, "ttl"), (6, "seed"), (7, "kid"), (9, "pid")):
        if key not in params:
            raise BadParameters(f"Params lack the required {key} ({what})")
    if params[1] != suite_name:
        raise BadParameters(f"Params name suite {params[1]!r}, not {suite_name!r}")
    for key, what in ((5, "ttl"), (7, "kid"), (9, "pid")):
        if not _is_uint(params[key]):
            raise BadParameters(f"Params {key} ({what}) must be an unsigned integer")
    if params[7] < 1:
        raise BadParameters("Params 7 (kid) must be at least 1")
    seed = params[6]
    if not isinstance(seed, bytes) or not 16 <= len(seed) <= 32:
        raise BadParameters("Params 6 (seed) must be a byte string of 16 to 32 bytes")
    if 2 in params and (curve is None or params[2] != curve):
        raise BadParameters(f"curve {params[2]!r} is not the curve of suite {suite_name!r}")
    if 3 in params:
        if not custom_curves:
            raise BadParameters(f"custom curves not supported by suite {suite_name}")
        if 2 in params:
            raise BadParameters("Params give both a named curve (2) and a custom curve (3)")
        _check_custom_curve(params[3])
    if 4 in params:
        bits = params[4]
        if not has_rsa_bits:
            raise BadParameters(f"Params 4 (rsa_bits) does not apply to suite {suite_name!r}")
        if not _is_uint(bits) or not RSA_BITS_MIN <= bits <= RSA_BITS_MAX:
            raise BadParameters(
                f"Params 4 (rsa_bits) must be {RSA_BITS_MIN} to {RSA_BITS_MAX}, got {bits!r}"
            )
    if 8 in params and params[8] != hash_name:
        raise BadParameters(f"hash {params[8]!r} is not the hash of suite {suite_name!r}")


def _check_custom_curve(eq: object) -> None:
    """Validate Params ``3`` (eq), ``[p, a, b, gx, gy, n, h]``, completely."""
    if not isinstance(eq, (list, tuple)) or len(eq) != 7 or not all(_is_uint(x) for x in eq):
        raise BadParameters("Params 3 (eq) must be [p, a, b, gx, gy, n, h] of unsigned integers")
    validate_weierstrass(*eq)


# -- the symmetric half of a suite --------------------------------------------------------


class Verifier(Protocol):
    """A module's (or the server's) public key, ready to check signatures."""

    def verify(self, signature: bytes, data: bytes) -> None:
        """
        :raise m2mgw.errors.BadSignature: ``signature`` is not a valid
            signature of ``data`` under the key.
        """


class _SuiteVerifier:
    """:meth:`CipherSuiteBase.verifier` for a suite that does not load keys ahead."""

    __slots__ = ("_public_key", "_suite")

    def __init__(self, suite: Any, public_key: bytes) -> None:
        self._suite = suite
        self._public_key = public_key

    def verify(self, signature: bytes, data: bytes) -> None:
        self._suite.verify(self._public_key, signature, data)


class CipherSuiteBase:
    """
    The part of an :class:`~m2mgw.interfaces.ICipherSuite` that every suite
    shares: its attributes, HKDF and HMAC with the suite's hash, the AEAD and
    the Params check.  Subclasses add key agreement and signatures.
    """

    #: True if HELLO authentication method 3 (SDH) is offered.
    supports_sdh: bool = False
    #: True if Params may carry ``4`` (rsa_bits).
    params_have_rsa_bits: bool = False
    #: True if Params may carry ``3`` (eq), a custom curve, validated completely.
    supports_custom_curves: bool = False

    def __init__(
        self,
        name: str,
        *,
        hash_name: str,
        aead: AeadAlgorithm,
        curve: str | None,
        signature_len: int,
    ) -> None:
        hash_algorithm(hash_name)
        self.name = name
        self.hash_name = hash_name
        self.curve = curve
        self.signature_len = signature_len
        self.key_len = aead.key_len
        self.nonce_len = aead.nonce_len
        self.tag_len = aead.tag_len
        self._aead = aead

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def hkdf_extract(self, salt: bytes, ikm: bytes) -> bytes:
        """RFC 5869 HKDF-Extract with the suite's hash."""
        return hkdf_extract(self.hash_name, salt, ikm)

    def hkdf_expand(self, prk: bytes, info: bytes, length: int) -> bytes:
        """
        RFC 5869 HKDF-Expand with the suite's hash.

        :raise m2mgw.errors.CryptoError: ``length`` out of range or ``prk`` too short.
        """
        return hkdf_expand(self.hash_name, prk, info, length)

    def hmac(self, key: bytes, data: bytes) -> bytes:
        """HMAC with the suite's hash."""
        return hmac_digest(self.hash_name, key, data)

    def seal(self, key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """
        AEAD encryption; ciphertext followed by the tag (RFC 5116).

        :raise m2mgw.errors.CryptoError: wrong key or nonce size.
        """
        return self._aead.seal(key, nonce, aad, plaintext)

    def open(self, key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        """
        AEAD decryption.

        :raise m2mgw.errors.BadTag: authentication failed or ``ciphertext``
            shorter than the tag.
        :raise m2mgw.errors.CryptoError: wrong key or nonce size.
        """
        return self._aead.open(key, nonce, aad, ciphertext)

    def keyed_aead(self, key: bytes) -> KeyedAead:
        """
        The suite's AEAD with ``key`` set up once (for a session's many messages).

        :raise m2mgw.errors.CryptoError: wrong key size.
        """
        return self._aead.keyed(key)

    def verifier(self, public_key: bytes) -> Verifier:
        """
        A :class:`Verifier` for ``public_key``: its ``verify(signature, data)``
        is the suite's ``verify(public_key, signature, data)``.  Suites whose
        keys are costly to decode override this to decode (and validate) once.
        """
        return _SuiteVerifier(self, public_key)

    def check_params(self, params: Mapping[int, Any]) -> None:
        """
        Validate a Params map (MGP/1 §9) for this suite.  No shipped suite
        supports custom curves (``3`` eq); a subclass that sets
        :attr:`supports_custom_curves` gets them validated completely.

        :raise m2mgw.errors.BadParameters: with a reason a person can read.
        """
        check_params(
            params,
            suite_name=self.name,
            curve=self.curve,
            hash_name=self.hash_name,
            has_rsa_bits=self.params_have_rsa_bits,
            custom_curves=self.supports_custom_curves,
        )
