"""
Tests for :mod:`m2mgw.protocol.messages`: the MGP/1 envelopes and their drop rules.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from m2mgw.errors import DecodeError
from m2mgw.protocol import cbor
from m2mgw.protocol.messages import (
    COOKIE,
    DATA,
    DATA_REPLY,
    DEFAULT_MAX_DATAGRAM,
    HELLO,
    HELLO_REPLY,
    MAX_RECEIVED_DATAGRAM,
    VERSION,
    Data,
    DataReply,
    Hello,
    HelloReply,
    MalformedMessage,
    MalformedReason,
    decode_deterministic,
    is_uint,
    parse_datagram,
    parse_reply,
    parse_request,
)
from tests.codec_helpers import envelopes, h, vector_nodes

SID = bytes.fromhex("bb5840432258")
EPK = bytes(range(65))


def _hello(**changes: object) -> list[object]:
    fields: dict[str, object] = {
        "hint": "mgp1-vector-module",
        "suite": "p256",
        "skid": 7,
        "epk": EPK,
        "ct": b"\x01" * 40,
    }
    fields.update(changes)
    return [VERSION, HELLO, *fields.values()]


def _data(**changes: object) -> list[object]:
    fields: dict[str, object] = {"sid": SID, "ctr": 1, "ct": b"\x02" * 24}
    fields.update(changes)
    return [VERSION, DATA, *fields.values()]


def _enc(value: object) -> bytes:
    return cbor.encode(value)


def test_constants() -> None:
    assert (VERSION, HELLO, HELLO_REPLY, DATA, DATA_REPLY, COOKIE) == (1, 1, 2, 3, 4, 5)
    assert (MAX_RECEIVED_DATAGRAM, DEFAULT_MAX_DATAGRAM) == (1472, 1232)


def test_malformed_message_is_a_decode_error_with_a_reason() -> None:
    with pytest.raises(DecodeError) as caught:
        parse_datagram(b"\xff")
    assert isinstance(caught.value, MalformedMessage)
    assert caught.value.reason == "cbor"
    assert caught.value.claimed_id is None


# --- the AAD and the encoding -----------------------------------------------------


def test_hello_aad_is_every_element_but_ct() -> None:
    hello = Hello("id", "p256", 7, EPK, b"ct")
    assert hello.aad == _enc([1, 1, "id", "p256", 7, EPK])
    assert Hello.aad_for("id", "p256", 7, EPK) == hello.aad
    assert hello.encode() == _enc([1, 1, "id", "p256", 7, EPK, b"ct"])


def test_hello_reply_aad() -> None:
    reply = HelloReply(SID, b"ct")
    assert reply.aad == HelloReply.aad_for(SID) == _enc([1, 2, SID])
    assert reply.encode() == _enc([1, 2, SID, b"ct"])


@pytest.mark.parametrize(("cls", "kind"), [(Data, DATA), (DataReply, DATA_REPLY)])
def test_data_aads(cls: type[Data] | type[DataReply], kind: int) -> None:
    message = cls(SID, 300, b"ct")
    assert message.aad == cls.aad_for(SID, 300) == _enc([1, kind, SID, 300])
    assert message.encode() == _enc([1, kind, SID, 300, b"ct"])


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello(b"x" * 65, "p256", 7, EPK, b""),
        lambda: Hello("é" * 33, "p256", 7, EPK, b""),
        lambda: Hello(1, "p256", 7, EPK, b""),  # type: ignore[arg-type]
        lambda: Hello("", "x" * 33, 7, EPK, b""),
        lambda: Hello("", "p256", -1, EPK, b""),
        lambda: Hello("", "p256", True, EPK, b""),
        lambda: Hello("", "p256", 2**64, EPK, b""),
        lambda: Hello("", "p256", 7, b"\x00" * 513, b""),
        lambda: Hello("", "p256", 7, EPK, "ct"),  # type: ignore[arg-type]
        lambda: Hello.aad_for("", "p256", 7, "epk"),  # type: ignore[arg-type]
        lambda: HelloReply(b"abc", b""),
        lambda: HelloReply(b"123456789", b""),
        lambda: HelloReply.aad_for(b"abc"),
        lambda: Data(SID, 0, b""),
        lambda: Data(SID, True, b""),
        lambda: Data.aad_for(SID, 0),
        lambda: DataReply(SID, 2**64, b""),
        lambda: DataReply.aad_for("sid", 1),  # type: ignore[arg-type]
    ],
)
def test_builders_refuse_what_a_receiver_drops(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_is_uint_refuses_bool_negative_and_wide() -> None:
    assert is_uint(0) and is_uint(2**64 - 1)
    assert not is_uint(True) and not is_uint(False)
    assert not is_uint(-1) and not is_uint(2**64) and not is_uint(1.0)
    assert not is_uint(1, minimum=2)


def test_decode_deterministic_reasons() -> None:
    assert decode_deterministic(b"\x82\x01\x02") == [1, 2]
    with pytest.raises(MalformedMessage) as caught:
        decode_deterministic(b"\x18\x01")
    assert caught.value.reason == MalformedReason.NOT_DETERMINISTIC
    with pytest.raises(MalformedMessage) as caught:
        decode_deterministic(b"\x01\x01")
    assert caught.value.reason == MalformedReason.CBOR


# --- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "step"), vector_nodes("hello"), ids=lambda v: str(v)[:40])
def test_vector_hellos_parse(path: str, step: dict[str, str]) -> None:
    hello = parse_request(h(step["datagram"]))
    assert isinstance(hello, Hello)
    assert hello.epk == h(step["epk"])
    reply = parse_reply(h(step["reply"]))
    assert isinstance(reply, HelloReply)
    assert reply.sid == h(step["sid"])


def test_parse_request_refuses_replies_and_parse_reply_requests() -> None:
    reply = HelloReply(SID, b"ct").encode()
    data = Data(SID, 1, b"ct").encode()
    assert parse_reply(reply) == HelloReply(SID, b"ct")
    assert parse_request(data) == Data(SID, 1, b"ct")
    for parse, datagram in ((parse_request, reply), (parse_reply, data)):
        with pytest.raises(MalformedMessage) as caught:
            parse(datagram)  # type: ignore[operator]
        assert caught.value.reason == "type"


def test_datagram_of_exactly_1472_bytes_is_parsed() -> None:
    head = len(_enc(_data(ct=b"")))
    for ct_size in range(1472 - head - 3, 1472 - head + 1):
        datagram = _enc(_data(ct=b"\x00" * ct_size))
        if len(datagram) == 1472:
            break
    assert len(datagram) == 1472
    assert isinstance(parse_datagram(datagram), Data)
    with pytest.raises(MalformedMessage) as caught:
        parse_datagram(_enc(_data(ct=b"\x00" * (ct_size + 1))))
    assert caught.value.reason == "size"


def test_memoryview_input() -> None:
    datagram = Data(SID, 5, b"x").encode()
    assert parse_datagram(memoryview(datagram)) == Data(SID, 5, b"x")  # type: ignore[arg-type]


_VALID_DATA = _enc(_data())
_VALID_HELLO = _enc(_hello())
_BIG = 2**64  # encodes as a bignum (tag 2), decodes to an int too wide for a uint

DROPS = [
    # §1 size
    ("oversize", _enc(_data(ct=b"\x00" * 1460)), "size"),
    ("oversize-hello", _enc(_hello(ct=b"\x00" * 1400)), "size"),
    # §2 well-formedness
    ("empty", b"", "cbor"),
    ("truncated", _VALID_DATA[:-1], "cbor"),
    ("truncated-head", b"\x85\x01\x03\x46", "cbor"),
    ("break-alone", b"\xff", "cbor"),
    ("reserved-additional-info", b"\x1c", "cbor"),
    ("invalid-utf8", _enc(_hello(hint=""))[:3] + b"\x61\xff" + _enc(_hello(hint=""))[4:], "cbor"),
    ("trailing-byte", _VALID_DATA + b"\x00", "cbor"),
    ("trailing-item", _VALID_DATA + _VALID_DATA, "cbor"),
    # §2 determinism
    (
        "non-shortest-int",
        _VALID_DATA.replace(SID + b"\x01", SID + b"\x18\x01"),
        "not-deterministic",
    ),
    ("non-shortest-version", b"\x85\x18\x01" + _VALID_DATA[2:], "not-deterministic"),
    (
        "non-shortest-length",
        _VALID_DATA.replace(b"\x46" + SID, b"\x58\x06" + SID),
        "not-deterministic",
    ),
    ("indefinite-array", b"\x9f" + _VALID_DATA[1:] + b"\xff", "not-deterministic"),
    (
        "indefinite-bstr",
        _VALID_DATA.replace(b"\x46" + SID, b"\x5f\x46" + SID + b"\xff"),
        "not-deterministic",
    ),
    (
        "bignum-fits-uint",
        _VALID_DATA.replace(SID + b"\x01", SID + b"\xc2\x41\x01"),
        "not-deterministic",
    ),
    (
        "non-shortest-float-version",
        b"\x85\xfa\x3f\x80\x00\x00" + _VALID_DATA[2:],
        "not-deterministic",
    ),
    # §2 not an array
    ("map", _enc({1: 1, 3: SID}), "not-array"),
    ("uint", b"\x01", "not-array"),
    ("bstr", _enc(_VALID_DATA), "not-array"),
    ("tagged-array", b"\xd8\x18" + _VALID_DATA, "not-array"),
    # §2 version
    ("empty-array", b"\x80", "version"),
    ("version-2", _enc([2, 3, SID, 1, b""]), "version"),
    ("version-0", _enc([0, 3, SID, 1, b""]), "version"),
    ("version-true", _enc([True, 3, SID, 1, b""]), "version"),
    ("version-float", _enc([1.0, 3, SID, 1, b""]), "version"),
    ("version-text", _enc(["1", 3, SID, 1, b""]), "version"),
    # §2 message type
    ("type-missing", _enc([1]), "shape"),
    ("type-0", _enc([1, 0, SID, 1, b""]), "type"),
    ("type-6", _enc([1, 6, SID, 1, b""]), "type"),
    ("type-cookie", _enc([1, COOKIE, SID, b""]), "type"),
    ("type-true", _enc([1, True, "", "p256", 7, EPK, b""]), "type"),
    ("type-negative", _enc([1, -3, SID, 1, b""]), "type"),
    ("type-text", _enc([1, "3", SID, 1, b""]), "type"),
    ("type-float", _enc([1, 3.0, SID, 1, b""]), "type"),
    # §2 element count
    ("data-4", _enc(_data()[:-1]), "shape"),
    ("data-6", _enc([*_data(), b""]), "shape"),
    ("hello-6", _enc(_hello()[:-1]), "shape"),
    ("hello-8", _enc([*_hello(), b""]), "shape"),
    ("hello-reply-5", _enc([1, 2, SID, 1, b""]), "shape"),
    ("data-reply-4", _enc([1, 4, SID, b""]), "shape"),
    # §2 element types, §5 HELLO
    ("hint-int", _enc(_hello(hint=5)), "shape"),
    ("hint-null", _enc(_hello(hint=None)), "shape"),
    ("hint-bstr-65", _enc(_hello(hint=b"\x00" * 65)), "shape"),
    ("hint-tstr-65", _enc(_hello(hint="a" * 65)), "shape"),
    ("hint-tstr-33-chars-66-bytes", _enc(_hello(hint="é" * 33)), "shape"),
    ("suite-bstr", _enc(_hello(suite=b"p256")), "shape"),
    ("suite-33", _enc(_hello(suite="p" * 33)), "shape"),
    ("skid-text", _enc(_hello(skid="7")), "shape"),
    ("skid-negative", _enc(_hello(skid=-1)), "shape"),
    ("skid-bool", _enc(_hello(skid=False)), "shape"),
    ("skid-float", _enc(_hello(skid=7.5)), "shape"),
    ("skid-bignum", _enc(_hello(skid=_BIG)), "shape"),
    ("epk-tstr", _enc(_hello(epk="04")), "shape"),
    ("epk-513", _enc(_hello(epk=b"\x04" * 513)), "shape"),
    ("hello-ct-tstr", _enc(_hello(ct="ct")), "shape"),
    ("hello-ct-null", _enc(_hello(ct=None)), "shape"),
    ("hello-ct-tagged", _enc(_hello(ct=cbor.Tag(24, b"ct"))), "shape"),
    # §6, §8 sid, ctr, ct
    ("sid-tstr", _enc(_data(sid="abcdef")), "shape"),
    ("sid-3", _enc(_data(sid=b"abc")), "shape"),
    ("sid-9", _enc(_data(sid=b"123456789")), "shape"),
    ("hello-reply-sid-3", _enc([1, 2, b"abc", b""]), "shape"),
    ("ctr-0", _enc(_data(ctr=0)), "shape"),
    ("ctr-negative", _enc(_data(ctr=-1)), "shape"),
    ("ctr-bool", _enc(_data(ctr=True)), "shape"),
    ("ctr-bstr", _enc(_data(ctr=b"\x01")), "shape"),
    ("ctr-bignum", _enc(_data(ctr=_BIG)), "shape"),
    ("ctr-null", _enc(_data(ctr=None)), "shape"),
    ("data-ct-tstr", _enc(_data(ct="x")), "shape"),
    ("data-ct-array", _enc(_data(ct=[b"x"])), "shape"),
    ("data-reply-ctr-0", _enc([1, 4, SID, 0, b""]), "shape"),
]


@pytest.mark.parametrize(("datagram", "reason"), [d[1:] for d in DROPS], ids=[d[0] for d in DROPS])
def test_drop_rules(datagram: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse_datagram(datagram)
    assert caught.value.reason == reason, caught.value
    assert caught.value.reason in set(MalformedReason)


def test_drop_cases_differ_from_a_valid_message_only_by_the_fault() -> None:
    # The mutated cases above are built from messages that do parse.
    assert isinstance(parse_datagram(_VALID_DATA), Data)
    assert isinstance(parse_datagram(_VALID_HELLO), Hello)
    assert isinstance(parse_datagram(_enc(_hello(hint=b"\x00" * 64, epk=b"\x04" * 512))), Hello)
    assert isinstance(parse_datagram(_enc(_hello(hint="é" * 32, suite="p" * 32))), Hello)
    assert isinstance(parse_datagram(_enc(_hello(hint=b"", skid=2**64 - 1))), Hello)
    assert isinstance(parse_datagram(_enc(_data(sid=b"1234", ctr=2**64 - 1))), Data)
    assert isinstance(parse_datagram(_enc(_data(sid=b"12345678", ct=b""))), Data)


# --- properties --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(envelopes)
def test_envelope_round_trip(message: Hello | HelloReply | Data | DataReply) -> None:
    datagram = message.encode()
    if len(datagram) > MAX_RECEIVED_DATAGRAM:
        with pytest.raises(MalformedMessage):
            parse_datagram(datagram)
        return
    parsed = parse_datagram(datagram)
    assert parsed == message
    assert parsed.encode() == datagram
    assert parsed.aad == cbor.encode(cbor.decode(datagram)[:-1])
    assert datagram.endswith(cbor.encode(message.ct))
