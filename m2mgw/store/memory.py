"""
The in-memory store: the whole module database in dictionaries.

It implements every rule of :class:`~m2mgw.interfaces.IModuleStore` exactly as
the persistent stores do (the rules are shared, see
:mod:`m2mgw.store.operations`), keeps nothing across restarts, and fires its
Deferreds synchronously.  Each operation runs in a transaction made of an undo
journal: an operation that raises leaves every dictionary as it found it.
Tests use it, and so can a gateway that needs no durability.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from m2mgw.errors import DuplicateModule, KeyConflict
from m2mgw.interfaces import IModuleStore, IModuleStoreFactory
from m2mgw.records import (
    Event,
    Instruction,
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    Report,
    RotationQuery,
    SecurityEvent,
    ServerKey,
    Session,
)
from m2mgw.store import logic
from m2mgw.store.base import TransactionalStore, Work
from m2mgw.store.tables import HeldEvent, Tables

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

_MISSING: Any = object()


@dataclass
class MemoryData:
    """Every row of a memory store, with the indexes its lookups need."""

    modules: dict[str, Module] = field(default_factory=dict)
    #: Per module: the last ``iid`` assigned (never reused, even once the instruction is gone).
    last_iid: dict[str, int] = field(default_factory=dict)
    keys: dict[str, dict[int, ModuleKey]] = field(default_factory=dict)
    server_keys: dict[int, ServerKey] = field(default_factory=dict)
    sessions: dict[bytes, Session] = field(default_factory=dict)
    module_sessions: dict[str, dict[bytes, None]] = field(default_factory=dict)
    aliases: dict[bytes, tuple[str, int | None]] = field(default_factory=dict)
    module_alias: dict[str, bytes] = field(default_factory=dict)
    tokens: dict[str, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)
    #: Per module, ``iid`` ascending (``iid``s are only ever inserted in increasing order).
    instructions: dict[str, dict[int, Instruction]] = field(default_factory=dict)
    #: Per module, the ``iid``s of its ``queued``/``sent`` instructions, ascending.
    pending: dict[str, dict[int, None]] = field(default_factory=dict)
    idempotency: dict[tuple[str, str, str], int] = field(default_factory=dict)
    apps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Per application: ``seq`` -> (event, payload as JSON).
    outbox: dict[str, dict[int, tuple[Event, str]]] = field(default_factory=dict)
    #: Per application: ``(acked_seq, last_seq)``.
    outbox_position: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Per module waiting for approval: its held events, oldest first.
    held: dict[str, tuple[HeldEvent, ...]] = field(default_factory=dict)
    #: Per module: insertion number -> report.
    reports: dict[str, dict[int, Report]] = field(default_factory=dict)
    security_events: dict[int, SecurityEvent] = field(default_factory=dict)
    #: ``report`` and ``security`` insertion counters.
    serials: dict[str, int] = field(default_factory=dict)


class MemoryTables(Tables):
    """
    :class:`~m2mgw.store.tables.Tables` over a :class:`MemoryData`, journaling
    every change so that :meth:`roll_back` can undo the transaction.
    """

    def __init__(self, data: MemoryData) -> None:
        self._data = data
        self._journal: list[tuple[MutableMapping[Any, Any], Any, Any]] = []

    def roll_back(self) -> None:
        """Undo every change made through these tables, newest first."""
        while self._journal:
            mapping, key, old = self._journal.pop()
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

    def _set(self, mapping: MutableMapping[K, V], key: K, value: V) -> None:
        self._journal.append((mapping, key, mapping.get(key, _MISSING)))
        mapping[key] = value

    def _delete(self, mapping: MutableMapping[K, V], key: K) -> None:
        if key in mapping:
            self._journal.append((mapping, key, mapping[key]))
            del mapping[key]

    def _inner(self, mapping: dict[K, dict[Any, V]], key: K) -> dict[Any, V]:
        inner = mapping.get(key)
        if inner is None:
            inner = {}
            self._set(mapping, key, inner)
        return inner

    def _next_serial(self, name: str) -> int:
        serial = self._data.serials.get(name, 0) + 1
        self._set(self._data.serials, name, serial)
        return serial

    # -- modules -------------------------------------------------------------------

    def get_module(self, module_id: str) -> Module | None:
        return self._data.modules.get(module_id)

    def insert_modules(self, modules: Sequence[Module]) -> None:
        for module in modules:
            if module.module_id in self._data.modules:
                raise DuplicateModule(module.module_id)
            self._set(self._data.modules, module.module_id, module)

    def update_module(self, module: Module) -> None:
        self._set(self._data.modules, module.module_id, module)

    def list_modules(self, offset: int, limit: int) -> list[Module]:
        ids = sorted(self._data.modules)[offset : offset + limit]
        return [self._data.modules[module_id] for module_id in ids]

    def count_modules(self) -> int:
        return len(self._data.modules)

    def allocate_iid(self, module_id: str) -> int:
        iid = self._data.last_iid.get(module_id, 0) + 1
        self._set(self._data.last_iid, module_id, iid)
        return iid

    # -- module keys ---------------------------------------------------------------

    def get_key(self, module_id: str, kid: int) -> ModuleKey | None:
        return self._data.keys.get(module_id, {}).get(kid)

    def list_keys(self, module_id: str) -> list[ModuleKey]:
        series = self._data.keys.get(module_id, {})
        return [series[kid] for kid in sorted(series)]

    def insert_keys(self, keys: Sequence[ModuleKey]) -> None:
        for key in keys:
            series = self._inner(self._data.keys, key.module_id)
            if key.kid in series:
                raise KeyConflict(f"{key.module_id} kid {key.kid}")
            self._set(series, key.kid, key)

    def update_key(self, key: ModuleKey) -> None:
        self._set(self._inner(self._data.keys, key.module_id), key.kid, key)

    def expiring_keys(self, now: int) -> list[ModuleKey]:
        return [
            key
            for module_id in sorted(self._data.keys)
            for key in self.list_keys(module_id)
            if logic.key_expired(key, now)
        ]

    def keys_due_for_rotation(self, query: RotationQuery, limit: int) -> list[ModuleKey]:
        found: list[ModuleKey] = []
        for module_id in sorted(self._data.keys):
            if module_id <= query.after_module:
                continue
            module = self._data.modules[module_id]
            if module.status is not ModuleStatus.ENABLED or not logic.rotation_group_matches(
                module.group, query
            ):
                continue
            series = self.list_keys(module_id)
            if any(key.status is KeyStatus.PENDING for key in series):
                continue
            active = [key for key in series if key.status is KeyStatus.ACTIVE]
            if not active or not logic.rotation_due(active[-1], query):
                continue
            instructions = self._data.instructions.get(module_id, {})
            if any(
                instructions[iid].kind == logic.KEYGEN_KIND
                for iid in self._data.pending.get(module_id, ())
            ):
                continue
            found.append(active[-1])
            if len(found) == limit:
                break
        return found

    # -- server keys ---------------------------------------------------------------

    def get_server_key(self, skid: int) -> ServerKey | None:
        return self._data.server_keys.get(skid)

    def insert_server_key(self, key: ServerKey) -> None:
        self._set(self._data.server_keys, key.skid, key)

    def update_server_key(self, key: ServerKey) -> None:
        self._set(self._data.server_keys, key.skid, key)

    def list_server_keys(self) -> list[ServerKey]:
        return [self._data.server_keys[skid] for skid in sorted(self._data.server_keys)]

    # -- sessions ------------------------------------------------------------------

    def get_session(self, sid: bytes) -> Session | None:
        return self._data.sessions.get(sid)

    def get_module_session(self, module_id: str) -> Session | None:
        for sid in self._data.module_sessions.get(module_id, ()):
            return self._data.sessions[sid]
        return None

    def insert_session(self, session: Session) -> None:
        self._set(self._data.sessions, session.sid, session)
        self._set(self._inner(self._data.module_sessions, session.module_id), session.sid, None)

    def delete_session(self, sid: bytes) -> None:
        session = self._data.sessions.get(sid)
        if session is not None:
            self._delete(self._data.sessions, sid)
            self._delete(self._inner(self._data.module_sessions, session.module_id), sid)

    def delete_sessions(self, module_id: str, kid: int | None = None) -> None:
        for sid in list(self._data.module_sessions.get(module_id, ())):
            if kid is None or self._data.sessions[sid].kid == kid:
                self.delete_session(sid)

    def set_session_window(self, sid: bytes, highest: int, bits: int) -> None:
        # Built from the field values: dataclasses.replace costs more than the rest of a DATA.
        fields = list(vars(self._data.sessions[sid]).values())
        fields[-2:] = highest, bits
        updated = Session(*fields)
        self._set(self._data.sessions, sid, updated)

    def delete_expired_sessions(self, now: int) -> int:
        expired = [s.sid for s in self._data.sessions.values() if s.expires_at <= now]
        for sid in expired:
            self.delete_session(sid)
        return len(expired)

    # -- aliases -------------------------------------------------------------------

    def get_alias(self, alias: bytes) -> tuple[str, int | None] | None:
        return self._data.aliases.get(alias)

    def replace_alias(self, module_id: str, alias: bytes, expires_at: int | None) -> None:
        previous = self._data.module_alias.get(module_id)
        if previous is not None:
            self.delete_alias(previous)
        self.delete_alias(alias)
        self._set(self._data.aliases, alias, (module_id, expires_at))
        self._set(self._data.module_alias, module_id, alias)

    def delete_alias(self, alias: bytes) -> None:
        found = self._data.aliases.get(alias)
        if found is not None:
            self._delete(self._data.aliases, alias)
            self._delete(self._data.module_alias, found[0])

    def delete_expired_aliases(self, now: int) -> int:
        expired = [
            alias
            for alias, (_, expires_at) in self._data.aliases.items()
            if expires_at is not None and expires_at <= now
        ]
        for alias in expired:
            self.delete_alias(alias)
        return len(expired)

    # -- DATA tokens ---------------------------------------------------------------

    def find_token(self, module_id: str, tok: bytes) -> bytes | None:
        for remembered, outcome in self._data.tokens.get(module_id, ()):
            if remembered == tok:
                return outcome
        return None

    def remember_token(self, module_id: str, tok: bytes, outcome: bytes, keep: int) -> None:
        tokens = (*self._data.tokens.get(module_id, ()), (tok, outcome))
        self._set(self._data.tokens, module_id, tokens[-keep:])

    # -- instructions --------------------------------------------------------------

    def get_instruction(self, module_id: str, iid: int) -> Instruction | None:
        return self._data.instructions.get(module_id, {}).get(iid)

    def insert_instruction(self, instruction: Instruction) -> None:
        self.update_instruction(instruction)
        if instruction.idempotency_key is not None:
            key = (instruction.module_id, instruction.source, instruction.idempotency_key)
            self._set(self._data.idempotency, key, instruction.iid)

    def update_instruction(self, instruction: Instruction) -> None:
        module_id, iid = instruction.module_id, instruction.iid
        self._set(self._inner(self._data.instructions, module_id), iid, instruction)
        pending = self._inner(self._data.pending, module_id)
        if instruction.state.final:
            self._delete(pending, iid)
        elif iid not in pending:
            self._set(pending, iid, None)

    def find_idempotent(self, module_id: str, source: str, key: str) -> Instruction | None:
        iid = self._data.idempotency.get((module_id, source, key))
        return None if iid is None else self.get_instruction(module_id, iid)

    def count_instructions_by_key(self, source: str, key: str) -> dict[InstructionState, int]:
        counts: dict[InstructionState, int] = {}
        for (module_id, held_source, held_key), iid in self._data.idempotency.items():
            instruction = self._data.instructions.get(module_id, {}).get(iid)
            if held_source == source and held_key == key and instruction is not None:
                counts[instruction.state] = counts.get(instruction.state, 0) + 1
        return counts

    def pending_instructions(self, module_id: str, after_iid: int, limit: int) -> list[Instruction]:
        found: list[Instruction] = []
        instructions = self._data.instructions.get(module_id, {})
        for iid in self._data.pending.get(module_id, ()):
            if iid > after_iid:
                found.append(instructions[iid])
                if len(found) == limit:
                    break
        return found

    def list_instructions(
        self, module_id: str | None, states: Sequence[InstructionState], limit: int
    ) -> list[Instruction]:
        wanted = set(states)
        modules = [module_id] if module_id is not None else list(self._data.instructions)
        found = [
            instruction
            for mid in modules
            for instruction in self._data.instructions.get(mid, {}).values()
            if not wanted or instruction.state in wanted
        ]
        if module_id is None:
            found.sort(key=lambda i: (i.created_at, i.module_id, i.iid))
        return found[:limit]

    def expiring_instructions(self, now: int) -> list[Instruction]:
        return [
            self._data.instructions[module_id][iid]
            for module_id in sorted(self._data.pending)
            for iid in self._data.pending[module_id]
            if logic.instruction_expired(self._data.instructions[module_id][iid], now)
        ]

    # -- applications and the outbox -----------------------------------------------

    def get_module_apps(self, module_id: str) -> list[str]:
        return list(self._data.apps.get(module_id, ()))

    def set_module_apps(self, module_id: str, apps: Sequence[str]) -> None:
        self._set(self._data.apps, module_id, tuple(apps))

    def list_app_modules(self, app: str, offset: int, limit: int) -> list[Module]:
        ids = sorted(module_id for module_id, apps in self._data.apps.items() if app in apps)
        return [self._data.modules[module_id] for module_id in ids[offset : offset + limit]]

    def outbox_apps(self) -> list[str]:
        return sorted(self._data.outbox_position)

    def last_event_seq_before(self, app: str, created_before: int) -> int:
        stored = self._data.outbox.get(app, {})
        before = (n for n, (event, _) in stored.items() if event.created_at < created_before)
        return max(before, default=0)

    def next_event_seq(self, app: str) -> int:
        acked, last = self._data.outbox_position.get(app, (0, 0))
        self._set(self._data.outbox_position, app, (acked, last + 1))
        return last + 1

    def insert_event(self, event: Event, payload_text: str) -> None:
        self._set(self._inner(self._data.outbox, event.app), event.seq, (event, payload_text))

    def hold_event(
        self, module_id: str, kind: str, app: str | None, payload_text: str, created_at: int
    ) -> None:
        held = (*self._data.held.get(module_id, ()), (kind, app, payload_text))
        self._set(self._data.held, module_id, held)

    def held_events(self, module_id: str) -> list[HeldEvent]:
        return list(self._data.held.get(module_id, ()))

    def delete_held_events(self, module_id: str) -> None:
        self._delete(self._data.held, module_id)

    def events_after(self, app: str, seq: int, limit: int) -> list[Event]:
        stored = self._data.outbox.get(app, {})
        acked, last = self._data.outbox_position.get(app, (0, 0))
        first = max(seq, acked) + 1
        return [
            replace(stored[n][0], payload=logic.decode_payload(stored[n][1]))
            for n in range(first, min(last, first + limit - 1) + 1)
        ]

    def outbox_position(self, app: str) -> tuple[int, int]:
        return self._data.outbox_position.get(app, (0, 0))

    def acknowledge(self, app: str, seq: int) -> None:
        acked, last = self._data.outbox_position.get(app, (0, 0))
        stored = self._inner(self._data.outbox, app)
        for n in range(acked + 1, seq + 1):
            self._delete(stored, n)
        self._set(self._data.outbox_position, app, (seq, last))

    # -- reports and security events -----------------------------------------------

    def insert_report(self, report: Report) -> None:
        serial = self._next_serial("report")
        self._set(self._inner(self._data.reports, report.module_id), serial, report)

    def list_reports(self, module_id: str, limit: int) -> list[Report]:
        stored = self._data.reports.get(module_id, {})
        order = sorted(stored, key=lambda n: (stored[n].received_at, n), reverse=True)
        return [stored[n] for n in order[:limit]]

    def insert_security_events(self, events: Sequence[SecurityEvent]) -> None:
        for event in events:
            self._set(self._data.security_events, self._next_serial("security"), event)

    def list_security_events(self, since: int, limit: int) -> list[SecurityEvent]:
        stored = self._data.security_events
        order = sorted(
            (n for n in stored if stored[n].at >= since), key=lambda n: (stored[n].at, n)
        )
        return [stored[n] for n in order[:limit]]

    # -- retention ---------------------------------------------------------------------

    def delete_reports_before(self, before: int, limit: int) -> int:
        old = sorted(
            (serial, module_id)
            for module_id, reports in self._data.reports.items()
            for serial, report in reports.items()
            if report.received_at < before
        )[:limit]
        for serial, module_id in old:
            self._delete(self._data.reports[module_id], serial)
        return len(old)

    def delete_security_events_before(self, before: int, limit: int) -> int:
        stored = self._data.security_events
        old = sorted(n for n in stored if stored[n].at < before)[:limit]
        for serial in old:
            self._delete(stored, serial)
        return len(old)

    def delete_finished_instructions_before(self, before: int, limit: int) -> int:
        old = sorted(
            (instruction.updated_at, module_id, iid)
            for module_id, instructions in self._data.instructions.items()
            for iid, instruction in instructions.items()
            if instruction.state.final and instruction.updated_at < before
        )[:limit]
        for _, module_id, iid in old:
            instruction = self._data.instructions[module_id][iid]
            if instruction.idempotency_key is not None:
                self._delete(
                    self._data.idempotency,
                    (module_id, instruction.source, instruction.idempotency_key),
                )
            self._delete(self._data.instructions[module_id], iid)
        return len(old)


@implementer(IModuleStore)
class MemoryStore(TransactionalStore):
    """
    An :class:`~m2mgw.interfaces.IModuleStore` in dictionaries.  Usable at
    once (``open`` and ``close`` do nothing); every Deferred has already
    fired when it is returned.
    """

    name = "memory"

    def __init__(self) -> None:
        self.data = MemoryData()

    def _run(self, work: Callable[[MemoryTables], T]) -> Deferred[T]:
        tables = MemoryTables(self.data)
        try:
            result = work(tables)
        except Exception:
            tables.roll_back()
            return defer.fail()
        return defer.succeed(result)

    def _read(self, work: Work[T]) -> Deferred[T]:
        return self._run(work)

    def _commit(self, work: Work[T]) -> Deferred[T]:
        return self._run(work)

    def open(self) -> Deferred[None]:
        """Nothing to connect to."""
        return defer.succeed(None)

    def close(self) -> Deferred[None]:
        """Nothing to flush; the data stays readable."""
        return defer.succeed(None)

    def schema_version(self) -> Deferred[int]:
        """0: the memory store has no schema."""
        return defer.succeed(0)


@implementer(IPlugin, IModuleStoreFactory)
class MemoryStoreFactory:
    """The ``memory`` store plugin: no options, nothing on disk."""

    name = "memory"
    options: Mapping[str, str] = {}
    external_service = None

    def create(self, options: Mapping[str, str], data_dir: str, reactor: Any) -> MemoryStore:
        """A new, empty :class:`MemoryStore` (``data_dir`` and ``reactor`` are not used)."""
        return MemoryStore()
