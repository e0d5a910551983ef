"""
The key lifecycle in the MGP/1 engine, driven by the real module endpoint
with no sockets (memory store, synchronous): parameter sets in ``keygen``,
every way a key registration is refused (with its ``res`` status and a
``key`` event ``rejected``), the events of a rotation (each once), an
expired key, the grace period, and a module waiting for approval.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from m2mgw.client.module import ModuleEndpoint, ModuleKeyPair, ModuleState, Outgoing, ReplyOutcome
from m2mgw.config import ProtocolPolicy, RotationConfig, RotationPolicy
from m2mgw.keys.params import ParameterSet, complete_sets
from m2mgw.keys.rotation import request_rotation
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import KeyRegStatus, Payload
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import (
    VOUCHED_BY_OPERATOR,
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    NewInstruction,
)
from m2mgw.store.memory import MemoryStore
from tests.client_helpers import NOW, PSK, Clock, result_of
from tests.key_lifecycle_helpers import SKIDS, SUITES, cached_server_key

ID = "meter-7"
ADDR = ("127.0.0.1", 40000)


@dataclass
class Rig:
    """A gateway (engine + memory store) and one real module talking to it directly."""

    store: MemoryStore
    controller: ModuleController
    clock: Clock
    endpoint: ModuleEndpoint
    sets: dict[str, ParameterSet]

    @property
    def now(self) -> int:
        return int(self.clock())

    def send(self, outgoing: Outgoing) -> ReplyOutcome | None:
        """One datagram to the gateway; the module's handling of the reply (``None``: silence)."""
        reply = result_of(self.controller.handle(outgoing.datagram, ADDR))
        if reply is None:
            return None
        contexts = [outgoing.context] if outgoing.is_hello else []
        return self.endpoint.handle_reply(reply, contexts)  # type: ignore[arg-type]

    def hello(self, **options: Any) -> ReplyOutcome | None:
        return self.send(self.endpoint.build_hello(**options))

    def data(self, payload: Payload | None = None) -> ReplyOutcome | None:
        return self.send(self.endpoint.build_data(payload))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = result_of(self.store.events_after("app", 0, 1000))
        return [dict(e.payload) for e in found if kind is None or e.kind == kind]

    def keys(self) -> dict[int, KeyStatus]:
        return {k.kid: k.status for k in result_of(self.store.list_keys(ID))}

    def rotate(self, params: str = "p256") -> int:
        """Queue a keygen (the application entry point); its iid."""
        queued = result_of(
            request_rotation(
                self.store, ID, self.sets[params], self.now, secrets.token_bytes, "app"
            )
        )
        assert queued is not None
        return int(queued.iid)


def rig(
    *,
    preregistered: bool = True,
    status: ModuleStatus = ModuleStatus.ENABLED,
    rotation: RotationConfig | None = None,
    params: dict[str, ParameterSet] | None = None,
    suites: tuple[str, ...] = ("p256", "x25519"),
    not_after: int | None = None,
) -> Rig:
    """A module with a pre-registered p256 key 1 (or only its PSK), and its gateway."""
    servers = [cached_server_key(suite, SKIDS[suite]) for suite in suites if suite in SKIDS]
    clock = Clock()
    store = MemoryStore()
    suite_objects = {name: SUITES[name] for name in suites}
    sets = complete_sets(params or {}, suite_objects, ProtocolPolicy().key_ttl)
    controller = ModuleController(
        store,
        suite_objects,
        servers,
        ProtocolPolicy(),
        now=clock,
        random=secrets.token_bytes,
        params=sets,
        rotation=rotation,
    )
    state = ModuleState(
        identity=ID,
        suite="p256",
        psk=PSK,
        server_keys={s.skid: s.public_key() for s in servers},
        skid=SKIDS["p256"],
    )
    keys = []
    if preregistered:
        p256 = SUITES["p256"]
        private = p256.generate_signing_key()
        state.keys = {1: ModuleKeyPair(1, "p256", bytes(p256.dump_signing_key(private)))}
        state.psk = None
        keys.append(
            ModuleKey(
                ID,
                1,
                "p256",
                bytes(p256.signing_public(private)),
                status=KeyStatus.ACTIVE,
                vouched_by=VOUCHED_BY_OPERATOR,
                created_at=int(NOW),
                activated_at=int(NOW),
                not_after=not_after,
            )
        )
    result_of(
        store.add_modules(
            [Module(ID, status=status, psk=None if preregistered else PSK)], keys, {ID: ["app"]}
        )
    )
    endpoint = ModuleEndpoint(state, clock=clock, execute=lambda kind, body: (0, None))
    return Rig(store, controller, clock, endpoint, sets)


def keygen_received(r: Rig) -> int:
    """Open a session, queue a keygen, fetch it: the module now holds a pending KeyReg."""
    assert r.hello() is not None
    iid = r.rotate()
    outcome = r.data()
    assert outcome is not None
    assert [(i.kind, i.status) for i in outcome.instructions] == [("keygen", 0)]
    assert r.endpoint.state.pending_keyreg is not None
    return iid


# -- parameter sets ------------------------------------------------------------------


def test_keygen_carries_the_set_a_fresh_seed_and_the_kid() -> None:
    sets = {"fleet": ParameterSet("fleet", 7, "p256", 7200, "P-256", hash="SHA-256")}
    r = rig(params=sets)
    assert r.hello() is not None
    first = result_of(
        request_rotation(r.store, ID, sets["fleet"], r.now, secrets.token_bytes, "operator")
    )
    body = cbor.decode(first.body)
    assert (body[1], body[2], body[5], body[7], body[8], body[9]) == (
        "p256",
        "P-256",
        7200,
        2,
        "SHA-256",
        7,
    )
    assert len(body[6]) == 32
    # One at a time: a second request while one is under way queues nothing.
    again = request_rotation(r.store, ID, sets["fleet"], r.now, secrets.token_bytes, "operator")
    assert result_of(again) is None
    # The module's key lives the set's ttl.
    r.data()
    r.data()
    (new,) = [k for k in result_of(r.store.list_keys(ID)) if k.kid == 2]
    assert (new.pid, new.not_after, new.vouched_by) == (7, r.now + 7200, 1)


def test_req_params_gets_the_groups_set() -> None:
    sets = {"fleet": ParameterSet("fleet", 7, "x25519", 7200, "Ed25519", hash="SHA-256")}
    rotation = RotationConfig(default=RotationPolicy(params="fleet"))
    r = rig(params=sets, rotation=rotation)
    assert r.hello() is not None
    outcome = r.data(Payload(req=("params",)))
    assert outcome is not None
    (keygen,) = outcome.instructions
    assert keygen.kind == "keygen" and keygen.status == 0
    pending = r.endpoint.state.pending_keyreg
    assert pending is not None and (pending.suite, pending.pid, pending.kid) == ("x25519", 7, 2)
    assert [e["event"] for e in r.events("key")] == ["requested"]


# -- refused key registrations ---------------------------------------------------------


def _bad_proof(r: Rig, iid: int) -> None:
    pending = r.endpoint.state.pending_keyreg
    assert pending is not None
    pending.proof = bytes([pending.proof[0] ^ 1]) + pending.proof[1:]


def _bad_pop(r: Rig, iid: int) -> None:
    pending = r.endpoint.state.pending_keyreg
    assert pending is not None
    pending.pop = bytes([pending.pop[0] ^ 1]) + pending.pop[1:]


def _redo(r: Rig, iid: int, **changes: Any) -> None:
    """Replace the pending KeyReg by a correctly signed one with ``changes``."""
    pending = r.endpoint.state.pending_keyreg
    assert pending is not None
    r.endpoint.state.pending_keyreg = None
    options = {"kid": pending.kid, "pid": pending.pid, "suite_name": pending.suite}
    r.endpoint.start_key_registration(keygen_iid=iid, **{**options, **changes})


def _wrong_kid(r: Rig, iid: int) -> None:
    _redo(r, iid, kid=3)


def _other_suite(r: Rig, iid: int) -> None:
    _redo(r, iid, suite_name="x25519")


def _off_curve(r: Rig, iid: int) -> None:
    pending = r.endpoint.state.pending_keyreg
    assert pending is not None
    p384 = SUITES["p384"]
    pending.pub = bytes(p384.signing_public(p384.generate_signing_key()))


def _unknown_pid(r: Rig, iid: int) -> None:
    _redo(r, iid, pid=99)


@pytest.mark.parametrize(
    ("tamper", "status", "reason"),
    [
        (_bad_proof, KeyRegStatus.BAD_PROOF, "bad proof"),
        (_bad_pop, KeyRegStatus.BAD_POP, "bad proof of possession"),
        (_wrong_kid, KeyRegStatus.WRONG_KID, "expected kid 2"),
        (_other_suite, KeyRegStatus.NOT_ACCEPTABLE, "suite differs from the Params"),
        (_off_curve, KeyRegStatus.NOT_ACCEPTABLE, "public key not acceptable"),
        (_unknown_pid, KeyRegStatus.NOT_ACCEPTABLE, "unknown pid 99"),
    ],
    ids=["bad-proof", "bad-pop", "wrong-kid", "other-suite", "off-curve", "unknown-pid"],
)
def test_a_refused_keyreg_has_a_reason_in_res_and_an_event(
    tamper: Callable[[Rig, int], None], status: KeyRegStatus, reason: str
) -> None:
    r = rig()
    iid = keygen_received(r)
    tamper(r, iid)
    pending = r.endpoint.state.pending_keyreg
    assert pending is not None
    outcome = r.data()
    assert outcome is not None and outcome.keyreg is not None
    assert (outcome.keyreg.kid, outcome.keyreg.status, outcome.keyreg.reason) == (
        pending.kid,
        status,
        reason,
    )
    rejected = [e for e in r.events("key") if e["event"] == "rejected"]
    assert rejected == [
        {
            "event": "rejected",
            "kid": pending.kid,
            "status": None,
            "suite": pending.suite,
            "pid": pending.pid,
            "code": int(status),
            "reason": reason,
        }
    ]
    assert r.keys() == {1: KeyStatus.ACTIVE}
    # The keygen is confirmed with its (refused) KeyReg; a new request may follow.
    assert result_of(r.store.get_instruction(ID, iid)).state == InstructionState.CONFIRMED
    assert r.rotate() > iid


def test_a_keyreg_whose_curve_is_outside_the_parameter_set() -> None:
    sets = {"p384": ParameterSet("p384", 3, "p384", 7200, "P-384", hash="SHA-384")}
    r = rig(params=sets, suites=("p256", "p384", "x25519"))
    iid = keygen_received_with(r, "p384")
    _redo(r, iid, suite_name="p256")
    outcome = r.data()
    assert outcome is not None and outcome.keyreg is not None
    assert outcome.keyreg.status == KeyRegStatus.NOT_ACCEPTABLE
    assert outcome.keyreg.reason == "suite differs from the Params"
    assert [e["reason"] for e in r.events("key") if e["event"] == "rejected"] == [
        "suite differs from the Params"
    ]


def test_an_rsa_keyreg_of_another_modulus_size_than_the_parameter_set() -> None:
    sets = {"rsa3k": ParameterSet("rsa3k", 5, "rsa", 7200, rsa_bits=3072, hash="SHA-256")}
    r = rig(params=sets, suites=("p256", "x25519", "rsa"))
    assert r.hello() is not None
    iid = r.rotate("rsa3k")
    outcome = r.data()
    assert outcome is not None
    # This module makes RSA-2048 keys only: it refuses the keygen itself ...
    assert [(i.kind, i.status) for i in outcome.instructions] == [("keygen", 1)]
    # ... and one that sends a 2048-bit key anyway is refused by the gateway.
    r.endpoint.start_key_registration(kid=2, pid=5, suite_name="rsa", keygen_iid=iid)
    outcome = r.data()
    assert outcome is not None and outcome.keyreg is not None
    assert outcome.keyreg.status == KeyRegStatus.NOT_ACCEPTABLE
    assert outcome.keyreg.reason == "RSA modulus size differs from the Params (2048)"
    assert [e["code"] for e in r.events("key") if e["event"] == "rejected"] == [4]


def keygen_received_with(r: Rig, params: str) -> int:
    assert r.hello() is not None
    iid = r.rotate(params)
    assert r.data() is not None
    return iid


def test_a_keyreg_resent_under_a_new_counter_is_rejected_once() -> None:
    r = rig()
    iid = keygen_received(r)
    _bad_pop(r, iid)
    first = r.endpoint.build_data()
    again = r.endpoint.resend_under_new_ctr(first)
    outcome = r.send(again)  # the copy under a new ctr arrives first
    assert outcome is not None and outcome.keyreg is not None
    assert outcome.keyreg.status == KeyRegStatus.BAD_POP
    # The first one is answered too (same tok: the same result), not applied again.
    assert result_of(r.controller.handle(first.datagram, ADDR)) is not None
    assert len([e for e in r.events("key") if e["event"] == "rejected"]) == 1


def test_a_rotation_reports_each_key_event_once() -> None:
    r = rig()
    keygen_received(r)
    outcome = r.data()  # the KeyReg (and the keygen's confirmation)
    assert outcome is not None and outcome.keyreg is not None and outcome.keyreg.status == 0
    # A gateway-driven rotation ends with a rehello: the new key is used at once.
    assert [(i.kind, i.status) for i in outcome.instructions] == [("rehello", 0)]
    assert outcome.rehello and r.endpoint.needs_hello()
    assert r.hello() is not None
    assert r.keys() == {1: KeyStatus.RETIRED, 2: KeyStatus.ACTIVE}
    for _ in range(2):
        assert r.data(Payload(data=[{0: "t", 2: 1}])) is not None
    assert [(e["event"], e["kid"]) for e in r.events("key")] == [
        ("requested", 2),
        ("registered", 2),
        ("activated", 2),
        ("retired", 1),
    ]


def test_rehello_after_a_solicited_keyreg_is_policy() -> None:
    r = rig(rotation=RotationConfig(rehello=False))
    keygen_received(r)
    outcome = r.data()
    assert outcome is not None and outcome.keyreg is not None and outcome.keyreg.status == 0
    assert outcome.instructions == () and not r.endpoint.needs_hello()
    assert r.keys() == {1: KeyStatus.ACTIVE, 2: KeyStatus.PENDING}


def test_suite_migration_keyreg_of_another_suite_than_the_session() -> None:
    r = rig()
    assert r.hello() is not None
    r.rotate("x25519")
    r.data()  # the keygen, with x25519 Params
    outcome = r.data()  # an x25519 KeyReg in a p256 session
    assert outcome is not None and outcome.keyreg is not None and outcome.keyreg.status == 0
    assert r.hello() is not None  # an x25519 HELLO, with the x25519 server key
    session = result_of(r.store.get_module_session(ID))
    assert (session.suite, session.kid) == ("x25519", 2)
    series = {k.kid: (k.suite, k.status) for k in result_of(r.store.list_keys(ID))}
    assert series == {1: ("p256", KeyStatus.RETIRED), 2: ("x25519", KeyStatus.ACTIVE)}


# -- expiry and grace -------------------------------------------------------------------------


def test_an_expired_key_opens_no_session() -> None:
    r = rig(not_after=int(NOW) + 100)
    assert r.hello() is not None
    r.clock.now = NOW + 100
    assert r.hello() is None
    assert r.controller.drops.by_reason == {"expired-kid": 1}
    # Also once the expiry job marked it expired.
    result_of(r.store.expire(r.now + 1))
    assert r.keys() == {1: KeyStatus.EXPIRED}
    assert r.hello() is None
    assert r.controller.drops.by_reason == {"expired-kid": 2}


def test_grace_lets_an_expired_key_vouch_for_one_successor() -> None:
    grace = RotationConfig(groups={"default": RotationPolicy(grace=600)})
    r = rig(not_after=int(NOW) + 100, rotation=grace)
    r.clock.now = NOW + 200
    result_of(r.store.expire(r.now))  # the sweep marked it expired
    outcome = r.hello()
    assert outcome is not None
    # The grace session ends with the grace period, and brings a keygen.
    assert outcome.body is not None and outcome.body.exp == 100 + 600 - 200
    assert [(i.kind, i.status) for i in outcome.instructions] == [("keygen", 0)]
    outcome = r.data()
    assert outcome is not None and outcome.keyreg is not None and outcome.keyreg.status == 0
    assert r.hello() is not None
    assert r.keys() == {1: KeyStatus.EXPIRED, 2: KeyStatus.ACTIVE}
    assert r.endpoint.state.session is not None and r.endpoint.state.session.kid == 2
    assert r.controller.drops.total == 0


def test_grace_is_over_after_the_period_or_once_a_successor_exists() -> None:
    grace = RotationConfig(default=RotationPolicy(grace=600))
    r = rig(not_after=int(NOW) + 100, rotation=grace)
    r.clock.now = NOW + 100 + 600
    assert r.hello() is None
    assert r.controller.drops.by_reason == {"expired-kid": 1}

    r = rig(not_after=int(NOW) + 100, rotation=grace)
    keygen_received(r)
    assert r.data() is not None  # the successor, registered (pending)
    r.endpoint.state.keys.pop(2)  # a module that lost it still tries key 1
    r.endpoint.state.session = None
    r.clock.now = NOW + 200
    assert r.hello() is None
    assert r.controller.drops.by_reason == {"expired-kid": 1}


def test_no_grace_by_default() -> None:
    r = rig(not_after=int(NOW) + 100)
    r.clock.now = NOW + 101
    assert r.hello() is None
    assert r.controller.drops.by_reason == {"expired-kid": 1}


# -- approval ------------------------------------------------------------------------------


def test_a_module_pending_approval_is_held_until_approved() -> None:
    r = rig(preregistered=False, status=ModuleStatus.PENDING_APPROVAL)
    r.endpoint.state.psk = PSK
    queued = result_of(
        r.store.enqueue(NewInstruction(ID, "set", cbor.encode(1), 16, source="app"), r.now)
    )
    outcome = r.hello()
    assert outcome is not None and outcome.instructions == () and not outcome.more
    outcome = r.data(Payload(data=[{0: "t", 2: 1}], req=("params",)))
    assert outcome is not None and outcome.instructions == ()
    assert [e.code for e in outcome.errors] == [3]  # no rotation before approval
    assert [e["state"] for e in r.events("instruction")] == ["queued", "waiting"]
    assert r.events("module") == [
        {
            "event": "pending-approval",
            "module": ID,
            "at": r.now,
            "kid": 0,
            "suite": "p256",
            "group": "default",
        }
    ]
    assert len(result_of(r.store.list_reports(ID))) == 1  # stored, not forwarded
    assert result_of(r.store.get_instruction(ID, queued.iid)).state == InstructionState.WAITING

    approved = result_of(r.store.decide_approval(ID, True, r.now + 5))
    assert approved.status == ModuleStatus.ENABLED
    kinds = [(e.kind, e.payload.get("event")) for e in result_of(r.store.events_after("app", 3))]
    assert kinds == [("module", "approved"), ("report", None)]
    # Queued work flows in the same session.
    outcome = r.data()
    assert outcome is not None and [i.iid for i in outcome.instructions] == [queued.iid]
