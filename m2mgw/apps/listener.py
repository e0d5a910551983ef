"""
The application servers' listener: JSON lines over mutual TLS.

Each line an application server sends is one JSON object, a request::

    {"id": 1, "op": "hello"}

and each request gets exactly one line back, in order::

    {"id": 1, "ok": true, "result": {"version": 1, "principal": "billing"}}
    {"id": 2, "ok": false, "error": {"code": "unknown-op", "message": "..."}}

Error codes: ``bad-json`` (the line is not JSON), ``bad-request`` (not an
object with a string or integer ``id`` and a string ``op``), ``unknown-op``,
``line-too-long`` (the line exceeded the configured maximum; it is skipped up
to its end), ``internal-error``, and whatever an operation raises as an
:class:`AppRequestError`.  A connection stays usable after any of them.

The application's identity (its *principal*) is the common name of the client
certificate it authenticated with; the TLS options require one signed by the
gateway's application CA (:mod:`m2mgw.tls`).  Operations live in a
:class:`Dispatcher`, a table from ``op`` to a function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.tls import peer_principal

#: The version of the application protocol ``hello`` announces.
APP_PROTOCOL_VERSION = 1

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
class AppRequest:
    """
    One request, as an operation sees it.

    :ivar id: the application's request id (echoed in the answer).
    :ivar op: the operation's name.
    :ivar params: every other member of the request object.
    :ivar principal: the authenticated application (client certificate CN).
    """

    id: str | int
    op: str
    params: Mapping[str, Any]
    principal: str


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


def parse_request(line: bytes, principal: str) -> AppRequest:
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
    return AppRequest(id=request_id, op=op, params=MappingProxyType(params), principal=principal)


@implementer(IHandshakeListener)
class AppProtocol(LineReceiver, TimeoutMixin):
    """
    One application server's connection: requests in, answers out, in order.

    A request whose operation has not finished pauses reading, so a client
    that pipelines requests is answered in order and cannot make the gateway
    buffer without bound.
    """

    log = Logger()
    delimiter = b"\n"

    factory: AppFactory

    def __init__(self) -> None:
        self.principal: str | None = None
        self.peer: IAddress | None = None
        self._discarding = False
        self._carry: bytes | None = None
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []

    # -- connection life ------------------------------------------------------------

    def connectionMade(self) -> None:
        """Register with the factory and start the idle timer."""
        self.peer = self.transport.getPeer() if self.transport is not None else None
        self.factory.connections.add(self)
        self.setTimeout(self.factory.idle_timeout or None)

    def handshakeCompleted(self) -> None:
        """TLS is up: learn who the peer is."""
        self.principal = self.factory.principal_of(self.transport)
        if self.principal is None:
            self.log.warn(
                "closing connection from {peer}: no usable client certificate name",
                peer=self.peer,
            )
            self._close()
            return
        self.log.info(
            "application {principal} connected from {peer}",
            principal=self.principal,
            peer=self.peer,
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Unregister, stop the timer, and tell whoever waits for the close."""
        self._lost = True
        self.setTimeout(None)
        self.factory.connections.discard(self)
        if self.principal is not None:
            self.log.info(
                "application {principal} disconnected from {peer}",
                principal=self.principal,
                peer=self.peer,
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
        """Close the connection (TLS close_notify first)."""
        if self.transport is not None:
            self.transport.loseConnection()

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
            principal = self.principal = self.factory.principal_of(self.transport)
        if principal is None:
            self._answer(_error(None, "unauthenticated", "no usable client certificate"))
            self._close()
            return
        try:
            request = parse_request(line, principal)
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
            self.pauseProducing()
            answered.addCallback(lambda _: self._resume())

    def _resume(self) -> None:
        """Continue reading after an answer went out."""
        if not self._lost:
            self.resumeProducing()

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
        self.sendLine(encoded)


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
    ) -> None:
        """
        :param dispatcher: the operations (default: :data:`DEFAULT_OPERATIONS`).
        :param max_line: the longest request line, in bytes.
        :param idle_timeout: seconds of silence before a connection is closed (0: never).
        :param clock: drives idle timeouts (default: the global reactor).
        :param principal_of: finds the application's name from its transport.
        """
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher()
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.clock: IReactorTime = clock
        self.principal_of = principal_of
        self.connections: set[AppProtocol] = set()

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
