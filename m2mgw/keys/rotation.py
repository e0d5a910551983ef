"""
Key rotation: on request (operator, application) and by policy (the periodic job).

Every path queues the same thing the same way: :func:`request_rotation`
picks the ``kid`` the new key must take (the module's highest + 1), draws a
fresh seed, and queues a ``keygen`` instruction through
:meth:`~m2mgw.interfaces.IModuleStore.enqueue_keygen`, which refuses in the
same transaction if a rotation is already under way (a ``keygen`` queued or
sent, or a key registered and not yet active), so that two requests never
queue two.  The store appends the ``key`` event ``requested``; the module's
answer (a KeyReg) is checked against the instruction by the protocol engine.

:class:`RotationJob` is the policy: each run asks the store for the modules
whose active key is older than ``rotate_after``, within ``renew_before`` of
its ``not_after``, or of a suite being retired, group by group, and queues at
most ``batch`` keygens; the next run continues (modules with a rotation under
way are no longer selected).  Time and randomness are injected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from m2mgw.config import RotationConfig, RotationPolicy
from m2mgw.interfaces import IModuleStore, RandomSource
from m2mgw.keys.params import ParameterSet, default_set, keygen_instruction
from m2mgw.records import Instruction, ModuleKey, RotationQuery

__all__ = [
    "PAGE_SIZE",
    "RotationJob",
    "RotationRun",
    "params_for_key",
    "request_rotation",
    "retire_suite",
]

log = Logger(namespace="m2mgw.keys.rotation")

#: Keys read from the store per query.
PAGE_SIZE = 500


def request_rotation(
    store: IModuleStore,
    module_id: str,
    params: ParameterSet,
    now: int,
    random: RandomSource,
    source: str,
) -> Deferred[Instruction | None]:
    """
    Ask a module to rotate its key: queue a ``keygen`` with ``params``, a
    fresh seed and the ``kid`` the new key must take.

    The one entry point of the operator (``m2mgw-admin module rotate``), the
    applications and the rotation job.

    :param source: who asks: ``operator``, an application's principal, or
        ``gateway`` (the policy); the instruction's events go to it.
    :return: a Deferred firing with the queued instruction, or ``None`` if
        a rotation is already under way for the module (nothing queued).
    :raise m2mgw.errors.UnknownModule: (in the Deferred)
    """
    return ensureDeferred(_request_rotation(store, module_id, params, now, random, source))


async def _request_rotation(
    store: IModuleStore,
    module_id: str,
    params: ParameterSet,
    now: int,
    random: RandomSource,
    source: str,
) -> Instruction | None:
    keys = await store.list_keys(module_id)
    kid = max((key.kid for key in keys), default=0) + 1
    instruction = keygen_instruction(module_id, params, kid, random, source)
    queued: Instruction | None = await store.enqueue_keygen(instruction, now)
    return queued


def params_for_key(
    key: ModuleKey,
    policy: RotationPolicy,
    sets: Mapping[str, ParameterSet],
    retire_suites: Mapping[str, str],
) -> ParameterSet | None:
    """
    The parameter set that replaces ``key``: the retirement target of its
    suite, else the policy's set, else the default set of its suite.
    """
    target = retire_suites.get(key.suite)
    if target is not None and target in sets:
        return sets[target]
    if policy.params and policy.params in sets:
        return sets[policy.params]
    return default_set(sets, key.suite)


@dataclass
class RotationRun:
    """
    What one run of the rotation job did.

    :ivar queued: keygens queued, by reason (``age``, ``expiry``, ``suite-retired``).
    :ivar skipped: modules due but not rotated, by reason.
    """

    queued: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Keygens queued."""
        return sum(self.queued.values())


class RotationJob:
    """
    The rotation policy as a periodic job (``jobs/rotation``).

    :param store: the module store.
    :param config: the ``[rotation]`` configuration.
    :param sets: the parameter sets by name.
    :param clock: returns the current time in seconds (the reactor's ``seconds``).
    :param random: the randomness source (seeds).
    """

    def __init__(
        self,
        store: IModuleStore,
        config: RotationConfig,
        sets: Mapping[str, ParameterSet],
        clock: Callable[[], float],
        random: RandomSource,
    ) -> None:
        self._store = store
        self._config = config
        self._sets = sets
        self._clock = clock
        self._random = random

    def queries(self, now: int) -> list[tuple[RotationPolicy, RotationQuery]]:
        """One query per policy: each group with its own, then every other group."""
        config = self._config
        suites = tuple(sorted(config.retire_suites))

        def query(policy: RotationPolicy) -> RotationQuery:
            return RotationQuery(
                activated_before=now - policy.rotate_after if policy.rotate_after else None,
                expiring_before=now + policy.renew_before if policy.renew_before else None,
                suites=suites,
            )

        found = [
            (policy, replace(query(policy), groups=(group,)))
            for group, policy in config.groups.items()
        ]
        others = replace(query(config.default), exclude_groups=tuple(config.groups))
        found.append((config.default, others))
        return found

    def _reason(self, key: ModuleKey, policy: RotationPolicy, now: int) -> str:
        if key.suite in self._config.retire_suites:
            return "suite-retired"
        renew = policy.renew_before
        if renew and key.not_after is not None and key.not_after <= now + renew:
            return "expiry"
        return "age"

    async def run(self) -> RotationRun:
        """One run: queue the keygens that are due, at most ``batch``."""
        now = int(self._clock())
        outcome = RotationRun()
        budget = self._config.batch
        for policy, query in self.queries(now):
            after = ""
            while budget > 0:
                limit = min(budget, PAGE_SIZE)
                page = await self._store.keys_due_for_rotation(
                    replace(query, after_module=after), limit
                )
                for key in page:
                    params = params_for_key(key, policy, self._sets, self._config.retire_suites)
                    if params is None:
                        outcome.skipped[f"no parameter set for suite {key.suite}"] += 1
                        continue
                    queued = await request_rotation(
                        self._store, key.module_id, params, now, self._random, "gateway"
                    )
                    if queued is None:
                        outcome.skipped["rotation under way"] += 1
                    else:
                        outcome.queued[self._reason(key, policy, now)] += 1
                        budget -= 1
                if len(page) < limit:
                    break
                after = page[-1].module_id
        if outcome.queued or outcome.skipped:
            log.info(
                "key rotation: queued {queued}, skipped {skipped}",
                queued=dict(outcome.queued),
                skipped=dict(outcome.skipped),
            )
        return outcome


def retire_suite(
    store: IModuleStore,
    suite: str,
    params: ParameterSet,
    now: int,
    random: RandomSource,
    source: str,
) -> Deferred[RotationRun]:
    """
    Move every enabled module whose active key is of ``suite`` to a key made
    from ``params`` (of another suite): one ``keygen`` each, skipping those
    with a rotation under way.  For ``m2mgw-admin suite retire``; the policy
    does the same continuously with ``[rotation] retire_suites``.

    :return: a Deferred firing with what was queued and skipped.
    """
    return ensureDeferred(_retire_suite(store, suite, params, now, random, source))


async def _retire_suite(
    store: IModuleStore,
    suite: str,
    params: ParameterSet,
    now: int,
    random: RandomSource,
    source: str,
) -> RotationRun:
    outcome = RotationRun()
    after = ""
    while True:
        page = await store.keys_due_for_rotation(
            RotationQuery(suites=(suite,), after_module=after), PAGE_SIZE
        )
        for key in page:
            queued = await request_rotation(store, key.module_id, params, now, random, source)
            if queued is None:
                outcome.skipped["rotation under way"] += 1
            else:
                outcome.queued["suite-retired"] += 1
        if len(page) < PAGE_SIZE:
            return outcome
        after = page[-1].module_id
