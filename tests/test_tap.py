"""Tests for m2mgw.tap: Options, and the service tree makeService builds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IService
from twisted.internet import threads
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python import usage
from zope.interface.verify import verifyObject

from m2mgw import tap
from m2mgw.config import StoreConfig, load_config
from m2mgw.datadir import DataDir
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import SecurityEvent
from m2mgw.service import StartupFailed, find_service
from m2mgw.store.memory import MemoryStore
from m2mgw.tap import Options, _expiry, _stop_reactor, makeService
from tests.doubles import (
    LifecycleStore,
    UDPMemoryReactor,
    fired,
    prepared_data_dir,
    tls_exchange,
    udp_exchange,
)
from tests.engine_helpers import result_of


@pytest.fixture(scope="module")
def data_dir_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    return prepared_data_dir(str(tmp_path_factory.mktemp("template") / "data"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir_template: str) -> Path:
    """A current directory holding a prepared data directory at var/m2mgw and no etc/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var").mkdir()
    shutil.copytree(data_dir_template, tmp_path / "var" / "m2mgw")
    (tmp_path / "ec.conf").write_text("[apps]\nkey_type = ec\n", encoding="utf-8")
    return tmp_path


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


# -- Options -------------------------------------------------------------------------


def test_options_default_to_the_built_in_configuration(workdir: Path) -> None:
    options = parse()
    assert options.gateway_config == load_config(None)
    assert options.overrides() == {}


def test_options_override_the_file(workdir: Path) -> None:
    options = parse(
        "-c",
        "ec.conf",
        "--data-dir",
        "elsewhere",
        "--module-address",
        "127.0.0.1",
        "--module-port",
        "6000",
        "--app-address",
        "::1",
        "--app-port",
        "0",
        "--store",
        "memory",
    )
    config = options.gateway_config
    assert config.config_file == "ec.conf"
    assert config.apps.key_type == "ec"
    assert config.data_dir == str(workdir / "elsewhere")
    assert (config.modules.address, config.modules.port) == ("127.0.0.1", 6000)
    assert (config.apps.address, config.apps.port) == ("::1", 0)
    assert config.store.backend == "memory"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--module-port", "abc"], "command line: [modules] port = 'abc': not a port number"),
        (["--app-port", "70000"], "command line: [apps] port = '70000': not a port number"),
        (["--module-address", "localhost"], "command line: [modules] address = 'localhost'"),
        (["--store", "oracle"], "unknown store 'oracle' (known: memory, postgres, sqlite)"),
        (["-c", "missing.conf"], "cannot read config file missing.conf: No such file"),
        (["--colour", "red"], "option --colour not recognized"),
    ],
)
def test_bad_options_are_one_line_usage_errors(
    workdir: Path, argv: list[str], message: str
) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse(*argv)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_bad_config_file_is_a_usage_error(workdir: Path) -> None:
    (workdir / "bad.conf").write_text("[gateway]\nsuites = p256 p521\n", encoding="utf-8")
    with pytest.raises(usage.UsageError, match=r"unknown cipher suite 'p521' \(known: p256, "):
        parse("--config", "bad.conf")


# -- makeService on a memory reactor ----------------------------------------------------------


def build(*argv: str) -> tuple[IService, UDPMemoryReactor]:
    reactor = UDPMemoryReactor()
    return makeService(parse("-c", "ec.conf", *argv), reactor), reactor


def test_tree_shape(workdir: Path) -> None:
    root, _ = build("--store", "memory")
    verifyObject(IService, root)
    assert root.name == "m2mgw"
    assert [s.name for s in root] == ["store", "reload", "modules", "apps", "sources", "jobs"]  # type: ignore[attr-defined]
    jobs = find_service(root, "jobs")
    assert [s.name for s in jobs] == [  # type: ignore[attr-defined]
        "expiry",
        "housekeeping",
        "security",
        "rotation",
        "retention",
        "events",
        "server-keys",
    ]
    # The application API is always a source.
    assert [s.name for s in find_service(root, "sources")] == ["apps"]  # type: ignore[attr-defined]
    assert find_service(root, "jobs/expiry").clock is not None  # type: ignore[attr-defined]
    assert isinstance(find_service(root, "modules").protocol.handler, ModuleController)  # type: ignore[attr-defined]


def test_listeners_use_the_configured_addresses_and_the_tls_options(workdir: Path) -> None:
    with capturedLogs() as events:
        root, reactor = build(
            "--store",
            "memory",
            "--module-address",
            "127.0.0.1",
            "--module-port",
            "6000",
            "--app-address",
            "127.0.0.2",
            "--app-port",
            "6001",
        )
        root.privilegedStartService()
        started = root.startService()
    assert fired(started)
    ((port, protocol, interface, max_packet),) = reactor.udpPorts
    assert (port, interface, max_packet) == (6000, "127.0.0.1", 1473)
    assert protocol is find_service(root, "modules").protocol  # type: ignore[attr-defined]
    ((tls_port, factory, options, _, tls_interface),) = reactor.sslServers
    assert (tls_port, tls_interface) == (6001, "127.0.0.2")
    assert options.options.getContext() is not None  # reloadable: the current settings
    assert factory.max_line == 65536 and factory.idle_timeout == 300
    listening = {(e["what"], e["address"], e["port"]) for e in events if "what" in e}
    assert listening == {
        ("modules (UDP)", "127.0.0.1", 6000),
        ("application servers (TLS)", "127.0.0.2", 6001),
    }
    data_dir_lines = [e for e in events if e.get("log_format") == "data directory {path}"]
    assert [e["path"] for e in data_dir_lines] == [str(workdir / "var" / "m2mgw")]
    assert fired(root.stopService())
    assert not reactor.udp_ports[0].listening and not reactor.ssl_ports[0].listening


def test_jobs_run_on_the_injected_clock(workdir: Path) -> None:
    root, reactor = build("--store", "memory")
    root.startService()
    expiry = find_service(root, "jobs/expiry")
    housekeeping = find_service(root, "jobs/housekeeping")
    assert expiry.runs == 1 and housekeeping.runs == 1  # type: ignore[attr-defined]
    reactor.advance(60)
    assert expiry.runs == 2 and housekeeping.runs == 1  # type: ignore[attr-defined]
    with capturedLogs() as events:
        reactor.advance(3600)
    assert housekeeping.runs == 2 and expiry.failures == 0  # type: ignore[attr-defined]
    status = [e for e in events if "received" in e]
    assert status and status[0]["modules"] == 0 and status[0]["connections"] == 0
    root.stopService()


def test_make_service_creates_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ec.conf").write_text("[apps]\nkey_type = ec\n", encoding="utf-8")
    with capturedLogs() as events:
        _root, _ = build("--data-dir", "fresh", "--store", "memory")
    data = tmp_path / "fresh"
    assert (data / "tls" / "gateway.pem").exists()
    assert len(DataDir(str(data)).server_keys()) == 5
    assert os.stat(data).st_mode & 0o777 == 0o700
    created = [e for e in events if str(e.get("path", "")).startswith(str(data / "keys"))]
    assert len(created) == 5
    text = repr([e.get("log_format") for e in events]) + repr(events)
    assert "PRIVATE KEY" not in text


def test_make_service_registers_server_keys_in_the_store(workdir: Path) -> None:
    root, _ = build("--store", "memory")
    root.startService()
    store = find_service(root, "store").store  # type: ignore[attr-defined]
    records: list[Any] = []
    store.list_server_keys().addCallback(records.extend)
    assert [r.suite for r in records] == ["p256", "p256-ccm8", "p384", "x25519", "rsa"]
    root.stopService()


def test_unusable_key_file_is_a_startup_failure(workdir: Path) -> None:
    key = next((workdir / "var" / "m2mgw" / "keys").glob("server-*-p256.pem"))
    os.chmod(key, 0o644)
    with pytest.raises(StartupFailed) as raised:
        build("--store", "memory")
    assert "\n" not in str(raised.value.code)
    assert str(raised.value.code).startswith("m2mgw: ")
    assert str(key) in str(raised.value.code)


def test_corrupt_tls_key_is_a_startup_failure(workdir: Path) -> None:
    key = workdir / "var" / "m2mgw" / "tls" / "gateway-key.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n")
    with pytest.raises(StartupFailed, match=r"gateway-key\.pem"):
        build("--store", "memory")


def test_data_dir_that_is_a_file_is_a_startup_failure(workdir: Path) -> None:
    (workdir / "plain-file").write_text("x")
    with pytest.raises(StartupFailed, match="plain-file exists and is not a directory"):
        build("--data-dir", "plain-file", "--store", "memory")


def test_expiry_job_sweeps_at_the_clock_time_and_logs_only_what_it_swept() -> None:
    clock = Clock()
    clock.advance(1_700_000_123.9)
    store = LifecycleStore()
    store.expire_results = [{"sessions": 0, "aliases": 0}, {"sessions": 2, "aliases": 0}]
    keep_all = StoreConfig(keep_reports=0, keep_security_events=0, keep_instructions=0)
    expire = _expiry(store, clock, keep_all)  # type: ignore[arg-type]
    with capturedLogs() as events:
        assert fired(maybeDeferred(expire))
        clock.advance(60)
        assert fired(maybeDeferred(expire))
    assert [c for c in store.calls if c.startswith("expire")] == [
        "expire 1700000123",
        "expire 1700000183",
    ]
    assert [e["counts"] for e in events if "counts" in e] == [{"sessions": 2}]


def test_expiry_job_deletes_what_is_past_retention_in_bounded_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = 1_700_000_000
    clock = Clock()
    clock.advance(now)
    store = MemoryStore()
    old = [SecurityEvent(now - 400 + n, "audit", f"old-{n}", "operator") for n in range(25)]
    recent = [SecurityEvent(now - 10, "audit", "recent", "operator")]
    fired(store.record_security_events(old + recent))
    monkeypatch.setattr(tap, "PURGE_BATCH", 10)
    calls: list[dict[str, int]] = []
    purge = store.purge
    monkeypatch.setattr(
        store, "purge", lambda before, limit: calls.append(before) or purge(before, limit)
    )
    retention = StoreConfig(keep_reports=0, keep_security_events=100, keep_instructions=0)
    with capturedLogs() as events:
        assert fired(maybeDeferred(_expiry(store, clock, retention)))
    assert [e.reason for e in result_of(store.list_security_events())] == ["recent"]
    assert calls == [{"security_events": now - 100}] * 3  # 10, 10, then 5: done
    assert [e["counts"] for e in events if "counts" in e] == [{"security_events": 25}]


def test_a_failed_start_stops_the_reactor_even_before_it_runs() -> None:
    from twisted.python.failure import Failure

    reactor = UDPMemoryReactor()
    stop = _stop_reactor(reactor)
    stop(Failure(RuntimeError("x")))
    assert not reactor.hasStopped
    assert [hook for hook, _, _ in reactor.whenRunningHooks] == [reactor.stop]
    reactor.running = True
    stop(Failure(RuntimeError("x")))
    assert reactor.hasStopped


# -- the real tree on 127.0.0.1 ephemeral ports ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_real_tree_on_loopback(workdir: Path) -> None:
    from twisted.internet import reactor as global_reactor

    options = parse(
        "-c",
        "ec.conf",
        "--module-address",
        "127.0.0.1",
        "--module-port",
        "0",
        "--app-address",
        "127.0.0.1",
        "--app-port",
        "0",
    )
    root = makeService(options, global_reactor)
    root.privilegedStartService()
    try:
        await root.startService()
        assert find_service(root, "store").store.name == "sqlite"  # type: ignore[attr-defined]
        udp_port = find_service(root, "modules").listening_port().getHost().port  # type: ignore[attr-defined]
        tls_port = find_service(root, "apps").listening_port().getHost().port  # type: ignore[attr-defined]
        assert udp_port and tls_port

        reply = await threads.deferToThread(
            udp_exchange, "127.0.0.1", udp_port, b"\x83\x01\x01", 0.3
        )
        assert reply is None  # not MGP/1: silence, counted
        protocol = find_service(root, "modules").protocol  # type: ignore[attr-defined]
        assert protocol.counters.received == 1
        assert protocol.handler.drops.by_reason["malformed"] == 1

        data = DataDir(str(workdir / "var" / "m2mgw"))
        cert, key = data.issue_app_cert("billing", str(workdir / "client"), key_type="ec")
        _, _, ca = data.tls_paths
        answers = await threads.deferToThread(
            tls_exchange,
            "127.0.0.1",
            tls_port,
            cert,
            key,
            ca,
            [{"id": 1, "op": "hello"}, {"id": 2, "op": "nope"}, {"id": 3, "op": "hello"}],
        )
        assert answers[0]["ok"] is True and answers[0]["id"] == 1
        assert answers[0]["result"]["version"] == 1
        assert answers[0]["result"]["principal"] == "billing"
        assert answers[1]["error"]["code"] == "unknown-op"
        assert answers[2]["ok"] is True
    finally:
        await root.stopService()
    assert not find_service(root, "store").running
    # The sockets are closed: the same ports can be bound again.
    await deferLater(global_reactor, 0, lambda: None)
    udp_probe = global_reactor.listenUDP(udp_port, DatagramProtocol(), interface="127.0.0.1")
    tcp_probe = global_reactor.listenTCP(tls_port, Factory(), interface="127.0.0.1")
    await udp_probe.stopListening()
    await tcp_probe.stopListening()
