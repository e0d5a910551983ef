"""
The row operations a store offers inside one transaction.

:mod:`m2mgw.store.operations` writes every :class:`~m2mgw.interfaces.IModuleStore`
operation once, against :class:`Tables`; a store only provides these
primitives (dictionaries for the memory store, SQL for SQLite) and runs each
operation in a transaction that commits all of its changes or none.
Primitives trust their caller: the rules (what may change, in which order)
live in the operations, not here.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from m2mgw.records import (
    Event,
    Instruction,
    InstructionState,
    Module,
    ModuleKey,
    Report,
    RotationQuery,
    SecurityEvent,
    ServerKey,
    Session,
)

#: An event held while its module waits for approval: ``(kind, app, payload as JSON)``.
HeldEvent = tuple[str, str | None, str]


class Tables(abc.ABC):
    """
    The rows of one store, as seen and changed by one transaction.

    :ivar appended_to: while a unit of work runs, the store may set this to a
        set that collects the applications events are appended to (see
        :meth:`m2mgw.store.base.TransactionalStore.add_event_listener`).
    """

    appended_to: set[str] | None = None

    # -- modules -------------------------------------------------------------------

    @abc.abstractmethod
    def get_module(self, module_id: str) -> Module | None:
        """The module, or ``None``."""

    @abc.abstractmethod
    def insert_modules(self, modules: Sequence[Module]) -> None:
        """
        Insert new modules (their identities do not repeat among themselves).

        :raise m2mgw.errors.DuplicateModule: one exists already.
        """

    @abc.abstractmethod
    def update_module(self, module: Module) -> None:
        """Replace the stored fields of an existing module."""

    @abc.abstractmethod
    def list_modules(self, offset: int, limit: int) -> list[Module]:
        """Modules ordered by identity (code point order, which is UTF-8 byte order)."""

    @abc.abstractmethod
    def count_modules(self) -> int:
        """How many modules exist."""

    @abc.abstractmethod
    def allocate_iid(self, module_id: str) -> int:
        """Advance the module's instruction counter and return its new value (1, 2, ...)."""

    # -- module keys ---------------------------------------------------------------

    @abc.abstractmethod
    def get_key(self, module_id: str, kid: int) -> ModuleKey | None:
        """The key, or ``None``."""

    @abc.abstractmethod
    def list_keys(self, module_id: str) -> list[ModuleKey]:
        """The module's keys, ``kid`` ascending."""

    @abc.abstractmethod
    def insert_keys(self, keys: Sequence[ModuleKey]) -> None:
        """
        Insert keys of existing modules (no ``(module_id, kid)`` repeats among them).

        :raise m2mgw.errors.KeyConflict: one is taken already.
        """

    @abc.abstractmethod
    def update_key(self, key: ModuleKey) -> None:
        """Replace the stored fields of an existing key."""

    @abc.abstractmethod
    def expiring_keys(self, now: int) -> list[ModuleKey]:
        """Active or pending keys whose ``not_after`` is before ``now``."""

    @abc.abstractmethod
    def keys_due_for_rotation(self, query: RotationQuery, limit: int) -> list[ModuleKey]:
        """
        Up to ``limit`` active keys, by module identity ascending, of the
        modules ``query`` selects (see :class:`~m2mgw.records.RotationQuery`).
        """

    # -- server keys ---------------------------------------------------------------

    @abc.abstractmethod
    def get_server_key(self, skid: int) -> ServerKey | None:
        """The server key reference, or ``None``."""

    @abc.abstractmethod
    def insert_server_key(self, key: ServerKey) -> None:
        """Insert a server key reference whose ``skid`` is free."""

    @abc.abstractmethod
    def update_server_key(self, key: ServerKey) -> None:
        """Replace the stored fields of a server key reference."""

    @abc.abstractmethod
    def list_server_keys(self) -> list[ServerKey]:
        """Every server key reference, ``skid`` ascending."""

    # -- sessions ------------------------------------------------------------------

    @abc.abstractmethod
    def get_session(self, sid: bytes) -> Session | None:
        """The stored session (expired or not), or ``None``."""

    @abc.abstractmethod
    def get_module_session(self, module_id: str) -> Session | None:
        """The module's stored session (a module has at most one), or ``None``."""

    @abc.abstractmethod
    def insert_session(self, session: Session) -> None:
        """Insert a session whose ``sid`` is free."""

    @abc.abstractmethod
    def delete_session(self, sid: bytes) -> None:
        """Delete a session if it exists."""

    @abc.abstractmethod
    def delete_sessions(self, module_id: str, kid: int | None = None) -> None:
        """Delete the module's sessions (only those opened with key ``kid``, if given)."""

    @abc.abstractmethod
    def set_session_window(self, sid: bytes, highest: int, bits: int) -> None:
        """Store a session's new replay window."""

    @abc.abstractmethod
    def delete_expired_sessions(self, now: int) -> int:
        """Delete the sessions with ``expires_at <= now``; return how many."""

    # -- aliases -------------------------------------------------------------------

    @abc.abstractmethod
    def get_alias(self, alias: bytes) -> tuple[str, int | None] | None:
        """``(module_id, expires_at)`` of an alias, or ``None``."""

    @abc.abstractmethod
    def replace_alias(self, module_id: str, alias: bytes, expires_at: int | None) -> None:
        """Make ``alias`` the module's only alias (forgetting any other holder of it)."""

    @abc.abstractmethod
    def delete_alias(self, alias: bytes) -> None:
        """Forget an alias if it exists."""

    @abc.abstractmethod
    def delete_expired_aliases(self, now: int) -> int:
        """Forget the aliases with ``expires_at <= now``; return how many."""

    # -- DATA tokens ---------------------------------------------------------------

    @abc.abstractmethod
    def find_token(self, module_id: str, tok: bytes) -> bytes | None:
        """The outcome remembered with a module's ``tok``, or ``None``."""

    @abc.abstractmethod
    def remember_token(self, module_id: str, tok: bytes, outcome: bytes, keep: int) -> None:
        """Remember a new ``tok`` with its outcome, keeping the module's last ``keep``."""

    # -- instructions --------------------------------------------------------------

    @abc.abstractmethod
    def get_instruction(self, module_id: str, iid: int) -> Instruction | None:
        """The instruction, or ``None``."""

    @abc.abstractmethod
    def insert_instruction(self, instruction: Instruction) -> None:
        """Insert a new instruction (its ``iid`` comes from :meth:`allocate_iid`)."""

    @abc.abstractmethod
    def update_instruction(self, instruction: Instruction) -> None:
        """Replace the stored fields of an existing instruction."""

    @abc.abstractmethod
    def find_idempotent(self, module_id: str, source: str, key: str) -> Instruction | None:
        """The module's instruction with this ``source`` and ``idempotency_key``, or ``None``."""

    @abc.abstractmethod
    def count_instructions_by_key(self, source: str, key: str) -> dict[InstructionState, int]:
        """
        How many instructions of every module with this ``source`` and
        ``idempotency_key`` are in each state (states with none left out).
        """

    @abc.abstractmethod
    def pending_instructions(self, module_id: str, after_iid: int, limit: int) -> list[Instruction]:
        """Up to ``limit`` of the module's ``queued``/``sent`` instructions above ``after_iid``."""

    @abc.abstractmethod
    def list_instructions(
        self, module_id: str | None, states: Sequence[InstructionState], limit: int
    ) -> list[Instruction]:
        """
        Instructions in any of ``states`` (all if empty): of one module ``iid``
        ascending, or of every module by ``(created_at, module_id, iid)``.
        """

    @abc.abstractmethod
    def expiring_instructions(self, now: int) -> list[Instruction]:
        """``queued``/``sent`` instructions whose ``not_after`` is before ``now``."""

    # -- applications and the outbox -----------------------------------------------

    @abc.abstractmethod
    def get_module_apps(self, module_id: str) -> list[str]:
        """The module's applications, sorted."""

    @abc.abstractmethod
    def set_module_apps(self, module_id: str, apps: Sequence[str]) -> None:
        """Replace the module's applications (``apps`` sorted, without repeats)."""

    def add_module_apps(self, pairs: Sequence[tuple[str, str]]) -> None:
        """
        Give modules inserted by this transaction their applications:
        ``(module_id, app)`` pairs without repeats.  A store may insert them
        in bulk; this one replaces each module's list.
        """
        by_module: dict[str, list[str]] = {}
        for module_id, app in pairs:
            by_module.setdefault(module_id, []).append(app)
        for module_id, apps in by_module.items():
            self.set_module_apps(module_id, sorted(apps))

    @abc.abstractmethod
    def list_app_modules(self, app: str, offset: int, limit: int) -> list[Module]:
        """The modules ``app`` belongs to, ordered by identity."""

    @abc.abstractmethod
    def outbox_apps(self) -> list[str]:
        """Every application that was ever given an event sequence number, sorted."""

    @abc.abstractmethod
    def last_event_seq_before(self, app: str, created_before: int) -> int:
        """
        The highest ``seq`` among the application's stored events created
        before ``created_before`` (0: none).
        """

    @abc.abstractmethod
    def next_event_seq(self, app: str) -> int:
        """Advance the application's event counter and return its new value (1, 2, ...)."""

    @abc.abstractmethod
    def insert_event(self, event: Event, payload_text: str) -> None:
        """Insert an event; ``payload_text`` is its payload as JSON."""

    @abc.abstractmethod
    def hold_event(
        self, module_id: str, kind: str, app: str | None, payload_text: str, created_at: int
    ) -> None:
        """Keep an event of a module waiting for approval (after those kept before)."""

    @abc.abstractmethod
    def held_events(self, module_id: str) -> list[HeldEvent]:
        """The module's held events, in the order they were kept."""

    @abc.abstractmethod
    def delete_held_events(self, module_id: str) -> None:
        """Forget the module's held events."""

    @abc.abstractmethod
    def events_after(self, app: str, seq: int, limit: int) -> list[Event]:
        """The application's stored events above ``seq``, ascending."""

    @abc.abstractmethod
    def outbox_position(self, app: str) -> tuple[int, int]:
        """``(acked_seq, last_seq)`` of the application (``(0, 0)``: nothing yet)."""

    @abc.abstractmethod
    def acknowledge(self, app: str, seq: int) -> None:
        """Set the application's acknowledged ``seq`` and delete its events up to it."""

    # -- reports and security events -----------------------------------------------

    @abc.abstractmethod
    def insert_report(self, report: Report) -> None:
        """Store a report."""

    @abc.abstractmethod
    def list_reports(self, module_id: str, limit: int) -> list[Report]:
        """The module's reports, newest (by ``received_at``, then insertion) first."""

    @abc.abstractmethod
    def insert_security_events(self, events: Sequence[SecurityEvent]) -> None:
        """Append security events."""

    @abc.abstractmethod
    def list_security_events(self, since: int, limit: int) -> list[SecurityEvent]:
        """Security events with ``at >= since``, oldest (then first inserted) first."""

    # -- retention ---------------------------------------------------------------------

    @abc.abstractmethod
    def delete_reports_before(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` reports received before ``before``, oldest first; how many."""

    @abc.abstractmethod
    def delete_security_events_before(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` security events from before ``before``, oldest first."""

    @abc.abstractmethod
    def delete_finished_instructions_before(self, before: int, limit: int) -> int:
        """
        Delete up to ``limit`` instructions in a final state (confirmed,
        failed, expired, cancelled) last changed before ``before``.  Their
        ``iid``s are never given out again.
        """
