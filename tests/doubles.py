"""
Test doubles shared by the tests: a memory reactor that can listen on UDP,
a recording datagram handler, a store whose lifecycle a test drives, a
recording instruction source, and an in-process PKI for TLS tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from m2mgw import tls
from m2mgw.interfaces import IInstructionSink, IInstructionSource
from m2mgw.records import Instruction, NewInstruction, ServerKey

# -- reactor -------------------------------------------------------------------------


@implementer(IListeningPort, IUDPTransport)
class FakeUDPPort:
    """
    A UDP port of :class:`UDPMemoryReactor`: records what is written.

    :ivar written: ``(datagram, addr)`` pairs, in order.
    :ivar listening: false once :meth:`stopListening` was called.
    """

    def __init__(self, protocol: DatagramProtocol, port: int, interface: str) -> None:
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.written: list[tuple[bytes, Any]] = []
        self.listening = True

    def startListening(self) -> None:
        """Nothing to do: the reactor already started the protocol."""

    def stopListening(self) -> Deferred[None]:
        """Stop the protocol, as a real port does."""
        if self.listening:
            self.listening = False
            self.protocol.doStop()
        return succeed(None)

    def getHost(self) -> IPv4Address | IPv6Address:
        """The address the port pretends to be bound to."""
        if isIPv6Address(self.interface):
            return IPv6Address("UDP", self.interface, self.port)
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)  # noqa: S104

    def write(self, packet: bytes, addr: Any = None) -> None:
        """Record ``packet``."""
        self.written.append((packet, addr))

    def connect(self, host: str, port: int) -> None:
        """Not needed by the gateway."""
        raise NotImplementedError

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """Not needed by the gateway."""
        raise NotImplementedError

    def getBroadcastAllowed(self) -> bool:
        """Not needed by the gateway."""
        return False


@implementer(IListeningPort)
class FakeStreamPort:
    """A TCP/TLS port of :class:`UDPMemoryReactor` that knows whether it listens."""

    def __init__(self, port: int, interface: str) -> None:
        self.port = port
        self.interface = interface
        self.listening = True

    def startListening(self) -> None:
        """Nothing to do."""

    def stopListening(self) -> Deferred[None]:
        """Stop listening."""
        self.listening = False
        return succeed(None)

    def getHost(self) -> IPv4Address:
        """The address the port pretends to be bound to."""
        return IPv4Address("TCP", self.interface or "0.0.0.0", self.port)  # noqa: S104


@implementer(IReactorUDP)
class UDPMemoryReactor(MemoryReactorClock):
    """
    :class:`~twisted.internet.testing.MemoryReactorClock` that can also
    "listen" on UDP (``MemoryReactor`` cannot), and that refuses ports listed
    in :attr:`busy_ports` with ``CannotListenError`` as a real reactor does
    for a port in use.

    :ivar udpPorts: ``(port, protocol, interface, maxPacketSize)`` per listenUDP call.
    :ivar udp_ports: the :class:`FakeUDPPort` objects returned.
    :ivar ssl_ports: the :class:`FakeStreamPort` objects returned by listenSSL.
    """

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: list[tuple[int, DatagramProtocol, str, int]] = []
        self.udp_ports: list[FakeUDPPort] = []
        self.ssl_ports: list[FakeStreamPort] = []
        self.busy_ports: set[tuple[str, int]] = set()

    def _check_busy(self, kind: str, port: int, interface: str) -> None:
        if (kind, port) in self.busy_ports:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        """Record the call, start the protocol on a :class:`FakeUDPPort`."""
        self._check_busy("udp", port, interface)
        self.udpPorts.append((port, protocol, interface, maxPacketSize))
        fake = FakeUDPPort(protocol, port, interface)
        self.udp_ports.append(fake)
        protocol.makeConnection(fake)
        return fake

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> FakeStreamPort:
        """Record the call, like ``MemoryReactor``, and return a stoppable port."""
        self._check_busy("tcp", port, interface)
        self.sslServers.append((port, factory, contextFactory, backlog, interface))
        fake = FakeStreamPort(port, interface)
        self.ssl_ports.append(fake)
        return fake


# -- datagram handling -----------------------------------------------------------------


class RecordingHandler:
    """
    A :class:`~m2mgw.modules.udp.DatagramHandler` that records what it gets.

    By default it answers each datagram with ``reply(data)``; with
    ``hold=True`` it returns unfired Deferreds kept in :attr:`pending`.
    """

    def __init__(
        self,
        reply: Callable[[bytes], bytes | None] = lambda data: b"re:" + data,
        hold: bool = False,
    ) -> None:
        self.reply = reply
        self.hold = hold
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.pending: list[Deferred[bytes | None]] = []

    def handle(self, data: bytes, addr: tuple[str, int]) -> Deferred[bytes | None]:
        """Record, then answer now or later."""
        self.received.append((data, addr))
        if self.hold:
            waiting: Deferred[bytes | None] = Deferred()
            self.pending.append(waiting)
            return waiting
        return succeed(self.reply(data))


# -- store -------------------------------------------------------------------------------


class LifecycleStore:
    """
    Just enough of an ``IModuleStore`` for service tests: a test decides when
    ``open`` and ``close`` finish (``hold_open``/``hold_close``) and
    :attr:`calls` records what the services asked, in order.
    """

    name = "lifecycle"

    def __init__(self, hold_open: bool = False, hold_close: bool = False) -> None:
        self.calls: list[str] = []
        self.hold_open = hold_open
        self.hold_close = hold_close
        self.opening: Deferred[None] | None = None
        self.closing: Deferred[None] | None = None
        self.server_keys: list[ServerKey] = []
        self.enqueued: list[tuple[NewInstruction, int]] = []
        self.expire_results: list[dict[str, int] | Exception] = []
        self.is_open = False

    def open(self) -> Deferred[None]:
        """Open now, or when the test fires :attr:`opening`."""
        self.calls.append("open")
        self.opening = Deferred()
        self.opening.addCallback(self._opened)
        if not self.hold_open:
            self.opening.callback(None)
        return self.opening

    def _opened(self, _: object) -> None:
        self.is_open = True

    def close(self) -> Deferred[None]:
        """Close now, or when the test fires :attr:`closing`."""
        self.calls.append("close")
        self.closing = Deferred()
        self.closing.addCallback(self._closed)
        if not self.hold_close:
            self.closing.callback(None)
        return self.closing

    def _closed(self, _: object) -> None:
        self.is_open = False

    def list_server_keys(self) -> Deferred[list[ServerKey]]:
        """The recorded server keys."""
        self.calls.append("list_server_keys")
        return succeed(list(self.server_keys))

    def add_server_key(self, key: ServerKey) -> Deferred[None]:
        """Record a server key."""
        self.calls.append(f"add_server_key {key.skid}")
        self.server_keys.append(key)
        return succeed(None)

    def expire(self, now: int) -> Deferred[dict[str, int]]:
        """Pop the next scripted result (an exception fails the Deferred)."""
        self.calls.append(f"expire {now}")
        result = self.expire_results.pop(0) if self.expire_results else {}
        if isinstance(result, Exception):
            failed: Deferred[dict[str, int]] = Deferred()
            failed.errback(result)
            return failed
        return succeed(result)

    def count_modules(self) -> Deferred[int]:
        """No modules."""
        return succeed(0)

    def enqueue(self, instruction: NewInstruction, now: int) -> Deferred[Instruction]:
        """Record and return an instruction with ``iid`` 1, 2, ..."""
        self.enqueued.append((instruction, now))
        return succeed(
            Instruction(
                module_id=instruction.module_id,
                iid=len(self.enqueued),
                kind=instruction.kind,
                body=instruction.body,
                wire_size=instruction.wire_size,
                source=instruction.source,
                created_at=now,
                updated_at=now,
            )
        )


# -- instruction sources ------------------------------------------------------------------


@implementer(IInstructionSource)
class RecordingSource:
    """An instruction source that records start/stop and keeps the sink."""

    def __init__(self, name: str = "recording", fail_start: Exception | None = None) -> None:
        self.name = name
        self.fail_start = fail_start
        self.sink: IInstructionSink | None = None
        self.events: list[str] = []

    def start(self, sink: IInstructionSink) -> Deferred[None] | None:
        """Keep the sink (or fail as configured)."""
        self.events.append("start")
        if self.fail_start is not None:
            raise self.fail_start
        self.sink = sink
        return None

    def stop(self) -> Deferred[None] | None:
        """Forget the sink."""
        self.events.append("stop")
        self.sink = None
        return None


# -- TLS ----------------------------------------------------------------------------------


@dataclass
class InProcessPKI:
    """
    A CA, a server certificate and client certificates, made in-process
    with :mod:`m2mgw.tls` and written as PEM files to ``directory``.
    """

    directory: str
    ca_cert_path: str = ""
    server_cert_path: str = ""
    server_key_path: str = ""
    clients: dict[str, tuple[str, str]] = field(default_factory=dict)
    _ca: tuple[Any, x509.Certificate] | None = None

    def __post_init__(self) -> None:
        ca_key = tls.generate_tls_key("ec")
        ca_cert = tls.make_ca_certificate(ca_key, "m2mgw test CA", _now())
        self._ca = (ca_key, ca_cert)
        self.ca_cert_path = self._write("ca.pem", tls.dump_certificate(ca_cert))
        key = tls.generate_tls_key("ec")
        cert = tls.issue_certificate(
            ca_key,
            ca_cert,
            key.public_key(),
            "localhost",
            _now(),
            30,
            server_names=["localhost", "127.0.0.1"],
            server=True,
        )
        self.server_cert_path = self._write("server.pem", tls.dump_certificate(cert))
        self.server_key_path = self._write("server-key.pem", tls.dump_private_key(key))

    def client(self, name: str, common_name: str | None = None) -> tuple[str, str]:
        """``(cert_path, key_path)`` of a client certificate for ``common_name`` or ``name``."""
        assert self._ca is not None
        ca_key, ca_cert = self._ca
        key = tls.generate_tls_key("ec")
        cert = tls.issue_certificate(
            ca_key, ca_cert, key.public_key(), common_name or name, _now(), 30
        )
        paths = (
            self._write(f"{name}.pem", tls.dump_certificate(cert)),
            self._write(f"{name}-key.pem", tls.dump_private_key(key)),
        )
        self.clients[name] = paths
        return paths

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path


def _now() -> float:
    import time

    return time.time()


def server_keys(count: int) -> Sequence[ServerKey]:
    """``count`` fake server key records (skid 1..count, suite p256)."""
    return [ServerKey(skid=i, suite="p256", public=bytes([i]) * 65) for i in range(1, count + 1)]


# -- real clients (blocking; run them in a thread when the reactor must keep running) --


def tls_exchange(
    host: str,
    port: int,
    cert_path: str,
    key_path: str,
    ca_path: str,
    requests: Sequence[dict[str, Any]],
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """
    Connect with the standard library's TLS (certificate verification and
    host name check on), send each request as a JSON line and read one
    answer line per request.
    """
    import json
    import socket
    import ssl

    context = ssl.create_default_context(cafile=ca_path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    answers: list[dict[str, Any]] = []
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        reader = conn.makefile("rb")
        for request in requests:
            conn.sendall(json.dumps(request).encode() + b"\n")
            line = reader.readline()
            if not line:
                break
            answers.append(json.loads(line))
    return answers


def udp_exchange(host: str, port: int, datagram: bytes, timeout: float = 0.5) -> bytes | None:
    """Send one datagram; the reply, or ``None`` if none came within ``timeout``."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, (host, port))
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            return None
        return data


def prepared_data_dir(path: str, key_type: str = "ec") -> str:
    """Create a complete data directory at ``path`` (fast EC TLS keys by default)."""
    from m2mgw.config import DEFAULT_SUITES
    from m2mgw.datadir import DataDir

    DataDir(path).ensure(DEFAULT_SUITES, tls_key_type=key_type)
    return path


def fired(d: Deferred[Any]) -> bool:
    """
    Whether ``d`` has its final result.  (``Deferred.called`` is also true
    while ``d`` waits on a Deferred returned by one of its callbacks.)
    """
    box: list[object] = []

    def seen(result: object) -> object:
        box.append(result)
        return result

    d.addBoth(seen)
    return bool(box)
