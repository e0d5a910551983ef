"""
Checking what an operator provisions: module identities, PSKs, groups,
application names and module public keys.

Each function takes text or bytes as typed or read from a file and returns
the value the store records, or raises :class:`m2mgw.admin.OperatorError`
with one line saying what is wrong.  Nothing here touches a store.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from m2mgw.admin import OperatorError
from m2mgw.errors import CryptoError
from m2mgw.records import ModuleStatus
from m2mgw.tls import is_valid_app_name

__all__ = [
    "MAX_PUBLIC_KEY_FILE",
    "MODULE_ID_MAX_BYTES",
    "PSK_LENGTHS",
    "check_app_names",
    "check_group",
    "check_module_id",
    "parse_hex",
    "parse_kid",
    "parse_psk",
    "parse_public_key",
    "parse_status",
]

#: MGP/1 §4: an identity is 1-64 bytes of UTF-8.
MODULE_ID_MAX_BYTES = 64

#: MGP/1 §4: a PSK is 16-64 bytes.
PSK_LENGTHS = (16, 64)

#: The largest public key file read (a PEM RSA-3072 key is under 1 KiB).
MAX_PUBLIC_KEY_FILE = 64 * 1024

#: Largest ``kid`` accepted (CBOR uint, but keep it in SQLite's signed 64 bits).
MAX_KID = (1 << 63) - 1

_HEX = re.compile(r"[0-9A-Fa-f]*\Z")

#: The curve names ``cryptography`` gives the curves suites name.
_CURVES = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}


#: Unicode category Cc (C0, DEL, C1) and lone surrogates (Cs).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def check_module_id(module_id: str) -> str:
    """
    A module identity: 1-64 bytes of UTF-8 (MGP/1 §4), without control
    characters or leading/trailing white space (both are surely mistakes and
    would garble listings and logs).

    :raise m2mgw.admin.OperatorError: it is not acceptable.
    """
    try:
        raw = module_id.encode("utf-8")
    except UnicodeEncodeError:
        raise OperatorError("the module id is not valid UTF-8") from None
    if not 1 <= len(raw) <= MODULE_ID_MAX_BYTES:
        raise OperatorError(
            f"a module id is 1-{MODULE_ID_MAX_BYTES} bytes of UTF-8, not {len(raw)} bytes"
        )
    if _has_control(module_id):
        raise OperatorError(f"module id {module_id!r} contains a control character")
    if module_id != module_id.strip():
        raise OperatorError(f"module id {module_id!r} starts or ends with white space")
    return module_id


def parse_hex(text: str, what: str) -> bytes:
    """
    Bytes from hexadecimal text (upper or lower case, no separators).

    :param what: names the value in the error message.
    :raise m2mgw.admin.OperatorError: not an even number of hex digits.
    """
    if not _HEX.match(text) or len(text) % 2:
        raise OperatorError(f"{what} is not hexadecimal (an even number of 0-9, a-f)")
    return bytes.fromhex(text)


def parse_psk(text: str) -> bytes:
    """
    A pre-shared key given as hex: 16-64 bytes (MGP/1 §4), not one byte repeated.

    :raise m2mgw.admin.OperatorError: it is not acceptable.
    """
    psk = parse_hex(text, "the PSK")
    low, high = PSK_LENGTHS
    if not low <= len(psk) <= high:
        raise OperatorError(f"a PSK is {low}-{high} bytes ({2 * low}-{2 * high} hex digits)")
    if len(set(psk)) == 1:
        raise OperatorError("the PSK is one byte repeated; use random bytes (--generate-psk)")
    return psk


def parse_kid(text: str | int) -> int:
    """
    A module key id: 1 or more (``kid`` 0 means "PSK, no key", MGP/1 §4).

    :raise m2mgw.admin.OperatorError: not such a number.
    """
    if isinstance(text, int):
        value = text
    else:
        if not text.isascii() or not text.isdigit():
            raise OperatorError(f"kid {text!r} is not a whole number")
        value = int(text)
    if not 1 <= value <= MAX_KID:
        raise OperatorError(f"kid must be at least 1 (0 is reserved for the PSK), not {value}")
    return value


def check_group(group: str) -> str:
    """
    A module group label: 1-64 characters, no control characters, no
    leading/trailing white space.

    :raise m2mgw.admin.OperatorError: it is not acceptable.
    """
    if not 1 <= len(group) <= 64 or _has_control(group) or group != group.strip():
        raise OperatorError(
            f"bad group {group!r}: 1-64 characters, no control characters or outer spaces"
        )
    return group


def check_app_names(names: Sequence[str]) -> list[str]:
    """
    Application principals a module belongs to, sorted, without repeats.

    :raise m2mgw.admin.OperatorError: a name is not a valid principal.
    """
    for name in names:
        if not is_valid_app_name(name):
            raise OperatorError(
                f"bad application name {name!r}: 1-64 letters, digits, '.', '_' or '-'"
            )
    return sorted(set(names))


def parse_status(text: str) -> ModuleStatus:
    """
    A module status by its value (``enabled``, ``disabled``, ``pending-approval``).

    :raise m2mgw.admin.OperatorError: not one of those.
    """
    try:
        return ModuleStatus(text)
    except ValueError:
        known = ", ".join(s.value for s in ModuleStatus)
        raise OperatorError(f"unknown status {text!r} (known: {known})") from None


def _wire_from_key_object(key: Any, suite: Any) -> bytes:
    """The suite's wire encoding of a ``cryptography`` public key object."""
    name = suite.name
    if isinstance(key, ec.EllipticCurvePublicKey):
        expected = _CURVES.get(str(suite.curve))
        if suite.curve is None or suite.curve == "Ed25519":
            raise OperatorError(f"an EC key, but suite {name} takes {_kind(suite)} keys")
        if expected is not None and key.curve.name != expected:
            raise OperatorError(
                f"a key on curve {key.curve.name}, but suite {name} needs {suite.curve}"
            )
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(key, ed25519.Ed25519PublicKey):
        if suite.curve != "Ed25519":
            raise OperatorError(f"an Ed25519 key, but suite {name} takes {_kind(suite)} keys")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(key, rsa.RSAPublicKey):
        if suite.curve is not None:
            raise OperatorError(f"an RSA key, but suite {name} takes {_kind(suite)} keys")
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if isinstance(key, x25519.X25519PublicKey):
        raise OperatorError(f"an X25519 key; module keys of suite {name} are {_kind(suite)} keys")
    raise OperatorError(f"a {type(key).__name__}; suite {name} takes {_kind(suite)} keys")


def _kind(suite: Any) -> str:
    return "RSA" if suite.curve is None else str(suite.curve)


def _looks_like_hex(data: bytes) -> bytes | None:
    text = b"".join(data.split())
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    if not text or len(text) % 2 or not all(c in b"0123456789abcdefABCDEF" for c in text):
        return None
    try:
        return binascii.unhexlify(text)
    except binascii.Error:
        return None


def parse_public_key(data: bytes, suite: Any, *, binary: bool = False) -> bytes:
    """
    A module public key for ``suite`` from what an operator has at hand: PEM
    or DER SubjectPublicKeyInfo, the raw wire encoding (SEC1 point, 32 raw
    Ed25519 bytes, DER SPKI for RSA), or either of those as hex text.  The
    result is the suite's wire encoding (PEM/DER EC keys become uncompressed
    points), checked with ``suite.validate_public_key``.

    :param suite: an :class:`~m2mgw.interfaces.ICipherSuite`.
    :param binary: ``data`` is the wire encoding or DER, never PEM or hex.
    :raise m2mgw.admin.OperatorError: it is not an acceptable key of the suite
        (private keys are refused, not converted).
    """
    if len(data) > MAX_PUBLIC_KEY_FILE:
        raise OperatorError(f"larger than {MAX_PUBLIC_KEY_FILE} bytes; not a public key")
    if binary:
        return _wire_candidate(data, suite)
    stripped = data.strip()
    if not stripped.startswith(b"-----BEGIN"):
        decoded = _looks_like_hex(stripped)
        return _wire_candidate(decoded if decoded is not None else data, suite)
    if b"PRIVATE KEY" in stripped.split(b"\n", 1)[0]:
        raise OperatorError("that is a private key; give the module's public key")
    try:
        key = serialization.load_pem_public_key(stripped)
    except (ValueError, TypeError) as e:
        raise OperatorError(f"not a PEM public key ({e})") from None
    except Exception as e:  # UnsupportedAlgorithm and friends
        raise OperatorError(f"unsupported PEM public key ({type(e).__name__})") from None
    return _validated(_wire_from_key_object(key, suite), suite)


def _validated(wire: bytes, suite: Any) -> bytes:
    try:
        suite.validate_public_key(wire)
    except CryptoError as e:
        raise OperatorError(f"not an acceptable {suite.name} public key: {e}") from None
    return wire


def _wire_candidate(candidate: bytes, suite: Any) -> bytes:
    """Raw bytes: the wire encoding itself, or DER SubjectPublicKeyInfo to convert."""
    try:
        suite.validate_public_key(candidate)
    except CryptoError as e:
        wire_error = e
    else:
        return candidate
    if candidate[:1] == b"\x30" and suite.curve is not None:
        key = _der_public_key(candidate)
        if key is not None:
            return _validated(_wire_from_key_object(key, suite), suite)
    raise OperatorError(f"not an acceptable {suite.name} public key: {wire_error}")


def _der_public_key(data: bytes) -> Any:
    """A public key object from DER SubjectPublicKeyInfo, or ``None`` if it is not that."""
    try:
        return serialization.load_der_public_key(data)
    except Exception:  # ValueError, UnsupportedAlgorithm: not DER we can read
        return None
