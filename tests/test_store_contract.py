"""
The :class:`~m2mgw.interfaces.IModuleStore` contract, run against every store plugin found.

Each store is built by its plugin with default options in a temporary data
directory.  A plugin that declares an ``external_service`` runs only when
``M2MGW_TEST_STORE_<NAME>`` holds its options as a JSON object, and is skipped
otherwise; every other plugin must run here.  The postgres store gets a fresh
database from ``tests/pgharness.py`` (which honours
``M2MGW_TEST_STORE_POSTGRES`` first).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.plugin import IPlugin
from zope.interface.verify import verifyObject

from m2mgw.errors import (
    DuplicateModule,
    InvalidTransition,
    KeyConflict,
    StoreError,
    UnknownInstruction,
    UnknownKey,
    UnknownModule,
)
from m2mgw.interfaces import IModuleStore, IModuleStoreFactory
from m2mgw.records import (
    Confirmation,
    DataCommit,
    Delivery,
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
    Report,
    SecurityEvent,
    ServerKey,
    ServerKeyStatus,
    Session,
)
from m2mgw.registry import all_plugins

NOW = 1_700_000_000
STORE_PLUGINS = all_plugins(IModuleStoreFactory)


def store_options(plugin: Any, request: pytest.FixtureRequest) -> dict[str, str]:
    """The options a plugin is tested with; skips one whose service is not configured."""
    if getattr(plugin, "external_service", None) is None:
        return {}
    if plugin.name == "postgres":
        # tests/pgharness.py: the configured server, or a throwaway cluster.
        return {"dsn": request.getfixturevalue("postgres_dsn")}
    variable = f"M2MGW_TEST_STORE_{plugin.name.upper()}"
    text = os.environ.get(variable)
    if not text:
        pytest.skip(f"{plugin.name} needs {plugin.external_service}: set {variable}")
    options: dict[str, str] = json.loads(text)
    return options


@pytest.fixture(params=sorted(STORE_PLUGINS), name="plugin")
def plugin_fixture(request: pytest.FixtureRequest) -> Any:
    """Each store plugin found."""
    return STORE_PLUGINS[request.param]


@pytest.fixture(name="store")
def store_fixture(plugin: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An opened, empty store of each plugin, closed after the test."""
    from twisted.internet import reactor

    store = plugin.create(store_options(plugin, request), str(tmp_path), reactor)
    pytest_twisted.blockon(store.open())
    yield store
    pytest_twisted.blockon(store.close())


# -- record builders ---------------------------------------------------------------


def module(module_id: str, **fields: Any) -> Module:
    """A module with a PSK."""
    return Module(module_id, psk=bytes(range(16)), created_at=NOW - 100, **fields)


def key(module_id: str, kid: int, **fields: Any) -> ModuleKey:
    """A module key (pending unless said otherwise)."""
    fields.setdefault("created_at", NOW - 50)
    fields.setdefault("suite", "p256")
    return ModuleKey(module_id, kid, public=b"\x04" + bytes([kid]) * 64, **fields)


def session(module_id: str, sid: bytes, kid: int = 0, expires_at: int = NOW + 3600) -> Session:
    """A fresh session (no counter accepted yet)."""
    return Session(sid, module_id, kid, "p256", 1, b"u" * 16, b"d" * 16, NOW, expires_at)


def new_instruction(module_id: str, wire_size: int = 10, **fields: Any) -> NewInstruction:
    """An instruction to queue."""
    return NewInstruction(module_id, fields.pop("kind", "set"), b"\xa0", wire_size, **fields)


def data(sid: bytes, ctr: int, tok: bytes = b"", now: int = NOW + 1, **fields: Any) -> DataCommit:
    """A DATA commit (``tok`` defaults to one derived from ``ctr``)."""
    fields.setdefault("delivery", Delivery(budget=1000))
    return DataCommit(sid, ctr, 64, tok or b"tok-%d" % ctr, now, **fields)


async def provision(store: Any, *module_ids: str, apps: tuple[str, ...] = ()) -> None:
    """Add modules (with applications ``apps``)."""
    await store.add_modules([module(m) for m in module_ids])
    for module_id in module_ids:
        if apps:
            await store.set_module_apps(module_id, apps)


async def open_session(
    store: Any, module_id: str, sid: bytes, ts: int = 1, kid: int = 0, **fields: Any
) -> ExchangeResult:
    """Accept a HELLO that must be accepted."""
    result = await store.accept_hello(HelloCommit(session(module_id, sid, kid), ts, NOW, **fields))
    assert isinstance(result, ExchangeResult)
    return result


async def events_of(store: Any, app: str) -> list[tuple[str, dict[str, Any]]]:
    """``(kind, payload)`` of an application's unacknowledged events."""
    return [(e.kind, dict(e.payload)) for e in await store.events_after(app, 0, 1000)]


def states(instructions: Any) -> list[tuple[int, InstructionState]]:
    """``(iid, state)`` of each instruction."""
    return [(i.iid, i.state) for i in instructions]


# -- the contract ------------------------------------------------------------------


def test_factory_provides_the_interface(plugin: Any) -> None:
    """Every store plugin is an IPlugin and an IModuleStoreFactory with documented options."""
    assert verifyObject(IModuleStoreFactory, plugin)
    assert IPlugin.providedBy(plugin)
    assert all(isinstance(text, str) and text for text in plugin.options.values())


class TestModuleStoreContract:
    """Behaviour every :class:`IModuleStore` shares."""

    # -- lifecycle -----------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_provides_the_interface(self, store: Any, plugin: Any) -> None:
        assert verifyObject(IModuleStore, store)
        assert store.name == plugin.name

    @pytest_twisted.ensureDeferred
    async def test_open_is_idempotent(self, store: Any) -> None:
        await provision(store, "m1")
        await store.open()
        assert isinstance(await store.schema_version(), int)
        assert (await store.get_module("m1")).module_id == "m1"

    @pytest_twisted.ensureDeferred
    async def test_close_is_idempotent(self, store: Any) -> None:
        await store.close()
        await store.close()

    # -- modules -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_module_round_trip(self, store: Any) -> None:
        stored = Module(
            "dev-é1",
            status=ModuleStatus.PENDING_APPROVAL,
            psk=b"\x00" * 32,
            psk_reusable=True,
            group="north",
            last_hello_ts=7,
            created_at=NOW,
        )
        await store.add_modules([stored, Module("plain")])
        assert await store.get_module("dev-é1") == stored
        assert await store.get_module("plain") == Module("plain")
        assert await store.get_module("nobody") is None

    @pytest_twisted.ensureDeferred
    async def test_add_modules_refuses_an_existing_identity_and_adds_nothing(
        self, store: Any
    ) -> None:
        await provision(store, "m1")
        with pytest.raises(DuplicateModule, match="m1"):
            await store.add_modules([module("m2"), module("m1"), module("m3")])
        assert [m.module_id for m in await store.list_modules()] == ["m1"]

    @pytest_twisted.ensureDeferred
    async def test_add_modules_refuses_a_repeated_identity(self, store: Any) -> None:
        with pytest.raises(DuplicateModule):
            await store.add_modules([module("m1"), module("m2"), module("m1")])
        assert await store.count_modules() == 0

    @pytest_twisted.ensureDeferred
    async def test_add_modules_with_keys(self, store: Any) -> None:
        await provision(store, "old")
        keys = [key("m1", 1, status=KeyStatus.ACTIVE), key("old", 1)]
        await store.add_modules([module("m1")], keys)
        assert await store.list_keys("m1") == [keys[0]]
        assert await store.list_keys("old") == [keys[1]]

    @pytest_twisted.ensureDeferred
    async def test_add_modules_key_errors_add_nothing(self, store: Any) -> None:
        with pytest.raises(KeyConflict):
            await store.add_modules([module("m1")], [key("m1", 1), key("m1", 1)])
        with pytest.raises(UnknownModule):
            await store.add_modules([module("m1")], [key("m1", 1), key("ghost", 1)])
        await provision(store, "m2")
        await store.add_key(key("m2", 1))
        with pytest.raises(KeyConflict, match="m2 kid 1"):
            await store.add_modules([module("m1")], [key("m2", 1)])
        with pytest.raises(KeyConflict, match="m2 kid 1"):  # among several
            await store.add_modules([module("m1")], [key("m1", 1), key("m2", 1), key("m1", 2)])
        assert await store.count_modules() == 1
        assert await store.list_keys("m1") == []

    @pytest_twisted.ensureDeferred
    async def test_list_and_count_modules(self, store: Any) -> None:
        ids = ["b", "a", "Z", "é", "z", "a1"]
        await provision(store, *ids)
        assert [m.module_id for m in await store.list_modules()] == sorted(ids)
        assert [m.module_id for m in await store.list_modules(offset=2, limit=3)] == sorted(ids)[
            2:5
        ]
        assert await store.list_modules(offset=10) == []
        assert await store.count_modules() == len(ids)

    @pytest_twisted.ensureDeferred
    async def test_set_module_status(self, store: Any) -> None:
        await provision(store, "m1")
        await store.set_module_status("m1", ModuleStatus.PENDING_APPROVAL)
        assert (await store.get_module("m1")).status is ModuleStatus.PENDING_APPROVAL
        with pytest.raises(UnknownModule):
            await store.set_module_status("ghost", ModuleStatus.DISABLED)

    @pytest_twisted.ensureDeferred
    async def test_disabling_a_module_ends_its_session(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        await open_session(store, "m1", b"sid-1")
        await open_session(store, "m2", b"sid-2")
        await store.set_module_status("m1", ModuleStatus.DISABLED)
        assert await store.get_session(b"sid-1") is None
        assert await store.get_session(b"sid-2") is not None
        assert await store.accept_data(data(b"sid-1", 1)) is None

    # -- keys ----------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_key_round_trip(self, store: Any) -> None:
        await provision(store, "m1")
        full = key(
            "m1",
            2,
            status=KeyStatus.ACTIVE,
            vouched_by=1,
            activated_at=NOW - 10,
            retired_at=None,
            not_after=NOW + 99,
            pid=5,
        )
        await store.add_key(key("m1", 3))
        await store.add_key(full)
        await store.add_key(key("m1", 1, vouched_by=0))
        assert await store.get_key("m1", 2) == full
        assert [k.kid for k in await store.list_keys("m1")] == [1, 2, 3]
        assert await store.get_key("m1", 9) is None
        assert await store.list_keys("ghost") == []

    @pytest_twisted.ensureDeferred
    async def test_add_key_errors(self, store: Any) -> None:
        await provision(store, "m1")
        await store.add_key(key("m1", 1))
        with pytest.raises(KeyConflict):
            await store.add_key(key("m1", 1, suite="x25519"))
        with pytest.raises(UnknownModule):
            await store.add_key(key("ghost", 1))
        assert (await store.get_key("m1", 1)).suite == "p256"

    @pytest_twisted.ensureDeferred
    async def test_add_key_reports_it(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await store.add_key(key("m1", 1))
        assert await events_of(store, "app") == [
            ("key", {"event": "registered", "kid": 1, "status": "pending", "suite": "p256"})
        ]

    @pytest_twisted.ensureDeferred
    async def test_set_key_status_stamps_dates(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await store.add_modules([], [key("m1", 1), key("m1", 2)])
        await store.set_key_status("m1", 1, KeyStatus.ACTIVE, NOW)
        await store.set_key_status("m1", 2, KeyStatus.RETIRED, NOW + 5)
        await store.set_key_status("m1", 2, KeyStatus.REVOKED, NOW + 9)
        one, two = await store.list_keys("m1")
        assert (one.status, one.activated_at, one.retired_at) == (KeyStatus.ACTIVE, NOW, None)
        assert (two.status, two.retired_at) == (KeyStatus.REVOKED, NOW + 5)
        assert [p["status"] for _, p in await events_of(store, "app")] == [
            "active",
            "retired",
            "revoked",
        ]
        with pytest.raises(UnknownKey):
            await store.set_key_status("m1", 7, KeyStatus.ACTIVE, NOW)

    @pytest_twisted.ensureDeferred
    async def test_revoking_a_key_ends_its_sessions(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        await store.add_modules(
            [], [key("m1", 1, status=KeyStatus.ACTIVE), key("m2", 1, status=KeyStatus.ACTIVE)]
        )
        await store.add_key(key("m1", 2))
        await open_session(store, "m1", b"sid-1", kid=1)
        await open_session(store, "m2", b"sid-2", kid=1)
        await store.set_key_status("m1", 2, KeyStatus.REVOKED, NOW)
        assert await store.get_session(b"sid-1") is not None
        await store.set_key_status("m1", 1, KeyStatus.REVOKED, NOW)
        assert await store.get_session(b"sid-1") is None
        assert await store.get_session(b"sid-2") is not None

    # -- server keys ---------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_server_keys(self, store: Any) -> None:
        two = ServerKey(2, "x25519", b"p" * 32, b"s" * 32, created_at=NOW)
        one = ServerKey(1, "p256", b"\x04" * 65)
        await store.add_server_key(two)
        await store.add_server_key(one)
        assert await store.list_server_keys() == [one, two]
        with pytest.raises(KeyConflict):
            await store.add_server_key(ServerKey(1, "p384", b"x"))
        await store.set_server_key_status(1, ServerKeyStatus.RETIRING)
        assert (await store.list_server_keys())[0].status is ServerKeyStatus.RETIRING
        with pytest.raises(UnknownKey):
            await store.set_server_key_status(9, ServerKeyStatus.RETIRED)

    @pytest_twisted.ensureDeferred
    async def test_server_key_deadline(self, store: Any) -> None:
        await store.add_server_key(ServerKey(1, "p256", b"\x04" * 65, retire_after=None))
        await store.set_server_key_status(1, ServerKeyStatus.RETIRING, NOW + 60)
        [retiring] = await store.list_server_keys()
        assert (retiring.status, retiring.retire_after) == (ServerKeyStatus.RETIRING, NOW + 60)
        # Without a deadline the one set stays.
        await store.set_server_key_status(1, ServerKeyStatus.RETIRED)
        [retired] = await store.list_server_keys()
        assert (retired.status, retired.retire_after) == (ServerKeyStatus.RETIRED, NOW + 60)
        await store.add_server_key(ServerKey(2, "rsa", b"k", retire_after=NOW + 9))
        assert (await store.list_server_keys())[1].retire_after == NOW + 9

    @pytest_twisted.ensureDeferred
    async def test_count_instructions_by_idempotency_key(self, store: Any) -> None:
        await provision(store, "m1", "m2", "m3")
        empty = await store.count_instructions("gateway", "skey:2")
        assert empty == {state.value: 0 for state in InstructionState}
        for module_id in ("m1", "m2", "m3"):
            await store.enqueue(
                new_instruction(module_id, kind="skey", source="gateway", idempotency_key="skey:2"),
                NOW,
            )
        # Other sources and keys are not counted.
        await store.enqueue(new_instruction("m1", source="a", idempotency_key="skey:2"), NOW)
        await store.enqueue(new_instruction("m1", source="gateway", idempotency_key="skey:3"), NOW)
        await store.cancel_instruction("m3", 1, NOW + 1)
        await open_session(store, "m2", b"sid-2", delivery=Delivery(budget=1000))  # sent
        counts = await store.count_instructions("gateway", "skey:2")
        assert counts == {**empty, "queued": 1, "sent": 1, "cancelled": 1}

    # -- HELLO ---------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_hello_stores_ts_and_session(self, store: Any) -> None:
        await provision(store, "m1")
        result = await open_session(store, "m1", b"sid-1", ts=42)
        assert result == ExchangeResult()
        assert (await store.get_module("m1")).last_hello_ts == 42
        assert await store.get_session(b"sid-1") == session("m1", b"sid-1")
        assert await store.get_module_session("m1") == session("m1", b"sid-1")
        assert await store.get_module_session("m2") is None

    @pytest_twisted.ensureDeferred
    async def test_hello_for_an_unknown_module(self, store: Any) -> None:
        with pytest.raises(UnknownModule):
            await store.accept_hello(HelloCommit(session("ghost", b"sid"), 1, NOW))

    @pytest_twisted.ensureDeferred
    async def test_hello_with_a_stale_ts_changes_nothing(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await open_session(store, "m1", b"sid-1", ts=10)
        await store.ack_events("app", 99)  # the module's first-seen event
        effects = PayloadEffects(
            report=Report("m1", NOW, b"\x01"), events=(NewEvent("alert", "m1", {}),)
        )
        for ts in (10, 9):
            stale = HelloCommit(session("m1", b"sid-2"), ts, NOW, effects, alias=b"a" * 8)
            assert await store.accept_hello(stale) is None
        assert await store.get_session(b"sid-1") is not None
        assert await store.get_session(b"sid-2") is None
        assert (await store.get_module("m1")).last_hello_ts == 10
        assert await store.list_reports("m1") == []
        assert await store.events_after("app", 0) == []
        assert await store.resolve_alias(b"a" * 8, NOW, False) is None

    @pytest_twisted.ensureDeferred
    async def test_first_accepted_hello_appends_first_seen(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await store.add_modules([module("p1", status=ModuleStatus.PENDING_APPROVAL)])
        await store.set_module_apps("p1", ["app"])
        await open_session(store, "m1", b"sid-1", ts=1)
        await open_session(store, "m1", b"sid-2", ts=2)
        await open_session(store, "p1", b"sid-3", ts=1)
        events = [
            (e.module_id, e.kind, e.payload["event"]) for e in await store.events_after("app", 0)
        ]
        assert events == [("m1", "module", "first-seen"), ("p1", "module", "pending-approval")]

    @pytest_twisted.ensureDeferred
    async def test_set_module_status_with_a_time_appends_a_module_event(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await store.set_module_status("m1", ModuleStatus.DISABLED)  # no time: no event
        await store.set_module_status("m1", ModuleStatus.ENABLED, NOW)
        await store.set_module_status("m1", ModuleStatus.ENABLED, NOW)  # unchanged: no event
        await store.set_module_status("m1", ModuleStatus.DISABLED, NOW + 1)
        assert await events_of(store, "app") == [
            ("module", {"event": "enabled", "module": "m1", "at": NOW}),
            ("module", {"event": "disabled", "module": "m1", "at": NOW + 1}),
        ]

    @pytest_twisted.ensureDeferred
    async def test_hello_ends_the_earlier_session(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"sid-1", ts=1)
        await open_session(store, "m1", b"sid-2", ts=2)
        assert await store.get_session(b"sid-1") is None
        assert (await store.get_session(b"sid-2")).module_id == "m1"
        assert (await store.get_module_session("m1")).sid == b"sid-2"

    @pytest_twisted.ensureDeferred
    async def test_hello_activates_a_pending_key_and_retires_older_ones(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await store.add_modules(
            [],
            [
                key("m1", 1, status=KeyStatus.ACTIVE, activated_at=NOW - 9),
                key("m1", 2),
                key("m1", 3),
                key("m1", 4, status=KeyStatus.REVOKED),
            ],
        )
        await store.add_key(key("m1", 5))
        await store.ack_events("app", 99)
        await open_session(store, "m1", b"sid", ts=5, kid=3)
        keys = {k.kid: k for k in await store.list_keys("m1")}
        assert (keys[3].status, keys[3].activated_at) == (KeyStatus.ACTIVE, NOW)
        assert (keys[1].status, keys[1].retired_at) == (KeyStatus.RETIRED, NOW)
        assert (keys[2].status, keys[2].retired_at) == (KeyStatus.RETIRED, NOW)
        assert keys[4].status is KeyStatus.REVOKED and keys[4].retired_at is None
        assert keys[5].status is KeyStatus.PENDING
        key_events = [p for kind, p in await events_of(store, "app") if kind == "key"]
        assert sorted((p["kid"], p["status"]) for p in key_events) == [
            (1, "retired"),
            (2, "retired"),
            (3, "active"),
        ]

    @pytest_twisted.ensureDeferred
    async def test_hello_with_an_active_key_or_the_psk_changes_no_key(self, store: Any) -> None:
        await provision(store, "m1")
        keys = [key("m1", 1, status=KeyStatus.ACTIVE, activated_at=NOW - 9), key("m1", 2)]
        await store.add_modules([], keys)
        await open_session(store, "m1", b"sid-1", ts=1, kid=0)
        await open_session(store, "m1", b"sid-2", ts=2, kid=1)
        assert await store.list_keys("m1") == keys

    @pytest_twisted.ensureDeferred
    async def test_hello_with_a_withdrawn_credential_is_refused(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        await store.add_modules([], [key("m1", 1, status=KeyStatus.REVOKED)])
        assert await store.accept_hello(HelloCommit(session("m1", b"s", kid=1), 1, NOW)) is None
        assert await store.accept_hello(HelloCommit(session("m1", b"s", kid=2), 1, NOW)) is None
        await store.set_module_status("m2", ModuleStatus.DISABLED)
        assert await store.accept_hello(HelloCommit(session("m2", b"t"), 1, NOW)) is None
        assert (await store.get_module("m1")).last_hello_ts == 0
        assert await store.get_session(b"s") is None and await store.get_session(b"t") is None

    @pytest_twisted.ensureDeferred
    async def test_hello_sid_of_another_live_session_is_refused(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        await open_session(store, "m1", b"same")
        with pytest.raises(StoreError):
            await store.accept_hello(HelloCommit(session("m2", b"same"), 1, NOW))
        assert (await store.get_module("m2")).last_hello_ts == 0
        assert (await store.get_session(b"same")).module_id == "m1"

    @pytest_twisted.ensureDeferred
    async def test_hello_takes_over_the_sid_of_an_expired_session(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        old = HelloCommit(session("m1", b"same", expires_at=NOW), 1, NOW - 10)
        assert await store.accept_hello(old) is not None
        await open_session(store, "m2", b"same")
        assert (await store.get_session(b"same")).module_id == "m2"

    @pytest_twisted.ensureDeferred
    async def test_hello_ts_beyond_64_bit_signed_is_refused(self, store: Any) -> None:
        await provision(store, "m1")
        assert await store.accept_hello(HelloCommit(session("m1", b"s"), 2**63, NOW)) is None
        await open_session(store, "m1", b"s", ts=2**63 - 1)
        assert (await store.get_module("m1")).last_hello_ts == 2**63 - 1

    # -- aliases -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_hello_alias_until_replaced(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        await open_session(store, "m1", b"s1", ts=1, alias=b"alias-one", alias_expires_at=None)
        await open_session(store, "m2", b"s2", ts=1, alias=b"alias-two", alias_expires_at=NOW + 9)
        assert await store.resolve_alias(b"alias-one", NOW + 10**6, False) == "m1"
        assert await store.resolve_alias(b"alias-one", NOW, False) == "m1"
        await open_session(store, "m1", b"s3", ts=2, alias=b"alias-new")
        assert await store.resolve_alias(b"alias-one", NOW, False) is None
        assert await store.resolve_alias(b"alias-new", NOW, False) == "m1"
        assert await store.resolve_alias(b"alias-two", NOW + 8, False) == "m2"
        assert await store.resolve_alias(b"alias-two", NOW + 9, False) is None
        assert await store.resolve_alias(b"unknown", NOW, False) is None

    @pytest_twisted.ensureDeferred
    async def test_hello_without_alias_keeps_the_previous_one(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s1", ts=1, alias=b"alias-one")
        await open_session(store, "m1", b"s2", ts=2)
        assert await store.resolve_alias(b"alias-one", NOW, False) == "m1"

    @pytest_twisted.ensureDeferred
    async def test_resolve_alias_once(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s1", ts=1, alias=b"one-time")
        assert await store.resolve_alias(b"one-time", NOW, True) == "m1"
        assert await store.resolve_alias(b"one-time", NOW, True) is None

    # -- DATA ----------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_data_needs_a_live_session(self, store: Any) -> None:
        await provision(store, "m1")
        assert await store.accept_data(data(b"nope", 1)) is None
        await store.accept_hello(HelloCommit(session("m1", b"s", expires_at=NOW + 60), 1, NOW))
        assert await store.accept_data(data(b"s", 1, now=NOW + 60)) is None
        assert await store.accept_data(data(b"s", 1, now=NOW + 59)) is not None
        await store.end_session(b"s")
        await store.end_session(b"s")
        assert await store.get_session(b"s") is None
        assert await store.accept_data(data(b"s", 2)) is None

    @pytest_twisted.ensureDeferred
    async def test_data_replay_window(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s")
        for ctr in (5, 3, 64):
            assert await store.accept_data(data(b"s", ctr)) is not None, ctr
        for ctr in (5, 3, 64, 0, 2**63):
            assert await store.accept_data(data(b"s", ctr, tok=b"other")) is None, ctr
        stored = await store.get_session(b"s")
        assert stored.highest_ctr == 64
        assert stored.window == 1 | 1 << (64 - 5) | 1 << (64 - 3)
        assert await store.accept_data(data(b"s", 1)) is not None  # 64 - 1 < 64: in the window
        assert (await store.get_session(b"s")).window == stored.window | 1 << 63
        assert await store.accept_data(data(b"s", 65)) is not None
        assert await store.accept_data(data(b"s", 1, tok=b"late")) is None  # now below it

    @pytest_twisted.ensureDeferred
    async def test_data_replay_window_size_is_the_commits(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s")
        assert await store.accept_data(DataCommit(b"s", 10, 4, b"t10", NOW)) is not None
        assert await store.accept_data(DataCommit(b"s", 6, 4, b"t6", NOW)) is None
        assert await store.accept_data(DataCommit(b"s", 7, 4, b"t7", NOW)) is not None

    @pytest_twisted.ensureDeferred
    async def test_data_applies_effects_once_per_tok(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        await open_session(store, "m1", b"s1")
        effects = PayloadEffects(
            report=Report("m1", NOW, b"\xa1\x01\x02", module_ts=NOW - 1),
            events=(NewEvent("report", "m1", {"n": 1}),),
            new_instructions=(new_instruction("m1", kind="keygen", source="gateway"),),
        )
        first = await store.accept_data(data(b"s1", 1, b"T" * 8, effects=effects, outcome=b"res"))
        assert first.duplicate_outcome is None and len(first.created) == 1
        again = await store.accept_data(data(b"s1", 2, b"T" * 8, effects=effects, outcome=b"x"))
        assert again.duplicate_outcome == b"res" and again.created == ()
        # across sessions too
        await open_session(store, "m1", b"s2", ts=2)
        later = await store.accept_data(data(b"s2", 1, b"T" * 8, effects=effects, outcome=b"y"))
        assert later.duplicate_outcome == b"res"
        assert await store.list_reports("m1") == [effects.report]
        assert [k for k, _ in await events_of(store, "app")].count("report") == 1
        assert len(await store.list_instructions("m1")) == 1

    @pytest_twisted.ensureDeferred
    async def test_data_remembers_at_least_16_toks(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s")
        for ctr in range(1, 17):
            await store.accept_data(data(b"s", ctr, b"tok-%02d" % ctr, outcome=b"%d" % ctr))
        for ctr in range(1, 17):
            replayed = await store.accept_data(data(b"s", 100 + ctr, b"tok-%02d" % ctr))
            assert replayed.duplicate_outcome == b"%d" % ctr

    @pytest_twisted.ensureDeferred
    async def test_an_empty_tok_is_not_remembered(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s")
        for ctr in range(1, 17):
            await store.accept_data(data(b"s", ctr, b"tok-%02d" % ctr, outcome=b"%d" % ctr))
        for ctr in range(17, 40):  # malformed bodies: only their ctr counts
            assert await store.accept_data(DataCommit(b"s", ctr, 64, b"", NOW)) is not None
        assert (await store.get_session(b"s")).highest_ctr == 39
        again = await store.accept_data(data(b"s", 40, b"tok-01"))
        assert again.duplicate_outcome == b"1"
        report = PayloadEffects(report=Report("m1", NOW, b"\x00"))
        for ctr in (41, 42):
            result = await store.accept_data(DataCommit(b"s", ctr, 64, b"", NOW, report))
            assert result.duplicate_outcome is None
        assert len(await store.list_reports("m1")) == 2

    @pytest_twisted.ensureDeferred
    async def test_duplicate_data_still_gets_instructions(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s")
        await store.accept_data(data(b"s", 1, b"same-tok"))
        queued = await store.enqueue(new_instruction("m1"), NOW)
        again = await store.accept_data(data(b"s", 2, b"same-tok", outcome=b"o"))
        assert again.duplicate_outcome == b"" and states(again.instructions) == [
            (queued.iid, InstructionState.SENT)
        ]

    @pytest_twisted.ensureDeferred
    async def test_module_time_too_large_is_stored_as_unknown(self, store: Any) -> None:
        await provision(store, "m1")
        await open_session(store, "m1", b"s")
        report = Report("m1", NOW, b"\x00", module_ts=2**64 - 1)
        await store.accept_data(data(b"s", 1, effects=PayloadEffects(report=report)))
        assert (await store.list_reports("m1"))[0].module_ts is None

    # -- payload effects -----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_hello_applies_effects(self, store: Any) -> None:
        await provision(store, "m1", apps=("a1", "a2"))
        report = Report("m1", NOW, b"\x01", module_ts=5)
        effects = PayloadEffects(
            report=report,
            new_key=key("m1", 1, vouched_by=0, not_after=NOW + 100),
            events=(NewEvent("alert", "m1", {"code": "low-battery"}),),
        )
        result = await open_session(store, "m1", b"s", effects=effects)
        assert result.key_recorded
        assert await store.list_reports("m1") == [report]
        assert await store.get_key("m1", 1) == effects.new_key
        first_seen = {"event": "first-seen", "module": "m1", "at": NOW}
        first_seen.update(kid=0, suite="p256", group="default")
        for app in ("a1", "a2"):
            assert await events_of(store, app) == [
                ("module", first_seen),
                ("alert", {"code": "low-battery"}),
                ("key", {"event": "registered", "kid": 1, "status": "pending", "suite": "p256"}),
            ]

    @pytest_twisted.ensureDeferred
    async def test_new_key_with_a_taken_kid_is_not_recorded(self, store: Any) -> None:
        await provision(store, "m1")
        await store.add_key(key("m1", 1, status=KeyStatus.ACTIVE))
        await open_session(store, "m1", b"s", kid=1)
        effects = PayloadEffects(new_key=key("m1", 1, suite="x25519"))
        result = await store.accept_data(data(b"s", 1, effects=effects))
        assert not result.key_recorded
        assert (await store.get_key("m1", 1)).suite == "p256"

    @pytest_twisted.ensureDeferred
    async def test_confirmations(self, store: Any) -> None:
        await provision(store, "m1", apps=("ops",))
        one = await store.enqueue(new_instruction("m1", source="app-a"), NOW)
        two = await store.enqueue(new_instruction("m1"), NOW)
        await open_session(store, "m1", b"s", delivery=Delivery(budget=10))  # only #1 rides
        await store.ack_events("ops", 99)
        await store.ack_events("app-a", 99)
        confirmations = (
            Confirmation(one.iid, 0, NOW - 3, b"\x18\x2a"),
            Confirmation(two.iid, 0, NOW - 3),  # queued, never sent
            Confirmation(99, 0, NOW - 3),  # unknown
            Confirmation(2**64 - 1, 0, NOW - 3),  # unknown and unstorable
        )
        result = await store.accept_data(
            data(b"s", 1, effects=PayloadEffects(confirmations=confirmations))
        )
        confirmed = await store.get_instruction("m1", one.iid)
        assert (confirmed.state, confirmed.exec_ts, confirmed.status, confirmed.result) == (
            InstructionState.CONFIRMED,
            NOW - 3,
            0,
            b"\x18\x2a",
        )
        assert result.ignored_confirmations == 3
        assert states(result.instructions) == [(two.iid, InstructionState.SENT)]  # not #1
        assert result.transitions == (confirmed, result.instructions[0])
        assert await events_of(store, "app-a") == [
            (
                "instruction",
                {
                    "iid": one.iid,
                    "state": "confirmed",
                    "kind": "set",
                    "exec_ts": NOW - 3,
                    "status": 0,
                    "attempts": 1,
                },
            )
        ]
        assert [p["iid"] for _, p in await events_of(store, "ops")] == [two.iid]
        again = await store.accept_data(
            data(b"s", 2, effects=PayloadEffects(confirmations=confirmations[:1]))
        )
        assert again.ignored_confirmations == 1 and again.transitions == ()

    # -- instruction delivery ------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_claim_in_iid_order_within_the_budget(self, store: Any) -> None:
        await provision(store, "m1")
        sizes = [10, 20, 30, 5]
        queued = [await store.enqueue(new_instruction("m1", size), NOW) for size in sizes]
        result = await open_session(store, "m1", b"s", delivery=Delivery(budget=35))
        # 10 + 20 fit; 30 does not, and the 5 behind it waits its turn.
        assert [i.iid for i in result.instructions] == [queued[0].iid, queued[1].iid]
        assert result.more
        for claimed in result.instructions:
            assert (claimed.state, claimed.attempts, claimed.updated_at) == (
                InstructionState.SENT,
                1,
                NOW,
            )
            assert await store.get_instruction("m1", claimed.iid) == claimed
        # The two left behind were queued: they now wait for a later wake-up.
        claimed = len(result.instructions)
        assert result.transitions[:claimed] == result.instructions
        assert states(result.transitions[claimed:]) == [
            (queued[2].iid, InstructionState.WAITING),
            (queued[3].iid, InstructionState.WAITING),
        ]
        exact = await store.accept_data(data(b"s", 1, delivery=Delivery(budget=65)))
        assert [i.attempts for i in exact.instructions] == [2, 2, 1, 1] and not exact.more
        assert exact.transitions == exact.instructions[2:]

    @pytest_twisted.ensureDeferred
    async def test_an_instruction_left_behind_waits_and_is_reported_once(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        queued = await store.enqueue(new_instruction("m1", 30), NOW)
        await open_session(store, "m1", b"s")  # no reply being built: nothing waits
        assert (await store.get_instruction("m1", queued.iid)).state is InstructionState.QUEUED
        for ctr in (1, 2):  # heard from twice with no room: it waits, reported once
            left = await store.accept_data(data(b"s", ctr, delivery=Delivery(budget=29)))
            assert left.instructions == () and left.more
            waiting = await store.get_instruction("m1", queued.iid)
            assert (waiting.state, waiting.attempts) == (InstructionState.WAITING, 0)
        assert states(left.transitions) == []
        rides = await store.accept_data(data(b"s", 3, delivery=Delivery(budget=30)))
        assert states(rides.transitions) == [(queued.iid, InstructionState.SENT)]
        cancelled = await store.enqueue(new_instruction("m1", 50), NOW)
        await store.accept_data(data(b"s", 4, delivery=Delivery(budget=0)))
        assert (await store.cancel_instruction("m1", cancelled.iid, NOW)).state is (
            InstructionState.CANCELLED
        )
        shown = [p for kind, p in await events_of(store, "app") if kind == "instruction"]
        assert [(p["iid"], p["state"]) for p in shown] == [
            (queued.iid, "queued"),
            (queued.iid, "waiting"),
            (queued.iid, "sent"),
            (cancelled.iid, "queued"),
            (cancelled.iid, "waiting"),
            (cancelled.iid, "cancelled"),
        ]

    @pytest_twisted.ensureDeferred
    async def test_no_delivery_claims_nothing(self, store: Any) -> None:
        await provision(store, "m1")
        queued = await store.enqueue(new_instruction("m1"), NOW)
        result = await open_session(store, "m1", b"s")
        assert result.instructions == () and not result.more
        assert await store.get_instruction("m1", queued.iid) == queued
        empty = await store.accept_data(data(b"s", 1, delivery=Delivery(budget=0)))
        assert empty.instructions == () and empty.more

    @pytest_twisted.ensureDeferred
    async def test_sent_instructions_ride_until_max_attempts_then_fail(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        queued = await store.enqueue(new_instruction("m1"), NOW)
        await open_session(store, "m1", b"s")
        for ctr in (1, 2, 3):
            result = await store.accept_data(data(b"s", ctr, delivery=Delivery(100, 3)))
            assert [i.attempts for i in result.instructions] == [ctr]
        result = await store.accept_data(data(b"s", 4, delivery=Delivery(100, 3)))
        assert result.instructions == () and not result.more
        failed = await store.get_instruction("m1", queued.iid)
        assert (failed.state, failed.attempts) == (InstructionState.FAILED, 3)
        assert result.transitions == (failed,)
        states = [p["state"] for kind, p in await events_of(store, "app") if kind == "instruction"]
        assert states == ["queued", "sent", "failed"]

    @pytest_twisted.ensureDeferred
    async def test_instructions_past_not_after_expire_instead_of_riding(self, store: Any) -> None:
        await provision(store, "m1")
        late = await store.enqueue(new_instruction("m1", not_after=NOW), NOW - 9)
        on_time = await store.enqueue(new_instruction("m1", not_after=NOW + 1), NOW - 9)
        await open_session(store, "m1", b"s")
        result = await store.accept_data(data(b"s", 1, now=NOW + 1))
        assert [i.iid for i in result.instructions] == [on_time.iid]
        expired = await store.get_instruction("m1", late.iid)
        assert (expired.state, expired.updated_at) == (InstructionState.EXPIRED, NOW + 1)
        assert expired in result.transitions

    @pytest_twisted.ensureDeferred
    async def test_instructions_created_by_the_message_ride_first(self, store: Any) -> None:
        await provision(store, "m1")
        older = [await store.enqueue(new_instruction("m1", 20), NOW) for _ in range(3)]
        await open_session(store, "m1", b"s")
        effects = PayloadEffects(
            new_instructions=(new_instruction("m1", 25, kind="keygen", source="gateway"),)
        )
        result = await store.accept_data(data(b"s", 1, effects=effects, delivery=Delivery(50)))
        (created,) = result.created
        assert created.iid == older[-1].iid + 1 and created.kind == "keygen"
        # 25 for the new one leaves room for one older instruction of 20.
        assert [i.iid for i in result.instructions] == [older[0].iid, created.iid]
        assert result.more

    # -- instructions --------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_enqueue_assigns_increasing_iids_never_reused(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        first = await store.enqueue(new_instruction("m1", not_after=NOW + 9), NOW)
        assert first == Instruction(
            "m1",
            1,
            "set",
            b"\xa0",
            10,
            InstructionState.QUEUED,
            NOW + 9,
            0,
            "operator",
            None,
            NOW,
            NOW,
        )
        second = await store.enqueue(new_instruction("m1"), NOW + 1)
        await store.cancel_instruction("m1", second.iid, NOW + 2)
        third = await store.enqueue(new_instruction("m1"), NOW + 3)
        assert (second.iid, third.iid) == (2, 3)
        assert (await store.enqueue(new_instruction("m2"), NOW)).iid == 1
        with pytest.raises(UnknownModule):
            await store.enqueue(new_instruction("ghost"), NOW)

    @pytest_twisted.ensureDeferred
    async def test_enqueue_is_idempotent_per_source_and_key(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        first = await store.enqueue(new_instruction("m1", source="a", idempotency_key="k"), NOW)
        again = await store.enqueue(
            new_instruction("m1", 99, source="a", idempotency_key="k"), NOW + 5
        )
        assert again == first
        other_source = await store.enqueue(
            new_instruction("m1", source="b", idempotency_key="k"), NOW
        )
        other_module = await store.enqueue(
            new_instruction("m2", source="a", idempotency_key="k"), NOW
        )
        unkeyed = [await store.enqueue(new_instruction("m1", source="a"), NOW) for _ in "xy"]
        assert [other_source.iid, other_module.iid] == [2, 1]
        assert [i.iid for i in unkeyed] == [3, 4]

    @pytest_twisted.ensureDeferred
    async def test_get_and_list_instructions(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        a1 = await store.enqueue(new_instruction("m1"), NOW + 2)
        b1 = await store.enqueue(new_instruction("m2"), NOW + 1)
        a2 = await store.enqueue(new_instruction("m1"), NOW + 3)
        await store.cancel_instruction("m1", a1.iid, NOW + 4)
        assert await store.get_instruction("m1", a2.iid) == a2
        assert await store.get_instruction("m1", 99) is None
        assert states(await store.list_instructions("m1")) == [
            (1, InstructionState.CANCELLED),
            (2, InstructionState.QUEUED),
        ]
        assert [(i.module_id, i.iid) for i in await store.list_instructions()] == [
            ("m2", b1.iid),
            ("m1", a1.iid),
            ("m1", a2.iid),
        ]
        queued = await store.list_instructions(states=[InstructionState.QUEUED])
        assert [(i.module_id, i.iid) for i in queued] == [("m2", 1), ("m1", 2)]
        both = [InstructionState.QUEUED, InstructionState.CANCELLED]
        assert len(await store.list_instructions("m1", both, limit=1)) == 1
        assert await store.list_instructions("m1", [InstructionState.SENT]) == []

    @pytest_twisted.ensureDeferred
    async def test_cancel_instruction(self, store: Any) -> None:
        await provision(store, "m1", apps=("ops",))
        queued = await store.enqueue(new_instruction("m1"), NOW)
        sent = await store.enqueue(new_instruction("m1"), NOW)
        await open_session(store, "m1", b"s", delivery=Delivery(budget=20))
        await store.ack_events("ops", 99)
        cancelled = await store.cancel_instruction("m1", queued.iid, NOW + 1)
        assert (cancelled.state, cancelled.updated_at) == (InstructionState.CANCELLED, NOW + 1)
        assert (await store.cancel_instruction("m1", sent.iid, NOW)).attempts == 1
        assert await store.get_instruction("m1", queued.iid) == cancelled
        with pytest.raises(InvalidTransition):
            await store.cancel_instruction("m1", queued.iid, NOW)
        with pytest.raises(UnknownInstruction):
            await store.cancel_instruction("m1", 99, NOW)
        assert [(p["iid"], p["state"]) for _, p in await events_of(store, "ops")] == [
            (queued.iid, "cancelled"),
            (sent.iid, "cancelled"),
        ]
        result = await store.accept_data(data(b"s", 1))
        assert result.instructions == ()

    # -- the outbox ----------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_module_apps(self, store: Any) -> None:
        await provision(store, "m1")
        assert await store.get_module_apps("m1") == []
        await store.set_module_apps("m1", ["b", "a", "b"])
        assert await store.get_module_apps("m1") == ["a", "b"]
        await store.set_module_apps("m1", ["c"])
        assert await store.get_module_apps("m1") == ["c"]
        with pytest.raises(UnknownModule):
            await store.set_module_apps("ghost", ["a"])

    @pytest_twisted.ensureDeferred
    async def test_append_events_per_application_sequences(self, store: Any) -> None:
        await provision(store, "m1", apps=("a", "b"))
        await provision(store, "lonely")
        created = await store.append_events(
            [
                NewEvent("report", "m1", {"v": [1, 2], "s": "x"}),
                NewEvent("alert", None, {"n": 1}, app="b"),
                NewEvent("report", "lonely", {}),
                NewEvent("module", "m1", {"x": None}, app="c"),
            ],
            NOW,
        )
        assert [(e.app, e.seq, e.kind, e.module_id, e.created_at) for e in created] == [
            ("a", 1, "report", "m1", NOW),
            ("b", 1, "report", "m1", NOW),
            ("b", 2, "alert", None, NOW),
            ("c", 1, "module", "m1", NOW),
        ]
        assert await store.events_after("b", 0) == created[1:3]
        assert dict(created[0].payload) == {"v": [1, 2], "s": "x"}
        assert await store.events_after("nobody", 0) == []

    @pytest_twisted.ensureDeferred
    async def test_events_after_ack_and_acked_seq(self, store: Any) -> None:
        await provision(store, "m1", apps=("a",))
        for n in range(1, 6):
            await store.append_events([NewEvent("report", "m1", {"n": n})], NOW + n)
        assert [e.seq for e in await store.events_after("a", 1, limit=2)] == [2, 3]
        assert await store.acked_seq("a") == 0
        await store.ack_events("a", 3)
        assert await store.acked_seq("a") == 3
        assert [e.seq for e in await store.events_after("a", 0)] == [4, 5]
        await store.ack_events("a", 2)  # never backwards
        assert await store.acked_seq("a") == 3
        await store.ack_events("a", 50)  # never beyond the last event
        assert await store.acked_seq("a") == 5
        (event,) = await store.append_events([NewEvent("report", "m1", {})], NOW)
        assert event.seq == 6
        assert [e.seq for e in await store.events_after("a", 5)] == [6]
        await store.ack_events("nobody", 3)
        assert await store.acked_seq("nobody") == 0

    @pytest_twisted.ensureDeferred
    async def test_outbox_position_and_apps(self, store: Any) -> None:
        await provision(store, "m1", apps=("b", "a"))
        assert await store.outbox_position("a") == (0, 0)
        assert await store.outbox_apps() == []
        for n in range(3):
            await store.append_events([NewEvent("report", "m1", {"n": n})], NOW)
        await store.ack_events("a", 2)
        assert await store.outbox_position("a") == (2, 3)
        assert await store.outbox_position("b") == (0, 3)
        assert await store.outbox_apps() == ["a", "b"]

    @pytest_twisted.ensureDeferred
    async def test_list_app_modules_and_set_group_apps(self, store: Any) -> None:
        await store.add_modules(
            [module("m3", group="g"), module("m1", group="g"), module("m2"), module("m4")]
        )
        await store.set_module_apps("m4", ["x", "other"])
        assert await store.set_group_apps("g", ["x", "y", "x"]) == 2
        assert await store.get_module_apps("m1") == ["x", "y"]
        assert await store.get_module_apps("m2") == []
        listed = await store.list_app_modules("x")
        assert [m.module_id for m in listed] == ["m1", "m3", "m4"]
        assert listed[0] == await store.get_module("m1")
        assert [m.module_id for m in await store.list_app_modules("x", 1, 1)] == ["m3"]
        assert await store.list_app_modules("nobody") == []
        assert await store.set_group_apps("empty-group", ["x"]) == 0

    @pytest_twisted.ensureDeferred
    async def test_trim_events_by_count_appends_an_alert(self, store: Any) -> None:
        await provision(store, "m1", apps=("a",))
        for n in range(1, 11):
            await store.append_events([NewEvent("report", "m1", {"n": n})], NOW)
        await store.ack_events("a", 2)
        assert await store.trim_events("a", 20, 0, NOW) is None
        alert = await store.trim_events("a", 4, 0, NOW + 5)
        assert (alert.app, alert.seq, alert.kind, alert.module_id) == ("a", 11, "alert", None)
        assert dict(alert.payload) == {
            "origin": "gateway",
            "code": "events-dropped",
            "level": 3,
            "text": alert.payload["text"],
            "dropped": 5,
            "first_seq": 3,
            "last_seq": 7,
        }
        assert [e.seq for e in await store.events_after("a", 0)] == [8, 9, 10, 11]
        assert await store.acked_seq("a") == 7
        # Within the limits now (the alert counts): nothing more is dropped.
        assert await store.trim_events("a", 4, 0, NOW + 6) is None

    @pytest_twisted.ensureDeferred
    async def test_trim_events_by_age(self, store: Any) -> None:
        await provision(store, "m1", apps=("a",))
        for n in range(1, 5):
            await store.append_events([NewEvent("report", "m1", {"n": n})], NOW + n * 100)
        assert await store.trim_events("a", 0, 1000, NOW + 1000) is None
        alert = await store.trim_events("a", 0, 250, NOW + 500)  # older than NOW + 250
        assert (alert.payload["first_seq"], alert.payload["last_seq"]) == (1, 2)
        assert [e.seq for e in await store.events_after("a", 0)] == [3, 4, 5]
        assert await store.trim_events("nobody", 1, 1, NOW) is None

    @pytest_twisted.ensureDeferred
    async def test_event_listeners_hear_committed_events(self, store: Any) -> None:
        heard: list[frozenset[str]] = []
        store.add_event_listener(heard.append)

        def broken(apps: frozenset[str]) -> None:
            raise RuntimeError("a listener that fails")

        store.add_event_listener(broken)
        await provision(store, "m1", apps=("a", "b"))
        await store.append_events([NewEvent("report", "m1", {})], NOW)
        await store.append_events([NewEvent("alert", None, {}, app="c")], NOW)
        queued = await store.enqueue(new_instruction("m1", source="a"), NOW)
        await store.cancel_instruction("m1", queued.iid, NOW)
        with pytest.raises(TypeError):
            await store.append_events([NewEvent("report", "m1", {"b": b"x"})], NOW)
        await store.ack_events("a", 1)
        # report, alert, the instruction queued, then cancelled (acks append nothing)
        assert heard == [frozenset({"a", "b"}), frozenset({"c"})] + [frozenset({"a"})] * 2
        store.remove_event_listener(heard.append)
        store.remove_event_listener(heard.append)
        await store.append_events([NewEvent("report", "m1", {})], NOW)
        assert len(heard) == 4

    @pytest_twisted.ensureDeferred
    async def test_append_events_refuses_a_payload_that_is_not_json(self, store: Any) -> None:
        await provision(store, "m1", apps=("a",))
        with pytest.raises(TypeError):
            await store.append_events(
                [NewEvent("report", "m1", {"ok": 1}), NewEvent("report", "m1", {"b": b"x"})], NOW
            )
        assert await store.events_after("a", 0) == []

    # -- reports and security events -----------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_list_reports_newest_first(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        await open_session(store, "m1", b"s")
        reports = [Report("m1", NOW + t, b"%d" % n) for n, t in enumerate([1, 3, 3, 2])]
        for n, report in enumerate(reports, start=1):
            await store.accept_data(data(b"s", n, effects=PayloadEffects(report=report)))
        assert await store.list_reports("m1") == [reports[2], reports[1], reports[3], reports[0]]
        assert await store.list_reports("m1", limit=1) == [reports[2]]
        assert await store.list_reports("m2") == []

    @pytest_twisted.ensureDeferred
    async def test_security_events(self, store: Any) -> None:
        events = [
            SecurityEvent(NOW + 2, "drop", "bad-tag", "10.0.0.1:5", "m1", "x"),
            SecurityEvent(NOW, "audit", "module-add", "operator"),
            SecurityEvent(NOW + 2, "auth", "stale-ts", claimed_id="m2"),
        ]
        await store.record_security_events(events[:2])
        await store.record_security_events(events[2:])
        assert await store.list_security_events() == [events[1], events[0], events[2]]
        assert await store.list_security_events(since=NOW + 1) == [events[0], events[2]]
        assert await store.list_security_events(limit=1) == [events[1]]

    # -- housekeeping --------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_purge_deletes_old_records_oldest_first_in_bounded_steps(
        self, store: Any
    ) -> None:
        await provision(store, "m1", apps=("ops",))
        await open_session(store, "m1", b"s")
        for ctr in range(1, 6):  # reports received at NOW + 1 ... NOW + 5
            report = Report("m1", NOW + ctr, b"%d" % ctr)
            await store.accept_data(
                data(b"s", ctr, now=NOW + ctr, effects=PayloadEffects(report=report))
            )
        await store.record_security_events(
            [SecurityEvent(NOW + n, "audit", f"r{n}", "operator") for n in (3, 1, 2)]
        )
        done = await store.enqueue(new_instruction("m1", idempotency_key="k"), NOW)
        await store.cancel_instruction("m1", done.iid, NOW + 1)
        late = await store.enqueue(new_instruction("m1"), NOW)
        await store.cancel_instruction("m1", late.iid, NOW + 9)
        waiting = await store.enqueue(new_instruction("m1"), NOW - 100)  # pending: stays
        events_before = await store.events_after("ops", 0, 1000)

        first = await store.purge(
            {"reports": NOW + 4, "security_events": NOW + 3, "instructions": NOW + 5}, limit=2
        )
        assert first == {"reports": 2, "security_events": 2, "instructions": 1}
        assert [r.data for r in await store.list_reports("m1")] == [b"5", b"4", b"3"]
        assert [e.reason for e in await store.list_security_events()] == ["r3"]
        assert await store.get_instruction("m1", done.iid) is None
        assert (await store.get_instruction("m1", late.iid)).state is InstructionState.CANCELLED
        assert (await store.get_instruction("m1", waiting.iid)).state is InstructionState.QUEUED
        second = await store.purge({"reports": NOW + 4}, limit=2)
        assert second == {"reports": 1}
        assert [r.data for r in await store.list_reports("m1")] == [b"5", b"4"]
        assert await store.purge({}, limit=2) == {}
        # Nothing else changed: no event, iids not reused, the idempotency key free again.
        assert await store.events_after("ops", 0, 1000) == events_before
        again = await store.enqueue(new_instruction("m1", idempotency_key="k"), NOW + 10)
        assert again.iid > waiting.iid
        with pytest.raises(ValueError):
            await store.purge({"sessions": NOW})

    @pytest_twisted.ensureDeferred
    async def test_expire(self, store: Any) -> None:
        await provision(store, "m1", "m2", "m3", apps=("ops",))
        await store.accept_hello(
            HelloCommit(
                session("m1", b"s1", expires_at=NOW + 10),
                1,
                NOW,
                alias=b"alias-1",
                alias_expires_at=NOW + 10,
            )
        )
        await store.accept_hello(
            HelloCommit(
                session("m2", b"s2", expires_at=NOW + 11),
                1,
                NOW,
                alias=b"alias-2",
                alias_expires_at=None,
            )
        )
        ending = await store.enqueue(new_instruction("m3", not_after=NOW + 9), NOW)
        lasting = await store.enqueue(new_instruction("m3", not_after=NOW + 10), NOW)
        done = await store.enqueue(new_instruction("m3", not_after=NOW), NOW)
        await store.cancel_instruction("m3", done.iid, NOW)
        await store.add_modules(
            [],
            [
                key("m3", 1, status=KeyStatus.ACTIVE, not_after=NOW + 9),
                key("m3", 2, not_after=NOW + 9),
                key("m3", 3, not_after=NOW + 10),
                key("m3", 4, status=KeyStatus.RETIRED, not_after=NOW),
                key("m3", 5, status=KeyStatus.ACTIVE),
            ],
        )
        await store.ack_events("ops", 99)
        counts = await store.expire(NOW + 10)
        assert counts == {"sessions": 1, "aliases": 1, "instructions": 1, "keys": 2}
        assert await store.get_session(b"s1") is None
        assert await store.get_session(b"s2") is not None
        assert await store.resolve_alias(b"alias-1", 0, False) is None
        assert await store.resolve_alias(b"alias-2", NOW + 99, False) == "m2"
        assert states(await store.list_instructions("m3")) == [
            (ending.iid, InstructionState.EXPIRED),
            (lasting.iid, InstructionState.QUEUED),
            (done.iid, InstructionState.CANCELLED),
        ]
        assert [k.status for k in await store.list_keys("m3")] == [
            KeyStatus.EXPIRED,
            KeyStatus.EXPIRED,
            KeyStatus.PENDING,
            KeyStatus.RETIRED,
            KeyStatus.ACTIVE,
        ]
        assert (await store.get_key("m3", 1)).retired_at == NOW + 10
        assert sorted(
            (kind, p["status"] if kind == "key" else p["state"])
            for kind, p in await events_of(store, "ops")
        ) == [
            ("instruction", "expired"),
            ("key", "expired"),
            ("key", "expired"),
        ]
        assert await store.expire(NOW + 10) == {
            "sessions": 0,
            "aliases": 0,
            "instructions": 0,
            "keys": 0,
        }


# -- the key lifecycle (issue 4) ---------------------------------------------------


def keygen(module_id: str, kid: int, suite: str = "p256", source: str = "gateway") -> Any:
    """A ``keygen`` instruction for ``kid`` (its body a Params map)."""
    from m2mgw.protocol import cbor

    body = cbor.encode({1: suite, 5: 3600, 6: bytes(32), 7: kid, 9: 1})
    return NewInstruction(module_id, "keygen", body, 80, source=source)


class TestKeyLifecycleContract:
    """Approval, held events, keygen requests, the rotation query and grace."""

    @pytest_twisted.ensureDeferred
    async def test_pending_approval_holds_events_and_instructions(self, store: Any) -> None:
        await store.add_modules(
            [module("m1", status=ModuleStatus.PENDING_APPROVAL, group="north")],
            apps={"m1": ["app"]},
        )
        queued = await store.enqueue(new_instruction("m1"), NOW)
        report = NewEvent("report", "m1", {"n": 1})
        alert = NewEvent("alert", "m1", {"code": "tamper"})
        key_event = NewEvent("key", "m1", {"event": "rejected"})
        result = await open_session(
            store,
            "m1",
            b"s",
            effects=PayloadEffects(report=Report("m1", NOW, b"\x01"), events=(report, alert)),
            delivery=Delivery(budget=1000),
        )
        assert result.instructions == () and not result.more
        more = await store.accept_data(
            data(
                b"s",
                1,
                effects=PayloadEffects(events=(NewEvent("report", "m1", {"n": 2}), key_event)),
            )
        )
        assert more.instructions == () and not more.more
        shown = await events_of(store, "app")
        # The instruction could not ride, the module not being approved: it waits (once).
        assert [p["state"] for k, p in shown if k == "instruction"] == ["queued", "waiting"]
        assert [(k, p) for k, p in shown if k != "instruction"] == [
            (
                "module",
                {
                    "event": "pending-approval",
                    "module": "m1",
                    "at": NOW,
                    "kid": 0,
                    "suite": "p256",
                    "group": "north",
                },
            ),
            ("key", {"event": "rejected"}),  # not data: not held
        ]
        assert len(await store.list_reports("m1")) == 1
        # Only the first accepted HELLO raises the event.
        await open_session(store, "m1", b"t", ts=2)
        assert len(await events_of(store, "app")) == 4

        approved = await store.decide_approval("m1", True, NOW + 5)
        assert approved.status is ModuleStatus.ENABLED
        assert (await store.get_module("m1")).status is ModuleStatus.ENABLED
        assert (await events_of(store, "app"))[4:] == [
            ("module", {"event": "approved", "module": "m1", "at": NOW + 5}),
            ("report", {"n": 1}),
            ("alert", {"code": "tamper"}),
            ("report", {"n": 2}),
        ]
        flowing = await store.accept_data(data(b"t", 1))
        assert states(flowing.instructions) == [(queued.iid, InstructionState.SENT)]
        with pytest.raises(InvalidTransition):
            await store.decide_approval("m1", True, NOW)
        with pytest.raises(UnknownModule):
            await store.decide_approval("ghost", True, NOW)

    @pytest_twisted.ensureDeferred
    async def test_refusal_disables_and_forgets_the_held_events(self, store: Any) -> None:
        await store.add_modules(
            [module("m1", status=ModuleStatus.PENDING_APPROVAL)], apps={"m1": ["app"]}
        )
        await open_session(
            store, "m1", b"s", effects=PayloadEffects(events=(NewEvent("report", "m1", {}),))
        )
        refused = await store.decide_approval("m1", False, NOW + 1)
        assert refused.status is ModuleStatus.DISABLED
        assert await store.get_session(b"s") is None
        assert [p["event"] for _, p in await events_of(store, "app")] == [
            "pending-approval",
            "disabled",
        ]
        await store.set_module_status("m1", ModuleStatus.PENDING_APPROVAL)
        await store.decide_approval("m1", True, NOW + 2)
        assert [k for k, _ in await events_of(store, "app")] == ["module"] * 3  # nothing released

    @pytest_twisted.ensureDeferred
    async def test_a_queued_keygen_is_a_key_event_requested(self, store: Any) -> None:
        await provision(store, "m1", apps=("app",))
        queued = await store.enqueue(keygen("m1", 2, source="billing"), NOW)
        odd = await store.enqueue(NewInstruction("m1", "keygen", b"\xf6", 10), NOW)  # not Params
        shown = await events_of(store, "app")
        # Every instruction is reported queued, to the application that submitted it
        # (billing) or, for the operator's, to every application of the module.
        assert [(p["iid"], p["state"]) for k, p in shown if k == "instruction"] == [
            (odd.iid, "queued")
        ]
        assert [(p["iid"], p["state"]) for k, p in await events_of(store, "billing")] == [
            (queued.iid, "queued")
        ]
        assert [(k, p) for k, p in shown if k != "instruction"] == [
            (
                "key",
                {
                    "event": "requested",
                    "kid": 2,
                    "status": None,
                    "suite": "p256",
                    "pid": 1,
                    "iid": queued.iid,
                    "source": "billing",
                },
            )
        ]

    @pytest_twisted.ensureDeferred
    async def test_enqueue_keygen_one_rotation_at_a_time(self, store: Any) -> None:
        await provision(store, "m1", "m2")
        first = await store.enqueue_keygen(keygen("m1", 2), NOW)
        assert first is not None and first.kind == "keygen"
        assert await store.enqueue_keygen(keygen("m1", 2), NOW) is None
        await store.cancel_instruction("m1", first.iid, NOW)
        assert await store.enqueue_keygen(keygen("m1", 2), NOW) is not None
        # A registered key not yet active is a rotation under way too.
        await store.add_key(key("m2", 2))
        assert await store.enqueue_keygen(keygen("m2", 3), NOW) is None
        with pytest.raises(UnknownModule):
            await store.enqueue_keygen(keygen("ghost", 1), NOW)
        assert len(await store.list_instructions("m1")) == 2

    @pytest_twisted.ensureDeferred
    async def test_keys_due_for_rotation(self, store: Any) -> None:
        from m2mgw.records import RotationQuery

        active = {"status": KeyStatus.ACTIVE}
        await store.add_modules(
            [
                module("old"),
                module("young"),
                module("expiring", group="north"),
                module("x-suite"),
                module("busy"),
                module("pending"),
                module("off", status=ModuleStatus.DISABLED),
                module("waiting", status=ModuleStatus.PENDING_APPROVAL),
                module("no-key"),
            ],
            [
                key("old", 1, activated_at=NOW - 1000, **active),
                key("old", 2, status=KeyStatus.RETIRED, activated_at=NOW - 5000),
                key("young", 1, activated_at=NOW - 10, **active),
                key("expiring", 3, activated_at=NOW - 10, not_after=NOW + 50, **active),
                key("x-suite", 1, suite="x25519", activated_at=NOW, **active),
                key("busy", 1, activated_at=NOW - 1000, **active),
                key("pending", 1, activated_at=NOW - 1000, **active),
                key("pending", 2),
                key("off", 1, activated_at=NOW - 1000, **active),
                key("waiting", 1, activated_at=NOW - 1000, **active),
            ],
        )
        await store.enqueue(keygen("busy", 2), NOW)

        async def due(limit: int = 100, **query: Any) -> list[tuple[str, int]]:
            found = await store.keys_due_for_rotation(RotationQuery(**query), limit)
            return [(k.module_id, k.kid) for k in found]

        assert await due() == []  # no criterion: nothing
        assert await due(activated_before=NOW - 500) == [("old", 1)]
        assert await due(expiring_before=NOW + 50) == [("expiring", 3)]
        assert await due(expiring_before=NOW + 49) == []
        assert await due(suites=("x25519",)) == [("x-suite", 1)]
        both = {"activated_before": NOW - 5, "expiring_before": NOW + 100}
        assert await due(**both) == [("expiring", 3), ("old", 1), ("young", 1)]
        assert await due(**both, groups=("north",)) == [("expiring", 3)]
        assert await due(**both, groups=()) == []
        assert await due(**both, exclude_groups=("north",)) == [("old", 1), ("young", 1)]
        assert await due(limit=1, **both) == [("expiring", 3)]
        assert await due(limit=2, **both, after_module="expiring") == [("old", 1), ("young", 1)]
        # The key activated later counts from its activation; one never activated, its creation.
        await store.add_modules([module("imported")], [key("imported", 1, **active)])
        assert await due(activated_before=NOW - 50) == [("imported", 1), ("old", 1)]

    @pytest_twisted.ensureDeferred
    async def test_a_grace_hello_accepts_an_expired_key_and_changes_no_key(
        self, store: Any
    ) -> None:
        await provision(store, "m1")
        await store.add_key(key("m1", 1, status=KeyStatus.EXPIRED, not_after=NOW - 5))
        refused = await store.accept_hello(HelloCommit(session("m1", b"s", 1), 1, NOW))
        assert refused is None
        await open_session(store, "m1", b"s", kid=1, expired_key_grace=True)
        assert (await store.get_key("m1", 1)).status is KeyStatus.EXPIRED
        await store.set_key_status("m1", 1, KeyStatus.REVOKED, NOW)
        revoked = HelloCommit(session("m1", b"t", 1), 2, NOW, expired_key_grace=True)
        assert await store.accept_hello(revoked) is None
