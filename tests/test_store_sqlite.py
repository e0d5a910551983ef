"""
What only the SQLite store promises: its schema and migrations, WAL, the
indexes of the per-datagram path, group commit, sharing the file with another
process, durability across a restart and consistency after ``kill -9``.

The behaviour it shares with every store is in ``test_store_contract.py``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from m2mgw.errors import ConfigError, DuplicateModule, StoreError
from m2mgw.records import (
    DataCommit,
    Delivery,
    HelloCommit,
    Instruction,
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    NewInstruction,
    PayloadEffects,
    Report,
    ServerKey,
    Session,
)
from m2mgw.store import operations
from m2mgw.store.sqlite import (
    DEFAULT_FILE_NAME,
    Migration,
    SQLiteStore,
    SQLiteStoreFactory,
    SQLiteTables,
    migrate,
    schema_level,
    shipped_migrations,
    split_statements,
)

NOW = 1_700_000_000


def reactor() -> Any:
    """The reactor pytest-twisted runs."""
    from twisted.internet import reactor

    return reactor


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection of the test's own, as another process would open the file."""
    return sqlite3.connect(str(path), isolation_level=None, timeout=5, check_same_thread=False)


def session(module_id: str, sid: bytes) -> Session:
    """A fresh session."""
    return Session(sid, module_id, 0, "p256", 1, b"u" * 16, b"d" * 16, NOW, NOW + 3600)


@pytest.fixture(name="path")
def path_fixture(tmp_path: Path) -> Path:
    """Where the database file goes."""
    return tmp_path / "data" / "m2mgw.sqlite"


@pytest.fixture(name="store")
def store_fixture(path: Path) -> Iterator[SQLiteStore]:
    """An opened store on ``path``."""
    store = SQLiteStore(str(path), reactor())
    pytest_twisted.blockon(store.open())
    yield store
    pytest_twisted.blockon(store.close())


# -- schema and migrations ------------------------------------------------------------


def test_shipped_migrations_are_numbered_package_data() -> None:
    migrations = shipped_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial" and "CREATE TABLE modules" in migrations[0].sql


@pytest_twisted.ensureDeferred
async def test_new_file_is_migrated_private_and_in_wal_mode(store: SQLiteStore, path: Path) -> None:
    assert await store.schema_version() == len(shipped_migrations())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert schema_level(other) == len(shipped_migrations())
    pragmas = await store.run(
        lambda t: [t.query(f"PRAGMA {name}")[0][0] for name in ("foreign_keys", "synchronous")]
    )
    assert pragmas == [1, 2]  # foreign keys on, synchronous FULL


@pytest_twisted.ensureDeferred
async def test_synchronous_normal(path: Path) -> None:
    store = SQLiteStore(str(path), reactor(), synchronous="normal")
    await store.open()
    try:
        assert await store.run(lambda t: t.query("PRAGMA synchronous")[0][0]) == 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_reopening_keeps_data_and_applies_nothing_again(path: Path) -> None:
    store = SQLiteStore(str(path), reactor())
    await store.open()
    await store.add_modules([Module("m1")])
    await store.accept_hello(HelloCommit(session("m1", b"sid"), 7, NOW))
    queued = await store.enqueue(NewInstruction("m1", "set", b"\xa0", 10), NOW)
    assert await store.accept_data(DataCommit(b"sid", 3, 64, b"tok", NOW)) is not None
    await store.close()

    again = SQLiteStore(str(path), reactor())
    await again.open()
    try:
        assert await again.schema_version() == len(shipped_migrations())
        assert (await again.get_module("m1")).last_hello_ts == 7
        assert (await again.get_session(b"sid")).highest_ctr == 3
        assert await again.get_instruction("m1", queued.iid) == queued
        assert await again.accept_data(DataCommit(b"sid", 3, 64, b"new", NOW)) is None
        replayed = await again.accept_data(DataCommit(b"sid", 4, 64, b"tok", NOW))
        assert replayed is not None and replayed.duplicate_outcome == b""
    finally:
        await again.close()


def test_migrate_applies_in_order_and_each_all_or_nothing(tmp_path: Path) -> None:
    connection = connect(tmp_path / "m.sqlite")
    first = Migration(1, "one", "CREATE TABLE a (x INTEGER); -- a comment; with a semicolon\n")
    second = Migration(
        2, "two", "CREATE TABLE b (x TEXT DEFAULT 'x;y');\nINSERT INTO a VALUES (1);\n"
    )
    broken = Migration(3, "three", "CREATE TABLE c (x);\nINSERT INTO nowhere VALUES (1);\n")
    assert migrate(connection, [first]) == 1
    assert migrate(connection, [first, second]) == 2
    assert migrate(connection, [first, second]) == 2  # nothing applied twice
    assert connection.execute("SELECT count(*) FROM a").fetchone()[0] == 1
    with pytest.raises(StoreError, match="0003_three"):
        migrate(connection, [first, second, broken])
    assert schema_level(connection) == 2
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "c" not in tables and {"a", "b"} <= tables


def test_migrate_refuses_a_newer_database(tmp_path: Path) -> None:
    connection = connect(tmp_path / "m.sqlite")
    connection.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema level 99"):
        migrate(connection, shipped_migrations())


@pytest_twisted.ensureDeferred
async def test_open_fails_cleanly_on_a_newer_database(path: Path) -> None:
    path.parent.mkdir()
    with connect(path) as other:
        other.execute("PRAGMA user_version = 99")
    store = SQLiteStore(str(path), reactor())
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    with pytest.raises(StoreError):
        await store.get_module("m1")
    await store.close()


def test_split_statements() -> None:
    script = (
        "-- head\nCREATE TABLE t (x TEXT DEFAULT ';');\n\nCREATE INDEX i\n  ON t (x);\n-- end\n"
    )
    assert [s.splitlines()[-1].strip() for s in split_statements(script)] == [
        "CREATE TABLE t (x TEXT DEFAULT ';');",
        "ON t (x);",
    ]
    with pytest.raises(StoreError):
        list(split_statements("CREATE TABLE t (x"))


# -- indexes for the per-datagram path -------------------------------------------------------


def test_the_lookups_of_the_protocol_have_indexes(tmp_path: Path) -> None:
    connection = connect(tmp_path / "i.sqlite")
    migrate(connection, shipped_migrations())

    def plan(sql: str) -> str:
        rows = connection.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        return " | ".join(row[3] for row in rows)

    assert "USING INDEX sqlite_autoindex_modules_1 (module_id=?)" in plan(
        "SELECT * FROM modules WHERE module_id = 'm'"
    )
    assert "USING INDEX sqlite_autoindex_sessions_1 (sid=?)" in plan(
        "SELECT * FROM sessions WHERE sid = x'00'"
    )
    assert "USING INDEX sqlite_autoindex_aliases_1 (alias=?)" in plan(
        "SELECT * FROM aliases WHERE alias = x'00'"
    )
    assert "USING INDEX instructions_pending (module_id=? AND iid>?)" in plan(
        "SELECT * FROM instructions WHERE module_id = 'm' AND iid > 0"
        " AND state IN ('queued', 'waiting', 'sent') ORDER BY iid LIMIT 32"
    )


def test_no_statement_of_the_datagram_path_scans_a_table(tmp_path: Path) -> None:
    """Trace every statement a HELLO and DATA run and check that each one uses an index."""
    connection = connect(tmp_path / "t.sqlite")
    connection.execute("PRAGMA foreign_keys = ON")
    migrate(connection, shipped_migrations())
    tables = SQLiteTables(connection)
    operations.add_modules(tables, [Module("m1")], [ModuleKey("m1", 1, "p256", b"k")])
    operations.set_module_apps(tables, "m1", ["app"])
    operations.enqueue(tables, NewInstruction("m1", "set", b"\xa0", 10), NOW)
    traced: list[str] = []
    connection.set_trace_callback(traced.append)
    hello = HelloCommit(
        Session(b"sid", "m1", 1, "p256", 1, b"u", b"d", NOW, NOW + 9),
        1,
        NOW,
        PayloadEffects(report=Report("m1", NOW, b"\x00")),
        alias=b"alias",
        delivery=Delivery(100),
    )
    assert operations.accept_hello(tables, hello) is not None
    effects = PayloadEffects(new_instructions=(NewInstruction("m1", "keygen", b"", 5),))
    commit = DataCommit(b"sid", 1, 64, b"tok", NOW, effects, delivery=Delivery(100))
    assert operations.accept_data(tables, commit) is not None
    assert operations.resolve_alias(tables, b"alias", NOW, True) == "m1"
    connection.set_trace_callback(None)
    assert len(traced) > 20
    for sql in traced:
        details = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}")]
        scans = [d for d in details if d.startswith("SCAN")]
        assert not scans, (sql, details)


# -- group commit -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_concurrent_operations(store: SQLiteStore) -> None:
    await store.add_modules([Module("m1")])
    await store.accept_hello(HelloCommit(session("m1", b"sid"), 1, NOW))
    before = store.transactions
    count = 200
    results = await defer.gatherResults(
        [
            store.accept_data(DataCommit(b"sid", ctr, 64, b"tok-%d" % ctr, NOW))
            for ctr in range(1, count + 1)
        ]
    )
    assert all(result is not None for result in results)
    assert store.transactions - before <= count // 20
    assert (await store.get_session(b"sid")).highest_ctr == count


@pytest_twisted.ensureDeferred
async def test_group_commit_max_bounds_a_transaction(path: Path) -> None:
    store = SQLiteStore(str(path), reactor(), group_commit_max=4)
    await store.open()
    try:
        before = store.transactions
        await defer.gatherResults([store.add_modules([Module(f"m{n}")]) for n in range(40)])
        assert store.transactions - before >= 10
        assert await store.count_modules() == 40
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_failing_operation_fails_alone(store: SQLiteStore) -> None:
    await store.add_modules([Module("taken")])
    attempts = [
        store.add_modules([Module("a")]),
        store.add_modules([Module("b1"), Module("taken")]),
        store.add_modules([Module("c")]),
    ]
    outcomes = await defer.DeferredList(attempts, consumeErrors=True)
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert outcomes[1][1].check(DuplicateModule)
    assert [m.module_id for m in await store.list_modules()] == ["a", "c", "taken"]


# -- sharing the file -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_waits_for_another_process_holding_the_write_lock(
    store: SQLiteStore, path: Path
) -> None:
    other = connect(path)
    other.execute("BEGIN IMMEDIATE")
    other.execute(
        "INSERT INTO modules (module_id, status, psk_reusable, module_group, last_hello_ts,"
        " created_at) VALUES ('cli', 'enabled', 0, 'default', 0, 0)"
    )
    release = threading.Timer(0.3, other.execute, ("COMMIT",))
    started = time.monotonic()
    release.start()
    await store.add_modules([Module("gateway")])
    assert time.monotonic() - started >= 0.25
    assert [m.module_id for m in await store.list_modules()] == ["cli", "gateway"]
    release.join()
    other.close()


@pytest_twisted.ensureDeferred
async def test_gives_up_after_busy_timeout(path: Path) -> None:
    store = SQLiteStore(str(path), reactor(), busy_timeout_ms=50)
    await store.open()
    other = connect(path)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            await store.add_modules([Module("m1")])
        other.execute("ROLLBACK")
        await store.add_modules([Module("m1")])
        assert await store.count_modules() == 1
    finally:
        other.close()
        await store.close()


# -- lifecycle ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lifecycle(path: Path) -> None:
    store = SQLiteStore(str(path), reactor())
    with pytest.raises(StoreError, match="not open"):
        await store.count_modules()
    opening = [store.open(), store.open()]
    await defer.gatherResults(opening)
    await store.open()
    pending = store.add_modules([Module("queued-before-close")])
    closing = store.close()
    await pending
    await closing
    await store.close()
    assert not (path.parent / (path.name + "-wal")).exists() or (
        (path.parent / (path.name + "-wal")).stat().st_size == 0
    )
    with pytest.raises(StoreError, match="closed"):
        await store.open()
    with connect(path) as other:
        assert other.execute("SELECT module_id FROM modules").fetchall() == [
            ("queued-before-close",)
        ]


@pytest_twisted.ensureDeferred
async def test_close_before_open_and_while_opening(path: Path) -> None:
    never = SQLiteStore(str(path), reactor())
    await never.close()
    store = SQLiteStore(str(path), reactor())
    opening = store.open()
    await store.close()
    await opening
    with pytest.raises(StoreError):
        await store.count_modules()


@pytest_twisted.ensureDeferred
async def test_open_fails_on_an_unusable_path(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path), reactor())  # a directory
    with pytest.raises(StoreError):
        await store.open()


@pytest_twisted.ensureDeferred
async def test_replay_window_is_stored_as_a_blob(store: SQLiteStore) -> None:
    await store.add_modules([Module("m1")])
    await store.accept_hello(HelloCommit(session("m1", b"sid"), 1, NOW))
    for ctr in (1, 64):
        await store.accept_data(DataCommit(b"sid", ctr, 64, b"t%d" % ctr, NOW))
    rows = await store.run(lambda t: t.query("SELECT typeof(window), window FROM sessions"))
    assert rows == [("blob", (1 << 63 | 1).to_bytes(8, "big"))]


# -- the factory ----------------------------------------------------------------------------


def test_factory_options(tmp_path: Path) -> None:
    factory = SQLiteStoreFactory()
    default = factory.create({}, str(tmp_path), None)
    assert default.path == os.path.join(str(tmp_path), DEFAULT_FILE_NAME)
    relative = factory.create({"path": "db/gw.sqlite"}, str(tmp_path), None)
    assert relative.path == os.path.join(str(tmp_path), "db/gw.sqlite")
    absolute = factory.create({"path": "/srv/x.sqlite", "synchronous": "NORMAL"}, "/d", None)
    assert absolute.path == "/srv/x.sqlite"
    assert set(factory.options) == {"path", "synchronous", "busy_timeout_ms", "group_commit_max"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"synchronous": "off"}, "synchronous must be full or normal"),
        ({"busy_timeout_ms": "soon"}, "busy_timeout_ms must be an integer"),
        ({"busy_timeout_ms": "-1"}, "busy_timeout_ms must be at least 0"),
        ({"group_commit_max": "0"}, "group_commit_max must be at least 1"),
    ],
)
def test_factory_refuses_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SQLiteStoreFactory().create(options, "/d", None)


# -- kill -9 ----------------------------------------------------------------------------------

#: Writes in a loop until killed: per worker one module whose DATA carry a
#: report, a token, an event and the confirmation of what the previous reply
#: delivered; and an importer adding modules with keys in batches of 50.
#: Prints a line for each write once its Deferred fired (after COMMIT).
WRITER = r"""
import sys
from twisted.internet import defer, reactor
from m2mgw.records import *
from m2mgw.store.sqlite import SQLiteStore

NOW = 1_700_000_000
WORKERS = 6

async def worker(store, n):
    module_id, sid, ctr, confirm = f"w{n}", b"sid-%d" % n, 0, ()
    while True:
        ctr += 1
        await store.enqueue(NewInstruction(module_id, "set", b"\xa0", 10), NOW)
        effects = PayloadEffects(
            report=Report(module_id, NOW, b"\x00", module_ts=ctr),
            confirmations=confirm,
            events=(NewEvent("report", module_id, {"ctr": ctr}),),
        )
        commit = DataCommit(sid, ctr, 64, b"tok-%d" % ctr, NOW, effects, b"", Delivery(25))
        result = await store.accept_data(commit)
        confirm = tuple(Confirmation(i.iid, 0, NOW) for i in result.instructions)
        print(f"data {module_id} {ctr}", flush=True)

async def importer(store):
    batch = 0
    while True:
        batch += 1
        ids = [f"b{batch}-{i}" for i in range(50)]
        keys = [ModuleKey(i, 1, "p256", b"k", KeyStatus.ACTIVE) for i in ids]
        await store.add_modules([Module(i) for i in ids], keys)
        print(f"batch {batch}", flush=True)

async def main():
    store = SQLiteStore(sys.argv[1], reactor)
    await store.open()
    await store.add_modules([Module(f"w{n}") for n in range(WORKERS)])
    for n in range(WORKERS):
        await store.set_module_apps(f"w{n}", ["app"])
        s = Session(b"sid-%d" % n, f"w{n}", 0, "p256", 1, b"u", b"d", NOW, NOW + 10**6)
        await store.accept_hello(HelloCommit(s, 1, NOW))
    print("ready", flush=True)
    tasks = [worker(store, n) for n in range(WORKERS)] + [importer(store)]
    await defer.gatherResults([defer.ensureDeferred(t) for t in tasks])

defer.ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
reactor.run()
"""


def _run_and_kill(path: Path) -> list[str]:
    """Run :data:`WRITER` on ``path``, SIGKILL it mid-write; return the lines it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert child.stdout is not None
    deadline = time.monotonic() + 6
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if sum(x.startswith("data") for x in lines) >= 300 or time.monotonic() > deadline:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        rest, errors = child.communicate(timeout=10)
    lines.extend(rest.splitlines())
    assert child.returncode == -signal.SIGKILL, errors
    assert "ready" in lines, errors
    return lines


def test_kill_9_mid_write_leaves_a_consistent_database(path: Path) -> None:
    path.parent.mkdir()
    printed = _run_and_kill(path)
    acknowledged: dict[str, int] = {}
    batches: set[str] = set()
    for line in printed:
        words = line.split()
        if words[:1] == ["data"]:
            acknowledged[words[1]] = max(acknowledged.get(words[1], 0), int(words[2]))
        elif words[:1] == ["batch"]:
            batches.add(f"b{words[1]}-")
    assert sum(acknowledged.values()) >= 20, "the writer did too little before it was killed"

    db = connect(path)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    sessions = db.execute("SELECT module_id, highest_ctr, window FROM sessions").fetchall()
    for module_id, highest, window in sessions:
        # Nothing acknowledged is lost; at most the one write in flight is not acknowledged.
        assert acknowledged.get(module_id, 0) <= highest <= acknowledged.get(module_id, 0) + 1
        ctrs = [
            r[0]
            for r in db.execute("SELECT module_ts FROM reports WHERE module_id = ?", (module_id,))
        ]
        assert sorted(ctrs) == list(range(1, highest + 1))  # each accepted ctr, one report
        assert int.from_bytes(window, "big") == (1 << min(highest, 64)) - 1
        tokens_seen, last_iid = db.execute(
            "SELECT tokens_seen, last_iid FROM modules WHERE module_id = ?", (module_id,)
        ).fetchone()
        assert tokens_seen == highest
        iids = [
            r[0]
            for r in db.execute(
                "SELECT iid FROM instructions WHERE module_id = ? ORDER BY iid", (module_id,)
            )
        ]
        assert iids == list(range(1, last_iid + 1))
        unconfirmed_states = db.execute(
            "SELECT count(*) FROM instructions WHERE module_id = ? AND state = ?"
            " AND exec_ts IS NOT NULL",
            (module_id, InstructionState.SENT.value),
        ).fetchone()[0]
        assert unconfirmed_states == 0
    assert len(sessions) == 6
    last_seq = db.execute("SELECT last_seq FROM app_outbox WHERE app = 'app'").fetchone()[0]
    seqs = [r[0] for r in db.execute("SELECT seq FROM events WHERE app = 'app' ORDER BY seq")]
    assert seqs == list(range(1, last_seq + 1))
    found = db.execute(
        "SELECT substr(module_id, 1, instr(module_id, '-')), count(*) FROM modules"
        " WHERE module_id LIKE 'b%' GROUP BY 1"
    ).fetchall()
    assert all(count == 50 for _, count in found), found  # a batch is all or nothing
    assert batches <= {prefix for prefix, _ in found}
    keys = db.execute(
        "SELECT count(*) FROM module_keys WHERE module_id LIKE 'b%' AND status = ?",
        (KeyStatus.ACTIVE.value,),
    ).fetchone()[0]
    assert keys == 50 * len(found)
    db.close()


@pytest.mark.parametrize(
    ("table", "record"),
    [
        ("modules", Module),
        ("module_keys", ModuleKey),
        ("server_keys", ServerKey),
        ("sessions", Session),
        ("instructions", Instruction),
    ],
)
def test_table_columns_follow_the_record_fields(tmp_path: Path, table: str, record: Any) -> None:
    """Rows are written from the records' fields in order: the columns must match them."""
    connection = connect(tmp_path / "c.sqlite")
    migrate(connection, shipped_migrations())
    columns = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
    names = [{"group": "module_group"}.get(f.name, f.name) for f in dataclasses.fields(record)]
    assert columns[: len(names)] == names
