"""
``twistd m2mgw``: the command-line options and the service tree.

This module is the only place where configuration becomes objects.
:class:`Options` reads and validates the configuration file (a bad one is a
``UsageError``: one line, non-zero exit).  :func:`makeService` creates or
loads the data directory, makes the store through its plugin, and assembles
the tree of :mod:`m2mgw.service`::

    m2mgw
     ├── store      opens the store first, closes it last
     ├── reload     installs the server keys; on SIGHUP reloads them and the TLS certificate
     ├── modules    UDP listener for MGP/1 modules
     ├── apps       mutual-TLS listener for application servers
     ├── sources    the configured instruction sources
     └── jobs       expiry, housekeeping, security events, key rotation,
                    server key retirement

Problems found while building or binding (an unusable data directory or key
file, a port in use) end twistd with :class:`~m2mgw.service.StartupFailed`:
one line on standard error and exit status 1, no traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from m2mgw import registry
from m2mgw.apps.events import EventHub, enforce_retention
from m2mgw.apps.listener import AppFactory, Dispatcher, ListenerSettings
from m2mgw.apps.operations import AppOperations
from m2mgw.apps.polling import InstructionPoll
from m2mgw.apps.rotation import RotationOnRequest
from m2mgw.apps.source import ApplicationSource
from m2mgw.config import DEFAULT_CONFIG_PATH, GatewayConfig, StoreConfig, load_config
from m2mgw.crypto.randomness import system_random
from m2mgw.datadir import DataDir
from m2mgw.errors import ConfigError
from m2mgw.instructions.submission import REPLY_OVERHEAD
from m2mgw.interfaces import (
    ICipherSuite,
    IInstructionSourceFactory,
    IModuleStore,
    IModuleStoreFactory,
)
from m2mgw.keys.rotation import RotationJob
from m2mgw.keys.server_rollover import ServerKeyRollover
from m2mgw.modules.udp import ModuleDatagramProtocol
from m2mgw.protocol.engine import ModuleController
from m2mgw.service import (
    AppListenerService,
    GatewayService,
    InstructionSourceService,
    ModuleListenerService,
    OrderedMultiService,
    PeriodicJob,
    QueueSink,
    ReloadService,
    StartupFailed,
    StoreService,
)
from m2mgw.tls import ReloadableServerTLS, app_server_tls_options

log = Logger(namespace="m2mgw.tap")

#: Command-line options that override one configuration key each.
_OVERRIDES = {
    "data-dir": "gateway.data_dir",
    "module-address": "modules.address",
    "module-port": "modules.port",
    "app-address": "apps.address",
    "app-port": "apps.port",
    "store": "store.backend",
}


class Options(usage.Options):
    """
    ``twistd m2mgw`` options: a configuration file and per-listener overrides.

    :ivar gateway_config: the validated :class:`~m2mgw.config.GatewayConfig`,
        set by :meth:`postOptions`.
    """

    synopsis = "[-c FILE] [--data-dir DIR] [--module-port N] [--app-port N] [...]"
    longdesc = (
        "Runs the m2mgw gateway: MGP/1 modules over UDP, application servers over "
        "mutual TLS.  Without --config, etc/m2mgw.conf is read if it exists, else "
        "the built-in defaults apply."
    )

    optParameters: list[list[Any]] = [
        ["config", "c", None, f"Configuration file (default: {DEFAULT_CONFIG_PATH} if present)."],
        ["data-dir", None, None, "Data directory: keys and the database ([gateway] data_dir)."],
        ["module-address", None, None, "Address of the UDP module listener ([modules] address)."],
        ["module-port", None, None, "Port of the UDP module listener ([modules] port)."],
        ["app-address", None, None, "Address of the TLS application listener ([apps] address)."],
        ["app-port", None, None, "Port of the TLS application listener ([apps] port)."],
        ["store", None, None, "Store backend, e.g. sqlite or memory ([store] backend)."],
    ]

    gateway_config: GatewayConfig

    def overrides(self) -> dict[str, str]:
        """The configuration keys set on the command line, as ``{"section.key": value}``."""
        return {key: self[option] for option, key in _OVERRIDES.items() if self[option] is not None}

    def postOptions(self) -> None:
        """
        Load and validate the configuration.

        :raise twisted.python.usage.UsageError: it is not valid (one line).
        """
        try:
            self.gateway_config = load_config(self["config"], self.overrides())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def _module_handler(
    config: GatewayConfig,
    store: IModuleStore,
    datadir: DataDir,
    reactor: Any,
    poll: InstructionPoll | None = None,
) -> ModuleController:
    """
    The MGP/1 module controller the UDP listener hands datagrams to.

    :param config: the gateway configuration (protocol policy, suites).
    :param store: the module store (opened before the first datagram is handled).
    :param datadir: the data directory (server keys).
    :param reactor: the reactor (its clock).
    :param poll: the polling variant (``[modules] poll_apps_ms``), if enabled.
    :raise m2mgw.errors.ConfigError: a configured suite is unknown or a server key unreadable.
    """
    suites = {name: registry.lookup(ICipherSuite, name) for name in config.suites}
    return ModuleController(
        store,
        suites,
        (),  # none until the reload service installs them, once the store is open
        config.protocol,
        now=reactor.seconds,
        max_datagram=config.modules.max_datagram,
        params=config.params,
        rotation=config.rotation,
        instruction_poll=None if poll is None else poll.wait_for_instruction,
    )


def _retention(store: IModuleStore, config: GatewayConfig, clock: IReactorTime) -> Any:
    """The retention job: drop (never silently) the events of applications that stay away."""

    async def trim() -> None:
        await enforce_retention(store, config.app_policies, int(clock.seconds()))

    return trim


def _application_listener(
    config: GatewayConfig,
    store: IModuleStore,
    source: ApplicationSource,
    hub: EventHub,
    poll: InstructionPoll | None,
    reactor: Any,
) -> AppFactory:
    """The application listener's factory with every operation of the protocol."""
    apps = config.apps
    settings = ListenerSettings(
        idle_timeout=apps.idle_timeout,
        ping_interval=apps.ping_interval,
        max_line=apps.max_line,
        max_unacked=apps.max_unacked,
    )
    operations = AppOperations(
        store,
        source,
        config.app_policies,
        reactor,
        settings,
        max_instruction_bytes=config.modules.max_datagram - REPLY_OVERHEAD,
        rotation=RotationOnRequest(
            store, config.params, config.rotation, reactor.seconds, system_random
        ),
        poll=poll,
    )
    return AppFactory(
        Dispatcher(operations.table()),
        max_line=apps.max_line,
        idle_timeout=apps.idle_timeout,
        clock=reactor,
        store=store,
        hub=hub,
        policies=config.app_policies,
        ping_interval=apps.ping_interval,
        max_unacked=apps.max_unacked,
    )


def _security_events(store: IModuleStore, controller: ModuleController, clock: Any) -> Any:
    """The job writing the counted drops to the store as security events (MGP/1 §11)."""

    def flush() -> Any:
        events = controller.drops.drain(int(clock.seconds()))
        if not events:
            return None
        return store.record_security_events(events)

    return flush


def _stop_reactor(reactor: Any) -> Any:
    """A start-failure hook that stops ``reactor`` (twistd then exits)."""

    def stop(failure: Failure) -> None:
        log.info("stopping, since the gateway could not start")
        if getattr(reactor, "running", False):
            reactor.stop()
        else:  # twistd starts the services just before it runs the reactor
            reactor.callWhenRunning(reactor.stop)

    return stop


#: Records of one kind the expiry job deletes per transaction, and per run.
PURGE_BATCH, PURGE_RUN_MAX = 10_000, 1_000_000


def _expiry(store: IModuleStore, clock: IReactorTime, retention: StoreConfig) -> Any:
    """
    The expiry job: sweep what expired, then delete what is older than the
    ``[store] keep_*`` settings (in bounded transactions); log what went.
    """

    async def expire() -> None:
        now = int(clock.seconds())
        counts: Mapping[str, int] = await store.expire(now)
        swept = {kind: n for kind, n in counts.items() if n}
        if swept:
            log.info("expired {counts}", counts=swept)
        before = retention.retention(now)
        purged: dict[str, int] = {}
        while before:
            deleted: Mapping[str, int] = await store.purge(before, PURGE_BATCH)
            for kind, n in deleted.items():
                purged[kind] = purged.get(kind, 0) + n
            # A kind is done when a transaction found fewer than it could take.
            before = {
                kind: when
                for kind, when in before.items()
                if deleted.get(kind, 0) >= PURGE_BATCH and purged[kind] < PURGE_RUN_MAX
            }
        gone = {kind: n for kind, n in purged.items() if n}
        if gone:
            log.info("deleted past their retention: {counts}", counts=gone)

    return expire


def _housekeeping(store: IModuleStore, protocol: ModuleDatagramProtocol, apps: AppFactory) -> Any:
    """The housekeeping job: log the gateway's counters."""

    async def report() -> None:
        counters = protocol.counters
        log.info(
            "status: {modules} modules provisioned; datagrams: {received} received, "
            "{answered} answered, {unanswered} unanswered, {oversized} oversized, "
            "{errors} handler errors; {connections} application connections",
            modules=await store.count_modules(),
            received=counters.received,
            answered=counters.answered,
            unanswered=counters.unanswered,
            oversized=counters.oversized,
            errors=counters.handler_errors,
            connections=len(apps.connections),
        )

    return report


def _prepare_data_dir(config: GatewayConfig) -> DataDir:
    """
    Create what is missing in the data directory and check what exists.

    :raise m2mgw.errors.ConfigError: it is not usable.
    """
    # Certificates and key files are dated by the wall clock, not the reactor's.
    datadir = DataDir(config.data_dir)
    names = [config.node_name] + ([config.apps.address] if config.apps.address else [])
    result = datadir.ensure(
        config.suites,
        tls_key_type=config.apps.key_type,
        rsa_bits=config.apps.rsa_bits,
        tls_names=names,
    )
    for item in result.created:
        if item.kind != "directory":
            log.info(
                "created {kind} {path} ({detail})",
                kind=item.kind,
                path=item.path,
                detail=item.detail,
            )
    log.info("data directory {path}", path=datadir.path)
    return datadir


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the gateway's service tree from validated options.

    :param options: parsed :class:`Options`.
    :param reactor: the reactor for listeners, timers and the store (default:
        the global reactor).
    :return: the root service, named ``m2mgw``.
    :raise m2mgw.service.StartupFailed: the data directory, a key or
        certificate, or the store configuration is not usable.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.gateway_config
    if config.config_file is not None:
        log.info("configuration {path}", path=config.config_file)
    try:
        datadir = _prepare_data_dir(config)
        server_keys = datadir.server_key_records()
        store_factory = registry.lookup(IModuleStoreFactory, config.store.backend)
        store: IModuleStore = store_factory.create(config.store.options, datadir.path, reactor)
        tls_options = ReloadableServerTLS(lambda: app_server_tls_options(datadir))
        hub = EventHub()
        poll = None
        if config.modules.poll_apps_ms > 0:
            poll = InstructionPoll(store, hub, reactor, config.modules.poll_apps_ms)
        controller = _module_handler(config, store, datadir, reactor, poll)
        sources = [
            registry.lookup(IInstructionSourceFactory, source.name).create(
                source.options, datadir.path, reactor
            )
            for source in config.sources
        ]
    except ConfigError as e:
        raise StartupFailed(str(e)) from None
    # The application API is always a source ([source.apps] is optional).
    app_source = next((s for s in sources if isinstance(s, ApplicationSource)), None)
    if app_source is None:
        app_source = ApplicationSource()
        sources.insert(0, app_source)
    store.add_event_listener(hub.events_appended)

    root = GatewayService(on_start_failure=_stop_reactor(reactor))

    StoreService(store, server_keys).setServiceParent(root)

    rollover = ServerKeyRollover(datadir, store, controller, config.suites, reactor.seconds)
    ReloadService(
        [("server keys", rollover.reload), ("application TLS certificate", tls_options.reload)],
        reactor,
        at_start=("server keys",),
    ).setServiceParent(root)

    protocol = ModuleDatagramProtocol(controller, max_reply=config.modules.max_datagram)
    ModuleListenerService(
        config.modules.port,
        protocol,
        config.modules.address,
        reactor,
        reuse_port=config.modules.reuse_port,
        receive_buffer=config.modules.receive_buffer,
    ).setServiceParent(root)

    apps = _application_listener(config, store, app_source, hub, poll, reactor)
    AppListenerService(
        config.apps.port, apps, tls_options, config.apps.address, reactor
    ).setServiceParent(root)

    sink = QueueSink(store, reactor)
    source_services = OrderedMultiService()
    source_services.setName("sources")
    for source in sources:
        InstructionSourceService(source, sink).setServiceParent(source_services)
    source_services.setServiceParent(root)

    jobs = OrderedMultiService()
    jobs.setName("jobs")
    PeriodicJob(
        "expiry", config.jobs.expiry_interval, _expiry(store, reactor, config.store), reactor
    ).setServiceParent(jobs)
    PeriodicJob(
        "housekeeping",
        config.jobs.housekeeping_interval,
        _housekeeping(store, protocol, apps),
        reactor,
    ).setServiceParent(jobs)
    PeriodicJob(
        "security",
        config.jobs.security_interval,
        _security_events(store, controller, reactor),
        reactor,
    ).setServiceParent(jobs)
    rotation = RotationJob(store, config.rotation, config.params, reactor.seconds, system_random)
    rotation_job = PeriodicJob("rotation", config.rotation.check_interval, rotation.run, reactor)
    rotation_job.setServiceParent(jobs)
    PeriodicJob(
        "retention", config.jobs.retention_interval, _retention(store, config, reactor), reactor
    ).setServiceParent(jobs)
    events_job = PeriodicJob("events", config.apps.event_poll_interval, hub.wake_all, reactor)
    events_job.setServiceParent(jobs)
    PeriodicJob(
        "server-keys", config.jobs.server_key_interval, rollover.check, reactor
    ).setServiceParent(jobs)
    jobs.setServiceParent(root)
    return root
