"""
The application servers' listener: JSON lines over mutual TLS.

Each line an application server sends is one JSON object, a request::

    {"id": 1, "op": "hello"}

and each request gets exactly one line back, in order::

    {"id": 1, "ok": true, "result": {"version": 1, "principal": "billing"}}
    {"id": 2, "ok": false, "error": {"code": "unknown-op", "message": "..."}}

Between them the gateway pushes events (lines with ``event`` and no ``id``)
to connections that subscribed (:mod:`m2mgw.apps.events`).  The protocol is
specified in ``docs/app-protocol.md``; the operations are in
:mod:`m2mgw.apps.operations`.

Error codes found here: ``bad-json`` (the line is not JSON), ``bad-request``
(not an object with a string or integer ``id`` and a string ``op``),
``unknown-op``, ``line-too-long`` (the line exceeded the configured maximum;
it is skipped up to its end), ``internal-error``, ``unauthenticated`` and
``network-refused`` (both close the connection), and whatever an operation
raises as an :class:`AppRequestError`.  A connection stays usable after the
others.

The application's identity (its *principal*) is the common name of the client
certificate it authenticated with; the TLS options require one signed by the
gateway's application CA (:mod:`m2mgw.tls`).  Operations live in a
:class:`Dispatcher`, a table from ``op`` to a function.

**One slow application never holds up the others.**  A request whose
operation has not finished pauses reading from that connection only.  The
connection registers a streaming producer with its transport: when the
transport's send buffer is full (the application does not read), event
delivery pauses and the connection stops reading requests, so its memory
stays bounded; both resume when the buffer drains.  A connection silent for
``idle_timeout`` seconds is closed; one the gateway has sent nothing to for
``ping_interval`` seconds gets a ``ping`` event.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.apps.events import EventDelivery, EventFilter, EventHub
from m2mgw.apps.policy import AppPolicies
from m2mgw.interfaces import IModuleStore
from m2mgw.records import SecurityEvent
from m2mgw.store.logic import NON_APP_SOURCES
from m2mgw.tls import peer_principal

#: The version of the application protocol ``hello`` announces.
APP_PROTOCOL_VERSION = 1

#: Every version this gateway speaks.
SUPPORTED_VERSIONS = (1,)

_log = Logger()

#: Names no application may have: the gateway's own instruction sources.
RESERVED_PRINCIPALS = frozenset(NON_APP_SOURCES | {"apps"})

#: Seconds :meth:`AppFactory.disconnect_all` waits for a clean TLS close before aborting.
DISCONNECT_GRACE = 5.0


class AppRequestError(Exception):
    """
    An operation refuses a request; the application gets ``code`` and ``message``.

    :ivar code: a short, stable, machine-readable code (``"unknown-module"``).
    :ivar message: one line for a person.
    :ivar request_id: the id of the refused request, when the refusal happens
        before an :class:`AppRequest` exists (parsing).
    """

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class ListenerSettings:
    """
    The limits of the application listener, as ``hello`` tells them.

    :ivar idle_timeout: seconds of silence before a connection is closed (0: never).
    :ivar ping_interval: seconds without sending before a ``ping`` event (0: never).
    :ivar max_line: the longest request line, in bytes.
    :ivar max_unacked: the most events sent beyond the acknowledged position.
    """

    idle_timeout: int = 300
    ping_interval: int = 60
    max_line: int = 65536
    max_unacked: int = 1000


@dataclass(frozen=True)
class AppRequest:
    """
    One request, as an operation sees it.

    :ivar id: the application's request id (echoed in the answer).
    :ivar op: the operation's name.
    :ivar params: every other member of the request object.
    :ivar principal: the authenticated application (client certificate CN).
    :ivar connection: the :class:`AppProtocol` it came on (``None`` when
        dispatched without one, in tests).
    """

    id: str | int
    op: str
    params: Mapping[str, Any]
    principal: str
    connection: Any = None


#: An operation: takes the request, returns a JSON-compatible result, a
#: Deferred of one, or a coroutine; raises :class:`AppRequestError` to refuse.
Operation = Callable[[AppRequest], Any]


def hello(request: AppRequest) -> dict[str, Any]:
    """The ``hello`` operation: the protocol version and who the gateway thinks you are."""
    return {"version": APP_PROTOCOL_VERSION, "principal": request.principal}


#: The operations every gateway answers.
DEFAULT_OPERATIONS: Mapping[str, Operation] = MappingProxyType({"hello": hello})


class Dispatcher:
    """The request-dispatch table: ``op`` name to :data:`Operation`."""

    log = Logger()

    def __init__(self, operations: Mapping[str, Operation] = DEFAULT_OPERATIONS) -> None:
        """:param operations: the table; later issues add their operations to it."""
        self.operations = dict(operations)

    def dispatch(self, request: AppRequest) -> Deferred[Any]:
        """
        Run the request's operation.

        :return: a Deferred firing with the result, or failing with
            :class:`AppRequestError` (``unknown-op`` if there is no such operation).
        """
        operation = self.operations.get(request.op)
        if operation is None:
            return fail(AppRequestError("unknown-op", f"unknown op {request.op!r}"))
        return maybeDeferred(operation, request)


def _encode(answer: Mapping[str, Any]) -> bytes:
    """One answer as a compact JSON line (without the newline)."""
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _error(request_id: object, code: str, message: str) -> dict[str, Any]:
    """An error answer."""
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def _reject_constant(name: str) -> None:
    """``json.loads`` hook refusing ``NaN`` and ``Infinity``, which are not JSON."""
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes, principal: str, connection: Any = None) -> AppRequest:
    """
    Parse one request line.

    :raise AppRequestError: ``bad-json`` or ``bad-request``, with the
        request's id if one could be read.
    """
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AppRequestError("bad-json", "the line is not a JSON document") from None
    if not isinstance(value, dict):
        raise AppRequestError("bad-request", "a request must be a JSON object")
    request_id = value.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise AppRequestError("bad-request", "'id' must be a string or an integer")
    op = value.get("op")
    if not isinstance(op, str):
        raise AppRequestError("bad-request", "'op' must be a string", request_id)
    params = {k: v for k, v in value.items() if k not in ("id", "op")}
    return AppRequest(
        id=request_id,
        op=op,
        params=MappingProxyType(params),
        principal=principal,
        connection=connection,
    )


@implementer(IPushProducer)
class _OutputProducer:
    """
    Registered with a connection's transport: the transport pauses it when
    its send buffer is full and resumes it when the buffer drained.
    """

    def __init__(self, protocol: AppProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        """The send buffer is full."""
        self._protocol.output_paused(True)

    def resumeProducing(self) -> None:
        """The send buffer drained."""
        self._protocol.output_paused(False)

    def stopProducing(self) -> None:
        """The connection is going away (:meth:`AppProtocol.connectionLost` cleans up)."""


@implementer(IHandshakeListener)
class AppProtocol(LineReceiver, TimeoutMixin):
    """
    One application server's connection: requests in, answers and events out.

    A request whose operation has not finished pauses reading, so a client
    that pipelines requests is answered in order and cannot make the gateway
    buffer without bound; so does a full send buffer.
    """

    log = Logger()
    delimiter = b"\n"

    factory: AppFactory

    def __init__(self) -> None:
        self.principal: str | None = None
        self.peer: IAddress | None = None
        self.delivery: EventDelivery | None = None
        self._discarding = False
        self._carry: bytes | None = None
        self._lost = False
        self._busy = False
        self._output_full = False
        self._handshake_done = False
        self._sent_since_tick = False
        self._ping_call: IDelayedCall | None = None
        self._output = _OutputProducer(self)
        self._closed_waiters: list[Deferred[None]] = []

    # -- connection life ------------------------------------------------------------

    def connectionMade(self) -> None:
        """Register with the factory, start the timers, take part in flow control."""
        self.peer = self.transport.getPeer() if self.transport is not None else None
        self.factory.connections.add(self)
        self.setTimeout(self.factory.idle_timeout or None)
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self._output, True)
        if self.factory.ping_interval > 0:
            self._ping_call = self.factory.clock.callLater(
                self.factory.ping_interval, self._ping_tick
            )

    def handshakeCompleted(self) -> None:
        """TLS is up: learn who the peer is, and check where it connects from."""
        self._handshake_done = True
        principal = self._authenticate()
        if principal is None:
            return
        self.log.info(
            "application {principal} connected from {peer}",
            principal=principal,
            peer=self.peer,
        )

    def _authenticate(self) -> str | None:
        """
        Learn the principal from the transport and check it may connect from
        here; close the connection if not.

        :return: the principal, or ``None`` (the connection is being closed).
        """
        principal = self.factory.principal_of(self.transport)
        if principal is not None and principal in RESERVED_PRINCIPALS:
            self.log.warn(
                "closing connection from {peer}: {principal} is a reserved name",
                peer=self.peer,
                principal=principal,
            )
            principal = None
        if principal is None:
            self.log.warn(
                "closing connection from {peer}: no usable client certificate name",
                peer=self.peer,
            )
            self._answer(_error(None, "unauthenticated", "no usable client certificate"))
            self._close()
            return None
        host = getattr(self.peer, "host", None)
        if not self.factory.policies.for_app(principal).admits(host):
            self.log.warn(
                "refused application {principal} connecting from {peer}: not in its networks",
                principal=principal,
                peer=self.peer,
            )
            self.factory.security_event("app-network", principal, f"from {host}")
            self._answer(
                _error(None, "network-refused", "this application may not connect from here")
            )
            self._close()
            return None
        self.principal = principal
        return principal

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Unregister, stop the timers and the events, and tell whoever waits for the close."""
        self._lost = True
        self.setTimeout(None)
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        self.unsubscribe()
        self.factory.connections.discard(self)
        if self.principal is not None:
            self.log.info(
                "application {principal} disconnected from {peer}",
                principal=self.principal,
                peer=self.peer,
            )
        elif not self._handshake_done and reason is not None and reason.check(SSL.Error):
            self.log.warn(
                "refused a TLS connection from {peer}: {reason}",
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self) -> Deferred[None]:
        """:return: a Deferred firing once the connection is lost."""
        if self._lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def timeoutConnection(self) -> None:
        """Close a connection that stayed silent for the idle timeout."""
        self.log.info(
            "closing idle connection of {principal} from {peer}",
            principal=self.principal,
            peer=self.peer,
        )
        self._close()

    def _close(self) -> None:
        """Close the connection (TLS close_notify first, once the buffer is written)."""
        if self.transport is not None and not self._lost:
            # A TLS transport shuts down only once no producer is registered.
            unregister = getattr(self.transport, "unregisterProducer", None)
            if unregister is not None:
                unregister()
            self.transport.loseConnection()

    # -- flow control and keep-alive -----------------------------------------------

    def output_paused(self, paused: bool) -> None:
        """The transport's send buffer filled up (``True``) or drained (``False``)."""
        self._output_full = paused
        if self.delivery is not None:
            if paused:
                self.delivery.pause()
            else:
                self.delivery.resume()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read requests unless one is in progress or the send buffer is full."""
        if self._lost:
            return
        hold = self._busy or self._output_full
        if hold and not self.paused:
            self.pauseProducing()
        elif not hold and self.paused:
            self.resumeProducing()

    def _ping_tick(self) -> None:
        """Send a ``ping`` event if nothing else went out since the last tick."""
        self._ping_call = None
        if self._lost:
            return
        if not self._sent_since_tick and not self._output_full:
            self.send_message({"event": "ping", "at": int(self.factory.clock.seconds())})
        self._sent_since_tick = False
        self._ping_call = self.factory.clock.callLater(self.factory.ping_interval, self._ping_tick)

    # -- events ---------------------------------------------------------------------

    def subscribe(self, event_filter: EventFilter, acked: int) -> None:
        """Deliver this application's events after ``acked`` through ``event_filter``."""
        if self.principal is None or self.factory.store is None:
            raise AppRequestError("unavailable", "events are not available on this listener")
        self.unsubscribe()
        delivery = EventDelivery(
            self.factory.store,
            self.principal,
            self.send_message,
            self.factory.clock,
            event_filter,
            max_unacked=self.factory.settings.max_unacked,
        )
        self.delivery = delivery
        self.factory.hub.add(delivery)
        delivery.start(acked)
        if self._output_full:
            delivery.pause()

    def unsubscribe(self) -> None:
        """Stop delivering events."""
        delivery, self.delivery = self.delivery, None
        if delivery is not None:
            delivery.stop()
            self.factory.hub.remove(delivery)

    def acknowledge(self, seq: int) -> Deferred[None] | None:
        """Acknowledge through the delivery (``None`` when not subscribed)."""
        if self.delivery is None:
            return None
        return Deferred.fromCoroutine(self.delivery.acknowledge(seq))

    # -- framing --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Split ``data`` into lines; skip the rest of a line that was too long
        and carry on with the next one.
        """
        while True:
            if self._discarding:
                _skipped, newline, data = data.partition(self.delimiter)
                if not newline:
                    return
                self._discarding = False
            self._carry = None
            super().dataReceived(data)
            if self._carry is None:
                return
            data, self._carry = self._carry, None

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        Answer ``line-too-long`` and skip to the end of the offending line.

        :param line: the buffer from the start of the long line on, possibly
            holding the line's end and further lines.
        """
        self.resetTimeout()
        self._answer(
            _error(None, "line-too-long", f"request lines are limited to {self.MAX_LENGTH} bytes")
        )
        _long, newline, rest = line.partition(self.delimiter)
        if newline:
            self._carry = rest
        else:
            self._discarding = True

    def lineReceived(self, line: bytes) -> None:
        """Parse, dispatch and answer one request."""
        self.resetTimeout()
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        principal = self.principal
        if principal is None:
            principal = self._authenticate()
        if principal is None:
            return
        try:
            request = parse_request(line, principal, self)
        except AppRequestError as e:
            self.log.debug("bad request from {principal}: {code}", principal=principal, code=e.code)
            self._answer(_error(e.request_id, e.code, e.message))
            return
        answered = self.factory.dispatcher.dispatch(request).addCallbacks(
            self._result, self._failure, callbackArgs=(request,), errbackArgs=(request,)
        )
        answered.addCallback(self._answer)
        if not answered.called:
            # Read no further request until this one is answered.
            self._busy = True
            self._update_reading()
            answered.addCallback(lambda _: self._finished())

    def _finished(self) -> None:
        """Continue reading after an answer went out."""
        self._busy = False
        self._update_reading()

    def _result(self, result: Any, request: AppRequest) -> dict[str, Any]:
        """The success answer to ``request``."""
        return {"id": request.id, "ok": True, "result": result}

    def _failure(self, failure: Failure, request: AppRequest) -> dict[str, Any]:
        """The error answer to ``request``; unexpected exceptions are logged."""
        if failure.check(AppRequestError):
            error = failure.value
            assert isinstance(error, AppRequestError)
            return _error(request.id, error.code, error.message)
        self.log.failure(
            "operation {op} of {principal} failed",
            failure,
            op=request.op,
            principal=request.principal,
        )
        return _error(request.id, "internal-error", "the gateway could not complete the request")

    def _answer(self, answer: Mapping[str, Any]) -> None:
        """Send one answer line, unless the connection is gone."""
        if self._lost or self.transport is None:
            return
        try:
            encoded = _encode(answer)
        except (TypeError, ValueError):
            self.log.failure("an answer to {principal} is not JSON", principal=self.principal)
            encoded = _encode(
                _error(
                    answer.get("id"),
                    "internal-error",
                    "the gateway could not complete the request",
                )
            )
        self._sent_since_tick = True
        self.sendLine(encoded)

    def send_message(self, message: Mapping[str, Any]) -> None:
        """Send an event line (or any message), unless the connection is gone."""
        self._answer(message)


class AppFactory(Factory[AppProtocol]):
    """
    Builds an :class:`AppProtocol` per application connection and keeps track
    of them, so that stopping the gateway closes them.

    :ivar connections: the live connections.
    """

    protocol = AppProtocol
    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher | None = None,
        max_line: int = 65536,
        idle_timeout: float = 300,
        clock: IReactorTime | None = None,
        principal_of: Callable[[Any], str | None] = peer_principal,
        *,
        store: IModuleStore | None = None,
        hub: EventHub | None = None,
        policies: AppPolicies | None = None,
        ping_interval: float = 0,
        max_unacked: int = 1000,
    ) -> None:
        """
        :param dispatcher: the operations (default: :data:`DEFAULT_OPERATIONS`).
        :param max_line: the longest request line, in bytes.
        :param idle_timeout: seconds of silence before a connection is closed (0: never).
        :param clock: drives idle timeouts (default: the global reactor).
        :param principal_of: finds the application's name from its transport.
        :param store: the outbox events are delivered from, and where
            refused connections are recorded (``None``: no events).
        :param hub: where event deliveries register to be woken.
        :param policies: the applications' allowed networks.
        :param ping_interval: seconds without sending before a ``ping`` event (0: never).
        :param max_unacked: the most events sent beyond the acknowledged position.
        """
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher()
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.ping_interval = ping_interval
        self.clock: IReactorTime = clock
        self.principal_of = principal_of
        self.store = store
        self.hub = hub if hub is not None else EventHub()
        self.policies = policies if policies is not None else AppPolicies()
        self.settings = ListenerSettings(
            idle_timeout=int(idle_timeout),
            ping_interval=int(ping_interval),
            max_line=max_line,
            max_unacked=max_unacked,
        )
        self.connections: set[AppProtocol] = set()

    def security_event(self, reason: str, principal: str, detail: str) -> None:
        """Record an ``auth`` security event about a connection (if there is a store)."""
        if self.store is None:
            return
        event = SecurityEvent(
            at=int(self.clock.seconds()),
            category="auth",
            reason=reason,
            source=f"app:{principal}",
            detail=detail,
        )
        recorded: Deferred[None] = self.store.record_security_events([event])
        recorded.addErrback(self._record_failed, reason)

    def _record_failed(self, failure: Failure, reason: str) -> None:
        """Log a security event that could not be recorded."""
        _log.failure("recording {reason} failed", failure, reason=reason)

    def buildProtocol(self, addr: IAddress | None) -> AppProtocol:
        """A protocol with this factory's limits and clock."""
        protocol = AppProtocol()
        protocol.factory = self
        protocol.MAX_LENGTH = self.max_line
        protocol.callLater = self.clock.callLater  # type: ignore[method-assign,assignment]
        return protocol

    def disconnect_all(self, grace: float = DISCONNECT_GRACE) -> Deferred[None]:
        """
        Close every connection, aborting those still open after ``grace`` seconds.

        :return: a Deferred firing when all are closed.
        """
        connections = list(self.connections)
        if not connections:
            return succeed(None)
        closed = DeferredList([c.when_closed() for c in connections])
        for connection in connections:
            connection._close()
        abort: IDelayedCall = self.clock.callLater(grace, self._abort, connections)

        def finished(_: object) -> None:
            if abort.active():
                abort.cancel()

        return closed.addCallback(finished)

    def _abort(self, connections: list[AppProtocol]) -> None:
        """Abort the connections that did not close in time."""
        for connection in connections:
            if connection in self.connections and connection.transport is not None:
                abort_connection = getattr(connection.transport, "abortConnection", None)
                if abort_connection is not None:
                    abort_connection()
