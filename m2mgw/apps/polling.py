"""
The polling variant: ask the applications for an instruction when a module
wakes up with nothing queued.

With ``[modules] poll_apps_ms = N`` (N > 0), the protocol engine calls
:meth:`InstructionPoll.wait_for_instruction` for every accepted message,
before it builds the reply.  If the module has nothing queued or sent and at
least one of its applications has a subscribed connection on this node, each
of those connections gets an unsequenced ``instruction-wanted`` event and the
engine waits until an instruction is submitted for that module through the
application API (:meth:`instruction_submitted`) or N milliseconds pass,
whichever comes first.  The reply then claims what was queued, as usual.

The cost when enabled: two reads per message (the module's pending
instructions and its applications) and, only for modules that have a
connected application and nothing queued, up to N ms of added latency.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from m2mgw.apps.events import EventHub
from m2mgw.interfaces import IModuleStore
from m2mgw.records import PENDING_INSTRUCTION_STATES, Instruction

__all__ = ["InstructionPoll"]

_PENDING = PENDING_INSTRUCTION_STATES


class InstructionPoll:
    """
    Waits, for a module with nothing queued, for one of its applications to submit.

    :param store: the module store.
    :param hub: the node's event deliveries (who is connected and subscribed).
    :param clock: times the wait.
    :param wait_ms: the longest wait, in milliseconds (> 0).
    """

    log = Logger()

    def __init__(self, store: IModuleStore, hub: EventHub, clock: IReactorTime, wait_ms: int):
        self.store = store
        self.hub = hub
        self.clock = clock
        self.wait_ms = wait_ms
        self._waiters: dict[str, list[Deferred[bool]]] = {}
        #: How many times applications were asked, and how many answered in time.
        self.asked = 0
        self.answered = 0

    async def wait_for_instruction(self, module_id: str) -> bool:
        """
        Ask the module's connected applications for an instruction if it has
        none queued, and wait for one.

        :return: whether an instruction was submitted in time (``False`` also
            when nobody was asked).  It never fails: a store error is logged.
        """
        try:
            pending = await self.store.list_instructions(module_id, _PENDING, 1)
            if pending:
                return False
            apps = await self.store.get_module_apps(module_id)
        except Exception:
            self.log.failure("polling the applications of {module_id} failed", module_id=module_id)
            return False
        deliveries = [delivery for app in apps for delivery in self.hub.deliveries(app)]
        if not deliveries:
            return False
        waiter: Deferred[bool] = Deferred()
        self._waiters.setdefault(module_id, []).append(waiter)
        timeout = self.clock.callLater(self.wait_ms / 1000, self._expire, module_id, waiter)
        message = {
            "event": "instruction-wanted",
            "module": module_id,
            "at": int(self.clock.seconds()),
            "wait_ms": self.wait_ms,
        }
        for delivery in deliveries:
            delivery.notify(message)
        self.asked += 1
        answered = await waiter
        if timeout.active():
            timeout.cancel()
        if answered:
            self.answered += 1
        return answered

    def _expire(self, module_id: str, waiter: Deferred[bool]) -> None:
        """No instruction came in time."""
        waiters = self._waiters.get(module_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[module_id]
            waiter.callback(False)

    def instruction_submitted(self, instruction: Instruction) -> None:
        """An application queued ``instruction``: end the waits for its module."""
        for waiter in self._waiters.pop(instruction.module_id, []):
            waiter.callback(True)

    @property
    def waiting(self) -> int:
        """How many module messages wait for an instruction now."""
        return sum(len(waiters) for waiters in self._waiters.values())
