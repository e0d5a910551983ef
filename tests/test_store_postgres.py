"""
The postgres store beyond the contract: several gateway processes on one database.

Two :class:`PostgresStore` objects on one database are two nodes: each has its
own database thread and connection, so their operations really run at the
same time.  Every check the protocol needs to be atomic (the HELLO ``ts``, the
replay window, claiming instructions, consuming an alias, event sequence
numbers) must hold across them; events one appends are announced to the
other's listeners.  The server comes from ``tests/pgharness.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from m2mgw.errors import ConfigError, StoreError
from m2mgw.records import (
    Confirmation,
    DataCommit,
    Delivery,
    ExchangeResult,
    HelloCommit,
    InstructionState,
    Module,
    ModuleStatus,
    NewEvent,
    NewInstruction,
    PayloadEffects,
    Report,
    Session,
)
from m2mgw.store import postgres
from m2mgw.store.postgres import PostgresStore, PostgresStoreFactory, PostgresTables
from tests.pgharness import PostgresServer

NOW = 1_700_000_000
ROUNDS = 15


def make_store(dsn: str, **options: str) -> PostgresStore:
    """An unopened store of the ``postgres`` plugin."""
    return PostgresStoreFactory().create({"dsn": dsn, **options}, "/nonexistent", global_reactor)


@pytest.fixture
def nodes(postgres_dsn: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two opened stores on one database: two gateway nodes."""
    a, b = make_store(postgres_dsn), make_store(postgres_dsn)
    pytest_twisted.blockon(both(a.open(), b.open()))
    yield a, b
    pytest_twisted.blockon(both(a.close(), b.close()))


def session(module_id: str, sid: bytes) -> Session:
    return Session(sid, module_id, 0, "p256", 1, b"u" * 16, b"d" * 16, NOW, NOW + 3600)


def data(sid: bytes, ctr: int, **fields: Any) -> DataCommit:
    fields.setdefault("delivery", Delivery(budget=1000))
    return DataCommit(sid, ctr, 64, b"tok-%d" % ctr, NOW + 1, **fields)


def both(*deferreds: Deferred[Any]) -> Deferred[list[Any]]:
    return gatherResults(list(deferreds), consumeErrors=True)


def wait(d: Deferred[Any], seconds: float = 20.0) -> Deferred[Any]:
    """``d``, failing if it has not fired within ``seconds`` (a hang is a failure)."""
    return d.addTimeout(seconds, global_reactor)


# -- atomic across nodes -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_hellos_with_one_ts_accept_exactly_one(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.add_modules([Module("m1", psk=bytes(16))])
    for ts in range(1, ROUNDS + 1):
        results = await both(
            a.accept_hello(HelloCommit(session("m1", b"a%03d" % ts), ts, NOW)),
            b.accept_hello(HelloCommit(session("m1", b"b%03d" % ts), ts, NOW)),
        )
        accepted = [r for r in results if isinstance(r, ExchangeResult)]
        assert len(accepted) == 1, f"ts {ts}: {results}"
        stored = await b.get_module_session("m1")
        assert stored is not None and stored.sid in (b"a%03d" % ts, b"b%03d" % ts)
    assert (await a.get_module("m1")).last_hello_ts == ROUNDS  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_one_data_counter_through_both_nodes_is_accepted_once(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.add_modules([Module("m1", psk=bytes(16))])
    await a.accept_hello(HelloCommit(session("m1", b"s1"), 1, NOW))
    for ctr in range(1, ROUNDS + 1):
        results = await both(a.accept_data(data(b"s1", ctr)), b.accept_data(data(b"s1", ctr)))
        assert sum(isinstance(r, ExchangeResult) for r in results) == 1, f"ctr {ctr}"
    stored = await a.get_session(b"s1")
    assert stored is not None and stored.highest_ctr == ROUNDS


@pytest_twisted.ensureDeferred
async def test_an_instruction_rides_for_the_first_time_through_one_node_only(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.add_modules([Module("m1", psk=bytes(16))])
    await a.accept_hello(HelloCommit(session("m1", b"s1"), 1, NOW))
    ctr = 0
    for _ in range(ROUNDS):
        queued = await b.enqueue(NewInstruction("m1", "set", b"\xa0", 10), NOW)
        results = await both(
            a.accept_data(data(b"s1", ctr + 1)), b.accept_data(data(b"s1", ctr + 2))
        )
        ctr += 2
        first_rides = [
            t
            for r in results
            for t in r.transitions
            if t.iid == queued.iid and t.state is InstructionState.SENT
        ]
        assert len(first_rides) == 1, results
        carried = [r for r in results if any(i.iid == queued.iid for i in r.instructions)]
        assert carried, "neither reply carried the instruction"
        stored = await a.get_instruction("m1", queued.iid)
        assert stored is not None and stored.attempts == len(carried)
        await a.cancel_instruction("m1", queued.iid, NOW + 2)


@pytest_twisted.ensureDeferred
async def test_an_alias_is_consumed_once(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    await a.add_modules([Module("m1", psk=bytes(16))])
    for ts in range(1, ROUNDS + 1):
        alias = b"alias-%d" % ts
        commit = HelloCommit(session("m1", b"s%03d" % ts), ts, NOW, alias=alias)
        assert await a.accept_hello(commit) is not None
        found = await both(
            a.resolve_alias(alias, NOW, consume=True), b.resolve_alias(alias, NOW, consume=True)
        )
        assert sorted(found, key=lambda x: x is None) == ["m1", None], found


@pytest_twisted.ensureDeferred
async def test_event_numbers_are_unique_and_gapless_under_concurrent_appends(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.add_modules([Module(f"m{i}", psk=bytes(16)) for i in range(8)])
    for i in range(8):
        await a.set_module_apps(f"m{i}", ["app1", "app2"])
    calls = []
    for n in range(40):
        store = (a, b)[n % 2]
        events = [NewEvent("alert", f"m{n % 8}", {"n": n})]
        calls.append(store.append_events(events, NOW))
    appended = [event for batch in await both(*calls) for event in batch]
    for app in ("app1", "app2"):
        numbers = sorted(e.seq for e in appended if e.app == app)
        assert numbers == list(range(1, 41))
        stored = await b.events_after(app, 0, 100)
        assert [e.seq for e in stored] == numbers
        assert sorted(e.payload["n"] for e in stored) == list(range(40))
        assert await a.outbox_position(app) == (0, 40)


@pytest_twisted.ensureDeferred
async def test_a_deadlocked_batch_is_run_again(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.add_modules([Module("m1"), Module("m2")])
    barrier = threading.Barrier(2, timeout=10)
    first_attempt = {"a": True, "b": True}

    def crossing(name: str, first: str, second: str) -> Callable[[PostgresTables], str]:
        def work(tables: PostgresTables) -> str:
            tables.get_module(first)
            if first_attempt[name]:
                first_attempt[name] = False
                barrier.wait()
            tables.get_module(second)
            return name

        return work

    done = await wait(both(a.run(crossing("a", "m1", "m2")), b.run(crossing("b", "m2", "m1"))), 30)
    assert done == ["a", "b"]
    assert a.retries + b.retries >= 1


# -- event notification across nodes ------------------------------------------------


class Heard:
    """An event listener that records what it hears and can be waited on."""

    def __init__(self) -> None:
        self.calls: list[frozenset[str]] = []
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def __call__(self, apps: frozenset[str]) -> None:
        self.calls.append(apps)
        for condition, d in list(self._waiting):
            if condition():
                self._waiting.remove((condition, d))
                d.callback(None)

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        if condition():
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._waiting.append((condition, d))
        return wait(d)


async def listening(store: PostgresStore) -> None:
    """Wait until the store's listening connection has run LISTEN."""
    listener = store.event_listener
    assert listener is not None
    await wait(_in_thread(lambda: listener.listening.wait(20)))


def _in_thread(task: Callable[[], Any]) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(task)


@pytest_twisted.ensureDeferred
async def test_events_appended_by_one_node_are_announced_to_the_other(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    heard_a, heard_b = Heard(), Heard()
    a.add_event_listener(heard_a)
    b.add_event_listener(heard_b)
    await listening(a)
    await listening(b)
    await a.append_events([NewEvent("alert", None, {}, app="app1")], NOW)
    await heard_b.until(lambda: frozenset({"app1"}) in heard_b.calls)
    assert heard_a.calls == [frozenset({"app1"})]  # its own commit, told once
    # A's own notification reached A's listening connection before B's: A
    # hears B's append once, and had not heard its own a second time.
    await b.append_events([NewEvent("alert", None, {}, app="app2")], NOW)
    await heard_a.until(lambda: len(heard_a.calls) >= 2)
    assert heard_a.calls == [frozenset({"app1"}), frozenset({"app2"})]
    b.remove_event_listener(heard_b)
    await a.append_events([NewEvent("alert", None, {}, app="app3")], NOW)
    assert frozenset({"app3"}) not in heard_b.calls


@pytest_twisted.ensureDeferred
async def test_a_lost_listening_connection_reconnects_and_announces_every_application(
    nodes: tuple[PostgresStore, PostgresStore], postgres_server: PostgresServer
) -> None:
    a, b = nodes
    await a.append_events([NewEvent("alert", None, {}, app=x) for x in ("x1", "x2")], NOW)
    heard = Heard()
    b.add_event_listener(heard)
    await listening(b)
    listener = b.event_listener
    assert listener is not None and listener.connection is not None
    pid = listener.connection.info.backend_pid
    with psycopg.connect(postgres_server.admin_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await heard.until(lambda: frozenset({"x1", "x2"}) in heard.calls)
    assert listener.reconnects == 1
    await a.append_events([NewEvent("alert", None, {}, app="x3")], NOW)
    await heard.until(lambda: frozenset({"x3"}) in heard.calls)


def test_notifications_are_split_below_the_payload_limit() -> None:
    apps = [f"application-{i:05d}" for i in range(2000)]
    chunks = list(postgres._chunks(apps))
    assert [app for chunk in chunks for app in chunk] == apps
    assert len(chunks) > 1
    assert all(len(json.dumps({"from": "x" * 32, "apps": c})) < 8000 for c in chunks)


# -- batching and instrumentation -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_of_data_is_committed_in_few_transactions(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, _ = nodes
    modules = [f"m{i}" for i in range(100)]
    await a.add_modules([Module(m, psk=bytes(16)) for m in modules])
    for i, m in enumerate(modules):
        await a.set_module_apps(m, ["app1"])
        await a.accept_hello(HelloCommit(session(m, b"s%03d" % i), 1, NOW))
    before = (a.transactions, a.operations, a.round_trips)
    results = await both(*[a.accept_data(data(b"s%03d" % i, 1)) for i in range(len(modules))])
    assert all(isinstance(r, ExchangeResult) for r in results)
    transactions = a.transactions - before[0]
    operations = a.operations - before[1]
    round_trips = a.round_trips - before[2]
    assert operations == len(modules)
    assert transactions < operations
    assert round_trips <= 2 * transactions  # read ahead, commit: pipelined
    assert a.fallbacks == 0


async def held(store: PostgresStore) -> tuple[Deferred[Any], threading.Event]:
    """
    Keep ``store``'s database thread busy until the returned event is set,
    so that what is queued meanwhile runs as one batch.
    """
    started, release = threading.Event(), threading.Event()

    def block(tables: PostgresTables) -> None:
        started.set()
        release.wait(20)

    blocker = store.run(block)
    await wait(_in_thread(lambda: started.wait(20)))
    return blocker, release


async def burst_scenario(
    store: PostgresStore, modules: int, failing: bool = False
) -> tuple[list[Any], dict[str, Any], float]:
    """
    Provision ``modules`` modules with sessions, queued instructions and
    events; then queue, as one batch, a DATA of every module (a report, an
    event, a confirmation or a new instruction for some) and, for ten of
    them, a replay, a duplicate ``tok`` (seen earlier in the same batch) and a
    second DATA, the outbox read and acknowledged amid them, and for five a
    HELLO followed by a DATA on the old and on the new session -- with
    ``failing``, also work that fails in the database and one that fails in
    Python.  Return the outcomes (result, ``None`` or the
    error's type), the stored state, and the round trips per operation.
    """
    names = [f"m{i:03d}" for i in range(modules)]
    apps = {m: ["app1", "app2"] if i < 10 else ["app1"] for i, m in enumerate(names)}
    await store.add_modules([Module(m, psk=bytes(16)) for m in names], apps=apps)
    await both(
        *[
            store.accept_hello(HelloCommit(session(m, b"s%03d" % i), 1, NOW))
            for i, m in enumerate(names)
        ]
    )
    for m in names[:20]:
        await store.enqueue(NewInstruction(m, "set", b"\xa0", 10), NOW)
    for i in range(5):  # their instruction rides: sent, to be confirmed in the burst
        await store.accept_data(data(b"s%03d" % i, 1))

    def effects(i: int, ctr: int) -> PayloadEffects:
        return PayloadEffects(
            report=Report(names[i], NOW + 1, b"r%d" % ctr),
            confirmations=(Confirmation(1, 0, NOW),) if i < 5 and ctr == 10 else (),
            new_instructions=(
                (NewInstruction(names[i], "get", b"\xa1", 10),) if i == 7 and ctr == 12 else ()
            ),
            events=(NewEvent("alert", names[i], {"ctr": ctr}),),
        )

    blocker, release = await held(store)
    before = (store.round_trips, store.operations)
    calls: list[Deferred[Any]] = [
        store.accept_data(data(b"s%03d" % i, 10, effects=effects(i, 10))) for i in range(modules)
    ]
    for i in range(10):
        if failing and i == 4:
            calls.append(store.run(lambda t: t.send("INSERT INTO no_such_table VALUES (1)")))
            calls.append(store.enqueue(NewInstruction("nobody", "set", b"", 1), NOW))
        if i == 6:  # the outbox, read and changed amid appends
            calls.append(store.outbox_position("app1"))
            calls.append(store.ack_events("app2", 3))
        sid = b"s%03d" % i
        calls.append(store.accept_data(data(sid, 10, effects=effects(i, 10))))  # a replay
        calls.append(  # a new counter, a tok seen (the effects are not applied again)
            store.accept_data(DataCommit(sid, 11, 64, b"tok-10", NOW + 1, effects(i, 11)))
        )
        calls.append(store.accept_data(data(sid, 12, effects=effects(i, 12))))
    for i in range(10, 15):  # a new session, and a DATA on the old and one on the new
        calls.append(store.accept_hello(HelloCommit(session(names[i], b"h%03d" % i), 2, NOW)))
        calls.append(store.accept_data(data(b"s%03d" % i, 11)))
        calls.append(store.accept_data(data(b"h%03d" % i, 1, effects=effects(i, 1))))
    release.set()
    await blocker
    outcomes = [
        value if ok else type(value.value).__name__
        for ok, value in await DeferredList(calls, consumeErrors=True)
    ]
    round_trips = (store.round_trips - before[0]) / (store.operations - before[1] - 1)
    state: dict[str, Any] = {}
    for app in ("app1", "app2"):
        state[app] = (
            await store.events_after(app, 0, 10_000),
            await store.outbox_position(app),
        )
    for i, m in enumerate(names):
        state[m] = (
            await store.get_module(m),
            await store.get_module_session(m),
            await store.get_session(b"s%03d" % i),
            await store.list_instructions(m),
            await store.list_reports(m, 100),
        )
    return outcomes, state, round_trips


@pytest.mark.parametrize("failing", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_pipelined_burst_ends_as_the_plain_way_does(
    postgres_server: PostgresServer, failing: bool
) -> None:
    dsns = [postgres_server.new_database() for _ in range(2)]
    try:
        stores = [make_store(dsns[0]), make_store(dsns[1], pipeline="no")]
        await both(*[s.open() for s in stores])
        pipelined, plain = [await burst_scenario(s, 40, failing) for s in stores]
        await both(*[s.close() for s in stores])
    finally:
        for dsn in dsns:
            postgres_server.drop_database(dsn)
    outcomes, state, _ = pipelined
    assert outcomes == plain[0]
    assert state == plain[1]
    # What the scenario is about happened (and so the same in both ways):
    assert isinstance(outcomes[0], ExchangeResult) and outcomes[0].transitions  # confirmed
    assert outcomes[40] is None  # the replay
    assert outcomes[41].duplicate_outcome == b""
    events, position = state["app1"]
    assert [e.seq for e in events] == list(range(1, position[1] + 1))
    if failing:
        assert "StoreError" in outcomes and "UnknownModule" in outcomes
        assert stores[0].fallbacks == 1
    else:
        assert stores[0].fallbacks == 0


@pytest_twisted.ensureDeferred
async def test_bursts_of_one_data_through_both_nodes_are_accepted_once(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    names = [f"m{i:02d}" for i in range(20)]
    await a.add_modules(
        [Module(m, psk=bytes(16)) for m in names], apps={m: ["app1"] for m in names}
    )
    for i, m in enumerate(names):
        await a.accept_hello(HelloCommit(session(m, b"s%02d" % i), 1, NOW))
    calls = {}
    for ctr in range(1, 6):
        for i, m in enumerate(names):
            effects = PayloadEffects(events=(NewEvent("alert", m, {"ctr": ctr}),))
            for node in (a, b):
                calls[m, ctr, node.token] = node.accept_data(
                    data(b"s%02d" % i, ctr, effects=effects)
                )
    results = dict(zip(calls, await both(*calls.values()), strict=True))
    for i, m in enumerate(names):
        for ctr in range(1, 6):
            accepted = [node.token for node in (a, b) if results[m, ctr, node.token] is not None]
            assert len(accepted) == 1, (m, ctr)
        stored = await a.get_session(b"s%02d" % i)
        assert stored is not None and stored.highest_ctr == 5
    events = await b.events_after("app1", 0, 1000)
    first_seen = len(names)  # one event per module's first HELLO
    assert [e.seq for e in events] == list(range(1, first_seen + 5 * len(names) + 1))
    assert sorted((e.module_id, e.payload["ctr"]) for e in events if e.kind == "alert") == sorted(
        (m, ctr) for m in names for ctr in range(1, 6)
    )
    assert a.fallbacks == b.fallbacks == 0


@pytest_twisted.ensureDeferred
async def test_a_burst_of_data_costs_few_round_trips(postgres_dsn: str) -> None:
    store = make_store(postgres_dsn)
    await store.open()
    try:
        outcomes, _, round_trips = await burst_scenario(store, 300)
    finally:
        await store.close()
    assert sum(isinstance(o, ExchangeResult) for o in outcomes) == 300 + 2 * 10 + 2 * 5
    assert sum(o is None for o in outcomes) == 10 + 1 + 5  # replays, acknowledgement, old sids
    assert round_trips <= 0.05
    assert store.fallbacks == 0


# -- schema --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nodes_starting_together_migrate_once(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.new_database(migrated=False)
    try:
        stores = [make_store(dsn) for _ in range(3)]
        await both(*[s.open() for s in stores])
        latest = postgres.shipped_migrations()[-1].version
        assert await both(*[s.schema_version() for s in stores]) == [latest] * 3
        rows = await stores[0].run(
            lambda t: t.query("SELECT version FROM m2mgw_schema ORDER BY version")
        )
        assert [r[0] for r in rows] == list(range(1, latest + 1))
        await both(*[s.close() for s in stores])
    finally:
        postgres_server.drop_database(dsn)


@pytest_twisted.ensureDeferred
async def test_a_database_newer_than_the_code_is_refused(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO m2mgw_schema (version, name, applied_at) VALUES (99, 'future', now())"
        )
    store = make_store(postgres_dsn)
    with pytest.raises(StoreError, match="schema level 99, newer than this m2mgw knows"):
        await store.open()
    assert await make_store(postgres_dsn).database_level() == 99


@pytest_twisted.ensureDeferred
async def test_without_auto_migrate_an_old_database_is_refused_until_migrated(
    postgres_server: PostgresServer,
) -> None:
    dsn = postgres_server.new_database(migrated=False)
    try:
        store = make_store(dsn, auto_migrate="no")
        assert await store.database_level() == 0
        with pytest.raises(StoreError, match="run m2mgw-admin db migrate"):
            await store.open()
        latest = postgres.shipped_migrations()[-1].version
        assert await make_store(dsn).migrate() == latest
        store = make_store(dsn, auto_migrate="no")
        await store.open()
        assert await store.schema_version() == latest
        await store.close()
    finally:
        postgres_server.drop_database(dsn)


# -- configuration and errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"\[store.postgres\] dsn is required"),
        ({"dsn": "host=x port"}, r"\[store.postgres\] dsn is malformed"),
        ({"dsn": "dbname=x", "batch_max": "0"}, r"batch_max must be at least 1"),
        ({"dsn": "dbname=x", "retries": "many"}, r"retries must be an integer"),
        ({"dsn": "dbname=x", "auto_migrate": "maybe"}, r"auto_migrate must be yes or no"),
        ({"dsn": "dbname=x", "pipeline": "sometimes"}, r"pipeline must be yes or no"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PostgresStoreFactory().create(options, "/nonexistent", global_reactor)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_a_one_line_store_error(tmp_path: Any) -> None:
    store = make_store(f"host={tmp_path} port=1 dbname=x connect_timeout=2")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert str(caught.value).startswith("cannot connect to PostgreSQL:")
    assert "\n" not in str(caught.value)
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_disabled_module_is_refused_on_every_node(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.add_modules([Module("m1", psk=bytes(16))])
    await a.accept_hello(HelloCommit(session("m1", b"s1"), 1, NOW))
    await b.set_module_status("m1", ModuleStatus.DISABLED)
    results = await DeferredList(
        [a.accept_data(data(b"s1", 1)), a.accept_hello(HelloCommit(session("m1", b"s2"), 2, NOW))]
    )
    assert [value for _, value in results] == [None, None]


async def stream_scenario(
    store: PostgresStore, modules: int, boom: int | None = None
) -> tuple[list[Any], int, int]:
    """
    Queue, behind a held batch, one DATA (with a report) of each of
    ``modules`` modules, so that several consecutive batches (of the store's
    ``batch_max``) are queued at once; with ``boom``, that module's report
    breaks a deferred constraint: its batch's ``COMMIT`` fails.  Return the
    outcomes (result or the error's type), and the round trips and
    transactions the batches cost.
    """
    names = [f"m{i:02d}" for i in range(modules)]
    await store.add_modules([Module(m, psk=bytes(16)) for m in names], apps={})
    for i, m in enumerate(names):
        await store.accept_hello(HelloCommit(session(m, b"s%02d" % i), 1, NOW))
    await store.run(
        lambda t: t.query(
            """
            CREATE FUNCTION no_boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.data = '\\x626f6f6d' THEN RAISE EXCEPTION 'boom'; END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER no_boom AFTER INSERT ON reports
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_boom()
            """
        )
    )
    blocker, release = await held(store)
    before = (store.round_trips, store.transactions)
    calls: list[Deferred[Any]] = [
        store.accept_data(
            data(
                b"s%02d" % i,
                1,
                effects=PayloadEffects(report=Report(m, NOW + 1, b"boom" if i == boom else b"r")),
            )
        )
        for i, m in enumerate(names)
    ]
    release.set()
    await blocker
    outcomes = [
        value if ok else type(value.value).__name__
        for ok, value in await DeferredList(calls, consumeErrors=True)
    ]
    return (
        outcomes,
        store.round_trips - before[0],
        store.transactions - before[1] - 1,  # the held batch
    )


@pytest.mark.parametrize("piggyback", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_steady_stream_of_batches_costs_one_round_trip_each(
    postgres_dsn: str, piggyback: bool
) -> None:
    store = PostgresStore(postgres_dsn, global_reactor, batch_max=10, piggyback=piggyback)
    await store.open()
    try:
        outcomes, round_trips, transactions = await stream_scenario(store, 50)
        reports = await store.list_reports("m49", 10)
    finally:
        await store.close()
    assert all(isinstance(o, ExchangeResult) for o in outcomes)
    assert transactions == 5
    assert [r.data for r in reports] == [b"r"]
    assert store.fallbacks == 0
    if piggyback:
        # The held batch's COMMIT, the first BEGIN and read-ahead, then one
        # each: batch N's COMMIT with batch N+1's BEGIN and read-ahead.
        assert round_trips <= 1 + 1 + transactions
    else:  # read ahead, commit
        assert round_trips == 1 + 2 * transactions


@pytest_twisted.ensureDeferred
async def test_a_commit_failing_in_a_piggybacked_sync_fails_its_batch_only(
    postgres_dsn: str,
) -> None:
    store = make_store(postgres_dsn, batch_max="10")
    await store.open()
    try:
        outcomes, _, _ = await stream_scenario(store, 50, boom=15)
        sessions = [await store.get_session(b"s%02d" % i) for i in range(50)]
        reports = [await store.list_reports(f"m{i:02d}", 10) for i in range(50)]
        fallbacks = store.fallbacks
    finally:
        await store.close()
    # The second batch (m10..m19) did not commit, run the plain way either:
    # nothing of it succeeded.  The third one's read-ahead, aborted with
    # it, was done again: it and the others committed.
    failed = set(range(10, 20))
    assert [o == "StoreError" for o in outcomes] == [i in failed for i in range(50)]
    assert all(isinstance(outcomes[i], ExchangeResult) for i in set(range(50)) - failed)
    assert fallbacks == 1
    for i in range(50):
        stored = sessions[i]
        assert stored is not None
        assert stored.highest_ctr == (0 if i in failed else 1)
        assert [r.data for r in reports[i]] == ([] if i in failed else [b"r"])


@pytest_twisted.ensureDeferred
async def test_a_read_ahead_failing_in_a_piggybacked_sync_is_done_again(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(postgres_dsn, batch_max="10")
    await store.open()
    send_prefetch = PostgresTables.send_prefetch
    calls = []

    def failing_once(self: PostgresTables, hints: Any) -> Any:
        calls.append(len(hints))
        sent = send_prefetch(self, hints)
        if calls.count(10) == 2 and len(hints) == 10:  # sent with the first batch's COMMIT
            self.send("SELECT 1 / 0")
        return sent

    try:
        monkeypatch.setattr(PostgresTables, "send_prefetch", failing_once)
        outcomes, _, transactions = await stream_scenario(store, 30)
        sessions = [await store.get_session(b"s%02d" % i) for i in range(30)]
    finally:
        await store.close()
    assert all(isinstance(o, ExchangeResult) for o in outcomes)
    assert transactions == 3
    assert all(s is not None and s.highest_ctr == 1 for s in sessions)
    assert store.fallbacks == 0
    assert calls.count(10) == 4  # the second batch's read-ahead was sent twice
