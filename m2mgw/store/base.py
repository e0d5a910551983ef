"""
:class:`TransactionalStore`: an :class:`~m2mgw.interfaces.IModuleStore` made of
a way to run a transaction and the operations of :mod:`m2mgw.store.operations`.

A store subclasses it and says how it runs a reading and a writing
transaction over its :class:`~m2mgw.store.tables.Tables`; every method of the
interface is defined here, once, for all stores.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred

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


class TransactionalStore(abc.ABC):
    """The :class:`~m2mgw.interfaces.IModuleStore` methods, over two transaction runners."""

    name = ""

    @abc.abstractmethod
    def _read(self, work: Work[T]) -> Deferred[T]:
        """Run ``work``, which only reads, in a transaction; fire with its result."""

    @abc.abstractmethod
    def _write(self, work: Work[T]) -> Deferred[T]:
        """
        Run ``work`` in a transaction that commits (durably) all of its
        changes if it returns, and none if it raises; fire with its result or
        its exception once committed.
        """

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

    def set_module_status(self, module_id: str, status: ModuleStatus) -> Deferred[None]:
        return self._write(lambda tables: operations.set_module_status(tables, module_id, status))

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

    # -- server key references -----------------------------------------------------

    def add_server_key(self, key: ServerKey) -> Deferred[None]:
        return self._write(lambda tables: operations.add_server_key(tables, key))

    def list_server_keys(self) -> Deferred[list[ServerKey]]:
        return self._read(lambda tables: tables.list_server_keys())

    def set_server_key_status(self, skid: int, status: ServerKeyStatus) -> Deferred[None]:
        return self._write(lambda tables: operations.set_server_key_status(tables, skid, status))

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
