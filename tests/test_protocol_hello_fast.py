"""
The HELLO path's head-built encodings, in-line checks and loaded module keys
give exactly what the general code gives (bytes, values, errors).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2mgw.client.module import (
    KeyState,
    ModuleEndpoint,
    ModuleKeyPair,
    ModuleState,
    ServerPublicKey,
)
from m2mgw.config import ProtocolPolicy
from m2mgw.crypto.ec import P256, P384
from m2mgw.errors import BadKey, BadPoint, BadSignature
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import bodies, cbor, keyschedule
from m2mgw.protocol.bodies import (
    AuthMethod,
    HelloBody,
    ReplyBody,
    build_hello_plaintext,
    build_hello_reply_plaintext,
    parse_hello_body,
    parse_hello_plaintext,
)
from m2mgw.protocol.engine import ModuleController
from m2mgw.protocol.messages import (
    MAX_UINT,
    Data,
    DataReply,
    Hello,
    HelloReply,
    MalformedMessage,
    parse_datagram,
)
from m2mgw.records import KeyStatus, Module, ModuleKey
from m2mgw.registry import all_plugins
from m2mgw.store.memory import MemoryStore
from tests.engine_helpers import ADDR, result_of

uints = st.integers(min_value=0, max_value=MAX_UINT)
hints = st.one_of(st.binary(max_size=64), st.text(max_size=16))
suite_names = st.text(min_size=1, max_size=8)
sids = st.binary(min_size=4, max_size=8)


@given(hint=hints, suite=suite_names, skid=uints, epk=st.binary(max_size=300))
def test_hello_aad_from_heads_is_the_general_encoding(
    hint: bytes | str, suite: str, skid: int, epk: bytes
) -> None:
    general = cbor.encode([1, 1, hint, suite, skid, epk])
    assert Hello.aad_for(hint, suite, skid, epk) == general
    assert Hello(hint, suite, skid, epk, b"ct").aad == general


@given(sid=sids, ct=st.binary(max_size=300))
def test_hello_reply_from_heads_is_the_general_encoding(sid: bytes, ct: bytes) -> None:
    assert HelloReply.aad_for(sid) == cbor.encode([1, 2, sid])
    assert HelloReply(sid, ct).encode() == cbor.encode([1, 2, sid, ct])


@given(aad=st.binary(max_size=300), other=st.binary(max_size=40), body=st.binary(max_size=300))
def test_tbs_from_heads_is_the_general_encoding(aad: bytes, other: bytes, body: bytes) -> None:
    assert keyschedule.hello_auth_tbs(aad, body) == cbor.encode(["MGP1 hello auth", aad, body])
    assert keyschedule.reply_tbs(aad, other, body) == cbor.encode(
        ["MGP1 hello reply", aad, other, body]
    )


@given(sid=sids, module_id=st.text(min_size=1, max_size=64), kid=uints)
def test_session_info_from_heads_is_the_general_encoding(
    sid: bytes, module_id: str, kid: int
) -> None:
    assert keyschedule.session_info(sid, module_id, kid) == cbor.encode(
        ["MGP1 session", sid, module_id, kid]
    )


@given(body=st.binary(max_size=300), sig=st.none() | st.binary(min_size=1, max_size=400))
def test_hello_reply_plaintext_from_heads_is_the_general_encoding(
    body: bytes, sig: bytes | None
) -> None:
    assert build_hello_reply_plaintext(body, sig) == cbor.encode([body, sig])


scalar_reply_bodies = st.builds(
    ReplyBody,
    ack=st.binary(min_size=4, max_size=32),
    stok=st.none() | st.binary(min_size=16, max_size=16),
    exp=st.none() | uints,
    time=st.none() | uints,
    more=st.booleans(),
    alias=st.none() | st.binary(min_size=8, max_size=16),
)


@given(body=scalar_reply_bodies)
def test_reply_body_from_heads_is_the_general_encoding(body: ReplyBody) -> None:
    assert body.encode() == cbor.encode(body.to_cbor())


@given(
    ack=st.binary(min_size=4, max_size=32),
    stok=st.binary(min_size=16, max_size=16),
    exp=uints,
    now=uints,
    alias=st.none() | st.binary(min_size=8, max_size=16),
)
def test_hello_base_is_the_checked_constructor(
    ack: bytes, stok: bytes, exp: int, now: int, alias: bytes | None
) -> None:
    quick = ReplyBody.hello_base(ack=ack, stok=stok, exp=exp, time=now, alias=alias)
    checked = ReplyBody(ack=ack, stok=stok, exp=exp, time=now, alias=alias)
    assert quick == checked
    assert quick.encode() == checked.encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"ack": b"123"},
        {"ack": b"x" * 33},
        {"stok": b"x" * 15},
        {"exp": -1},
        {"exp": True},
        {"time": 1 << 64},
        {"alias": b"x" * 7},
        {"alias": "text"},
    ],
)
def test_hello_base_refuses_what_the_constructor_refuses(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "ack": b"t" * 16,
        "stok": b"s" * 16,
        "exp": 3600,
        "time": 1_700_000_000,
        "alias": b"a" * 12,
        **changes,
    }
    with pytest.raises(ValueError) as expected:
        ReplyBody(**fields)
    with pytest.raises(ValueError) as got:
        ReplyBody.hello_base(**fields)
    assert str(got.value) == str(expected.value)


def test_hello_base_with_err_and_res_goes_through_the_constructor() -> None:
    err = (bodies.ErrorEntry(3, "unknown 9"),)
    quick = ReplyBody.hello_base(
        ack=b"t" * 8, stok=b"s" * 16, exp=60, time=1, alias=None, err=err, res={12: [2, 0]}
    )
    assert quick == ReplyBody(
        ack=b"t" * 8, stok=b"s" * 16, exp=60, time=1, err=err, res={12: [2, 0]}
    )


def _parse_slowly(data: bytes) -> Any:
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(bodies, "_quick_hello_body", lambda value: None)
        try:
            return parse_hello_body(data)
        except MalformedMessage as e:
            return (e.reason, e.detail, e.claimed_id)


def _parse(data: bytes) -> Any:
    try:
        return parse_hello_body(data)
    except MalformedMessage as e:
        return (e.reason, e.detail, e.claimed_id)


hello_body_maps = st.dictionaries(
    st.one_of(st.integers(min_value=0, max_value=7), st.booleans(), st.text(max_size=2)),
    st.one_of(
        uints,
        st.integers(min_value=-5, max_value=-1),
        st.binary(max_size=40),
        st.text(max_size=70),
        st.booleans(),
        st.none(),
        st.dictionaries(st.integers(min_value=9, max_value=15), uints, max_size=2),
    ),
    max_size=6,
)


@settings(max_examples=400)
@given(value=hello_body_maps)
def test_quick_hello_body_agrees_with_the_full_parse(value: dict[Any, Any]) -> None:
    try:
        data = cbor.encode(value)
    except (TypeError, ValueError):
        return  # keys equal in Python (1 and True): not a map CBOR can hold
    quick, full = _parse(data), _parse_slowly(data)
    assert quick == full
    assert type(quick) is type(full)


@given(
    module_id=st.text(min_size=1, max_size=20),
    kid=uints,
    ts=uints,
    tok=st.binary(min_size=8, max_size=32),
)
def test_valid_hello_bodies_parse_as_built(module_id: str, kid: int, ts: int, tok: bytes) -> None:
    body = HelloBody(id=module_id, kid=kid, ts=ts, tok=tok)
    assert parse_hello_body(body.encode()) == body
    plaintext = build_hello_plaintext(body.encode(), AuthMethod.SIG, b"v" * 64)
    if kid != 0:
        assert parse_hello_plaintext(plaintext).body == body


@given(hint=hints, suite=suite_names, skid=uints, epk=st.binary(max_size=300), sid=sids)
def test_parsed_messages_equal_the_checked_ones(
    hint: bytes | str, suite: str, skid: int, epk: bytes, sid: bytes
) -> None:
    for message in (
        Hello(hint, suite, skid, epk, b"ct"),
        HelloReply(sid, b"ct"),
        Data(sid, 7, b"ct"),
        DataReply(sid, 7, b"ct"),
    ):
        parsed = parse_datagram(message.encode())
        assert parsed == message
        assert type(parsed) is type(message)


# -- loaded module keys -------------------------------------------------------------------


@pytest.mark.parametrize("suite", [P256, P384], ids=lambda s: s.name)
def test_ec_verifier_checks_as_verify(suite: Any) -> None:
    key = suite.generate_signing_key()
    public = suite.signing_public(key)
    signature = suite.sign(key, b"data")
    verifier = suite.verifier(public)
    verifier.verify(signature, b"data")
    suite.verify(public, signature, b"data")
    for bad_signature, data in (
        (signature, b"other"),
        (signature[:-1], b"data"),
        (bytes(len(signature)), b"data"),
    ):
        with pytest.raises(BadSignature):
            verifier.verify(bad_signature, data)
        with pytest.raises(BadSignature):
            suite.verify(public, bad_signature, data)


def test_ec_verifier_validates_the_point() -> None:
    public = bytearray(P256.signing_public(P256.generate_signing_key()))
    public[-1] ^= 1  # off the curve
    with pytest.raises(BadPoint):
        P256.verifier(bytes(public))
    with pytest.raises(BadPoint):
        P256.verifier(b"\x06" + bytes(public[1:]))


@pytest.mark.parametrize("name", ["x25519", "rsa"])
def test_verifier_of_other_suites_checks_as_verify(name: str) -> None:
    suites: dict[str, Any] = dict(all_plugins(ICipherSuite))
    if name not in suites:
        pytest.skip(f"no {name} suite")
    suite = suites[name]
    key = suite.generate_signing_key()
    public = suite.signing_public(key)
    signature = suite.sign(key, b"data", None)
    verifier = suite.verifier(public)
    verifier.verify(signature, b"data")
    suite.verify(public, signature, b"data")
    for bad_signature, data in ((signature, b"other"), (signature[:-1], b"data")):
        with pytest.raises(BadSignature):
            verifier.verify(bad_signature, data)
        with pytest.raises(BadSignature):
            suite.verify(public, bad_signature, data)
    with pytest.raises(BadKey):  # when loaded (rsa) or when used (x25519's default)
        suite.verifier(b"\x30\x03\x02\x01\x01").verify(signature, b"data")


class _Fleet:
    """Modules with one P-256 key each, and a gateway with a small verifier cache."""

    def __init__(self, count: int, cache: int) -> None:
        self.store = MemoryStore()
        result_of(self.store.open())
        server = P256.generate_server_key()
        self.server_public = P256.server_public(server)[0]
        self.private: dict[str, Any] = {}
        modules, keys = [], []
        for i in range(count):
            module_id = f"m{i:03d}"
            private = P256.generate_signing_key()
            self.private[module_id] = private
            modules.append(Module(module_id))
            keys.append(
                ModuleKey(
                    module_id,
                    1,
                    "p256",
                    P256.signing_public(private),
                    status=KeyStatus.ACTIVE,
                    created_at=0,
                )
            )
        result_of(self.store.add_modules(modules, keys))
        self.now = time.time()
        loaded = _Server(7, "p256", server, self.server_public, None)
        self.controller = ModuleController(
            self.store,
            {"p256": P256},
            [loaded],
            ProtocolPolicy(sign_replies=True),
            now=lambda: self.now,
            verifier_cache_size=cache,
        )
        self.endpoints = {module_id: self.endpoint(module_id) for module_id in self.private}

    def endpoint(self, module_id: str, private: Any = None, last_ts: int = 0) -> ModuleEndpoint:
        private = private if private is not None else self.private[module_id]
        state = ModuleState(
            identity=module_id,
            suite="p256",
            server_keys={7: ServerPublicKey(7, "p256", self.server_public)},
            skid=7,
            keys={1: ModuleKeyPair(1, "p256", P256.dump_signing_key(private), KeyState.ACTIVE)},
            require_server_signature=True,
            hello_method="sig",
            last_ts=last_ts,
        )
        return ModuleEndpoint(state)

    def hello(self, endpoint: ModuleEndpoint) -> bytes | None:
        reply: bytes | None = result_of(
            self.controller.handle(endpoint.build_hello().datagram, ADDR)
        )
        return reply


class _Server:
    def __init__(
        self, skid: int, suite: str, key: Any, public: bytes, sig_public: bytes | None
    ) -> None:
        self.skid, self.suite, self.key, self.public, self.sig_public = (
            skid,
            suite,
            key,
            public,
            sig_public,
        )


def test_verifier_cache_is_bounded_and_evicts() -> None:
    fleet = _Fleet(3, cache=2)
    for _ in range(2):
        for endpoint in fleet.endpoints.values():
            assert fleet.hello(endpoint) is not None
    assert len(fleet.controller._verifiers) == 2
    assert fleet.controller.answered["hello"] == 6


def test_a_replaced_module_key_is_not_served_from_the_cache() -> None:
    fleet = _Fleet(1, cache=10)
    module_id = "m000"
    assert fleet.hello(fleet.endpoints[module_id]) is not None
    # The operator replaces the module's key 1 (same kid, new public key).
    successor = P256.generate_signing_key()
    stored = fleet.store.data.keys[module_id][1]
    fleet.store.data.keys[module_id][1] = replace(stored, public=P256.signing_public(successor))
    assert fleet.hello(fleet.endpoints[module_id]) is None
    assert fleet.controller.drops.by_reason.get("bad-signature") == 1
    renewed = fleet.endpoint(module_id, successor, last_ts=fleet.endpoints[module_id].state.last_ts)
    assert fleet.hello(renewed) is not None
    # A key no longer usable is refused whatever the cache holds.
    fleet.store.data.keys[module_id][1] = replace(
        fleet.store.data.keys[module_id][1], status=KeyStatus.REVOKED
    )
    assert fleet.hello(renewed) is None
    assert fleet.controller.drops.by_reason.get("retired-kid") == 1


def test_verifier_cache_works_for_a_suite_without_verifier() -> None:
    class Plain:
        """P-256 seen through a suite object that has no ``verifier``."""

        def __getattr__(self, name: str) -> Any:
            if name == "verifier":
                raise AttributeError(name)
            return getattr(P256, name)

    fleet = _Fleet(1, cache=10)
    fleet.controller._suites["p256"] = Plain()  # type: ignore[assignment]
    assert fleet.hello(fleet.endpoints["m000"]) is not None
    assert fleet.hello(fleet.endpoints["m000"]) is not None
