"""
The module controller's drop rules (MGP/1 §2, §5, §8, §11) and payload handling.

Each case starts from a valid vector datagram, breaks one thing, and checks
that the gateway stays silent and counts the drop under the right reason.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from m2mgw.config import ProtocolPolicy
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import cbor, keyschedule
from m2mgw.protocol.bodies import (
    ConfEntry,
    DataBody,
    Payload,
    parse_reply_body,
)
from m2mgw.protocol.engine import ModuleController
from m2mgw.protocol.messages import Data, DataReply, Hello, parse_datagram
from m2mgw.records import (
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    NewInstruction,
)
from m2mgw.registry import lookup
from tests.codec_helpers import VECTORS, h
from tests.engine_helpers import ADDR, HELLO_DRAWS, SUITES, exchange, gateway, result_of

V = VECTORS["p256"]
MODULE_ID = V["identity"]
SUITE = lookup(ICipherSuite, "p256")


def key1(**changes: Any) -> ModuleKey:
    """Module key 1 of the vectors, active."""
    key = ModuleKey(
        MODULE_ID,
        1,
        "p256",
        h(V["keyreg"]["pub"]),
        status=KeyStatus.ACTIVE,
        created_at=V["clock"] - 10,
    )
    return replace(key, **changes)


def dropped(controller: ModuleController, datagram: bytes) -> dict[str, int]:
    assert result_of(controller.handle(datagram, ADDR)) is None
    return dict(controller.drops.by_reason)


def rebuild_hello(step: dict[str, Any], **changes: Any) -> bytes:
    hello = parse_datagram(h(step["datagram"]))
    assert isinstance(hello, Hello)
    fields = {
        "hint": hello.hint,
        "suite": hello.suite,
        "skid": hello.skid,
        "epk": hello.epk,
        "ct": hello.ct,
    }
    fields.update(changes)
    return cbor.encode([1, 1, *fields.values()])


# -- envelope rules (§2) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "datagram",
    [
        b"\xff",
        h(V["hello_psk"]["datagram"]) + b"\x00",
        cbor.encode([2, 1, "", "p256", 7, b"", b""]),
        cbor.encode([1, 2, b"\x00" * 6, b""]),
        cbor.encode([1, 5, b""]),
        cbor.encode({1: 1}),
        bytes.fromhex("18") + bytes.fromhex("01"),
    ],
    ids=["cbor", "trailing", "version", "reply-type", "cookie", "not-array", "non-shortest"],
)
def test_malformed_envelopes_are_dropped(datagram: bytes) -> None:
    controller, *_ = gateway("p256")
    assert dropped(controller, datagram) == {"malformed": 1}


def test_oversized_datagram_is_dropped() -> None:
    controller, *_ = gateway("p256")
    assert dropped(controller, bytes(1473)) == {"size": 1}


# -- HELLO rules (§5), in the order of the checks ---------------------------------------


def test_unknown_suite() -> None:
    controller, *_ = gateway("p256")
    assert dropped(controller, rebuild_hello(V["hello_psk"], suite="p999")) == {"unknown-suite": 1}


@pytest.mark.parametrize("skid", [99, VECTORS["p384"]["skid"]])
def test_unknown_skid_or_skid_of_another_suite(skid: int) -> None:
    controller, *_ = gateway("p256")
    assert dropped(controller, rebuild_hello(V["hello_psk"], skid=skid)) == {"unknown-skid": 1}


def test_invalid_point() -> None:
    controller, *_ = gateway("p256")
    epk = bytearray(h(V["hello_psk"]["epk"]))
    epk[-1] ^= 1  # off the curve
    assert dropped(controller, rebuild_hello(V["hello_psk"], epk=bytes(epk))) == {"bad-point": 1}
    hybrid = b"\x06" + h(V["hello_psk"]["epk"])[1:]
    assert dropped(controller, rebuild_hello(V["hello_psk"], epk=hybrid))["bad-point"] == 2


def test_bad_tag() -> None:
    controller, *_ = gateway("p256")
    ct = bytearray(h(V["hello_psk"]["datagram"]))
    ct[-1] ^= 0x80
    assert dropped(controller, bytes(ct)) == {"bad-tag": 1}


def test_changed_hint_breaks_the_aad() -> None:
    controller, *_ = gateway("p256")
    assert dropped(controller, rebuild_hello(V["hello_psk"], hint=b"")) == {"bad-tag": 1}


def test_unknown_module() -> None:
    controller, *_ = gateway("p256", module=Module("someone-else", psk=bytes(32)))
    assert dropped(controller, h(V["hello_psk"]["datagram"])) == {"unknown-module": 1}
    events = controller.drops.drain(0)
    assert [(e.reason, e.claimed_id) for e in events] == [("unknown-module", MODULE_ID)]


def test_disabled_module() -> None:
    module = Module(MODULE_ID, psk=h(V["psk"]), status=ModuleStatus.DISABLED)
    controller, *_ = gateway("p256", module=module)
    assert dropped(controller, h(V["hello_psk"]["datagram"])) == {"disabled-module": 1}


def test_bad_psk_mac() -> None:
    controller, *_ = gateway("p256", module=Module(MODULE_ID, psk=bytes(32)))
    assert dropped(controller, h(V["hello_psk"]["datagram"])) == {"bad-psk-mac": 1}


def test_psk_refused_once_a_key_is_active() -> None:
    module = Module(MODULE_ID, psk=h(V["psk"]))
    controller, *_ = gateway("p256", module=module, keys=(key1(),))
    assert dropped(controller, h(V["hello_psk"]["datagram"])) == {"psk-refused": 1}


def test_psk_kept_by_policy_or_per_module() -> None:
    module = Module(MODULE_ID, psk=h(V["psk"]), psk_reusable=True)
    controller, _, draws, _ = gateway("p256", module=module, keys=(key1(),))
    draws.load(V["hello_psk"], HELLO_DRAWS)
    assert exchange(controller, V["hello_psk"]) == h(V["hello_psk"]["reply"])


def test_sig_hello_with_an_operator_imported_key() -> None:
    controller, _, draws, _ = gateway("p256", keys=(key1(),))
    draws.load(V["hello_sig"], HELLO_DRAWS)
    assert exchange(controller, V["hello_sig"]) == h(V["hello_sig"]["reply"])


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "unknown-kid"),
        (key1(status=KeyStatus.RETIRED), "retired-kid"),
        (key1(status=KeyStatus.REVOKED), "retired-kid"),
        (key1(not_after=V["clock"]), "expired-kid"),
        (key1(suite="p384"), "bad-kid"),
        (key1(public=h(VECTORS["p256"]["server_agreement_public"])), "bad-signature"),
    ],
    ids=["unknown", "retired", "revoked", "expired", "other-suite", "other-key"],
)
def test_sig_hello_credential_rules(key: ModuleKey | None, reason: str) -> None:
    controller, *_ = gateway("p256", keys=() if key is None else (key,))
    assert dropped(controller, h(V["hello_sig"]["datagram"])) == {reason: 1}


def test_sdh_with_the_wrong_module_key() -> None:
    wrong = key1(public=h(VECTORS["p256"]["server_agreement_public"]))
    controller, *_ = gateway("p256", keys=(wrong,))
    assert dropped(controller, h(V["hello_sdh"]["datagram"])) == {"bad-signature": 1}


def test_stale_ts() -> None:
    module = Module(MODULE_ID, psk=h(V["psk"]), last_hello_ts=V["clock"])
    controller, _, draws, _ = gateway("p256", module=module)
    draws.load(V["hello_psk"], HELLO_DRAWS)
    assert dropped(controller, h(V["hello_psk"]["datagram"])) == {"stale-ts": 1}


# -- DATA rules (§8) ---------------------------------------------------------------------


def open_session(
    policy: ProtocolPolicy | None = None,
) -> tuple[ModuleController, Any, list[float]]:
    now = [float(V["clock"])]
    controller, store, draws, _ = gateway("p256", policy=policy, now=now)
    draws.load(V["hello_psk"], HELLO_DRAWS)
    assert exchange(controller, V["hello_psk"]) is not None
    return controller, store, now


SID = h(V["hello_psk"]["sid"])
K_UP = h(V["hello_psk"]["k_up"])
K_DOWN = h(V["hello_psk"]["k_down"])


def data(ctr: int, body: DataBody | bytes, sid: bytes = SID) -> bytes:
    plaintext = body if isinstance(body, bytes) else body.encode()
    ct = SUITE.seal(K_UP, keyschedule.nonce_for_ctr(SUITE, ctr), Data.aad_for(sid, ctr), plaintext)
    return Data(sid, ctr, ct).encode()


def reply_body(datagram: bytes) -> Any:
    reply = parse_datagram(datagram)
    assert isinstance(reply, DataReply)
    plaintext = SUITE.open(
        K_DOWN,
        keyschedule.nonce_for_ctr(SUITE, reply.ctr),
        DataReply.aad_for(reply.sid, reply.ctr),
        reply.ct,
    )
    return parse_reply_body(plaintext)


def test_unknown_sid() -> None:
    controller, _, _ = open_session()
    assert dropped(controller, data(1, DataBody(tok=b"tok1"), sid=b"\x01" * 6)) == {
        "unknown-sid": 1
    }


def test_expired_sid() -> None:
    controller, _, now = open_session()
    now[0] += 86400
    assert dropped(controller, data(1, DataBody(tok=b"tok1"))) == {"expired-sid": 1}


def test_bad_tag_on_data() -> None:
    controller, _, _ = open_session()
    datagram = bytearray(data(1, DataBody(tok=b"tok1")))
    datagram[-3] ^= 1
    assert dropped(controller, bytes(datagram)) == {"bad-tag": 1}


def test_replayed_and_out_of_window_counters() -> None:
    controller, _, _ = open_session()
    assert result_of(controller.handle(data(100, DataBody(tok=b"t100")), ADDR)) is not None
    # Another datagram with an accepted ctr (not byte-identical: new tok) is a replay.
    assert dropped(controller, data(100, DataBody(tok=b"x100"))) == {"replay": 1}
    assert dropped(controller, data(36, DataBody(tok=b"t036"))) == {"replay": 2}
    assert result_of(controller.handle(data(37, DataBody(tok=b"t037")), ADDR)) is not None


def test_malformed_data_body_consumes_its_counter() -> None:
    controller, _, _ = open_session()
    assert dropped(controller, data(5, cbor.encode({3: 1}))) == {"malformed-body": 1}
    # The counter is spent: a valid body under ctr 5 is now a replay.
    assert dropped(controller, data(5, DataBody(tok=b"tok5")))["replay"] == 1


def test_resent_body_under_a_new_counter_is_applied_once() -> None:
    controller, store, _ = open_session()
    body = DataBody(tok=b"same-tok", pl=Payload(data=[{0: "t", 2: 1.5}], req=("time", "nope")))
    first = reply_body(result_of(controller.handle(data(1, body), ADDR)))
    second = reply_body(result_of(controller.handle(data(2, body), ADDR)))
    assert first.ack == second.ack == b"same-tok"
    assert first.err == second.err and first.err[0].code == 1
    assert first.time == second.time == V["clock"]
    reports = result_of(store.list_reports(MODULE_ID))
    assert len(reports) == 2  # one from the HELLO's pl, one from the DATA


def test_instructions_ride_until_confirmed() -> None:
    controller, store, _ = open_session()
    body = cbor.encode({"interval": 900})
    result_of(store.enqueue(NewInstruction(MODULE_ID, "set", body, wire_size=40), V["clock"]))
    first = reply_body(result_of(controller.handle(data(1, DataBody(tok=b"tok1")), ADDR)))
    assert [(i.iid, i.kind, i.body) for i in first.ins] == [(1, "set", {"interval": 900})]
    again = reply_body(result_of(controller.handle(data(2, DataBody(tok=b"tok2")), ADDR)))
    assert [i.iid for i in again.ins] == [1]
    conf = Payload(conf=(ConfEntry(1, 0, 1234),))
    done = reply_body(result_of(controller.handle(data(3, DataBody(tok=b"tok3", pl=conf)), ADDR)))
    assert done.ins == ()
    instruction = result_of(store.get_instruction(MODULE_ID, 1))
    assert instruction.state == InstructionState.CONFIRMED
    assert instruction.exec_ts == 1234
    assert instruction.attempts == 2
    # A confirmation of what is no longer sent is ignored and counted.
    result_of(controller.handle(data(4, DataBody(tok=b"tok4", pl=conf)), ADDR))
    assert controller.ignored_confirmations == 1


def test_instructions_fail_after_max_attempts() -> None:
    controller, store, _ = open_session(ProtocolPolicy(max_attempts=2))
    result_of(store.enqueue(NewInstruction(MODULE_ID, "set", b"\xf6", wire_size=12), 0))
    for ctr in (1, 2, 3):
        result_of(controller.handle(data(ctr, DataBody(tok=b"tok%d" % ctr)), ADDR))
    assert result_of(store.get_instruction(MODULE_ID, 1)).state == InstructionState.FAILED


def test_req_params_queues_a_keygen_that_rides_in_this_reply() -> None:
    now = [float(V["clock"])]
    controller, _, draws, _ = gateway("p256", now=now)
    draws.load(V["hello_psk"], HELLO_DRAWS)
    assert exchange(controller, V["hello_psk"]) is not None
    draws.queue = [bytes(range(32))]  # the Params seed
    body = DataBody(tok=b"keyq", pl=Payload(req=("params",)))
    reply = reply_body(result_of(controller.handle(data(1, body), ADDR)))
    (keygen,) = reply.ins
    assert keygen.kind == "keygen"
    assert keygen.body[1] == "p256" and keygen.body[7] == 1 and keygen.body[6] == bytes(range(32))


def test_note_becomes_an_alert_event_for_the_modules_applications() -> None:
    controller, store, _ = open_session()
    result_of(store.set_module_apps(MODULE_ID, ["billing"]))
    from m2mgw.protocol.bodies import Note

    body = DataBody(tok=b"note", pl=Payload(note=Note(2, "tamper", "lid open")))
    assert result_of(controller.handle(data(1, body), ADDR)) is not None
    events = result_of(store.events_after("billing", 0))
    assert [(e.kind, e.payload["code"]) for e in events] == [("alert", "tamper")]


@pytest.mark.parametrize("suite_name", SUITES)
def test_drops_are_silent_for_every_suite(suite_name: str) -> None:
    controller, *_ = gateway(suite_name)
    datagram = bytearray(h(VECTORS[suite_name]["hello_psk"]["datagram"]))
    datagram[-1] ^= 1
    assert dropped(controller, bytes(datagram)) == {"bad-tag": 1}
