"""
A bounded fuzz target for the MGP/1 parsers.

Random bytes, mutated vector datagrams and plaintexts (bit flips, truncation,
insertion, deletion, overwrite) and random CBOR structures are fed to the
datagram parser and every plaintext parser: the only exception they may
raise is :class:`~m2mgw.errors.DecodeError`.  A datagram that is accepted
re-encodes to exactly the bytes received.  Each target runs a few hundred
examples so that the whole file stays within seconds in CI; run it longer
with ``--hypothesis-seed`` or a bigger ``max_examples`` locally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mgw.errors import DecodeError
from m2mgw.protocol import bodies, cbor, messages
from tests.codec_helpers import vector_fields

DATAGRAMS = vector_fields("datagram", "reply")
PLAINTEXTS = vector_fields("body", "plaintext", "reply_body", "reply_plaintext", "instruction")

BYTE_PARSERS: list[Callable[[bytes], object]] = [
    messages.parse_datagram,
    bodies.parse_hello_plaintext,
    bodies.parse_hello_body,
    bodies.parse_data_body,
    bodies.parse_reply_body,
    bodies.parse_hello_reply_plaintext,
]
VALUE_PARSERS: list[Callable[[Any], object]] = [
    bodies.parse_payload,
    bodies.parse_params,
    bodies.parse_skey_body,
    bodies.InstructionItem.from_cbor,
    bodies.KeyRegResult.from_cbor,
]

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _only_decode_errors(parse: Callable[[Any], object], data: Any) -> object | None:
    try:
        return parse(data)
    except DecodeError:
        return None


def _feed(data: bytes) -> None:
    message = _only_decode_errors(messages.parse_datagram, data)
    if message is not None:
        assert message.encode() == data  # type: ignore[attr-defined]
        assert len(data) <= messages.MAX_RECEIVED_DATAGRAM
    for parse in BYTE_PARSERS[1:]:
        _only_decode_errors(parse, data)
    try:
        value = cbor.decode(data)
    except DecodeError:
        return
    for parse_value in VALUE_PARSERS:
        _only_decode_errors(parse_value, value)


@st.composite
def mutations(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with one to four random edits."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if operation == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del data[at:]
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif operation == "set" and data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.sampled_from([0, 1, 2, 3, 4, 5, 12, 16, 64, 65, 2**64 - 1]),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.integers(-2, 16), st.text(max_size=3)), children, max_size=7),
        st.builds(cbor.Tag, st.sampled_from([0, 1, 2, 3, 24, 258, 55799, 1000]), children),
    ),
    max_leaves=8,
)


@st.composite
def structures(draw: st.DrawFn) -> bytes:
    """Envelope-like arrays and body-like maps with the MGP/1 keys and random values."""
    shape = draw(st.sampled_from(["envelope", "map", "plaintext", "any"]))
    if shape == "envelope":
        value: Any = [
            draw(st.sampled_from([1, 1, 1, 0, True])),
            draw(st.integers(0, 6)),
            *draw(st.lists(_values, max_size=6)),
        ]
    elif shape == "map":
        value = draw(st.dictionaries(st.integers(0, 15), _values, max_size=9))
    elif shape == "plaintext":
        inner = draw(st.dictionaries(st.integers(0, 15), _values, max_size=9))
        value = [cbor.encode(inner), draw(st.one_of(_values, st.just([1, b"\x00" * 64])))]
    else:
        value = draw(_values)
    return cbor.encode(value)


@FUZZ
@given(st.binary(max_size=1600))
def test_random_bytes(data: bytes) -> None:
    _feed(data)


@FUZZ
@given(mutations(DATAGRAMS))
def test_mutated_vector_datagrams(data: bytes) -> None:
    _feed(data)


@FUZZ
@given(mutations(PLAINTEXTS))
def test_mutated_vector_plaintexts(data: bytes) -> None:
    _feed(data)


@FUZZ
@given(structures())
def test_random_structures(data: bytes) -> None:
    _feed(data)


@FUZZ
@given(_values)
def test_value_parsers_on_random_values(value: Any) -> None:
    for parse_value in VALUE_PARSERS:
        _only_decode_errors(parse_value, value)


def test_the_seeds_are_the_vectors() -> None:
    assert len(DATAGRAMS) == 2 * (5 * 4 + 3) * 2
    for datagram in DATAGRAMS:
        _feed(datagram)
