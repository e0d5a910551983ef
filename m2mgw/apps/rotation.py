"""
Key rotation asked for by an application (the ``rotate`` op).

:class:`RotationOnRequest` resolves the parameter set the application named
(by name or ``pid``), or the one the rotation policy would choose for the
module's active key, and queues the ``keygen`` through
:func:`m2mgw.keys.rotation.request_rotation`, the one entry point the
operator and the rotation job use too.  The instruction's ``source`` is the
application's principal, so its ``instruction`` events go to that
application; the ``key`` events go to every application of the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from m2mgw.config import RotationConfig
from m2mgw.errors import InvalidTransition, M2MGWError, UnknownModule
from m2mgw.interfaces import IModuleStore, RandomSource
from m2mgw.keys.params import ParameterSet, find_set
from m2mgw.keys.rotation import params_for_key, request_rotation
from m2mgw.records import Instruction, KeyStatus, ModuleStatus

__all__ = ["RotationOnRequest", "RotationRefused"]


class RotationRefused(M2MGWError):
    """The rotation cannot be asked for so: an unknown parameter set, no key to rotate from."""


class RotationOnRequest:
    """
    Queues a key rotation for a module, on an application's request.

    :param store: the module store.
    :param sets: the parameter sets by name (``[params.NAME]``).
    :param policy: the rotation policy (its set per group and retiring suites).
    :param now: the current time in seconds.
    :param random: draws the ``keygen`` seed.
    """

    def __init__(
        self,
        store: IModuleStore,
        sets: Mapping[str, ParameterSet],
        policy: RotationConfig,
        now: Callable[[], float],
        random: RandomSource,
    ) -> None:
        self.store = store
        self.sets = sets
        self.policy = policy
        self.now = now
        self.random = random

    async def __call__(
        self, module_id: str, params: int | str | None, requested_by: str
    ) -> Instruction | None:
        """
        Queue the ``keygen``.

        :param params: a parameter set's name or ``pid``; ``None``: the set the
            policy gives the module's active key.
        :param requested_by: the application principal (the instruction's ``source``).
        :return: the queued instruction, or ``None`` if a rotation is under way.
        :raise m2mgw.errors.UnknownModule:
        :raise m2mgw.errors.InvalidTransition: the module is not enabled.
        :raise RotationRefused: no such parameter set, or no key to rotate from.
        """
        module = await self.store.get_module(module_id)
        if module is None:
            raise UnknownModule(module_id)
        if module.status is not ModuleStatus.ENABLED:
            raise InvalidTransition(f"module {module_id!r} is {module.status.value}")
        if params is not None:
            try:
                chosen = find_set(self.sets, str(params))
            except KeyError as e:
                raise RotationRefused(str(e.args[0])) from None
        else:
            active = [
                k for k in await self.store.list_keys(module_id) if k.status is KeyStatus.ACTIVE
            ]
            found = None
            if active:
                found = params_for_key(
                    active[-1],
                    self.policy.for_group(module.group),
                    self.sets,
                    self.policy.retire_suites,
                )
            if found is None:
                raise RotationRefused(
                    f"module {module_id!r} has no active key to rotate from: name a parameter set"
                )
            chosen = found
        return await request_rotation(
            self.store, module_id, chosen, int(self.now()), self.random, requested_by
        )
