"""What only the memory store promises: synchronous Deferreds and an undo journal."""

from __future__ import annotations

import copy

import pytest

from m2mgw.errors import KeyConflict
from m2mgw.records import (
    Confirmation,
    DataCommit,
    Delivery,
    HelloCommit,
    Module,
    ModuleKey,
    NewEvent,
    NewInstruction,
    PayloadEffects,
    Report,
    Session,
)
from m2mgw.store import operations
from m2mgw.store.memory import MemoryStore, MemoryStoreFactory, MemoryTables

NOW = 1_700_000_000


def test_usable_without_open_and_every_deferred_has_fired() -> None:
    store = MemoryStoreFactory().create({}, "/nowhere", None)
    added = store.add_modules([Module("m1")])
    assert added.called
    got = store.get_module("m1")
    assert got.called and got.result == Module("m1")
    assert store.schema_version().result == 0


def test_a_failed_operation_leaves_every_table_as_it_was() -> None:
    store = MemoryStore()
    store.add_modules([Module("m1")], [ModuleKey("m1", 1, "p256", b"k")])
    store.set_module_apps("m1", ["app"])
    store.enqueue(NewInstruction("m1", "set", b"", 5), NOW)
    before = copy.deepcopy(store.data)
    tables = MemoryTables(store.data)
    effects = PayloadEffects(
        report=Report("m1", NOW, b"\x00"),
        confirmations=(Confirmation(1, 0, NOW),),
        new_key=ModuleKey("m1", 2, "p256", b"k2"),
        new_instructions=(NewInstruction("m1", "keygen", b"", 5),),
        events=(NewEvent("alert", "m1", {}),),
    )
    session = Session(b"sid", "m1", 1, "p256", 1, b"u", b"d", NOW, NOW + 9)
    hello = HelloCommit(session, 1, NOW, effects, alias=b"alias", delivery=Delivery(100))
    assert operations.accept_hello(tables, hello) is not None
    data = DataCommit(b"sid", 1, 64, b"tok", NOW, effects, delivery=Delivery(100))
    assert operations.accept_data(tables, data) is not None
    assert operations.expire(tables, NOW + 99)["sessions"] == 1
    assert store.data != before
    tables.roll_back()
    assert store.data == before


def test_the_store_rolls_back_an_operation_that_raises_halfway() -> None:
    store = MemoryStore()
    store.add_modules([Module("m1")], [ModuleKey("m1", 1, "p256", b"k")])
    before = copy.deepcopy(store.data)
    # The new modules are inserted before the taken key is found.
    failed = store.add_modules([Module("m2"), Module("m3")], [ModuleKey("m1", 1, "p256", b"x")])
    with pytest.raises(KeyConflict):
        failed.result.raiseException()
    failed.addErrback(lambda _: None)
    assert store.data == before
