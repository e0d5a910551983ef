"""
The PostgreSQL store: one module database shared by several gateway nodes.

Every node (and the operator's ``m2mgw-admin``) connects to the same
database.  No database call runs on the reactor thread: one database thread
per store owns one connection and drains a queue of operations, running as
many as are queued (up to ``batch_max``) in ONE transaction -- group commit --
each inside its own ``SAVEPOINT``, so that one that fails rolls back alone and
fails only its own Deferred.  Every Deferred of a batch fires, in the reactor
thread, after the ``COMMIT``.

Correct across nodes (the argument is in ``docs/operations.md``, "Several
nodes on one database"): write transactions run at ``READ COMMITTED`` and
every row an operation reads and may then change is read ``FOR UPDATE``;
every per-module read locks the module's row first, so the module row is the
per-module mutex and locks are taken in one order.  Appending an event
updates the application's ``app_outbox`` row, which stays locked until the
commit: sequence numbers are gapless and committed in order.  A batch that
fails with a serialization failure or a deadlock (SQLSTATE 40001, 40P01) is
retried as a whole a few times, then one operation per transaction.

A batch that holds DATA runs in pipeline mode instead (option ``pipeline``):
one round trip locks, in the same order, and reads ahead the rows its DATA
will read (:class:`Prefetch`), the operations run on them sending their
writes without waiting, and ``COMMIT`` is the second round trip.  It has no
savepoints: if anything in it fails, it is rolled back and run again the way
above (:meth:`DatabaseThread._attempt_pipelined`).  While batches keep
coming, a batch's ``COMMIT`` is sent with the next one's ``BEGIN`` and
read-ahead: one round trip per batch (:meth:`DatabaseThread._run_stream`).
Its writes are sent as one statement per table
(:meth:`PostgresTables.flush_writes`).

A transaction that appended events also sends ``NOTIFY m2mgw_events`` (the
applications, as JSON); a listening connection of every store with event
listeners hears the other nodes' appends and tells its listeners (see
:meth:`PostgresStore.add_event_listener`).

The schema comes from the numbered ``migrations_pg/NNNN_name.sql`` files
shipped with the package (the same levels as the SQLite schema), applied in
order under a PostgreSQL advisory lock, each in one transaction that also
records the level in ``m2mgw_schema``.

psycopg (version 3) is imported only when a store is made, so that the other
stores work without it: ``pip install 'm2mgw[postgres]'``.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.resources
import json
import queue
import re
import select
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.errors import ConfigError, DuplicateModule, KeyConflict, M2MGWError, StoreError
from m2mgw.interfaces import IModuleStore, IModuleStoreFactory
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
    PayloadEffects,
    Report,
    RotationQuery,
    SecurityEvent,
    ServerKey,
    ServerKeyStatus,
    Session,
)
from m2mgw.store import logic
from m2mgw.store.base import EventListener, TransactionalStore, Work
from m2mgw.store.tables import HeldEvent, Tables

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

log = Logger()

DEFAULT_BATCH_MAX = 256
DEFAULT_RETRIES = 3
DEFAULT_CONNECT_TIMEOUT = 10
#: The channel of the event notifications.
EVENTS_CHANNEL = "m2mgw_events"
#: The advisory lock key migrations run under (``m2mgw`` in ASCII).
MIGRATION_LOCK = 0x6D326D6777
#: SQLSTATEs after which a batch is retried: serialization failure, deadlock.
RETRYABLE_STATES = frozenset({"40001", "40P01"})
#: The largest NOTIFY payload PostgreSQL accepts is 8000 bytes; stay below.
_NOTIFY_PAYLOAD_MAX = 7000
#: Reconnection delays of the listening connection, in seconds.
_LISTEN_BACKOFF_FIRST = 0.5
_LISTEN_BACKOFF_MAX = 30.0

_MIGRATION_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


def _psycopg() -> Any:
    """The psycopg module, or a :class:`ConfigError` saying how to install it."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "the postgres store needs psycopg 3: pip install 'm2mgw[postgres]'"
        ) from None
    return psycopg


# -- schema migrations -------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered schema change: ``NNNN_name.sql``, bringing the schema to ``version``."""

    version: int
    name: str
    sql: str


def shipped_migrations() -> list[Migration]:
    """
    The migrations shipped in ``m2mgw/store/migrations_pg/``, in order.

    :raise m2mgw.errors.StoreError: their numbers are not 1, 2, 3, ...
    """
    folder = importlib.resources.files("m2mgw.store") / "migrations_pg"
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match is not None:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    if [migration.version for migration in found] != list(range(1, len(found) + 1)):
        raise StoreError("the shipped PostgreSQL migrations are not numbered 1, 2, 3, ...")
    return found


def schema_level(connection: psycopg.Connection[Any]) -> int:
    """The migration level recorded in the database (0: no m2mgw schema yet)."""
    row = connection.execute("SELECT to_regclass('m2mgw_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = connection.execute("SELECT max(version) FROM m2mgw_schema").fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def migrate(connection: psycopg.Connection[Any], migrations: Sequence[Migration]) -> int:
    """
    Bring the schema up to the last of ``migrations``.

    Runs under a session-level advisory lock, so that several nodes starting
    at once apply each migration once; each migration is one transaction that
    also records its level.

    :param connection: a connection in autocommit mode, outside a transaction.
    :return: the schema level reached.
    :raise m2mgw.errors.StoreError: a migration failed, or the database is at a
        level newer than the newest migration known here.
    """
    latest = migrations[-1].version if migrations else 0
    connection.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        level = schema_level(connection)
        if level > latest:
            raise StoreError(
                f"the database is at schema level {level}, newer than this m2mgw knows"
                f" ({latest}): upgrade m2mgw"
            )
        if level == latest:
            return level
        connection.execute(
            "CREATE TABLE IF NOT EXISTS m2mgw_schema"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
        )
        for migration in migrations:
            if migration.version <= level:
                continue
            try:
                with connection.transaction():
                    connection.execute(migration.sql.encode("utf-8"), prepare=False)
                    connection.execute(
                        "INSERT INTO m2mgw_schema (version, name, applied_at)"
                        " VALUES (%s, %s, now())",
                        (migration.version, migration.name),
                    )
            except _psycopg().Error as exc:
                raise StoreError(
                    f"schema migration {migration.version:04d}_{migration.name} failed:"
                    f" {_first_line(exc)}"
                ) from exc
            level = migration.version
        return level
    finally:
        with contextlib.suppress(Exception):
            connection.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- rows --------------------------------------------------------------------------


_INSERT_MODULE = """
    INSERT INTO modules (module_id, status, psk, psk_reusable, module_group,
        last_hello_ts, created_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
"""

_INSERT_KEY = """
    INSERT INTO module_keys (module_id, kid, suite, public, status, vouched_by,
        created_at, activated_at, retired_at, not_after, pid)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def _conflicting_key(exc: Any) -> str:
    """What a unique violation's detail names ("Key (a, b)=(x, 1) already exists.")."""
    detail = getattr(getattr(exc, "diag", None), "message_detail", None) or ""
    _, _, rest = detail.partition(")=(")
    return rest.rpartition(")")[0] or "a row that exists already"


def _values(record: Any) -> list[Any]:
    """A record's fields in declaration order, enumerations by their values."""
    return [v.value if isinstance(v, enum.Enum) else v for v in vars(record).values()]


def _bytes(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def _module(row: Sequence[Any]) -> Module:
    values = list(row)
    values[1], values[2], values[3] = ModuleStatus(values[1]), _bytes(values[2]), bool(values[3])
    return Module(*values)


def _key(row: Sequence[Any]) -> ModuleKey:
    values = list(row)
    values[3], values[4] = _bytes(values[3]), KeyStatus(values[4])
    return ModuleKey(*values)


def _server_key(row: Sequence[Any]) -> ServerKey:
    values = list(row)
    values[2], values[3] = _bytes(values[2]), _bytes(values[3])
    values[4] = ServerKeyStatus(values[4])
    return ServerKey(*values)


def _session_row(session: Session) -> list[Any]:
    values = _values(session)
    values[10] = logic.window_to_bytes(session.window)
    return values


def _session(row: Sequence[Any]) -> Session:
    values = [_bytes(v) for v in row]
    values[10] = logic.window_from_bytes(values[10])
    return Session(*values)


def _instruction(row: Sequence[Any]) -> Instruction:
    values = [_bytes(v) for v in row]
    values[5] = InstructionState(values[5])
    return Instruction(*values)


def _event(row: Sequence[Any]) -> Event:
    return Event(row[0], row[1], row[2], row[3], logic.decode_payload(row[4]), row[5])


_SELECT_MODULE = """
    SELECT module_id, status, psk, psk_reusable, module_group, last_hello_ts, created_at
    FROM modules"""
_SELECT_KEY = """
    SELECT k.module_id, k.kid, k.suite, k.public, k.status, k.vouched_by, k.created_at,
        k.activated_at, k.retired_at, k.not_after, k.pid
    FROM module_keys AS k"""
_SELECT_SERVER_KEY = """
    SELECT skid, suite, public, sig_public, status, created_at, retire_after FROM server_keys"""
_SELECT_SESSION = """
    SELECT s.sid, s.module_id, s.kid, s.suite, s.skid, s.k_up, s.k_down, s.created_at,
        s.expires_at, s.highest_ctr, s."window"
    FROM sessions AS s"""
_SELECT_INSTRUCTION = """
    SELECT i.module_id, i.iid, i.kind, i.body, i.wire_size, i.state, i.not_after, i.attempts,
        i.source, i.idempotency_key, i.created_at, i.updated_at, i.exec_ts, i.status, i.result
    FROM instructions AS i"""
#: Locks a module's row first (the per-module mutex), by identity.
_LOCK_MODULE = """
    WITH m AS MATERIALIZED (SELECT module_id FROM modules WHERE module_id = %s FOR UPDATE)
"""

#: Locks the row of the module of a session first, by session id.
_LOCK_SESSION_MODULE = """
    WITH m AS MATERIALIZED (
        SELECT module_id FROM modules
        WHERE module_id = (SELECT module_id FROM sessions WHERE sid = %s)
        FOR UPDATE)
"""


#: The pending instructions read ahead per module.
PREFETCH_PENDING = 64
#: The states :meth:`PostgresTables.pending_instructions` returns.
_PENDING = frozenset({InstructionState.QUEUED, InstructionState.WAITING, InstructionState.SENT})


@dataclass(frozen=True)
class Prefetch:
    """
    What an operation on the per-datagram path will read: the rows
    :meth:`PostgresTables.prefetch` locks and reads ahead for it.

    :ivar sid: the session the operation reads (with its module's rows).
    :ivar tok: the DATA ``tok`` it looks up (empty: none).
    :ivar apps: applications it appends events to by name.
    :ivar events: it likely appends events of its module: lock the
        module's applications' outbox rows ahead.
    :ivar module_id: a module whose rows it reads, named (a HELLO's).
    """

    sid: bytes
    tok: bytes = b""
    apps: tuple[str, ...] = ()
    events: bool = False
    module_id: str | None = None


class _Prefetched:
    """
    Rows a pipelined transaction locked (``FOR UPDATE``, module rows first)
    and read ahead, kept equal to what the database holds for the
    transaction as its own writes change them.  A row not held is read.
    """

    def __init__(self) -> None:
        self.modules: dict[str, Module | None] = {}
        #: Each module's ``tokens_seen`` (the next token slot).
        self.tokens_seen: dict[str, int] = {}
        self.sessions: dict[bytes, Session | None] = {}
        #: ``(module_id, tok)``: ``(outcome, slot)``, or ``None`` if not remembered.
        self.tokens: dict[tuple[str, bytes], tuple[bytes, int] | None] = {}
        #: ``(module_id, slot)``: the ``tok`` held in :attr:`tokens` with that slot.
        self.slots: dict[tuple[str, int], bytes] = {}
        #: The first pending instructions of a module, ``iid`` ascending, and
        #: whether they are all of them.
        self.pending: dict[str, tuple[list[Instruction], bool]] = {}
        self.apps: dict[str, list[str]] = {}
        #: ``last_seq`` of the ``app_outbox`` rows this transaction locked.
        self.outbox: dict[str, int] = {}
        #: The applications whose ``last_seq`` went up here but is not written yet.
        self.outbox_unwritten: set[str] = set()

    def delete_sessions_of(self, module_id: str, kid: int | None) -> None:
        """The module's sessions (opened with key ``kid``, if given) were deleted."""
        for sid, session in list(self.sessions.items()):
            if session is None or session.module_id != module_id:
                continue
            if kid is None or session.kid == kid:
                self.sessions[sid] = None

    def set_window(self, sid: bytes, highest: int, bits: int) -> None:
        """A session's replay window was written."""
        session = self.sessions.get(sid)
        if session is not None:
            self.sessions[sid] = replace(session, highest_ctr=highest, window=bits)

    def found_token(self, module_id: str, tok: bytes, found: tuple[bytes, int] | None) -> None:
        """Hold what the database has for ``tok``: ``(outcome, slot)`` or ``None``."""
        self.tokens[module_id, tok] = found
        if found is not None:
            self.slots[module_id, found[1]] = tok

    def remember_token(self, module_id: str, tok: bytes, outcome: bytes, keep: int) -> int | None:
        """
        ``tok`` took the module's next slot, forgetting the one that held it.

        :return: the slot, or ``None`` if the module's token count is not held.
        """
        seen = self.tokens_seen.get(module_id)
        if seen is None:
            for key in [key for key in self.tokens if key[0] == module_id]:
                del self.tokens[key]
            for slot_key in [slot_key for slot_key in self.slots if slot_key[0] == module_id]:
                del self.slots[slot_key]
            return None
        slot = seen % keep
        self.tokens_seen[module_id] = seen + 1
        old = self.slots.get((module_id, slot))
        if old is not None:
            held = self.tokens.get((module_id, old))
            if held is not None and held[1] == slot:
                self.tokens[module_id, old] = None  # overwritten
        self.found_token(module_id, tok, (outcome, slot))
        return slot

    def update_instruction(self, instruction: Instruction) -> None:
        """An instruction's new fields were written."""
        entry = self.pending.get(instruction.module_id)
        if entry is None:
            return
        items = entry[0]
        for index, old in enumerate(items):
            if old.iid == instruction.iid:
                if instruction.state in _PENDING:
                    items[index] = instruction
                else:
                    del items[index]
                return
        if instruction.state in _PENDING:
            del self.pending[instruction.module_id]

    def pending_page(self, module_id: str, after_iid: int, limit: int) -> list[Instruction] | None:
        """:meth:`PostgresTables.pending_instructions` if the rows held answer it, else ``None``."""
        entry = self.pending.get(module_id)
        if entry is None:
            return None
        rest = [instruction for instruction in entry[0] if instruction.iid > after_iid]
        if len(rest) >= limit:
            return rest[:limit]
        return rest if entry[1] else None

    def pending_in(
        self, module_id: str, states: Sequence[InstructionState], limit: int
    ) -> list[Instruction] | None:
        """A module's pending instructions in ``states`` if all are held, else ``None``."""
        entry = self.pending.get(module_id)
        if entry is None or not entry[1] or not set(states) <= _PENDING:
            return None
        return [i for i in entry[0] if i.state in states][:limit]


_PREFETCH_MODULES = """
    SELECT module_id, status, psk, psk_reusable, module_group, last_hello_ts, created_at,
        tokens_seen
    FROM modules
    WHERE module_id IN (SELECT module_id FROM sessions WHERE sid = ANY(%(sids)b)
        UNION SELECT unnest(%(modules)b::TEXT[]))
    ORDER BY module_id FOR UPDATE"""
_PREFETCH_SESSIONS = """
    SELECT s.sid, s.module_id, s.kid, s.suite, s.skid, s.k_up, s.k_down, s.created_at,
        s.expires_at, s.highest_ctr, s."window"
    FROM sessions AS s WHERE s.sid = ANY(%(sids)b) ORDER BY s.sid FOR UPDATE"""
_PREFETCH_TOKENS = """
    SELECT t.module_id, t.tok, t.outcome, t.slot
    FROM unnest(%(token_sids)b::BYTEA[], %(toks)b::BYTEA[]) AS q (sid, tok)
    JOIN sessions AS s ON s.sid = q.sid
    JOIN data_tokens AS t ON t.module_id = s.module_id AND t.tok = q.tok"""
_PREFETCH_PENDING = """
    SELECT m.module_id, p.*
    FROM (SELECT module_id FROM sessions WHERE sid = ANY(%(sids)b)
        UNION SELECT unnest(%(modules)b::TEXT[])) AS m
    LEFT JOIN LATERAL (
        SELECT i.module_id, i.iid, i.kind, i.body, i.wire_size, i.state, i.not_after,
            i.attempts, i.source, i.idempotency_key, i.created_at, i.updated_at, i.exec_ts,
            i.status, i.result
        FROM instructions AS i
        WHERE i.module_id = m.module_id AND i.state IN ('queued', 'waiting', 'sent')
        ORDER BY i.iid LIMIT %(pending)b FOR UPDATE) AS p ON true"""
_PREFETCH_APPS = """
    SELECT m.module_id, a.app
    FROM (SELECT module_id FROM sessions WHERE sid = ANY(%(sids)b)
        UNION SELECT unnest(%(modules)b::TEXT[])) AS m
    LEFT JOIN module_apps AS a ON a.module_id = m.module_id
    ORDER BY m.module_id, a.app"""
_PREFETCH_OUTBOX = """
    SELECT app, last_seq FROM app_outbox
    WHERE app IN (
        SELECT a.app FROM module_apps AS a
        WHERE a.module_id IN (SELECT module_id FROM sessions WHERE sid = ANY(%(event_sids)b)
                UNION SELECT unnest(%(event_modules)b::TEXT[]))
            OR (a.module_id IN (SELECT module_id FROM sessions WHERE sid = ANY(%(sids)b)
                    UNION SELECT unnest(%(modules)b::TEXT[]))
                AND EXISTS (SELECT 1 FROM instructions AS i
                    WHERE i.module_id = a.module_id AND i.state IN ('queued', 'waiting')))
        UNION SELECT unnest(%(apps)b::TEXT[]))
    ORDER BY app FOR UPDATE"""


#: The writes :meth:`PostgresTables.flush_writes` sends, each for many rows.
_WRITE_WINDOWS = """
    UPDATE sessions AS s SET highest_ctr = v.highest, "window" = v.bits
    FROM unnest(%b::BYTEA[], %b::BIGINT[], %b::BYTEA[]) AS v (sid, highest, bits)
    WHERE s.sid = v.sid"""
_WRITE_TOKENS_SEEN = """
    UPDATE modules AS m SET tokens_seen = v.seen
    FROM unnest(%b::TEXT[], %b::BIGINT[]) AS v (module_id, seen)
    WHERE m.module_id = v.module_id"""
_WRITE_TOKENS = """
    INSERT INTO data_tokens (module_id, slot, tok, outcome)
    SELECT * FROM unnest(%b::TEXT[], %b::BIGINT[], %b::BYTEA[], %b::BYTEA[])
    ON CONFLICT (module_id, slot) DO UPDATE SET tok = excluded.tok, outcome = excluded.outcome"""
_WRITE_REPORTS = """
    INSERT INTO reports (module_id, received_at, module_ts, data)
    SELECT module_id, received_at, module_ts, data
    FROM unnest(%b::TEXT[], %b::BIGINT[], %b::BIGINT[], %b::BYTEA[]) WITH ORDINALITY
        AS v (module_id, received_at, module_ts, data, n)
    ORDER BY n"""
_WRITE_EVENTS = """
    INSERT INTO events (app, seq, kind, module_id, payload, created_at)
    SELECT * FROM unnest(%b::TEXT[], %b::BIGINT[], %b::TEXT[], %b::TEXT[], %b::TEXT[],
        %b::BIGINT[])"""


@dataclass
class _Readahead:
    """The read-ahead statements :meth:`PostgresTables.send_prefetch` sent (their cursors)."""

    sids: list[bytes]
    pairs: list[tuple[bytes, bytes]]
    modules: Any
    sessions: Any
    tokens: Any
    pending: Any
    module_apps: Any
    outbox: Any
    #: A sync ran them (their rows arrived).
    synced: bool = False


class PostgresTables(Tables):
    """
    :class:`~m2mgw.store.tables.Tables` over one PostgreSQL connection, inside its transaction.

    :ivar locking: the transaction may change what it reads: reads lock the
        rows they return (``FOR UPDATE``), a module's own rows after the
        module's row.
    :ivar round_trips: times it waited for the server: each statement
        outside pipeline mode, each sync in it.
    """

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._db = connection
        self.locking = True
        self.round_trips = 0
        #: The applications given sequence numbers by the operation running.
        self.apps_appended: set[str] = set()
        #: In pipeline mode (see :meth:`pipelined`): the pipeline, and the
        #: rows the transaction locked and read ahead.
        self._pipeline: psycopg.Pipeline | None = None
        self._cache: _Prefetched | None = None
        #: In pipeline mode, writes held back to be sent as a few statements
        #: (see :meth:`flush_writes`): replay windows by session, modules'
        #: token counts, token slots, reports and events, in order.
        self._windows: dict[bytes, tuple[int, bytes]] = {}
        self._seen: dict[str, int] = {}
        self._slots: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self._reports: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        """
        Within the block, statements whose result is not needed (writes) are
        sent without waiting; a read, :meth:`sync` and the block's end (a
        sync) wait for the server (one round trip each).  A failed statement
        is only seen at the next wait, and then fails the whole transaction.
        Reads are served from what :meth:`prefetch` read ahead, where it can.
        """
        with self._db.pipeline() as pipeline:
            self._pipeline = pipeline
            self._cache = _Prefetched()
            try:
                yield
            finally:
                self._pipeline = None
                self._cache = None
                self._drop_writes()
                self.round_trips += 1  # leaving the pipeline syncs

    def flush_writes(self) -> None:
        """
        In pipeline mode, send the writes held back, one statement per
        table: they only change rows this transaction locked (or insert),
        and nothing was sent between them, so the outcome is that of
        sending them one by one.
        """
        db = self._db
        if self._windows:
            windows, self._windows = self._windows, {}
            db.execute(
                _WRITE_WINDOWS, (list(windows), *map(list, zip(*windows.values(), strict=True)))
            )
        if self._seen:
            seen, self._seen = self._seen, {}
            db.execute(_WRITE_TOKENS_SEEN, (list(seen), list(seen.values())))
        if self._slots:
            slots, self._slots = self._slots, {}
            modules, numbers = zip(*slots, strict=True)
            toks, outcomes = zip(*slots.values(), strict=True)
            db.execute(_WRITE_TOKENS, (list(modules), list(numbers), list(toks), list(outcomes)))
        if self._reports:
            reports, self._reports = self._reports, []
            db.execute(_WRITE_REPORTS, list(map(list, zip(*reports, strict=True))))
        if self._events:
            events, self._events = self._events, []
            db.execute(_WRITE_EVENTS, list(map(list, zip(*events, strict=True))))

    def _drop_writes(self) -> None:
        self._windows, self._seen, self._slots = {}, {}, {}
        self._reports, self._events = [], []

    def prefetch(self, hints: Sequence[Prefetch]) -> None:
        """
        In pipeline mode, lock and read ahead, in one round trip, the rows
        the operations ``hints`` describe will read: the modules of their
        sessions (by identity: the order every transaction locks modules
        in), then the sessions, the DATA tokens, the first pending
        instructions, the modules' applications and, for operations that
        likely append events, their outbox rows (by name).  Rows whose
        module was not locked (the session changed meanwhile) are not kept.
        """
        self.take_prefetch(self.send_prefetch(hints))

    def send_prefetch(self, hints: Sequence[Prefetch]) -> _Readahead:
        """
        The first half of :meth:`prefetch`: send the statements, without
        waiting; :meth:`take_prefetch` takes their rows after a sync.
        """
        assert self._pipeline is not None
        sids = sorted({hint.sid for hint in hints})
        pairs = sorted({(hint.sid, hint.tok) for hint in hints if hint.tok})
        parameters = {
            "sids": sids,
            "modules": sorted({hint.module_id for hint in hints if hint.module_id is not None}),
            "token_sids": [pair[0] for pair in pairs],
            "toks": [pair[1] for pair in pairs],
            "pending": PREFETCH_PENDING,
            "event_sids": sorted({hint.sid for hint in hints if hint.events}),
            "event_modules": sorted(
                {hint.module_id for hint in hints if hint.events and hint.module_id is not None}
            ),
            "apps": sorted({app for hint in hints for app in hint.apps}),
        }
        db = self._db
        modules = db.execute(_PREFETCH_MODULES, parameters)
        sessions = db.execute(_PREFETCH_SESSIONS, parameters)
        tokens = db.execute(_PREFETCH_TOKENS, parameters)
        pending = db.execute(_PREFETCH_PENDING, parameters)
        module_apps = db.execute(_PREFETCH_APPS, parameters)
        outbox = db.execute(_PREFETCH_OUTBOX, parameters)
        return _Readahead(sids, pairs, modules, sessions, tokens, pending, module_apps, outbox)

    def take_prefetch(self, sent: _Readahead) -> None:
        """
        The second half of :meth:`prefetch`, after the sync that ran what
        :meth:`send_prefetch` sent: hold the rows (replacing what was held).
        """
        if not sent.synced:
            self.sync()
        sids, pairs = sent.sids, sent.pairs
        modules, sessions, tokens = sent.modules, sent.sessions, sent.tokens
        pending, module_apps, outbox = sent.pending, sent.module_apps, sent.outbox
        self._cache = cache = _Prefetched()
        for row in modules.fetchall():
            cache.modules[row[0]] = _module(row[:7])
            cache.tokens_seen[row[0]] = int(row[7])
        read = {session.sid: session for session in map(_session, sessions.fetchall())}
        found = {sid: s for sid, s in read.items() if s.module_id in cache.modules}
        for sid in sids:
            if sid in found:
                cache.sessions[sid] = found[sid]
            elif sid not in read:
                cache.sessions[sid] = None  # there is no such session
        remembered = {
            (row[0], _bytes(row[1])): (_bytes(row[2]), int(row[3])) for row in tokens.fetchall()
        }
        for sid, tok in pairs:
            session = found.get(sid)
            if session is not None:
                key = (session.module_id, tok)
                cache.found_token(session.module_id, tok, remembered.get(key))
        for row in pending.fetchall():
            if row[0] not in cache.modules:
                continue
            items, _ = cache.pending.setdefault(row[0], ([], True))
            if row[1] is not None:
                items.append(_instruction(row[1:]))
        for module_id, (items, _) in list(cache.pending.items()):
            items.sort(key=lambda instruction: instruction.iid)
            cache.pending[module_id] = (items, len(items) < PREFETCH_PENDING)
        for module_id, app in module_apps.fetchall():
            if module_id in cache.modules:
                names = cache.apps.setdefault(module_id, [])
                if app is not None:
                    names.append(app)
        for app, last_seq in outbox.fetchall():
            cache.outbox[app] = int(last_seq)

    def write_outbox(self) -> None:
        """In pipeline mode, write the event counters counted on since the last time."""
        cache = self._cache
        if cache is not None and cache.outbox_unwritten:
            for app in sorted(cache.outbox_unwritten):
                self.send(
                    "UPDATE app_outbox SET last_seq = %s WHERE app = %s", (cache.outbox[app], app)
                )
            cache.outbox_unwritten.clear()

    def sync(self) -> None:
        """In pipeline mode, wait until the server has run every statement sent."""
        if self._pipeline is not None:
            self.round_trips += 1
            self._pipeline.sync()

    def send(self, sql: str, parameters: Sequence[Any] = ()) -> None:
        """A statement whose result is not needed: in pipeline mode, not waited for."""
        if self._pipeline is not None:
            self.flush_writes()
            self._db.execute(sql, parameters)
        else:
            self._cursor(sql, parameters)

    def schema_level(self) -> int:
        """The schema migration level of the database."""
        self.round_trips += 2
        return schema_level(self._db)

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL statement of a tool's or a test's own; return its rows (if any)."""
        self.write_outbox()
        cursor = self._cursor(sql, parameters)
        return cursor.fetchall() if cursor.description is not None else []

    def _cursor(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> Any:
        if self._pipeline is not None:
            self.flush_writes()
            cursor = self._db.execute(sql, parameters)
            self.sync()
            return cursor
        self.round_trips += 1
        return self._db.execute(sql, parameters)

    def _one(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> Any:
        return self._cursor(sql, parameters).fetchone()

    def _all(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        return self._cursor(sql, parameters).fetchall()  # type: ignore[no-any-return]

    def _run(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> int:
        return int(self._cursor(sql, parameters).rowcount)

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows and self._pipeline is not None:
            self.flush_writes()
            for row in rows:
                self._db.execute(sql, row)
        elif rows:
            self.round_trips += 1
            with self._db.cursor() as cursor:
                cursor.executemany(sql, rows)

    def _locked(self, sql: str) -> str:
        """``sql`` locking the rows it reads if the transaction may change them."""
        return sql + " FOR UPDATE" if self.locking else sql

    # -- modules -------------------------------------------------------------------

    def get_module(self, module_id: str) -> Module | None:
        if self._cache is not None and module_id in self._cache.modules:
            return self._cache.modules[module_id]
        row = self._one(self._locked(_SELECT_MODULE + " WHERE module_id = %s"), (module_id,))
        return None if row is None else _module(row)

    def insert_modules(self, modules: Sequence[Module]) -> None:
        unique = _psycopg().errors.UniqueViolation
        if self._pipeline is None and len(modules) > 1:
            # A provisioning batch: one probe and one executemany, not a
            # round trip per row.
            ids = [module.module_id for module in modules]
            found = self._one("SELECT module_id FROM modules WHERE module_id = ANY(%s)", (ids,))
            if found is not None:
                raise DuplicateModule(found[0])
            try:
                self._many(_INSERT_MODULE, [_values(module) for module in modules])
            except unique as exc:  # inserted by another node since the probe
                raise DuplicateModule(_conflicting_key(exc)) from None
            return
        for module in modules:
            if self._cache is not None:
                self._cache.modules.pop(module.module_id, None)
            try:
                self.send(_INSERT_MODULE, _values(module))
            except unique:
                raise DuplicateModule(module.module_id) from None

    def update_module(self, module: Module) -> None:
        if self._cache is not None and module.module_id in self._cache.modules:
            self._cache.modules[module.module_id] = module
        self.send(
            """
            UPDATE modules SET status = %s, psk = %s, psk_reusable = %s, module_group = %s,
                last_hello_ts = %s, created_at = %s
            WHERE module_id = %s
            """,
            (*_values(module)[1:], module.module_id),
        )

    def list_modules(self, offset: int, limit: int) -> list[Module]:
        rows = self._all(_SELECT_MODULE + " ORDER BY module_id LIMIT %s OFFSET %s", (limit, offset))
        return [_module(row) for row in rows]

    def count_modules(self) -> int:
        return int(self._one("SELECT count(*) FROM modules", ())[0])

    def allocate_iid(self, module_id: str) -> int:
        row = self._one(
            "UPDATE modules SET last_iid = last_iid + 1 WHERE module_id = %s RETURNING last_iid",
            (module_id,),
        )
        return int(row[0])

    # -- module keys ---------------------------------------------------------------

    def get_key(self, module_id: str, kid: int) -> ModuleKey | None:
        if self.locking:
            row = self._one(
                _LOCK_MODULE
                + _SELECT_KEY
                + " JOIN m USING (module_id) WHERE k.kid = %s FOR UPDATE OF k",
                (module_id, kid),
            )
        else:
            row = self._one(
                _SELECT_KEY + " WHERE k.module_id = %s AND k.kid = %s", (module_id, kid)
            )
        return None if row is None else _key(row)

    def list_keys(self, module_id: str) -> list[ModuleKey]:
        rows = self._all(
            self._locked(_SELECT_KEY + " WHERE k.module_id = %s ORDER BY k.kid"),
            (module_id,),
        )
        return [_key(row) for row in rows]

    def insert_keys(self, keys: Sequence[ModuleKey]) -> None:
        unique = _psycopg().errors.UniqueViolation
        if self._pipeline is None and len(keys) > 1:
            found = self._one(
                """
                SELECT k.module_id, k.kid FROM module_keys k
                JOIN unnest(%s::text[], %s::bigint[]) AS n(module_id, kid)
                    ON k.module_id = n.module_id AND k.kid = n.kid
                LIMIT 1
                """,
                ([key.module_id for key in keys], [key.kid for key in keys]),
            )
            if found is not None:
                raise KeyConflict(f"{found[0]} kid {found[1]}")
            try:
                self._many(_INSERT_KEY, [_values(key) for key in keys])
            except unique as exc:
                raise KeyConflict(_conflicting_key(exc)) from None
            return
        for key in keys:
            try:
                self.send(_INSERT_KEY, _values(key))
            except unique:
                raise KeyConflict(f"{key.module_id} kid {key.kid}") from None

    def update_key(self, key: ModuleKey) -> None:
        self.send(
            """
            UPDATE module_keys SET suite = %s, public = %s, status = %s, vouched_by = %s,
                created_at = %s, activated_at = %s, retired_at = %s, not_after = %s, pid = %s
            WHERE module_id = %s AND kid = %s
            """,
            (*_values(key)[2:], key.module_id, key.kid),
        )

    def expiring_keys(self, now: int) -> list[ModuleKey]:
        rows = self._all(
            self._locked(
                _SELECT_KEY
                + """
                WHERE k.status IN ('active', 'pending') AND k.not_after IS NOT NULL
                    AND k.not_after < %s
                ORDER BY k.module_id, k.kid
                """
            ),
            (now,),
        )
        return [_key(row) for row in rows]

    def keys_due_for_rotation(self, query: RotationQuery, limit: int) -> list[ModuleKey]:
        if query.groups is not None and not query.groups:
            return []
        rows = self._all(
            """
            SELECT k.module_id, k.kid, k.suite, k.public, k.status, k.vouched_by, k.created_at,
                k.activated_at, k.retired_at, k.not_after, k.pid
            FROM module_keys AS k JOIN modules AS m ON m.module_id = k.module_id
            WHERE k.status = 'active' AND k.module_id > %(after)s AND m.status = 'enabled'
                AND ((%(activated)s::BIGINT IS NOT NULL
                        AND COALESCE(k.activated_at, k.created_at) <= %(activated)s)
                    OR (%(expiring)s::BIGINT IS NOT NULL AND k.not_after IS NOT NULL
                        AND k.not_after <= %(expiring)s)
                    OR k.suite = ANY(%(suites)s::TEXT[]))
                AND (%(groups)s::TEXT[] IS NULL OR m.module_group = ANY(%(groups)s::TEXT[]))
                AND NOT (m.module_group = ANY(%(excluded)s::TEXT[]))
                AND NOT EXISTS (SELECT 1 FROM module_keys AS o WHERE o.module_id = k.module_id
                    AND (o.status = 'pending' OR (o.status = 'active' AND o.kid > k.kid)))
                AND NOT EXISTS (SELECT 1 FROM instructions AS i WHERE i.module_id = k.module_id
                    AND i.kind = 'keygen' AND i.state IN ('queued', 'waiting', 'sent'))
            ORDER BY k.module_id LIMIT %(limit)s
            """,
            {
                "after": query.after_module,
                "activated": query.activated_before,
                "expiring": query.expiring_before,
                "suites": list(query.suites),
                "groups": None if query.groups is None else list(query.groups),
                "excluded": list(query.exclude_groups),
                "limit": limit,
            },
        )
        return [_key(row) for row in rows]

    # -- server keys ---------------------------------------------------------------

    def get_server_key(self, skid: int) -> ServerKey | None:
        row = self._one(self._locked(_SELECT_SERVER_KEY + " WHERE skid = %s"), (skid,))
        return None if row is None else _server_key(row)

    def insert_server_key(self, key: ServerKey) -> None:
        self.send(
            """
            INSERT INTO server_keys (skid, suite, public, sig_public, status, created_at,
                retire_after)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            """,
            _values(key),
        )

    def update_server_key(self, key: ServerKey) -> None:
        self.send(
            """
            UPDATE server_keys SET suite = %s, public = %s, sig_public = %s, status = %s,
                created_at = %s, retire_after = %s
            WHERE skid = %s
            """,
            (*_values(key)[1:], key.skid),
        )

    def list_server_keys(self) -> list[ServerKey]:
        rows = self._all(_SELECT_SERVER_KEY + " ORDER BY skid", ())
        return [_server_key(row) for row in rows]

    # -- sessions ------------------------------------------------------------------

    def get_session(self, sid: bytes) -> Session | None:
        if self._cache is not None and sid in self._cache.sessions:
            return self._cache.sessions[sid]
        if self.locking:
            # The module's row first, then the session's: a concurrent HELLO
            # of the module (which holds the module row while it replaces the
            # session) is waited for, and its outcome seen.
            row = self._one(
                _LOCK_SESSION_MODULE
                + _SELECT_SESSION
                + " JOIN m USING (module_id) WHERE s.sid = %s FOR UPDATE OF s",
                (sid, sid),
            )
        else:
            row = self._one(_SELECT_SESSION + " WHERE s.sid = %s", (sid,))
        return None if row is None else _session(row)

    def get_module_session(self, module_id: str) -> Session | None:
        row = self._one(self._locked(_SELECT_SESSION + " WHERE s.module_id = %s"), (module_id,))
        return None if row is None else _session(row)

    def insert_session(self, session: Session) -> None:
        if self._cache is not None:
            # Its module's row is locked (by the caller): a session held
            # with it stays as written here.
            if session.module_id in self._cache.modules:
                self._cache.sessions[session.sid] = session
            else:
                self._cache.sessions.pop(session.sid, None)
        self.send(
            """
            INSERT INTO sessions (sid, module_id, kid, suite, skid, k_up, k_down, created_at,
                expires_at, highest_ctr, "window")
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            _session_row(session),
        )

    def delete_session(self, sid: bytes) -> None:
        if self._cache is not None:
            self._cache.sessions[sid] = None
        self.send("DELETE FROM sessions WHERE sid = %s", (sid,))

    def delete_sessions(self, module_id: str, kid: int | None = None) -> None:
        if self._cache is not None:
            self._cache.delete_sessions_of(module_id, kid)
        if kid is None:
            self.send("DELETE FROM sessions WHERE module_id = %s", (module_id,))
        else:
            self.send("DELETE FROM sessions WHERE module_id = %s AND kid = %s", (module_id, kid))

    def set_session_window(self, sid: bytes, highest: int, bits: int) -> None:
        if self._cache is not None:
            self._cache.set_window(sid, highest, bits)
        if self._pipeline is not None:
            self._windows[sid] = (highest, logic.window_to_bytes(bits))
            return
        self.send(
            'UPDATE sessions SET highest_ctr = %s, "window" = %s WHERE sid = %s',
            (highest, logic.window_to_bytes(bits), sid),
        )

    def delete_expired_sessions(self, now: int) -> int:
        if self._cache is not None:
            self._cache.sessions.clear()
        return self._run("DELETE FROM sessions WHERE expires_at <= %s", (now,))

    # -- aliases -------------------------------------------------------------------

    def get_alias(self, alias: bytes) -> tuple[str, int | None] | None:
        row = self._one(
            self._locked("SELECT module_id, expires_at FROM aliases WHERE alias = %s"),
            (alias,),
        )
        return None if row is None else (row[0], row[1])

    def replace_alias(self, module_id: str, alias: bytes, expires_at: int | None) -> None:
        self.send("DELETE FROM aliases WHERE module_id = %s OR alias = %s", (module_id, alias))
        self.send(
            "INSERT INTO aliases (alias, module_id, expires_at) VALUES (%s, %s, %s)",
            (alias, module_id, expires_at),
        )

    def delete_alias(self, alias: bytes) -> None:
        self.send("DELETE FROM aliases WHERE alias = %s", (alias,))

    def delete_expired_aliases(self, now: int) -> int:
        return self._run(
            "DELETE FROM aliases WHERE expires_at IS NOT NULL AND expires_at <= %s", (now,)
        )

    # -- DATA tokens ---------------------------------------------------------------

    def find_token(self, module_id: str, tok: bytes) -> bytes | None:
        if self._cache is not None and (module_id, tok) in self._cache.tokens:
            found = self._cache.tokens[module_id, tok]
            return None if found is None else found[0]
        row = self._one(
            "SELECT outcome FROM data_tokens WHERE module_id = %s AND tok = %s", (module_id, tok)
        )
        return None if row is None else bytes(row[0])

    def remember_token(self, module_id: str, tok: bytes, outcome: bytes, keep: int) -> None:
        if self._cache is not None:
            slot = self._cache.remember_token(module_id, tok, outcome, keep)
            if slot is not None and self._pipeline is not None:
                # The module's row is locked and its count held: write the
                # count and the slot with the batch's others.
                self._seen[module_id] = self._cache.tokens_seen[module_id]
                self._slots[module_id, slot] = (tok, outcome)
                return
        self.send(
            """
            WITH seen AS (
                UPDATE modules SET tokens_seen = tokens_seen + 1 WHERE module_id = %s
                RETURNING tokens_seen)
            INSERT INTO data_tokens (module_id, slot, tok, outcome)
            SELECT %s, (tokens_seen - 1) %% %s, %s, %s FROM seen
            ON CONFLICT (module_id, slot) DO UPDATE SET tok = excluded.tok,
                outcome = excluded.outcome
            """,
            (module_id, module_id, keep, tok, outcome),
        )

    # -- instructions --------------------------------------------------------------

    def get_instruction(self, module_id: str, iid: int) -> Instruction | None:
        if self._cache is not None:
            for instruction in self._cache.pending.get(module_id, ((), False))[0]:
                if instruction.iid == iid:
                    return instruction
        if self.locking:
            row = self._one(
                _LOCK_MODULE
                + _SELECT_INSTRUCTION
                + " JOIN m USING (module_id) WHERE i.iid = %s FOR UPDATE OF i",
                (module_id, iid),
            )
        else:
            row = self._one(
                _SELECT_INSTRUCTION + " WHERE i.module_id = %s AND i.iid = %s", (module_id, iid)
            )
        return None if row is None else _instruction(row)

    def insert_instruction(self, instruction: Instruction) -> None:
        if self._cache is not None:
            self._cache.pending.pop(instruction.module_id, None)
        self.send(
            """
            INSERT INTO instructions (module_id, iid, kind, body, wire_size, state, not_after,
                attempts, source, idempotency_key, created_at, updated_at, exec_ts, status, result)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            _values(instruction),
        )

    def update_instruction(self, instruction: Instruction) -> None:
        if self._cache is not None:
            self._cache.update_instruction(instruction)
        self.send(
            """
            UPDATE instructions SET kind = %s, body = %s, wire_size = %s, state = %s,
                not_after = %s, attempts = %s, source = %s, idempotency_key = %s,
                created_at = %s, updated_at = %s, exec_ts = %s, status = %s, result = %s
            WHERE module_id = %s AND iid = %s
            """,
            (*_values(instruction)[2:], instruction.module_id, instruction.iid),
        )

    def find_idempotent(self, module_id: str, source: str, key: str) -> Instruction | None:
        row = self._one(
            self._locked(
                _SELECT_INSTRUCTION
                + " WHERE i.module_id = %s AND i.source = %s AND i.idempotency_key = %s"
            ),
            (module_id, source, key),
        )
        return None if row is None else _instruction(row)

    def count_instructions_by_key(self, source: str, key: str) -> dict[InstructionState, int]:
        rows = self._all(
            """
            SELECT state, count(*) FROM instructions
            WHERE source = %s AND idempotency_key = %s GROUP BY state
            """,
            (source, key),
        )
        return {InstructionState(state): int(count) for state, count in rows}

    def pending_instructions(self, module_id: str, after_iid: int, limit: int) -> list[Instruction]:
        if self._cache is not None:
            page = self._cache.pending_page(module_id, after_iid, limit)
            if page is not None:
                return page
        # Callers that may change them hold the module's row already.
        rows = self._all(
            self._locked(
                _SELECT_INSTRUCTION
                + """
                WHERE i.module_id = %s AND i.iid > %s AND i.state IN ('queued', 'waiting', 'sent')
                ORDER BY i.iid LIMIT %s
                """
            ),
            (module_id, after_iid, limit),
        )
        return [_instruction(row) for row in rows]

    def list_instructions(
        self, module_id: str | None, states: Sequence[InstructionState], limit: int
    ) -> list[Instruction]:
        wanted = [state.value for state in states] or None
        if self._cache is not None and module_id is not None and states:
            found = self._cache.pending_in(module_id, states, limit)
            if found is not None:
                return found
        if module_id is not None:
            rows = self._all(
                _SELECT_INSTRUCTION
                + """
                WHERE i.module_id = %s AND (%s::TEXT[] IS NULL OR i.state = ANY(%s::TEXT[]))
                ORDER BY i.iid LIMIT %s
                """,
                (module_id, wanted, wanted, limit),
            )
        else:
            rows = self._all(
                _SELECT_INSTRUCTION
                + """
                WHERE %s::TEXT[] IS NULL OR i.state = ANY(%s::TEXT[])
                ORDER BY i.created_at, i.module_id, i.iid LIMIT %s
                """,
                (wanted, wanted, limit),
            )
        return [_instruction(row) for row in rows]

    def expiring_instructions(self, now: int) -> list[Instruction]:
        rows = self._all(
            self._locked(
                _SELECT_INSTRUCTION
                + """
                WHERE i.state IN ('queued', 'waiting', 'sent') AND i.not_after IS NOT NULL
                    AND i.not_after < %s
                ORDER BY i.module_id, i.iid
                """
            ),
            (now,),
        )
        return [_instruction(row) for row in rows]

    # -- applications and the outbox -----------------------------------------------

    def get_module_apps(self, module_id: str) -> list[str]:
        if self._cache is not None and module_id in self._cache.apps:
            return list(self._cache.apps[module_id])
        rows = self._all(
            "SELECT app FROM module_apps WHERE module_id = %s ORDER BY app", (module_id,)
        )
        return [row[0] for row in rows]

    def add_module_apps(self, pairs: Sequence[tuple[str, str]]) -> None:
        if self._cache is not None:
            for module_id, _ in pairs:
                self._cache.apps.pop(module_id, None)
        self._many("INSERT INTO module_apps (module_id, app) VALUES (%s, %s)", pairs)

    def set_module_apps(self, module_id: str, apps: Sequence[str]) -> None:
        if self._cache is not None:
            self._cache.apps[module_id] = list(apps)
        self.send("DELETE FROM module_apps WHERE module_id = %s", (module_id,))
        self._many(
            "INSERT INTO module_apps (module_id, app) VALUES (%s, %s)",
            [(module_id, app) for app in apps],
        )

    def list_app_modules(self, app: str, offset: int, limit: int) -> list[Module]:
        rows = self._all(
            """
            SELECT module_id, status, psk, psk_reusable, module_group, last_hello_ts, created_at
            FROM modules WHERE module_id IN (
                SELECT module_id FROM module_apps WHERE app = %s
                ORDER BY module_id LIMIT %s OFFSET %s
            ) ORDER BY module_id
            """,
            (app, limit, offset),
        )
        return [_module(row) for row in rows]

    def outbox_apps(self) -> list[str]:
        return [row[0] for row in self._all("SELECT app FROM app_outbox ORDER BY app", ())]

    def last_event_seq_before(self, app: str, created_before: int) -> int:
        row = self._one(
            "SELECT max(seq) FROM events WHERE app = %s AND created_at < %s",
            (app, created_before),
        )
        return 0 if row is None or row[0] is None else int(row[0])

    def next_event_seq(self, app: str) -> int:
        # The row stays locked until the transaction ends: another appender
        # waits, and sees this one's numbers once it committed.
        if self._cache is not None and app in self._cache.outbox:
            # Locked by this transaction already: count on here, write the
            # last number once (see write_outbox).
            seq = self._cache.outbox[app] + 1
            self._cache.outbox[app] = seq
            self._cache.outbox_unwritten.add(app)
            self.apps_appended.add(app)
            return seq
        row = self._one(
            """
            INSERT INTO app_outbox AS o (app, last_seq, acked_seq) VALUES (%s, 1, 0)
            ON CONFLICT (app) DO UPDATE SET last_seq = o.last_seq + 1
            RETURNING last_seq
            """,
            (app,),
        )
        self.apps_appended.add(app)
        if self._cache is not None:
            self._cache.outbox[app] = int(row[0])
        return int(row[0])

    def insert_event(self, event: Event, payload_text: str) -> None:
        if self._pipeline is not None:
            self._events.append(
                (event.app, event.seq, event.kind, event.module_id, payload_text, event.created_at)
            )
            return
        self.send(
            """
            INSERT INTO events (app, seq, kind, module_id, payload, created_at)
            VALUES (%s, %s, %s, %s, %s, %s)
            """,
            (event.app, event.seq, event.kind, event.module_id, payload_text, event.created_at),
        )

    def hold_event(
        self, module_id: str, kind: str, app: str | None, payload_text: str, created_at: int
    ) -> None:
        self.send(
            """
            INSERT INTO held_events (module_id, kind, app, payload, created_at)
            VALUES (%s, %s, %s, %s, %s)
            """,
            (module_id, kind, app, payload_text, created_at),
        )

    def held_events(self, module_id: str) -> list[HeldEvent]:
        rows = self._all(
            "SELECT kind, app, payload FROM held_events WHERE module_id = %s ORDER BY held_id",
            (module_id,),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def delete_held_events(self, module_id: str) -> None:
        self.send("DELETE FROM held_events WHERE module_id = %s", (module_id,))

    def events_after(self, app: str, seq: int, limit: int) -> list[Event]:
        rows = self._all(
            """
            SELECT app, seq, kind, module_id, payload, created_at FROM events
            WHERE app = %s AND seq > %s ORDER BY seq LIMIT %s
            """,
            (app, seq, limit),
        )
        return [_event(row) for row in rows]

    def outbox_position(self, app: str) -> tuple[int, int]:
        self.write_outbox()
        row = self._one(
            self._locked("SELECT acked_seq, last_seq FROM app_outbox WHERE app = %s"),
            (app,),
        )
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def acknowledge(self, app: str, seq: int) -> None:
        self.send("UPDATE app_outbox SET acked_seq = %s WHERE app = %s", (seq, app))
        self.send("DELETE FROM events WHERE app = %s AND seq <= %s", (app, seq))

    # -- reports and security events -----------------------------------------------

    def insert_report(self, report: Report) -> None:
        if self._pipeline is not None:
            self._reports.append(
                (report.module_id, report.received_at, report.module_ts, report.data)
            )
            return
        self.send(
            """
            INSERT INTO reports (module_id, received_at, module_ts, data)
            VALUES (%s, %s, %s, %s)
            """,
            (report.module_id, report.received_at, report.module_ts, report.data),
        )

    def list_reports(self, module_id: str, limit: int) -> list[Report]:
        rows = self._all(
            """
            SELECT module_id, received_at, data, module_ts FROM reports WHERE module_id = %s
            ORDER BY received_at DESC, report_id DESC LIMIT %s
            """,
            (module_id, limit),
        )
        return [Report(row[0], row[1], bytes(row[2]), row[3]) for row in rows]

    def insert_security_events(self, events: Sequence[SecurityEvent]) -> None:
        self._many(
            """
            INSERT INTO security_events (at, category, reason, source, claimed_id, detail)
            VALUES (%s, %s, %s, %s, %s, %s)
            """,
            [(e.at, e.category, e.reason, e.source, e.claimed_id, e.detail) for e in events],
        )

    def list_security_events(self, since: int, limit: int) -> list[SecurityEvent]:
        rows = self._all(
            """
            SELECT at, category, reason, source, claimed_id, detail FROM security_events
            WHERE at >= %s ORDER BY at, event_id LIMIT %s
            """,
            (since, limit),
        )
        return [SecurityEvent(row[0], row[1], row[2], row[3], row[4], row[5]) for row in rows]

    # -- retention -----------------------------------------------------------------

    def delete_reports_before(self, before: int, limit: int) -> int:
        # Reports arrive in report_id order, so the old ones are at the front.
        return self._run(
            """
            DELETE FROM reports WHERE report_id IN (
                SELECT report_id FROM reports WHERE received_at < %s
                ORDER BY report_id LIMIT %s
            )
            """,
            (before, limit),
        )

    def delete_security_events_before(self, before: int, limit: int) -> int:
        return self._run(
            """
            DELETE FROM security_events WHERE event_id IN (
                SELECT event_id FROM security_events WHERE at < %s
                ORDER BY at, event_id LIMIT %s
            )
            """,
            (before, limit),
        )

    def delete_finished_instructions_before(self, before: int, limit: int) -> int:
        # Locks the rows it deletes; a module's live (pending) instructions,
        # which the per-datagram path locks, are never among them.
        return self._run(
            """
            DELETE FROM instructions WHERE (module_id, iid) IN (
                SELECT module_id, iid FROM instructions
                WHERE state IN ('confirmed', 'failed', 'expired', 'cancelled')
                    AND updated_at < %s
                ORDER BY updated_at LIMIT %s
                FOR UPDATE SKIP LOCKED
            )
            """,
            (before, limit),
        )


# -- the database thread -----------------------------------------------------------

_STOP = object()


class _Retry(Exception):
    """The batch's transaction hit a serialization failure or a deadlock: run it again."""


def _retryable(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) in RETRYABLE_STATES


def _as_store_error(exc: BaseException) -> BaseException:
    """The exception a caller sees: m2mgw's own ones pass, psycopg's become StoreError."""
    if isinstance(exc, M2MGWError):
        return exc
    module = _psycopg()
    if isinstance(exc, module.Error | OSError | OverflowError):
        error = StoreError(f"database error: {_first_line(exc)}")
        error.__cause__ = exc
        return error
    return exc


@dataclass
class _Item:
    """A piece of queued work: ``locking`` for one that may change what it reads."""

    work: Callable[[PostgresTables], Any]
    done: Deferred[Any]
    locking: bool
    prefetch: Prefetch | None = None


_Outcome = tuple[Deferred[Any], bool, Any]


class DatabaseThread:
    """
    One thread that owns one PostgreSQL connection and runs the work queued
    for it, in batches: a batch is one transaction, each piece of work within
    it a savepoint.  Results are handed to the reactor thread after ``COMMIT``.

    :ivar transactions: transactions committed so far.
    :ivar operations: pieces of work committed in them (failed ones included).
    :ivar retries: batches (or operations) run again after a conflict.
    :ivar fallbacks: pipelined batches that failed and were run again the
        plain way (one savepoint per operation).
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], psycopg.Connection[Any]],
        reactor: Any,
        batch_max: int,
        retries: int,
        token: str,
        pipeline: bool = True,
        piggyback: bool = True,
    ) -> None:
        self._connect = connect
        self._pipeline = pipeline
        self._piggyback = pipeline and piggyback
        self._reactor = reactor
        self._batch_max = batch_max
        self._retries = retries
        self._token = token
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ready: Deferred[None] = Deferred()
        self._stopped: Deferred[None] = Deferred()
        self._connection: psycopg.Connection[Any] | None = None
        self._tables: PostgresTables | None = None
        self.transactions = 0
        self.operations = 0
        self.retries = 0
        self.fallbacks = 0
        self._round_trips = 0

    @property
    def round_trips(self) -> int:
        """Times this thread waited for the server (see :attr:`PostgresStore.round_trips`)."""
        tables = self._tables
        return self._round_trips + (tables.round_trips if tables is not None else 0)

    def start(self) -> Deferred[None]:
        """Start the thread; fires once connected and migrated (or fails with why not)."""
        self._thread.start()
        return self._ready

    def submit(
        self,
        work: Callable[[PostgresTables], T],
        locking: bool,
        prefetch: Prefetch | None = None,
    ) -> Deferred[T]:
        """
        Queue ``work``; fires with its result after the transaction that ran it commits.

        :param prefetch: what ``work`` will read, to read ahead for it.
        """
        done: Deferred[T] = Deferred()
        self._queue.put(_Item(work, done, locking, prefetch))
        return done

    def stop(self) -> Deferred[None]:
        """Run what is queued, close the connection; fires when the thread ended."""
        self._queue.put(_STOP)
        return self._stopped

    def _main(self) -> None:
        try:
            self._open()
        except Exception as exc:
            failure = Failure(_as_store_error(exc))
            self._reactor.callFromThread(self._ready.errback, failure)
            self._drain_after_failure(failure)
            return
        self._reactor.callFromThread(self._ready.callback, None)
        stopping = False
        ahead: list[_Item] | None = None
        while ahead is not None or not stopping:
            if ahead is None:
                batch, stopping = self._next_batch()
            else:
                batch, ahead = ahead, None
            if batch and self._piggyback and self._pipelinable(batch):
                ahead, stopping = self._run_stream(batch, stopping)
            elif batch:
                outcomes = self._run_batch(batch)
                self._reactor.callFromThread(_deliver, outcomes)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
        self._reactor.callFromThread(self._finished)

    def _open(self) -> None:
        if self._tables is not None:
            self._round_trips += self._tables.round_trips
        self._connection = None
        self._tables = None
        connection = self._connect()
        self._connection = connection
        self._tables = PostgresTables(connection)

    def _finished(self) -> None:
        self._thread.join()
        self._stopped.callback(None)

    def _drain_after_failure(self, failure: Failure) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._reactor.callFromThread(self._finished)
                return
            self._reactor.callFromThread(item.done.errback, failure)

    def _next_batch(self, block: bool = True) -> tuple[list[_Item], bool]:
        try:
            item = self._queue.get(block)
        except queue.Empty:
            return [], False
        if item is _STOP:
            return [], True
        batch = [item]
        while len(batch) < self._batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _control(self, statement: str) -> None:
        """Send transaction control statements (several, in one round trip)."""
        assert self._connection is not None
        self._round_trips += 1
        self._connection.execute(statement.encode("utf-8"), prepare=False)

    def _pipelinable(self, batch: list[_Item]) -> bool:
        return self._pipeline and any(item.prefetch for item in batch)

    def _run_batch(self, batch: list[_Item], in_pipeline: bool = True) -> list[_Outcome]:
        """
        Run ``batch`` (in pipeline mode if it holds DATA and ``in_pipeline``),
        retrying after conflicts; the outcome of each piece.
        """
        try:
            if self._connection is None or self._connection.closed:
                self._open()
            for _ in range(self._retries + 1):
                try:
                    if in_pipeline and self._pipelinable(batch):
                        pipelined = self._attempt_pipelined(batch)
                        if pipelined is not None:
                            return pipelined
                        self.fallbacks += 1
                    return self._attempt(batch)
                except _Retry:
                    self.retries += 1
            # Still conflicting: one operation per transaction, each retried.
            outcomes: list[_Outcome] = []
            for item in batch:
                outcomes.extend(self._run_alone(item))
            return outcomes
        except Exception as exc:
            # The transaction as a whole failed (the connection broke, the
            # server shut down): its outcome may be unknown; every piece fails.
            log.failure("database transaction failed", Failure(exc))
            if self._connection is not None and not self._connection.closed:
                with contextlib.suppress(Exception):
                    self._control("ROLLBACK")
            failure = Failure(_as_store_error(exc))
            return [(item.done, False, failure) for item in batch]

    def _run_alone(self, item: _Item) -> list[_Outcome]:
        for _ in range(self._retries + 1):
            try:
                return self._attempt([item])
            except _Retry:
                self.retries += 1
        error = StoreError("database conflict: the operation was retried too often")
        return [(item.done, False, Failure(error))]

    def _attempt(self, batch: list[_Item]) -> list[_Outcome]:
        """
        Run ``batch`` in one transaction.

        :raise _Retry: a conflict rolled it back.
        """
        tables = self._tables
        assert tables is not None
        outcomes: list[_Outcome] = []
        appended: set[str] = set()
        control = "BEGIN ISOLATION LEVEL READ COMMITTED; SAVEPOINT work"
        try:
            for index, item in enumerate(batch):
                if index:
                    control = "RELEASE work; SAVEPOINT work"
                self._control(control)
                tables.locking = item.locking
                tables.apps_appended = set()
                try:
                    result = item.work(tables)
                except Exception as exc:
                    if _retryable(exc) or isinstance(exc, _psycopg().OperationalError):
                        raise
                    self._control("ROLLBACK TO work")
                    outcomes.append((item.done, False, Failure(_as_store_error(exc))))
                else:
                    appended |= tables.apps_appended
                    outcomes.append((item.done, True, result))
            self._control("RELEASE work; " + self._notify_statements(appended) + "COMMIT")
        except Exception as exc:
            if _retryable(exc):
                self._control("ROLLBACK")
                raise _Retry() from exc
            raise
        self.transactions += 1
        self.operations += len(batch)
        return outcomes

    def _attempt_pipelined(self, batch: list[_Item]) -> list[_Outcome] | None:
        """
        Run ``batch`` in one transaction in pipeline mode: read ahead what
        its operations declared (one round trip), run them on those rows,
        writing without waiting, and commit (one more round trip).  There
        are no savepoints: if anything fails, the transaction is rolled back
        and ``None`` returned, for the caller to run the batch the plain way,
        where each operation gets its own outcome.

        :raise _Retry: a conflict rolled it back.
        """
        tables, connection = self._tables, self._connection
        assert tables is not None and connection is not None
        outcomes: list[_Outcome] = []
        appended: set[str] = set()
        try:
            with tables.pipelined():
                connection.execute("BEGIN ISOLATION LEVEL READ COMMITTED", prepare=False)
                tables.locking = True
                tables.prefetch([item.prefetch for item in batch if item.prefetch is not None])
                for item in batch:
                    tables.locking = item.locking
                    tables.apps_appended = set()
                    outcomes.append((item.done, True, item.work(tables)))
                    appended |= tables.apps_appended
                tables.flush_writes()
                tables.write_outbox()
                for statement in self._notifications(appended):
                    connection.execute(statement.encode("utf-8"), prepare=False)
                connection.execute("COMMIT", prepare=False)
            # Leaving the pipeline waited for the COMMIT (and raised if it failed).
        except Exception as exc:
            if connection.closed or connection.broken:
                raise
            self._control("ROLLBACK")
            if _retryable(exc):
                raise _Retry() from exc
            return None
        self.transactions += 1
        self.operations += len(batch)
        return outcomes

    def _run_stream(self, batch: list[_Item], stopping: bool) -> tuple[list[_Item] | None, bool]:
        """
        Run ``batch`` and the batches queued behind it in pipeline mode, one
        round trip each: batch N's ``COMMIT`` goes out in the same sync as
        the ``BEGIN`` and read-ahead of batch N+1 (taken from the queue if
        already there).  N+1's locks are taken after N committed (one
        connection, statements run in order).  The outcomes of N are handed
        over once its ``COMMIT`` is confirmed.

        If a sync fails, the ``COMMIT`` sent in it tells whose failure it
        was.  A batch that did not commit is rolled back and run again
        (:meth:`_run_batch`: after a conflict as it would be, else the
        plain way); a batch whose read-ahead was aborted or failed is
        returned, to run from the start.

        :param stopping: the queue's end was seen: take no more from it.
        :return: a batch taken from the queue and not run (or ``None``),
            and whether the queue's end was seen.
        """
        try:
            if self._connection is None or self._connection.closed:
                self._open()
        except Exception:
            self._reactor.callFromThread(_deliver, self._run_batch(batch))
            return None, stopping
        tables, connection = self._tables, self._connection
        assert tables is not None and connection is not None
        current: list[_Item] | None = batch
        following: list[_Item] | None = None
        outcomes: list[_Outcome] = []
        commit: Any = None
        try:
            with tables.pipelined():
                sent = self._send_begin(batch)
                tables.sync()
                sent.synced = True
                while current is not None:
                    tables.take_prefetch(sent)
                    outcomes = []
                    appended: set[str] = set()
                    for item in current:
                        tables.locking = item.locking
                        tables.apps_appended = set()
                        outcomes.append((item.done, True, item.work(tables)))
                        appended |= tables.apps_appended
                    tables.flush_writes()
                    tables.write_outbox()
                    for statement in self._notifications(appended):
                        connection.execute(statement.encode("utf-8"), prepare=False)
                    commit = connection.execute("COMMIT", prepare=False)
                    if not stopping:
                        following, stopping = self._next_batch(block=False)
                    if not following or not self._pipelinable(following):
                        break  # leaving the pipeline syncs
                    sent = self._send_begin(following)
                    tables.sync()
                    sent.synced = True
                    self._committed(current, outcomes)
                    current, following, commit = following, None, None
            if current is not None:
                self._committed(current, outcomes)
            return following or None, stopping
        except Exception as exc:
            if current is not None and commit is not None and commit.statusmessage == "COMMIT":
                # The batch committed: the failure was the next one's read-ahead.
                self._committed(current, outcomes)
                current = None
            if not connection.closed and not connection.broken:
                with contextlib.suppress(Exception):
                    self._control("ROLLBACK")
            if current is not None:
                if connection.closed or connection.broken:
                    # Its outcome is unknown: every piece fails (as in _run_batch).
                    log.failure("database transaction failed", Failure(exc))
                    failure = Failure(_as_store_error(exc))
                    redone = [(item.done, False, failure) for item in current]
                elif _retryable(exc):
                    self.retries += 1
                    redone = self._run_batch(current)
                else:
                    self.fallbacks += 1
                    redone = self._run_batch(current, in_pipeline=False)
                self._reactor.callFromThread(_deliver, redone)
            return following or None, stopping

    def _send_begin(self, batch: list[_Item]) -> _Readahead:
        """In pipeline mode, send ``BEGIN`` and the read-ahead of ``batch``, without waiting."""
        tables, connection = self._tables, self._connection
        assert tables is not None and connection is not None
        connection.execute("BEGIN ISOLATION LEVEL READ COMMITTED", prepare=False)
        tables.locking = True
        return tables.send_prefetch([item.prefetch for item in batch if item.prefetch is not None])

    def _committed(self, batch: list[_Item], outcomes: list[_Outcome]) -> None:
        """``batch`` committed: count it, hand its outcomes over."""
        self.transactions += 1
        self.operations += len(batch)
        self._reactor.callFromThread(_deliver, outcomes)

    def _notify_statements(self, apps: set[str]) -> str:
        """``NOTIFY`` statements naming ``apps`` (delivered at ``COMMIT``), or ``""``."""
        return "".join(f"{statement}; " for statement in self._notifications(apps))

    def _notifications(self, apps: set[str]) -> list[str]:
        """The ``NOTIFY`` statements naming ``apps``, one by one."""
        statements = []
        for chunk in _chunks(sorted(apps)):
            payload = json.dumps({"from": self._token, "apps": chunk}, ensure_ascii=True)
            literal = "'" + payload.replace("'", "''") + "'"
            statements.append(f"NOTIFY {EVENTS_CHANNEL}, {literal}")
        return statements


def _chunks(apps: list[str]) -> Iterator[list[str]]:
    """``apps`` in lists whose JSON fits a NOTIFY payload."""
    chunk: list[str] = []
    size = 0
    for app in apps:
        length = len(json.dumps(app, ensure_ascii=True)) + 2
        if chunk and size + length > _NOTIFY_PAYLOAD_MAX:
            yield chunk
            chunk, size = [], 0
        chunk.append(app)
        size += length
    if chunk:
        yield chunk


def _deliver(outcomes: list[_Outcome]) -> None:
    for done, succeeded, value in outcomes:
        if succeeded:
            done.callback(value)
        else:
            done.errback(value)


class EventNotificationListener:
    """
    A thread with its own connection that ``LISTEN``s to :data:`EVENTS_CHANNEL`
    and hands the applications other processes appended events to, to
    ``deliver`` in the reactor thread.  If the connection breaks, it
    reconnects with backoff and then delivers every application once (the
    notifications sent meanwhile are lost: readers re-poll).

    :ivar reconnects: how many times it connected again after losing the connection.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        reactor: Any,
        deliver: Callable[[frozenset[str]], None],
        token: str,
    ) -> None:
        self._connect = connect
        self._reactor = reactor
        self._deliver = deliver
        self._token = token
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = _pipe()
        self._thread = threading.Thread(target=self._main, name="m2mgw-pg-listen", daemon=True)
        self._stopped: Deferred[None] = Deferred()
        self.listening = threading.Event()
        self.reconnects = 0
        self.connection: psycopg.Connection[Any] | None = None

    def start(self) -> None:
        """Start listening."""
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Stop listening; fires when the thread ended."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            _wake(self._wake_w)
        return self._stopped

    def _main(self) -> None:
        missed = False
        delay = _LISTEN_BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                connection = self._connect()
            except Exception as exc:
                log.warn("cannot listen for events: {error}", error=_first_line(exc))
                missed = True
                self._stopping.wait(delay)
                delay = min(delay * 2, _LISTEN_BACKOFF_MAX)
                continue
            self.connection = connection
            try:
                connection.execute(f"LISTEN {EVENTS_CHANNEL}")
                self.listening.set()
                if missed:
                    self.reconnects += 1
                    rows = connection.execute("SELECT app FROM app_outbox").fetchall()
                    apps = frozenset(row[0] for row in rows)
                    if apps:
                        self._reactor.callFromThread(self._deliver, apps)
                delay = _LISTEN_BACKOFF_FIRST
                self._listen(connection)
            except Exception as exc:
                if not self._stopping.is_set():
                    log.warn("lost the event listening connection: {error}", error=_first_line(exc))
                    missed = True
                    self._stopping.wait(delay)
                    delay = min(delay * 2, _LISTEN_BACKOFF_MAX)
            finally:
                self.listening.clear()
                self.connection = None
                with contextlib.suppress(Exception):
                    connection.close()
        _close_pipe(self._wake_r, self._wake_w)
        self._reactor.callFromThread(self._finished)

    def _listen(self, connection: psycopg.Connection[Any]) -> None:
        while not self._stopping.is_set():
            readable, _, _ = select.select([connection.fileno(), self._wake_r], [], [], 30.0)
            if self._wake_r in readable:
                return
            if not readable:
                connection.execute("SELECT 1")  # notice a dead connection
            for notification in connection.notifies(timeout=0):
                apps = self._parse(notification.payload)
                if apps:
                    self._reactor.callFromThread(self._deliver, apps)

    def _parse(self, payload: str) -> frozenset[str]:
        try:
            document = json.loads(payload)
            if document.get("from") == self._token:
                return frozenset()
            return frozenset(str(app) for app in document.get("apps", ()))
        except (ValueError, AttributeError, TypeError):
            log.warn("ignored a malformed event notification")
            return frozenset()

    def _finished(self) -> None:
        self._thread.join()
        self._stopped.callback(None)


def _pipe() -> tuple[int, int]:
    import os

    return os.pipe()


def _wake(fd: int) -> None:
    import os

    os.write(fd, b"x")


def _close_pipe(*fds: int) -> None:
    import os

    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- the store ---------------------------------------------------------------------


class _Waiters:
    """Deferreds waiting for one outcome that arrives once."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[None]] = []
        self._outcome: Failure | bool | None = False

    def wait(self) -> Deferred[None]:
        """A Deferred that fires with the outcome (at once if it arrived already)."""
        if self._outcome is False:
            waiting: Deferred[None] = Deferred()
            self._waiting.append(waiting)
            return waiting
        return fail(self._outcome) if isinstance(self._outcome, Failure) else succeed(None)

    def fire(self, outcome: Failure | None) -> None:
        """Record the outcome and fire every waiting Deferred with it."""
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if outcome is None:
                d.callback(None)
            else:
                d.errback(outcome)


@implementer(IModuleStore)
class PostgresStore(TransactionalStore):
    """
    An :class:`~m2mgw.interfaces.IModuleStore` in a PostgreSQL database,
    shareable by several gateway processes.

    :param dsn: a libpq connection string or URI.
    :param reactor: the reactor whose thread the Deferreds fire in.
    :param batch_max: the most operations committed in one transaction.
    :param retries: how many times a conflicting batch is run again.
    :param connect_timeout: seconds to wait for the server when connecting.
    :param auto_migrate: :meth:`open` applies pending migrations (else it
        refuses a database that is not at the shipped level).
    :param pipeline: run a batch holding DATA in pipeline mode (see
        :meth:`DatabaseThread._attempt_pipelined`); else every batch the
        plain way, one savepoint and one round trip per statement.
    :param piggyback: in pipeline mode, send a batch's ``COMMIT`` with the
        next queued batch's read-ahead (see :meth:`DatabaseThread._run_stream`).
    """

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        batch_max: int = DEFAULT_BATCH_MAX,
        retries: int = DEFAULT_RETRIES,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        auto_migrate: bool = True,
        pipeline: bool = True,
        piggyback: bool = True,
    ) -> None:
        self.dsn = dsn
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._auto_migrate = auto_migrate
        #: Tells this store's own notifications from other processes'.
        self.token = uuid.uuid4().hex
        self._thread = DatabaseThread(
            "m2mgw-postgres",
            self._connect_and_migrate,
            reactor,
            batch_max,
            retries,
            self.token,
            pipeline,
            piggyback,
        )
        #: What the next :meth:`_commit` will read (set around a call of the base class).
        self._prefetch: Prefetch | None = None
        self._listener: EventNotificationListener | None = None
        self._state = "new"
        self._opened = _Waiters()
        self._closed = _Waiters()

    # -- instrumentation -------------------------------------------------------------

    @property
    def transactions(self) -> int:
        """Transactions committed since the store opened (each may hold many operations)."""
        return self._thread.transactions

    @property
    def operations(self) -> int:
        """Operations run in those transactions."""
        return self._thread.operations

    @property
    def round_trips(self) -> int:
        """
        Times the database thread waited for the server: each statement run
        the plain way (transaction control included), each pipeline sync.
        """
        return self._thread.round_trips

    @property
    def retries(self) -> int:
        """Batches or operations run again after a serialization failure or a deadlock."""
        return self._thread.retries

    @property
    def fallbacks(self) -> int:
        """Pipelined batches that failed and were run again with a savepoint per operation."""
        return self._thread.fallbacks

    # -- connections -----------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """
        A new autocommit connection to the database (blocking: not in the reactor thread).

        :raise m2mgw.errors.StoreError: the server cannot be reached, refuses
            the login, or its database does not use UTF-8.
        """
        module = _psycopg()
        try:
            connection: psycopg.Connection[Any] = module.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name="m2mgw",
                client_encoding="utf8",
            )
        except module.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {_first_line(exc)}") from None
        try:
            row = connection.execute("SHOW server_encoding").fetchone()
            if row is None or str(row[0]).upper() not in ("UTF8", "UTF-8"):
                raise StoreError(
                    f"the PostgreSQL database uses encoding {row and row[0]}, not UTF8"
                )
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect_and_migrate(self) -> psycopg.Connection[Any]:
        connection = self.connect()
        try:
            migrations = shipped_migrations()
            if self._auto_migrate:
                migrate(connection, migrations)
            else:
                level, latest = schema_level(connection), migrations[-1].version
                if level != latest:
                    raise StoreError(
                        f"the database is at schema level {level}, this m2mgw needs {latest}:"
                        " run m2mgw-admin db migrate"
                    )
        except BaseException:
            connection.close()
            raise
        return connection

    def _in_thread(self, task: Callable[[psycopg.Connection[Any]], T]) -> Deferred[T]:
        """Run ``task`` on a new connection in a thread of its own; fire with its result."""
        done: Deferred[T] = Deferred()

        def main() -> None:
            try:
                connection = self.connect()
                try:
                    result = task(connection)
                finally:
                    connection.close()
            except Exception as exc:
                self._reactor.callFromThread(done.errback, Failure(_as_store_error(exc)))
            else:
                self._reactor.callFromThread(done.callback, result)

        threading.Thread(target=main, name="m2mgw-postgres-admin", daemon=True).start()
        return done

    def database_level(self) -> Deferred[int]:
        """The schema level of the database, read without migrating (the store need not be open)."""
        return self._in_thread(schema_level)

    def migrate(self) -> Deferred[int]:
        """Apply the pending migrations (the store need not be open); fire with the level."""
        migrations = shipped_migrations()
        return self._in_thread(lambda connection: migrate(connection, migrations))

    # -- transactions ----------------------------------------------------------------

    def run(self, work: Callable[[PostgresTables], T], locking: bool = True) -> Deferred[T]:
        """
        Run ``work`` on the database thread, in a transaction, in a savepoint
        of its own: for tools and tests that need SQL of their own
        (:meth:`PostgresTables.query`).  It must not block.

        :raise m2mgw.errors.StoreError: the store is not open.
        """
        if self._state != "open":
            return fail(StoreError("the postgres store is not open"))
        return self._thread.submit(work, locking)

    def _commit(self, work: Work[T]) -> Deferred[T]:
        prefetch, self._prefetch = self._prefetch, None
        if self._state != "open":
            return fail(StoreError("the postgres store is not open"))
        return self._thread.submit(work, True, prefetch)

    def accept_hello(self, commit: HelloCommit) -> Deferred[ExchangeResult | None]:
        """
        :meth:`~m2mgw.interfaces.IModuleStore.accept_hello`, telling the
        database thread what it will read (see :class:`Prefetch`).
        """
        effects = commit.effects
        self._prefetch = Prefetch(
            commit.session.sid,
            module_id=commit.session.module_id,
            apps=tuple(sorted({e.app for e in effects.events if e.app is not None})),
            events=_appends_events(effects),
        )
        try:
            return super().accept_hello(commit)
        finally:
            self._prefetch = None

    def accept_data(self, commit: DataCommit) -> Deferred[ExchangeResult | None]:
        """
        :meth:`~m2mgw.interfaces.IModuleStore.accept_data`, telling the
        database thread what it will read (see :class:`Prefetch`).
        """
        effects = commit.effects
        self._prefetch = Prefetch(
            commit.sid,
            commit.tok,
            apps=tuple(sorted({e.app for e in effects.events if e.app is not None})),
            events=_appends_events(effects),
        )
        try:
            return super().accept_data(commit)
        finally:
            self._prefetch = None

    def _read(self, work: Work[T]) -> Deferred[T]:
        return self.run(work, locking=False)

    def open(self) -> Deferred[None]:
        """Connect, create or migrate the schema, start the database thread.  Idempotent."""
        if self._state == "new":
            self._state = "opening"
            self._thread.start().addBoth(self._started)
        elif self._state in ("closing", "closed"):
            return fail(StoreError("the postgres store is closed"))
        return self._opened.wait()

    def _started(self, result: Failure | None) -> None:
        if isinstance(result, Failure):
            self._state = "closed"
            self._thread.stop()
            self._opened.fire(result)
            self._closed.fire(None)
        else:
            self._state = "open"
            if self._event_listeners:
                self._start_listening()
            self._opened.fire(None)

    def close(self) -> Deferred[None]:
        """Commit everything queued, close the connections, end the threads.  Idempotent."""
        if self._state == "new":
            self._state = "closed"
            self._closed.fire(None)
        elif self._state == "open":
            self._state = "closing"
            listener, self._listener = self._listener, None
            stopped = self._thread.stop()
            if listener is not None:
                stopped.addBoth(lambda result: listener.stop().addCallback(lambda _: result))
            stopped.addBoth(self._stopped)
        elif self._state == "opening":
            return self._opened.wait().addBoth(lambda _: self.close())
        return self._closed.wait()

    def _stopped(self, result: Failure | None) -> None:
        self._state = "closed"
        self._closed.fire(result if isinstance(result, Failure) else None)

    def schema_version(self) -> Deferred[int]:
        """The schema level recorded in the database."""
        return self.run(PostgresTables.schema_level, locking=False)

    # -- event notification across processes ----------------------------------------

    def add_event_listener(self, listener: EventListener) -> None:
        """
        Call ``listener`` after this store's commits that appended events and,
        once the store is open, when another process on the same database
        appended some (told by ``NOTIFY``; after a lost listening connection,
        with every application).
        """
        super().add_event_listener(listener)
        if self._state == "open" and self._listener is None:
            self._start_listening()

    def _start_listening(self) -> None:
        self._listener = EventNotificationListener(
            self.connect, self._reactor, self._announce_remote, self.token
        )
        self._listener.start()

    @property
    def event_listener(self) -> EventNotificationListener | None:
        """The listening connection's thread, if started (for tests)."""
        return self._listener

    def _announce_remote(self, apps: frozenset[str]) -> None:
        if self._state == "open":
            self._announce(None, set(apps))


def _appends_events(effects: PayloadEffects) -> bool:
    """Applying ``effects`` probably appends events."""
    return bool(
        effects.events or effects.confirmations or effects.new_key or effects.new_instructions
    )


def _parse_int(options: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    text = options.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"[store.postgres] {name} must be an integer, not {text!r}") from None
    if value < minimum:
        raise ConfigError(f"[store.postgres] {name} must be at least {minimum}, not {value}")
    return value


def _parse_bool(options: Mapping[str, str], name: str, default: bool) -> bool:
    text = options.get(name)
    if text is None:
        return default
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ConfigError(f"[store.postgres] {name} must be yes or no, not {text!r}")


@implementer(IPlugin, IModuleStoreFactory)
class PostgresStoreFactory:
    """
    The ``postgres`` store plugin: a PostgreSQL database several gateway
    nodes share (see :mod:`m2mgw.store.postgres`).
    """

    name = "postgres"
    external_service = "a PostgreSQL server"
    options: Mapping[str, str] = {
        "dsn": "libpq connection string or URI of the database (required)",
        "batch_max": f"most operations in one transaction (default {DEFAULT_BATCH_MAX})",
        "retries": (
            "how many times a batch that hit a deadlock or serialization failure is run again"
            f" (default {DEFAULT_RETRIES})"
        ),
        "connect_timeout": (
            f"seconds to wait for the server when connecting (default {DEFAULT_CONNECT_TIMEOUT})"
        ),
        "auto_migrate": "yes: apply pending schema migrations when opening (default yes)",
        "pipeline": (
            "yes: run batches of DATA in pipeline mode, reading ahead what they need (default yes)"
        ),
    }

    def create(self, options: Mapping[str, str], data_dir: str, reactor: Any) -> PostgresStore:
        """
        An unopened :class:`PostgresStore` configured by ``options``.

        :raise m2mgw.errors.ConfigError: a value is unusable, or psycopg is missing.
        """
        dsn = options.get("dsn", "").strip()
        if not dsn:
            raise ConfigError("[store.postgres] dsn is required (e.g. postgresql:///m2mgw)")
        module = _psycopg()
        try:
            module.conninfo.conninfo_to_dict(dsn)
        except module.ProgrammingError as exc:
            raise ConfigError(f"[store.postgres] dsn is malformed: {_first_line(exc)}") from None
        return PostgresStore(
            dsn,
            reactor,
            batch_max=_parse_int(options, "batch_max", DEFAULT_BATCH_MAX, 1),
            retries=_parse_int(options, "retries", DEFAULT_RETRIES, 0),
            connect_timeout=_parse_int(options, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, 1),
            auto_migrate=_parse_bool(options, "auto_migrate", True),
            pipeline=_parse_bool(options, "pipeline", True),
        )
