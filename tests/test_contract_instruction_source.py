"""
The :class:`~m2mgw.interfaces.IInstructionSource` contract, run against every
:class:`~m2mgw.interfaces.IInstructionSourceFactory` plugin found.

A source produces instructions from its own intake (a spool directory, a
connection, ...), which no generic test can reach.  Each plugin therefore has
a *driver* here, in :data:`DRIVERS`: it gives the options to create the
source with and puts one instruction into the source's real intake.  The
drivers live with the tests rather than in the interface: a factory method
that made a source produce an instruction would be a way into the queue
that bypasses the intake's own checks (who may submit, what is valid), kept
in production code only for tests, while a driver exercises the very path
operators and applications use.  A plugin without a driver fails
:func:`test_every_source_plugin_has_a_driver`, so a new source cannot slip by
untested.

Sources are created with a :class:`~tests.instruction_source_helpers.ThreadedClock`
for the reactor: time moves only when the driver advances it, and the
reactor's thread pool runs work inline.

A source queues under its own name, except one that queues on behalf of the
principals it authenticated (the application API): its driver names the
principal it submitted as, and the instruction must carry exactly that one,
which is neither the source's name nor one of the gateway's own source names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from m2mgw import registry
from m2mgw.apps.listener import AppFactory, AppProtocol, Dispatcher, ListenerSettings
from m2mgw.apps.operations import AppOperations
from m2mgw.apps.policy import AppPolicies
from m2mgw.interfaces import IInstructionSource, IInstructionSourceFactory
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import instruction_wire_size
from m2mgw.records import Module
from m2mgw.store.logic import NON_APP_SOURCES
from m2mgw.store.memory import MemoryStore
from tests.doubles import fired
from tests.instruction_source_helpers import RecordingSink, ThreadedClock, drop_file

FACTORIES: Mapping[str, Any] = registry.all_plugins(IInstructionSourceFactory)


class SourceDriver(Protocol):
    """How the contract tests operate one plugin's sources."""

    def options(self, workdir: Path) -> dict[str, str]:
        """The ``[source.NAME]`` options to create a source with (files go under ``workdir``)."""

    def offer(self, source: Any, workdir: Path, module_id: str, serial: int) -> None:
        """
        Give the source, through its real intake, one ``set`` instruction for
        ``module_id`` whose body is ``{"serial": serial}``.
        """

    def pump(self, reactor: ThreadedClock) -> None:
        """Let enough time pass for the source to act on what it was offered."""

    def expected_source(self, source: Any) -> str:
        """The ``source`` the instructions offered must carry."""


class SpoolDriver:
    """The ``spool`` source: a file dropped into its directory, then a scan."""

    interval = 5

    def options(self, workdir: Path) -> dict[str, str]:
        """A spool directory under ``workdir``, scanned every 5 s."""
        return {"directory": str(workdir / "spool"), "interval": str(self.interval)}

    def offer(self, source: Any, workdir: Path, module_id: str, serial: int) -> None:
        """Drop ``NNNN.json``."""
        (workdir / "spool").mkdir(exist_ok=True)
        content = {"module": module_id, "kind": "set", "body": {"serial": serial}}
        drop_file(workdir / "spool", f"{serial:04d}.json", content)

    def pump(self, reactor: ThreadedClock) -> None:
        """One scan interval."""
        reactor.advance(self.interval)

    def expected_source(self, source: Any) -> str:
        """The spool queues under its own name."""
        return str(source.name)


class AppsDriver:
    """
    The ``apps`` source: an application connection (over a
    ``StringTransport``) sends a ``submit`` request; the module belongs to it.
    """

    principal = "contract-app"

    def __init__(self) -> None:
        self._connections: dict[int, tuple[AppProtocol, StringTransport, MemoryStore]] = {}

    def options(self, workdir: Path) -> dict[str, str]:
        """No options."""
        return {}

    def _connection(self, source: Any) -> tuple[AppProtocol, StringTransport, MemoryStore]:
        if id(source) not in self._connections:
            store = MemoryStore()
            operations = AppOperations(store, source, AppPolicies(), Clock(), ListenerSettings())
            factory = AppFactory(
                Dispatcher(operations.table()),
                clock=Clock(),
                principal_of=lambda transport: self.principal,
                store=store,
            )
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self._connections[id(source)] = (protocol, transport, store)
        return self._connections[id(source)]

    def offer(self, source: Any, workdir: Path, module_id: str, serial: int) -> None:
        """Send ``submit`` for a module of the application."""
        protocol, _transport, store = self._connection(source)
        if module_id not in store.data.modules:
            store.add_modules([Module(module_id)], apps={module_id: [self.principal]})
        request = {"id": serial, "op": "submit", "module": module_id, "kind": "set"}
        request["body"] = {"serial": serial}
        protocol.dataReceived(json.dumps(request).encode() + b"\n")

    def pump(self, reactor: ThreadedClock) -> None:
        """Nothing to wait for: a submission reaches the sink at once."""

    def expected_source(self, source: Any) -> str:
        """The application's principal."""
        return self.principal


#: The driver of every shipped source plugin, by plugin name.
DRIVERS: dict[str, SourceDriver] = {"spool": SpoolDriver(), "apps": AppsDriver()}


def test_every_source_plugin_has_a_driver() -> None:
    assert "spool" in FACTORIES
    missing = sorted(set(FACTORIES) - set(DRIVERS))
    assert not missing, f"no contract-test driver for source plugins {missing}: add one to DRIVERS"


def settled(result: Deferred[None] | None) -> None:
    """Assert that a ``start``/``stop`` result is ``None`` or a Deferred that succeeded."""
    if result is None:
        return
    assert isinstance(result, Deferred)
    outcome: list[object] = []
    result.addBoth(outcome.append)
    assert outcome == [None]


@pytest.mark.parametrize("plugin_name", sorted(FACTORIES))
class TestInstructionSourceContract:
    """What every instruction source plugin must do."""

    @pytest.fixture
    def factory(self, plugin_name: str) -> Any:
        return FACTORIES[plugin_name]

    @pytest.fixture
    def driver(self, plugin_name: str) -> SourceDriver:
        if plugin_name not in DRIVERS:
            pytest.fail(f"no contract-test driver for source plugin {plugin_name!r}")
        return DRIVERS[plugin_name]

    @pytest.fixture
    def reactor(self) -> ThreadedClock:
        return ThreadedClock()

    @pytest.fixture
    def source(
        self, factory: Any, driver: SourceDriver, tmp_path: Path, reactor: ThreadedClock
    ) -> Any:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        return factory.create(driver.options(tmp_path), str(data_dir), reactor)

    def test_factory_provides_the_interface(self, factory: Any, plugin_name: str) -> None:
        assert verifyObject(IInstructionSourceFactory, factory)
        assert factory.name == plugin_name
        assert isinstance(factory.options, Mapping)
        for option, description in factory.options.items():
            assert isinstance(option, str) and option == option.lower()
            assert isinstance(description, str) and description and "\n" not in description

    def test_created_source_provides_the_interface(self, source: Any, plugin_name: str) -> None:
        assert verifyObject(IInstructionSource, source)
        # The source's name names its service under "sources" and its instructions.
        assert source.name == plugin_name

    def test_start_then_stop(self, source: Any) -> None:
        sink = RecordingSink()
        settled(source.start(sink))
        settled(source.stop())
        assert sink.received == []

    def test_stop_is_idempotent(self, source: Any, reactor: ThreadedClock) -> None:
        settled(source.start(RecordingSink()))
        settled(source.stop())
        settled(source.stop())
        reactor.advance(3600)
        settled(source.stop())

    def test_an_instruction_reaches_the_sink_named_by_its_source(
        self, source: Any, driver: SourceDriver, tmp_path: Path, reactor: ThreadedClock
    ) -> None:
        sink = RecordingSink()
        settled(source.start(sink))
        driver.offer(source, tmp_path, "m-1", 1)
        driver.pump(reactor)
        assert len(sink.received) == 1
        new = sink.received[0]
        assert new.module_id == "m-1" and new.kind == "set"
        assert new.source == driver.expected_source(source)
        if new.source != source.name:
            # A source that records its principals never passes one off as a
            # gateway source (whose events would go to every application).
            assert getattr(source, "records_principals", False) is True
            assert new.source not in NON_APP_SOURCES
        body = cbor.decode(new.body)
        assert body == {"serial": 1}
        # Every source sizes instructions as the protocol engine does.
        assert new.wire_size == instruction_wire_size(new.kind, body, new.not_after)
        driver.pump(reactor)
        assert len(sink.received) == 1  # once
        settled(source.stop())

    def test_nothing_is_produced_after_stop(
        self, source: Any, driver: SourceDriver, tmp_path: Path, reactor: ThreadedClock
    ) -> None:
        sink = RecordingSink()
        settled(source.start(sink))
        driver.offer(source, tmp_path, "m-1", 1)
        driver.pump(reactor)
        stopped = source.stop()
        assert stopped is None or fired(stopped)
        driver.offer(source, tmp_path, "m-1", 2)
        driver.pump(reactor)
        driver.pump(reactor)
        assert [cbor.decode(new.body) for new in sink.received] == [{"serial": 1}]
