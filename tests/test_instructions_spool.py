"""
Tests for m2mgw.instructions.spool (and the shared rules of
m2mgw.instructions.submission): the file format, the directory operations,
the source on a fake clock with an inline thread pool, the plugin's options,
and the real service tree picking up a dropped file.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs

from m2mgw.errors import ConfigError, StoreError
from m2mgw.instructions.spool import (
    DEFAULT_MAX_INSTRUCTION_BYTES,
    FILES_PER_SCAN,
    SpoolDirectory,
    SpoolFile,
    SpoolSource,
    SpoolSourceFactory,
    parse_spool_file,
)
from m2mgw.instructions.submission import (
    MAX_BODY_DEPTH,
    InvalidInstruction,
    encoded_wire_size,
    new_instruction,
)
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import instruction_wire_size
from m2mgw.records import InstructionState, Module
from m2mgw.service import QueueSink, find_service
from m2mgw.store.memory import MemoryStore
from m2mgw.tap import Options, makeService
from tests.doubles import fired
from tests.instruction_source_helpers import RecordingSink, ThreadedClock, drop_file

NOW = 1_700_000_000


def spool_file(content: Any, name: str = "a.json", mtime_ns: int = 5) -> SpoolFile:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    return SpoolFile(name, data, mtime_ns)


def parse(content: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("max_size", DEFAULT_MAX_INSTRUCTION_BYTES)
    return parse_spool_file(spool_file(content), now=NOW, source="spool", **kwargs)


# -- the shared rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "not_after"),
    [("set", None, None), ("config", {"a": [1, 2.5, True, "x" * 300]}, 2**40), ("k", -(2**70), 5)],
)
def test_encoded_wire_size_is_the_protocol_size(kind: str, body: Any, not_after: Any) -> None:
    assert encoded_wire_size(kind, cbor.encode(body), not_after) == instruction_wire_size(
        kind, body, not_after
    )


def test_new_instruction_refuses_what_could_never_be_delivered() -> None:
    deep: Any = 1
    for _ in range(MAX_BODY_DEPTH - 1):
        deep = [deep]
    assert new_instruction("m", "set", deep, now=NOW, source="spool").body == cbor.encode(deep)
    with pytest.raises(InvalidInstruction, match="nested more than"):
        new_instruction("m", "set", [deep], now=NOW, source="spool")
    with pytest.raises(InvalidInstruction, match="beyond"):
        new_instruction("m", "set", None, now=NOW, source="spool", not_after=2**63)
    for module_id in ("", "x" * 65, "\ud800"):
        with pytest.raises(InvalidInstruction, match="module id"):
            new_instruction(module_id, "set", None, now=NOW, source="spool")


# -- the file format -------------------------------------------------------------------------


def test_a_complete_file() -> None:
    new = parse(
        {
            "module": "m-1",
            "kind": "set",
            "body": {"interval": 60},
            "ttl": 600,
            "idempotency_key": "ticket-1",
        }
    )
    assert (new.module_id, new.kind, new.source) == ("m-1", "set", "spool")
    assert cbor.decode(new.body) == {"interval": 60}
    assert new.not_after == NOW + 600
    assert new.idempotency_key == "ticket-1"
    assert new.wire_size == instruction_wire_size("set", {"interval": 60}, NOW + 600)


def test_minimal_file_and_byte_order_mark() -> None:
    text = '\ufeff{"module": "m", "kind": "rehello", "not_after": ' + f"{NOW + 5}}}"
    new = parse(text.encode("utf-8"))
    assert new.body == cbor.encode(None) and new.not_after == NOW + 5


def test_default_idempotency_key_tells_files_apart() -> None:
    content = {"module": "m", "kind": "set"}
    key = parse_spool_file(spool_file(content), now=NOW, source="spool", max_size=None)
    again = parse_spool_file(spool_file(content), now=NOW + 9, source="spool", max_size=None)
    assert key.idempotency_key == again.idempotency_key  # the same file, read again
    assert key.idempotency_key is not None and key.idempotency_key.startswith("file:a.json:")
    others = [
        spool_file(content, name="b.json"),
        spool_file(content, mtime_ns=6),
        spool_file({"module": "m", "kind": "set", "body": 1}),
    ]
    keys = {
        parse_spool_file(f, now=NOW, source="spool", max_size=None).idempotency_key for f in others
    }
    assert len(keys) == 3 and key.idempotency_key not in keys


REFUSED = {
    "not utf-8": (b'{"module": "\xff"}', "not UTF-8"),
    "not json": (b'{"module": ', "the file is not JSON"),
    "nan": (b'{"module": "m", "kind": "set", "body": NaN}', "not JSON"),
    "array": ([1, 2], "holds a JSON array, not an object"),
    "unknown key": ({"module": "m", "kind": "set", "not_afer": 5}, "unknown key 'not_afer'"),
    "no module": ({"kind": "set"}, "'module' is missing"),
    "module number": ({"module": 7, "kind": "set"}, "'module' must be a string, not a number"),
    "no kind": ({"module": "m"}, "'kind' is missing"),
    "reserved kind": ({"module": "m", "kind": "keygen"}, "'keygen' is reserved"),
    "skey": ({"module": "m", "kind": "skey", "body": {}}, "'skey' is reserved"),
    "rehello body": ({"module": "m", "kind": "rehello", "body": 1}, "has no body"),
    "bad kind": ({"module": "m", "kind": "a\tb"}, "printable"),
    "ttl bool": ({"module": "m", "kind": "set", "ttl": True}, "'ttl' must be an integer"),
    "ttl float": ({"module": "m", "kind": "set", "ttl": 1.5}, "'ttl' must be an integer"),
    "ttl zero": ({"module": "m", "kind": "set", "ttl": 0}, "at least 1 second"),
    "both": ({"module": "m", "kind": "set", "ttl": 5, "not_after": NOW + 9}, "not both"),
    "past": ({"module": "m", "kind": "set", "not_after": NOW}, "not in the future"),
    "too large": ({"module": "m", "kind": "set", "body": "x" * 2000}, "no reply can carry"),
    "empty key": ({"module": "m", "kind": "set", "idempotency_key": ""}, "idempotency_key"),
    "key number": ({"module": "m", "kind": "set", "idempotency_key": 3}, "idempotency_key"),
}


@pytest.mark.parametrize(("content", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_files(content: Any, reason: str) -> None:
    with pytest.raises(InvalidInstruction, match=reason) as raised:
        parse(content)
    assert "\n" not in str(raised.value)


# -- the directory ---------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_prepare_creates_private_directories(tmp_path: Path) -> None:
    directory = SpoolDirectory(str(tmp_path / "deep" / "spool"))
    old_umask = os.umask(0)
    try:
        directory.prepare()
    finally:
        os.umask(old_umask)
    for path in ("deep/spool", "deep/spool/accepted", "deep/spool/rejected"):
        assert mode(tmp_path / path) == 0o700, path
    directory.prepare()  # again: nothing to do


def test_prepare_refuses_unusable_directories(tmp_path: Path) -> None:
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by every user"):
        SpoolDirectory(str(open_to_all)).prepare()
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"cannot create spool directory {a_file}"):
        SpoolDirectory(str(a_file)).prepare()


def test_pending_names_are_due_files_in_order(tmp_path: Path) -> None:
    directory = SpoolDirectory(str(tmp_path))
    directory.prepare()
    for name in ("b.json", "a.json", "c.json.tmp", ".d.json", "e.txt", "10.json", "9.json"):
        (tmp_path / name).write_text("{}")
    assert directory.pending() == ["10.json", "9.json", "a.json", "b.json"]
    assert directory.pending(2) == ["10.json", "9.json"]


def test_read(tmp_path: Path) -> None:
    directory = SpoolDirectory(str(tmp_path), max_file_bytes=10)
    (tmp_path / "ok.json").write_bytes(b"0123456789")
    read = directory.read("ok.json")
    assert read is not None
    assert (read.name, read.data) == ("ok.json", b"0123456789")
    assert read.mtime_ns == (tmp_path / "ok.json").stat().st_mtime_ns
    assert directory.read("gone.json") is None
    (tmp_path / "big.json").write_bytes(b"01234567890")
    with pytest.raises(InvalidInstruction, match="larger than 10 bytes"):
        directory.read("big.json")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "ok.json")
    names = ["dir.json", "link.json"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.json")  # must not block a pool thread
        names.append("fifo.json")
    for name in names:
        with pytest.raises(InvalidInstruction, match="not a regular file"):
            directory.read(name)


def test_accept_and_reject_move_files_aside_with_a_record(tmp_path: Path) -> None:
    directory = SpoolDirectory(str(tmp_path))
    directory.prepare()
    for round_ in range(3):
        (tmp_path / "x.json").write_text(str(round_))
        assert directory.accept("x.json", 40 + round_) == ("x.json", "x.1.json", "x.2.json")[round_]
    accepted = tmp_path / "accepted"
    assert (accepted / "x.1.json").read_text() == "1"
    assert (accepted / "x.1.json.iid").read_text() == "41\n"
    (tmp_path / "y.json").mkdir()
    assert directory.reject("y.json", "not a regular\nfile") == "y.json"
    assert (tmp_path / "rejected" / "y.json").is_dir()
    assert (tmp_path / "rejected" / "y.json.reason").read_text() == "not a regular file\n"
    assert mode(tmp_path / "rejected" / "y.json.reason") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accepted", "rejected"]
    # A file removed before it could be moved leaves its record.
    assert directory.reject("gone.json", "why") == "gone.json"
    assert (tmp_path / "rejected" / "gone.json.reason").read_text() == "why\n"


# -- the source --------------------------------------------------------------------------------


class Spool:
    """A spool source on a fake clock, its directory and a recording sink."""

    def __init__(self, path: Path, interval: float = 2.0) -> None:
        self.path = path
        self.clock = ThreadedClock()
        self.clock.advance(NOW)
        self.sink = RecordingSink()
        self.source = SpoolSource(SpoolDirectory(str(path)), self.clock, interval=interval)

    def start(self) -> None:
        started = self.source.start(self.sink)
        assert fired(started)

    def drop(self, name: str, module: str = "m", **fields: Any) -> None:
        self.path.mkdir(exist_ok=True)
        drop_file(self.path, name, {"module": module, "kind": "set", **fields})

    def files(self, where: str = "") -> list[str]:
        return sorted(p.name for p in (self.path / where).iterdir() if p.is_file())

    def bodies(self) -> list[Any]:
        return [cbor.decode(new.body) for new in self.sink.received]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_files_waiting_at_start_are_queued_in_name_order(spool: Spool) -> None:
    for n in (3, 1, 2):
        spool.drop(f"{n}.json", body=n)
    spool.start()
    assert mode(spool.path / "accepted") == mode(spool.path / "rejected") == 0o700
    assert spool.bodies() == [1, 2, 3]
    assert spool.files("accepted") == [f"{n}.json{x}" for n in (1, 2, 3) for x in ("", ".iid")]
    assert (spool.path / "accepted" / "3.json.iid").read_text() == "3\n"
    assert spool.files() == []
    assert spool.source.accepted == 3


def test_a_dropped_file_is_queued_at_the_next_scan(spool: Spool) -> None:
    spool.start()
    spool.drop("a.json", body={"x": 1})
    spool.drop("b.json.tmp")  # still being written
    spool.clock.advance(1.9)
    assert spool.sink.received == []
    spool.clock.advance(0.1)
    assert spool.bodies() == [{"x": 1}]
    assert spool.files() == ["b.json.tmp"]
    spool.clock.advance(2)
    assert len(spool.sink.received) == 1


def test_refused_files_are_rejected_with_a_reason(spool: Spool) -> None:
    spool.path.mkdir()
    drop_file(spool.path, "1.json", b"{oops", raw=True)
    spool.drop("2.json", kind="keygen")
    spool.drop("3.json", module="ghost")
    spool.drop("4.json", module="m")
    spool.sink.unknown.add("ghost")
    with capturedLogs() as events:
        spool.start()
    reasons = {
        name: (spool.path / "rejected" / f"{name}.reason").read_text()
        for name in ("1.json", "2.json", "3.json")
    }
    assert reasons["1.json"].startswith("the file is not JSON: ")
    assert reasons["2.json"].startswith("'keygen' is reserved")
    assert reasons["3.json"] == "unknown module 'ghost'\n"
    assert all(r.count("\n") == 1 and r.endswith("\n") for r in reasons.values())
    assert spool.files("rejected") == sorted([*reasons, *(f"{n}.reason" for n in reasons)])
    assert spool.files("accepted") == ["4.json", "4.json.iid"]
    assert (spool.source.accepted, spool.source.rejected) == (1, 3)
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert [e["name"] for e in warnings] == ["1.json", "2.json", "3.json"]


def test_a_store_failure_leaves_the_file_for_the_next_scan_in_order(spool: Spool) -> None:
    spool.drop("1.json", body=1)
    spool.drop("2.json", body=2)
    spool.sink.fail_with = StoreError("database is locked")
    with capturedLogs() as events:
        spool.start()
    assert spool.bodies() == [1]  # the scan ended: 2.json was not tried before 1.json
    assert spool.files() == ["1.json", "2.json"]
    assert spool.source.retried == 1
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1 and failures[0]["name"] == "1.json"
    spool.sink.fail_with = None
    spool.clock.advance(2)
    assert spool.bodies() == [1, 1, 2]
    first_try, second_try = spool.sink.received[:2]
    assert first_try.idempotency_key == second_try.idempotency_key
    assert spool.files() == [] and spool.source.accepted == 2


@pytest_twisted.ensureDeferred
async def test_a_crash_between_commit_and_move_does_not_queue_twice(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore()
    await store.add_modules([Module("m")])
    sink = QueueSink(store, spool.clock)
    spool.drop("1.json", body=1)

    def crash(self: SpoolDirectory, name: str, iid: int) -> str:
        raise OSError("killed")

    monkeypatch.setattr(SpoolDirectory, "accept", crash)
    with capturedLogs():
        assert fired(spool.source.start(sink))
        assert fired(spool.source.stop())
    assert len(await store.list_instructions("m")) == 1
    assert spool.files() == ["1.json"]
    monkeypatch.undo()
    # The gateway starts again: the file is read again and queued once.
    again = SpoolSource(SpoolDirectory(str(spool.path)), spool.clock, interval=2.0)
    assert fired(again.start(sink))
    [queued] = await store.list_instructions("m")
    assert queued.source == "spool" and cbor.decode(queued.body) == 1
    assert (spool.path / "accepted" / "1.json.iid").read_text() == f"{queued.iid}\n"
    assert spool.files() == []
    # A new file of the same name is a new instruction.
    spool.drop("1.json", body=1, ttl=60)
    spool.clock.advance(2)
    assert [i.iid for i in await store.list_instructions("m")] == [queued.iid, queued.iid + 1]
    assert spool.files("accepted") == ["1.1.json", "1.1.json.iid", "1.json", "1.json.iid"]


def test_stop_finishes_the_file_in_progress_and_starts_no_other(spool: Spool) -> None:
    spool.drop("1.json", body=1)
    spool.drop("2.json", body=2)
    spool.sink.hold = True
    spool.start()
    assert spool.bodies() == [1]
    stopped = spool.source.stop()
    assert not fired(stopped)
    again = spool.source.stop()
    assert not fired(again)
    spool.sink.pending[0].callback(None)
    assert fired(stopped) and fired(again)
    assert spool.files("accepted") == ["1.json", "1.json.iid"]
    assert spool.files() == ["2.json"]
    spool.clock.advance(10)
    assert spool.bodies() == [1]
    assert fired(spool.source.stop())


def test_stop_while_preparing_starts_no_scan(spool: Spool) -> None:
    spool.drop("1.json")
    spool.clock.pool.hold = True
    started = spool.source.start(spool.sink)
    stopped = spool.source.stop()
    assert not fired(started) and not fired(stopped)
    spool.clock.pool.release()
    assert fired(started) and fired(stopped)
    spool.clock.advance(10)
    assert spool.sink.received == [] and spool.files() == ["1.json"]
    # Started again once stopped, it works.
    spool.start()
    assert len(spool.sink.received) == 1
    with pytest.raises(RuntimeError):
        spool.source.start(spool.sink)


def test_file_io_runs_in_the_thread_pool(spool: Spool) -> None:
    spool.drop("1.json")
    spool.clock.pool.hold = True
    spool.source.start(spool.sink)
    assert spool.clock.pool.held and spool.sink.received == []
    spool.clock.pool.release()
    # prepare, scan, read, accept (a scan that finds fewer than FILES_PER_SCAN is the last)
    assert spool.clock.pool.runs == 4 and len(spool.sink.received) == 1


def test_a_backlog_drains_in_one_scan(spool: Spool) -> None:
    count = FILES_PER_SCAN * 2 + 5
    for n in range(count):
        spool.drop(f"{n:04d}.json", body=n)
    spool.start()
    assert spool.bodies() == list(range(count))
    assert spool.files() == []


def test_a_failing_scan_is_logged_and_retried(spool: Spool) -> None:
    spool.start()
    for path in (spool.path / "accepted", spool.path / "rejected", spool.path):
        path.rmdir()
    with capturedLogs() as events:
        spool.clock.advance(2)
    [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
    assert "No such file or directory" in warning["error"]
    SpoolDirectory(str(spool.path)).prepare()
    spool.drop("1.json")
    spool.clock.advance(2)
    assert len(spool.sink.received) == 1


def test_start_fails_on_an_unusable_directory(spool: Spool) -> None:
    spool.path.mkdir()
    spool.path.chmod(0o777)
    failures: list[Any] = []
    spool.source.start(spool.sink).addErrback(failures.append)
    assert failures and failures[0].check(ConfigError)
    assert fired(spool.source.stop())
    spool.path.chmod(0o700)
    spool.drop("1.json")
    spool.start()  # the operator fixed it: it starts
    assert len(spool.sink.received) == 1


# -- the plugin ---------------------------------------------------------------------------------


def test_factory_defaults_and_options(tmp_path: Path) -> None:
    factory = SpoolSourceFactory()
    clock = ThreadedClock()
    source = factory.create({}, str(tmp_path), clock)
    assert source.directory.path == str(tmp_path / "spool")
    assert (source.interval, source.directory.max_file_bytes) == (1.0, 65536)
    assert source.max_instruction_bytes == 1232 - 128
    source = factory.create(
        {
            "directory": "in",
            "interval": "0.5",
            "max_file_bytes": "100",
            "max_instruction_bytes": "500",
        },
        str(tmp_path),
        clock,
    )
    assert source.directory.path == str(tmp_path / "in")
    assert (source.interval, source.directory.max_file_bytes) == (0.5, 100)
    assert source.max_instruction_bytes == 500
    elsewhere = factory.create({"directory": "/var/x"}, str(tmp_path), clock)
    assert elsewhere.directory.path == "/var/x"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": "0"}, r"\[source.spool\] interval = '0': not a number of seconds"),
        ({"interval": "nan"}, "interval = 'nan'"),
        ({"interval": "soon"}, "interval = 'soon'"),
        ({"max_file_bytes": "1"}, r"max_file_bytes = '1': not a number of bytes"),
        ({"max_file_bytes": "1k"}, "max_file_bytes = '1k'"),
        ({"max_instruction_bytes": "2000"}, r"max_instruction_bytes = '2000'.*16-1344"),
    ],
)
def test_factory_refuses_bad_options(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SpoolSourceFactory().create(options, str(tmp_path), ThreadedClock())


# -- end to end: the real service tree --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_gateway_queues_a_dropped_file(tmp_path: Path) -> None:
    from twisted.internet import reactor

    spool_dir = tmp_path / "drop"
    config = tmp_path / "gw.conf"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            data_dir = {tmp_path / "data"}
            suites = p256
            [modules]
            address = 127.0.0.1
            port = 0
            [apps]
            address = 127.0.0.1
            port = 0
            key_type = ec
            [store]
            backend = memory
            [source.spool]
            directory = {spool_dir}
            interval = 0.02
            """
        ),
        encoding="utf-8",
    )
    options = Options()
    options.parseOptions(["--config", str(config)])
    root = makeService(options, reactor)
    root.privilegedStartService()
    try:
        await root.startService()
        store = find_service(root, "store").store  # type: ignore[attr-defined]
        await store.add_modules([Module("e2e-1")])
        assert find_service(root, "sources/spool").running
        drop_file(spool_dir, "reboot.json", {"module": "e2e-1", "kind": "reboot", "ttl": 60})
        queued: list[Any] = []
        for _ in range(250):
            queued = await store.list_instructions("e2e-1")
            if queued and (spool_dir / "accepted" / "reboot.json").exists():
                break
            await deferLater(reactor, 0.02, lambda: None)
        [instruction] = queued
        assert (instruction.kind, instruction.source) == ("reboot", "spool")
        assert instruction.state == InstructionState.QUEUED
        assert instruction.not_after is not None
        assert (spool_dir / "accepted" / "reboot.json.iid").read_text() == f"{instruction.iid}\n"
    finally:
        await root.stopService()
    assert not find_service(root, "sources/spool").running
