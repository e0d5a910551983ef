"""
Pushing the durable outbox to connected applications.

Every application event is already in the store's outbox, written in the
same transaction as the change it reports, with the application's sequence
number.  Here each subscribed connection gets an :class:`EventDelivery`,
which reads the outbox after the application's acknowledged position and
writes the events, in order, until the connection's window of unacknowledged
events (``max_unacked``) is full or the connection pushes back (the
transport's buffer is full: :meth:`EventDelivery.pause`).

Deliveries are woken, not polling in a loop: the :class:`EventHub` is the
store's event listener (:meth:`~m2mgw.interfaces.IModuleStore.add_event_listener`)
and wakes the deliveries of the applications that got events; a periodic
:meth:`EventHub.wake_all` catches the events other processes (``m2mgw-admin``,
another node) appended.  A woken delivery asks the store once for what is
new, so many notifications in one reactor turn cost one query.

Subscriptions may filter (by module, group or kind).  A withheld event counts
as delivered: it is acknowledged on the application's behalf once every
event before it is acknowledged, so that filtered events never pile up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from m2mgw.apps.policy import AppPolicies
from m2mgw.interfaces import IModuleStore
from m2mgw.records import Event, SecurityEvent

__all__ = [
    "EVENT_KINDS",
    "EventDelivery",
    "EventFilter",
    "EventHub",
    "enforce_retention",
    "event_message",
]

#: The kinds of durable events.
EVENT_KINDS = ("report", "instruction", "key", "module", "alert")

#: Events read from the store at a time.
DEFAULT_BATCH = 100


def event_message(event: Event) -> dict[str, Any]:
    """The JSON object an event is sent as (see ``docs/app-protocol.md``)."""
    return {
        "event": event.kind,
        "seq": event.seq,
        "module": event.module_id,
        "at": event.created_at,
        "payload": dict(event.payload),
    }


@dataclass(frozen=True)
class EventFilter:
    """
    What a subscription lets through; ``None`` lets everything through.

    Events that are about no module (gateway alerts) pass the module and group filters.
    """

    modules: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    kinds: frozenset[str] | None = None

    @property
    def needs_groups(self) -> bool:
        """Whether :meth:`passes` needs the module's group."""
        return self.groups is not None

    def passes(self, event: Event, group: str | None = None) -> bool:
        """Whether ``event`` (of a module in ``group``) goes out."""
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if event.module_id is None:
            return True
        if self.modules is not None and event.module_id not in self.modules:
            return False
        return self.groups is None or group in self.groups


class EventDelivery:
    """
    One connection's event stream: the outbox of application :attr:`app`
    from its acknowledged position on, through :attr:`filter`.

    :param store: the store holding the outbox.
    :param app: the application principal.
    :param send: writes one message (a JSON-compatible mapping) to the connection.
    :param clock: schedules the reads (a woken delivery reads in the next turn).
    :param event_filter: what to push.
    :param max_unacked: the most pushed events awaiting acknowledgement.
    :param batch: events read from the store at a time.
    """

    log = Logger()

    def __init__(
        self,
        store: IModuleStore,
        app: str,
        send: Callable[[Mapping[str, Any]], None],
        clock: IReactorTime,
        event_filter: EventFilter = EventFilter(),
        max_unacked: int = 1000,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self.store = store
        self.app = app
        self.filter = event_filter
        self._send = send
        self._clock = clock
        self._max_unacked = max_unacked
        self._batch = batch
        #: Seqs pushed and not yet acknowledged, ascending.
        self._pushed: list[int] = []
        #: The highest seq looked at (pushed or withheld).
        self._processed = 0
        #: The highest seq known to be acknowledged in the store.
        self._acked = 0
        self._groups: dict[str, str] = {}
        self._active = False
        self._paused = False
        self._running = False
        self._dirty = False
        self._scheduled: IDelayedCall | None = None
        #: Events pushed so far.
        self.pushed_count = 0

    # -- life -----------------------------------------------------------------------

    def start(self, acked: int) -> None:
        """Deliver from the event after ``acked`` (the application's acknowledged position)."""
        self._acked = self._processed = acked
        self._pushed = []
        self._groups = {}
        self._active = True
        self.wake()

    def stop(self) -> None:
        """Push nothing more."""
        self._active = False
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    @property
    def active(self) -> bool:
        """Whether the delivery was started and not stopped."""
        return self._active

    @property
    def unacked(self) -> int:
        """How many pushed events await acknowledgement."""
        return len(self._pushed)

    def notify(self, message: Mapping[str, Any]) -> bool:
        """
        Send an unsequenced event (``instruction-wanted``) unless the
        delivery is stopped or the connection pushes back.

        :return: whether it was sent.
        """
        if not self._active or self._paused:
            return False
        self._send(message)
        return True

    # -- flow control ---------------------------------------------------------------

    def pause(self) -> None:
        """The connection cannot take more: push nothing until :meth:`resume`."""
        self._paused = True

    def resume(self) -> None:
        """The connection drained: carry on."""
        self._paused = False
        self.wake()

    def wake(self) -> None:
        """New events may be in the outbox: read it soon (once, however often woken)."""
        if not self._active:
            return
        self._dirty = True
        if self._paused or self._running or self._scheduled is not None:
            return
        self._scheduled = self._clock.callLater(0, self._begin)

    def _begin(self) -> None:
        """Start a run of reading and pushing."""
        self._scheduled = None
        if not self._active or self._paused or self._running:
            return
        self._running = True
        running = Deferred.fromCoroutine(self._run())
        running.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        """A store failure: log it; the next wake-up (or poll) tries again."""
        self._running = False
        self.log.failure("delivering events to {app} failed", failure, app=self.app)

    async def _run(self) -> None:
        """Read and push until caught up, paused, stopped or the window is full."""
        try:
            while self._active and not self._paused and self._has_room():
                room = self._max_unacked - len(self._pushed)
                self._dirty = False
                events = await self.store.events_after(
                    self.app, self._processed, min(self._batch, room)
                )
                if not self._active:
                    return
                if not events:
                    if self._dirty:
                        continue
                    break
                if self.filter.needs_groups:
                    await self._learn_groups(event.module_id for event in events)
                for event in events:
                    if event.seq <= self._processed:
                        continue
                    self._processed = event.seq
                    group = self._groups.get(event.module_id) if event.module_id else None
                    if self.filter.passes(event, group):
                        self._pushed.append(event.seq)
                        self.pushed_count += 1
                        self._send(event_message(event))
            await self._release_withheld()
        finally:
            self._running = False
        # With the window full, only an acknowledgement makes room, and
        # :meth:`acknowledge` wakes the delivery: rescheduling now would spin.
        if self._dirty and self._active and not self._paused and self._has_room():
            self.wake()

    def _has_room(self) -> bool:
        """Whether the window of unacknowledged events can take one more."""
        return len(self._pushed) < self._max_unacked

    async def _learn_groups(self, module_ids: Iterable[str | None]) -> None:
        """Look up the groups of the modules not seen yet."""
        for module_id in {m for m in module_ids if m is not None and m not in self._groups}:
            module = await self.store.get_module(module_id)
            self._groups[module_id] = module.group if module is not None else ""

    def _withheld_bound(self) -> int:
        """The highest seq up to which every event is acknowledged or withheld."""
        return self._pushed[0] - 1 if self._pushed else self._processed

    async def _release_withheld(self) -> None:
        """Acknowledge withheld events that no unacknowledged pushed event precedes."""
        bound = self._withheld_bound()
        if bound > self._acked:
            await self.store.ack_events(self.app, bound)
            self._acked = max(self._acked, bound)

    # -- acknowledgements -----------------------------------------------------------

    async def acknowledge(self, seq: int) -> None:
        """
        The application acknowledged every event up to ``seq`` (clamped to
        the last event this delivery sent or withheld, so that no event is
        acknowledged unseen): record it, with the withheld events after it,
        then push more.
        """
        seq = min(seq, self._processed)
        if seq > self._acked:
            await self.store.ack_events(self.app, seq)
            self._acked = max(self._acked, seq)
        self._pushed = [n for n in self._pushed if n > seq]
        if self._active:
            await self._release_withheld()
        self.wake()


class EventHub:
    """
    The deliveries of this node by application, woken when their
    application gets events (:meth:`events_appended`, the store's listener).
    """

    def __init__(self) -> None:
        self._deliveries: dict[str, set[EventDelivery]] = {}

    def add(self, delivery: EventDelivery) -> None:
        """Wake ``delivery`` when its application gets events."""
        self._deliveries.setdefault(delivery.app, set()).add(delivery)

    def remove(self, delivery: EventDelivery) -> None:
        """Forget ``delivery`` (no error if unknown)."""
        deliveries = self._deliveries.get(delivery.app)
        if deliveries is not None:
            deliveries.discard(delivery)
            if not deliveries:
                del self._deliveries[delivery.app]

    def events_appended(self, apps: Iterable[str]) -> None:
        """Events were committed for ``apps``: wake their deliveries."""
        for app in apps:
            for delivery in list(self._deliveries.get(app, ())):
                delivery.wake()

    def wake_all(self) -> None:
        """Wake every delivery (the poll for events of other processes)."""
        for deliveries in list(self._deliveries.values()):
            for delivery in list(deliveries):
                delivery.wake()

    def deliveries(self, app: str) -> list[EventDelivery]:
        """The active deliveries of ``app``."""
        return [d for d in self._deliveries.get(app, ()) if d.active]

    def __len__(self) -> int:
        """How many deliveries there are."""
        return sum(len(deliveries) for deliveries in self._deliveries.values())


_log = Logger()


async def enforce_retention(store: IModuleStore, policies: AppPolicies, now: int) -> list[Event]:
    """
    Drop the unacknowledged events of every application beyond its retention
    limits (:meth:`~m2mgw.interfaces.IModuleStore.trim_events`), never
    silently: the store appends an ``alert`` to the application's stream, and
    each drop is logged and recorded as a security event.

    :return: the alerts appended.
    """
    alerts: list[Event] = []
    for app in await store.outbox_apps():
        policy = policies.for_app(app)
        if not policy.retention_events and not policy.retention_age:
            continue
        alert = await store.trim_events(app, policy.retention_events, policy.retention_age, now)
        if alert is None:
            continue
        alerts.append(alert)
        payload = alert.payload
        _log.warn(
            "dropped {dropped} unacknowledged events ({first}-{last}) of application {app}:"
            " retention limits reached",
            dropped=payload["dropped"],
            first=payload["first_seq"],
            last=payload["last_seq"],
            app=app,
        )
        await store.record_security_events(
            [
                SecurityEvent(
                    at=now,
                    category="audit",
                    reason="app-events-dropped",
                    source="gateway",
                    detail=f"app {app}: events {payload['first_seq']}-{payload['last_seq']}",
                )
            ]
        )
    return alerts
