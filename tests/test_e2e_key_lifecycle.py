"""
The key lifecycle end to end: real modules (the project's module client
over UDP on 127.0.0.1) against the MGP/1 engine and a store, on a clock the
test sets.  Every enrolment path; rotation by age, by an application's
request, for a module that sleeps through it, and to retire a suite, each
ending with the new key active and the old one retired while every report is
stored once; revocation; an expired key.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted

from m2mgw.config import RotationConfig, RotationPolicy
from m2mgw.keys.rotation import RotationJob, request_rotation
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import AuthMethod
from m2mgw.records import (
    VOUCHED_BY_PSK,
    InstructionState,
    KeyStatus,
    Module,
    ModuleStatus,
    NewInstruction,
)
from tests.client_helpers import PSK
from tests.key_lifecycle_helpers import (
    SILENT,
    LiveGateway,
    LiveModule,
    events,
    key_series,
    send_raw,
    start_gateway,
)

DAY = 86400


@pytest_twisted.async_yield_fixture
async def gateway() -> AsyncIterator[LiveGateway]:
    gw = await start_gateway()
    try:
        yield gw
    finally:
        await gw.stop()


async def enrolled(
    gw: LiveGateway,
    module_id: str,
    apps: tuple[str, ...] = ("app",),
    group: str = "default",
    not_after: int | None = None,
) -> LiveModule:
    """A module whose key 1 the gateway knows from manufacture, with a live session."""
    module = gw.preregistered(module_id, not_after=not_after)
    await gw.store.add_modules(
        [Module(module_id, group=group)],
        [gw.preregistered_keys[module_id]],
        {module_id: list(apps)},
    )
    assert (await module.report(0)).ok
    return module


async def reports(gw: LiveGateway, module_id: str) -> list[Any]:
    """The module's stored readings, oldest first."""
    stored = await gw.store.list_reports(module_id, 10_000)
    return sorted(cbor.decode(r.data)[0][2] for r in stored)


async def wake_until_rotated(
    gw: LiveGateway, module: LiveModule, first: int, wakes: int = 4
) -> int:
    """Report on each wake (10 s apart) until the module's new key is active; the last value."""
    value = first
    for _ in range(wakes):
        gw.clock.now += 10
        result = await module.report(value)
        assert result.ok, result.failure
        value += 1
        if module.active_kid() > 1:
            return value
    raise AssertionError(f"not rotated after {wakes} wakes: {module.state.keys}")


# -- enrolment paths ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_psk_enrolment_then_the_psk_gets_no_reply(gateway: LiveGateway) -> None:
    gw = gateway
    await gw.store.add_modules(
        [Module("psk-1", psk=PSK), Module("psk-2", psk=PSK, psk_reusable=True)]
    )
    for module_id in ("psk-1", "psk-2"):
        module = gw.module(module_id, keep_psk=True)  # a module that does not forget it
        result = await module.enroll()
        assert result.ok, result.failure
        (key,) = await gw.store.list_keys(module_id)
        assert (key.kid, key.status, key.vouched_by) == (1, KeyStatus.ACTIVE, VOUCHED_BY_PSK)
        assert module.state.session is not None and module.state.session.kid == 1
        # A PSK HELLO once a key is active: silence (single use), unless kept per module.
        replies = await send_raw(gw.port, module.endpoint.build_hello(kid=0))
        assert len(replies) == (1 if module_id == "psk-2" else 0)
    assert gw.controller.drops.by_reason == {"psk-refused": 1}


@pytest_twisted.ensureDeferred
async def test_a_preregistered_key_authenticates_with_sig_from_the_first_message(
    gateway: LiveGateway,
) -> None:
    gw = gateway
    module = gw.preregistered("sim-card-1")
    await gw.store.add_modules([Module("sim-card-1")], [gw.preregistered_keys["sim-card-1"]])
    assert module.state.psk is None
    first = module.endpoint.build_hello(include_confs=False)
    assert first.context.method == AuthMethod.SIG and first.context.kid == 1  # type: ignore[union-attr]
    result = await module.report(21.5)
    assert result.ok and result.exchanges[0].hellos == 1
    session = await gw.store.get_module_session("sim-card-1")
    assert session is not None and session.kid == 1
    assert await reports(gw, "sim-card-1") == [21.5]
    assert gw.controller.drops.total == 0


@pytest_twisted.ensureDeferred
async def test_approval_holds_data_and_work_until_approved(gateway: LiveGateway) -> None:
    gw = gateway
    await gw.store.add_modules(
        [Module("new-1", ModuleStatus.PENDING_APPROVAL, psk=PSK)], apps={"new-1": ["app"]}
    )
    queued = await gw.store.enqueue(
        NewInstruction("new-1", "set", cbor.encode({"rate": 60}), 32, source="app"), gw.now
    )
    module = gw.module("new-1")
    assert (await module.enroll()).ok  # it authenticates and may enrol its key
    result = await module.report(1.0)
    assert result.ok and result.instructions == []
    assert [(e["event"], e["kid"]) for e in await events(gw.store, "app", "module")] == [
        ("pending-approval", 0)
    ]
    assert await events(gw.store, "app", "report") == []  # stored, not forwarded
    assert await reports(gw, "new-1") == [1.0]
    # Heard from but not approved: the instruction waits for a later reply.
    assert (await gw.store.get_instruction("new-1", queued.iid)).state is InstructionState.WAITING

    await gw.store.decide_approval("new-1", True, gw.now)
    assert [e["event"] for e in await events(gw.store, "app", "module")] == [
        "pending-approval",
        "approved",
    ]
    assert [e["data"] for e in await events(gw.store, "app", "report")] == [[{"n": "t", "v": 1.0}]]
    result = await module.report(2.0, confirm_now=True)
    assert result.ok and [(i.iid, i.status) for i in result.instructions] == [(queued.iid, 0)]
    confirmed = await gw.store.get_instruction("new-1", queued.iid)
    assert confirmed.state is InstructionState.CONFIRMED


@pytest_twisted.ensureDeferred
async def test_refusal_disables_the_module(gateway: LiveGateway) -> None:
    gw = gateway
    await gw.store.add_modules(
        [Module("new-2", ModuleStatus.PENDING_APPROVAL, psk=PSK)], apps={"new-2": ["app"]}
    )
    module = gw.module("new-2")
    assert (await module.report(1.0)).ok
    refused = await gw.store.decide_approval("new-2", False, gw.now)
    assert refused.status is ModuleStatus.DISABLED
    assert [e["event"] for e in await events(gw.store, "app", "module")] == [
        "pending-approval",
        "disabled",
    ]
    assert await events(gw.store, "app", "report") == []  # held, then forgotten
    silent = gw.attach(module.state, policy=SILENT)
    assert not (await silent.report(2.0)).ok  # its session ended
    assert await send_raw(gw.port, module.endpoint.build_hello()) == []
    assert gw.controller.drops.by_reason == {"replay": 1, "disabled-module": 1}


# -- rotation --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rotation_by_age_on_an_injected_clock(gateway: LiveGateway) -> None:
    gw = gateway
    module = await enrolled(gw, "aging-1")
    policy = RotationConfig(default=RotationPolicy(rotate_after=30 * DAY, renew_before=0))
    job = RotationJob(gw.store, policy, gw.params, gw.clock, secrets.token_bytes)
    assert (await job.run()).total == 0
    gw.clock.now += 30 * DAY - 1
    assert (await job.run()).total == 0
    gw.clock.now += 1
    run = await job.run()
    assert dict(run.queued) == {"age": 1}
    assert (await job.run()).total == 0  # one keygen per module
    last = await wake_until_rotated(gw, module, 1)
    assert await key_series(gw.store, "aging-1") == {
        1: ("p256", KeyStatus.RETIRED),
        2: ("p256", KeyStatus.ACTIVE),
    }
    assert await reports(gw, "aging-1") == list(range(last))
    # The new key is young: nothing to do until it ages in turn.
    assert (await job.run()).total == 0
    assert gw.controller.drops.total == 0


@pytest_twisted.ensureDeferred
async def test_rotation_before_expiry_per_group(gateway: LiveGateway) -> None:
    gw = gateway
    expiry = gw.now + 6 * DAY
    north = await enrolled(gw, "north-1", group="north", not_after=expiry)
    await enrolled(gw, "south-1", group="south", not_after=expiry)
    policy = RotationConfig(
        default=RotationPolicy(renew_before=3 * DAY),
        groups={"north": RotationPolicy(renew_before=7 * DAY)},
    )
    job = RotationJob(gw.store, policy, gw.params, gw.clock, secrets.token_bytes)
    run = await job.run()
    assert dict(run.queued) == {"expiry": 1}  # north only: south renews 3 days ahead
    await wake_until_rotated(gw, north, 1)
    (old, new) = await gw.store.list_keys("north-1")
    assert (old.status, new.status) == (KeyStatus.RETIRED, KeyStatus.ACTIVE)
    assert new.not_after == new.created_at + gw.params["p256"].ttl
    gw.clock.now = expiry - 3 * DAY
    assert dict((await job.run()).queued) == {"expiry": 1}  # now south
    assert [i.kind for i in await gw.store.list_instructions("south-1")] == ["keygen"]


@pytest_twisted.ensureDeferred
async def test_rotation_requested_by_an_application(gateway: LiveGateway) -> None:
    gw = gateway
    module = await enrolled(gw, "app-1", apps=("billing",))
    queued = await request_rotation(
        gw.store, "app-1", gw.params["x25519"], gw.now, secrets.token_bytes, "billing"
    )
    assert queued is not None
    last = await wake_until_rotated(gw, module, 1)
    assert await key_series(gw.store, "app-1") == {
        1: ("p256", KeyStatus.RETIRED),
        2: ("x25519", KeyStatus.ACTIVE),
    }
    assert await reports(gw, "app-1") == list(range(last))
    # The application follows its keygen like any instruction, and the key events.
    states = [e["state"] for e in await events(gw.store, "billing", "instruction")]
    assert states[:3] == ["queued", "sent", "confirmed"]
    assert [e["event"] for e in await events(gw.store, "billing", "key")] == [
        "requested",
        "registered",
        "activated",
        "retired",
    ]


@pytest_twisted.ensureDeferred
async def test_a_module_that_sleeps_through_a_rotation_completes_it_on_waking(
    gateway: LiveGateway,
) -> None:
    gw = gateway
    module = await enrolled(gw, "sleepy-1")
    await request_rotation(
        gw.store, "sleepy-1", gw.params["p256"], gw.now, secrets.token_bytes, "app"
    )
    gw.clock.now += 3 * DAY  # its session expired meanwhile
    result = await module.report(1, confirm_now=True)
    assert result.ok
    assert [i.kind for i in result.instructions] == ["keygen", "rehello"]
    assert module.active_kid() == 2
    assert await key_series(gw.store, "sleepy-1") == {
        1: ("p256", KeyStatus.RETIRED),
        2: ("p256", KeyStatus.ACTIVE),
    }
    assert await reports(gw, "sleepy-1") == [0, 1]


@pytest_twisted.ensureDeferred
async def test_retiring_a_suite_moves_the_fleet_to_another(gateway: LiveGateway) -> None:
    gw = gateway
    modules = [await enrolled(gw, f"fleet-{n}") for n in range(3)]
    policy = RotationConfig(
        default=RotationPolicy(renew_before=0), retire_suites={"p256": "x25519"}
    )
    job = RotationJob(gw.store, policy, gw.params, gw.clock, secrets.token_bytes)
    assert dict((await job.run()).queued) == {"suite-retired": 3}
    for module in modules:
        await wake_until_rotated(gw, module, 1)
        assert module.state.session is not None and module.state.session.suite == "x25519"
    for n in range(3):
        assert await key_series(gw.store, f"fleet-{n}") == {
            1: ("p256", KeyStatus.RETIRED),
            2: ("x25519", KeyStatus.ACTIVE),
        }
    assert (await job.run()).total == 0
    assert gw.controller.drops.total == 0


# -- the series -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoking_a_key_ends_its_session_at_once(gateway: LiveGateway) -> None:
    gw = gateway
    module = await enrolled(gw, "lost-1")
    await gw.store.set_key_status("lost-1", 1, KeyStatus.REVOKED, gw.now)
    assert await send_raw(gw.port, module.endpoint.build_data()) == []
    # Nor can it open a new session.
    assert await send_raw(gw.port, module.endpoint.build_hello()) == []
    assert gw.controller.drops.by_reason == {"replay": 1, "retired-kid": 1}
    assert [e["event"] for e in await events(gw.store, "app", "key")] == ["revoked"]


@pytest_twisted.ensureDeferred
async def test_an_expired_key_opens_no_session(gateway: LiveGateway) -> None:
    gw = gateway
    module = await enrolled(gw, "old-1", not_after=gw.now + DAY)
    gw.clock.now += 2 * DAY  # the session has expired too
    silent = gw.attach(module.state, policy=SILENT)
    assert not (await silent.report(1)).ok
    assert gw.controller.drops.by_reason == {"expired-kid": 1}
