"""
The fast paths of the codec give exactly what the general ones give.

:func:`m2mgw.protocol.cbor.decode_canonical` reads deterministic CBOR made of
the types MGP/1 messages hold and declines everything else; whenever it
returns a value, that value (types included) is the one the full decoder
(``cbor2`` and the re-encoding check) returns, and whenever the full decoder
refuses the input, it declines.  The DATA and DATA_REPLY envelopes and AADs
built from their heads equal :func:`m2mgw.protocol.cbor.encode`'s.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mgw.errors import DecodeError
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import DataBody, Payload, ReplyBody, parse_data_body
from m2mgw.protocol.messages import (
    DATA,
    DATA_REPLY,
    MAX_SID,
    MIN_SID,
    Data,
    DataReply,
    MalformedMessage,
    decode_deterministic,
)
from tests.codec_helpers import vector_fields

FAST_TYPES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.integers(min_value=-30, max_value=300) | st.text(max_size=4) | st.binary(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)
ANY_CBOR = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=20)
    | st.text(max_size=10)
    | st.builds(cbor.Tag, st.sampled_from([0, 1, 2, 24, 55799, 1000]), st.binary(max_size=4)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.integers(min_value=-5, max_value=40) | st.text(max_size=3), inner, max_size=4
        )
    ),
    max_leaves=15,
)


def full_decode(data: bytes) -> Any:
    """The general path: ``cbor2``, then the re-encoding check."""
    value = cbor.decode(data, check_deterministic=False)
    if cbor.encode(value) != data:
        raise DecodeError("not deterministic")
    return value


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (``True`` is not ``1``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            same(k, j) and same(a[k], b[j]) for k, j in zip(a, b, strict=True)
        )
    return bool(a == b) or (a != a and b != b)  # NaN


def check_agrees(data: bytes) -> Any:
    fast = cbor.decode_canonical(data)
    try:
        expected = full_decode(data)
    except DecodeError:
        assert fast is cbor.DECLINED
        return cbor.DECLINED
    if fast is not cbor.DECLINED:
        assert same(fast, expected)
    return fast


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(FAST_TYPES)
def test_mgp1_types_are_read_by_the_fast_path(value: Any) -> None:
    data = cbor.encode(value)
    fast = check_agrees(data)
    assert fast is not cbor.DECLINED
    assert same(cbor.decode(data), fast)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_CBOR)
def test_any_deterministic_cbor_agrees(value: Any) -> None:
    check_agrees(cbor.encode(value))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(FAST_TYPES, st.data())
def test_mutated_encodings_agree(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(cbor.encode(value))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(min_value=0, max_value=max(0, len(encoded) - 1)))
        if action == "flip" and encoded:
            encoded[at] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif action == "insert":
            encoded.insert(at, data.draw(st.integers(min_value=0, max_value=255)))
        elif action == "delete" and encoded:
            del encoded[at]
        elif action == "truncate":
            del encoded[at:]
    check_agrees(bytes(encoded))


@settings(max_examples=500)
@given(st.binary(max_size=40))
def test_random_bytes_agree(data: bytes) -> None:
    check_agrees(data)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("1817"),  # 23 in a two-byte head
        bytes.fromhex("190017"),
        bytes.fromhex("5f4101ff"),  # indefinite-length bstr
        bytes.fromhex("a20100" + "0000"),  # duplicate key 0
        bytes.fromhex("a2020001" + "00"),  # keys out of order: 2 then 1
        bytes.fromhex("a201f5f501"),  # 1 and true: equal in Python
        bytes.fromhex("62c328"),  # invalid UTF-8
        bytes.fromhex("c249010000000000000000"),  # bignum
        bytes.fromhex("fa3f800000"),  # 1.0 as a single: not the shortest
        bytes.fromhex("f97e01"),  # a NaN other than the deterministic one
        bytes.fromhex("f7"),  # undefined
        bytes.fromhex("c101"),  # a tag
        bytes.fromhex("0000"),  # trailing bytes
        bytes.fromhex("81" * 17 + "00"),  # nested deeper than MAX_DEPTH
        bytes.fromhex("a1810000"),  # an array as a map key
        b"",
    ],
)
def test_the_fast_path_declines_what_it_does_not_decide(data: bytes) -> None:
    assert cbor.decode_canonical(data) is cbor.DECLINED
    check_agrees(data)


def test_non_bytes_input_goes_to_the_full_decoder() -> None:
    assert cbor.decode_canonical(bytearray(b"\x01")) is cbor.DECLINED  # type: ignore[arg-type]
    assert cbor.decode(bytearray(b"\x01")) == 1  # type: ignore[arg-type]


def test_decode_deterministic_keeps_its_reasons() -> None:
    with pytest.raises(MalformedMessage) as caught:
        decode_deterministic(bytes.fromhex("1817"))
    assert caught.value.reason == "not-deterministic"
    with pytest.raises(MalformedMessage) as caught:
        decode_deterministic(b"\xff")
    assert caught.value.reason == "cbor"


@pytest.mark.parametrize("field", vector_fields("datagram", "reply", "body", "plaintext"))
def test_every_vector_message_takes_the_fast_path(field: bytes) -> None:
    fast = check_agrees(field)
    assert fast is not cbor.DECLINED


@given(
    st.binary(min_size=MIN_SID, max_size=MAX_SID),
    st.integers(min_value=1, max_value=2**64 - 1),
    st.binary(max_size=300),
)
def test_session_envelopes_equal_the_general_encoding(sid: bytes, ctr: int, ct: bytes) -> None:
    for cls, kind in ((Data, DATA), (DataReply, DATA_REPLY)):
        assert cls.aad_for(sid, ctr) == cbor.encode([1, kind, sid, ctr])
        message = cls(sid, ctr, ct)
        assert message.aad == cbor.encode([1, kind, sid, ctr])
        assert message.encode() == cbor.encode([1, kind, sid, ctr, ct])


@given(
    st.binary(min_size=4, max_size=32), st.none() | st.integers(min_value=0, max_value=2**64 - 1)
)
def test_ack_only_reply_body_equals_the_checked_one(ack: bytes, time: int | None) -> None:
    assert ReplyBody.ack_only(ack, time) == ReplyBody(ack=ack, time=time)
    assert ReplyBody.ack_only(ack, time).encode() == ReplyBody(ack=ack, time=time).encode()


@given(
    st.binary(min_size=4, max_size=32), st.none() | st.integers(min_value=0, max_value=2**64 - 1)
)
def test_parsed_data_body_equals_the_checked_one(tok: bytes, ts: int | None) -> None:
    body = DataBody(ts=ts, tok=tok, pl=Payload(data=b"x", req=("time",)))
    assert parse_data_body(body.encode()) == body
