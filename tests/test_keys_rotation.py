"""
The rotation policy's job and the shared rotation functions
(:mod:`m2mgw.keys.rotation`) on a memory store with an injected clock.
"""

from __future__ import annotations

import secrets

import pytest
import pytest_twisted

from m2mgw.config import RotationConfig, RotationPolicy
from m2mgw.errors import UnknownModule
from m2mgw.keys import rotation
from m2mgw.keys.params import ParameterSet, complete_sets
from m2mgw.keys.rotation import RotationJob, params_for_key, request_rotation, retire_suite
from m2mgw.protocol import cbor
from m2mgw.records import KeyStatus, Module, ModuleKey
from m2mgw.store.memory import MemoryStore
from tests.client_helpers import Clock
from tests.key_lifecycle_helpers import SUITES

NOW = 1_700_000_000
DAY = 86400
SETS = complete_sets(
    {"fleet": ParameterSet("fleet", 9, "x25519", 3600, "Ed25519", hash="SHA-256")},
    {name: SUITES[name] for name in ("p256", "p384", "x25519")},
    365 * DAY,
)


def active(module_id: str, kid: int = 1, suite: str = "p256", age: int = 0) -> ModuleKey:
    return ModuleKey(
        module_id,
        kid,
        suite,
        b"\x04" + bytes(64),
        status=KeyStatus.ACTIVE,
        created_at=NOW - age,
        activated_at=NOW - age,
    )


async def fleet(*modules: tuple[str, str, str, int]) -> MemoryStore:
    """A store with modules ``(id, group, suite, key age)``, each with an active key 1."""
    store = MemoryStore()
    await store.add_modules(
        [Module(module_id, group=group) for module_id, group, _, _ in modules],
        [active(module_id, suite=suite, age=age) for module_id, _, suite, age in modules],
    )
    return store


async def kids_asked(store: MemoryStore) -> dict[str, tuple[str, int]]:
    """``module -> (suite, kid)`` of each queued keygen."""
    found = {}
    for instruction in await store.list_instructions():
        body = cbor.decode(instruction.body)
        found[instruction.module_id] = (body[1], body[7])
    return found


def job(store: MemoryStore, config: RotationConfig, clock: Clock) -> RotationJob:
    return RotationJob(store, config, SETS, clock, secrets.token_bytes)


@pytest_twisted.ensureDeferred
async def test_a_bounded_batch_per_run_and_paging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotation, "PAGE_SIZE", 2)
    store = await fleet(*[(f"m{n}", "default", "p256", 100 * DAY) for n in range(5)])
    config = RotationConfig(default=RotationPolicy(rotate_after=90 * DAY), batch=3)
    runs = job(store, config, Clock(NOW))
    assert (await runs.run()).total == 3
    assert (await runs.run()).total == 2
    assert (await runs.run()).total == 0
    assert await kids_asked(store) == {f"m{n}": ("p256", 2) for n in range(5)}


@pytest_twisted.ensureDeferred
async def test_groups_get_their_own_policy_and_the_rest_the_default() -> None:
    store = await fleet(
        ("a", "north", "p256", 40 * DAY),
        ("b", "south", "p256", 40 * DAY),
        ("c", "default", "p256", 40 * DAY),
    )
    config = RotationConfig(
        default=RotationPolicy(rotate_after=90 * DAY),
        groups={"north": RotationPolicy(rotate_after=30 * DAY, params="fleet")},
    )
    run = await job(store, config, Clock(NOW)).run()
    assert dict(run.queued) == {"age": 1}
    assert await kids_asked(store) == {"a": ("x25519", 2)}


@pytest_twisted.ensureDeferred
async def test_a_key_whose_suite_has_no_set_is_skipped_and_the_rest_rotate() -> None:
    store = await fleet(("a", "default", "rsa", 100 * DAY), ("b", "default", "p256", 100 * DAY))
    config = RotationConfig(default=RotationPolicy(rotate_after=DAY))
    run = await job(store, config, Clock(NOW)).run()
    assert dict(run.queued) == {"age": 1}
    assert dict(run.skipped) == {"no parameter set for suite rsa": 1}


@pytest_twisted.ensureDeferred
async def test_retiring_a_suite_by_policy_and_by_the_shared_function() -> None:
    store = await fleet(("a", "default", "p256", 0), ("b", "default", "p384", 0))
    config = RotationConfig(default=RotationPolicy(renew_before=0), retire_suites={"p256": "fleet"})
    run = await job(store, config, Clock(NOW)).run()
    assert dict(run.queued) == {"suite-retired": 1}
    done = await retire_suite(store, "p384", SETS["fleet"], NOW, secrets.token_bytes, "operator")
    assert dict(done.queued) == {"suite-retired": 1}
    assert await kids_asked(store) == {"a": ("x25519", 2), "b": ("x25519", 2)}
    again = await retire_suite(store, "p384", SETS["fleet"], NOW, secrets.token_bytes, "operator")
    assert again.total == 0


def test_which_set_replaces_a_key() -> None:
    key = active("a")
    policy = RotationPolicy(params="p384")
    assert params_for_key(key, RotationPolicy(), SETS, {}) == SETS["p256"]
    assert params_for_key(key, policy, SETS, {}) == SETS["p384"]
    assert params_for_key(key, policy, SETS, {"p256": "fleet"}) == SETS["fleet"]
    assert params_for_key(active("a", suite="rsa"), RotationPolicy(), SETS, {}) is None


@pytest_twisted.ensureDeferred
async def test_request_rotation_takes_the_next_kid_and_refuses_unknown_modules() -> None:
    store = await fleet(("a", "default", "p256", 0))
    await store.add_key(ModuleKey("a", 4, "p256", b"\x04" + bytes(64), status=KeyStatus.RETIRED))
    queued = await request_rotation(store, "a", SETS["p256"], NOW, secrets.token_bytes, "ops")
    assert queued is not None and queued.source == "ops"
    body = cbor.decode(queued.body)
    assert (body[7], body[9], len(body[6])) == (5, 1, 32)
    with pytest.raises(UnknownModule):
        await request_rotation(store, "ghost", SETS["p256"], NOW, secrets.token_bytes, "ops")
