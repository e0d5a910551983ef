"""
The SQLite store: the embedded default module database.

One file in WAL mode, opened by the gateway and, at the same time, by the
operator's ``m2mgw-admin`` (``busy_timeout`` makes each wait for the other's
write lock).  No database call runs on the reactor thread: one writer thread
owns one connection and drains a queue of operations, running as many as are
queued (up to ``group_commit_max``) in ONE transaction -- group commit, so that
durability does not cost one ``fsync`` per datagram.  Each operation runs
inside its own ``SAVEPOINT``: one that fails rolls back alone and fails only
its own Deferred.  Every Deferred of a batch fires, in the reactor thread,
after the ``COMMIT`` (so a reply built from it never gets ahead of the disk).

Reads go through the same queue and thread.  A second thread with a
read-only connection was measured against it (``get_session`` +
``accept_data`` per datagram, 1 and 50 concurrent callers, median of six
runs): it was no faster (-3 %), so the simpler design stays, which also runs
every caller's operations in the order they were issued.

The schema comes from the numbered ``migrations/NNNN_name.sql`` files shipped
with the package, applied in order, each in one transaction that also sets
``PRAGMA user_version``.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.resources
import json
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.errors import (
    ConfigError,
    DuplicateModule,
    KeyConflict,
    M2MGWError,
    StoreError,
)
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
    ServerKeyStatus,
    Session,
)
from m2mgw.store import logic
from m2mgw.store.base import TransactionalStore, Work
from m2mgw.store.tables import HeldEvent, Tables

T = TypeVar("T")

log = Logger()

#: The database file's name in the data directory unless ``path`` says otherwise.
DEFAULT_FILE_NAME = "m2mgw.sqlite"
#: Durable before the reply leaves, even across a power cut (see :class:`SQLiteStoreFactory`).
DEFAULT_SYNCHRONOUS = "full"
DEFAULT_BUSY_TIMEOUT_MS = 5000
DEFAULT_GROUP_COMMIT_MAX = 256

_MIGRATION_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


# -- schema migrations -------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered schema change: ``NNNN_name.sql``, bringing the schema to ``version``."""

    version: int
    name: str
    sql: str


def shipped_migrations() -> list[Migration]:
    """
    The migrations shipped in ``m2mgw/store/migrations/``, in order.

    :raise m2mgw.errors.StoreError: their numbers are not 1, 2, 3, ...
    """
    folder = importlib.resources.files("m2mgw.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match is not None:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    if [migration.version for migration in found] != list(range(1, len(found) + 1)):
        raise StoreError("the shipped schema migrations are not numbered 1, 2, 3, ...")
    return found


def split_statements(sql: str) -> Iterator[str]:
    """The SQL statements of a migration script, one at a time (comments kept)."""
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise StoreError("a migration ends with an incomplete statement")


def schema_level(connection: sqlite3.Connection) -> int:
    """The migration level recorded in the database (``PRAGMA user_version``)."""
    level: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return level


def migrate(connection: sqlite3.Connection, migrations: Sequence[Migration]) -> int:
    """
    Bring the schema up to the last of ``migrations``.

    Each migration runs in its own ``BEGIN IMMEDIATE`` transaction, which
    re-reads the level first: two processes opening a new file at once apply
    each migration once.  A migration that fails leaves the level it started from.

    :param connection: a connection in autocommit mode (``isolation_level=None``).
    :return: the schema level reached.
    :raise m2mgw.errors.StoreError: a migration failed, or the database is at a
        level newer than the newest migration known here.
    """
    latest = migrations[-1].version if migrations else 0
    level = schema_level(connection)
    if level > latest:
        raise StoreError(
            f"the database is at schema level {level}, newer than this m2mgw knows ({latest})"
        )
    for migration in migrations:
        if migration.version <= level:
            continue
        try:
            connection.execute("BEGIN IMMEDIATE")
            level = schema_level(connection)
            if level < migration.version:
                for statement in split_statements(migration.sql):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {int(migration.version)}")
                level = migration.version
            connection.execute("COMMIT")
        except (sqlite3.Error, StoreError) as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise StoreError(
                f"schema migration {migration.version:04d}_{migration.name} failed: {exc}"
            ) from exc
    return level


# -- rows --------------------------------------------------------------------------
#
# Every statement is a literal: the column lists are spelt out where they are
# used, in the order of the row converters below.


def _values(record: Any) -> list[Any]:
    """
    A record's fields in declaration order (a dataclass sets its attributes in
    that order), enumerations by their values: the row of its table.
    """
    return [v.value if isinstance(v, enum.Enum) else v for v in vars(record).values()]


def _module(row: Sequence[Any]) -> Module:
    values = list(row)
    values[1], values[3] = ModuleStatus(values[1]), bool(values[3])
    return Module(*values)


def _key(row: Sequence[Any]) -> ModuleKey:
    values = list(row)
    values[4] = KeyStatus(values[4])
    return ModuleKey(*values)


def _server_key(row: Sequence[Any]) -> ServerKey:
    values = list(row)
    values[4] = ServerKeyStatus(values[4])
    return ServerKey(*values)


def _session_row(session: Session) -> list[Any]:
    values = _values(session)
    values[10] = logic.window_to_bytes(session.window)
    return values


def _session(row: Sequence[Any]) -> Session:
    values = list(row)
    values[10] = logic.window_from_bytes(values[10])
    return Session(*values)


def _instruction(row: Sequence[Any]) -> Instruction:
    values = list(row)
    values[5] = InstructionState(values[5])
    return Instruction(*values)


def _event(row: Sequence[Any]) -> Event:
    return Event(row[0], row[1], row[2], row[3], logic.decode_payload(row[4]), row[5])


def _is_unique_violation(exc: sqlite3.IntegrityError) -> bool:
    return "UNIQUE constraint failed" in str(exc)


_SELECT_MODULE = """
    SELECT module_id, status, psk, psk_reusable, module_group, last_hello_ts, created_at
    FROM modules"""
_SELECT_KEY = """
    SELECT module_id, kid, suite, public, status, vouched_by, created_at, activated_at,
        retired_at, not_after, pid
    FROM module_keys"""
_SELECT_SERVER_KEY = """
    SELECT skid, suite, public, sig_public, status, created_at, retire_after FROM server_keys"""
_SELECT_SESSION = """
    SELECT sid, module_id, kid, suite, skid, k_up, k_down, created_at, expires_at, highest_ctr,
        window
    FROM sessions"""
_SELECT_INSTRUCTION = """
    SELECT module_id, iid, kind, body, wire_size, state, not_after, attempts, source,
        idempotency_key, created_at, updated_at, exec_ts, status, result
    FROM instructions"""


class SQLiteTables(Tables):
    """:class:`~m2mgw.store.tables.Tables` over one SQLite connection, inside its transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    def schema_level(self) -> int:
        """The schema migration level of the database."""
        return schema_level(self._db)

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL statement of a tool's or a test's own; return its rows."""
        return self._all(sql, parameters)

    def _one(self, sql: str, parameters: Sequence[Any]) -> Any:
        return self._db.execute(sql, parameters).fetchone()

    def _all(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        return self._db.execute(sql, parameters).fetchall()

    def _run(self, sql: str, parameters: Sequence[Any]) -> int:
        return self._db.execute(sql, parameters).rowcount

    # -- modules -------------------------------------------------------------------

    def get_module(self, module_id: str) -> Module | None:
        row = self._one(_SELECT_MODULE + " WHERE module_id = ?", (module_id,))
        return None if row is None else _module(row)

    def insert_modules(self, modules: Sequence[Module]) -> None:
        for module in modules:
            try:
                self._run(
                    """
                    INSERT INTO modules (module_id, status, psk, psk_reusable, module_group,
                        last_hello_ts, created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?)
                    """,
                    _values(module),
                )
            except sqlite3.IntegrityError as exc:
                if _is_unique_violation(exc):
                    raise DuplicateModule(module.module_id) from None
                raise

    def update_module(self, module: Module) -> None:
        self._run(
            """
            UPDATE modules SET status = ?, psk = ?, psk_reusable = ?, module_group = ?,
                last_hello_ts = ?, created_at = ?
            WHERE module_id = ?
            """,
            (*_values(module)[1:], module.module_id),
        )

    def list_modules(self, offset: int, limit: int) -> list[Module]:
        rows = self._all(_SELECT_MODULE + " ORDER BY module_id LIMIT ? OFFSET ?", (limit, offset))
        return [_module(row) for row in rows]

    def count_modules(self) -> int:
        count: int = self._one("SELECT count(*) FROM modules", ())[0]
        return count

    def allocate_iid(self, module_id: str) -> int:
        iid: int = self._one("SELECT last_iid FROM modules WHERE module_id = ?", (module_id,))[0]
        self._run("UPDATE modules SET last_iid = ? WHERE module_id = ?", (iid + 1, module_id))
        return iid + 1

    # -- module keys ---------------------------------------------------------------

    def get_key(self, module_id: str, kid: int) -> ModuleKey | None:
        row = self._one(_SELECT_KEY + " WHERE module_id = ? AND kid = ?", (module_id, kid))
        return None if row is None else _key(row)

    def list_keys(self, module_id: str) -> list[ModuleKey]:
        rows = self._all(_SELECT_KEY + " WHERE module_id = ? ORDER BY kid", (module_id,))
        return [_key(row) for row in rows]

    def insert_keys(self, keys: Sequence[ModuleKey]) -> None:
        for key in keys:
            try:
                self._run(
                    """
                    INSERT INTO module_keys (module_id, kid, suite, public, status, vouched_by,
                        created_at, activated_at, retired_at, not_after, pid)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                    _values(key),
                )
            except sqlite3.IntegrityError as exc:
                if _is_unique_violation(exc):
                    raise KeyConflict(f"{key.module_id} kid {key.kid}") from None
                raise

    def update_key(self, key: ModuleKey) -> None:
        self._run(
            """
            UPDATE module_keys SET suite = ?, public = ?, status = ?, vouched_by = ?,
                created_at = ?, activated_at = ?, retired_at = ?, not_after = ?, pid = ?
            WHERE module_id = ? AND kid = ?
            """,
            (*_values(key)[2:], key.module_id, key.kid),
        )

    def expiring_keys(self, now: int) -> list[ModuleKey]:
        rows = self._all(
            _SELECT_KEY
            + """
            WHERE status IN ('active', 'pending') AND not_after IS NOT NULL AND not_after < ?
            ORDER BY module_id, kid
            """,
            (now,),
        )
        return [_key(row) for row in rows]

    def keys_due_for_rotation(self, query: RotationQuery, limit: int) -> list[ModuleKey]:
        if query.groups is not None and not query.groups:
            return []
        named = self._db.execute(
            """
            SELECT k.module_id, k.kid, k.suite, k.public, k.status, k.vouched_by, k.created_at,
                k.activated_at, k.retired_at, k.not_after, k.pid
            FROM module_keys AS k JOIN modules AS m ON m.module_id = k.module_id
            WHERE k.status = 'active' AND k.module_id > :after AND m.status = 'enabled'
                AND ((:activated IS NOT NULL
                        AND COALESCE(k.activated_at, k.created_at) <= :activated)
                    OR (:expiring IS NOT NULL AND k.not_after IS NOT NULL
                        AND k.not_after <= :expiring)
                    OR k.suite IN (SELECT value FROM json_each(:suites)))
                AND (:groups IS NULL OR m.module_group IN (SELECT value FROM json_each(:groups)))
                AND m.module_group NOT IN (SELECT value FROM json_each(:excluded))
                AND NOT EXISTS (SELECT 1 FROM module_keys AS o WHERE o.module_id = k.module_id
                    AND (o.status = 'pending' OR (o.status = 'active' AND o.kid > k.kid)))
                AND NOT EXISTS (SELECT 1 FROM instructions AS i WHERE i.module_id = k.module_id
                    AND i.kind = 'keygen' AND i.state IN ('queued', 'waiting', 'sent'))
            ORDER BY k.module_id LIMIT :limit
            """,
            {
                "after": query.after_module,
                "activated": query.activated_before,
                "expiring": query.expiring_before,
                "suites": json.dumps(list(query.suites)),
                "groups": None if query.groups is None else json.dumps(list(query.groups)),
                "excluded": json.dumps(list(query.exclude_groups)),
                "limit": limit,
            },
        )
        return [_key(row) for row in named.fetchall()]

    # -- server keys ---------------------------------------------------------------

    def get_server_key(self, skid: int) -> ServerKey | None:
        row = self._one(_SELECT_SERVER_KEY + " WHERE skid = ?", (skid,))
        return None if row is None else _server_key(row)

    def insert_server_key(self, key: ServerKey) -> None:
        self._run(
            """
            INSERT INTO server_keys (skid, suite, public, sig_public, status, created_at,
                retire_after)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            """,
            _values(key),
        )

    def update_server_key(self, key: ServerKey) -> None:
        self._run(
            """
            UPDATE server_keys SET suite = ?, public = ?, sig_public = ?, status = ?,
                created_at = ?, retire_after = ?
            WHERE skid = ?
            """,
            (*_values(key)[1:], key.skid),
        )

    def list_server_keys(self) -> list[ServerKey]:
        rows = self._all(_SELECT_SERVER_KEY + " ORDER BY skid", ())
        return [_server_key(row) for row in rows]

    # -- sessions ------------------------------------------------------------------

    def get_session(self, sid: bytes) -> Session | None:
        row = self._one(_SELECT_SESSION + " WHERE sid = ?", (sid,))
        return None if row is None else _session(row)

    def get_module_session(self, module_id: str) -> Session | None:
        row = self._one(_SELECT_SESSION + " WHERE module_id = ?", (module_id,))
        return None if row is None else _session(row)

    def insert_session(self, session: Session) -> None:
        self._run(
            """
            INSERT INTO sessions (sid, module_id, kid, suite, skid, k_up, k_down, created_at,
                expires_at, highest_ctr, window)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            _session_row(session),
        )

    def delete_session(self, sid: bytes) -> None:
        self._run("DELETE FROM sessions WHERE sid = ?", (sid,))

    def delete_sessions(self, module_id: str, kid: int | None = None) -> None:
        if kid is None:
            self._run("DELETE FROM sessions WHERE module_id = ?", (module_id,))
        else:
            self._run("DELETE FROM sessions WHERE module_id = ? AND kid = ?", (module_id, kid))

    def set_session_window(self, sid: bytes, highest: int, bits: int) -> None:
        self._run(
            "UPDATE sessions SET highest_ctr = ?, window = ? WHERE sid = ?",
            (highest, logic.window_to_bytes(bits), sid),
        )

    def delete_expired_sessions(self, now: int) -> int:
        return self._run("DELETE FROM sessions WHERE expires_at <= ?", (now,))

    # -- aliases -------------------------------------------------------------------

    def get_alias(self, alias: bytes) -> tuple[str, int | None] | None:
        row = self._one("SELECT module_id, expires_at FROM aliases WHERE alias = ?", (alias,))
        return None if row is None else (row[0], row[1])

    def replace_alias(self, module_id: str, alias: bytes, expires_at: int | None) -> None:
        self._run("DELETE FROM aliases WHERE module_id = ? OR alias = ?", (module_id, alias))
        self._run(
            "INSERT INTO aliases (alias, module_id, expires_at) VALUES (?, ?, ?)",
            (alias, module_id, expires_at),
        )

    def delete_alias(self, alias: bytes) -> None:
        self._run("DELETE FROM aliases WHERE alias = ?", (alias,))

    def delete_expired_aliases(self, now: int) -> int:
        return self._run(
            "DELETE FROM aliases WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        )

    # -- DATA tokens ---------------------------------------------------------------

    def find_token(self, module_id: str, tok: bytes) -> bytes | None:
        row = self._one(
            "SELECT outcome FROM data_tokens WHERE module_id = ? AND tok = ?", (module_id, tok)
        )
        return None if row is None else bytes(row[0])

    def remember_token(self, module_id: str, tok: bytes, outcome: bytes, keep: int) -> None:
        self._run(
            "UPDATE modules SET tokens_seen = tokens_seen + 1 WHERE module_id = ?", (module_id,)
        )
        self._run(
            """
            INSERT OR REPLACE INTO data_tokens (module_id, slot, tok, outcome)
            SELECT module_id, (tokens_seen - 1) % ?, ?, ? FROM modules WHERE module_id = ?
            """,
            (keep, tok, outcome, module_id),
        )

    # -- instructions --------------------------------------------------------------

    def get_instruction(self, module_id: str, iid: int) -> Instruction | None:
        row = self._one(_SELECT_INSTRUCTION + " WHERE module_id = ? AND iid = ?", (module_id, iid))
        return None if row is None else _instruction(row)

    def insert_instruction(self, instruction: Instruction) -> None:
        self._run(
            """
            INSERT INTO instructions (module_id, iid, kind, body, wire_size, state, not_after,
                attempts, source, idempotency_key, created_at, updated_at, exec_ts, status, result)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            _values(instruction),
        )

    def update_instruction(self, instruction: Instruction) -> None:
        self._run(
            """
            UPDATE instructions SET kind = ?, body = ?, wire_size = ?, state = ?, not_after = ?,
                attempts = ?, source = ?, idempotency_key = ?, created_at = ?, updated_at = ?,
                exec_ts = ?, status = ?, result = ?
            WHERE module_id = ? AND iid = ?
            """,
            (*_values(instruction)[2:], instruction.module_id, instruction.iid),
        )

    def find_idempotent(self, module_id: str, source: str, key: str) -> Instruction | None:
        row = self._one(
            _SELECT_INSTRUCTION + " WHERE module_id = ? AND source = ? AND idempotency_key = ?",
            (module_id, source, key),
        )
        return None if row is None else _instruction(row)

    def count_instructions_by_key(self, source: str, key: str) -> dict[InstructionState, int]:
        rows = self._all(
            """
            SELECT state, count(*) FROM instructions
            WHERE source = ? AND idempotency_key = ? GROUP BY state
            """,
            (source, key),
        )
        return {InstructionState(state): count for state, count in rows}

    def pending_instructions(self, module_id: str, after_iid: int, limit: int) -> list[Instruction]:
        rows = self._all(
            _SELECT_INSTRUCTION
            + """
            WHERE module_id = ? AND iid > ? AND state IN ('queued', 'waiting', 'sent')
            ORDER BY iid LIMIT ?
            """,
            (module_id, after_iid, limit),
        )
        return [_instruction(row) for row in rows]

    def list_instructions(
        self, module_id: str | None, states: Sequence[InstructionState], limit: int
    ) -> list[Instruction]:
        # The wanted states travel as one parameter, ",queued,sent," (empty: all).
        wanted = "".join(f",{state.value}" for state in states) + "," if states else ""
        if module_id is not None:
            rows = self._all(
                _SELECT_INSTRUCTION
                + """
                WHERE module_id = ? AND (? = '' OR instr(?, ',' || state || ',') > 0)
                ORDER BY iid LIMIT ?
                """,
                (module_id, wanted, wanted, limit),
            )
        else:
            rows = self._all(
                _SELECT_INSTRUCTION
                + """
                WHERE ? = '' OR instr(?, ',' || state || ',') > 0
                ORDER BY created_at, module_id, iid LIMIT ?
                """,
                (wanted, wanted, limit),
            )
        return [_instruction(row) for row in rows]

    def expiring_instructions(self, now: int) -> list[Instruction]:
        rows = self._all(
            _SELECT_INSTRUCTION
            + """
            WHERE state IN ('queued', 'waiting', 'sent') AND not_after IS NOT NULL AND not_after < ?
            ORDER BY module_id, iid
            """,
            (now,),
        )
        return [_instruction(row) for row in rows]

    # -- applications and the outbox -----------------------------------------------

    def get_module_apps(self, module_id: str) -> list[str]:
        rows = self._all(
            "SELECT app FROM module_apps WHERE module_id = ? ORDER BY app", (module_id,)
        )
        return [row[0] for row in rows]

    def set_module_apps(self, module_id: str, apps: Sequence[str]) -> None:
        self._run("DELETE FROM module_apps WHERE module_id = ?", (module_id,))
        self._db.executemany(
            "INSERT INTO module_apps (module_id, app) VALUES (?, ?)",
            [(module_id, app) for app in apps],
        )

    def list_app_modules(self, app: str, offset: int, limit: int) -> list[Module]:
        rows = self._all(
            """
            SELECT module_id, status, psk, psk_reusable, module_group, last_hello_ts, created_at
            FROM modules WHERE module_id IN (
                SELECT module_id FROM module_apps WHERE app = ?
                ORDER BY module_id LIMIT ? OFFSET ?
            ) ORDER BY module_id
            """,
            (app, limit, offset),
        )
        return [_module(row) for row in rows]

    def outbox_apps(self) -> list[str]:
        return [row[0] for row in self._all("SELECT app FROM app_outbox ORDER BY app", ())]

    def last_event_seq_before(self, app: str, created_before: int) -> int:
        row = self._one(
            "SELECT MAX(seq) FROM events WHERE app = ? AND created_at < ?", (app, created_before)
        )
        return 0 if row is None or row[0] is None else int(row[0])

    def next_event_seq(self, app: str) -> int:
        self._run(
            """
            INSERT INTO app_outbox (app, last_seq, acked_seq) VALUES (?, 1, 0)
            ON CONFLICT (app) DO UPDATE SET last_seq = last_seq + 1
            """,
            (app,),
        )
        seq: int = self._one("SELECT last_seq FROM app_outbox WHERE app = ?", (app,))[0]
        return seq

    def insert_event(self, event: Event, payload_text: str) -> None:
        self._run(
            """
            INSERT INTO events (app, seq, kind, module_id, payload, created_at)
            VALUES (?, ?, ?, ?, ?, ?)
            """,
            (event.app, event.seq, event.kind, event.module_id, payload_text, event.created_at),
        )

    def hold_event(
        self, module_id: str, kind: str, app: str | None, payload_text: str, created_at: int
    ) -> None:
        self._run(
            """
            INSERT INTO held_events (module_id, kind, app, payload, created_at)
            VALUES (?, ?, ?, ?, ?)
            """,
            (module_id, kind, app, payload_text, created_at),
        )

    def held_events(self, module_id: str) -> list[HeldEvent]:
        rows = self._all(
            "SELECT kind, app, payload FROM held_events WHERE module_id = ? ORDER BY held_id",
            (module_id,),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def delete_held_events(self, module_id: str) -> None:
        self._run("DELETE FROM held_events WHERE module_id = ?", (module_id,))

    def events_after(self, app: str, seq: int, limit: int) -> list[Event]:
        rows = self._all(
            """
            SELECT app, seq, kind, module_id, payload, created_at FROM events
            WHERE app = ? AND seq > ? ORDER BY seq LIMIT ?
            """,
            (app, seq, limit),
        )
        return [_event(row) for row in rows]

    def outbox_position(self, app: str) -> tuple[int, int]:
        row = self._one("SELECT acked_seq, last_seq FROM app_outbox WHERE app = ?", (app,))
        return (0, 0) if row is None else (row[0], row[1])

    def acknowledge(self, app: str, seq: int) -> None:
        self._run("UPDATE app_outbox SET acked_seq = ? WHERE app = ?", (seq, app))
        self._run("DELETE FROM events WHERE app = ? AND seq <= ?", (app, seq))

    # -- reports and security events -----------------------------------------------

    def insert_report(self, report: Report) -> None:
        self._run(
            "INSERT INTO reports (module_id, received_at, module_ts, data) VALUES (?, ?, ?, ?)",
            (report.module_id, report.received_at, report.module_ts, report.data),
        )

    def list_reports(self, module_id: str, limit: int) -> list[Report]:
        rows = self._all(
            """
            SELECT module_id, received_at, data, module_ts FROM reports WHERE module_id = ?
            ORDER BY received_at DESC, report_id DESC LIMIT ?
            """,
            (module_id, limit),
        )
        return [Report(row[0], row[1], row[2], row[3]) for row in rows]

    def insert_security_events(self, events: Sequence[SecurityEvent]) -> None:
        self._db.executemany(
            """
            INSERT INTO security_events (at, category, reason, source, claimed_id, detail)
            VALUES (?, ?, ?, ?, ?, ?)
            """,
            [(e.at, e.category, e.reason, e.source, e.claimed_id, e.detail) for e in events],
        )

    def list_security_events(self, since: int, limit: int) -> list[SecurityEvent]:
        rows = self._all(
            """
            SELECT at, category, reason, source, claimed_id, detail FROM security_events
            WHERE at >= ? ORDER BY at, event_id LIMIT ?
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
                SELECT report_id FROM reports WHERE received_at < ? ORDER BY report_id LIMIT ?
            )
            """,
            (before, limit),
        )

    def delete_security_events_before(self, before: int, limit: int) -> int:
        return self._run(
            """
            DELETE FROM security_events WHERE event_id IN (
                SELECT event_id FROM security_events WHERE at < ? ORDER BY at, event_id LIMIT ?
            )
            """,
            (before, limit),
        )

    def delete_finished_instructions_before(self, before: int, limit: int) -> int:
        return self._run(
            """
            DELETE FROM instructions WHERE rowid IN (
                SELECT rowid FROM instructions
                WHERE state IN ('confirmed', 'failed', 'expired', 'cancelled')
                    AND updated_at < ?
                ORDER BY updated_at LIMIT ?
            )
            """,
            (before, limit),
        )


# -- the database thread -----------------------------------------------------------

_STOP = object()


def _as_store_error(exc: Exception) -> Exception:
    """The exception a caller sees: m2mgw's own ones pass, sqlite's become StoreError."""
    if isinstance(exc, M2MGWError):
        return exc
    if isinstance(exc, sqlite3.Error | OSError | OverflowError):
        error = StoreError(f"database error: {exc}")
        error.__cause__ = exc
        return error
    return exc


_Outcome = tuple[Deferred[Any], bool, Any]


class DatabaseThread:
    """
    One thread that owns one SQLite connection and runs the work queued for
    it, in batches: a batch is one transaction, each piece of work within it
    a savepoint.  Results are handed to the reactor thread after ``COMMIT``.

    :ivar transactions: transactions committed so far.
    :ivar operations: pieces of work run in them (failed ones included).
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        reactor: Any,
        batch_max: int,
    ) -> None:
        self._connect = connect
        self._reactor = reactor
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ready: Deferred[None] = Deferred()
        self._stopped: Deferred[None] = Deferred()
        self.transactions = 0
        self.operations = 0

    def start(self) -> Deferred[None]:
        """Start the thread; fires once the connection is open (or fails with why not)."""
        self._thread.start()
        return self._ready

    def submit(self, work: Callable[[SQLiteTables], T]) -> Deferred[T]:
        """Queue ``work``; fires with its result after the transaction that ran it commits."""
        done: Deferred[T] = Deferred()
        self._queue.put((work, done))
        return done

    def stop(self) -> Deferred[None]:
        """Run what is queued, checkpoint, close the connection; fires when the thread ended."""
        self._queue.put(_STOP)
        return self._stopped

    def _main(self) -> None:
        try:
            connection = self._connect()
        except Exception as exc:
            failure = Failure(_as_store_error(exc))
            self._reactor.callFromThread(self._ready.errback, failure)
            self._drain_after_failure(failure)
            return
        self._reactor.callFromThread(self._ready.callback, None)
        tables = SQLiteTables(connection)
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch()
            if batch:
                outcomes = self._run_batch(connection, tables, batch)
                self._reactor.callFromThread(_deliver, outcomes)
        with contextlib.suppress(sqlite3.Error):
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        self._reactor.callFromThread(self._finished)

    def _finished(self) -> None:
        self._thread.join()
        self._stopped.callback(None)

    def _drain_after_failure(self, failure: Failure) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._reactor.callFromThread(self._finished)
                return
            self._reactor.callFromThread(item[1].errback, failure)

    def _next_batch(self) -> tuple[list[Any], bool]:
        item = self._queue.get()
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

    def _run_batch(
        self, connection: sqlite3.Connection, tables: SQLiteTables, batch: list[Any]
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        try:
            # IMMEDIATE: take the write lock at once, so that no statement
            # of the batch can fail for want of it halfway through.
            connection.execute("BEGIN IMMEDIATE")
            for work, done in batch:
                connection.execute("SAVEPOINT work")
                try:
                    result = work(tables)
                except Exception as exc:
                    connection.execute("ROLLBACK TO work")
                    connection.execute("RELEASE work")
                    outcomes.append((done, False, Failure(_as_store_error(exc))))
                else:
                    connection.execute("RELEASE work")
                    outcomes.append((done, True, result))
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            # The transaction as a whole failed (busy beyond the timeout, disk
            # full or I/O error): nothing of it is kept, so every piece fails.
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            log.failure("database transaction failed", Failure(exc))
            failure = Failure(_as_store_error(exc))
            return [(done, False, failure) for _, done in batch]
        self.transactions += 1
        self.operations += len(batch)
        return outcomes


def _deliver(outcomes: list[_Outcome]) -> None:
    for done, succeeded, value in outcomes:
        if succeeded:
            done.callback(value)
        else:
            done.errback(value)


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
class SQLiteStore(TransactionalStore):
    """
    An :class:`~m2mgw.interfaces.IModuleStore` in one SQLite file.

    :param path: the database file (created with mode 0600, with its directory).
    :param reactor: the reactor whose thread the Deferreds fire in.
    :param synchronous: ``"full"`` or ``"normal"`` (SQLite's ``PRAGMA synchronous``).
    :param busy_timeout_ms: how long to wait for another process's write lock.
    :param group_commit_max: the most operations committed in one transaction.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str,
        reactor: Any,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        group_commit_max: int = DEFAULT_GROUP_COMMIT_MAX,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._thread = DatabaseThread(
            f"m2mgw-sqlite {os.path.basename(path)}", self._connect, reactor, group_commit_max
        )
        self._state = "new"
        self._opened = _Waiters()
        self._closed = _Waiters()

    @property
    def transactions(self) -> int:
        """Write transactions committed since the store opened (each may hold many operations)."""
        return self._thread.transactions

    @property
    def operations(self) -> int:
        """Operations run in those transactions."""
        return self._thread.operations

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        # Create the file private: it holds PSKs and session keys (the WAL and
        # shared-memory files take the database file's permissions).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            cached_statements=256,
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use write-ahead logging (mode {mode})")
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            connection.execute("PRAGMA foreign_keys = ON")
            migrate(connection, shipped_migrations())
        except BaseException:
            connection.close()
            raise
        return connection

    def run(self, work: Callable[[SQLiteTables], T]) -> Deferred[T]:
        """
        Run ``work`` on the database thread, in a transaction, in a savepoint
        of its own: for tools and tests that need SQL of their own
        (:meth:`SQLiteTables.query`).  It must not block.

        :raise m2mgw.errors.StoreError: the store is not open.
        """
        if self._state != "open":
            return fail(StoreError(f"the store {self.path} is not open"))
        return self._thread.submit(work)

    def _commit(self, work: Work[T]) -> Deferred[T]:
        return self.run(work)

    def _read(self, work: Work[T]) -> Deferred[T]:
        return self.run(work)

    def open(self) -> Deferred[None]:
        """Start the database thread, create or migrate the schema.  Idempotent."""
        if self._state == "new":
            self._state = "opening"
            self._thread.start().addBoth(self._started)
        elif self._state in ("closing", "closed"):
            return fail(StoreError(f"the store {self.path} is closed"))
        return self._opened.wait()

    def _started(self, result: Failure | None) -> None:
        if isinstance(result, Failure):
            self._state = "closed"
            self._thread.stop()
            self._opened.fire(result)
            self._closed.fire(None)
        else:
            self._state = "open"
            self._opened.fire(None)

    def close(self) -> Deferred[None]:
        """Commit everything queued, checkpoint, close the file, end the thread.  Idempotent."""
        if self._state == "new":
            self._state = "closed"
            self._closed.fire(None)
        elif self._state == "open":
            self._state = "closing"
            self._thread.stop().addBoth(self._stopped)
        elif self._state == "opening":
            return self._opened.wait().addBoth(lambda _: self.close())
        return self._closed.wait()

    def _stopped(self, result: Failure | None) -> None:
        self._state = "closed"
        self._closed.fire(result if isinstance(result, Failure) else None)

    def schema_version(self) -> Deferred[int]:
        """The schema level (``PRAGMA user_version``)."""
        return self.run(SQLiteTables.schema_level)


def _parse_int(options: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    text = options.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"[store.sqlite] {name} must be an integer, not {text!r}") from None
    if value < minimum:
        raise ConfigError(f"[store.sqlite] {name} must be at least {minimum}, not {value}")
    return value


@implementer(IPlugin, IModuleStoreFactory)
class SQLiteStoreFactory:
    """
    The ``sqlite`` store plugin.

    ``synchronous`` defaults to ``full``: in WAL mode, ``normal`` is safe
    against a crash of the process but may lose the last commits on a power
    cut, and a lost replay window lets a restarted gateway accept a DATA
    counter again and encrypt a second reply under the same ``k_down`` and
    nonce.  Group commit makes ``full`` affordable (one ``fsync`` per batch).
    """

    name = "sqlite"
    external_service = None
    options: Mapping[str, str] = {
        "path": f"database file, relative to the data directory (default {DEFAULT_FILE_NAME})",
        "synchronous": (
            f"full or normal: durability across power cuts (default {DEFAULT_SYNCHRONOUS})"
        ),
        "busy_timeout_ms": (
            f"how long to wait for another process's write lock (default {DEFAULT_BUSY_TIMEOUT_MS})"
        ),
        "group_commit_max": (
            f"most operations in one transaction (default {DEFAULT_GROUP_COMMIT_MAX})"
        ),
    }

    def create(self, options: Mapping[str, str], data_dir: str, reactor: Any) -> SQLiteStore:
        """
        An unopened :class:`SQLiteStore` configured by ``options``.

        :raise m2mgw.errors.ConfigError: a value is unusable.
        """
        synchronous = options.get("synchronous", DEFAULT_SYNCHRONOUS).strip().lower()
        if synchronous not in ("full", "normal"):
            raise ConfigError(
                f"[store.sqlite] synchronous must be full or normal, not {synchronous!r}"
            )
        path = options.get("path", "").strip() or DEFAULT_FILE_NAME
        return SQLiteStore(
            os.path.join(data_dir, os.path.expanduser(path)),
            reactor,
            synchronous=synchronous,
            busy_timeout_ms=_parse_int(options, "busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS, 0),
            group_commit_max=_parse_int(options, "group_commit_max", DEFAULT_GROUP_COMMIT_MAX, 1),
        )
