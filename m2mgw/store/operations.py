"""
Every :class:`~m2mgw.interfaces.IModuleStore` operation, written once.

Each function runs inside one transaction of a store, on that store's
:class:`~m2mgw.store.tables.Tables`; the store commits everything it changed
or, if it raises, nothing.  The decisions come from :mod:`m2mgw.store.logic`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from m2mgw.errors import (
    DuplicateModule,
    InvalidTransition,
    KeyConflict,
    StoreError,
    UnknownInstruction,
    UnknownKey,
    UnknownModule,
)
from m2mgw.protocol.replay import WindowState, accept_counter
from m2mgw.records import (
    DataCommit,
    Delivery,
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
    PayloadEffects,
    RotationQuery,
    ServerKey,
    ServerKeyStatus,
)
from m2mgw.store import logic
from m2mgw.store.tables import Tables

#: How many pending instructions a delivery reads at a time.
PENDING_PAGE = 32
#: The most ``queued`` instructions one exchange marks ``waiting`` (the rest
#: are marked by the module's next exchanges).
WAITING_MARK_LIMIT = 256


class _EventWriter:
    """Appends events to the outbox, looking up each module's applications once."""

    def __init__(self, tables: Tables, now: int) -> None:
        self._tables = tables
        self._now = now
        self._apps: dict[str, list[str]] = {}

    def append(self, event: NewEvent) -> list[Event]:
        """Append one event to each of its recipients; return the stored events."""
        module_apps: list[str] = []
        if event.app is None and event.module_id is not None:
            if event.module_id not in self._apps:
                self._apps[event.module_id] = self._tables.get_module_apps(event.module_id)
            module_apps = self._apps[event.module_id]
        text = logic.encode_payload(event.payload)
        stored = []
        for app in logic.event_recipients(event, module_apps):
            record = Event(
                app=app,
                seq=self._tables.next_event_seq(app),
                kind=event.kind,
                module_id=event.module_id,
                payload=logic.decode_payload(text),
                created_at=self._now,
            )
            self._tables.insert_event(record, text)
            stored.append(record)
            if self._tables.appended_to is not None:
                self._tables.appended_to.add(app)
        return stored


class _Exchange:
    """
    What one accepted HELLO or DATA changed, gathered for its :class:`ExchangeResult`.

    :param holding: the module waits for approval: its payload's ``report``
        and ``alert`` events are held and it claims no instructions.
    """

    def __init__(self, tables: Tables, module_id: str, now: int, holding: bool = False) -> None:
        self.tables = tables
        self.module_id = module_id
        self.now = now
        self.holding = holding
        self.events = _EventWriter(tables, now)
        self.transitions: list[Instruction] = []
        self.created: list[Instruction] = []
        self.ignored_confirmations = 0
        self.key_recorded = True

    def change_instruction(self, instruction: Instruction) -> None:
        """Store an instruction's new state and report it."""
        self.tables.update_instruction(instruction)
        self.transitions.append(instruction)
        self.events.append(logic.instruction_event(instruction))

    def change_key(self, key: ModuleKey) -> None:
        """Store a key's new status and report it."""
        self.tables.update_key(key)
        self.events.append(logic.key_event(key))

    def apply(self, effects: PayloadEffects) -> None:
        """Apply a Payload's effects (MGP/1 §8.1) in the order the spec needs."""
        tables = self.tables
        if effects.report is not None:
            report = effects.report
            if report.module_ts is not None and not logic.fits_int64(report.module_ts):
                report = replace(report, module_ts=None)
            tables.insert_report(report)
        for event in effects.events:
            if self.holding and event.kind in logic.HELD_EVENT_KINDS:
                text = logic.encode_payload(event.payload)
                tables.hold_event(self.module_id, event.kind, event.app, text, self.now)
            else:
                self.events.append(event)
        for confirmation in effects.confirmations:
            instruction = (
                tables.get_instruction(self.module_id, confirmation.iid)
                if logic.fits_int64(confirmation.iid)
                else None
            )
            if instruction is None or instruction.state is not InstructionState.SENT:
                self.ignored_confirmations += 1
            else:
                self.change_instruction(logic.confirmed(instruction, confirmation, self.now))
        if effects.new_key is not None:
            key = effects.new_key
            if tables.get_key(key.module_id, key.kid) is None:
                tables.insert_keys([key])
                self.events.append(logic.key_event(key))
            else:
                self.key_recorded = False
        for new in effects.new_instructions:
            self.created.append(enqueue(tables, new, self.now, self.events))

    def mark_waiting(self, riding: set[int]) -> None:
        """
        The module was heard from, but not every instruction rides in the
        reply: its ``queued`` ones that do not ride become ``waiting`` (each
        reported once; those already ``waiting`` stay so, unreported).
        """
        for instruction in self.tables.list_instructions(
            self.module_id, [InstructionState.QUEUED], WAITING_MARK_LIMIT
        ):
            if instruction.iid not in riding:
                self.change_instruction(
                    logic.with_state(instruction, InstructionState.WAITING, self.now)
                )

    def result(
        self, delivery: Delivery | None, duplicate_outcome: bytes | None = None
    ) -> ExchangeResult:
        """Claim instructions per ``delivery`` and describe the exchange."""
        claimed: list[Instruction] = []
        more = False
        if delivery is not None and not self.holding:
            preferred = [i for i in self.created if i.state in logic.PENDING_STATES]
            plan = logic.plan_delivery(
                _pending(self.tables, self.module_id), preferred, delivery, self.now
            )
            for instruction in plan.expired + plan.failed:
                self.change_instruction(instruction)
            for instruction in plan.taken:
                if instruction.iid in plan.first_ride:
                    self.change_instruction(instruction)
                else:
                    self.tables.update_instruction(instruction)
            claimed, more = plan.taken, plan.more
        if delivery is not None and (self.holding or more):
            self.mark_waiting({instruction.iid for instruction in claimed})
        return ExchangeResult(
            instructions=tuple(claimed),
            more=more,
            duplicate_outcome=duplicate_outcome,
            created=tuple(self.created),
            key_recorded=self.key_recorded,
            ignored_confirmations=self.ignored_confirmations,
            transitions=tuple(self.transitions),
        )


def _pending(tables: Tables, module_id: str) -> Iterator[Instruction]:
    """The module's ``queued`` and ``sent`` instructions, ``iid`` ascending, read by pages."""
    after = 0
    while True:
        page = tables.pending_instructions(module_id, after, PENDING_PAGE)
        yield from page
        if len(page) < PENDING_PAGE:
            return
        after = page[-1].iid


def _module(tables: Tables, module_id: str) -> Module:
    module = tables.get_module(module_id)
    if module is None:
        raise UnknownModule(module_id)
    return module


# -- modules and keys --------------------------------------------------------------


def add_modules(
    tables: Tables,
    modules: Sequence[Module],
    keys: Sequence[ModuleKey],
    apps: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Provision modules, their initial keys and their applications, all or none."""
    added: set[str] = set()
    for module in modules:
        if module.module_id in added:
            raise DuplicateModule(module.module_id)
        added.add(module.module_id)
    seen: set[tuple[str, int]] = set()
    for key in keys:
        if (key.module_id, key.kid) in seen:
            raise KeyConflict(f"{key.module_id} kid {key.kid}")
        seen.add((key.module_id, key.kid))
        if key.module_id not in added:
            _module(tables, key.module_id)
    for module_id in apps or {}:
        if module_id not in added:
            _module(tables, module_id)
    tables.insert_modules(modules)
    tables.insert_keys(keys)
    tables.add_module_apps(
        [
            (module_id, name)
            for module_id, names in (apps or {}).items()
            if module_id in added
            for name in sorted(set(names))
        ]
    )
    for module_id, names in (apps or {}).items():
        if module_id not in added:
            tables.set_module_apps(module_id, sorted(set(names)))


def set_module_status(
    tables: Tables, module_id: str, status: ModuleStatus, now: int | None = None
) -> None:
    """
    Change a module's status; disabling it ends its session.  With ``now``, a
    change is reported as a ``module`` event named after the new status.
    """
    module = _module(tables, module_id)
    tables.update_module(replace(module, status=status))
    if status is ModuleStatus.DISABLED:
        tables.delete_sessions(module_id)
    if now is not None and module.status is not status:
        _EventWriter(tables, now).append(logic.module_event(module_id, status.value, now))


def decide_approval(tables: Tables, module_id: str, approve: bool, now: int) -> Module:
    """
    Approve (enable, release the held events) or refuse (disable, forget them)
    a module waiting for approval.
    """
    module = _module(tables, module_id)
    if module.status is not ModuleStatus.PENDING_APPROVAL:
        raise InvalidTransition(f"module {module_id} is {module.status.value}, not waiting")
    writer = _EventWriter(tables, now)
    if approve:
        module = replace(module, status=ModuleStatus.ENABLED)
        tables.update_module(module)
        writer.append(logic.module_event(module_id, "approved", now))
        for kind, app, text in tables.held_events(module_id):
            writer.append(NewEvent(kind, module_id, logic.decode_payload(text), app))
    else:
        module = replace(module, status=ModuleStatus.DISABLED)
        tables.update_module(module)
        tables.delete_sessions(module_id)
        writer.append(logic.module_event(module_id, "disabled", now))
    tables.delete_held_events(module_id)
    return module


def add_key(tables: Tables, key: ModuleKey) -> None:
    """Record a module key and report it."""
    _module(tables, key.module_id)
    tables.insert_keys([key])
    _EventWriter(tables, key.created_at).append(logic.key_event(key))


def set_key_status(
    tables: Tables, module_id: str, kid: int, status: KeyStatus, now: int
) -> ModuleKey:
    """Move a key to ``status`` (reported if it changed); revoking ends its sessions."""
    key = tables.get_key(module_id, kid)
    if key is None:
        raise UnknownKey(f"{module_id} kid {kid}")
    if key.status is not status:
        key = logic.key_with_status(key, status, now)
        tables.update_key(key)
        _EventWriter(tables, now).append(logic.key_event(key))
    if status is KeyStatus.REVOKED:
        tables.delete_sessions(module_id, kid)
    return key


def add_server_key(tables: Tables, key: ServerKey) -> None:
    """Record a server key reference."""
    if tables.get_server_key(key.skid) is not None:
        raise KeyConflict(f"skid {key.skid}")
    tables.insert_server_key(key)


def set_server_key_status(
    tables: Tables, skid: int, status: ServerKeyStatus, retire_after: int | None = None
) -> None:
    """Change a server key reference's status (and its deadline, if given)."""
    key = tables.get_server_key(skid)
    if key is None:
        raise UnknownKey(f"skid {skid}")
    key = replace(key, status=status)
    if retire_after is not None:
        key = replace(key, retire_after=retire_after)
    tables.update_server_key(key)


# -- the per-datagram path ---------------------------------------------------------


def accept_hello(tables: Tables, commit: HelloCommit) -> ExchangeResult | None:
    """Accept an authenticated HELLO (see :meth:`IModuleStore.accept_hello`)."""
    session = commit.session
    module_id = session.module_id
    module = _module(tables, module_id)
    if (
        module.status is ModuleStatus.DISABLED
        or not logic.fits_int64(commit.ts)
        or commit.ts <= module.last_hello_ts
    ):
        return None
    key = None
    if session.kid != 0:
        key = tables.get_key(module_id, session.kid)
        usable = logic.GRACE_KEY_STATES if commit.expired_key_grace else logic.USABLE_KEY_STATES
        if key is None or key.status not in usable:
            return None
    holder = tables.get_session(session.sid)
    if holder is not None and holder.module_id != module_id:
        if holder.expires_at > commit.now:
            raise StoreError("the session id is in use by another module")
        tables.delete_session(session.sid)
    tables.update_module(replace(module, last_hello_ts=commit.ts))
    tables.delete_sessions(module_id)
    tables.insert_session(session)
    holding = module.status is ModuleStatus.PENDING_APPROVAL
    exchange = _Exchange(tables, module_id, commit.now, holding)
    if holding and module.last_hello_ts == 0:
        event = logic.module_event(
            module_id,
            "pending-approval",
            commit.now,
            kid=session.kid,
            suite=session.suite,
            group=module.group,
        )
        exchange.events.append(event)
    elif module.last_hello_ts == 0:
        first = logic.module_event(
            module_id,
            "first-seen",
            commit.now,
            kid=session.kid,
            suite=session.suite,
            group=module.group,
        )
        exchange.events.append(first)
    if key is not None and key.status is KeyStatus.PENDING:
        exchange.change_key(logic.key_with_status(key, KeyStatus.ACTIVE, commit.now))
        for older in logic.keys_retired_by(tables.list_keys(module_id), key.kid, commit.now):
            exchange.change_key(older)
    if commit.alias is not None:
        tables.replace_alias(module_id, commit.alias, commit.alias_expires_at)
    exchange.apply(commit.effects)
    return exchange.result(commit.delivery)


def accept_data(tables: Tables, commit: DataCommit) -> ExchangeResult | None:
    """Accept an authenticated DATA (see :meth:`IModuleStore.accept_data`)."""
    session = tables.get_session(commit.sid)
    if session is None or session.expires_at <= commit.now or not logic.fits_int64(commit.ctr):
        return None
    window = accept_counter(
        WindowState(session.highest_ctr, session.window), commit.ctr, commit.window_size
    )
    if window is None:
        return None
    tables.set_session_window(commit.sid, window.highest, window.bits)
    module = tables.get_module(session.module_id)
    holding = module is not None and module.status is ModuleStatus.PENDING_APPROVAL
    exchange = _Exchange(tables, session.module_id, commit.now, holding)
    # An empty tok (the engine's mark of a malformed DataBody, whose ctr only
    # counts) is never remembered: it would push real ones out of the memory.
    duplicate = tables.find_token(session.module_id, commit.tok) if commit.tok else None
    if duplicate is None:
        exchange.apply(commit.effects)
        if commit.tok:
            tables.remember_token(session.module_id, commit.tok, commit.outcome, logic.TOKEN_MEMORY)
    return exchange.result(commit.delivery, duplicate_outcome=duplicate)


def resolve_alias(tables: Tables, alias: bytes, now: int, consume: bool) -> str | None:
    """The module an unexpired alias stands for; forget it if ``consume``."""
    found = tables.get_alias(alias)
    if found is None:
        return None
    module_id, expires_at = found
    if expires_at is not None and expires_at <= now:
        return None
    if consume:
        tables.delete_alias(alias)
    return module_id


# -- instructions ------------------------------------------------------------------


def enqueue(
    tables: Tables, new: NewInstruction, now: int, events: _EventWriter | None = None
) -> Instruction:
    """
    Queue an instruction under the module's next ``iid`` (or return its
    idempotent twin), reported as an ``instruction`` event ``queued``; a
    ``keygen`` is also reported as a ``key`` event ``requested``.
    """
    _module(tables, new.module_id)
    if new.idempotency_key is not None:
        earlier = tables.find_idempotent(new.module_id, new.source, new.idempotency_key)
        if earlier is not None:
            return earlier
    instruction = logic.queued_instruction(new, tables.allocate_iid(new.module_id), now)
    tables.insert_instruction(instruction)
    writer = events or _EventWriter(tables, now)
    writer.append(logic.instruction_event(instruction))
    requested = logic.keygen_requested_event(instruction)
    if requested is not None:
        writer.append(requested)
    return instruction


def rotation_under_way(tables: Tables, module_id: str) -> bool:
    """True if the module has a ``pending`` key or a ``queued``/``sent`` ``keygen``."""
    if any(key.status is KeyStatus.PENDING for key in tables.list_keys(module_id)):
        return True
    return any(i.kind == logic.KEYGEN_KIND for i in _pending(tables, module_id))


def enqueue_keygen(tables: Tables, new: NewInstruction, now: int) -> Instruction | None:
    """Queue a ``keygen`` unless a rotation is under way for the module (then ``None``)."""
    _module(tables, new.module_id)
    if rotation_under_way(tables, new.module_id):
        return None
    return enqueue(tables, new, now)


def keys_due_for_rotation(tables: Tables, query: RotationQuery, limit: int) -> list[ModuleKey]:
    """The active keys of the modules due for a rotation (see :class:`RotationQuery`)."""
    if limit < 1:
        return []
    return tables.keys_due_for_rotation(query, limit)


def cancel_instruction(tables: Tables, module_id: str, iid: int, now: int) -> Instruction:
    """Cancel a ``queued`` or ``sent`` instruction and report it."""
    instruction = tables.get_instruction(module_id, iid) if logic.fits_int64(iid) else None
    if instruction is None:
        raise UnknownInstruction(f"{module_id} iid {iid}")
    if instruction.state.final:
        raise InvalidTransition(f"{module_id} iid {iid} is {instruction.state.value}")
    cancelled = logic.with_state(instruction, InstructionState.CANCELLED, now)
    tables.update_instruction(cancelled)
    _EventWriter(tables, now).append(logic.instruction_event(cancelled))
    return cancelled


# -- the outbox --------------------------------------------------------------------


def set_module_apps(tables: Tables, module_id: str, apps: Sequence[str]) -> None:
    """Set the applications a module belongs to."""
    _module(tables, module_id)
    tables.set_module_apps(module_id, sorted(set(apps)))


def append_events(tables: Tables, events: Sequence[NewEvent], now: int) -> list[Event]:
    """Append events to their applications' outboxes."""
    writer = _EventWriter(tables, now)
    return [stored for event in events for stored in writer.append(event)]


def set_group_apps(tables: Tables, group: str, apps: Sequence[str]) -> int:
    """Set the applications of every module of ``group``; return how many modules."""
    names = sorted(set(apps))
    count = offset = 0
    while True:
        page = tables.list_modules(offset, PENDING_PAGE * 32)
        for module in page:
            if module.group == group:
                tables.set_module_apps(module.module_id, names)
                count += 1
        if len(page) < PENDING_PAGE * 32:
            return count
        offset += len(page)


def trim_events(tables: Tables, app: str, max_events: int, max_age: int, now: int) -> Event | None:
    """
    Drop the application's oldest unacknowledged events beyond its retention
    limits (more than ``max_events`` of them, counting the alert; older than
    ``max_age`` seconds; 0: no limit) and append an ``alert`` saying so.
    """
    acked, last = tables.outbox_position(app)
    cut = acked
    if max_events > 0 and last - acked > max_events:
        cut = last - max_events + 1  # room for the alert
    if max_age > 0:
        cut = max(cut, tables.last_event_seq_before(app, now - max_age))
    if cut <= acked:
        return None
    tables.acknowledge(app, cut)
    alert = logic.events_dropped_event(app, acked + 1, cut, max_events, max_age)
    return _EventWriter(tables, now).append(alert)[0]


def ack_events(tables: Tables, app: str, seq: int) -> None:
    """Acknowledge an application's events up to ``seq`` (never beyond its last event)."""
    acked, last = tables.outbox_position(app)
    seq = min(seq, last)
    if seq > acked:
        tables.acknowledge(app, seq)


# -- housekeeping ------------------------------------------------------------------


def purge(tables: Tables, before: Mapping[str, int], limit: int) -> dict[str, int]:
    """
    Delete, per kind named in ``before`` (``"reports"``, ``"security_events"``,
    ``"instructions"``), up to ``limit`` records older than its time.
    """
    deleters = {
        "reports": tables.delete_reports_before,
        "security_events": tables.delete_security_events_before,
        "instructions": tables.delete_finished_instructions_before,
    }
    unknown = set(before) - set(deleters)
    if unknown:
        raise ValueError(f"cannot purge {sorted(unknown)}")
    return {kind: deleters[kind](when, limit) for kind, when in before.items()}


def expire(tables: Tables, now: int) -> dict[str, int]:
    """Remove what expired by ``now`` and mark expired instructions and keys (with events)."""
    writer = _EventWriter(tables, now)
    instructions = tables.expiring_instructions(now)
    for instruction in instructions:
        expired = logic.with_state(instruction, InstructionState.EXPIRED, now)
        tables.update_instruction(expired)
        writer.append(logic.instruction_event(expired))
    keys = tables.expiring_keys(now)
    for key in keys:
        expired_key = logic.key_with_status(key, KeyStatus.EXPIRED, now)
        tables.update_key(expired_key)
        writer.append(logic.key_event(expired_key))
    return {
        "sessions": tables.delete_expired_sessions(now),
        "aliases": tables.delete_expired_aliases(now),
        "instructions": len(instructions),
        "keys": len(keys),
    }
