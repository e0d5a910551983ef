"""
The MGP/1 conformance vectors, byte for byte, at the codec level.

For every suite and step of both vectors files (the independent reference
``vectors.json`` and m2mgw's own in ``docs/test-vectors/``): the envelopes parse, give the
vector's AAD and re-encode to the same bytes; the plaintexts parse; and the
module-side and gateway-side builders, fed the values the vectors list (the
identity, the clock, the random draws, the signatures), rebuild every body,
plaintext and instruction exactly.  Keys, encryption and signatures are
checked by the key schedule and suite tests.
"""

from __future__ import annotations

from typing import Any

import pytest

from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import (
    AuthMethod,
    ConfEntry,
    DataBody,
    HelloBody,
    InstructionItem,
    KeyReg,
    KeyRegResult,
    KeyRegStatus,
    Payload,
    ReplyBody,
    ReplyFrame,
    SkeyBody,
    build_hello_plaintext,
    build_hello_reply_plaintext,
    ins_budget,
    parse_data_body,
    parse_hello_plaintext,
    parse_hello_reply_plaintext,
    parse_reply_body,
    parse_skey_body,
    reply_datagram_size,
)
from m2mgw.protocol.messages import (
    DEFAULT_MAX_DATAGRAM,
    Data,
    DataReply,
    Hello,
    HelloReply,
    decode_deterministic,
    parse_datagram,
    parse_reply,
    parse_request,
)
from tests.codec_helpers import FILES, VECTOR_FILES, h, suite_names, vector_fields, vector_nodes

#: The SenML record every vector report carries (RFC 8428 CBOR labels: -2 bn, 0 n, 1 u, 2 v, 6 t).
SENML = [{-2: "urn:dev:mgp1-vector:", 0: "temperature", 1: "Cel", 2: 21.5, 6: 0}]


def _suite(file: str, path: str) -> dict[str, Any]:
    return dict(VECTOR_FILES[file][path.split("/")[0]])


def _tag_len(file: str, path: str) -> int:
    return 8 if _suite(file, path)["suite"] == "p256-ccm8" else 16


def _nodes(kind: str) -> list[Any]:
    """``(file, path, step)`` for every ``kind`` step of every vectors file."""
    return [
        pytest.param(file, path, step, id=f"{file}-{path}")
        for file in FILES
        for path, step in vector_nodes(kind, file)
    ]


HELLOS = _nodes("hello")
DATAS = _nodes("data")
SKEYS = _nodes("skey")


@pytest.mark.parametrize("file", FILES)
def test_the_vectors_are_all_there(file: str) -> None:
    assert suite_names(file) == ["p256", "p256-ccm8", "p384", "x25519", "rsa"]
    # hello_psk, hello_sig, hello_keyreg, hello_skey, and hello_sdh in the 3 EC suites
    assert len(vector_nodes("hello", file)) == 5 * 4 + 3
    # data, keyreg, skey, the DATA after hello_sig, and after hello_sdh in the EC suites
    assert len(vector_nodes("data", file)) == 5 * 4 + 3
    assert len(vector_nodes("skey", file)) == 5


CBOR_FIELDS = (
    "aad",
    "body",
    "tbs",
    "plaintext",
    "datagram",
    "reply_aad",
    "reply_body",
    "reply_tbs",
    "reply_plaintext",
    "reply",
    "session_info",
    "tbs_k",
    "skey_tbs",
    "instruction",
)


@pytest.mark.parametrize("file", FILES)
def test_every_cbor_field_of_the_vectors_is_deterministic(file: str) -> None:
    values = vector_fields(*CBOR_FIELDS, file=file)
    assert len(values) > 300
    for value in values:
        assert cbor.encode(decode_deterministic(value)) == value


# --- HELLO and HELLO_REPLY ------------------------------------------------------------


def _hello_payload(file: str, path: str, step: dict[str, Any]) -> Payload | None:
    name = path.split("/")[-1]
    if name == "hello_psk":
        return Payload(data=SENML)
    if name == "hello_keyreg":
        keyreg = step["keyreg"]
        return Payload(
            keyreg=KeyReg(
                kid=keyreg["kid"],
                pub=h(keyreg["pub"]),
                suite=_suite(file, path)["suite"],
                pid=0,
                proof=h(keyreg["proof"]),
                pop=h(keyreg["pop"]),
            )
        )
    if name == "hello_skey":
        return Payload(conf=(ConfEntry(1, 0, _suite(file, path)["clock"]),))
    return None


@pytest.mark.parametrize(("file", "path", "step"), HELLOS)
def test_hello(file: str, path: str, step: dict[str, Any]) -> None:
    suite = _suite(file, path)
    datagram = h(step["datagram"])
    hello = parse_request(datagram)
    assert isinstance(hello, Hello)
    assert hello.aad == h(step["aad"])
    assert Hello.aad_for(hello.hint, hello.suite, hello.skid, hello.epk) == h(step["aad"])
    assert hello.encode() == datagram
    assert hello.suite == suite["suite"]
    assert hello.epk == h(step["epk"])

    body_bytes, body, method, value = parse_hello_plaintext(h(step["plaintext"]))
    assert body_bytes == h(step["body"])
    assert body.id == suite["identity"]
    assert body.tok == h(step["module_random"]["tok"])
    assert (method, value) == (step["method"], h(step["auth_value"]))
    assert body.encode() == body_bytes
    assert build_hello_plaintext(body.encode(), method, value) == h(step["plaintext"])

    # The module side builds the same body from what it knows.
    rebuilt = HelloBody(
        id=suite["identity"],
        kid=0 if method == AuthMethod.PSK else 1,
        ts=body.ts,
        tok=h(step["module_random"]["tok"]),
        pl=_hello_payload(file, path, step),
    )
    assert rebuilt == body
    assert rebuilt.encode() == h(step["body"])
    assert (
        Hello(hello.hint, suite["suite"], hello.skid, h(step["epk"]), hello.ct).encode() == datagram
    )


@pytest.mark.parametrize(("file", "path", "step"), HELLOS)
def test_hello_reply(file: str, path: str, step: dict[str, Any]) -> None:
    suite = _suite(file, path)
    reply_datagram = h(step["reply"])
    reply = parse_reply(reply_datagram)
    assert isinstance(reply, HelloReply)
    assert reply.sid == h(step["sid"]) == h(step["gateway_random"]["sid"])
    assert reply.aad == HelloReply.aad_for(reply.sid) == h(step["reply_aad"])
    assert reply.encode() == reply_datagram

    parsed = parse_hello_reply_plaintext(h(step["reply_plaintext"]))
    assert parsed.body_bytes == h(step["reply_body"])
    assert parsed.sig == h(step["sig"])
    assert parsed.body.encode() == h(step["reply_body"])

    # The gateway builds the same reply from the values the vectors list.
    res = {}
    if "keyreg" in step:
        res[12] = KeyRegResult(step["keyreg"]["kid"], KeyRegStatus.ACCEPTED).to_cbor()
    body = ReplyBody(
        ack=h(step["module_random"]["tok"]),
        stok=h(step["gateway_random"]["stok"]),
        exp=86400,  # gateway_policy: exp 86400
        time=suite["clock"],
        alias=h(step["gateway_random"]["alias"]),
        res=res,
    )
    assert body == parsed.body
    assert body.encode() == h(step["reply_body"])
    plaintext = build_hello_reply_plaintext(body.encode(), h(step["sig"]))
    assert plaintext == h(step["reply_plaintext"])
    assert len(reply.ct) == len(plaintext) + _tag_len(file, path)
    frame = ReplyFrame.hello_reply(
        reply.sid, tag_len=_tag_len(file, path), sig_len=len(h(step["sig"]))
    )
    assert reply_datagram_size(body, frame) == len(reply_datagram)


@pytest.mark.parametrize("file", FILES)
def test_the_hello_hints_follow_the_aliases(file: str) -> None:
    # aliases on: each HELLO after the first uses the alias of the reply before it
    for suite in suite_names(file):
        steps = [step for path, step in vector_nodes("hello", file) if path.startswith(f"{suite}/")]
        hints = [parse_request(h(step["datagram"])).hint for step in steps]  # type: ignore[union-attr]
        aliases = [h(step["gateway_random"]["alias"]) for step in steps]
        assert hints[0] == VECTOR_FILES[file][suite]["identity"]
        assert hints[1:] == aliases[:-1]


# --- DATA and DATA_REPLY ------------------------------------------------------------------


def _data_payload(file: str, path: str, step: dict[str, Any]) -> Payload:
    if "pop" in step:
        return Payload(
            keyreg=KeyReg(
                kid=step["kid"],
                pub=h(step["pub"]),
                suite=_suite(file, path)["suite"],
                pid=0,
                proof=h(step["proof"]),
                pop=h(step["pop"]),
            )
        )
    if path.endswith("/data") and path.count("/") == 1:
        return Payload(data=SENML, req=("time",))
    return Payload(data=SENML)


def _skey_instruction(path: str, step: dict[str, Any]) -> InstructionItem:
    sig_pub = h(step["server_signature_public"]) if step["suite"] == "x25519" else None
    body = SkeyBody(
        skid=step["skid"],
        suite=step["suite"],
        pub=h(step["server_agreement_public"]),
        sig_pub=sig_pub,
        sig=h(step["skey_sig"]),
    )
    return InstructionItem(1, "skey", body.to_cbor())


@pytest.mark.parametrize(("file", "path", "step"), DATAS)
def test_data(file: str, path: str, step: dict[str, Any]) -> None:
    suite = _suite(file, path)
    datagram = h(step["datagram"])
    data = parse_request(datagram)
    assert isinstance(data, Data)
    assert data.ctr == step["ctr"]
    assert data.aad == Data.aad_for(data.sid, data.ctr) == h(step["aad"])
    assert data.encode() == datagram

    body = parse_data_body(h(step["body"]))
    assert body.encode() == h(step["body"])
    rebuilt = DataBody(
        ts=suite["clock"], tok=h(step["module_random"]["tok"]), pl=_data_payload(file, path, step)
    )
    assert rebuilt == body
    assert rebuilt.encode() == h(step["body"])
    assert body.pl is not None and body.pl.errors == ()


@pytest.mark.parametrize(("file", "path", "step"), DATAS)
def test_data_reply(file: str, path: str, step: dict[str, Any]) -> None:
    suite = _suite(file, path)
    data = parse_request(h(step["datagram"]))
    assert isinstance(data, Data)
    reply_datagram = h(step["reply"])
    reply = parse_reply(reply_datagram)
    assert reply == DataReply(data.sid, data.ctr, reply.ct)
    assert reply.aad == cbor.encode([1, 4, data.sid, data.ctr])
    assert reply.encode() == reply_datagram

    parsed = parse_reply_body(h(step["reply_body"]))
    assert parsed.encode() == h(step["reply_body"])
    request = parse_data_body(h(step["body"])).pl
    assert request is not None
    res = {}
    if request.keyreg is not None:
        res[12] = KeyRegResult(request.keyreg.kid, KeyRegStatus.ACCEPTED).to_cbor()
    ins = (_skey_instruction(path, step),) if "instruction" in step else ()
    body = ReplyBody(
        ack=h(step["module_random"]["tok"]),
        time=suite["clock"] if "time" in request.req else None,
        ins=ins,
        res=res,
    )
    assert body == parsed
    assert body.encode() == h(step["reply_body"])
    assert len(reply.ct) == len(body.encode()) + _tag_len(file, path)
    frame = ReplyFrame.data_reply(data.sid, data.ctr, tag_len=_tag_len(file, path))
    assert reply_datagram_size(body, frame) == len(reply_datagram)


@pytest.mark.parametrize(("file", "path", "step"), SKEYS)
def test_skey_instruction(file: str, path: str, step: dict[str, Any]) -> None:
    item = _skey_instruction(path, step)
    assert item.encode() == h(step["instruction"])
    assert item.encoded_size() == len(h(step["instruction"]))
    parsed = parse_reply_body(h(step["reply_body"])).ins
    assert parsed == (item,)
    skey = parse_skey_body(parsed[0].body)
    assert skey.skid == _suite(file, path)["skid"] + 100
    assert (skey.sig_pub is not None) == (step["suite"] == "x25519")
    # The instruction fits the budget of the reply that carried it.
    data = parse_request(h(step["datagram"]))
    assert isinstance(data, Data)
    frame = ReplyFrame.data_reply(data.sid, data.ctr, tag_len=_tag_len(file, path))
    without = ReplyBody(ack=h(step["module_random"]["tok"]))
    assert item.encoded_size() <= ins_budget(without, frame, DEFAULT_MAX_DATAGRAM)


@pytest.mark.parametrize("file", FILES)
def test_every_vector_datagram_parses(file: str) -> None:
    for datagram in vector_fields("datagram", "reply", file=file):
        assert parse_datagram(datagram).encode() == datagram
