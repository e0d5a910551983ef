"""
:class:`TransactionalStore`: an :class:`~m2mgw.interfaces.IModuleStore` made of
a way to run a transaction and the operations of :mod:`m2mgw.store.operations`.

A store subclasses it and says how it runs a reading and a writing
transaction over its :class:`~m2mgw.store.tables.Tables`; every method of the
interface is defined here, once, for all stores.

After a writing transaction that appended application events commits, the
store tells its event listeners which applications got events
(:meth:`TransactionalStore.add_event_listener`): the application listener
pushes them at once instead of waiting for its next poll.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from m2mgw.records import (
    DataCommit,
    Event,
    ExchangeResult,
    HelloCommit,
    Instruction,
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    NewEvent,
    NewInstruction,
    Report,
    RotationQuery,
    SecurityEvent,
    ServerKey,
    ServerKeyStatus,
    Session,
)
from m2mgw.store import operations
from m2mgw.store.tables import Tables

T = TypeVar("T")

#: A unit of work: runs inside one transaction and returns its result.
Work = Callable[[Tables], T]

#: Told, after a commit, the applications that the transaction appended events to.
EventListener = Callable[[frozenset[str]], object]


class TransactionalStore(abc.ABC):
    """The :class:`~m2mgw.interfaces.IModuleStore` methods, over two transaction runners."""

    name = ""
    log = Logger()
    _event_listeners: tuple[EventListener, ...] = ()

    @abc.abstractmethod
    def _read(self, work: Work[T]) -> Deferred[T]:
        """Run ``work``, which only reads, in a transaction; fire with its result."""

    @abc.abstractmethod
    def _commit(self, work: Work[T]) -> Deferred[T]:
        """
        Run ``work`` in a transaction that commits (durably) all of its
        changes if it returns, and none if it raises; fire with its result or
        its exception once committed.
        """

    def _write(self, work: Work[T]) -> Deferred[T]:
        """
        :meth:`_commit` ``work``; then, if it appended events, tell the event
        listeners which applications got them.
        """
        appended: set[str] = set()

        def run(tables: Tables) -> T:
            tables.appended_to = appended
            try:
                return work(tables)
            finally:
                tables.appended_to = None

        return self._commit(run).addCallback(self._announce, appended)

    def _announce(self, result: T, appended: set[str]) -> T:
        """Call the event listeners with the applications in ``appended`` (if any)."""
        if appended:
            apps = frozenset(appended)
            for listener in self._event_listeners:
                try:
                    listener(apps)
                except Exception:
                    self.log.failure("an event listener failed")
        return result

    # -- event notification ----------------------------------------------------------

    def add_event_listener(self, listener: EventListener) -> None:
        self._event_listeners = (*self._event_listeners, listener)

    def remove_event_listener(self, listener: EventListener) -> None:
        self._event_listeners = tuple(x for x in self._event_listeners if x != listener)

    # -- modules and PSKs ----------------------------------------------------------

    def add_modules(
        self,
        modules: Sequence[Module],
        keys: Sequence[ModuleKey] = (),
        apps: Mapping[str, Sequence[str]] | None = None,
    ) -> Deferred[None]:
        modules, keys = tuple(modules), tuple(keys)
        apps = {module_id: tuple(names) for module_id, names in (apps or {}).items()}
        return self._write(lambda tables: operations.add_modules(tables, modules, keys, apps))

    def get_module(self, module_id: str) -> Deferred[Module | None]:
        return self._read(lambda tables: tables.get_module(module_id))

    def list_modules(self, offset: int = 0, limit: int = 1000) -> Deferred[list[Module]]:
        return self._read(lambda tables: tables.list_modules(offset, limit))

    def count_modules(self) -> Deferred[int]:
        return self._read(lambda tables: tables.count_modules())

    def set_module_status(
        self, module_id: str, status: ModuleStatus, now: int | None = None
    ) -> Deferred[None]:
        def work(tables: Tables) -> None:
            operations.set_module_status(tables, module_id, status, now)

        return self._write(work)

    def decide_approval(self, module_id: str, approve: bool, now: int) -> Deferred[Module]:
        return self._write(
            lambda tables: operations.decide_approval(tables, module_id, approve, now)
        )

    # -- the key series ------------------------------------------------------------

    def add_key(self, key: ModuleKey) -> Deferred[None]:
        return self._write(lambda tables: operations.add_key(tables, key))

    def get_key(self, module_id: str, kid: int) -> Deferred[ModuleKey | None]:
        return self._read(lambda tables: tables.get_key(module_id, kid))

    def list_keys(self, module_id: str) -> Deferred[list[ModuleKey]]:
        return self._read(lambda tables: tables.list_keys(module_id))

    def set_key_status(
        self, module_id: str, kid: int, status: KeyStatus, now: int
    ) -> Deferred[None]:
        def work(tables: Tables) -> None:
            operations.set_key_status(tables, module_id, kid, status, now)

        return self._write(work)

    def keys_due_for_rotation(
        self, query: RotationQuery, limit: int = 1000
    ) -> Deferred[list[ModuleKey]]:
        return self._read(lambda tables: operations.keys_due_for_rotation(tables, query, limit))

    # -- server key references -----------------------------------------------------

    def add_server_key(self, key: ServerKey) -> Deferred[None]:
        return self._write(lambda tables: operations.add_server_key(tables, key))

    def list_server_keys(self) -> Deferred[list[ServerKey]]:
        return self._read(lambda tables: tables.list_server_keys())

    def set_server_key_status(
        self, skid: int, status: ServerKeyStatus, retire_after: int | None = None
    ) -> Deferred[None]:
        def work(tables: Tables) -> None:
            operations.set_server_key_status(tables, skid, status, retire_after)

        return self._write(work)

    # -- sessions, replay state and aliases ----------------------------------------

    def accept_hello(self, commit: HelloCommit) -> Deferred[ExchangeResult | None]:
        return self._write(lambda tables: operations.accept_hello(tables, commit))

    def get_session(self, sid: bytes) -> Deferred[Session | None]:
        return self._read(lambda tables: tables.get_session(sid))

    def get_module_session(self, module_id: str) -> Deferred[Session | None]:
        return self._read(lambda tables: tables.get_module_session(module_id))

    def accept_data(self, commit: DataCommit) -> Deferred[ExchangeResult | None]:
        return self._write(lambda tables: operations.accept_data(tables, commit))

    def end_session(self, sid: bytes) -> Deferred[None]:
        return self._write(lambda tables: tables.delete_session(sid))

    def resolve_alias(self, alias: bytes, now: int, consume: bool) -> Deferred[str | None]:
        run = self._write if consume else self._read
        return run(lambda tables: operations.resolve_alias(tables, alias, now, consume))

    # -- instructions --------------------------------------------------------------

    def enqueue(self, instruction: NewInstruction, now: int) -> Deferred[Instruction]:
        return self._write(lambda tables: operations.enqueue(tables, instruction, now))

    def enqueue_keygen(self, instruction: NewInstruction, now: int) -> Deferred[Instruction | None]:
        return self._write(lambda tables: operations.enqueue_keygen(tables, instruction, now))

    def get_instruction(self, module_id: str, iid: int) -> Deferred[Instruction | None]:
        return self._read(lambda tables: tables.get_instruction(module_id, iid))

    def list_instructions(
        self,
        module_id: str | None = None,
        states: Sequence[InstructionState] = (),
        limit: int = 1000,
    ) -> Deferred[list[Instruction]]:
        states = tuple(states)
        return self._read(lambda tables: tables.list_instructions(module_id, states, limit))

    def count_instructions(self, source: str, idempotency_key: str) -> Deferred[dict[str, int]]:
        def work(tables: Tables) -> dict[str, int]:
            counts = tables.count_instructions_by_key(source, idempotency_key)
            return {state.value: counts.get(state, 0) for state in InstructionState}

        return self._read(work)

    def cancel_instruction(self, module_id: str, iid: int, now: int) -> Deferred[Instruction]:
        return self._write(
            lambda tables: operations.cancel_instruction(tables, module_id, iid, now)
        )

    # -- application events --------------------------------------------------------

    def set_module_apps(self, module_id: str, apps: Sequence[str]) -> Deferred[None]:
        apps = tuple(apps)
        return self._write(lambda tables: operations.set_module_apps(tables, module_id, apps))

    def get_module_apps(self, module_id: str) -> Deferred[list[str]]:
        return self._read(lambda tables: tables.get_module_apps(module_id))

    def append_events(self, events: Sequence[NewEvent], now: int) -> Deferred[list[Event]]:
        events = tuple(events)
        return self._write(lambda tables: operations.append_events(tables, events, now))

    def events_after(self, app: str, seq: int, limit: int = 100) -> Deferred[list[Event]]:
        return self._read(lambda tables: tables.events_after(app, seq, limit))

    def ack_events(self, app: str, seq: int) -> Deferred[None]:
        return self._write(lambda tables: operations.ack_events(tables, app, seq))

    def acked_seq(self, app: str) -> Deferred[int]:
        return self._read(lambda tables: tables.outbox_position(app)[0])

    def outbox_position(self, app: str) -> Deferred[tuple[int, int]]:
        return self._read(lambda tables: tables.outbox_position(app))

    def list_app_modules(
        self, app: str, offset: int = 0, limit: int = 1000
    ) -> Deferred[list[Module]]:
        return self._read(lambda tables: tables.list_app_modules(app, offset, limit))

    def set_group_apps(self, group: str, apps: Sequence[str]) -> Deferred[int]:
        apps = tuple(apps)
        return self._write(lambda tables: operations.set_group_apps(tables, group, apps))

    def outbox_apps(self) -> Deferred[list[str]]:
        return self._read(lambda tables: tables.outbox_apps())

    def trim_events(
        self, app: str, max_events: int, max_age: int, now: int
    ) -> Deferred[Event | None]:
        def work(tables: Tables) -> Event | None:
            return operations.trim_events(tables, app, max_events, max_age, now)

        return self._write(work)

    def list_reports(self, module_id: str, limit: int = 100) -> Deferred[list[Report]]:
        return self._read(lambda tables: tables.list_reports(module_id, limit))

    # -- security events and audit -------------------------------------------------

    def record_security_events(self, events: Sequence[SecurityEvent]) -> Deferred[None]:
        events = tuple(events)
        return self._write(lambda tables: tables.insert_security_events(events))

    def list_security_events(
        self, since: int = 0, limit: int = 1000
    ) -> Deferred[list[SecurityEvent]]:
        return self._read(lambda tables: tables.list_security_events(since, limit))

    # -- housekeeping --------------------------------------------------------------

    def expire(self, now: int) -> Deferred[dict[str, int]]:
        return self._write(lambda tables: operations.expire(tables, now))

    def purge(self, before: Mapping[str, int], limit: int = 10_000) -> Deferred[dict[str, int]]:
        wanted = dict(before)
        return self._commit(lambda tables: operations.purge(tables, wanted, limit))
