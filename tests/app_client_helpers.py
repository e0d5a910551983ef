"""
Shared by the application client tests: a scripted gateway that speaks the
application protocol of ``docs/app-protocol.md`` (an outbox with sequence
numbers, cumulative acks, subscriptions that resume after the acknowledged
position), served in memory to the Twisted client (``iosim``, optionally
over real in-memory TLS) and over socket pairs or TLS sockets to the
blocking one.  It is independent of the real gateway's implementation.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError as TwistedConnectionRefused
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from m2mgw.client.module import ModuleEndpoint, ModuleState, ServerPublicKey
from m2mgw.client.transport import BlockingTransport, run_blocking
from m2mgw.datadir import DataDir
from m2mgw.service import find_service
from m2mgw.tap import Options, makeService

HELLO: dict[str, Any] = {
    "version": 1,
    "versions": [1],
    "principal": "billing",
    "time": 1_750_000_000,
    "permissions": ["cancel", "submit"],
    "hours": None,
    "idle_timeout": 300,
    "ping_interval": 60,
    "max_line": 65536,
    "max_unacked": 1000,
}


class Refusal(Exception):
    """A handler refuses a request with an error code."""

    def __init__(self, code: str, message: str = "refused") -> None:
        super().__init__(code)
        self.code = code
        self.message = message


#: A handler: (connection, request) -> result dict, or None to answer later.
Handler = Callable[["Connection", dict[str, Any]], Any]


class Connection:
    """One client connection as the scripted gateway sees it."""

    def __init__(self, world: World, write_line: Callable[[bytes], None]) -> None:
        self.world = world
        self._write_line = write_line
        self.subscribed = False
        self.filters: dict[str, Any] = {}
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        """Write one JSON line to the client."""
        if not self.closed:
            self._write_line(json.dumps(message, separators=(",", ":")).encode())

    def answer(self, request_id: Any, result: Any) -> None:
        """A success response."""
        self.send({"id": request_id, "ok": True, "result": result})

    def refuse(self, request_id: Any, code: str, message: str = "refused") -> None:
        """An error response."""
        self.send({"id": request_id, "ok": False, "error": {"code": code, "message": message}})

    def passes(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` passes this connection's filters."""
        kinds = self.filters.get("events")
        modules = self.filters.get("modules")
        if kinds is not None and event["event"] not in kinds:
            return False
        return modules is None or event.get("module") in modules or event.get("module") is None

    def deliver_backlog(self) -> None:
        """Every stored event after the acknowledged position that passes the filters."""
        for event in self.world.outbox:
            if event["seq"] > self.world.acked and self.passes(event):
                self.send(event)

    def line_received(self, line: bytes) -> None:
        """Handle one request line."""
        request = json.loads(line)
        self.world.requests.append(request)
        op = request.get("op")
        handler = self.world.handlers.get(op)
        if handler is None:
            self.refuse(request.get("id"), "unknown-op", f"unknown op {op!r}")
            return
        try:
            result = handler(self, request)
        except Refusal as e:
            self.refuse(request.get("id"), e.code, e.message)
            return
        if result is not None:
            self.answer(request["id"], result)
        if op == "subscribe":
            self.deliver_backlog()


@dataclass
class World:
    """The scripted gateway's state, shared by all its connections."""

    hello: dict[str, Any] = field(default_factory=lambda: dict(HELLO))
    outbox: list[dict[str, Any]] = field(default_factory=list)
    acked: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    instructions: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.handlers.update(
            {
                "hello": self._hello,
                "ping": lambda c, r: {"time": 1_750_000_000},
                "subscribe": self._subscribe,
                "unsubscribe": self._unsubscribe,
                "ack": self._ack,
                "get": self._get,
            }
        )

    @property
    def last_seq(self) -> int:
        return self.outbox[-1]["seq"] if self.outbox else 0

    def ops(self) -> list[str]:
        """The ops of every request so far, in order."""
        return [r["op"] for r in self.requests]

    def add_event(
        self, event_kind: str = "report", /, module: str | None = "meter-1", **payload: Any
    ) -> dict[str, Any]:
        """Append an event to the outbox and push it to subscribed connections."""
        event = {
            "event": event_kind,
            "seq": self.last_seq + 1,
            "module": module,
            "at": 1_750_000_000 + self.last_seq,
            "payload": payload,
        }
        self.outbox.append(event)
        for connection in self.connections:
            if connection.subscribed and connection.passes(event):
                connection.send(event)
        return event

    def push(self, message: dict[str, Any]) -> None:
        """Send an unsequenced message to every subscribed connection."""
        for connection in self.connections:
            if connection.subscribed:
                connection.send(message)

    def _hello(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        return {**self.hello, "acked_seq": self.acked, "last_seq": self.last_seq}

    def _subscribe(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        connection.subscribed = True
        connection.filters = {k: v for k, v in request.items() if k not in ("id", "op")}
        return {"acked_seq": self.acked, "last_seq": self.last_seq}

    def _unsubscribe(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        connection.subscribed = False
        return {}

    def _ack(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        self.acked = max(self.acked, min(int(request["seq"]), self.last_seq))
        return {"acked_seq": self.acked}

    def _get(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        states = self.instructions.get((request["module"], request["iid"]))
        if not states:
            raise Refusal("forbidden", f"module {request['module']!r} is not one of yours")
        return states.pop(0) if len(states) > 1 else states[0]


# -- Twisted, in memory --------------------------------------------------------------------------


class GatewayProtocol(LineReceiver):
    """The scripted gateway on a Twisted transport."""

    delimiter = b"\n"

    def __init__(self, world: World) -> None:
        self.world = world
        self.connection = Connection(world, self.sendLine)

    def connectionMade(self) -> None:
        self.world.connections.append(self.connection)

    def connectionLost(self, reason: Any = None) -> None:
        self.connection.closed = True
        if self.connection in self.world.connections:
            self.world.connections.remove(self.connection)

    def lineReceived(self, line: bytes) -> None:
        self.connection.line_received(line)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    Connects to the scripted gateway through ``iosim`` pumps, optionally
    wrapping both sides in TLS (``server_tls``: gateway options; the client's
    TLS is wrapped in by the caller or by ``client_tls``).
    """

    def __init__(
        self,
        world: World,
        clock: Clock,
        server_tls: Any = None,
        client_tls: Any = None,
    ) -> None:
        self.world = world
        self.clock = clock
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.pumps: list[iosim.IOPump] = []
        self.servers: list[GatewayProtocol] = []
        self.refuse = False
        self.attempts = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(TwistedConnectionRefused())
        server_protocol = GatewayProtocol(self.world)
        self.servers.append(server_protocol)
        server: Any = server_protocol
        if self.server_tls is not None:
            wrapped = TLSMemoryBIOFactory(
                self.server_tls, False, Factory.forProtocol(lambda: server_protocol), self.clock
            )
            server = wrapped.buildProtocol(iosim.FakeAddress())
        client: Any
        if self.client_tls is not None:
            client_factory = TLSMemoryBIOFactory(self.client_tls, True, factory, self.clock)
            client = client_factory.buildProtocol(iosim.FakeAddress())
            result = client.wrappedProtocol
        else:
            client = factory.buildProtocol(iosim.FakeAddress())
            result = client
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True),
            client,
            iosim.FakeTransport(client, isServer=False),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        return succeed(result)

    def flush(self) -> None:
        """Move every byte in every direction until nothing moves."""
        for _ in range(100):
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved
            if not moved:
                return

    def drop(self) -> None:
        """The gateway closes the newest connection."""
        self.servers[-1].transport.loseConnection()  # type: ignore[union-attr]
        self.flush()


# -- blocking: a gateway thread per connection -----------------------------------------------------


class SocketGateway:
    """
    Serves the scripted gateway on real sockets in threads: :meth:`opener`
    (socket pairs, no TLS) for :class:`~m2mgw.client.app.BlockingAppClient`,
    or a TLS listener on 127.0.0.1 (:meth:`listen_tls`).
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.lock = threading.RLock()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.opened = 0
        self.listener: socket.socket | None = None

    def opener(self, timeout: float) -> socket.socket:
        """A connected socket whose other end a new thread serves."""
        self.opened += 1
        client, server = socket.socketpair()
        self._serve(server)
        return client

    def listen_tls(self, context: ssl.SSLContext) -> int:
        """Accept TLS connections on 127.0.0.1; the port."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.listener = listener

        def accept() -> None:
            while True:
                try:
                    raw, _ = listener.accept()
                except OSError:
                    return
                conn = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                try:
                    conn.do_handshake()
                except (OSError, ssl.SSLError):
                    # Like the gateway: the alert is out; close without a reset.
                    plain = socket.socket(fileno=conn.detach())
                    threading.Thread(target=_linger_close, args=(plain,), daemon=True).start()
                    continue
                self._serve(conn)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        port: int = listener.getsockname()[1]
        return port

    def _serve(self, sock: socket.socket) -> None:
        def write(line: bytes) -> None:
            with contextlib.suppress(OSError):
                sock.sendall(line + b"\n")

        connection = Connection(self.world, write)
        with self.lock:
            self.sockets.append(sock)
            self.world.connections.append(connection)

        def run() -> None:
            buffer = b""
            try:
                while True:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        with self.lock:
                            connection.line_received(line)
            finally:
                connection.closed = True
                with self.lock:
                    if connection in self.world.connections:
                        self.world.connections.remove(connection)
                with contextlib.suppress(OSError):
                    sock.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def add_event(self, event_kind: str = "report", /, **kwargs: Any) -> dict[str, Any]:
        with self.lock:
            return self.world.add_event(event_kind, **kwargs)

    def drop(self) -> None:
        """Close the newest connection from the gateway's side."""
        with self.lock:
            sock = self.sockets[-1]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self.listener.close()
        for thread in self.threads:
            thread.join(timeout=5)


def _linger_close(sock: socket.socket) -> None:
    """Half-close, read what the peer still sends, then close (no TCP reset)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2.0)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def server_ssl_context(cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """A gateway-like TLS server context: client certificates from ``ca_path`` required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    context.load_verify_locations(cafile=ca_path)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- the real gateway ------------------------------------------------------------------------------

PSK = bytes(range(100, 132))


@dataclass
class RealGateway:
    store: Any
    module_port: int
    app_address: str
    datadir: DataDir
    certs: str


@asynccontextmanager
async def real_gateway(workdir: Path, app: str = "billing") -> AsyncIterator[RealGateway]:
    """The gateway's real service tree on 127.0.0.1, and a certificate for ``app``."""
    from twisted.internet import reactor

    options = Options()
    options.parseOptions(
        ["-c", "gw.conf", "--data-dir", str(workdir / "data"), "--module-address", "127.0.0.1",
         "--module-port", "0", "--app-address", "127.0.0.1", "--app-port", "0"]
    )  # fmt: skip
    root = makeService(options, reactor)
    root.privilegedStartService()
    await root.startService()
    try:
        datadir = DataDir(str(workdir / "data"))
        certs = workdir / "certs"
        datadir.issue_app_cert(app, str(certs), key_type="ec")
        shutil.copyfile(datadir.tls_paths[2], certs / "m2mgw-ca.pem")
        apps = find_service(root, "apps").listening_port()  # type: ignore[attr-defined]
        modules = find_service(root, "modules").listening_port()  # type: ignore[attr-defined]
        yield RealGateway(
            store=find_service(root, "store").store,  # type: ignore[attr-defined]
            module_port=modules.getHost().port,
            app_address=f"127.0.0.1:{apps.getHost().port}",
            datadir=datadir,
            certs=str(certs),
        )
    finally:
        await root.stopService()


def real_module(datadir: DataDir, module_id: str) -> ModuleEndpoint:
    keys = {
        key.skid: ServerPublicKey(key.skid, key.suite, key.public, key.sig_public)
        for key in datadir.server_keys()
    }
    skid = next(skid for skid, key in keys.items() if key.suite == "p256")
    state = ModuleState(identity=module_id, suite="p256", psk=PSK, server_keys=keys, skid=skid)
    return ModuleEndpoint(state, execute=lambda kind, body: (0, {"done": kind}))


def wake(port: int, plan: Any) -> Any:
    with BlockingTransport([("127.0.0.1", port)], timeout=1.0) as transport:
        return run_blocking(transport, plan)
