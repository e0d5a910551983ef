"""
The gateway's services: the tree :func:`m2mgw.tap.makeService` assembles.

::

    GatewayService "m2mgw"
     ├── StoreService "store"                  opens the store; closes it last
     ├── ModuleListenerService "modules"       UDP, MGP/1
     ├── AppListenerService "apps"             mutual TLS, JSON lines
     ├── OrderedMultiService "sources"         one InstructionSourceService per source
     └── OrderedMultiService "jobs"            PeriodicJob "expiry", "housekeeping"

Twisted's :class:`~twisted.application.service.MultiService` neither waits for
a child's ``startService`` Deferred nor stops children one after the other.
:class:`OrderedMultiService` does both: each child starts once the previous one
has (so nothing touches the store before it is open) and children stop in
reverse order, each once the later ones have stopped (so the store closes
after the listeners and sources have finished their work).

Listeners bind in ``privilegedStartService``; :class:`GatewayService` turns a
port that cannot be bound into :class:`StartupFailed`, which twistd reports
as one line and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import SSLServer, TimerService, UDPServer
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.apps.listener import AppFactory
from m2mgw.datadir import register_server_keys
from m2mgw.errors import M2MGWError
from m2mgw.interfaces import IInstructionSink, IInstructionSource, IModuleStore
from m2mgw.modules.udp import ModuleDatagramProtocol, listen_module_udp, receive_buffer_size
from m2mgw.records import Instruction, NewInstruction, ServerKey


class StartupFailed(SystemExit):
    """
    The gateway cannot start, for a reason the operator must fix (a port in
    use, an unusable data directory).

    It is a :class:`SystemExit`, as twistd's own start-up errors are: twistd
    prints the one-line message and exits with status 1, with no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"m2mgw: {message}")
        self.message = message


class ListenFailed(Exception):
    """A listener could not bind its port; the message is one line saying which and why."""


def describe_listen_error(error: CannotListenError, what: str) -> str:
    """One line saying which listener could not bind and why."""
    reason = error.socketError
    text = getattr(reason, "strerror", None) or str(reason)
    interface = error.interface or "*"
    return f"cannot listen for {what} on {interface} port {error.port}: {text}"


class OrderedMultiService(MultiService):
    """
    A :class:`MultiService` that starts its children one after the other,
    waiting for each one's ``startService`` Deferred, and stops them in
    reverse order, waiting for each one's ``stopService`` Deferred.

    A child that fails to stop is logged and the others are still stopped.
    """

    log = Logger()

    def startService(self) -> Deferred[None]:
        """
        Start the children in order.

        :return: a Deferred firing when all have started, or failing with the
            first child's failure (later children are then not started).
        """
        Service.startService(self)
        return Deferred.fromCoroutine(self._start_children())

    async def _start_children(self) -> None:
        """Start each child once the previous one has started."""
        for child in list(self):
            if not self.running:  # stopped while starting
                return
            await maybeDeferred(child.startService)

    def stopService(self) -> Deferred[None]:
        """
        Stop the children in reverse order, each after the later ones.

        :return: a Deferred firing when all have stopped; it does not fail.
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        """Stop each child once the later ones have stopped."""
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("service {name} did not stop cleanly", name=child.name)


class GatewayService(OrderedMultiService):
    """
    The root of the gateway's service tree.

    :ivar on_start_failure: called with the failure if a child fails to start
        (twistd cannot be told, so :mod:`m2mgw.tap` stops the reactor).
    """

    log = Logger()

    def __init__(self, on_start_failure: Callable[[Failure], None] | None = None) -> None:
        """:param on_start_failure: see :attr:`on_start_failure`."""
        super().__init__()
        self.setName("m2mgw")
        self.on_start_failure = on_start_failure

    def privilegedStartService(self) -> None:
        """
        Bind the listeners.

        :raise StartupFailed: a port cannot be bound; nothing stays bound.
        """
        try:
            super().privilegedStartService()
        except ListenFailed as e:
            self.stopService()
            raise StartupFailed(str(e)) from None

    def startService(self) -> Deferred[None]:
        """
        Start the children in order; a failure is logged and handed to
        :attr:`on_start_failure`.

        :return: a Deferred firing when the gateway is up or has given up; it does not fail.
        """
        return super().startService().addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        """Report a failed start."""
        if failure.check(ListenFailed):
            self.log.critical("{message}", message=str(failure.value))
        elif failure.check(M2MGWError):
            # An expected, explained problem (a store that cannot open): one line.
            self.log.critical("the gateway could not start: {message}", message=str(failure.value))
        else:
            self.log.failure("the gateway could not start", failure)
        if self.on_start_failure is not None:
            self.on_start_failure(failure)


@implementer(IInstructionSink)
class QueueSink:
    """
    The sink instruction sources deliver into: the store's durable queue.

    :ivar clock: stamps the enqueue time.
    """

    def __init__(self, store: IModuleStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock

    def submit(self, instruction: NewInstruction) -> Deferred[Instruction]:
        """Queue ``instruction`` (see :meth:`m2mgw.interfaces.IInstructionSink.submit`)."""
        result: Deferred[Instruction] = self.store.enqueue(instruction, int(self.clock.seconds()))
        return result


class StoreService(Service):
    """
    Opens the store when started and closes it when stopped.

    The gateway's server key references (from the data directory) are
    recorded in the store once it is open, if they are not there yet.
    """

    log = Logger()

    def __init__(self, store: IModuleStore, server_keys: Sequence[ServerKey] = ()) -> None:
        """
        :param store: an unopened store.
        :param server_keys: the data directory's server key records.
        """
        self.setName("store")
        self.store = store
        self.server_keys = tuple(server_keys)
        self._opening: Deferred[None] | None = None

    def startService(self) -> Deferred[None]:
        """
        Open the store and record missing server keys.

        :return: a Deferred firing when the store is ready.
        """
        Service.startService(self)
        opening = Deferred.fromCoroutine(self._open())
        self._opening = opening
        # Whoever started us gets the result; stopService only waits for the attempt.
        result: Deferred[None] = Deferred()
        opening.addCallbacks(result.callback, result.errback)
        return result

    async def _open(self) -> None:
        """Open, then add the server keys the store does not know."""
        await self.store.open()
        for key in await register_server_keys(self.store, self.server_keys):
            self.log.info(
                "recorded server key {skid} ({suite}) in the store", skid=key.skid, suite=key.suite
            )
        self.log.info("store {backend} is open", backend=self.store.name)

    def stopService(self) -> Deferred[None]:
        """
        Close the store (after an open in progress has finished).

        :return: a Deferred firing when every write is flushed and the store is closed.
        """
        Service.stopService(self)
        opening, self._opening = self._opening, None
        if opening is None:
            return succeed(None)
        return Deferred.fromCoroutine(self._close(opening))

    async def _close(self, opening: Deferred[None]) -> None:
        """Wait for ``opening`` (whatever its outcome), then close."""
        await opening  # never fails: the outcome went to whoever started us
        await self.store.close()
        self.log.info("store {backend} is closed", backend=self.store.name)


class _ListenerMixin:
    """
    For ``internet.*Server`` subclasses: binds with a one-line error on
    failure and logs the bound address once.
    """

    log = Logger()
    description = "connections"
    _announced = False
    _port: IListeningPort | None

    def _bind(self, bind: Callable[[], None]) -> None:
        """
        Run ``bind`` (the base class's start method), then log the address.

        :raise ListenFailed: the port cannot be bound.
        """
        try:
            bind()
        except CannotListenError as e:
            raise ListenFailed(describe_listen_error(e, self.description)) from e
        self._announce()

    def _announce(self) -> None:
        """Log the address the listener is bound to, once."""
        if self._announced or self._port is None:
            return
        self._announced = True
        host = self._port.getHost()
        self.log.info(
            "listening for {what} on {address} port {port}",
            what=self.description,
            address=getattr(host, "host", str(host)),
            port=getattr(host, "port", None),
        )

    def listening_port(self) -> IListeningPort | None:
        """The bound port, or ``None`` when not listening."""
        return self._port


class ModuleListenerService(_ListenerMixin, UDPServer):
    """
    The UDP listener modules send MGP/1 datagrams to.

    Stopping first refuses new datagrams, lets the ones being handled be
    answered, then closes the socket.
    """

    description = "modules (UDP)"

    def __init__(
        self,
        port: int,
        protocol: ModuleDatagramProtocol,
        interface: str,
        reactor: Any,
        *,
        reuse_port: bool = False,
        receive_buffer: int = 0,
    ) -> None:
        """
        :param port: the UDP port (0: any free port).
        :param protocol: the datagram protocol.
        :param interface: the address to bind (``""``: every interface).
        :param reactor: an ``IReactorUDP`` (and ``IReactorSocket`` with ``reuse_port``).
        :param reuse_port: bind with ``SO_REUSEPORT`` (several nodes on one host).
        :param receive_buffer: ``SO_RCVBUF`` in bytes (0: the system's default).
        """
        super().__init__(
            port,
            protocol,
            interface=interface,
            maxPacketSize=protocol.max_received + 1,
            reactor=reactor,
        )
        self.setName("modules")
        self.protocol = protocol
        self.reuse_port = reuse_port
        self.receive_buffer = receive_buffer

    def _getPort(self) -> IListeningPort:
        """Bind with the configured socket options (:func:`listen_module_udp`)."""
        port, protocol = self.args
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        listening = listen_module_udp(
            reactor,
            port,
            protocol,
            self.kwargs["interface"],
            self.kwargs["maxPacketSize"],
            reuse_port=self.reuse_port,
            receive_buffer=self.receive_buffer,
        )
        size = receive_buffer_size(listening)
        if size is not None:
            self.log.info(
                "module socket: receive buffer {size} bytes as the kernel counts it"
                " (asked for {asked}{capped}){shared}",
                size=size,
                asked=self.receive_buffer or "the system default",
                capped="; capped by net.core.rmem_max" if 0 < size < self.receive_buffer else "",
                shared=", port shared (SO_REUSEPORT)" if self.reuse_port else "",
            )
        return listening

    def privilegedStartService(self) -> None:
        """
        Bind the socket and log where.

        :raise ListenFailed: the port cannot be bound.
        """
        self._bind(super().privilegedStartService)

    def startService(self) -> None:
        """
        Bind the socket if that has not happened yet.

        :raise ListenFailed: the port cannot be bound.
        """
        self._bind(super().startService)

    def stopService(self) -> Deferred[None]:
        """
        Refuse new datagrams, wait for the replies in flight, close the socket.

        :return: a Deferred firing when the socket is closed.
        """
        self.protocol.stop_accepting()
        return self.protocol.drain().addCallback(lambda _: UDPServer.stopService(self))


class AppListenerService(_ListenerMixin, SSLServer):
    """
    The mutual-TLS listener application servers connect to.

    Stopping closes the listening socket, then every open connection.
    """

    description = "application servers (TLS)"

    def __init__(
        self,
        port: int,
        factory: AppFactory,
        tls_options: Any,
        interface: str,
        reactor: Any,
    ) -> None:
        """
        :param port: the TCP port (0: any free port).
        :param factory: builds the connections' protocols.
        :param tls_options: server TLS options requiring client certificates.
        :param interface: the address to bind (``""``: every interface).
        :param reactor: an ``IReactorSSL``.
        """
        super().__init__(port, factory, tls_options, interface=interface, reactor=reactor)
        self.setName("apps")
        self.factory = factory

    def privilegedStartService(self) -> None:
        """
        Bind the socket and log where.

        :raise ListenFailed: the port cannot be bound.
        """
        self._bind(super().privilegedStartService)

    def startService(self) -> None:
        """
        Bind the socket if that has not happened yet.

        :raise ListenFailed: the port cannot be bound.
        """
        self._bind(super().startService)

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting connections, then close the open ones.

        :return: a Deferred firing when all connections are closed.
        """
        stopped: Deferred[None] = maybeDeferred(SSLServer.stopService, self)
        return stopped.addCallback(lambda _: self.factory.disconnect_all())


class InstructionSourceService(Service):
    """Runs one :class:`~m2mgw.interfaces.IInstructionSource`, feeding ``sink``."""

    log = Logger()

    def __init__(self, source: IInstructionSource, sink: IInstructionSink) -> None:
        self.setName(source.name)
        self.source = source
        self.sink = sink
        self._started = False

    def startService(self) -> Deferred[None]:
        """Start the source; the Deferred fails if the source cannot start."""
        Service.startService(self)
        self._started = True
        start: Callable[[IInstructionSink], Any] = self.source.start
        started: Deferred[None] = maybeDeferred(start, self.sink)
        return started.addCallback(self._log_started)

    def _log_started(self, _: object) -> None:
        """Say that the source runs."""
        self.log.info("instruction source {name} started", name=self.source.name)

    def stopService(self) -> Deferred[None]:
        """Stop the source if it was started."""
        Service.stopService(self)
        if not self._started:
            return succeed(None)
        self._started = False
        stop: Callable[[], Any] = self.source.stop
        stopped: Deferred[None] = maybeDeferred(stop)
        return stopped


class PeriodicJob(TimerService):
    """
    Runs ``work`` every ``interval`` seconds (first at start) on ``clock``.

    A failure of ``work`` (raised or in its Deferred) is logged and counted in
    :attr:`failures`; the job runs again at the next interval.  A run that
    takes longer than the interval delays the next one instead of overlapping.
    """

    log = Logger()

    def __init__(
        self, name: str, interval: float, work: Callable[[], object], clock: IReactorTime
    ) -> None:
        """
        :param name: the service name, also used in log events.
        :param interval: seconds between runs.
        :param work: the job; may return a Deferred.
        :param clock: the time source (the reactor, or a ``task.Clock`` in tests).
        """
        super().__init__(interval, self._run_once)
        self.setName(name)
        self._started = False
        self.clock = clock
        self.work = work
        #: How many runs failed.
        self.failures = 0
        #: How many runs completed.
        self.runs = 0

    def _run_once(self) -> Deferred[None]:
        """One run of ``work``; never fails."""
        running: Deferred[object] = maybeDeferred(self.work)
        return running.addCallbacks(self._succeeded, self._failed_run)

    def _succeeded(self, _: object) -> None:
        """Count a completed run."""
        self.runs += 1

    def _failed_run(self, failure: Failure) -> None:
        """Log and count a failed run."""
        self.failures += 1
        self.log.failure("periodic job {job} failed; it runs again later", failure, job=self.name)

    def startService(self) -> None:
        """Start running ``work`` (once now, then every ``interval``)."""
        self._started = True
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        """Stop the job, waiting for a run in progress; safe if never started."""
        if not self._started:
            Service.stopService(self)
            return None
        self._started = False
        stopped: Deferred[None] | None = super().stopService()
        return stopped


class ReloadService(Service):
    """
    Reloads, without a restart and without dropping traffic, what an operator
    changes under a running gateway: each *reloader* is a named callable
    (returning nothing, a Deferred or a coroutine) -- the server keys, the
    application TLS certificate.  They run, in order, on ``SIGHUP`` (the
    handler is installed while the service runs, from the main thread only,
    and the previous one put back when it stops) and on :meth:`reload`.

    A reloader that fails is logged and the others still run; what it
    reloads stays as it was.  The reloaders named in ``at_start`` also run
    when the service starts, and a failure there fails the start.  Reloads
    never overlap: one asked for while another runs follows it.
    """

    log = Logger()

    def __init__(
        self,
        reloaders: Sequence[tuple[str, Callable[[], object]]],
        reactor: Any,
        *,
        at_start: Sequence[str] = (),
        signal_number: int | None = signal.SIGHUP,
    ) -> None:
        """
        :param reloaders: ``(what, callable)`` pairs, run in this order.
        :param reactor: the reactor a signal is handed to (``callFromThread``).
        :param at_start: the names of the reloaders that also run at start.
        :param signal_number: the signal that asks for a reload (``None``: none).
        """
        self.setName("reload")
        self.reloaders = tuple(reloaders)
        self.reactor = reactor
        self.at_start = tuple(at_start)
        self.signal_number = signal_number
        self._previous_handler: Any = None
        self._installed = False
        self._tail: Deferred[object] = succeed(None)
        #: How many reloads ran (started by a signal or by :meth:`reload`).
        self.reloads = 0

    def startService(self) -> Deferred[None]:
        """
        Run the ``at_start`` reloaders, then listen for the signal.

        :return: a Deferred firing when they have run; it fails if one failed.
        """
        Service.startService(self)
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for what, work in self.reloaders:
            if what in self.at_start:
                await maybeDeferred(work)
        self._install()

    def _install(self) -> None:
        if self.signal_number is None or not self.running:
            return
        if threading.current_thread() is not threading.main_thread():
            self.log.warn("not in the main thread: no signal handler for reloads")
            return
        self._previous_handler = signal.signal(self.signal_number, self._signalled)
        self._installed = True
        self.log.info(
            "{signal} reloads {reloaders}",
            signal=signal.Signals(self.signal_number).name,
            reloaders=", ".join(what for what, _ in self.reloaders),
        )

    def _signalled(self, signum: int, frame: object) -> None:
        # A signal handler runs between two bytecodes of the main thread:
        # hand the work to the reactor, which callFromThread also wakes up.
        self.reactor.callFromThread(self.reload)

    def stopService(self) -> Deferred[None]:
        """
        Put the previous signal handler back, and wait for a reload in progress.

        :return: a Deferred firing when no reload runs any more.
        """
        Service.stopService(self)
        if self._installed and self.signal_number is not None:
            signal.signal(self.signal_number, self._previous_handler)
            self._installed = False
        done: Deferred[None] = Deferred()
        self._tail.addBoth(lambda _: done.callback(None))
        return done

    def reload(self) -> Deferred[dict[str, bool]]:
        """
        Run every reloader (after a reload in progress, if any).

        :return: a Deferred firing with ``{what: succeeded}``; it does not fail.
        """
        result: Deferred[dict[str, bool]] = Deferred()

        def run(_: object) -> Deferred[dict[str, bool]]:
            return Deferred.fromCoroutine(self._reload_all())

        def deliver(outcome: object) -> None:
            result.callback(outcome)  # type: ignore[arg-type]

        self._tail = self._tail.addBoth(run)
        self._tail.addBoth(deliver)
        return result

    async def _reload_all(self) -> dict[str, bool]:
        self.reloads += 1
        outcome: dict[str, bool] = {}
        for what, work in self.reloaders:
            try:
                await maybeDeferred(work)
            except Exception:
                self.log.failure("reloading {reloader} failed; it stays as it was", reloader=what)
                outcome[what] = False
            else:
                self.log.info("reloaded {reloader}", reloader=what)
                outcome[what] = True
        return outcome


def find_service(root: IService, path: str) -> IService:
    """
    A service of the tree by its slash-separated path of names (``"jobs/expiry"``).

    :raise KeyError: no such service.
    """
    service: Any = root
    for name in path.split("/"):
        service = service.getServiceNamed(name)
    result: IService = service
    return result
