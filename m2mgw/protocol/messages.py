"""
The MGP/1 envelopes (spec §2): HELLO, HELLO_REPLY, DATA and DATA_REPLY.

Every message is one deterministically encoded CBOR array whose last element
``ct`` is the AEAD ciphertext; its AAD is the deterministic encoding of the
array of all the other elements.  :func:`parse_datagram` applies every drop
rule of §1 and §2 that needs no key: size, well-formedness, trailing bytes,
determinism, array shape, version, message type and element types.  It raises
:class:`MalformedMessage`, whose ``reason`` a caller counts the drop under.

Semantic checks (a known ``suite`` and ``skid``, a valid point, a live ``sid``,
the replay window) are the protocol engine's; this module only guarantees
that what it returns has the shape the spec gives.

Building is the mirror image: the dataclasses validate their fields on
construction (``ValueError``) and :meth:`encode` the wire bytes; the
``aad_for`` class methods give the AAD before ``ct`` exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from m2mgw.errors import DecodeError
from m2mgw.protocol import cbor

__all__ = [
    "COOKIE",
    "DATA",
    "DATA_REPLY",
    "DEFAULT_MAX_DATAGRAM",
    "HELLO",
    "HELLO_REPLY",
    "MAX_EPK",
    "MAX_HINT",
    "MAX_RECEIVED_DATAGRAM",
    "MAX_SID",
    "MAX_SUITE_NAME",
    "MAX_UINT",
    "MIN_SID",
    "VERSION",
    "Data",
    "DataReply",
    "Hello",
    "HelloReply",
    "MalformedMessage",
    "MalformedReason",
    "Message",
    "decode_deterministic",
    "is_uint",
    "parse_datagram",
    "parse_reply",
    "parse_request",
]

#: The protocol version, element 0 of every message.
VERSION: Final = 1
#: Message types (element 1).
HELLO: Final = 1
HELLO_REPLY: Final = 2
DATA: Final = 3
DATA_REPLY: Final = 4
#: Reserved for the load-shedding cookie of a later version; dropped by MGP/1 receivers.
COOKIE: Final = 5

#: A received datagram over this size is dropped (§1).
MAX_RECEIVED_DATAGRAM: Final = 1472
#: The default ``max_datagram``: the gateway never sends more (§1).
DEFAULT_MAX_DATAGRAM: Final = 1232

#: ``hint`` is a tstr or bstr of at most this many bytes (§5).
MAX_HINT: Final = 64
#: The longest suite name accepted on the wire (the spec is silent; names are short).
MAX_SUITE_NAME: Final = 32
#: The longest ``epk`` accepted: an RSA-4096 OAEP ciphertext (the spec allows up to 3072).
MAX_EPK: Final = 512
#: ``sid`` is 4 to 8 bytes (§5).
MIN_SID: Final = 4
MAX_SID: Final = 8
#: The largest ``uint`` a field takes (a CBOR major type 0 head holds 64 bits).
MAX_UINT: Final = (1 << 64) - 1


class MalformedReason(str, enum.Enum):
    """Why :class:`MalformedMessage` was raised (compares equal to its string value)."""

    #: A datagram over :data:`MAX_RECEIVED_DATAGRAM` bytes.
    SIZE = "size"
    #: Not well-formed CBOR, trailing bytes, or nested too deep.
    CBOR = "cbor"
    #: Well-formed, but not in deterministic encoding.
    NOT_DETERMINISTIC = "not-deterministic"
    #: The message is not a CBOR array.
    NOT_ARRAY = "not-array"
    #: Element 0 is not ``1``.
    VERSION = "version"
    #: Element 1 is not a known message type (``COOKIE`` included).
    TYPE = "type"
    #: A wrong element count, a missing required map key, or an element or
    #: field of the wrong type or size.
    SHAPE = "shape"
    #: A HELLO whose ``kid`` and ``auth`` method do not go together (``kid`` 0
    #: with PSK only), or whose method is unknown.
    AUTH = "auth"


SIZE: Final = MalformedReason.SIZE
CBOR: Final = MalformedReason.CBOR
NOT_DETERMINISTIC: Final = MalformedReason.NOT_DETERMINISTIC
NOT_ARRAY: Final = MalformedReason.NOT_ARRAY
BAD_VERSION: Final = MalformedReason.VERSION
BAD_TYPE: Final = MalformedReason.TYPE
SHAPE: Final = MalformedReason.SHAPE
AUTH: Final = MalformedReason.AUTH


class MalformedMessage(DecodeError):
    """
    A datagram or plaintext that MGP/1 says to drop, with a machine-usable reason.

    :ivar reason: a :class:`MalformedReason` (a ``str``: ``"size"``,
        ``"cbor"``, ``"not-deterministic"``, ``"not-array"``, ``"version"``,
        ``"type"``, ``"shape"`` or ``"auth"``).
    :ivar detail: a short human-readable description (never contains secrets).
    :ivar claimed_id: the module identity a decrypted HelloBody claimed, when
        it could be read before the problem was found, so that the drop can be
        counted for that identity (§5: every drop after decryption is a
        security event for the identity); else ``None``.
    """

    def __init__(self, reason: MalformedReason, detail: str, claimed_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.claimed_id = claimed_id


def is_uint(value: object, *, minimum: int = 0) -> bool:
    """
    Tell whether ``value`` is a CBOR unsigned integer of at most 64 bits.

    ``bool`` (a subclass of ``int`` in Python, a simple value in CBOR) and
    bignums beyond 64 bits are not; ``int`` subclasses such as ``IntEnum``
    members are.

    :param minimum: the smallest value accepted.
    """
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_UINT


def decode_deterministic(data: bytes) -> Any:
    """
    Decode one CBOR item spanning all of ``data`` that must be deterministically encoded.

    :raise MalformedMessage: reason ``"cbor"`` (malformed, trailing bytes, too
        deep) or ``"not-deterministic"``.
    """
    value = cbor.decode_canonical(data)
    if value is not cbor.DECLINED:
        return value
    try:
        value = cbor.decode(data, check_deterministic=False)
    except DecodeError as e:
        raise MalformedMessage(CBOR, str(e)) from None
    try:
        again = cbor.encode(value)
    except (TypeError, ValueError) as e:
        raise MalformedMessage(CBOR, f"CBOR not re-encodable: {e}") from None
    if again != data:
        raise MalformedMessage(NOT_DETERMINISTIC, "CBOR is not deterministically encoded")
    return value


def _sid_problem(sid: object) -> str | None:
    if not isinstance(sid, bytes) or not MIN_SID <= len(sid) <= MAX_SID:
        return f"sid must be a bstr of {MIN_SID}-{MAX_SID} bytes"
    return None


def _ctr_problem(ctr: object) -> str | None:
    if not is_uint(ctr, minimum=1):
        return "ctr must be a uint >= 1"
    return None


def _ct_problem(ct: object) -> str | None:
    if not isinstance(ct, bytes):
        return "ct must be a bstr"
    return None


def _hello_problem(
    hint: object, suite: object, skid: object, epk: object, ct: object
) -> str | None:
    if isinstance(hint, str):
        hint_size = len(hint.encode("utf-8"))
    elif isinstance(hint, bytes):
        hint_size = len(hint)
    else:
        return "hint must be a tstr or a bstr"
    if hint_size > MAX_HINT:
        return f"hint longer than {MAX_HINT} bytes"
    if not isinstance(suite, str) or len(suite.encode("utf-8")) > MAX_SUITE_NAME:
        return f"suite must be a tstr of at most {MAX_SUITE_NAME} bytes"
    if not is_uint(skid):
        return "skid must be a uint"
    if not isinstance(epk, bytes) or len(epk) > MAX_EPK:
        return f"epk must be a bstr of at most {MAX_EPK} bytes"
    return _ct_problem(ct)


def _check(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


@dataclass(frozen=True)
class Hello:
    """
    ``[1, 1, hint, suite, skid, epk, ct]``: the first message of a session (§5).

    :ivar hint: the module identity, an alias, or empty: a routing hint only, never trusted.
    :ivar suite: the cipher suite name.
    :ivar skid: the server key id the module used.
    :ivar epk: the ephemeral public key (SEC1, raw X25519) or the RSA-OAEP ciphertext.
    :ivar ct: ``AEAD(k_hello, 0, aad, CBOR [body, auth])``.
    """

    hint: bytes | str
    suite: str
    skid: int
    epk: bytes
    ct: bytes

    def __post_init__(self) -> None:
        _check(_hello_problem(self.hint, self.suite, self.skid, self.epk, self.ct))

    @staticmethod
    def aad_for(hint: bytes | str, suite: str, skid: int, epk: bytes) -> bytes:
        """
        The AAD of a HELLO with these elements: ``CBOR [1, 1, hint, suite, skid, epk]``.

        :raise ValueError: an element of the wrong type or size.
        """
        _check(_hello_problem(hint, suite, skid, epk, b""))
        return _hello_aad(hint, suite, skid, epk)

    @property
    def aad(self) -> bytes:
        """The message's AAD: every element but ``ct``."""
        return _hello_aad(self.hint, self.suite, self.skid, self.epk)

    def encode(self) -> bytes:
        """The datagram."""
        return cbor.encode([VERSION, HELLO, self.hint, self.suite, self.skid, self.epk, self.ct])


_HELLO_AAD_START: Final = bytes((0x86, VERSION, HELLO))


def _hello_aad(hint: bytes | str, suite: str, skid: int, epk: bytes) -> bytes:
    """
    ``CBOR [1, 1, hint, suite, skid, epk]`` put together from its heads when
    every element has its plain built-in type (the same bytes as
    :func:`cbor.encode`, faster); anything else goes to :func:`cbor.encode`.
    """
    hint_type = type(hint)
    if (
        (hint_type is bytes or hint_type is str)
        and type(suite) is str
        and type(skid) is int
        and 0 <= skid <= MAX_UINT
        and type(epk) is bytes
    ):
        hint_item = cbor.encode_bytes(hint) if hint_type is bytes else cbor.encode_text(hint)  # type: ignore[arg-type]
        return b"".join(
            (
                _HELLO_AAD_START,
                hint_item,
                cbor.encode_text(suite),
                cbor.head(0, skid),
                cbor.encode_bytes(epk),
            )
        )
    return cbor.encode([VERSION, HELLO, hint, suite, skid, epk])


@dataclass(frozen=True)
class HelloReply:
    """
    ``[1, 2, sid, ct]``: the gateway's answer to an accepted HELLO (§6).

    :ivar sid: the new session's id.
    :ivar ct: ``AEAD(k_hreply, 0, aad, CBOR [body, sig])``.
    """

    sid: bytes
    ct: bytes

    def __post_init__(self) -> None:
        _check(_sid_problem(self.sid) or _ct_problem(self.ct))

    @staticmethod
    def aad_for(sid: bytes) -> bytes:
        """
        The AAD of a HELLO_REPLY for session ``sid``: ``CBOR [1, 2, sid]``.

        :raise ValueError: ``sid`` is not 4-8 bytes.
        """
        _check(_sid_problem(sid))
        return _HELLO_REPLY_AAD_START + cbor.encode_bytes(sid)

    @property
    def aad(self) -> bytes:
        """The message's AAD: every element but ``ct``."""
        return cbor.encode([VERSION, HELLO_REPLY, self.sid])

    def encode(self) -> bytes:
        """The datagram."""
        if type(self.sid) is bytes and type(self.ct) is bytes:
            # ``CBOR [1, 2, sid, ct]`` from its heads (as cbor.encode, faster).
            sid, ct = cbor.encode_bytes(self.sid), cbor.encode_bytes(self.ct)
            return b"".join((_HELLO_REPLY_START, sid, ct))
        return cbor.encode([VERSION, HELLO_REPLY, self.sid, self.ct])


_HELLO_REPLY_AAD_START: Final = bytes((0x83, VERSION, HELLO_REPLY))
_HELLO_REPLY_START: Final = bytes((0x84, VERSION, HELLO_REPLY))


#: The first bytes of ``CBOR [1, kind, ...]`` with 4 and 5 elements, by message type.
_AAD_START: Final = {
    DATA: bytes((0x84, VERSION, DATA)),
    DATA_REPLY: bytes((0x84, VERSION, DATA_REPLY)),
}
_MESSAGE_START: Final = {
    DATA: bytes((0x85, VERSION, DATA)),
    DATA_REPLY: bytes((0x85, VERSION, DATA_REPLY)),
}


def _session_aad(kind: int, sid: bytes, ctr: int) -> bytes:
    """
    ``CBOR [1, kind, sid, ctr]`` for a checked ``sid`` and ``ctr``, put
    together from its heads (the same bytes as :func:`cbor.encode`, faster).
    """
    return b"".join((_AAD_START[kind], cbor.head(2, len(sid)), sid, cbor.head(0, ctr)))


def _session_message(kind: int, sid: bytes, ctr: int, ct: bytes) -> bytes:
    """``CBOR [1, kind, sid, ctr, ct]`` for checked elements, as :func:`_session_aad`."""
    parts = (_MESSAGE_START[kind], cbor.head(2, len(sid)), sid, cbor.head(0, ctr))
    return b"".join((*parts, cbor.head(2, len(ct)), ct))


@dataclass(frozen=True)
class Data:
    """
    ``[1, 3, sid, ctr, ct]``: a module message on a session (§8).

    :ivar ctr: the module's counter, strictly increasing per session, >= 1;
        the AEAD nonce is ``ctr`` big-endian on ``nonce_len`` bytes.
    :ivar ct: ``AEAD(k_up, ctr, aad, DataBody)``.
    """

    sid: bytes
    ctr: int
    ct: bytes

    def __post_init__(self) -> None:
        _check(_sid_problem(self.sid) or _ctr_problem(self.ctr) or _ct_problem(self.ct))

    @staticmethod
    def aad_for(sid: bytes, ctr: int) -> bytes:
        """
        The AAD of a DATA: ``CBOR [1, 3, sid, ctr]``.

        :raise ValueError: a ``sid`` or ``ctr`` out of range.
        """
        _check(_sid_problem(sid) or _ctr_problem(ctr))
        return _session_aad(DATA, sid, ctr)

    @property
    def aad(self) -> bytes:
        """The message's AAD: every element but ``ct``."""
        return _session_aad(DATA, self.sid, self.ctr)

    def encode(self) -> bytes:
        """The datagram."""
        return _session_message(DATA, self.sid, self.ctr, self.ct)


@dataclass(frozen=True)
class DataReply:
    """
    ``[1, 4, sid, ctr, ct]``: the gateway's answer to an accepted DATA (§8).

    :ivar ctr: the ``ctr`` of the DATA answered.
    :ivar ct: ``AEAD(k_down, ctr, aad, ReplyBody)``.
    """

    sid: bytes
    ctr: int
    ct: bytes

    def __post_init__(self) -> None:
        _check(_sid_problem(self.sid) or _ctr_problem(self.ctr) or _ct_problem(self.ct))

    @staticmethod
    def aad_for(sid: bytes, ctr: int) -> bytes:
        """
        The AAD of a DATA_REPLY: ``CBOR [1, 4, sid, ctr]``.

        :raise ValueError: a ``sid`` or ``ctr`` out of range.
        """
        _check(_sid_problem(sid) or _ctr_problem(ctr))
        return _session_aad(DATA_REPLY, sid, ctr)

    @property
    def aad(self) -> bytes:
        """The message's AAD: every element but ``ct``."""
        return _session_aad(DATA_REPLY, self.sid, self.ctr)

    def encode(self) -> bytes:
        """The datagram."""
        return _session_message(DATA_REPLY, self.sid, self.ctr, self.ct)


#: Any MGP/1 message.
Message = Hello | HelloReply | Data | DataReply

_ELEMENT_COUNT: Final = {HELLO: 7, HELLO_REPLY: 4, DATA: 5, DATA_REPLY: 5}


def _shape(problem: str | None) -> None:
    if problem is not None:
        raise MalformedMessage(SHAPE, problem)


def parse_datagram(data: bytes) -> Message:
    """
    Parse one received datagram into its message, applying every key-less drop rule.

    The checks run in this order: size, well-formed CBOR without trailing
    bytes, deterministic encoding, an array, version ``1``, a known message
    type (``COOKIE`` is reserved and dropped), the element count of that type,
    and each element's type and size (§2, §5, §6, §8).  A returned message
    re-encodes to exactly ``data``.

    :param data: the UDP payload.
    :raise MalformedMessage: the datagram must be dropped; ``reason`` says why.
    """
    data = bytes(data)
    if len(data) > MAX_RECEIVED_DATAGRAM:
        raise MalformedMessage(SIZE, f"datagram of {len(data)} bytes")
    value = decode_deterministic(data)
    if not isinstance(value, list):
        raise MalformedMessage(NOT_ARRAY, "message is not an array")
    if not value or not (type(value[0]) is int and value[0] == VERSION):
        raise MalformedMessage(BAD_VERSION, "element 0 is not version 1")
    if len(value) < 2:
        raise MalformedMessage(SHAPE, "no message type")
    kind = value[1]
    if type(kind) is not int or kind not in _ELEMENT_COUNT:
        detail = "reserved type COOKIE" if kind == COOKIE and type(kind) is int else "unknown type"
        raise MalformedMessage(BAD_TYPE, detail)
    if len(value) != _ELEMENT_COUNT[kind]:
        raise MalformedMessage(SHAPE, f"type {kind} with {len(value)} elements")
    # Each message is built without running its constructor's checks again:
    # _shape has just made them.
    if kind == HELLO:
        _, _, hint, suite, skid, epk, ct = value
        _shape(_hello_problem(hint, suite, skid, epk, ct))
        fields = {"hint": hint, "suite": suite, "skid": skid, "epk": epk, "ct": ct}
        return _checked(Hello, fields)
    if kind == HELLO_REPLY:
        _, _, sid, ct = value
        _shape(_sid_problem(sid) or _ct_problem(ct))
        return _checked(HelloReply, {"sid": sid, "ct": ct})
    _, _, sid, ctr, ct = value
    _shape(_sid_problem(sid) or _ctr_problem(ctr) or _ct_problem(ct))
    fields = {"sid": sid, "ctr": ctr, "ct": ct}
    if kind == DATA:
        return _checked(Data, fields)
    return _checked(DataReply, fields)


_M = TypeVar("_M")


def _checked(cls: type[_M], fields: dict[str, Any]) -> _M:
    """
    An instance of the frozen dataclass ``cls`` from ``fields`` (every field),
    already checked by the caller: ``__post_init__`` does not run again.
    """
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


def parse_request(data: bytes) -> Hello | Data:
    """
    Parse a datagram the gateway received: only HELLO and DATA travel that way.

    :raise MalformedMessage: as :func:`parse_datagram`, and reason ``"type"``
        for a HELLO_REPLY or DATA_REPLY.
    """
    message = parse_datagram(data)
    if not isinstance(message, (Hello, Data)):
        raise MalformedMessage(BAD_TYPE, "a reply sent to the gateway")
    return message


def parse_reply(data: bytes) -> HelloReply | DataReply:
    """
    Parse a datagram a module received: only HELLO_REPLY and DATA_REPLY travel that way.

    :raise MalformedMessage: as :func:`parse_datagram`, and reason ``"type"``
        for a HELLO or DATA.
    """
    message = parse_datagram(data)
    if not isinstance(message, (HelloReply, DataReply)):
        raise MalformedMessage(BAD_TYPE, "a request sent to a module")
    return message
