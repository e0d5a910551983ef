"""
The UDP listener's protocol: one MGP/1 message per datagram, in and out.

:class:`ModuleDatagramProtocol` is deliberately thin.  It drops datagrams
larger than MGP/1 allows, hands every other one with its source address to a
:class:`DatagramHandler` (the protocol engine), and writes the handler's reply,
if any, back to exactly the address the datagram came from, through the socket
it arrived on (MGP/1 §1).  Whatever goes wrong with one datagram is counted,
logged and contained: it never stops the listener or affects another datagram.

:func:`listen_module_udp` binds the listener's socket: with ``SO_REUSEPORT``
(several gateway processes on one host sharing the port, the kernel spreading
modules across them by source address) Twisted's ``listenUDP`` cannot be
used, so the socket is made, bound and handed to the reactor here
(``adoptDatagramPort``).  Either way it gets the configured receive buffer,
since a burst of wake-ups larger than the buffer is dropped by the kernel
unseen.
"""

from __future__ import annotations

import ipaddress
import socket
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: The largest datagram a module may send (MGP/1 §1); larger ones are dropped unread.
MAX_RECEIVED_DATAGRAM = 1472

#: The largest datagram the gateway sends unless configured otherwise (MGP/1 §1).
DEFAULT_MAX_REPLY = 1232

#: The receive buffer asked for unless configured otherwise, in bytes (``SO_RCVBUF``).
DEFAULT_RECEIVE_BUFFER = 4 * 1024 * 1024


class DatagramHandler(Protocol):
    """
    What the UDP listener hands datagrams to (the MGP/1 engine).

    The handler decides everything about a datagram; the listener only moves
    bytes.  Its Deferred may fail: the listener logs and counts the failure
    and sends nothing.
    """

    def handle(self, data: bytes, addr: tuple[str, int]) -> Deferred[bytes | None]:
        """
        Process one datagram.

        :param data: the datagram, at most :data:`MAX_RECEIVED_DATAGRAM` bytes.
        :param addr: its source ``(host, port)``.
        :return: a Deferred firing with the reply to send to ``addr``, or
            ``None`` to stay silent.
        """
        ...


@dataclass
class DatagramCounters:
    """
    What the listener saw, for logs and monitoring.

    :ivar received: datagrams received (all of them).
    :ivar oversized: dropped because longer than :data:`MAX_RECEIVED_DATAGRAM`.
    :ivar refused: dropped because the listener was shutting down.
    :ivar answered: replies sent.
    :ivar unanswered: datagrams the handler chose not to answer.
    :ivar handler_errors: datagrams whose handler raised or failed.
    :ivar oversized_replies: replies not sent because longer than the configured maximum.
    :ivar send_errors: replies the socket refused, or that came after the listener stopped.
    """

    received: int = 0
    oversized: int = 0
    refused: int = 0
    answered: int = 0
    unanswered: int = 0
    handler_errors: int = 0
    oversized_replies: int = 0
    send_errors: int = 0


class ModuleDatagramProtocol(DatagramProtocol):
    """
    Receives MGP/1 datagrams and sends the handler's replies.

    :ivar counters: a :class:`DatagramCounters`.
    """

    log = Logger()
    #: The listener service logs where it listens; Twisted's own start/stop lines are noise.
    noisy = False

    def __init__(
        self,
        handler: DatagramHandler,
        max_reply: int = DEFAULT_MAX_REPLY,
        max_received: int = MAX_RECEIVED_DATAGRAM,
    ) -> None:
        """
        :param handler: decides what to answer.
        :param max_reply: the largest reply sent; a longer one is dropped and
            counted (it would be a bug in the handler).
        :param max_received: the largest datagram handed to the handler.
        """
        self.handler = handler
        self.max_reply = max_reply
        self.max_received = max_received
        self.counters = DatagramCounters()
        self._accepting = True
        self._in_flight: set[Deferred[None]] = set()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Hand ``datagram`` to the handler unless it is too large; never raises."""
        self.counters.received += 1
        if len(datagram) > self.max_received:
            self.counters.oversized += 1
            self.log.debug(
                "dropped a {size}-byte datagram from {host}:{port}: larger than {limit} bytes",
                size=len(datagram),
                host=addr[0],
                port=addr[1],
                limit=self.max_received,
            )
            return
        if not self._accepting:
            self.counters.refused += 1
            return
        try:
            replied = self.handler.handle(datagram, (addr[0], addr[1]))
        except Exception:
            self._handler_failed(Failure(), addr)
            return
        done: Deferred[None] = replied.addCallbacks(
            self._send_reply, self._handler_failed, callbackArgs=(addr,), errbackArgs=(addr,)
        )
        if not done.called:
            self._in_flight.add(done)
            done.addBoth(self._forget, done)

    def _forget(self, result: object, done: Deferred[None]) -> object:
        """Remove a finished Deferred from the in-flight set."""
        self._in_flight.discard(done)
        return result

    def _send_reply(self, reply: bytes | None, addr: Any) -> None:
        """Write ``reply`` to ``addr``, or count the silence."""
        if reply is None:
            self.counters.unanswered += 1
            return
        if len(reply) > self.max_reply:
            self.counters.oversized_replies += 1
            self.log.error(
                "not sending a {size}-byte reply to {host}:{port}: larger than {limit} bytes",
                size=len(reply),
                host=addr[0],
                port=addr[1],
                limit=self.max_reply,
            )
            return
        transport = self.transport
        if transport is None:
            self.counters.send_errors += 1
            self.log.info(
                "reply to {host}:{port} dropped: the listener has stopped",
                host=addr[0],
                port=addr[1],
            )
            return
        try:
            transport.write(reply, addr)
        except Exception:
            self.counters.send_errors += 1
            self.log.failure("could not send a reply to {host}:{port}", host=addr[0], port=addr[1])
            return
        self.counters.answered += 1

    def _handler_failed(self, failure: Failure, addr: Any) -> None:
        """Log and count a handler failure; the datagram gets no reply."""
        self.counters.handler_errors += 1
        self.log.failure(
            "the handler failed on a datagram from {host}:{port}",
            failure,
            host=addr[0],
            port=addr[1],
        )

    def stop_accepting(self) -> None:
        """Drop (and count) every datagram from now on; replies in flight still go out."""
        self._accepting = False

    def drain(self) -> Deferred[None]:
        """
        :return: a Deferred firing once every datagram handed to the handler so
            far has been answered or dropped.
        """
        pending = list(self._in_flight)
        if not pending:
            return succeed(None)
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)


def listen_module_udp(
    reactor: Any,
    port: int,
    protocol: DatagramProtocol,
    interface: str = "",
    max_packet_size: int = MAX_RECEIVED_DATAGRAM + 1,
    *,
    reuse_port: bool = False,
    receive_buffer: int = 0,
) -> IListeningPort:
    """
    Bind the module listener's UDP socket and start ``protocol`` on it.

    :param reactor: an ``IReactorUDP`` (and, with ``reuse_port``, an ``IReactorSocket``).
    :param port: the UDP port (0: any free port).
    :param interface: the IP address literal to bind (``""``: every IPv4 interface).
    :param max_packet_size: the largest datagram read.
    :param reuse_port: set ``SO_REUSEPORT`` before binding, so that other
        processes (of the same user) may bind the same port and the kernel
        spreads the datagrams across them, by source address.
    :param receive_buffer: ``SO_RCVBUF`` in bytes (0: the system's default).
        The kernel caps it at ``net.core.rmem_max`` (and Linux reports twice
        the value set); see :func:`receive_buffer_size` for what it got.
    :return: the listening port.
    :raise CannotListenError: the address cannot be bound, or the system has
        no ``SO_REUSEPORT``.
    """
    if not reuse_port:
        listening: IListeningPort = reactor.listenUDP(
            port, protocol, interface=interface, maxPacketSize=max_packet_size
        )
        handle = _socket_of(listening)
        if receive_buffer > 0 and handle is not None:
            _set_receive_buffer(handle, receive_buffer)
        return listening
    option = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise CannotListenError(
            interface, port, OSError("SO_REUSEPORT is not available on this system")
        )
    family = (
        socket.AF_INET6
        if interface and ipaddress.ip_address(interface).version == 6
        else socket.AF_INET
    )
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
            if receive_buffer > 0:
                _set_receive_buffer(sock, receive_buffer)
            sock.bind((interface or "0.0.0.0", port))  # noqa: S104 - "" means every interface
        except OSError as e:
            raise CannotListenError(interface, port, e) from e
        sock.setblocking(False)
        # The reactor duplicates the descriptor; ours is closed below.
        adopted: IListeningPort = reactor.adoptDatagramPort(
            sock.fileno(), family, protocol, max_packet_size
        )
        return adopted
    finally:
        sock.close()


def receive_buffer_size(listening: IListeningPort) -> int | None:
    """
    The receive buffer the kernel gave ``listening`` (``SO_RCVBUF``, in bytes;
    Linux counts its bookkeeping too, reporting twice the value set), or
    ``None`` for a port without a socket (a test double).
    """
    handle = _socket_of(listening)
    if handle is None:
        return None
    size: int = handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return size


def _socket_of(listening: IListeningPort) -> socket.socket | None:
    get_handle = getattr(listening, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    return handle if isinstance(handle, socket.socket) else None


def _set_receive_buffer(sock: socket.socket, size: int) -> None:
    """Ask for ``size`` bytes of receive buffer; the kernel silently caps it."""
    with suppress(OSError):  # the system default stays; receive_buffer_size() tells
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
