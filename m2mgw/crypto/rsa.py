"""
The ``rsa`` suite of MGP/1: RSA-OAEP key transport, RSA-PSS signatures,
HKDF-SHA-256 and AES-128-GCM.

- Key transport: the module draws a 32-byte ``Z_es`` and a 32-byte OAEP seed
  and sends ``epk`` = RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label) of
  ``Z_es`` under the server key.  The module side encodes EME-OAEP itself
  (RFC 8017 §7.1.1) so that a scripted seed reproduces the vectors; only the
  public operation is done with integers.  The gateway decrypts with
  ``cryptography`` (constant time) and requires exactly 32 bytes.
- Signatures: RSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt, verified by
  ``cryptography``.  Signing without a scripted source uses ``cryptography``;
  with one, EMSA-PSS is encoded here with the drawn salt (see :meth:`RSASuite.sign`).
- Keys: modulus 2048-3072 bits, exponent 65537, public keys as DER
  SubjectPublicKeyInfo.  New server and module keys are 2048 bits: with a
  2048-bit server key, a HELLO carrying a key registration (2048-bit module
  keys) is 1442 bytes, under the 1472-byte datagram limit; a 3072-bit server
  key would add 128 bytes of ``epk`` and not fit.
"""

from __future__ import annotations

import hashlib
import math
import secrets

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.plugin import IPlugin
from zope.interface import implementer

from m2mgw.crypto.primitives import (
    RSA_BITS_MAX,
    RSA_BITS_MIN,
    AeadAlgorithm,
    CipherSuiteBase,
    load_private_key,
    pkcs8_der,
    pkcs8_pem,
)
from m2mgw.crypto.randomness import system_random
from m2mgw.errors import BadKey, BadSignature, CryptoError, UnsupportedOperation
from m2mgw.interfaces import ICipherSuite, RandomSource

__all__ = ["RSA", "RSASuite", "RSAVerifier", "eme_oaep_encode", "emsa_pss_encode", "mgf1"]

PUBLIC_EXPONENT = 65537
#: Size of new server and module keys.
DEFAULT_KEY_BITS = 2048
#: Bytes of the transported ``Z_es``, of the OAEP seed and of the PSS salt.
SECRET_BYTES = 32
OAEP_SEED_BYTES = 32
PSS_SALT_BYTES = 32
#: Bytes a module draws for a new key, as the MGP/1 vectors do.  MGP/1 defines
#: no derivation of an RSA key from them, so the key itself comes from the
#: system source (see :meth:`RSASuite.generate_signing_key`).
KEY_MATERIAL_BYTES = 32
#: A DER SubjectPublicKeyInfo of an RSA-3072 key is 422 bytes.
MAX_PUBLIC_KEY_BYTES = 1024

_H_LEN = 32
_EMPTY_LABEL_HASH = hashlib.sha256(b"").digest()
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_BYTES)
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def mgf1(seed: bytes, length: int) -> bytes:
    """MGF1 with SHA-256 (RFC 8017 B.2.1)."""
    blocks = (length + _H_LEN - 1) // _H_LEN
    stream = b"".join(
        hashlib.sha256(seed + counter.to_bytes(4, "big")).digest() for counter in range(blocks)
    )
    return stream[:length]


def eme_oaep_encode(message: bytes, seed: bytes, k: int) -> bytes:
    """
    EME-OAEP encoding (RFC 8017 §7.1.1 step 2) with SHA-256, MGF1-SHA-256 and
    the empty label.

    :param seed: ``hLen`` (32) random bytes.
    :param k: the modulus length in bytes.
    :raise m2mgw.errors.CryptoError: the message is too long or the seed not 32 bytes.
    """
    if len(seed) != _H_LEN:
        raise CryptoError("the OAEP seed has 32 bytes")
    if len(message) > k - 2 * _H_LEN - 2:
        raise CryptoError("message too long for RSA-OAEP")
    padding_string = bytes(k - len(message) - 2 * _H_LEN - 2)
    data_block = _EMPTY_LABEL_HASH + padding_string + b"\x01" + message
    masked_db = _xor(data_block, mgf1(seed, k - _H_LEN - 1))
    masked_seed = _xor(seed, mgf1(masked_db, _H_LEN))
    return b"\x00" + masked_seed + masked_db


def emsa_pss_encode(message: bytes, salt: bytes, em_bits: int) -> bytes:
    """
    EMSA-PSS encoding (RFC 8017 §9.1.1) with SHA-256 and MGF1-SHA-256.

    :param em_bits: the modulus length in bits minus one.
    :raise m2mgw.errors.CryptoError: the modulus is too small for the salt.
    """
    em_len = (em_bits + 7) // 8
    if em_len < _H_LEN + len(salt) + 2:
        raise CryptoError("modulus too small for RSA-PSS with this salt")
    m_hash = hashlib.sha256(message).digest()
    h = hashlib.sha256(bytes(8) + m_hash + salt).digest()
    data_block = bytes(em_len - len(salt) - _H_LEN - 2) + b"\x01" + salt
    masked_db = bytearray(_xor(data_block, mgf1(h, em_len - _H_LEN - 1)))
    masked_db[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked_db) + h + b"\xbc"


def _check_size(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, e: int) -> None:
    if not RSA_BITS_MIN <= key.key_size <= RSA_BITS_MAX:
        raise BadKey(
            f"RSA modulus of {key.key_size} bits; MGP/1 needs {RSA_BITS_MIN} to {RSA_BITS_MAX}"
        )
    if e != PUBLIC_EXPONENT:
        raise BadKey(f"RSA public exponent must be {PUBLIC_EXPONENT}")


def _private_key(key: object) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadKey("not an RSA private key")
    _check_size(key, key.public_key().public_numbers().e)
    return key


def _public_key(data: bytes) -> rsa.RSAPublicKey:
    if len(data) > MAX_PUBLIC_KEY_BYTES:
        raise BadKey("RSA public key data too large")
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadKey("not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("not an RSA public key")
    _check_size(key, key.public_numbers().e)
    return key


def _spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _blinded_private_op(key: rsa.RSAPrivateKey, m: int) -> int:
    """
    ``m ** d mod n`` with CRT, for a PSS signature with a chosen salt.

    Side channels: Python integers are not constant time, so this runs with
    base blinding (``m·r^e``, fresh ``r`` per call, so the exponentiations see
    inputs an observer cannot choose or predict) and exponent blinding
    (``d_p + k·(p-1)`` with a fresh 64-bit ``k``, so the exponent bits differ
    per call).  That defeats remote timing attacks of the Kocher/Brumley-Boneh
    kind, but not a local attacker watching caches or power: use
    ``random=None`` (OpenSSL's constant-time code) wherever reproducibility
    is not needed.  The result is checked with the public key before it is
    released (CRT fault attacks).
    """
    numbers = key.private_numbers()
    public = numbers.public_numbers
    n, e = public.n, public.e
    p, q = numbers.p, numbers.q
    while True:
        r = secrets.randbelow(n - 3) + 2
        if math.gcd(r, n) == 1:
            break
    blinded = m * pow(r, e, n) % n
    dp = numbers.dmp1 + secrets.randbits(64) * (p - 1)
    dq = numbers.dmq1 + secrets.randbits(64) * (q - 1)
    s_p = pow(blinded % p, dp, p)
    s_q = pow(blinded % q, dq, q)
    h = numbers.iqmp * (s_p - s_q) % p
    s = (s_q + h * q) * pow(r, -1, n) % n
    if pow(s, e, n) != m:
        raise CryptoError("RSA signature failed its self-check")
    return s


@implementer(IPlugin, ICipherSuite)
class RSASuite(CipherSuiteBase):
    """
    MGP/1 suite ``rsa``: one RSA key pair per ``skid`` for OAEP key transport
    and PSS signatures; module keys are RSA too.
    """

    supports_sdh = False
    params_have_rsa_bits = True

    def __init__(self, key_bits: int = DEFAULT_KEY_BITS) -> None:
        super().__init__(
            "rsa",
            hash_name="SHA-256",
            aead=AeadAlgorithm("AES-GCM", 16, 12, 16),
            curve=None,
            signature_len=key_bits // 8,
        )
        self.key_bits = key_bits

    def _generate(self) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=self.key_bits)

    # -- server key pairs ------------------------------------------------------

    def generate_server_key(self) -> rsa.RSAPrivateKey:
        """A fresh RSA key pair of :attr:`key_bits` (2048) bits, exponent 65537."""
        return self._generate()

    def dump_server_key(self, key: object) -> bytes:
        """The key pair as unencrypted PKCS#8 PEM."""
        return pkcs8_pem(_private_key(key))

    def load_server_key(self, data: bytes) -> rsa.RSAPrivateKey:
        """
        Parse a PKCS#8 (PEM or DER) RSA key of 2048-3072 bits, exponent 65537.

        :raise m2mgw.errors.BadKey: not such a key.
        """
        return _private_key(load_private_key(data))

    def server_public(self, key: object) -> tuple[bytes, None]:
        """``(DER SubjectPublicKeyInfo, None)``."""
        return _spki(_private_key(key)), None

    # -- key transport ------------------------------------------------------------

    def agree(self, server_key: object, epk: bytes) -> bytes:
        """
        ``Z_es``: the OAEP decryption of ``epk`` with the server key.

        :raise m2mgw.errors.CryptoError: ``epk`` is not a ciphertext of the
            modulus size, does not decrypt, or does not hold 32 bytes.
        """
        key = _private_key(server_key)
        if len(epk) != (key.key_size + 7) // 8:
            raise CryptoError("RSA epk must have the size of the modulus")
        try:
            z_es = key.decrypt(epk, _OAEP)
        except ValueError:
            raise CryptoError("RSA-OAEP decryption failed") from None
        if len(z_es) != SECRET_BYTES:
            raise CryptoError("RSA-OAEP did not transport 32 bytes")
        return z_es

    def encapsulate(self, server_public: bytes, random: RandomSource) -> tuple[bytes, bytes]:
        """
        Draw ``Z_es`` (32 bytes), then the OAEP seed (32 bytes), and encrypt
        ``Z_es`` under ``server_public``.

        :return: ``(epk, Z_es)``.
        :raise m2mgw.errors.BadKey: ``server_public`` is not an acceptable RSA key.
        """
        public = _public_key(server_public).public_numbers()
        k = (public.n.bit_length() + 7) // 8
        z_es = random(SECRET_BYTES)
        encoded = eme_oaep_encode(z_es, random(OAEP_SEED_BYTES), k)
        # RSAEP with public data only (the secret is inside ``encoded``, but
        # the exponent is public, so integer timing reveals nothing of it).
        epk = pow(int.from_bytes(encoded, "big"), public.e, public.n).to_bytes(k, "big")
        return epk, z_es

    def static_agree(self, private_key: object, peer_public: bytes) -> bytes:
        """
        :raise m2mgw.errors.UnsupportedOperation: always; ``rsa`` has no SDH.
        """
        raise UnsupportedOperation("suite rsa has no SDH authentication")

    # -- signatures ----------------------------------------------------------------

    def generate_signing_key(self, random: RandomSource | None = None) -> rsa.RSAPrivateKey:
        """
        A 2048-bit RSA module key from the system source.  With ``random``,
        32 bytes are drawn first (the vectors' ``key_material``) so that the
        draws that follow line up with a script; MGP/1 defines no derivation
        of an RSA key, so they do not determine the key.
        """
        if random is not None:
            random(KEY_MATERIAL_BYTES)
        return self._generate()

    def load_signing_key(self, data: bytes) -> rsa.RSAPrivateKey:
        """
        Parse a PKCS#8 (DER or PEM) RSA key of 2048-3072 bits, exponent 65537.

        :raise m2mgw.errors.BadKey: not such a key.
        """
        return _private_key(load_private_key(data))

    def dump_signing_key(self, key: object) -> bytes:
        """The module key as unencrypted PKCS#8 DER."""
        return pkcs8_der(_private_key(key))

    def signing_public(self, key: object) -> bytes:
        """The DER SubjectPublicKeyInfo of a module or server key."""
        return _spki(_private_key(key))

    def sign(self, private_key: object, data: bytes, random: RandomSource | None = None) -> bytes:
        """
        RSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt).

        Without ``random`` (or with :func:`~m2mgw.crypto.randomness.system_random`)
        ``cryptography`` signs, with a salt from OpenSSL's generator.  With
        another source, the salt is drawn from it and the private operation
        is done here (``cryptography`` cannot sign with a chosen salt), with
        blinding; see :func:`_blinded_private_op` for its side-channel limits.

        :raise m2mgw.errors.BadKey: not an acceptable RSA private key.
        """
        key = _private_key(private_key)
        if random is None or random is system_random:
            return key.sign(data, _PSS, hashes.SHA256())
        encoded = emsa_pss_encode(data, random(PSS_SALT_BYTES), key.key_size - 1)
        signature = _blinded_private_op(key, int.from_bytes(encoded, "big"))
        return signature.to_bytes((key.key_size + 7) // 8, "big")

    def verify(self, public_key: bytes, signature: bytes, data: bytes) -> None:
        """
        Check an RSA-PSS signature with a 32-byte salt.

        :raise m2mgw.errors.BadSignature: it does not verify or has the wrong length.
        :raise m2mgw.errors.BadKey: ``public_key`` is not acceptable.
        """
        self.verifier(public_key).verify(signature, data)

    def verifier(self, public_key: bytes) -> RSAVerifier:
        """
        ``public_key`` parsed and checked once, to check many signatures
        (:meth:`verify` without parsing the key again).

        :raise m2mgw.errors.BadKey: ``public_key`` is not acceptable.
        """
        return RSAVerifier(_public_key(public_key))

    def validate_public_key(self, public_key: bytes) -> None:
        """
        :raise m2mgw.errors.BadKey: not a DER SubjectPublicKeyInfo RSA key of
            2048-3072 bits with exponent 65537.
        """
        _public_key(public_key)


class RSAVerifier:
    """An accepted RSA public key that checks RSA-PSS signatures as :meth:`RSASuite.verify`."""

    __slots__ = ("_public",)

    def __init__(self, public: rsa.RSAPublicKey) -> None:
        self._public = public

    def verify(self, signature: bytes, data: bytes) -> None:
        """
        Check an RSA-PSS signature (32-byte salt) of ``data``.

        :raise m2mgw.errors.BadSignature: it does not verify or has the wrong length.
        """
        public = self._public
        if len(signature) != (public.key_size + 7) // 8:
            raise BadSignature("an RSA signature has the size of the modulus")
        try:
            public.verify(signature, data, _PSS, hashes.SHA256())
        except InvalidSignature:
            raise BadSignature("RSA-PSS signature does not verify") from None


#: The ``rsa`` suite (2048-bit keys generated).
RSA = RSASuite()
