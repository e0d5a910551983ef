"""
The module state machine (:mod:`m2mgw.client.module`) against a scripted gateway:
counters, ``ts``, replies it must drop, instruction execution and
confirmation, key registration and rotation, server key announcements, and
the retry rules (identical bytes, then the same DataBody under a new ``ctr``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from m2mgw.client.module import (
    MAX_EXECUTED,
    ClientError,
    HelloContext,
    KeyState,
    ModuleEndpoint,
    ModuleKeyPair,
    keygen_random,
    refuse_unknown,
)
from m2mgw.client.transport import DataOperation, Exchange, Finished, HelloOperation, Send
from m2mgw.crypto.primitives import hkdf
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import keyschedule
from m2mgw.protocol.bodies import (
    MISSING,
    AuthMethod,
    ConfEntry,
    InstructionItem,
    KeyReg,
    KeyRegResult,
    KeyRegStatus,
    Params,
    Payload,
    SkeyBody,
)
from m2mgw.protocol.messages import Data, Hello, parse_request
from m2mgw.registry import lookup
from tests.client_helpers import (
    IDENTITY,
    NOW,
    PSK,
    Clock,
    ScriptedGateway,
    module_state,
    server_key,
    warm_endpoint,
)

P256 = lookup(ICipherSuite, "p256")


class Recorder:
    """An application instruction handler that records its calls."""

    def __init__(self, status: int = 0, result: Any = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.status = status
        self.result = result

    def __call__(self, kind: str, body: Any) -> tuple[int, Any]:
        self.calls.append((kind, body))
        return self.status, self.result


class QueuedRandom:
    """Queued draws first, then the system source."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        if self.queue:
            value = self.queue.pop(0)
            assert len(value) == n
            return value
        return os.urandom(n)


def hello_and_answer(endpoint: ModuleEndpoint, gateway: ScriptedGateway, **reply: Any) -> Any:
    outgoing = endpoint.build_hello()
    assert isinstance(outgoing.context, HelloContext)
    return endpoint.handle_hello_reply(
        gateway.hello_reply(outgoing.datagram, **reply), outgoing.context
    )


def data_and_answer(
    endpoint: ModuleEndpoint, gateway: ScriptedGateway, payload: Payload | None = None, **reply: Any
) -> Any:
    outgoing = endpoint.build_data(payload)
    outcome = endpoint.handle_data_reply(gateway.data_reply(outgoing.datagram, **reply))
    assert outcome.accepted, outcome.reason
    return outcome


# -- counters and freshness ---------------------------------------------------------------------


def test_ctr_strictly_increases_and_is_never_reused() -> None:
    endpoint, gateway, _ = warm_endpoint()
    seen = []
    for _ in range(3):
        first = endpoint.build_data(Payload(data=1))
        again = endpoint.resend_under_new_ctr(first)
        seen += [first.context.ctr, again.context.ctr]  # type: ignore[union-attr]
        assert endpoint.handle_data_reply(gateway.data_reply(again.datagram)).accepted
    assert seen == [1, 2, 3, 4, 5, 6]
    assert endpoint.state.session is not None and endpoint.state.session.next_ctr == 7


def test_hello_ts_grows_even_when_the_clock_does_not() -> None:
    server = server_key()
    clock = Clock()
    endpoint = ModuleEndpoint(module_state(server), clock=clock)
    stamps = []
    for now in (NOW, NOW, NOW - 1000):
        clock.now = now
        outgoing = endpoint.build_hello()
        stamps.append(ScriptedGateway.for_server(server).open_hello(outgoing.datagram).body.ts)
    assert stamps == [int(NOW), int(NOW) + 1, int(NOW) + 2]
    assert endpoint.state.last_ts == int(NOW) + 2
    clock.now = NOW + 100
    endpoint.build_hello()
    assert endpoint.state.last_ts == int(NOW) + 100


def test_the_session_is_renewed_before_it_expires() -> None:
    endpoint, _, clock = warm_endpoint(renew_before=300)
    assert not endpoint.needs_hello()
    clock.now += 86400 - 301
    assert not endpoint.needs_hello()
    clock.now += 2
    assert endpoint.needs_hello()
    clock.now += 400
    with pytest.raises(ClientError, match="no live session"):
        endpoint.build_data()


# -- replies that must be dropped ------------------------------------------------------------------


def test_a_reply_for_a_ctr_never_sent_or_already_answered_is_ignored() -> None:
    endpoint, gateway, _ = warm_endpoint()
    outgoing = endpoint.build_data(Payload(data=1))
    forged = gateway.data_reply(outgoing.datagram, ctr=99)
    before = (endpoint.state.outbox, dict(endpoint.state.session.unanswered))  # type: ignore[union-attr]
    outcome = endpoint.handle_data_reply(forged)
    assert not outcome.accepted and outcome.reason == "no unanswered DATA with this ctr"
    assert (endpoint.state.outbox, endpoint.state.session.unanswered) == before  # type: ignore[union-attr]
    reply = gateway.data_reply(outgoing.datagram)
    assert endpoint.handle_data_reply(reply).accepted
    assert endpoint.state.outbox is None
    again = endpoint.handle_data_reply(reply)
    assert not again.accepted and again.reason == "no unanswered DATA with this ctr"


def test_a_reply_with_a_wrong_ack_tag_or_session_is_ignored() -> None:
    endpoint, gateway, _ = warm_endpoint()
    outgoing = endpoint.build_data(Payload(data=1))
    wrong_ack = gateway.data_reply(outgoing.datagram, ack=b"\x00" * 8)
    assert endpoint.handle_data_reply(wrong_ack).reason == "ack is not the DATA's tok"
    reply = bytearray(gateway.data_reply(outgoing.datagram))
    reply[-1] ^= 1
    assert endpoint.handle_data_reply(bytes(reply)).reason == "bad tag"
    assert endpoint.handle_data_reply(b"\x83\x01\x04").reason.startswith("malformed")  # type: ignore[union-attr]
    # A reply of the right shape on another session.
    other, other_gateway, _ = warm_endpoint()
    foreign = other_gateway.data_reply(other.build_data().datagram)
    assert endpoint.handle_data_reply(foreign).reason in ("not the live session", "bad tag")
    assert endpoint.state.outbox is not None


def test_an_unsigned_hello_reply_is_dropped_when_signatures_are_required() -> None:
    server = server_key()
    endpoint = ModuleEndpoint(module_state(server), clock=Clock())
    gateway = ScriptedGateway.for_server(server)
    outcome = hello_and_answer(endpoint, gateway, sign=False)
    assert not outcome.accepted and outcome.reason == "unsigned reply"
    assert endpoint.state.session is None
    outcome = hello_and_answer(endpoint, gateway, forge=True)
    assert outcome.reason == "bad server signature"
    endpoint.state.require_server_signature = False
    assert hello_and_answer(endpoint, gateway, sign=False).accepted
    # Not required, but present: it is still checked.
    assert hello_and_answer(endpoint, gateway, forge=True).reason == "bad server signature"


def test_a_hello_reply_answering_another_tok_is_dropped() -> None:
    server = server_key()
    endpoint = ModuleEndpoint(module_state(server), clock=Clock())
    gateway = ScriptedGateway.for_server(server)
    outcome = hello_and_answer(endpoint, gateway, ack=b"\x01" * 16)
    assert outcome.reason == "ack is not the HELLO's tok"


def test_handle_reply_matches_a_hello_reply_to_any_of_the_hellos_sent() -> None:
    server = server_key()
    endpoint = ModuleEndpoint(module_state(server), clock=Clock())
    gateway = ScriptedGateway.for_server(server)
    first, second = endpoint.build_hello(), endpoint.build_hello()
    reply = gateway.hello_reply(first.datagram)
    assert not endpoint.handle_reply(reply, [second.context]).accepted  # type: ignore[list-item]
    outcome = endpoint.handle_reply(reply, [first.context, second.context])  # type: ignore[list-item]
    assert outcome.accepted and outcome.kind == "hello"


# -- instructions ---------------------------------------------------------------------------------


def test_an_instruction_is_executed_once_and_confirmed_in_the_next_message() -> None:
    handler = Recorder(0, {"ok": True})
    endpoint, gateway, clock = warm_endpoint(execute=handler)
    item = InstructionItem(5, "set", {"led": "on"})
    outcome = data_and_answer(endpoint, gateway, ins=(item,))
    assert [(i.iid, i.status, i.duplicate) for i in outcome.instructions] == [(5, 0, False)]
    assert handler.calls == [("set", {"led": "on"})]
    assert endpoint.state.pending_confs == [ConfEntry(5, 0, int(clock.now), {"ok": True})]

    # Sent again before the confirmation arrived: not executed again.
    clock.now += 10
    next_message = endpoint.build_data()
    _, body = gateway.open_data(next_message.datagram)
    assert body.pl is not None and body.pl.conf == (ConfEntry(5, 0, int(NOW), {"ok": True}),)
    outcome = endpoint.handle_data_reply(gateway.data_reply(next_message.datagram, ins=(item,)))
    assert outcome.instructions[0].duplicate and handler.calls == [("set", {"led": "on"})]
    # The confirmation was acknowledged; the duplicate is confirmed again (no result).
    assert endpoint.state.pending_confs == [ConfEntry(5, 0, int(NOW))]


def test_executed_iids_are_bounded() -> None:
    handler = Recorder()
    endpoint, gateway, _ = warm_endpoint(execute=handler)
    for first in range(1, MAX_EXECUTED + 11, 40):  # a reply holds about 100 small ones
        last = min(first + 40, MAX_EXECUTED + 11)
        items = tuple(InstructionItem(iid, "set", iid) for iid in range(first, last))
        data_and_answer(endpoint, gateway, ins=items)
    executed = endpoint.state.executed
    assert len(executed) == MAX_EXECUTED
    assert executed[0].iid == 11 and executed[-1].iid == MAX_EXECUTED + 10


def test_not_after_is_checked_against_the_gateway_time_estimate() -> None:
    handler = Recorder()
    endpoint, gateway, clock = warm_endpoint(execute=handler)
    gateway_time = int(NOW) + 5000  # the gateway's clock differs from the module's
    data_and_answer(endpoint, gateway, Payload(req=("time",)), time=gateway_time)
    assert endpoint.gateway_now() == gateway_time
    clock.now += 100  # 100 s later, in a reply without time
    late = InstructionItem(1, "set", 1, not_after=gateway_time + 50)
    fine = InstructionItem(2, "set", 2, not_after=gateway_time + 150)
    outcome = data_and_answer(endpoint, gateway, ins=(late, fine))
    assert [(i.iid, i.status, i.result) for i in outcome.instructions] == [
        (1, 2, "not_after passed"),
        (2, 0, MISSING),
    ]
    assert handler.calls == [("set", 2)]


def test_application_handlers_failures_are_contained() -> None:
    def explode(kind: str, body: Any) -> tuple[int, Any]:
        raise RuntimeError("boom")

    endpoint, gateway, _ = warm_endpoint(execute=explode)
    outcome = data_and_answer(endpoint, gateway, ins=(InstructionItem(1, "set", None),))
    assert outcome.instructions[0].status == 1
    assert outcome.instructions[0].result == "RuntimeError: boom"

    endpoint, gateway, _ = warm_endpoint(execute=lambda kind, body: (0, object()))
    outcome = data_and_answer(endpoint, gateway, ins=(InstructionItem(1, "set", None),))
    assert outcome.instructions[0].result == "result is not CBOR-encodable"

    endpoint, gateway, _ = warm_endpoint()  # the library default refuses
    outcome = data_and_answer(endpoint, gateway, ins=(InstructionItem(1, "set", None),))
    assert (outcome.instructions[0].status, outcome.instructions[0].result) == refuse_unknown(
        "set", None
    )


def test_rehello_ends_the_session_and_is_confirmed_in_the_next_hello() -> None:
    endpoint, gateway, _ = warm_endpoint()
    outcome = data_and_answer(endpoint, gateway, ins=(InstructionItem(7, "rehello", None),))
    assert outcome.rehello and endpoint.state.session is None and endpoint.needs_hello()
    outgoing = endpoint.build_hello()
    body = gateway.open_hello(outgoing.datagram).body
    assert body.pl is not None and body.pl.conf == (ConfEntry(7, 0, int(NOW)),)
    outcome = endpoint.handle_hello_reply(gateway.hello_reply(outgoing.datagram), outgoing.context)  # type: ignore[arg-type]
    assert outcome.accepted and endpoint.state.pending_confs == []


def test_a_signed_server_key_is_stored_and_a_forged_one_refused() -> None:
    endpoint, gateway, _ = warm_endpoint()
    server = gateway.servers[1]
    announced = server_key("p256", skid=101)
    tbs = keyschedule.skey_tbs(101, "p256", announced.public, None)
    good = SkeyBody(skid=101, suite="p256", pub=announced.public, sig=P256.sign(server.key, tbs))
    forged = SkeyBody(
        skid=102, suite="p256", pub=announced.public, sig=P256.sign(announced.key, tbs)
    )
    outcome = data_and_answer(
        endpoint,
        gateway,
        ins=(
            InstructionItem(1, "skey", good.to_cbor()),
            InstructionItem(2, "skey", forged.to_cbor()),
        ),
    )
    assert [(i.status, i.result) for i in outcome.instructions] == [
        (0, MISSING),
        (2, "bad signature"),
    ]
    assert endpoint.state.server_keys[101].public == announced.public
    assert 102 not in endpoint.state.server_keys
    assert endpoint.state.skid == 101
    # The next HELLO goes to the new key.
    gateway.servers[101] = announced
    hello = endpoint.build_hello()
    assert parse_request(hello.datagram).skid == 101  # type: ignore[union-attr]
    assert endpoint.handle_hello_reply(gateway.hello_reply(hello.datagram), hello.context).accepted  # type: ignore[arg-type]


# -- keys ------------------------------------------------------------------------------------------


def test_a_keygen_derives_the_key_from_seed_and_module_randomness() -> None:
    random = QueuedRandom()
    endpoint, gateway, _ = warm_endpoint(random=random)
    hello_key = endpoint.start_key_registration()
    data_and_answer(endpoint, gateway, res={12: KeyRegResult(1, 0).to_cbor()})
    assert endpoint.state.keys[1].status == KeyState.REGISTERED
    assert hello_and_answer(endpoint, gateway).accepted
    assert endpoint.state.session.kid == 1 and endpoint.state.psk is None  # type: ignore[union-attr]
    assert hello_key.kid == 1

    seed, module_random = bytes(range(32)), bytes(range(100, 132))
    params = Params(suite="p256", ttl=3600, seed=seed, kid=2, pid=9)
    random.queue = [os.urandom(8), module_random]  # the DATA's tok, then the keygen's draw
    outcome = data_and_answer(
        endpoint, gateway, ins=(InstructionItem(4, "keygen", params.to_cbor()),)
    )
    assert outcome.instructions[0].status == 0
    pending = endpoint.state.pending_keyreg
    assert pending is not None and (pending.kid, pending.pid, pending.keygen_iid) == (2, 9, 4)

    okm = hkdf("SHA-256", seed, module_random, b"MGP1 keygen", 40)
    d = int.from_bytes(okm, "big") % (P256.named_curve.order - 1) + 1
    expected = ec.derive_private_key(d, ec.SECP256R1()).public_key()
    point = serialization.PublicFormat.UncompressedPoint
    assert pending.pub == expected.public_bytes(serialization.Encoding.X962, point)
    assert keygen_random(P256, seed, module_random)(40) == okm

    # The KeyReg and the keygen's confirmation ride in the same DATA.
    outgoing = endpoint.build_data()
    _, body = gateway.open_data(outgoing.datagram)
    assert body.pl is not None and isinstance(body.pl.keyreg, KeyReg)
    assert [conf.iid for conf in body.pl.conf] == [4]
    keyreg = body.pl.keyreg
    tbs_k = keyschedule.keyreg_tbs(IDENTITY, 2, keyreg.pub, "p256", 9)
    P256.verify(
        P256.signing_public(P256.load_signing_key(endpoint.state.keys[1].private)),
        keyreg.proof,
        tbs_k,
    )
    P256.verify(keyreg.pub, keyreg.pop, tbs_k)
    reply = gateway.data_reply(outgoing.datagram, res={12: KeyRegResult(2, 0).to_cbor()})
    assert endpoint.handle_data_reply(reply).keyreg == KeyRegResult(2, 0)
    assert endpoint.state.keys[2].not_after is not None
    # The next HELLO activates it and forgets key 1.
    assert endpoint.hello_credential() == (2, AuthMethod.SIG)
    assert hello_and_answer(endpoint, gateway).accepted
    assert sorted(endpoint.state.keys) == [2] and endpoint.state.keys[2].status == KeyState.ACTIVE


def test_a_keygen_with_unusable_params_is_refused() -> None:
    endpoint, gateway, _ = warm_endpoint()
    other_suite = Params(suite="p384", ttl=1, seed=bytes(16), kid=1, pid=1, curve="P-256")
    malformed = {1: "p256"}
    outcome = data_and_answer(
        endpoint,
        gateway,
        ins=(
            InstructionItem(1, "keygen", other_suite.to_cbor()),
            InstructionItem(2, "keygen", malformed),
        ),
    )
    assert [i.status for i in outcome.instructions] == [2, 1]
    assert endpoint.state.pending_keyreg is None


def test_a_refused_key_registration_forgets_the_key() -> None:
    endpoint, gateway, _ = warm_endpoint()
    endpoint.start_key_registration()
    outcome = data_and_answer(endpoint, gateway, res={12: KeyRegResult(1, 5, "policy").to_cbor()})
    assert outcome.keyreg == KeyRegResult(1, KeyRegStatus.REFUSED, "policy")
    assert endpoint.state.pending_keyreg is None and endpoint.state.keys == {}
    assert endpoint.hello_credential() == (0, AuthMethod.PSK)


def test_kid_taken_after_an_unanswered_hello_carrier_means_registered() -> None:
    endpoint, gateway, _ = warm_endpoint()
    endpoint.start_key_registration()
    lost = endpoint.build_hello(include_keyreg=True)  # its reply never comes
    pl = gateway.open_hello(lost.datagram).body.pl
    assert pl is not None and pl.keyreg is not None
    outcome = data_and_answer(endpoint, gateway, res={12: KeyRegResult(1, 3, "taken").to_cbor()})
    assert outcome.keyreg.status == KeyRegStatus.WRONG_KID
    assert endpoint.state.keys[1].status == KeyState.REGISTERED


def test_a_proof_is_remade_for_the_credential_that_carries_it() -> None:
    server = server_key()
    state = module_state(server, psk=None)
    key = P256.generate_signing_key()
    state.keys = {1: ModuleKeyPair(1, "p256", P256.dump_signing_key(key))}
    endpoint = ModuleEndpoint(state, clock=Clock())
    gateway = ScriptedGateway.for_server(server)
    pending = endpoint.start_key_registration(vouching_kid=1)
    state.psk = PSK
    outgoing = endpoint.build_hello(kid=0, include_keyreg=True)
    keyreg = gateway.open_hello(outgoing.datagram).body.pl.keyreg  # type: ignore[union-attr]
    tbs_k = keyschedule.keyreg_tbs(IDENTITY, 2, pending.pub, "p256", 0)
    assert keyreg.proof == keyschedule.psk_keyreg_proof(PSK, IDENTITY, tbs_k)  # type: ignore[union-attr]


def test_without_credential_or_server_key_nothing_is_built() -> None:
    server = server_key()
    endpoint = ModuleEndpoint(module_state(server), clock=Clock())
    endpoint.state.psk = None
    with pytest.raises(ClientError, match="no usable key and no PSK"):
        endpoint.build_hello()
    with pytest.raises(ClientError, match="no x25519 server key"):
        endpoint._server_key("x25519", None)
    with pytest.raises(ValueError, match="neither a PSK nor a key"):
        ModuleEndpoint(module_state(server, psk=None), clock=Clock())


def test_secrets_stay_out_of_reprs() -> None:
    endpoint, _, _ = warm_endpoint()
    endpoint.start_key_registration()
    state = endpoint.state
    text = repr(state)
    assert PSK.hex() not in text and repr(PSK) not in text
    assert state.session is not None and repr(state.session.k_up) not in text
    assert repr(state.pending_keyreg.private) not in text  # type: ignore[union-attr]


# -- retries ----------------------------------------------------------------------------------


def test_retries_send_identical_bytes_then_the_same_body_under_a_new_ctr() -> None:
    endpoint, gateway, _ = warm_endpoint()
    exchange = Exchange(endpoint, DataOperation(Payload(data=[{0: "t", 2: 1.5}])))
    first = exchange.start()
    assert isinstance(first, Send) and first.timeout == 2.0
    copy = exchange.timed_out()
    assert isinstance(copy, Send) and copy.datagrams == first.datagrams and copy.timeout == 4.0
    renewed = exchange.timed_out()
    assert isinstance(renewed, Send) and renewed.timeout == 8.0
    assert renewed.datagrams[0] != first.datagrams[0]
    data_a, body_a = gateway.open_data(first.datagrams[0])
    data_b, body_b = gateway.open_data(renewed.datagrams[0])
    assert (data_a.ctr, data_b.ctr) == (1, 2)
    assert body_a.encode() == body_b.encode() and body_a.tok == body_b.tok
    # A late reply to the first copy still answers the message.
    done = exchange.datagram_received(gateway.data_reply(first.datagrams[0]))
    assert isinstance(done, Finished) and done.outcome.ok and done.outcome.sent == 3
    assert endpoint.state.outbox is None and endpoint.state.session.unanswered == {}  # type: ignore[union-attr]


def test_after_the_budget_a_new_hello_carries_the_same_body() -> None:
    endpoint, gateway, _ = warm_endpoint()
    exchange = Exchange(endpoint, DataOperation(Payload(data=1)))
    steps = [exchange.start(), exchange.timed_out(), exchange.timed_out(), exchange.timed_out()]
    assert all(isinstance(step, Send) for step in steps)
    hello = steps[-1].datagrams[0]  # type: ignore[union-attr]
    assert isinstance(parse_request(hello), Hello)
    first_tok = gateway.open_data(steps[0].datagrams[0])[1].tok  # type: ignore[union-attr]
    data = exchange.datagram_received(gateway.hello_reply(hello))
    assert isinstance(data, Send)
    message = parse_request(data.datagrams[0])
    assert isinstance(message, Data) and message.ctr == 1  # a new session starts at 1
    assert gateway.open_data(data.datagrams[0])[1].tok == first_tok
    done = exchange.datagram_received(gateway.data_reply(data.datagrams[0]))
    assert isinstance(done, Finished) and done.outcome.ok and done.outcome.hellos == 1


def test_an_unanswered_exchange_keeps_the_body_for_the_next_wake() -> None:
    endpoint, gateway, _ = warm_endpoint()
    exchange = Exchange(endpoint, DataOperation(Payload(data=1)))
    step = exchange.start()
    sent = []
    while isinstance(step, Send):
        sent.append(step)
        step = exchange.timed_out()
    assert isinstance(step, Finished) and step.outcome.failure == "no answer"
    # DATA, same bytes, new ctr, then 2 HELLOs with one copy each.
    assert len(sent) == 7 and step.outcome.hellos == 2
    tok = endpoint.state.outbox.tok  # type: ignore[union-attr]
    with pytest.raises(ClientError, match="unanswered"):
        endpoint.build_data(Payload(data=2))
    resend = Exchange(endpoint, DataOperation(resend=True))
    again = resend.start()
    assert isinstance(again, Send)
    assert gateway.open_data(again.datagrams[0])[1].tok == tok


def test_a_hello_exchange_for_the_psk_after_a_key_is_refused_by_choice() -> None:
    endpoint, _, _ = warm_endpoint()
    endpoint.state.psk = None
    step = Exchange(endpoint, HelloOperation(kid=0)).start()
    assert (
        isinstance(step, Finished)
        and step.outcome.failure == "error: the module no longer has its PSK"
    )


def test_a_second_hello_falls_back_from_a_just_registered_key() -> None:
    endpoint, gateway, _ = warm_endpoint()
    endpoint.start_key_registration()
    data_and_answer(endpoint, gateway, res={12: KeyRegResult(1, 0).to_cbor()})
    assert hello_and_answer(endpoint, gateway).accepted  # key 1 active, PSK gone
    endpoint.start_key_registration()
    data_and_answer(endpoint, gateway, res={12: KeyRegResult(2, 0).to_cbor()})
    exchange = Exchange(endpoint, HelloOperation())
    steps = [exchange.start(), exchange.timed_out(), exchange.timed_out()]
    kids = [gateway.open_hello(step.datagrams[0]).body.kid for step in steps]  # type: ignore[union-attr]
    assert kids == [2, 2, 1]  # the registered key, its copy, then the active one
    assert endpoint.hello_credential() == (2, AuthMethod.SIG)
    assert endpoint.hello_credential(fallback=True) == (1, AuthMethod.SIG)


@pytest.mark.parametrize(("suite_name", "size"), [("p256", 33), ("p256-ccm8", 33), ("p384", 49)])
def test_compress_points_sends_a_compressed_epk_that_the_gateway_accepts(
    suite_name: str, size: int
) -> None:
    endpoint, gateway, _ = warm_endpoint(suite_name, compress_points=True)
    hello = endpoint.build_hello()
    epk = parse_request(hello.datagram).epk  # type: ignore[union-attr]
    assert len(epk) == size and epk[0] in (2, 3)
    reply = gateway.hello_reply(hello.datagram)
    assert endpoint.handle_hello_reply(reply, hello.context).accepted  # type: ignore[arg-type]


def test_compress_points_leaves_other_suites_alone() -> None:
    endpoint, _, _ = warm_endpoint("x25519", compress_points=True)
    assert len(parse_request(endpoint.build_hello().datagram).epk) == 32  # type: ignore[union-attr]
