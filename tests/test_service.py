"""Tests for m2mgw.service: start/stop order, listeners, store lifecycle, jobs, sources."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from m2mgw.apps.listener import AppFactory
from m2mgw.errors import StoreError
from m2mgw.modules.udp import ModuleDatagramProtocol
from m2mgw.records import NewInstruction
from m2mgw.service import (
    AppListenerService,
    GatewayService,
    InstructionSourceService,
    ListenFailed,
    ModuleListenerService,
    OrderedMultiService,
    PeriodicJob,
    QueueSink,
    StartupFailed,
    StoreService,
    find_service,
)
from tests.doubles import (
    LifecycleStore,
    RecordingHandler,
    RecordingSource,
    UDPMemoryReactor,
    fired,
    server_keys,
)


class StepService(Service):
    """Records start/stop into a shared journal; can hold either step."""

    def __init__(self, name: str, journal: list[str], hold_start: bool = False) -> None:
        self.setName(name)
        self.journal = journal
        self.hold_start = hold_start
        self.started: Deferred[None] | None = None
        self.stopping: Deferred[None] | None = None
        self.hold_stop = False
        self.fail_stop = False

    def startService(self) -> Deferred[None] | None:  # type: ignore[override]
        Service.startService(self)
        self.journal.append(f"start {self.name}")
        if self.hold_start:
            self.started = Deferred()
            self.started.addCallback(lambda _: self.journal.append(f"started {self.name}"))
            return self.started
        return None

    def stopService(self) -> Deferred[None] | None:  # type: ignore[override]
        Service.stopService(self)
        self.journal.append(f"stop {self.name}")
        if self.fail_stop:
            return fail(RuntimeError("cannot stop"))
        if self.hold_stop:
            self.stopping = Deferred()
            self.stopping.addCallback(lambda _: self.journal.append(f"stopped {self.name}"))
            return self.stopping
        return None


def three(journal: list[str]) -> tuple[OrderedMultiService, list[StepService]]:
    parent = OrderedMultiService()
    children = [StepService(n, journal) for n in ("a", "b", "c")]
    for child in children:
        child.setServiceParent(parent)
    return parent, children


def test_ordered_start_waits_for_each_child() -> None:
    journal: list[str] = []
    parent, (a, _b, _c) = three(journal)
    a.hold_start = True
    started = parent.startService()
    assert journal == ["start a"]
    assert not fired(started)
    assert a.started is not None
    a.started.callback(None)
    assert journal == ["start a", "started a", "start b", "start c"]
    assert fired(started)


def test_ordered_start_stops_at_a_failure() -> None:
    journal: list[str] = []
    parent, (_a, b, _c) = three(journal)
    b.hold_start = True
    started = parent.startService()
    assert b.started is not None
    b.started.errback(RuntimeError("no"))
    failures: list[Any] = []
    started.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    assert "start c" not in journal


def test_ordered_stop_is_reverse_and_sequential() -> None:
    journal: list[str] = []
    parent, (_a, _b, c) = three(journal)
    parent.startService()
    c.hold_stop = True
    journal.clear()
    stopped = parent.stopService()
    assert journal == ["stop c"]
    assert c.stopping is not None
    c.stopping.callback(None)
    assert journal == ["stop c", "stopped c", "stop b", "stop a"]
    assert fired(stopped)
    assert not parent.running


def test_ordered_stop_survives_a_failing_child() -> None:
    journal: list[str] = []
    parent, (_a, b, _c) = three(journal)
    parent.startService()
    b.fail_stop = True
    with capturedLogs() as events:
        stopped = parent.stopService()
    assert fired(stopped) and stopped.result is None
    assert journal[-3:] == ["stop c", "stop b", "stop a"]
    assert any(e.get("name") == "b" and "log_failure" in e for e in events)


def test_stop_while_starting_starts_nothing_more() -> None:
    journal: list[str] = []
    parent, (a, _b, _c) = three(journal)
    a.hold_start = True
    parent.startService()
    parent.stopService()
    assert a.started is not None
    a.started.callback(None)
    assert "start b" not in journal and "start c" not in journal


# -- store -------------------------------------------------------------------------------


def test_store_service_opens_registers_server_keys_and_closes() -> None:
    store = LifecycleStore()
    service = StoreService(store, server_keys(2))  # type: ignore[arg-type]
    with capturedLogs() as events:
        started = service.startService()
    assert fired(started)
    assert store.calls == ["open", "list_server_keys", "add_server_key 1", "add_server_key 2"]
    assert any(e.get("backend") == "lifecycle" for e in events)
    stopped = service.stopService()
    assert fired(stopped)
    assert store.calls[-1] == "close"
    # Already known keys are not added twice on the next start.
    service.startService()
    assert store.calls[-2:] == ["open", "list_server_keys"]


def test_store_close_waits_for_open_and_for_the_flush() -> None:
    store = LifecycleStore(hold_open=True, hold_close=True)
    service = StoreService(store)  # type: ignore[arg-type]
    started = service.startService()
    stopped = service.stopService()
    assert store.calls == ["open"]
    assert store.opening is not None
    store.opening.callback(None)
    assert fired(started)
    assert store.calls == ["open", "list_server_keys", "close"]
    assert not fired(stopped)
    assert store.closing is not None
    store.closing.callback(None)
    assert fired(stopped)


def test_store_that_fails_to_open_is_still_closed() -> None:
    store = LifecycleStore(hold_open=True)
    service = StoreService(store)  # type: ignore[arg-type]
    started = service.startService()
    assert store.opening is not None
    store.opening.errback(OSError("disk on fire"))
    failures: list[Any] = []
    started.addErrback(failures.append)
    assert failures[0].check(OSError)
    assert fired(service.stopService())
    assert store.calls == ["open", "close"]


def test_store_never_started_is_not_closed() -> None:
    store = LifecycleStore()
    assert fired(StoreService(store).stopService())  # type: ignore[arg-type]
    assert store.calls == []


# -- listeners ------------------------------------------------------------------------------


def module_listener(
    reactor: UDPMemoryReactor, handler: Any = None, port: int = 5740, interface: str = "127.0.0.1"
) -> tuple[ModuleListenerService, ModuleDatagramProtocol]:
    protocol = ModuleDatagramProtocol(handler or RecordingHandler())
    return ModuleListenerService(port, protocol, interface, reactor), protocol


def test_module_listener_binds_once_and_logs_where() -> None:
    reactor = UDPMemoryReactor()
    service, protocol = module_listener(reactor)
    with capturedLogs() as events:
        service.privilegedStartService()
        service.startService()
    assert reactor.udpPorts == [(5740, protocol, "127.0.0.1", 1473)]
    lines = [e for e in events if e.get("what") == "modules (UDP)"]
    assert len(lines) == 1
    assert (lines[0]["address"], lines[0]["port"]) == ("127.0.0.1", 5740)
    assert lines[0]["log_level"] is LogLevel.info
    port = service.listening_port()
    assert port is not None and port.getHost().port == 5740


def test_module_listener_stop_drains_before_closing_the_socket() -> None:
    reactor = UDPMemoryReactor()
    handler = RecordingHandler(hold=True)
    service, protocol = module_listener(reactor, handler)
    service.startService()
    (port,) = reactor.udp_ports
    protocol.datagramReceived(b"in flight", ("192.0.2.1", 9))
    stopped = service.stopService()
    assert not fired(stopped) and port.listening
    protocol.datagramReceived(b"too late", ("192.0.2.1", 9))
    assert len(handler.received) == 1
    handler.pending[0].callback(b"answer")
    assert fired(stopped)
    assert port.written == [(b"answer", ("192.0.2.1", 9))]
    assert not port.listening


def test_busy_udp_port_is_one_line() -> None:
    reactor = UDPMemoryReactor()
    reactor.busy_ports.add(("udp", 5740))
    service, _ = module_listener(reactor, interface="")
    with pytest.raises(ListenFailed) as raised:
        service.privilegedStartService()
    assert str(raised.value) == (
        "cannot listen for modules (UDP) on * port 5740: Address already in use"
    )


def test_app_listener_binds_and_closes_connections_on_stop() -> None:
    reactor = UDPMemoryReactor()
    factory = AppFactory(clock=Clock(), principal_of=lambda t: "x")
    options = object()
    service = AppListenerService(5741, factory, options, "127.0.0.1", reactor)
    with capturedLogs() as events:
        service.privilegedStartService()
    assert reactor.sslServers == [(5741, factory, options, 50, "127.0.0.1")]
    assert any(e.get("what") == "application servers (TLS)" for e in events)

    from twisted.internet.testing import StringTransport

    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    stopped = service.stopService()
    assert not reactor.ssl_ports[0].listening
    assert transport.disconnecting and not fired(stopped)
    connection.connectionLost(None)  # type: ignore[arg-type]
    assert fired(stopped)


# -- the root -----------------------------------------------------------------------------


def small_tree(
    reactor: UDPMemoryReactor, store: LifecycleStore, failures: list[Any] | None = None
) -> GatewayService:
    root = GatewayService(on_start_failure=failures.append if failures is not None else None)
    StoreService(store).setServiceParent(root)  # type: ignore[arg-type]
    module_listener(reactor)[0].setServiceParent(root)
    AppListenerService(
        5741, AppFactory(clock=reactor), object(), "127.0.0.1", reactor
    ).setServiceParent(root)
    return root


def test_port_in_use_is_a_startup_failure_and_releases_the_other_ports() -> None:
    reactor = UDPMemoryReactor()
    reactor.busy_ports.add(("tcp", 5741))
    store = LifecycleStore()
    root = small_tree(reactor, store)
    with pytest.raises(StartupFailed) as raised:
        root.privilegedStartService()
    assert isinstance(raised.value, SystemExit)
    assert raised.value.code == (
        "m2mgw: cannot listen for application servers (TLS) on 127.0.0.1 port 5741: "
        "Address already in use"
    )
    (udp,) = reactor.udp_ports
    assert not udp.listening
    assert store.calls == []


def test_listeners_bind_only_after_the_store_is_open_without_privileged_start() -> None:
    reactor = UDPMemoryReactor()
    store = LifecycleStore(hold_open=True)
    root = small_tree(reactor, store)
    started = root.startService()
    assert reactor.udpPorts == [] and reactor.sslServers == []
    assert store.opening is not None
    store.opening.callback(None)
    assert fired(started)
    assert len(reactor.udpPorts) == 1 and len(reactor.sslServers) == 1


def test_failed_start_is_reported_once_and_stops_there() -> None:
    reactor = UDPMemoryReactor()
    store = LifecycleStore(hold_open=True)
    failures: list[Any] = []
    root = small_tree(reactor, store, failures)
    with capturedLogs() as events:
        started = root.startService()
        assert store.opening is not None
        store.opening.errback(OSError("database is corrupt"))
    assert fired(started) and started.result is None
    assert len(failures) == 1 and failures[0].check(OSError)
    assert reactor.udpPorts == []
    assert any(e.get("log_failure") is not None for e in events)


def test_explained_start_failure_is_one_critical_line() -> None:
    reactor = UDPMemoryReactor()
    store = LifecycleStore(hold_open=True)
    failures: list[Any] = []
    root = small_tree(reactor, store, failures)
    with capturedLogs() as events:
        root.startService()
        assert store.opening is not None
        store.opening.errback(StoreError("schema version 9 is newer than this gateway's 3"))
    assert len(failures) == 1
    critical = [e for e in events if e["log_level"] is LogLevel.critical]
    assert [e["message"] for e in critical] == ["schema version 9 is newer than this gateway's 3"]
    assert not any("log_failure" in e for e in events)


def test_bind_failure_during_start_is_logged_as_one_line() -> None:
    reactor = UDPMemoryReactor()
    reactor.busy_ports.add(("udp", 5740))
    failures: list[Any] = []
    root = small_tree(reactor, LifecycleStore(), failures)
    with capturedLogs() as events:
        root.startService()
    assert failures and failures[0].check(ListenFailed)
    critical = [e for e in events if e["log_level"] is LogLevel.critical]
    assert [e["message"] for e in critical] == [
        "cannot listen for modules (UDP) on 127.0.0.1 port 5740: Address already in use"
    ]


def test_full_stop_order_closes_the_store_last() -> None:
    reactor = UDPMemoryReactor()
    store = LifecycleStore(hold_close=True)
    root = small_tree(reactor, store)
    root.privilegedStartService()
    root.startService()
    stopped = root.stopService()
    assert not reactor.udp_ports[0].listening
    assert not reactor.ssl_ports[0].listening
    assert store.calls[-1] == "close" and not fired(stopped)
    assert store.closing is not None
    store.closing.callback(None)
    assert fired(stopped)
    assert find_service(root, "store").running == 0


# -- sources and sink ------------------------------------------------------------------------


def test_source_gets_a_sink_that_queues_into_the_store() -> None:
    clock = Clock()
    clock.advance(1_700_000_000.7)
    store = LifecycleStore()
    sink = QueueSink(store, clock)  # type: ignore[arg-type]
    source = RecordingSource("spool")
    service = InstructionSourceService(source, sink)
    assert service.name == "spool"
    service.startService()
    assert source.sink is sink
    queued: list[Any] = []
    sink.submit(NewInstruction("mod-1", "reboot", b"\xa0", 1)).addCallback(queued.append)
    assert store.enqueued[0][1] == 1_700_000_000
    assert queued[0].iid == 1 and queued[0].module_id == "mod-1"
    service.stopService()
    assert source.events == ["start", "stop"]


def test_source_that_was_never_started_is_not_stopped() -> None:
    source = RecordingSource()
    service = InstructionSourceService(source, QueueSink(LifecycleStore(), Clock()))  # type: ignore[arg-type]
    assert fired(service.stopService())
    assert source.events == []


def test_source_start_failure_fails_the_start() -> None:
    source = RecordingSource(fail_start=ValueError("bad spool dir"))
    service = InstructionSourceService(source, QueueSink(LifecycleStore(), Clock()))  # type: ignore[arg-type]
    failures: list[Any] = []
    service.startService().addErrback(failures.append)
    assert failures[0].check(ValueError)


# -- periodic jobs ----------------------------------------------------------------------------


def test_periodic_job_runs_on_its_clock_and_survives_failures() -> None:
    clock = Clock()
    outcomes: list[Any] = [None, ValueError("sync"), fail(RuntimeError("async")), succeed(3)]
    calls: list[float] = []

    def work() -> Any:
        calls.append(clock.seconds())
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    job = PeriodicJob("expiry", 10, work, clock)
    with capturedLogs() as events:
        job.startService()
        for _ in range(3):
            clock.advance(10)
    assert calls == [0, 10, 20, 30]
    assert job.failures == 2 and job.runs == 2
    logged = [e for e in events if "log_failure" in e]
    assert [e["log_failure"].type for e in logged] == [ValueError, RuntimeError]
    assert all(e["job"] == "expiry" for e in logged)
    job.stopService()
    clock.advance(100)
    assert len(calls) == 4


def test_periodic_job_stop_waits_for_the_run_in_progress() -> None:
    clock = Clock()
    running: Deferred[None] = Deferred()
    job = PeriodicJob("housekeeping", 5, lambda: running, clock)
    job.startService()
    stopped = job.stopService()
    assert not fired(stopped)
    running.callback(None)
    assert fired(stopped)


def test_periodic_job_never_started_stops_quietly() -> None:
    job = PeriodicJob("expiry", 5, lambda: None, Clock())
    assert job.stopService() is None
    assert not job.running
