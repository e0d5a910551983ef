"""
The MGP/1 key schedule and the byte strings that get signed or MACed
(spec §5, §6, §8, §8.2, §9), as pure functions.

Suite-dependent steps take an :class:`~m2mgw.interfaces.ICipherSuite`; what is
derived from a PSK uses HKDF-SHA-256 and HMAC-SHA-256 in every suite (§3).
The TBS and info structures are deterministic CBOR built with
:func:`m2mgw.protocol.cbor.encode` (the per-HELLO ones from their heads: the
same bytes, faster).  Compare MACs with :func:`verify_mac`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from m2mgw.crypto.primitives import hkdf, hmac_digest
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol.cbor import encode, encode_bytes, encode_text, head

__all__ = [
    "SDH_MAC_BYTES",
    "HelloKeys",
    "SessionKeys",
    "hello_auth_tbs",
    "hello_keys",
    "keyreg_tbs",
    "nonce_for_ctr",
    "psk_key",
    "psk_keyreg_key",
    "psk_keyreg_proof",
    "psk_mac",
    "reply_tbs",
    "sdh_key",
    "sdh_mac",
    "session_info",
    "session_keys",
    "skey_tbs",
    "verify_mac",
    "zero_nonce",
]

HELLO_SALT = b"MGP1 hello"
HELLO_KEY_INFO = b"MGP1 hello key"
HELLO_REPLY_KEY_INFO = b"MGP1 hello reply key"
PSK_SALT = b"MGP1 psk"
PSK_KEYREG_SALT = b"MGP1 psk keyreg"
SDH_SALT = b"MGP1 sdh"
SESSION_LABEL = "MGP1 session"
HELLO_AUTH_LABEL = "MGP1 hello auth"
HELLO_REPLY_LABEL = "MGP1 hello reply"
KEYREG_LABEL = "MGP1 keyreg"
SKEY_LABEL = "MGP1 skey"

#: The fixed first bytes of the structures above (array head and label), for
#: the per-HELLO ones built from their heads: the same bytes as :func:`encode`.
_SESSION_START = head(4, 4) + encode_text(SESSION_LABEL)
_HELLO_AUTH_START = head(4, 3) + encode_text(HELLO_AUTH_LABEL)
_HELLO_REPLY_START = head(4, 4) + encode_text(HELLO_REPLY_LABEL)
_MAX_UINT = (1 << 64) - 1

#: The hash of everything derived from a PSK, whatever the suite.
PSK_HASH = "SHA-256"
#: Length of ``k_psk``, ``k_sdh`` and the PSK key-registration key.
DERIVED_KEY_BYTES = 32
#: SDH ``auth`` values are the first 16 bytes of the HMAC.
SDH_MAC_BYTES = 16


@dataclass(frozen=True)
class HelloKeys:
    """The HELLO keys: ``PRK_hello``, ``k_hello`` (module to gateway) and ``k_hreply``."""

    prk: bytes = field(repr=False)
    k_hello: bytes = field(repr=False)
    k_hreply: bytes = field(repr=False)


@dataclass(frozen=True)
class SessionKeys:
    """A session's keys: ``PRK_s``, ``k_up`` (DATA) and ``k_down`` (DATA_REPLY)."""

    prk_s: bytes = field(repr=False)
    k_up: bytes = field(repr=False)
    k_down: bytes = field(repr=False)


def hello_keys(suite: ICipherSuite, z_es: bytes) -> HelloKeys:
    """
    ``PRK_hello = HKDF-Extract("MGP1 hello", Z_es)`` and the two HELLO keys.

    :param suite: the :class:`~m2mgw.interfaces.ICipherSuite` of the HELLO.
    """
    prk = suite.hkdf_extract(HELLO_SALT, z_es)
    return HelloKeys(
        prk=prk,
        k_hello=suite.hkdf_expand(prk, HELLO_KEY_INFO, suite.key_len),
        k_hreply=suite.hkdf_expand(prk, HELLO_REPLY_KEY_INFO, suite.key_len),
    )


def session_info(sid: bytes, module_id: str, kid: int) -> bytes:
    """The HKDF info of the session keys: ``CBOR ["MGP1 session", sid, id, kid]``."""
    if type(sid) is bytes and type(module_id) is str and type(kid) is int and 0 <= kid <= _MAX_UINT:
        return b"".join((_SESSION_START, encode_bytes(sid), encode_text(module_id), head(0, kid)))
    return encode([SESSION_LABEL, sid, module_id, kid])


def session_keys(
    suite: ICipherSuite, z_es: bytes, stok: bytes, sid: bytes, module_id: str, kid: int
) -> SessionKeys:
    """
    ``PRK_s = HKDF-Extract(stok, Z_es)``;
    ``k_up || k_down = HKDF-Expand(PRK_s, session_info, 2·key_len)``.

    :param kid: the module key of the HELLO (0 for PSK).
    """
    prk_s = suite.hkdf_extract(stok, z_es)
    okm = suite.hkdf_expand(prk_s, session_info(sid, module_id, kid), 2 * suite.key_len)
    return SessionKeys(prk_s=prk_s, k_up=okm[: suite.key_len], k_down=okm[suite.key_len :])


def hello_auth_tbs(aad: bytes, body: bytes) -> bytes:
    """What HELLO ``auth`` covers: ``CBOR ["MGP1 hello auth", AAD, body]``."""
    if type(aad) is bytes and type(body) is bytes:
        return b"".join((_HELLO_AUTH_START, encode_bytes(aad), encode_bytes(body)))
    return encode([HELLO_AUTH_LABEL, aad, body])


def psk_key(psk: bytes, epk: bytes) -> bytes:
    """``k_psk = HKDF-SHA-256(salt "MGP1 psk", ikm PSK, info epk, 32)``."""
    return hkdf(PSK_HASH, PSK_SALT, psk, epk, DERIVED_KEY_BYTES)


def psk_mac(psk: bytes, epk: bytes, tbs: bytes) -> bytes:
    """The PSK ``auth`` value: ``HMAC-SHA-256(k_psk, TBS)``, 32 bytes."""
    return hmac_digest(PSK_HASH, psk_key(psk, epk), tbs)


def sdh_key(suite: ICipherSuite, z_ss: bytes, epk: bytes) -> bytes:
    """``k_sdh = HKDF(salt "MGP1 sdh", ikm Z_ss, info epk, 32)`` with the suite's hash."""
    return suite.hkdf_expand(suite.hkdf_extract(SDH_SALT, z_ss), epk, DERIVED_KEY_BYTES)


def sdh_mac(suite: ICipherSuite, z_ss: bytes, epk: bytes, tbs: bytes) -> bytes:
    """The SDH ``auth`` value: the first 16 bytes of ``HMAC(k_sdh, TBS)`` (suite's hash)."""
    return suite.hmac(sdh_key(suite, z_ss, epk), tbs)[:SDH_MAC_BYTES]


def keyreg_tbs(module_id: str, kid: int, pub: bytes, suite_name: str, pid: int) -> bytes:
    """What a KeyReg's proof and pop cover: ``CBOR ["MGP1 keyreg", id, kid, pub, suite, pid]``."""
    return encode([KEYREG_LABEL, module_id, kid, pub, suite_name, pid])


def psk_keyreg_key(psk: bytes, module_id: str) -> bytes:
    """``HKDF-SHA-256(salt "MGP1 psk keyreg", ikm PSK, info id, 32)``."""
    return hkdf(PSK_HASH, PSK_KEYREG_SALT, psk, module_id.encode("utf-8"), DERIVED_KEY_BYTES)


def psk_keyreg_proof(psk: bytes, module_id: str, tbs_k: bytes) -> bytes:
    """A KeyReg proof vouched for by the PSK: ``HMAC-SHA-256(psk_keyreg_key, TBS_k)``."""
    return hmac_digest(PSK_HASH, psk_keyreg_key(psk, module_id), tbs_k)


def reply_tbs(hello_aad: bytes, reply_aad: bytes, body: bytes) -> bytes:
    """
    What a HELLO_REPLY signature covers:
    ``CBOR ["MGP1 hello reply", hello_aad, reply_aad, body]``.
    """
    if type(hello_aad) is bytes and type(reply_aad) is bytes and type(body) is bytes:
        parts = (encode_bytes(hello_aad), encode_bytes(reply_aad), encode_bytes(body))
        return b"".join((_HELLO_REPLY_START, *parts))
    return encode([HELLO_REPLY_LABEL, hello_aad, reply_aad, body])


def skey_tbs(skid: int, suite_name: str, pub: bytes, sig_pub: bytes | None) -> bytes:
    """
    What an ``"skey"`` instruction's signature covers:
    ``CBOR ["MGP1 skey", skid, suite, pub, sig_pub or null]``.
    """
    return encode([SKEY_LABEL, skid, suite_name, pub, sig_pub])


def nonce_for_ctr(suite: ICipherSuite, ctr: int) -> bytes:
    """
    The DATA / DATA_REPLY nonce: ``ctr`` as a ``nonce_len``-byte big-endian integer.

    :raise ValueError: ``ctr`` is below 1 or does not fit.
    """
    if ctr < 1:
        raise ValueError("ctr must be at least 1")
    try:
        return ctr.to_bytes(suite.nonce_len, "big")
    except OverflowError:
        raise ValueError("ctr does not fit in the nonce") from None


def zero_nonce(suite: ICipherSuite) -> bytes:
    """The HELLO and HELLO_REPLY nonce: ``nonce_len`` zero bytes."""
    return bytes(suite.nonce_len)


def verify_mac(expected: bytes, got: bytes) -> bool:
    """Compare two MACs in constant time."""
    return hmac.compare_digest(expected, got)
