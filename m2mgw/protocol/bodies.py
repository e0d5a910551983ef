"""
The MGP/1 plaintext structures (spec §5, §6, §8.1, §8.2, §9) and reply sizing.

Inside ``ct`` travel: the HELLO plaintext ``[body, [method, value]]`` with the
HelloBody map, the HELLO_REPLY plaintext ``[body, sig]`` with a ReplyBody, and
directly a DataBody (DATA) or ReplyBody (DATA_REPLY).  Maps use small unsigned
integer keys; unknown keys are ignored, a missing required key or a value of
the wrong type is an error.

Parsing is split the way the spec answers problems:

- a malformed *structure* (not a map, a required field missing or of the
  wrong type or size) raises :class:`~m2mgw.protocol.messages.MalformedMessage`:
  the message is dropped;
- a malformed *item* inside a well-formed ``pl`` Payload does not: the
  :class:`Payload` keeps the good items and lists the bad ones in
  :attr:`Payload.errors`, which the engine answers with ``err`` code 2 (§8).
  A KeyReg whose ``kid`` is usable but whose other fields are missing or
  mistyped becomes an :class:`InvalidKeyReg`, answered with ``res`` status 4.

The parsers check shapes only.  Decisions that need state or keys (a known
suite, an acceptable key, the expected ``kid``, a known ``iid``) are the
engine's.  One semantic rule is applied here because it is a pure function of
the plaintext: a HELLO's ``kid`` is 0 exactly when its method is PSK (§5).

Every structure is a frozen dataclass that validates its fields when built
(``ValueError``), so the module client and the engine cannot build what a
receiver would drop, and encodes deterministically with ``encode()``.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple, TypeVar

from m2mgw.protocol import cbor
from m2mgw.protocol.messages import (
    AUTH,
    MAX_RECEIVED_DATAGRAM,
    MAX_SUITE_NAME,
    MAX_UINT,
    SHAPE,
    SIZE,
    MalformedMessage,
    decode_deterministic,
    is_uint,
)

__all__ = [
    "KIND_KEYGEN",
    "KIND_REHELLO",
    "KIND_SKEY",
    "MAX_ALIAS",
    "MAX_AUTH_VALUE",
    "MAX_ID",
    "MAX_TOK",
    "MIN_ALIAS",
    "MIN_DATA_TOK",
    "MIN_HELLO_TOK",
    "MIN_ID",
    "MIN_INSTRUCTION_SIZE",
    "MISSING",
    "REQ_PARAMS",
    "REQ_TIME",
    "STOK_SIZE",
    "AuthMethod",
    "ConfEntry",
    "ConfStatus",
    "DataBody",
    "ErrorCode",
    "ErrorEntry",
    "HelloBody",
    "HelloPlaintext",
    "HelloReplyPlaintext",
    "InstructionItem",
    "InvalidKeyReg",
    "ItemError",
    "KeyReg",
    "KeyRegResult",
    "KeyRegStatus",
    "Missing",
    "Note",
    "Params",
    "Payload",
    "ReplyBody",
    "ReplyFrame",
    "SkeyBody",
    "build_hello_plaintext",
    "build_hello_reply_plaintext",
    "ins_budget",
    "instruction_wire_size",
    "parse_data_body",
    "parse_hello_body",
    "parse_hello_plaintext",
    "parse_hello_reply_plaintext",
    "parse_params",
    "parse_payload",
    "parse_reply_body",
    "parse_skey_body",
    "reply_datagram_size",
]

#: ``id`` is 1 to 64 bytes of UTF-8 (§4).
MIN_ID: Final = 1
MAX_ID: Final = 64
#: A HELLO's ``tok`` is 8-32 bytes (§5), a DATA's 4-32 (§8.1); ``ack`` echoes either.
MIN_HELLO_TOK: Final = 8
MIN_DATA_TOK: Final = 4
MAX_TOK: Final = 32
#: ``stok`` is 16 bytes (§6).
STOK_SIZE: Final = 16
#: An alias is 8-16 bytes (§7).
MIN_ALIAS: Final = 8
MAX_ALIAS: Final = 16
#: The longest ``auth`` value accepted: an RSA-4096 signature (the spec's RSA keys reach 3072 bits).
MAX_AUTH_VALUE: Final = 512
#: Params ``seed`` is 16-32 bytes and ``rsa_bits`` 2048-3072 (§9).
MIN_SEED: Final = 16
MAX_SEED: Final = 32
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 3072
#: Syslog severities for a note's ``level`` (§8.1).
MAX_NOTE_LEVEL: Final = 7
#: The smallest encoded Instruction, ``[0, "", null]``: bounds how many fit in a budget.
MIN_INSTRUCTION_SIZE: Final = 4

#: Reserved instruction kinds (§8.2) and requests (§8.1).
KIND_KEYGEN: Final = "keygen"
KIND_REHELLO: Final = "rehello"
KIND_SKEY: Final = "skey"
REQ_PARAMS: Final = "params"
REQ_TIME: Final = "time"

# Map keys.  HelloBody (§5):
_ID, _KID, _TS, _TOK, _PL = 1, 2, 3, 4, 5
# Payload (§8.1):
_DATA, _CONF, _KEYREG, _NOTE, _REQ = 10, 11, 12, 13, 14
# ReplyBody (§8.2, §6, §7):
_ACK, _STOK, _EXP, _TIME, _INS, _MORE, _ALIAS, _ERR, _RES = 1, 2, 3, 4, 5, 6, 7, 8, 9
# KeyReg (§9):
_KR_KID, _KR_PUB, _KR_SUITE, _KR_PID, _KR_PROOF, _KR_POP = 1, 2, 3, 4, 5, 6
# Note (§8.1):
_NOTE_LEVEL, _NOTE_CODE, _NOTE_TEXT = 1, 2, 3
# Params (§9):
_P_SUITE, _P_CURVE, _P_EQ, _P_RSA_BITS, _P_TTL, _P_SEED, _P_KID, _P_HASH, _P_PID = range(1, 10)
# "skey" instruction body (§8.2):
_SK_SKID, _SK_SUITE, _SK_PUB, _SK_SIG_PUB, _SK_SIG = 1, 2, 3, 4, 5


class AuthMethod(enum.IntEnum):
    """The HELLO authentication methods (§5)."""

    SIG = 1
    PSK = 2
    SDH = 3


_METHODS: Final = frozenset(int(method) for method in AuthMethod)


class ConfStatus(enum.IntEnum):
    """The ``status`` of a ``conf`` entry (§8.1)."""

    DONE = 0
    FAILED = 1
    REFUSED = 2


class KeyRegStatus(enum.IntEnum):
    """The status of a keyreg result in ``res`` (§8.2)."""

    ACCEPTED = 0
    BAD_PROOF = 1
    BAD_POP = 2
    WRONG_KID = 3
    NOT_ACCEPTABLE = 4
    REFUSED = 5


class ErrorCode(enum.IntEnum):
    """The codes of ``err`` entries (§8.2)."""

    UNKNOWN_REQUEST = 1
    MALFORMED_ITEM = 2
    NOT_PERMITTED = 3
    UNAVAILABLE = 4


class Missing(enum.Enum):
    """The type of :data:`MISSING`."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


#: An absent optional value that could otherwise be any CBOR, ``null`` included.
MISSING: Final = Missing.MISSING

#: A missing map key (typed ``Any`` so that looked-up values stay ``Any``).
_ABSENT: Final[Any] = object()


# --- field checks: each returns a problem description, or None ----------------


def _uint_problem(
    name: str, value: object, minimum: int = 0, maximum: int = MAX_UINT
) -> str | None:
    if value is _ABSENT:
        return f"{name} missing"
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        if minimum == 0 and maximum == MAX_UINT:
            return f"{name} is not a uint"
        return f"{name} is not a uint in {minimum}..{maximum}"
    return None


def _bstr_problem(
    name: str, value: object, minimum: int = 0, maximum: int | None = None
) -> str | None:
    if value is _ABSENT:
        return f"{name} missing"
    if not isinstance(value, bytes):
        return f"{name} is not a bstr"
    if len(value) < minimum or (maximum is not None and len(value) > maximum):
        if maximum is None:
            return f"{name} shorter than {minimum} bytes"
        if minimum == maximum:
            return f"{name} is not {minimum} bytes"
        return f"{name} is not {minimum}-{maximum} bytes"
    return None


def _tstr_problem(
    name: str, value: object, minimum: int = 0, maximum: int | None = None
) -> str | None:
    if value is _ABSENT:
        return f"{name} missing"
    if not isinstance(value, str):
        return f"{name} is not a tstr"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{name} is not valid UTF-8"
    if size < minimum or (maximum is not None and size > maximum):
        if maximum is None:
            return f"{name} shorter than {minimum} bytes"
        return f"{name} is not {minimum}-{maximum} bytes of UTF-8"
    return None


def _optional(problem: str | None, value: object) -> str | None:
    return None if value is None else problem


def _first(*problems: str | None) -> str | None:
    for problem in problems:
        if problem is not None:
            return problem
    return None


def _check(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


_T = TypeVar("_T")


def _checked(cls: type[_T], fields: dict[str, Any]) -> _T:
    """
    An instance of the frozen dataclass ``cls`` from ``fields`` (every field)
    that the caller has already checked: ``__post_init__`` does not run again.
    For the parsers, whose checks raise :class:`MalformedMessage` first, and
    the per-datagram path.
    """
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


def _int_keyed(value: Mapping[Any, Any]) -> dict[int, Any]:
    # Keep integer keys only: ``True`` and ``1.0`` equal ``1`` in Python and
    # must not be read as key 1; every other key is unknown and ignored.
    return {key: item for key, item in value.items() if type(key) is int}


def _map(value: object, name: str, claimed_id: str | None = None) -> dict[int, Any]:
    if not isinstance(value, dict):
        raise MalformedMessage(SHAPE, f"{name} is not a map", claimed_id)
    return _int_keyed(value)


def _decode(data: bytes) -> Any:
    data = bytes(data)
    if len(data) > MAX_RECEIVED_DATAGRAM:
        raise MalformedMessage(SIZE, f"plaintext of {len(data)} bytes")
    return decode_deterministic(data)


def _shape(problem: str | None, claimed_id: str | None = None) -> None:
    if problem is not None:
        raise MalformedMessage(SHAPE, problem, claimed_id)


# --- Payload items -------------------------------------------------------------


@dataclass(frozen=True)
class ItemError:
    """
    A malformed item of a Payload, answered with ``err`` code 2 (§8).

    :ivar key: the Payload key of the item (10-14).
    :ivar text: a short description, fit for the ``err`` entry's text.
    """

    key: int
    text: str


def _conf_problem(iid: object, status: object, ts: object) -> str | None:
    return _first(
        _uint_problem("iid", iid),
        _uint_problem("status", status, 0, max(ConfStatus)),
        _uint_problem("ts", ts),
    )


@dataclass(frozen=True)
class ConfEntry:
    """
    ``[iid, status, ts, ? result]``: instruction ``iid`` executed at module time ``ts`` (§8.1).

    :ivar status: a :class:`ConfStatus` value: 0 done, 1 failed, 2 refused.
    :ivar result: any CBOR value for the application, or :data:`MISSING`.
    """

    iid: int
    status: int
    ts: int
    result: Any = MISSING

    def __post_init__(self) -> None:
        _check(_conf_problem(self.iid, self.status, self.ts))

    def to_cbor(self) -> list[Any]:
        """The CBOR data model value."""
        entry: list[Any] = [self.iid, self.status, self.ts]
        if self.result is not MISSING:
            entry.append(self.result)
        return entry


def _note_problem(level: object, code: object, text: object) -> str | None:
    return _first(
        _uint_problem("level", level, 0, MAX_NOTE_LEVEL),
        _tstr_problem("code", code),
        _optional(_tstr_problem("text", text), text),
    )


@dataclass(frozen=True)
class Note:
    """
    ``{1: level, 2: code, ? 3: text}``: a notification or alarm (§8.1).

    :ivar level: a syslog severity, 0 (emergency) to 7 (debug).
    """

    level: int
    code: str
    text: str | None = None

    def __post_init__(self) -> None:
        _check(_note_problem(self.level, self.code, self.text))

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value."""
        value: dict[int, Any] = {_NOTE_LEVEL: self.level, _NOTE_CODE: self.code}
        if self.text is not None:
            value[_NOTE_TEXT] = self.text
        return value


def _keyreg_problem(
    kid: object, pub: object, suite: object, pid: object, proof: object, pop: object
) -> str | None:
    return _first(
        _uint_problem("kid", kid),
        _bstr_problem("pub", pub),
        _tstr_problem("suite", suite, 0, MAX_SUITE_NAME),
        _uint_problem("pid", pid),
        _bstr_problem("proof", proof),
        _bstr_problem("pop", pop),
    )


@dataclass(frozen=True, kw_only=True)
class KeyReg:
    """
    A key registration (§9): ``{1: kid, 2: pub, 3: suite, 4: pid, 5: proof, 6: pop}``.

    :ivar kid: the new key's id.
    :ivar pub: the new public key, in the suite's wire encoding.
    :ivar pid: the Params set it was generated from, 0 when unsolicited.
    :ivar proof: the previous credential's signature or PSK MAC over ``TBS_k``.
    :ivar pop: the new key's signature over ``TBS_k``.
    """

    kid: int
    pub: bytes
    suite: str
    pid: int
    proof: bytes
    pop: bytes

    def __post_init__(self) -> None:
        _check(_keyreg_problem(self.kid, self.pub, self.suite, self.pid, self.proof, self.pop))

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value."""
        return {
            _KR_KID: self.kid,
            _KR_PUB: self.pub,
            _KR_SUITE: self.suite,
            _KR_PID: self.pid,
            _KR_PROOF: self.proof,
            _KR_POP: self.pop,
        }


@dataclass(frozen=True)
class InvalidKeyReg:
    """
    A KeyReg with a usable ``kid`` but a missing or mistyped other field.

    The engine answers it with ``res`` ``{12: [kid, 4, reason]}`` (§8.2:
    status 4 covers "missing fields"); a KeyReg without a usable ``kid`` is an
    :class:`ItemError` instead (``err`` code 2).

    :ivar reason: what is wrong, fit for the result's reason text.
    """

    kid: int
    reason: str


def _payload_problem(
    conf: object, keyreg: object, note: object, req: object, errors: object
) -> str | None:
    if not isinstance(conf, tuple) or not all(isinstance(c, ConfEntry) for c in conf):
        return "conf must be a tuple of ConfEntry"
    if keyreg is not None and not isinstance(keyreg, (KeyReg, InvalidKeyReg)):
        return "keyreg must be a KeyReg"
    if note is not None and not isinstance(note, Note):
        return "note must be a Note"
    if not isinstance(req, tuple) or not all(isinstance(r, str) for r in req):
        return "req must be a tuple of str"
    if not isinstance(errors, tuple) or not all(isinstance(e, ItemError) for e in errors):
        return "errors must be a tuple of ItemError"
    return None


@dataclass(frozen=True, kw_only=True)
class Payload:
    """
    The Payload map (§8.1), carried as ``pl`` in a DataBody or a HelloBody.

    An empty ``conf`` or ``req`` is the same as an absent one.

    :ivar data: the sensor data (any CBOR, tags included), or :data:`MISSING`.
    :ivar conf: the confirmations.
    :ivar keyreg: a key registration, an :class:`InvalidKeyReg`, or ``None``.
    :ivar note: a notification, or ``None``.
    :ivar req: the requests, unknown ones included (answered with ``err`` code 1).
    :ivar errors: the malformed items found by :func:`parse_payload`, to be
        answered with ``err`` code 2; a Payload with errors cannot be encoded.
    """

    data: Any = MISSING
    conf: tuple[ConfEntry, ...] = ()
    keyreg: KeyReg | InvalidKeyReg | None = None
    note: Note | None = None
    req: tuple[str, ...] = ()
    errors: tuple[ItemError, ...] = ()

    def __post_init__(self) -> None:
        _check(_payload_problem(self.conf, self.keyreg, self.note, self.req, self.errors))

    def to_cbor(self) -> dict[int, Any]:
        """
        The CBOR data model value.

        :raise ValueError: the payload holds parse errors or an :class:`InvalidKeyReg`.
        """
        if self.errors or isinstance(self.keyreg, InvalidKeyReg):
            raise ValueError("a payload with malformed items cannot be encoded")
        value: dict[int, Any] = {}
        if self.data is not MISSING:
            value[_DATA] = self.data
        if self.conf:
            value[_CONF] = [entry.to_cbor() for entry in self.conf]
        if self.keyreg is not None:
            value[_KEYREG] = self.keyreg.to_cbor()
        if self.note is not None:
            value[_NOTE] = self.note.to_cbor()
        if self.req:
            value[_REQ] = list(self.req)
        return value


def _parse_conf(value: object) -> tuple[list[ConfEntry], list[ItemError]]:
    if not isinstance(value, list):
        return [], [ItemError(_CONF, "conf is not an array")]
    entries: list[ConfEntry] = []
    errors: list[ItemError] = []
    for index, entry in enumerate(value):
        if not isinstance(entry, list) or len(entry) not in (3, 4):
            errors.append(ItemError(_CONF, f"conf[{index}] is not [iid, status, ts, ? result]"))
            continue
        problem = _conf_problem(entry[0], entry[1], entry[2])
        if problem is not None:
            errors.append(ItemError(_CONF, f"conf[{index}]: {problem}"))
            continue
        result = entry[3] if len(entry) == 4 else MISSING
        entries.append(ConfEntry(entry[0], entry[1], entry[2], result))
    return entries, errors


def _parse_keyreg(value: object) -> KeyReg | InvalidKeyReg | ItemError:
    if not isinstance(value, dict):
        return ItemError(_KEYREG, "keyreg is not a map")
    fields = _int_keyed(value)
    kid = fields.get(_KR_KID, _ABSENT)
    problem = _uint_problem("kid", kid)
    if problem is not None:
        return ItemError(_KEYREG, f"keyreg {problem}")
    assert isinstance(kid, int)
    pub = fields.get(_KR_PUB, _ABSENT)
    suite = fields.get(_KR_SUITE, _ABSENT)
    pid = fields.get(_KR_PID, _ABSENT)
    proof = fields.get(_KR_PROOF, _ABSENT)
    pop = fields.get(_KR_POP, _ABSENT)
    problem = _keyreg_problem(kid, pub, suite, pid, proof, pop)
    if problem is not None:
        return InvalidKeyReg(kid, problem)
    return KeyReg(kid=kid, pub=pub, suite=suite, pid=pid, proof=proof, pop=pop)


def _parse_note(value: object) -> Note | ItemError:
    if not isinstance(value, dict):
        return ItemError(_NOTE, "note is not a map")
    fields = _int_keyed(value)
    level = fields.get(_NOTE_LEVEL, _ABSENT)
    code = fields.get(_NOTE_CODE, _ABSENT)
    text = fields.get(_NOTE_TEXT)
    problem = _note_problem(level, code, text)
    if problem is not None:
        return ItemError(_NOTE, f"note {problem}")
    return Note(level, code, text)


def _parse_req(value: object) -> tuple[list[str], list[ItemError]]:
    if not isinstance(value, list):
        return [], [ItemError(_REQ, "req is not an array")]
    requests: list[str] = []
    errors: list[ItemError] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            requests.append(item)
        else:
            errors.append(ItemError(_REQ, f"req[{index}] is not a tstr"))
    return requests, errors


def parse_payload(value: Mapping[Any, Any]) -> Payload:
    """
    Read a Payload map, item by item.

    Never raises for a malformed item: the good items are kept (good ``conf``
    entries and ``req`` strings too) and every bad one is listed in
    :attr:`Payload.errors`.  Unknown keys are ignored.

    :param value: the decoded ``pl`` map.
    :raise MalformedMessage: ``value`` is not a map (reason ``"shape"``).
    """
    fields = _map(value, "pl")
    errors: list[ItemError] = []
    conf: list[ConfEntry] = []
    requests: list[str] = []
    keyreg: KeyReg | InvalidKeyReg | None = None
    note: Note | None = None
    if _CONF in fields:
        conf, conf_errors = _parse_conf(fields[_CONF])
        errors.extend(conf_errors)
    if _KEYREG in fields:
        parsed_keyreg = _parse_keyreg(fields[_KEYREG])
        if isinstance(parsed_keyreg, ItemError):
            errors.append(parsed_keyreg)
        else:
            keyreg = parsed_keyreg
    if _NOTE in fields:
        parsed_note = _parse_note(fields[_NOTE])
        if isinstance(parsed_note, ItemError):
            errors.append(parsed_note)
        else:
            note = parsed_note
    if _REQ in fields:
        requests, req_errors = _parse_req(fields[_REQ])
        errors.extend(req_errors)
    # Every field was built by the item parsers above: what Payload checks holds.
    return _checked(
        Payload,
        {
            "data": fields.get(_DATA, MISSING),
            "conf": tuple(conf),
            "keyreg": keyreg,
            "note": note,
            "req": tuple(requests),
            "errors": tuple(errors),
        },
    )


def _payload_or_none(value: object, claimed_id: str | None = None) -> Payload | None:
    if value is _ABSENT:
        return None
    if not isinstance(value, dict):
        raise MalformedMessage(SHAPE, "pl is not a map", claimed_id)
    return parse_payload(value)


# --- HelloBody and the HELLO plaintext (§5) ---------------------------------------


def _hello_body_problem(
    module_id: object, kid: object, ts: object, tok: object, pl: object
) -> str | None:
    return _first(
        _tstr_problem("id", module_id, MIN_ID, MAX_ID),
        _uint_problem("kid", kid),
        _uint_problem("ts", ts),
        _bstr_problem("tok", tok, MIN_HELLO_TOK, MAX_TOK),
        None if pl is None or isinstance(pl, Payload) else "pl must be a Payload",
    )


@dataclass(frozen=True, kw_only=True)
class HelloBody:
    """
    The HelloBody map (§5): ``{1: id, 2: kid, 3: ts, 4: tok, ? 5: pl}``.

    :ivar id: the module identity, 1-64 bytes of UTF-8.
    :ivar kid: the module key used in ``auth`` (0 with PSK).
    :ivar ts: the freshness value, strictly increasing per module.
    :ivar tok: the security token, 8-32 random bytes.
    :ivar pl: data carried already in the first message, or ``None``.
    """

    id: str
    kid: int
    ts: int
    tok: bytes
    pl: Payload | None = None

    def __post_init__(self) -> None:
        _check(_hello_body_problem(self.id, self.kid, self.ts, self.tok, self.pl))

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value."""
        value: dict[int, Any] = {_ID: self.id, _KID: self.kid, _TS: self.ts, _TOK: self.tok}
        if self.pl is not None:
            value[_PL] = self.pl.to_cbor()
        return value

    def encode(self) -> bytes:
        """The body bytes (the bstr the HELLO plaintext carries, and TBS signs)."""
        return cbor.encode(self.to_cbor())


def parse_hello_body(body: bytes) -> HelloBody:
    """
    Parse HelloBody bytes.

    :raise MalformedMessage: not deterministic CBOR, not a map, or a field
        missing or of the wrong type or size; ``claimed_id`` is set once
        ``id`` could be read.
    """
    value = _decode(body)
    quick = _quick_hello_body(value)
    if quick is not None:
        return quick
    fields = _map(value, "HelloBody")
    module_id = fields.get(_ID, _ABSENT)
    _shape(_tstr_problem("id", module_id, MIN_ID, MAX_ID))
    assert isinstance(module_id, str)
    kid = fields.get(_KID, _ABSENT)
    ts = fields.get(_TS, _ABSENT)
    tok = fields.get(_TOK, _ABSENT)
    _shape(
        _first(
            _uint_problem("kid", kid),
            _uint_problem("ts", ts),
            _bstr_problem("tok", tok, MIN_HELLO_TOK, MAX_TOK),
        ),
        module_id,
    )
    pl = _payload_or_none(fields.get(_PL, _ABSENT), module_id)
    # Every field was checked above (pl is a Payload or None).
    return _checked(HelloBody, {"id": module_id, "kid": kid, "ts": ts, "tok": tok, "pl": pl})


def _quick_hello_body(value: object) -> HelloBody | None:
    """
    The HelloBody of a decoded map whose keys are all integers and whose
    ``id`` (ASCII), ``kid``, ``ts`` and ``tok`` have their plain types and
    sizes: the usual body, with the checks of :func:`parse_hello_body` made
    in line.  ``None`` for anything else, which the full path then decides
    (error reasons included).
    """
    if type(value) is not dict or not all(type(key) is int for key in value):
        return None
    module_id = value.get(_ID)
    kid = value.get(_KID)
    ts = value.get(_TS)
    tok = value.get(_TOK)
    if not (
        type(module_id) is str
        and module_id.isascii()
        and MIN_ID <= len(module_id) <= MAX_ID
        and type(kid) is int
        and 0 <= kid <= MAX_UINT
        and type(ts) is int
        and 0 <= ts <= MAX_UINT
        and type(tok) is bytes
        and MIN_HELLO_TOK <= len(tok) <= MAX_TOK
    ):
        return None
    pl = _payload_or_none(value.get(_PL, _ABSENT), module_id)
    return _checked(HelloBody, {"id": module_id, "kid": kid, "ts": ts, "tok": tok, "pl": pl})


class HelloPlaintext(NamedTuple):
    """
    A parsed HELLO plaintext ``[body, [method, value]]``.

    :ivar body_bytes: the body exactly as received (TBS and the ``pl`` signature cover it).
    :ivar method: the authentication method.
    :ivar value: the signature, PSK MAC or SDH MAC.
    """

    body_bytes: bytes
    body: HelloBody
    method: AuthMethod
    value: bytes


def build_hello_plaintext(body_bytes: bytes, method: int, value: bytes) -> bytes:
    """
    Build the HELLO plaintext ``CBOR [body, [method, value]]``.

    :param body_bytes: :meth:`HelloBody.encode` output.
    :param method: an :class:`AuthMethod`.
    :raise ValueError: an unknown method or a value of the wrong type.
    """
    _check(
        _first(
            _bstr_problem("body", body_bytes),
            None if type(method) in (int, AuthMethod) and method in _METHODS else "unknown method",
            _bstr_problem("value", value, 1, MAX_AUTH_VALUE),
        )
    )
    return cbor.encode([body_bytes, [int(method), value]])


def parse_hello_plaintext(plaintext: bytes) -> HelloPlaintext:
    """
    Parse a decrypted HELLO plaintext and its HelloBody.

    Checks shapes, and that ``kid`` is 0 exactly when the method is PSK (§5:
    any other combination is dropped).  Whether SDH is available in the
    suite, and everything about credentials, is the engine's.

    :raise MalformedMessage: reason ``"shape"`` (or ``"cbor"``,
        ``"not-deterministic"``), or ``"auth"`` for an unknown method or a
        ``kid``/method mismatch; ``claimed_id`` is set once the body's ``id``
        could be read.
    """
    value = _decode(plaintext)
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedMessage(SHAPE, "HELLO plaintext is not [body, auth]")
    body_bytes, auth = value
    _shape(_bstr_problem("body", body_bytes))
    body = parse_hello_body(body_bytes)
    if not isinstance(auth, list) or len(auth) != 2:
        raise MalformedMessage(SHAPE, "auth is not [method, value]", body.id)
    method, auth_value = auth
    _shape(
        _first(
            _uint_problem("method", method), _bstr_problem("value", auth_value, 1, MAX_AUTH_VALUE)
        ),
        body.id,
    )
    if method not in _METHODS:
        raise MalformedMessage(AUTH, f"unknown auth method {method}", body.id)
    if (body.kid == 0) != (method == AuthMethod.PSK):
        raise MalformedMessage(AUTH, f"kid {body.kid} with auth method {method}", body.id)
    return HelloPlaintext(body_bytes, body, AuthMethod(method), auth_value)


# --- DataBody (§8.1) ------------------------------------------------------------


def _data_body_problem(ts: object, tok: object, pl: object) -> str | None:
    return _first(
        _optional(_uint_problem("ts", ts), ts),
        _bstr_problem("tok", tok, MIN_DATA_TOK, MAX_TOK),
        None if pl is None or isinstance(pl, Payload) else "pl must be a Payload",
    )


@dataclass(frozen=True, kw_only=True)
class DataBody:
    """
    The DataBody map (§8.1), a DATA's plaintext: ``{? 3: ts, 4: tok, ? 5: pl}``.

    :ivar ts: module time of sending or of measurement, or ``None``.
    :ivar tok: 4-32 bytes naming the logical message (the same on a re-send).
    :ivar pl: the Payload, or ``None``.
    """

    ts: int | None = None
    tok: bytes
    pl: Payload | None = None

    def __post_init__(self) -> None:
        _check(_data_body_problem(self.ts, self.tok, self.pl))

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value."""
        value: dict[int, Any] = {_TOK: self.tok}
        if self.ts is not None:
            value[_TS] = self.ts
        if self.pl is not None:
            value[_PL] = self.pl.to_cbor()
        return value

    def encode(self) -> bytes:
        """The DATA plaintext."""
        return cbor.encode(self.to_cbor())


def parse_data_body(plaintext: bytes) -> DataBody:
    """
    Parse a decrypted DATA plaintext.

    A malformed DataBody (not a map; ``tok`` missing or not 4-32 bytes; ``ts``
    not a uint; ``pl`` not a map) raises: the DATA is dropped and counted, its
    ``ctr`` counts as accepted (§8).  Malformed items inside ``pl`` do not
    raise; see :attr:`Payload.errors`.

    :raise MalformedMessage: the DataBody must be dropped.
    """
    fields = _map(_decode(plaintext), "DataBody")
    ts = fields.get(_TS, _ABSENT)
    tok = fields.get(_TOK, _ABSENT)
    _shape(
        _first(
            None if ts is _ABSENT else _uint_problem("ts", ts),
            _bstr_problem("tok", tok, MIN_DATA_TOK, MAX_TOK),
        )
    )
    pl = _payload_or_none(fields.get(_PL, _ABSENT))
    # ts and tok passed the checks of DataBody just above; pl is a Payload or None.
    return _checked(DataBody, {"ts": None if ts is _ABSENT else ts, "tok": tok, "pl": pl})


# --- Instructions and their bodies (§8.2, §9) ----------------------------------------


def _instruction_problem(iid: object, kind: object, not_after: object) -> str | None:
    return _first(
        _uint_problem("iid", iid),
        _tstr_problem("kind", kind),
        _optional(_uint_problem("not_after", not_after), not_after),
    )


@dataclass(frozen=True)
class InstructionItem:
    """
    An Instruction as it rides in a reply: ``[iid, kind, body, ? not_after]`` (§8.2).

    :ivar body: any CBOR value (``None`` encodes ``null``).
    :ivar not_after: gateway time after which the module must not execute it, or ``None``.
    """

    iid: int
    kind: str
    body: Any
    not_after: int | None = None

    def __post_init__(self) -> None:
        _check(_instruction_problem(self.iid, self.kind, self.not_after))

    def to_cbor(self) -> list[Any]:
        """The CBOR data model value."""
        value: list[Any] = [self.iid, self.kind, self.body]
        if self.not_after is not None:
            value.append(self.not_after)
        return value

    def encode(self) -> bytes:
        """The encoded Instruction."""
        return cbor.encode(self.to_cbor())

    def encoded_size(self) -> int:
        """The bytes this Instruction takes inside a reply's ``ins`` array."""
        return len(self.encode())

    @classmethod
    def from_cbor(cls, value: object) -> InstructionItem:
        """
        Read an Instruction from its CBOR data model value.

        :raise MalformedMessage: not ``[iid uint, kind tstr, body, ? not_after uint]``.
        """
        if not isinstance(value, list) or len(value) not in (3, 4):
            raise MalformedMessage(SHAPE, "instruction is not [iid, kind, body, ? not_after]")
        not_after = value[3] if len(value) == 4 else None
        _shape(
            _first(
                _instruction_problem(value[0], value[1], None),
                _uint_problem("not_after", not_after) if len(value) == 4 else None,
            )
        )
        return cls(value[0], value[1], value[2], not_after)


def _head_size(value: int) -> int:
    if value < 24:
        return 1
    if value < 0x100:
        return 2
    if value < 0x10000:
        return 3
    if value < 0x100000000:
        return 5
    return 9


def instruction_wire_size(
    kind: str, body: Any, not_after: int | None = None, iid: int | None = None
) -> int:
    """
    The bytes an Instruction takes inside a reply's ``ins`` array.

    The store assigns ``iid`` after the engine computes the size of a new
    instruction, so with ``iid=None`` the largest ``iid`` encoding (9 bytes)
    is assumed: the size is then an upper bound, never an underestimate.

    :param body: the instruction body (any CBOR value).
    :raise ValueError: a field of the wrong type.
    """
    item = InstructionItem(0 if iid is None else iid, kind, body, not_after)
    size = item.encoded_size()
    if iid is None:
        size += _head_size(MAX_UINT) - _head_size(0)
    return size


def _params_problem(
    suite: object,
    ttl: object,
    seed: object,
    kid: object,
    pid: object,
    curve: object,
    eq: object,
    rsa_bits: object,
    hash_name: object,
) -> str | None:
    eq_problem = None
    if eq is not None and (
        not isinstance(eq, (list, tuple))
        or len(eq) != 7
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in eq)
    ):
        eq_problem = "eq is not [p, a, b, gx, gy, n, h] of uint"
    return _first(
        _tstr_problem("suite", suite, 0, MAX_SUITE_NAME),
        _uint_problem("ttl", ttl),
        _bstr_problem("seed", seed, MIN_SEED, MAX_SEED),
        _uint_problem("kid", kid),
        _uint_problem("pid", pid),
        _optional(_tstr_problem("curve", curve), curve),
        eq_problem,
        _optional(_uint_problem("rsa_bits", rsa_bits, MIN_RSA_BITS, MAX_RSA_BITS), rsa_bits),
        _optional(_tstr_problem("hash", hash_name), hash_name),
    )


@dataclass(frozen=True, kw_only=True)
class Params:
    """
    A set of key generation parameters (§9), the body of a ``"keygen"`` instruction.

    :ivar suite: the suite of the new key.
    :ivar ttl: lifetime of the new key in seconds.
    :ivar seed: 16-32 bytes of server randomness the module mixes with its own.
    :ivar kid: the id the new key must take.
    :ivar pid: the id of this set.
    :ivar curve: ``"P-256"``, ``"P-384"``, ``"Ed25519"``, or ``None``.
    :ivar eq: a custom curve ``(p, a, b, gx, gy, n, h)``, or ``None``.
    :ivar rsa_bits: 2048-3072, or ``None``.
    :ivar hash: ``"SHA-256"``, ``"SHA-384"``, or ``None``.
    """

    suite: str
    ttl: int
    seed: bytes = field(repr=False)
    kid: int
    pid: int
    curve: str | None = None
    eq: tuple[int, ...] | None = None
    rsa_bits: int | None = None
    hash: str | None = None

    def __post_init__(self) -> None:
        _check(
            _params_problem(
                self.suite,
                self.ttl,
                self.seed,
                self.kid,
                self.pid,
                self.curve,
                self.eq,
                self.rsa_bits,
                self.hash,
            )
        )

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value (the ``"keygen"`` instruction body)."""
        value: dict[int, Any] = {
            _P_SUITE: self.suite,
            _P_TTL: self.ttl,
            _P_SEED: self.seed,
            _P_KID: self.kid,
            _P_PID: self.pid,
        }
        if self.curve is not None:
            value[_P_CURVE] = self.curve
        if self.eq is not None:
            value[_P_EQ] = list(self.eq)
        if self.rsa_bits is not None:
            value[_P_RSA_BITS] = self.rsa_bits
        if self.hash is not None:
            value[_P_HASH] = self.hash
        return value

    def encode(self) -> bytes:
        """The encoded Params map."""
        return cbor.encode(self.to_cbor())


def parse_params(value: object) -> Params:
    """
    Read Params from a decoded CBOR value (a ``"keygen"`` instruction's body).

    :raise MalformedMessage: not a map, a required key missing, or a field of
        the wrong type or range.
    """
    fields = _map(value, "Params")
    get = fields.get
    args = {
        "suite": get(_P_SUITE, _ABSENT),
        "ttl": get(_P_TTL, _ABSENT),
        "seed": get(_P_SEED, _ABSENT),
        "kid": get(_P_KID, _ABSENT),
        "pid": get(_P_PID, _ABSENT),
        "curve": get(_P_CURVE),
        "eq": get(_P_EQ),
        "rsa_bits": get(_P_RSA_BITS),
        "hash": get(_P_HASH),
    }
    _shape(_params_problem(*args.values()))
    if args["eq"] is not None:
        args["eq"] = tuple(args["eq"])
    return Params(**args)


def _skey_problem(
    skid: object, suite: object, pub: object, sig_pub: object, sig: object
) -> str | None:
    return _first(
        _uint_problem("skid", skid),
        _tstr_problem("suite", suite, 0, MAX_SUITE_NAME),
        _bstr_problem("pub", pub),
        _optional(_bstr_problem("sig_pub", sig_pub), sig_pub),
        _bstr_problem("sig", sig),
    )


@dataclass(frozen=True, kw_only=True)
class SkeyBody:
    """
    The body of a ``"skey"`` instruction (§8.2).

    ``{1: skid, 2: suite, 3: pub, ? 4: sig_pub, 5: sig}``.

    :ivar pub: the new server public key (the X25519 one for ``"x25519"``).
    :ivar sig_pub: the Ed25519 signature key for ``"x25519"``, else ``None``.
    :ivar sig: the signature of the carrying session's server key over
        ``CBOR ["MGP1 skey", skid, suite, pub, sig_pub or null]``
        (:func:`m2mgw.protocol.keyschedule.skey_tbs`).
    """

    skid: int
    suite: str
    pub: bytes
    sig_pub: bytes | None = None
    sig: bytes

    def __post_init__(self) -> None:
        _check(_skey_problem(self.skid, self.suite, self.pub, self.sig_pub, self.sig))

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value (the instruction body)."""
        value: dict[int, Any] = {
            _SK_SKID: self.skid,
            _SK_SUITE: self.suite,
            _SK_PUB: self.pub,
            _SK_SIG: self.sig,
        }
        if self.sig_pub is not None:
            value[_SK_SIG_PUB] = self.sig_pub
        return value


def parse_skey_body(value: object) -> SkeyBody:
    """
    Read a ``"skey"`` instruction body from its decoded CBOR value.

    :raise MalformedMessage: not a map, a required key missing, or a field of the wrong type.
    """
    fields = _map(value, "skey body")
    skid = fields.get(_SK_SKID, _ABSENT)
    suite = fields.get(_SK_SUITE, _ABSENT)
    pub = fields.get(_SK_PUB, _ABSENT)
    sig_pub = fields.get(_SK_SIG_PUB, _ABSENT)
    sig = fields.get(_SK_SIG, _ABSENT)
    _shape(_skey_problem(skid, suite, pub, None if sig_pub is _ABSENT else sig_pub, sig))
    return SkeyBody(
        skid=skid,
        suite=suite,
        pub=pub,
        sig_pub=None if sig_pub is _ABSENT else sig_pub,
        sig=sig,
    )


# --- ReplyBody (§8.2) and the HELLO_REPLY plaintext (§6) ------------------------------


class ErrorEntry(NamedTuple):
    """An ``err`` entry ``[code, text]``; ``code`` is an :class:`ErrorCode` value."""

    code: int
    text: str


def _keyreg_result_problem(value: object) -> str | None:
    if not isinstance(value, (list, tuple)) or len(value) not in (2, 3):
        return "res 12 is not [kid, status, ? reason]"
    return _first(
        _uint_problem("res kid", value[0]),
        _uint_problem("res status", value[1]),
        _tstr_problem("res reason", value[2]) if len(value) == 3 else None,
    )


@dataclass(frozen=True)
class KeyRegResult:
    """
    The result of a keyreg in ``res``: ``{12: [kid, status, ? reason]}`` (§8.2).

    :ivar status: a :class:`KeyRegStatus` value.
    """

    kid: int
    status: int
    reason: str | None = None

    def __post_init__(self) -> None:
        _check(_keyreg_result_problem(self.to_cbor()))

    def to_cbor(self) -> list[Any]:
        """The CBOR data model value, to put under key 12 of ``res``."""
        value: list[Any] = [self.kid, self.status]
        if self.reason is not None:
            value.append(self.reason)
        return value

    @classmethod
    def from_cbor(cls, value: object) -> KeyRegResult:
        """
        Read a keyreg result.

        :raise MalformedMessage: not ``[kid uint, status uint, ? reason tstr]``.
        """
        _shape(_keyreg_result_problem(value))
        assert isinstance(value, list)
        return cls(value[0], value[1], value[2] if len(value) == 3 else None)


def _reply_body_problem(
    ack: object,
    stok: object,
    exp: object,
    time: object,
    ins: object,
    more: object,
    alias: object,
    err: object,
    res: object,
) -> str | None:
    problem = _first(
        _bstr_problem("ack", ack, MIN_DATA_TOK, MAX_TOK),
        _optional(_bstr_problem("stok", stok, STOK_SIZE, STOK_SIZE), stok),
        _optional(_uint_problem("exp", exp), exp),
        _optional(_uint_problem("time", time), time),
        _optional(_bstr_problem("alias", alias, MIN_ALIAS, MAX_ALIAS), alias),
    )
    if problem is not None:
        return problem
    if not isinstance(ins, tuple) or not all(isinstance(i, InstructionItem) for i in ins):
        return "ins must be a tuple of InstructionItem"
    if any(a.iid >= b.iid for a, b in itertools.pairwise(ins)):
        return "ins iids are not ascending"
    if type(more) is not bool:
        return "more is not a bool"
    if not isinstance(err, tuple):
        return "err must be a tuple"
    for entry in err:
        if not isinstance(entry, tuple) or len(entry) != 2:
            return "err entry is not [code, text]"
        problem = _uint_problem("err code", entry[0]) or _tstr_problem("err text", entry[1])
        if problem is not None:
            return problem
    if not isinstance(res, Mapping) or not all(is_uint(key) for key in res):
        return "res must be a map with uint keys"
    if _KEYREG in res:
        return _keyreg_result_problem(res[_KEYREG])
    return None


@dataclass(frozen=True, kw_only=True)
class ReplyBody:
    """
    The ReplyBody map (§8.2, §6, §7): a DATA_REPLY's plaintext, a HELLO_REPLY's body.

    Absent optional fields are left out of the encoding; ``more`` is encoded
    only when true.

    :ivar ack: the ``tok`` of the message answered.
    :ivar stok: the session token (16 bytes), HELLO_REPLY only.
    :ivar exp: the session lifetime in seconds, HELLO_REPLY only.
    :ivar time: gateway time (required in a HELLO_REPLY; in a DATA_REPLY when asked).
    :ivar ins: the instructions, ``iid`` ascending.
    :ivar more: more instructions are queued.
    :ivar alias: a transitory identity (8-16 bytes) for the next HELLO's hint.
    :ivar err: the ``err`` entries.
    :ivar res: results per payload item, as CBOR values keyed by Payload key
        (``{12: KeyRegResult(...).to_cbor()}``).
    """

    ack: bytes
    stok: bytes | None = field(default=None, repr=False)
    exp: int | None = None
    time: int | None = None
    ins: tuple[InstructionItem, ...] = ()
    more: bool = False
    alias: bytes | None = None
    err: tuple[ErrorEntry, ...] = ()
    res: Mapping[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            _reply_body_problem(
                self.ack,
                self.stok,
                self.exp,
                self.time,
                self.ins,
                self.more,
                self.alias,
                self.err,
                self.res,
            )
        )

    @classmethod
    def ack_only(cls, ack: bytes, time: int | None = None) -> ReplyBody:
        """
        A ReplyBody with ``ack`` and ``time`` only, without the checks of the
        constructor: for the per-datagram path, where ``ack`` is a ``tok``
        that :func:`parse_data_body` or :func:`parse_hello_body` accepted
        (4-32 bytes) and ``time`` the gateway's clock.
        """
        fields: dict[str, Any] = {
            "ack": ack,
            "stok": None,
            "exp": None,
            "time": time,
            "ins": (),
            "more": False,
            "alias": None,
            "err": (),
            "res": {},
        }
        return _checked(cls, fields)

    @classmethod
    def hello_base(
        cls,
        ack: bytes,
        stok: bytes,
        exp: int,
        time: int,
        alias: bytes | None,
        err: tuple[ErrorEntry, ...] = (),
        res: Mapping[int, Any] | None = None,
    ) -> ReplyBody:
        """
        The body of a HELLO_REPLY before instructions, as the constructor
        makes it.  The usual one (no ``err`` or ``res``, fields of their
        plain types) is checked in line: the constructor's checks of the five
        scalar fields (``ins``, ``more``, ``err`` and ``res`` are then the
        defaults, which pass); anything else goes through the constructor.

        :raise ValueError: a field of the wrong type or size.
        """
        usual = (
            not err
            and not res
            and type(ack) is bytes
            and MIN_DATA_TOK <= len(ack) <= MAX_TOK
            and type(stok) is bytes
            and len(stok) == STOK_SIZE
            and type(exp) is int
            and 0 <= exp <= MAX_UINT
            and type(time) is int
            and 0 <= time <= MAX_UINT
            and (alias is None or (type(alias) is bytes and MIN_ALIAS <= len(alias) <= MAX_ALIAS))
        )
        if not usual:  # the constructor decides, and raises the usual errors
            return cls(ack=ack, stok=stok, exp=exp, time=time, alias=alias, err=err, res=res or {})
        fields = {
            "ack": ack,
            "stok": stok,
            "exp": exp,
            "time": time,
            "ins": (),
            "more": False,
            "alias": alias,
            "err": (),
            "res": {},
        }
        return _checked(cls, fields)

    @property
    def keyreg_result(self) -> KeyRegResult | None:
        """The keyreg result under ``res`` key 12, if any."""
        value = self.res.get(_KEYREG)
        return None if value is None else KeyRegResult.from_cbor(list(value))

    def to_cbor(self) -> dict[int, Any]:
        """The CBOR data model value."""
        value: dict[int, Any] = {_ACK: self.ack}
        if self.stok is not None:
            value[_STOK] = self.stok
        if self.exp is not None:
            value[_EXP] = self.exp
        if self.time is not None:
            value[_TIME] = self.time
        if self.ins:
            value[_INS] = [item.to_cbor() for item in self.ins]
        if self.more:
            value[_MORE] = True
        if self.alias is not None:
            value[_ALIAS] = self.alias
        if self.err:
            value[_ERR] = [[entry[0], entry[1]] for entry in self.err]
        if self.res:
            value[_RES] = dict(self.res)
        return value

    def encode(self) -> bytes:
        """The DATA_REPLY plaintext, or the HELLO_REPLY body bytes."""
        if not self.ins and not self.err and not self.res:
            encoded = self._encode_scalars()
            if encoded is not None:
                return encoded
        return cbor.encode(self.to_cbor())

    def _encode_scalars(self) -> bytes | None:
        """
        The encoding of a body without ``ins``, ``err`` and ``res``, put
        together from its heads (keys 1-7 are one byte each and ascend), or
        ``None`` if a field has not its plain built-in type.  The same bytes
        as :func:`cbor.encode` of :meth:`to_cbor`.
        """
        ack, stok, exp, time, alias = self.ack, self.stok, self.exp, self.time, self.alias
        if type(ack) is not bytes:
            return None
        parts = [b"\x01", cbor.encode_bytes(ack)]
        if stok is not None:
            if type(stok) is not bytes:
                return None
            parts += (b"\x02", cbor.encode_bytes(stok))
        for key, number in ((b"\x03", exp), (b"\x04", time)):
            if number is not None:
                if type(number) is not int or not 0 <= number <= MAX_UINT:
                    return None
                parts += (key, cbor.head(0, number))
        if self.more:
            if self.more is not True:
                return None
            parts += (b"\x06", b"\xf5")
        if alias is not None:
            if type(alias) is not bytes:
                return None
            parts += (b"\x07", cbor.encode_bytes(alias))
        return cbor.head(5, len(parts) // 2) + b"".join(parts)


def _read_reply_body(value: object) -> ReplyBody:
    fields = _map(value, "ReplyBody")
    ins_value = fields.get(_INS, [])
    if not isinstance(ins_value, list):
        raise MalformedMessage(SHAPE, "ins is not an array")
    ins = tuple(InstructionItem.from_cbor(item) for item in ins_value)
    err_value = fields.get(_ERR, [])
    if not isinstance(err_value, list) or not all(
        isinstance(entry, list) and len(entry) == 2 for entry in err_value
    ):
        raise MalformedMessage(SHAPE, "err is not an array of [code, text]")
    err = tuple(ErrorEntry(entry[0], entry[1]) for entry in err_value)
    res = _int_keyed(_map(fields.get(_RES, {}), "res"))
    more = fields.get(_MORE, False)
    args = {
        "ack": fields.get(_ACK, _ABSENT),
        "stok": fields.get(_STOK),
        "exp": fields.get(_EXP),
        "time": fields.get(_TIME),
        "ins": ins,
        "more": more,
        "alias": fields.get(_ALIAS),
        "err": err,
        "res": res,
    }
    _shape(_reply_body_problem(*args.values()))
    return ReplyBody(**args)


def parse_reply_body(plaintext: bytes) -> ReplyBody:
    """
    Parse a ReplyBody: a decrypted DATA_REPLY plaintext, or a HELLO_REPLY's body bytes.

    The module side uses it; the whole reply is refused if anything in it is
    malformed (instructions included).

    :raise MalformedMessage: not deterministic CBOR, not a map, or a field
        missing or of the wrong type or size.
    """
    return _read_reply_body(_decode(plaintext))


class HelloReplyPlaintext(NamedTuple):
    """
    A parsed HELLO_REPLY plaintext ``[body, sig]``.

    :ivar body_bytes: the body exactly as received (the signature covers it).
    :ivar sig: the server signature, or ``None`` when the gateway signs no replies.
    """

    body_bytes: bytes
    body: ReplyBody
    sig: bytes | None


def build_hello_reply_plaintext(body_bytes: bytes, sig: bytes | None) -> bytes:
    """
    Build the HELLO_REPLY plaintext ``CBOR [body, sig or null]``.

    :param body_bytes: :meth:`ReplyBody.encode` output.
    :raise ValueError: an argument of the wrong type.
    """
    _check(_bstr_problem("body", body_bytes) or _optional(_bstr_problem("sig", sig), sig))
    if type(body_bytes) is bytes and (sig is None or type(sig) is bytes):
        # From the heads: the same bytes as cbor.encode, faster.
        sig_item = _NULL if sig is None else cbor.encode_bytes(sig)
        return b"".join((_ARRAY_OF_TWO, cbor.encode_bytes(body_bytes), sig_item))
    return cbor.encode([body_bytes, sig])


_ARRAY_OF_TWO = cbor.head(4, 2)
_NULL = b"\xf6"


def parse_hello_reply_plaintext(plaintext: bytes) -> HelloReplyPlaintext:
    """
    Parse a decrypted HELLO_REPLY plaintext and its ReplyBody.

    ``stok``, ``exp`` and ``time`` are required in a HELLO_REPLY (§6, §8.2).

    :raise MalformedMessage: the reply must be dropped.
    """
    value = _decode(plaintext)
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedMessage(SHAPE, "HELLO_REPLY plaintext is not [body, sig]")
    body_bytes, sig = value
    _shape(_bstr_problem("body", body_bytes) or _optional(_bstr_problem("sig", sig), sig))
    body = parse_reply_body(body_bytes)
    if body.stok is None or body.exp is None or body.time is None:
        raise MalformedMessage(SHAPE, "HELLO_REPLY body without stok, exp or time")
    return HelloReplyPlaintext(body_bytes, body, sig)


# --- reply sizing -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyFrame:
    """
    What wraps a ReplyBody on the wire, for size computations.

    Build it with :meth:`hello_reply` or :meth:`data_reply`.

    :ivar ctr: the DATA_REPLY's ``ctr``; ``None`` for a HELLO_REPLY.
    :ivar sig_len: the HELLO_REPLY signature's size, ``None`` for ``null``.
    :ivar tag_len: the suite's AEAD tag size.
    """

    sid: bytes
    tag_len: int
    ctr: int | None = None
    sig_len: int | None = None

    @classmethod
    def hello_reply(cls, sid: bytes, *, tag_len: int, sig_len: int | None) -> ReplyFrame:
        """The frame of a HELLO_REPLY with a signature of ``sig_len`` bytes (``None``: unsigned)."""
        return cls(sid, tag_len, None, sig_len)

    @classmethod
    def data_reply(cls, sid: bytes, ctr: int, *, tag_len: int) -> ReplyFrame:
        """The frame of a DATA_REPLY answering DATA ``ctr``."""
        return cls(sid, tag_len, ctr, None)

    def datagram_size(self, body_size: int) -> int:
        """The size of the reply datagram around a ReplyBody of ``body_size`` bytes."""
        if self.ctr is None:
            sig_size = 1 if self.sig_len is None else _head_size(self.sig_len) + self.sig_len
            plaintext = 1 + _head_size(body_size) + body_size + sig_size
            counter = 0
        else:
            plaintext = body_size
            counter = _head_size(self.ctr)
        ct = plaintext + self.tag_len
        sid = _head_size(len(self.sid)) + len(self.sid)
        return 3 + sid + counter + _head_size(ct) + ct


def reply_datagram_size(body: ReplyBody, frame: ReplyFrame) -> int:
    """The exact size of the reply datagram carrying ``body`` in ``frame``."""
    return frame.datagram_size(len(body.encode()))


def ins_budget(body: ReplyBody, frame: ReplyFrame, max_datagram: int) -> int:
    """
    How many bytes of Instructions fit in a reply, for :class:`~m2mgw.records.Delivery`.

    ``body`` is the reply as it will be sent but without instructions (its
    ``ins`` and ``more`` are ignored).  Any set of Instructions whose encoded
    sizes sum to at most the budget, with ``more`` true or false, keeps the
    datagram within ``max_datagram``: the budget reserves ``more``, key 5,
    the ``ins`` array head for as many items as could fit, and the growth of
    the length heads around the body (the HELLO_REPLY body bstr and ``ct``).

    :return: the budget in bytes, 0 if nothing fits (the reply without
        instructions may itself be too large; see :func:`reply_datagram_size`).
    """
    base = replace(body, ins=(), more=False)
    base_value = base.to_cbor()
    base_size = len(cbor.encode(base_value))
    added_keys = 2  # 5 ins, 6 more
    map_growth = _head_size(len(base_value) + added_keys) - _head_size(len(base_value))
    fixed = base_size + map_growth + 2  # 6: true

    def total(budget: int) -> int:
        if budget == 0:
            return frame.datagram_size(fixed)
        most_items = max(1, budget // MIN_INSTRUCTION_SIZE)
        return frame.datagram_size(fixed + 1 + _head_size(most_items) + budget)

    if total(0) > max_datagram:
        return 0
    low, high = 0, max(0, max_datagram)
    while low < high:
        middle = (low + high + 1) // 2
        if total(middle) <= max_datagram:
            low = middle
        else:
            high = middle - 1
    return low
