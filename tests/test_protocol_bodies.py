"""
Tests for :mod:`m2mgw.protocol.bodies`: the MGP/1 plaintext structures and reply sizing.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from m2mgw.errors import DecodeError
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import (
    MISSING,
    AuthMethod,
    ConfEntry,
    DataBody,
    ErrorCode,
    ErrorEntry,
    HelloBody,
    InstructionItem,
    InvalidKeyReg,
    ItemError,
    KeyReg,
    KeyRegResult,
    KeyRegStatus,
    Note,
    Params,
    Payload,
    ReplyBody,
    ReplyFrame,
    SkeyBody,
    build_hello_plaintext,
    build_hello_reply_plaintext,
    ins_budget,
    instruction_wire_size,
    parse_data_body,
    parse_hello_body,
    parse_hello_plaintext,
    parse_hello_reply_plaintext,
    parse_params,
    parse_payload,
    parse_reply_body,
    parse_skey_body,
    reply_datagram_size,
)
from m2mgw.protocol.messages import (
    MAX_RECEIVED_DATAGRAM,
    DataReply,
    HelloReply,
    MalformedMessage,
    parse_datagram,
)
from tests.codec_helpers import (
    data_bodies,
    hello_bodies,
    instruction_lists,
    payloads,
    reply_bodies,
    sids,
)

ID = "mgp1-vector-module"
TOK16 = bytes(range(16))
TOK8 = bytes(range(8))
SEED = bytes(range(100, 120))


def _enc(value: object) -> bytes:
    return cbor.encode(value)


def _hello_map(**changes: object) -> dict[Any, Any]:
    value: dict[Any, Any] = {1: ID, 2: 1, 3: 1700000001, 4: TOK16}
    for key, item in changes.items():
        number = int(key[1:])
        if item is None:
            del value[number]
        else:
            value[number] = item
    return value


def _malformed(parse: Any, data: Any) -> MalformedMessage:
    with pytest.raises(MalformedMessage) as caught:
        parse(data)
    assert isinstance(caught.value, DecodeError)
    return caught.value


# --- HelloBody and the HELLO plaintext ---------------------------------------------


def test_hello_body_encodes_its_map() -> None:
    body = HelloBody(id=ID, kid=0, ts=5, tok=TOK16, pl=Payload(data=[1]))
    assert body.encode() == _enc({1: ID, 2: 0, 3: 5, 4: TOK16, 5: {10: [1]}})
    assert HelloBody(id=ID, kid=0, ts=5, tok=TOK16).encode() == _enc({1: ID, 2: 0, 3: 5, 4: TOK16})
    assert parse_hello_body(body.encode()) == body


@pytest.mark.parametrize(
    "changes",
    [
        {"id": ""},
        {"id": "x" * 65},
        {"id": "é" * 33},
        {"id": b"id"},
        {"kid": -1},
        {"kid": True},
        {"ts": 2**64},
        {"tok": bytes(7)},
        {"tok": bytes(33)},
        {"tok": "tok"},
        {"pl": {10: 1}},
    ],
    ids=repr,
)
def test_hello_body_builder_validates(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"id": ID, "kid": 1, "ts": 1, "tok": TOK8}
    fields.update(changes)
    with pytest.raises(ValueError):
        HelloBody(**fields)


HELLO_BODY_DROPS = [
    ("not-a-map", _enc([ID, 1, 1, TOK16]), False),
    ("id-missing", _enc(_hello_map(k1=None)), False),
    ("id-empty", _enc(_hello_map(k1="")), False),
    ("id-65", _enc(_hello_map(k1="a" * 65)), False),
    ("id-bstr", _enc(_hello_map(k1=ID.encode())), False),
    ("kid-missing", _enc(_hello_map(k2=None)), True),
    ("kid-bool", _enc(_hello_map(k2=True)), True),
    ("kid-negative", _enc(_hello_map(k2=-1)), True),
    ("ts-missing", _enc(_hello_map(k3=None)), True),
    ("ts-text", _enc(_hello_map(k3="1")), True),
    ("ts-bignum", _enc(_hello_map(k3=2**64)), True),
    ("tok-missing", _enc(_hello_map(k4=None)), True),
    ("tok-7", _enc(_hello_map(k4=bytes(7))), True),
    ("tok-33", _enc(_hello_map(k4=bytes(33))), True),
    ("pl-array", _enc(_hello_map(k5=[1])), True),
    ("pl-null", _enc({**_hello_map(), 5: None}), True),
    (
        "not-deterministic",
        b"\xa4\x01\x72" + ID.encode() + b"\x02\x18\x01\x03\x01\x04\x48" + TOK8,
        False,
    ),
]


@pytest.mark.parametrize(
    ("body", "has_id"), [d[1:] for d in HELLO_BODY_DROPS], ids=[d[0] for d in HELLO_BODY_DROPS]
)
def test_hello_body_drops(body: bytes, has_id: bool) -> None:
    error = _malformed(parse_hello_body, body)
    assert error.claimed_id == (ID if has_id else None)


def test_hello_body_ignores_unknown_keys_and_never_reads_true_as_1() -> None:
    body = _enc({**_hello_map(), 6: "later", "x": 1, -1: b"", 100: [1, 2]})
    assert parse_hello_body(body) == HelloBody(id=ID, kid=1, ts=1700000001, tok=TOK16)
    # CBOR true and 1.0 are different keys from 1, although Python says True == 1.0 == 1.
    for key in (True, 1.0):
        fake = _hello_map(k1=None)
        fake[key] = ID
        assert _malformed(parse_hello_body, _enc(fake)).claimed_id is None


@pytest.mark.parametrize(
    ("kid", "method"),
    [(0, AuthMethod.PSK), (1, AuthMethod.SIG), (1, AuthMethod.SDH), (2**64 - 1, AuthMethod.SIG)],
)
def test_hello_plaintext_round_trip(kid: int, method: AuthMethod) -> None:
    body_bytes = HelloBody(id=ID, kid=kid, ts=9, tok=TOK16).encode()
    plaintext = build_hello_plaintext(body_bytes, method, b"\x05" * 32)
    assert plaintext == _enc([body_bytes, [int(method), b"\x05" * 32]])
    parsed = parse_hello_plaintext(plaintext)
    body_out, body, method_out, value = parsed  # a 4-tuple, as the engine unpacks it
    assert (body_out, body.kid, method_out, value) == (body_bytes, kid, method, b"\x05" * 32)
    assert type(parsed.method) is AuthMethod


@pytest.mark.parametrize(("kid", "method"), [(0, 1), (0, 3), (1, 2), (5, 2), (1, 0), (1, 4)])
def test_hello_plaintext_kid_method_mismatch_is_an_auth_drop(kid: int, method: int) -> None:
    body_bytes = HelloBody(id=ID, kid=kid, ts=9, tok=TOK16).encode()
    error = _malformed(parse_hello_plaintext, _enc([body_bytes, [method, b"\x05" * 16]]))
    assert error.reason == "auth"
    assert error.claimed_id == ID


_GOOD_BODY = HelloBody(id=ID, kid=1, ts=9, tok=TOK16).encode()

HELLO_PLAINTEXT_DROPS = [
    ("not-array", _enc({0: _GOOD_BODY}), "shape", None),
    ("one-element", _enc([_GOOD_BODY]), "shape", None),
    ("three-elements", _enc([_GOOD_BODY, [1, b"s"], None]), "shape", None),
    ("body-map", _enc([_hello_map(), [1, b"s"]]), "shape", None),
    ("body-not-cbor", _enc([b"\xff", [1, b"s"]]), "cbor", None),
    ("body-trailing", _enc([_GOOD_BODY + b"\x00", [1, b"s"]]), "cbor", None),
    ("auth-not-array", _enc([_GOOD_BODY, b"sig"]), "shape", ID),
    ("auth-three", _enc([_GOOD_BODY, [1, b"s", 0]]), "shape", ID),
    ("method-bool", _enc([_GOOD_BODY, [True, b"s"]]), "shape", ID),
    ("method-text", _enc([_GOOD_BODY, ["SIG", b"s"]]), "shape", ID),
    ("value-tstr", _enc([_GOOD_BODY, [1, "s"]]), "shape", ID),
    ("value-empty", _enc([_GOOD_BODY, [1, b""]]), "shape", ID),
    ("value-513", _enc([_GOOD_BODY, [1, bytes(513)]]), "shape", ID),
    (
        "not-deterministic",
        b"\x82\x59\x00" + bytes([len(_GOOD_BODY)]) + _GOOD_BODY + b"\x82\x01\x41s",
        "not-deterministic",
        None,
    ),
    ("too-long", _enc([_GOOD_BODY, [1, bytes(1500)]]), "size", None),
]


@pytest.mark.parametrize(
    ("plaintext", "reason", "claimed_id"),
    [d[1:] for d in HELLO_PLAINTEXT_DROPS],
    ids=[d[0] for d in HELLO_PLAINTEXT_DROPS],
)
def test_hello_plaintext_drops(plaintext: bytes, reason: str, claimed_id: str | None) -> None:
    error = _malformed(parse_hello_plaintext, plaintext)
    assert (error.reason, error.claimed_id) == (reason, claimed_id)


@pytest.mark.parametrize(
    "args", [(b"body", 4, b"v"), (b"body", True, b"v"), ("body", 1, b"v"), (b"body", 1, b"")]
)
def test_build_hello_plaintext_validates(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        build_hello_plaintext(*args)


# --- DataBody ------------------------------------------------------------------------


def test_data_body_minimal_and_full() -> None:
    assert parse_data_body(_enc({4: b"tok4"})) == DataBody(tok=b"tok4")
    full = DataBody(ts=3, tok=TOK8, pl=Payload(data=None, req=("time",)))
    assert full.encode() == _enc({3: 3, 4: TOK8, 5: {10: None, 14: ["time"]}})
    assert parse_data_body(full.encode()) == full


DATA_BODY_DROPS = [
    ("array", _enc([3, TOK8])),
    ("tstr", _enc("tok")),
    ("tok-missing", _enc({3: 1})),
    ("tok-3", _enc({4: b"abc"})),
    ("tok-33", _enc({4: bytes(33)})),
    ("tok-tstr", _enc({4: "abcd"})),
    ("ts-negative", _enc({3: -1, 4: TOK8})),
    ("ts-bool", _enc({3: False, 4: TOK8})),
    ("ts-null", _enc({3: None, 4: TOK8})),
    ("ts-float", _enc({3: 1.5, 4: TOK8})),
    ("pl-array", _enc({4: TOK8, 5: []})),
    ("pl-null", _enc({4: TOK8, 5: None})),
    ("pl-bstr", _enc({4: TOK8, 5: b"\xa0"})),
    ("unsorted-keys", b"\xa2\x04\x48" + TOK8 + b"\x03\x01"),
    ("duplicate-key", b"\xa2\x04\x48" + TOK8 + b"\x04\x48" + TOK8),
    ("malformed", b"\xa1\x04"),
]


@pytest.mark.parametrize(
    "plaintext", [d[1] for d in DATA_BODY_DROPS], ids=[d[0] for d in DATA_BODY_DROPS]
)
def test_data_body_drops(plaintext: bytes) -> None:
    _malformed(parse_data_body, plaintext)


def test_data_body_builder_validates() -> None:
    for fields in ({"tok": b"abc"}, {"tok": TOK8, "ts": -1}, {"tok": TOK8, "pl": {}}):
        with pytest.raises(ValueError):
            DataBody(**fields)


# --- Payload: per-item tolerance ----------------------------------------------------------


def _payload(value: dict[Any, Any]) -> Payload:
    body = parse_data_body(_enc({4: TOK8, 5: value}))
    assert body.pl is not None
    return body.pl


def test_payload_data_null_is_not_missing() -> None:
    assert _payload({10: None}).data is None
    assert _payload({}).data is MISSING
    assert _payload({}) == Payload()
    assert repr(MISSING) == "MISSING"


def test_payload_data_passes_any_cbor_tags_included() -> None:
    data = [
        cbor.Tag(1, 1700000000),
        cbor.Tag(0, "2023-11-14T22:13:20Z"),
        cbor.Tag(4, [-2, 27315]),
        cbor.Tag(258, [1, 2]),
        cbor.Tag(55799, {"a": 1}),
        cbor.Tag(12345, b"x"),
        2**80,
        -(2**80),
        21.5,
        float("inf"),
    ]
    plaintext = _enc({4: TOK8, 5: {10: data}})
    body = parse_data_body(plaintext)
    assert body.pl is not None and body.pl.data == data
    assert body.encode() == plaintext
    # Other tags keep their content too (cbor2 hands it over as a tuple or
    # frozendict, which encodes the same).
    nested = _enc({4: TOK8, 5: {10: [cbor.Tag(6, [1, {"k": [2, cbor.Tag(7, {})]}])]}})
    assert parse_data_body(nested).encode() == nested


def test_payload_conf_keeps_good_entries_and_lists_bad_ones() -> None:
    payload = _payload(
        {
            11: [
                [1, 0, 5],
                [2, 3, 5],
                "x",
                [3, 1, 6, {"r": 1}],
                [4, 0],
                [True, 0, 1],
                [5, 2, 7, None],
            ]
        }
    )
    assert payload.conf == (
        ConfEntry(1, 0, 5),
        ConfEntry(3, 1, 6, {"r": 1}),
        ConfEntry(5, 2, 7, None),
    )
    assert [e.key for e in payload.errors] == [11, 11, 11, 11]
    assert "conf[1]" in payload.errors[0].text and "status" in payload.errors[0].text
    assert _payload({11: {}}).errors == (ItemError(11, "conf is not an array"),)


@pytest.mark.parametrize(
    "keyreg",
    [
        [1, b"pub"],
        b"keyreg",
        {2: b"pub", 3: "p256", 4: 0, 5: b"p", 6: b"p"},
        {1: True, 2: b"pub", 3: "p256", 4: 0, 5: b"p", 6: b"p"},
        {1: -1, 2: b"pub", 3: "p256", 4: 0, 5: b"p", 6: b"p"},
        {1: "1", 2: b"pub", 3: "p256", 4: 0, 5: b"p", 6: b"p"},
    ],
    ids=["array", "bstr", "kid-missing", "kid-bool", "kid-negative", "kid-text"],
)
def test_keyreg_without_usable_kid_is_an_item_error(keyreg: Any) -> None:
    payload = _payload({12: keyreg, 10: "kept"})
    assert payload.keyreg is None
    assert payload.data == "kept"
    assert [e.key for e in payload.errors] == [12]


_KEYREG = {1: 2, 2: b"\x04" * 65, 3: "p256", 4: 0, 5: b"\x01" * 64, 6: b"\x02" * 64}


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({2: None}, "pub"),
        ({2: "04"}, "pub"),
        ({3: None}, "suite"),
        ({3: b"p256"}, "suite"),
        ({3: "s" * 33}, "suite"),
        ({4: None}, "pid"),
        ({4: -1}, "pid"),
        ({5: None}, "proof"),
        ({6: None}, "pop"),
        ({6: 1}, "pop"),
    ],
)
def test_keyreg_with_kid_but_bad_fields_is_invalid_for_status_4(
    changes: dict[int, Any], word: str
) -> None:
    keyreg = {k: v for k, v in {**_KEYREG, **changes}.items() if v is not None}
    payload = _payload({12: keyreg})
    assert payload.errors == ()
    assert isinstance(payload.keyreg, InvalidKeyReg)
    assert payload.keyreg.kid == 2
    assert word in payload.keyreg.reason


def test_keyreg_complete() -> None:
    payload = _payload({12: {**_KEYREG, 7: "future"}})
    assert payload.keyreg == KeyReg(
        kid=2, pub=b"\x04" * 65, suite="p256", pid=0, proof=b"\x01" * 64, pop=b"\x02" * 64
    )
    assert payload.keyreg.to_cbor() == _KEYREG


@pytest.mark.parametrize(
    "note",
    [
        [0, "x"],
        {1: 8, 2: "x"},
        {1: -1, 2: "x"},
        {2: "x"},
        {1: 3},
        {1: 3, 2: 5},
        {1: 3, 2: "x", 3: b"t"},
    ],
)
def test_note_malformed_is_an_item_error(note: Any) -> None:
    payload = _payload({13: note})
    assert payload.note is None
    assert [e.key for e in payload.errors] == [13]


def test_note_good() -> None:
    assert _payload({13: {1: 2, 2: "overheat", 3: "81 C"}}).note == Note(2, "overheat", "81 C")
    assert _payload({13: {1: 7, 2: "dbg", 9: 1}}).note == Note(7, "dbg")


def test_req_keeps_strings_unknown_ones_included() -> None:
    payload = _payload({14: ["time", 7, "params", "teleport", None]})
    assert payload.req == ("time", "params", "teleport")
    assert [(e.key, e.text) for e in payload.errors] == [
        (14, "req[1] is not a tstr"),
        (14, "req[4] is not a tstr"),
    ]
    assert _payload({14: "time"}).errors == (ItemError(14, "req is not an array"),)


def test_payload_ignores_unknown_keys() -> None:
    assert _payload({15: 1, 9: "x", "a": 2, -5: None}) == Payload()


def test_payload_with_errors_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        _payload({14: [1]}).to_cbor()
    with pytest.raises(ValueError):
        Payload(keyreg=InvalidKeyReg(1, "pub missing")).to_cbor()


def test_parse_payload_refuses_a_non_map() -> None:
    assert _malformed(parse_payload, [1]).reason == "shape"


def test_payload_builder_validates() -> None:
    for fields in ({"conf": [ConfEntry(1, 0, 1)]}, {"req": ("a", 1)}, {"note": {1: 0}}):
        with pytest.raises(ValueError):
            Payload(**fields)
    with pytest.raises(ValueError):
        ConfEntry(1, 3, 1)
    with pytest.raises(ValueError):
        Note(8, "x")


# --- ReplyBody and the HELLO_REPLY plaintext ---------------------------------------------


def test_reply_body_omits_absent_keys_and_false_more() -> None:
    assert ReplyBody(ack=TOK8).encode() == _enc({1: TOK8})
    assert ReplyBody(ack=TOK8, more=True).encode() == _enc({1: TOK8, 6: True})
    item = InstructionItem(3, "set", {"a": 1}, 1700000100)
    body = ReplyBody(
        ack=TOK16,
        stok=bytes(16),
        exp=86400,
        time=1700000000,
        ins=(InstructionItem(1, "rehello", None), item),
        more=True,
        alias=bytes(12),
        err=(ErrorEntry(ErrorCode.UNKNOWN_REQUEST, "teleport"),),
        res={12: KeyRegResult(2, KeyRegStatus.NOT_ACCEPTABLE, "pub missing").to_cbor()},
    )
    assert body.encode() == _enc(
        {
            1: TOK16,
            2: bytes(16),
            3: 86400,
            4: 1700000000,
            5: [[1, "rehello", None], [3, "set", {"a": 1}, 1700000100]],
            6: True,
            7: bytes(12),
            8: [[1, "teleport"]],
            9: {12: [2, 4, "pub missing"]},
        }
    )
    assert parse_reply_body(body.encode()) == body
    assert body.keyreg_result == KeyRegResult(2, 4, "pub missing")
    assert "stok" not in repr(body).replace("stok=", "") and bytes(16).hex() not in repr(body)


def test_reply_body_explicit_false_more_and_unknown_keys() -> None:
    assert parse_reply_body(_enc({1: TOK8, 6: False, 10: "x", "y": 1})) == ReplyBody(ack=TOK8)
    assert parse_reply_body(_enc({1: TOK8, 9: {"z": 1, 13: [0]}})).res == {13: [0]}


REPLY_BODY_DROPS = [
    ("array", _enc([TOK8])),
    ("ack-missing", _enc({4: 1})),
    ("ack-3", _enc({1: b"abc"})),
    ("stok-15", _enc({1: TOK8, 2: bytes(15)})),
    ("exp-text", _enc({1: TOK8, 3: "1"})),
    ("time-bool", _enc({1: TOK8, 4: True})),
    ("ins-map", _enc({1: TOK8, 5: {}})),
    ("ins-item-short", _enc({1: TOK8, 5: [[1, "x"]]})),
    ("ins-item-long", _enc({1: TOK8, 5: [[1, "x", None, 5, 6]]})),
    ("ins-kind-bstr", _enc({1: TOK8, 5: [[1, b"x", None]]})),
    ("ins-iid-bool", _enc({1: TOK8, 5: [[True, "x", None]]})),
    ("ins-not-after-null", _enc({1: TOK8, 5: [[1, "x", None, None]]})),
    ("ins-descending", _enc({1: TOK8, 5: [[2, "x", None], [1, "x", None]]})),
    ("ins-duplicate-iid", _enc({1: TOK8, 5: [[1, "x", None], [1, "y", None]]})),
    ("more-int", _enc({1: TOK8, 6: 1})),
    ("alias-7", _enc({1: TOK8, 7: bytes(7)})),
    ("alias-17", _enc({1: TOK8, 7: bytes(17)})),
    ("err-flat", _enc({1: TOK8, 8: [1, "x"]})),
    ("err-code-text", _enc({1: TOK8, 8: [["1", "x"]]})),
    ("err-text-bstr", _enc({1: TOK8, 8: [[1, b"x"]]})),
    ("res-array", _enc({1: TOK8, 9: [1]})),
    ("res-keyreg-short", _enc({1: TOK8, 9: {12: [1]}})),
    ("res-keyreg-reason-bstr", _enc({1: TOK8, 9: {12: [1, 4, b"r"]}})),
]


@pytest.mark.parametrize(
    "plaintext", [d[1] for d in REPLY_BODY_DROPS], ids=[d[0] for d in REPLY_BODY_DROPS]
)
def test_reply_body_drops(plaintext: bytes) -> None:
    _malformed(parse_reply_body, plaintext)


def test_reply_body_builder_validates() -> None:
    bad: list[dict[str, Any]] = [
        {"ack": b"abc"},
        {"ack": TOK8, "stok": bytes(17)},
        {"ack": TOK8, "ins": (InstructionItem(2, "a", 1), InstructionItem(2, "b", 1))},
        {"ack": TOK8, "ins": [InstructionItem(2, "a", 1)]},
        {"ack": TOK8, "more": 1},
        {"ack": TOK8, "err": ((1, b"x"),)},
        {"ack": TOK8, "res": {"12": [1, 0]}},
        {"ack": TOK8, "res": {12: [1]}},
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            ReplyBody(**fields)


def _hello_reply_body() -> ReplyBody:
    return ReplyBody(ack=TOK16, stok=bytes(16), exp=86400, time=1700000000, alias=bytes(12))


@pytest.mark.parametrize("sig", [b"\x07" * 64, None])
def test_hello_reply_plaintext_round_trip(sig: bytes | None) -> None:
    body_bytes = _hello_reply_body().encode()
    plaintext = build_hello_reply_plaintext(body_bytes, sig)
    assert plaintext == _enc([body_bytes, sig])
    assert parse_hello_reply_plaintext(plaintext) == (body_bytes, _hello_reply_body(), sig)


@pytest.mark.parametrize(
    "plaintext",
    [
        _enc([ReplyBody(ack=TOK16, stok=bytes(16), exp=1).encode(), None]),
        _enc([ReplyBody(ack=TOK16, stok=bytes(16), time=1).encode(), None]),
        _enc([ReplyBody(ack=TOK16, exp=1, time=1).encode(), None]),
        _enc([_hello_reply_body().encode(), "sig"]),
        _enc([_hello_reply_body().encode()]),
        _enc([_hello_reply_body().to_cbor(), None]),
        _enc({1: _hello_reply_body().encode()}),
    ],
    ids=["no-time", "no-exp", "no-stok", "sig-tstr", "one-element", "body-map", "map"],
)
def test_hello_reply_plaintext_drops(plaintext: bytes) -> None:
    _malformed(parse_hello_reply_plaintext, plaintext)


def test_build_hello_reply_plaintext_validates() -> None:
    with pytest.raises(ValueError):
        build_hello_reply_plaintext(b"body", "sig")  # type: ignore[arg-type]


# --- instructions, Params, skey ---------------------------------------------------------------


def test_instruction_item_encodings() -> None:
    assert InstructionItem(1, "rehello", None).encode() == _enc([1, "rehello", None])
    item = InstructionItem(300, "sleep", 60, 1700003600)
    assert item.encode() == _enc([300, "sleep", 60, 1700003600])
    assert item.encoded_size() == len(item.encode())
    assert InstructionItem.from_cbor(cbor.decode(item.encode())) == item
    for bad in ([1, "x"], (1, "x", None), [1, "x", None, -1], [-1, "x", None], "x"):
        _malformed(InstructionItem.from_cbor, bad)
    with pytest.raises(ValueError):
        InstructionItem(1, "x", None, True)


@settings(max_examples=100, deadline=None)
@given(instruction_lists(max_size=1), st.integers(0, 2**64 - 1))
def test_instruction_wire_size_bounds_every_iid(
    items: tuple[InstructionItem, ...], iid: int
) -> None:
    assume(items)
    item = items[0]
    bound = instruction_wire_size(item.kind, item.body, item.not_after)
    actual = InstructionItem(iid, item.kind, item.body, item.not_after).encoded_size()
    assert actual <= bound
    assert bound - actual <= 8
    assert instruction_wire_size(item.kind, item.body, item.not_after, iid=iid) == actual


def test_params_round_trip_and_hidden_seed() -> None:
    params = Params(suite="p256", ttl=86400 * 365, seed=SEED, kid=3, pid=9)
    assert params.encode() == _enc({1: "p256", 5: 86400 * 365, 6: SEED, 7: 3, 9: 9})
    assert parse_params(cbor.decode(params.encode())) == params
    assert SEED.hex() not in repr(params) and repr(list(SEED)) not in repr(params)
    p256 = 2**256 - 2**224 + 2**192 + 2**96 - 1
    full = Params(
        suite="p256",
        ttl=1,
        seed=SEED,
        kid=3,
        pid=9,
        curve="P-256",
        eq=(p256, p256 - 3, 5, 6, 7, p256 - 1, 1),
        rsa_bits=2048,
        hash="SHA-256",
    )
    assert parse_params(cbor.decode(full.encode())) == full


@pytest.mark.parametrize(
    "changes",
    [
        {1: None},
        {5: None},
        {6: None},
        {7: None},
        {9: None},
        {1: 5},
        {5: -1},
        {6: bytes(15)},
        {6: bytes(33)},
        {7: True},
        {2: b"P-256"},
        {3: [1, 2, 3]},
        {3: [1, 2, 3, 4, 5, 6, -7]},
        {4: 1024},
        {4: 4096},
        {8: 256},
    ],
    ids=repr,
)
def test_params_drops(changes: dict[int, Any]) -> None:
    value = {1: "p256", 5: 1, 6: SEED, 7: 3, 9: 9}
    value.update(changes)
    _malformed(parse_params, {k: v for k, v in value.items() if v is not None})


def test_skey_body() -> None:
    body = SkeyBody(skid=110, suite="x25519", pub=bytes(32), sig_pub=bytes(32), sig=bytes(64))
    value = body.to_cbor()
    assert value == {1: 110, 2: "x25519", 3: bytes(32), 4: bytes(32), 5: bytes(64)}
    assert parse_skey_body(value) == body
    short = SkeyBody(skid=107, suite="p256", pub=bytes(65), sig=bytes(64))
    assert 4 not in short.to_cbor()
    assert parse_skey_body(short.to_cbor()) == short
    for bad in ({1: 1, 2: "p256", 3: b"k"}, {1: 1, 2: "p256", 3: b"k", 4: "x", 5: b"s"}, [1]):
        _malformed(parse_skey_body, bad)


def test_keyreg_result() -> None:
    assert KeyRegResult(1, 0).to_cbor() == [1, 0]
    assert KeyRegResult.from_cbor([1, 5, "policy"]) == KeyRegResult(1, 5, "policy")
    _malformed(KeyRegResult.from_cbor, [1, "0"])
    with pytest.raises(ValueError):
        KeyRegResult(-1, 0)


# --- reply sizing ---------------------------------------------------------------------------------

frames = st.one_of(
    st.builds(
        ReplyFrame.hello_reply,
        sids,
        tag_len=st.sampled_from([8, 16]),
        sig_len=st.sampled_from([None, 64, 96, 256, 384]),
    ),
    st.builds(
        ReplyFrame.data_reply,
        sids,
        st.integers(1, 2**64 - 1),
        tag_len=st.sampled_from([8, 16]),
    ),
)


def _datagram(body: ReplyBody, frame: ReplyFrame) -> bytes:
    """The reply datagram, with a stand-in ``ct`` of the right size."""
    if frame.ctr is None:
        sig = None if frame.sig_len is None else b"\x00" * frame.sig_len
        plaintext = build_hello_reply_plaintext(body.encode(), sig)
        return HelloReply(frame.sid, bytes(len(plaintext) + frame.tag_len)).encode()
    ct = bytes(len(body.encode()) + frame.tag_len)
    return DataReply(frame.sid, frame.ctr, ct).encode()


@settings(max_examples=150, deadline=None)
@given(reply_bodies(max_ins=6), frames)
def test_reply_datagram_size_is_exact(body: ReplyBody, frame: ReplyFrame) -> None:
    assert reply_datagram_size(body, frame) == len(_datagram(body, frame))


@settings(max_examples=300, deadline=None)
@given(
    reply_bodies(max_ins=0),
    frames,
    st.integers(60, MAX_RECEIVED_DATAGRAM),
    instruction_lists(max_size=40, max_body=300, structured=False),
    st.booleans(),
    st.booleans(),
)
def test_instructions_within_the_budget_never_overflow(
    body: ReplyBody,
    frame: ReplyFrame,
    max_datagram: int,
    queued: tuple[InstructionItem, ...],
    more: bool,
    worst_case_iid: bool,
) -> None:
    budget = ins_budget(body, frame, max_datagram)
    claimed: list[InstructionItem] = []
    used = 0
    for item in queued:
        size = (
            instruction_wire_size(item.kind, item.body, item.not_after)
            if worst_case_iid
            else item.encoded_size()
        )
        if used + size > budget:
            break
        claimed.append(item)
        used += size
    reply = ReplyBody(**{**body.__dict__, "ins": tuple(claimed), "more": more})
    size = len(_datagram(reply, frame))
    if budget == 0 and not claimed:
        assert reply_datagram_size(reply, frame) == size
        return
    assert size <= max_datagram


def _filler(size: int, iid: int) -> InstructionItem | None:
    """The instruction of encoded size closest to ``size`` from below."""
    best = None
    for kind_len in range(4):
        for body_len in range(max(0, size - 16), size + 1):
            item = InstructionItem(iid, "k" * kind_len, bytes(body_len))
            if item.encoded_size() <= size and (
                best is None or item.encoded_size() > best.encoded_size()
            ):
                best = item
    return best


@settings(max_examples=150, deadline=None)
@given(reply_bodies(max_ins=0), frames, st.integers(120, MAX_RECEIVED_DATAGRAM))
def test_the_budget_is_tight(body: ReplyBody, frame: ReplyFrame, max_datagram: int) -> None:
    budget = ins_budget(body, frame, max_datagram)
    assume(budget >= 20)
    item = _filler(budget, 1)
    assert item is not None and item.encoded_size() == budget
    reply = ReplyBody(**{**body.__dict__, "ins": (item,), "more": True})
    size = len(_datagram(reply, frame))
    assert max_datagram - 8 <= size <= max_datagram


def test_budget_is_zero_when_nothing_fits() -> None:
    body = ReplyBody(ack=TOK8, err=(ErrorEntry(2, "x" * 300),))
    frame = ReplyFrame.data_reply(bytes(6), 1, tag_len=16)
    assert ins_budget(body, frame, 200) == 0
    assert ins_budget(body, frame, 400) > 0


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(hello_bodies)
def test_hello_body_round_trip(body: HelloBody) -> None:
    encoded = body.encode()
    assume(len(encoded) <= MAX_RECEIVED_DATAGRAM)
    parsed = parse_hello_body(encoded)
    assert parsed == body
    assert parsed.encode() == encoded


@settings(max_examples=150, deadline=None)
@given(data_bodies)
def test_data_body_round_trip(body: DataBody) -> None:
    encoded = body.encode()
    assume(len(encoded) <= MAX_RECEIVED_DATAGRAM)
    parsed = parse_data_body(encoded)
    assert parsed == body
    assert parsed.encode() == encoded


@settings(max_examples=150, deadline=None)
@given(reply_bodies())
def test_reply_body_round_trip(body: ReplyBody) -> None:
    encoded = body.encode()
    assume(len(encoded) <= MAX_RECEIVED_DATAGRAM)
    parsed = parse_reply_body(encoded)
    assert parsed == body
    assert parsed.encode() == encoded


@settings(max_examples=100, deadline=None)
@given(payloads)
def test_payload_round_trip(payload: Payload) -> None:
    assert parse_payload(cbor.decode(cbor.encode(payload.to_cbor()))) == payload


@settings(max_examples=100, deadline=None)
@given(reply_bodies(hello=False), sids, st.integers(1, 2**64 - 1), st.sampled_from([8, 16]))
def test_a_built_data_reply_parses(body: ReplyBody, sid: bytes, ctr: int, tag_len: int) -> None:
    frame = ReplyFrame.data_reply(sid, ctr, tag_len=tag_len)
    datagram = _datagram(body, frame)
    assume(len(datagram) <= MAX_RECEIVED_DATAGRAM)
    assert parse_datagram(datagram) == DataReply(sid, ctr, bytes(len(body.encode()) + tag_len))
