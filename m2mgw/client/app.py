"""
The application side of the gateway, as a library: a Twisted client for
application servers and a blocking one for scripts.

Both speak the JSON-lines protocol of ``docs/app-protocol.md`` over mutual TLS
with the client certificate ``m2mgw-admin app-cert issue NAME --out DIR``
writes (:meth:`AppCredentials.from_directory`).

:class:`AppClient` is a Twisted service that stays connected (reconnecting
with backoff), correlates responses with requests by ``id``, hands events to
a callback one at a time and in order, acknowledges them once the callback
has finished (cumulatively, in batches), resumes after the last acknowledged
event on every new connection, and keeps the connection alive::

    def on_event(event: AppEvent) -> Deferred[None] | None:
        ...  # store it; a Deferred makes the client wait before the next event

    credentials = AppCredentials.from_directory("billing-cert")
    client = AppClient.for_gateway(reactor, "gw.example", 5741, credentials, on_event)
    client.subscribe(events=["report", "instruction"])
    client.setServiceParent(application)            # or client.startService()
    result = await client.submit("meter-17", "set", {"interval": 60})

:class:`BlockingAppClient` does the same on a plain socket in the calling
thread, for scripts and the ``m2mgw-app`` command::

    with BlockingAppClient("gw.example", 5741, credentials) as client:
        iid = client.request("submit", module="meter-17", kind="set", body=1)["iid"]
        outcome = client.wait_for_outcome("meter-17", iid, timeout=600)
        client.subscribe(events=["report"])
        for event in client.events():
            print(event.payload)   # acknowledged once the loop asks for the next one

The pure pieces both use — :func:`encode_request`, :func:`parse_message`,
:class:`EventCursor`, :func:`keepalive_timing`, :func:`describe_failure` —
need no socket and no reactor.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import error as twisted_error
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from m2mgw import tls
from m2mgw.errors import ConfigError, M2MGWError

__all__ = [
    "DEFAULT_PORT",
    "FINAL_STATES",
    "PROTOCOL_VERSIONS",
    "AppClient",
    "AppClientError",
    "AppClientProtocol",
    "AppConnectionError",
    "AppCredentials",
    "AppError",
    "AppEvent",
    "AppProtocolError",
    "AppResponse",
    "BlockingAppClient",
    "EventCursor",
    "Subscription",
    "describe_failure",
    "encode_request",
    "keepalive_timing",
    "parse_message",
]

#: The gateway's application port (``[apps] port``).
DEFAULT_PORT = 5741

#: The protocol versions these clients speak, offered in ``hello``.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)

#: The longest line accepted from the gateway (a ``get`` of a large body, a big report).
MAX_RECEIVED_LINE = 16 * 1024 * 1024

#: The instruction states after which nothing changes any more.
FINAL_STATES = frozenset({"confirmed", "failed", "expired", "cancelled"})

#: Assumed until ``hello`` says otherwise (``[apps] ping_interval``'s default).
DEFAULT_PING_INTERVAL = 60.0

#: The file ``m2mgw-admin app-cert issue`` copies the application CA to.
CA_FILE_NAME = "m2mgw-ca.pem"

#: Error codes after which the gateway closes the connection.
_CLOSING_CODES = frozenset({"unauthenticated", "network-refused"})


# -- errors ----------------------------------------------------------------------------------------


class AppClientError(M2MGWError):
    """Base class of the application clients' errors."""


class AppError(AppClientError):
    """
    The gateway refused a request (``"ok": false``), or the client refused to
    send one the gateway would refuse (``bad-request``: the parameters are not
    JSON; ``line-too-long``: longer than the gateway's ``max_line``).

    :ivar code: the stable error code (``forbidden``, ``not-found``, ...).
    :ivar message: the gateway's one line for a person.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AppConnectionError(AppClientError):
    """
    No connection could be made, or it ended; the message says why in one line
    (connection refused, the TLS failure and its likely cause, a dead peer).
    """


class AppProtocolError(AppClientError):
    """The gateway sent something that is not the application protocol."""


# -- credentials and filters -----------------------------------------------------------------------


@dataclass(frozen=True)
class AppCredentials:
    """
    The files an application server authenticates with.

    :ivar cert_path: its client certificate (PEM; a chain leaf first).
    :ivar key_path: the certificate's private key (PEM).
    :ivar ca_path: the gateway's application CA, the only trust anchor.
    """

    cert_path: str
    key_path: str
    ca_path: str

    @classmethod
    def from_directory(cls, directory: str, name: str | None = None) -> AppCredentials:
        """
        The files ``m2mgw-admin app-cert issue NAME --out DIRECTORY`` wrote:
        ``NAME.pem``, ``NAME-key.pem`` and ``m2mgw-ca.pem``.

        :param name: which application, when the directory holds several.
        :raise m2mgw.errors.ConfigError: the directory is missing or holds no
            certificate, or several and no ``name`` was given.
        """
        if name is None:
            try:
                entries = os.listdir(directory)
            except FileNotFoundError:
                raise ConfigError(f"{directory} does not exist") from None
            except OSError as e:
                raise ConfigError(f"cannot read {directory}: {e.strerror or e}") from None
            names = sorted(
                entry[: -len("-key.pem")]
                for entry in entries
                if entry.endswith("-key.pem")
                and len(entry) > len("-key.pem")
                and f"{entry[: -len('-key.pem')]}.pem" in entries
            )
            if not names:
                raise ConfigError(
                    f"{directory} holds no client certificate (NAME.pem and NAME-key.pem, "
                    "as m2mgw-admin app-cert issue writes them)"
                )
            if len(names) > 1:
                raise ConfigError(
                    f"{directory} holds certificates for {', '.join(names)}; choose one"
                )
            name = names[0]
        return cls(
            os.path.join(directory, f"{name}.pem"),
            os.path.join(directory, f"{name}-key.pem"),
            os.path.join(directory, CA_FILE_NAME),
        )

    def tls_options(self, server_name: str) -> IOpenSSLClientConnectionCreator:
        """
        Twisted TLS client options: present the certificate, trust only the
        CA, check that the gateway's certificate names ``server_name``.

        :raise m2mgw.errors.ConfigError: a file is missing, unreadable or
            corrupt, or the key does not belong to the certificate.
        """
        for path, what in (
            (self.cert_path, "client certificate"),
            (self.key_path, "client key"),
            (self.ca_path, "CA certificate"),
        ):
            if not os.path.exists(path):
                raise ConfigError(
                    f"the {what} {path} does not exist "
                    "(m2mgw-admin app-cert issue NAME --out DIR writes all three files)"
                )
        return tls.app_client_tls_options(self.cert_path, self.key_path, self.ca_path, server_name)

    def ssl_context(self) -> ssl.SSLContext:
        """
        The same as an :mod:`ssl` context (TLS 1.2 or newer, host name check on).

        :raise m2mgw.errors.ConfigError: as :meth:`tls_options`.
        """
        self.tls_options("localhost")  # the same checks and messages as the Twisted client
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=self.ca_path)
            context.load_cert_chain(self.cert_path, self.key_path)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"unusable TLS client files: {_one_line(e)}") from None
        return context


@dataclass(frozen=True)
class Subscription:
    """
    The filters of a ``subscribe`` request; ``None`` lets everything through.

    :ivar modules: only events of these modules.
    :ivar groups: only events of modules in these groups.
    :ivar events: only these event kinds (``report``, ``instruction``, ...).
    """

    modules: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    events: tuple[str, ...] | None = None

    def params(self) -> dict[str, list[str]]:
        """The request's parameters."""
        params = {}
        for name in ("modules", "groups", "events"):
            value = getattr(self, name)
            if value is not None:
                params[name] = list(value)
        return params


def _subscription(
    modules: Sequence[str] | None, groups: Sequence[str] | None, events: Sequence[str] | None
) -> Subscription:
    def optional(value: Sequence[str] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            raise TypeError("a filter is a sequence of names, not one string")
        return tuple(value)

    return Subscription(optional(modules), optional(groups), optional(events))


# -- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppEvent:
    """
    An event line from the gateway.

    :ivar kind: ``report``, ``instruction``, ``key``, ``module``, ``alert``,
        the unsequenced ``ping`` and ``instruction-wanted``, or a kind this
        client does not know yet.
    :ivar seq: the application's sequence number; ``None`` for unsequenced events.
    :ivar module: the module it is about, or ``None``.
    :ivar at: when the gateway created it (seconds since the epoch), if given.
    :ivar payload: the kind's payload (empty if the event has none).
    :ivar message: the whole line as received.
    """

    kind: str
    seq: int | None
    module: str | None
    at: int | None
    payload: Mapping[str, Any]
    message: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class AppResponse:
    """
    A response line.

    :ivar id: the request's id (``None`` when the gateway could not read it).
    :ivar ok: whether the request succeeded.
    :ivar result: the result (when ``ok``).
    :ivar error: the refusal (when not ``ok``).
    """

    id: str | int | None
    ok: bool
    result: Any = None
    error: AppError | None = None


def encode_request(request_id: str | int, op: str, params: Mapping[str, Any]) -> bytes:
    """
    One request line, without its newline.

    :raise AppError: ``bad-request``: a parameter is not JSON (or is named ``id``/``op``).
    """
    if "id" in params or "op" in params:
        raise AppError("bad-request", "'id' and 'op' are not parameters")
    try:
        text = json.dumps(
            {"id": request_id, "op": op, **params},
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as e:
        raise AppError("bad-request", f"the parameters are not JSON: {e}") from None
    return text.encode("utf-8")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_message(line: bytes) -> AppResponse | AppEvent:
    """
    Read one line from the gateway (without its newline).

    :raise AppProtocolError: not a JSON object, or neither a response nor an event.
    """
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AppProtocolError("the gateway sent a line that is not JSON") from None
    if not isinstance(value, dict):
        raise AppProtocolError("the gateway sent a line that is not a JSON object")
    if "id" not in value and isinstance(value.get("event"), str):
        seq = _optional_int(value.get("seq"))
        if seq is not None and seq < 1:
            raise AppProtocolError(f"the gateway sent an event with seq {seq}")
        module = value.get("module")
        payload = value.get("payload")
        return AppEvent(
            kind=value["event"],
            seq=seq,
            module=module if isinstance(module, str) else None,
            at=_optional_int(value.get("at")),
            payload=MappingProxyType(payload if isinstance(payload, dict) else {}),
            message=MappingProxyType(value),
        )
    request_id = value.get("id")
    ok = value.get("ok")
    if "id" in value and isinstance(ok, bool):
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int, type(None))):
            raise AppProtocolError("the gateway sent a response with a strange id")
        if ok:
            return AppResponse(request_id, True, result=value.get("result"))
        error = value.get("error")
        error = error if isinstance(error, dict) else {}
        code = error.get("code")
        message = error.get("message")
        return AppResponse(
            request_id,
            False,
            error=AppError(
                code if isinstance(code, str) and code else "unknown-error",
                " ".join(message.split()) if isinstance(message, str) else "(no message)",
            ),
        )
    raise AppProtocolError("the gateway sent a line that is neither a response nor an event")


def keepalive_timing(hello: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """
    How often to send a ``ping`` request when nothing else was sent, and
    after how long without a line from the gateway it counts as dead, from a
    ``hello`` result (``ping_interval``, ``idle_timeout``).

    :return: ``(send_after, dead_after)`` in seconds, ``None`` for never.
    """

    def seconds(name: str) -> float | None:
        value = hello.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return None
        return float(value)

    ping, idle = seconds("ping_interval"), seconds("idle_timeout")
    candidates = [x for x in (ping, idle / 2 if idle else None) if x]
    send_after = min(candidates) if candidates else None
    dead_after = 2 * ping + 10 if ping else None
    return send_after, dead_after


@dataclass
class EventCursor:
    """
    Where a client stands in its application's event stream.

    :ivar received: the highest ``seq`` taken in (queued or processed); lower
        or equal ones arriving again are duplicates.
    :ivar processed: the highest ``seq`` the application finished with.
    :ivar acked: the highest ``seq`` the gateway confirmed as acknowledged.
    """

    received: int = 0
    processed: int = 0
    acked: int = 0

    def accept(self, seq: int) -> bool:
        """Take in an event: ``False`` if it is a duplicate of one already taken in."""
        if seq <= self.received:
            return False
        self.received = seq
        return True

    def mark_processed(self, seq: int) -> None:
        """The application finished with every event up to ``seq``."""
        self.processed = max(self.processed, seq)
        self.received = max(self.received, seq)

    def mark_acked(self, seq: int) -> None:
        """The gateway confirmed the acknowledgement up to ``seq``."""
        self.acked = max(self.acked, seq)

    @property
    def unacked(self) -> int:
        """How many processed events wait for an acknowledgement (at most)."""
        return max(0, self.processed - self.acked)

    def rewind(self) -> None:
        """Forget the events taken in but not processed: they will come again."""
        self.received = self.processed

    def resume(self, acked_seq: int, last_seq: int) -> bool:
        """
        A new connection: the gateway's positions from ``hello``.

        :return: ``False`` if the gateway knows fewer events than were seen
            (its outbox was reset): then every position restarts at ``acked_seq``.
        """
        if last_seq < max(self.received, self.processed):
            self.received = self.processed = self.acked = acked_seq
            return False
        self.acked = max(self.acked, acked_seq)
        return True


def _hello_positions(hello: Mapping[str, Any]) -> tuple[int, int] | None:
    acked = _optional_int(hello.get("acked_seq"))
    last = _optional_int(hello.get("last_seq"))
    if acked is None:
        return None
    return acked, last if last is not None else acked


# -- describing failures ---------------------------------------------------------------------------


def _one_line(error: BaseException | str) -> str:
    if isinstance(error, OSError) and not isinstance(error, ssl.SSLError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


#: TLS failure reasons (OpenSSL's words, lower case) and what they most likely mean.
_TLS_REASONS: tuple[tuple[str, str], ...] = (
    ("alert certificate required", "the gateway requires a client certificate"),
    (
        "alert unknown ca",
        "the gateway refused the client certificate: not issued by its application CA",
    ),
    ("alert certificate expired", "the gateway refused the client certificate: it has expired"),
    ("alert certificate revoked", "the gateway refused the client certificate: it is revoked"),
    ("alert bad certificate", "the gateway refused the client certificate"),
    ("alert certificate unknown", "the gateway refused the client certificate"),
    ("alert unsupported certificate", "the gateway refused the client certificate"),
    ("alert access denied", "the gateway refused the client certificate"),
    ("alert handshake failure", "the gateway refused the handshake (no common TLS settings)"),
    ("alert protocol version", "no TLS version in common (TLS 1.2 or newer is required)"),
    ("unsupported protocol", "no TLS version in common (TLS 1.2 or newer is required)"),
    (
        "certificate verify failed",
        "the gateway's certificate is not signed by the trusted CA (--ca), "
        "or it has expired or is not yet valid",
    ),
    ("wrong version number", "the peer does not speak TLS (is this the application port?)"),
    ("packet length too long", "the peer does not speak TLS (is this the application port?)"),
    ("record layer failure", "the peer does not speak TLS (is this the application port?)"),
    ("http request", "the peer does not speak TLS (is this the application port?)"),
    (
        "eof occurred in violation of protocol",
        "the gateway closed the connection during the handshake "
        "(did it refuse the client certificate?)",
    ),
    (
        "unexpected eof",
        "the gateway closed the connection during the handshake "
        "(did it refuse the client certificate?)",
    ),
)


def _tls_reasons(error: BaseException) -> str | None:
    """The OpenSSL reasons of a TLS exception (pyOpenSSL or :mod:`ssl`), lower case."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}".lower()
    if isinstance(error, ssl.SSLError):
        reason = error.reason or _one_line(error)
        return str(reason).replace("_", " ").lower()
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - pyOpenSSL is a dependency
        return None
    if isinstance(error, SSL.Error):
        parts = []
        for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
            parts.append(str(item[-1]) if isinstance(item, tuple) and item else str(item))
        return (" ".join(parts) or str(error)).replace("_", " ").lower()
    return None


def _is_name_mismatch(error: BaseException) -> bool:
    if isinstance(error, ssl.SSLCertVerificationError):
        return "hostname mismatch" in str(
            error.verify_message
        ).lower() or "ip address mismatch" in (str(error.verify_message).lower())
    return type(error).__name__ == "VerificationError" and "service_identity" in (
        type(error).__module__
    )


def describe_failure(error: BaseException, gateway: str, server_name: str | None = None) -> str:
    """
    One line saying why a connection to ``gateway`` could not be made or ended.

    :param gateway: ``host:port``, as the user gave it.
    :param server_name: the name the gateway's certificate was checked against.
    """
    if isinstance(error, AppClientError):
        return str(error)
    if _is_name_mismatch(error):
        name = server_name or gateway.rsplit(":", 1)[0]
        return (
            f"TLS with {gateway} failed: the gateway's certificate is not valid for "
            f"{name!r} (connect by a name it holds, or give the server name)"
        )
    reasons = _tls_reasons(error)
    if reasons is not None:
        for needle, meaning in _TLS_REASONS:
            if needle in reasons:
                return f"TLS with {gateway} failed: {meaning} ({reasons})"
        return f"TLS with {gateway} failed: {reasons or 'handshake failed'}"
    if isinstance(error, (ConnectionRefusedError, twisted_error.ConnectionRefusedError)):
        return f"connection refused by {gateway} (is the gateway running and listening there?)"
    if isinstance(error, (socket.gaierror, twisted_error.DNSLookupError)):
        return f"cannot resolve the host of {gateway}: {_one_line(error)}"
    if isinstance(error, (TimeoutError, twisted_error.TimeoutError)):
        return f"no answer from {gateway} in time"
    if isinstance(
        error,
        (
            ConnectionResetError,
            BrokenPipeError,
            twisted_error.ConnectionLost,
            twisted_error.ConnectionDone,
            EOFError,
        ),
    ):
        return f"the gateway {gateway} closed the connection"
    if isinstance(error, twisted_error.ConnectError) and error.osError is not None:
        return f"cannot connect to {gateway}: {_one_line(error.osError)}"
    if isinstance(error, OSError):
        return f"cannot connect to {gateway}: {_one_line(error)}"
    return f"connection to {gateway} failed: {_one_line(error)}"


# -- Twisted ---------------------------------------------------------------------------------------


#: An event callback: its result (or the Deferred's) is ignored; an exception
#: or a failed Deferred means "not processed" (see :class:`AppClient`).
EventHandler: TypeAlias = Callable[["AppEvent"], Any]


class AppClientProtocol(LineReceiver):
    """
    One connection to the gateway: requests out, responses matched to them by
    ``id``, events handed to ``on_event``, keep-alive both ways.

    Until :meth:`configure` learns the gateway's timing from ``hello``, the
    connection counts as dead after ``connect_timeout`` seconds without a line
    (that covers the TLS handshake and the ``hello`` itself).
    """

    log = Logger()
    delimiter = b"\n"
    MAX_LENGTH = MAX_RECEIVED_LINE

    def __init__(
        self,
        clock: IReactorTime,
        on_event: Callable[[AppClientProtocol, AppEvent], None],
        describe: Callable[[BaseException], str],
        connect_timeout: float = 30.0,
    ) -> None:
        """
        :param clock: drives the keep-alive timers.
        :param on_event: called with ``(self, event)`` for every event except ``ping``.
        :param describe: turns the reason a connection ended into one line.
        :param connect_timeout: seconds to wait for the first line.
        """
        self.clock = clock
        self.on_event = on_event
        self.describe = describe
        self.connect_timeout = connect_timeout
        self.hello: Mapping[str, Any] | None = None
        self.max_line: int | None = None
        self.send_after: float | None = None
        self.dead_after: float | None = connect_timeout
        self.lost = False
        self.lost_reason: AppConnectionError | None = None
        self.abandoned = False
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[Any]] = {}
        self._close_reason: str | None = None
        self._last_sent = 0.0
        self._send_timer: IDelayedCall | None = None
        self._dead_timer: IDelayedCall | None = None
        self._closed_waiters: list[Deferred[None]] = []

    # -- life ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Start the dead-peer timer (the handshake and ``hello`` must finish in time)."""
        self._last_sent = self.clock.seconds()
        self._arm_dead_timer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail every request still waiting, with one line saying why."""
        self.lost = True
        for timer in (self._send_timer, self._dead_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._send_timer = self._dead_timer = None
        cause = reason.value if reason.value is not None else twisted_error.ConnectionDone()
        text = self._close_reason or self.describe(cause)
        self.lost_reason = AppConnectionError(text)
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(AppConnectionError(text))
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self) -> Deferred[None]:
        """:return: a Deferred firing once the connection is lost."""
        waiter: Deferred[None] = Deferred()
        if self.lost:
            waiter.callback(None)
        else:
            self._closed_waiters.append(waiter)
        return waiter

    def close(self, reason: str) -> None:
        """Close the connection; requests still waiting fail with ``reason``."""
        if self._close_reason is None:
            self._close_reason = reason
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()

    def configure(self, hello: Mapping[str, Any]) -> None:
        """Adopt the gateway's limits and keep-alive timing from a ``hello`` result."""
        self.hello = hello
        max_line = _optional_int(hello.get("max_line"))
        self.max_line = max_line if max_line is not None and max_line > 0 else None
        self.send_after, self.dead_after = keepalive_timing(hello)
        self._arm_send_timer()
        self._arm_dead_timer()

    # -- requests --------------------------------------------------------------------------

    def request(self, op: str, params: Mapping[str, Any] | None = None) -> Deferred[Any]:
        """
        Send one request.

        :return: a Deferred firing with the result; failing with
            :class:`AppError` (refused), :class:`AppConnectionError` (the
            connection ended first). Cancelling it forgets the request.
        """
        if self.lost:
            return fail(self.lost_reason or AppConnectionError("not connected"))
        request_id = next(self._ids)
        try:
            line = encode_request(request_id, op, params or {})
        except AppError as e:
            return fail(e)
        if self.max_line is not None and len(line) > self.max_line:
            return fail(
                AppError("line-too-long", f"the request is longer than {self.max_line} bytes")
            )

        def forget(_: Deferred[Any]) -> None:
            self._pending.pop(request_id, None)

        waiting: Deferred[Any] = Deferred(forget)
        self._pending[request_id] = waiting
        self.sendLine(line)
        return waiting

    def sendLine(self, line: bytes) -> None:
        """Send a line and restart the keep-alive timer."""
        super().sendLine(line)
        self._last_sent = self.clock.seconds()
        self._arm_send_timer()

    # -- incoming --------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """A response (to its request) or an event (to ``on_event``)."""
        self._arm_dead_timer()
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            message = parse_message(line)
        except AppProtocolError as e:
            self.log.warn("closing the connection: {reason}", reason=str(e))
            self.close(str(e))
            return
        if isinstance(message, AppResponse):
            self._response(message)
        elif message.kind == "ping":
            self._answer_ping()
        else:
            self.on_event(self, message)

    def lineLengthExceeded(self, line: bytes) -> None:
        """The gateway sent a line over :data:`MAX_RECEIVED_LINE`: give up on it."""
        self.close(f"the gateway sent a line longer than {self.MAX_LENGTH} bytes")

    def _response(self, response: AppResponse) -> None:
        waiting = None
        if response.id is not None and isinstance(response.id, int):
            waiting = self._pending.pop(response.id, None)
        elif response.id is None and not response.ok and self._pending:
            # The gateway answers in order: an error it could not attach an
            # id to (a line it could not read) is the oldest request's.
            oldest = next(iter(self._pending))
            waiting = self._pending.pop(oldest)
        if response.error is not None and response.error.code in _CLOSING_CODES:
            self._close_reason = f"the gateway closed the connection: {response.error}"
        if waiting is None:
            self.log.debug("response to no request: {id}", id=response.id)
            return
        if response.ok:
            waiting.callback(response.result)
        else:
            waiting.errback(response.error)

    # -- keep-alive ------------------------------------------------------------------------

    def _answer_ping(self) -> None:
        """A ``ping`` event: answer with a ``ping`` request unless we spoke recently."""
        interval = self.send_after or DEFAULT_PING_INTERVAL
        if self.clock.seconds() - self._last_sent >= interval / 2:
            self._keepalive()

    def _keepalive(self) -> None:
        if self.lost:
            return
        self.request("ping").addErrback(lambda _: None)

    def _arm_send_timer(self) -> None:
        if self._send_timer is not None and self._send_timer.active():
            self._send_timer.cancel()
        self._send_timer = None
        if self.send_after is not None and not self.lost:
            self._send_timer = self.clock.callLater(self.send_after, self._keepalive)

    def _arm_dead_timer(self) -> None:
        if self._dead_timer is not None and self._dead_timer.active():
            self._dead_timer.cancel()
        self._dead_timer = None
        if self.dead_after is not None and not self.lost:
            self._dead_timer = self.clock.callLater(self.dead_after, self._dead, self.dead_after)

    def _dead(self, after: float) -> None:
        self._dead_timer = None
        reason = f"no data from the gateway for {after:g} s"
        self.log.warn("closing the connection: {reason}", reason=reason)
        self._close_reason = self._close_reason or reason
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.loseConnection()


class AppClient(Service):
    """
    A connection to the gateway that stays up: a Twisted service.

    - Requests wait for a connection, then for their response
      (:meth:`request` and the helpers named after the operations).
    - Events are handed to ``on_event`` one at a time and in order; the next
      waits while a Deferred it returned has not fired. An event counts as
      processed when the call (or its Deferred) succeeded; processed events
      are acknowledged cumulatively once ``ack_batch`` of them gathered, or
      ``ack_delay`` seconds after the first, and on :meth:`stopService`.
    - If ``on_event`` fails, the failure is logged, the connection is closed
      and the event comes again after the reconnection (at least once).
    - Every new connection says ``hello``, acknowledges what was processed
      but not yet acknowledged, and subscribes again with the last filters:
      delivery resumes after the last acknowledged event. Duplicates of events
      already taken in are dropped by ``seq``.
    - Unsequenced events (``instruction-wanted``) go to ``on_event`` straight
      away and are never acknowledged; ``ping`` events are answered here.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        on_event: EventHandler | None = None,
        *,
        clock: IReactorTime | None = None,
        gateway: str = "the gateway",
        server_name: str | None = None,
        ack_batch: int = 100,
        ack_delay: float = 1.0,
        retry_policy: Callable[[int], float] | None = None,
        connect_timeout: float = 30.0,
        request_timeout: float | None = 60.0,
        versions: Sequence[int] = PROTOCOL_VERSIONS,
    ) -> None:
        """
        :param endpoint: where to connect (TLS already wrapped in; see :meth:`for_gateway`).
        :param on_event: the event callback (default: events are only acknowledged).
        :param clock: timers (default: the global reactor).
        :param gateway: ``host:port`` for messages.
        :param server_name: the name the certificate is checked against, for messages.
        :param ack_batch: acknowledge once this many events were processed.
        :param ack_delay: ... or this many seconds after the first of them.
        :param retry_policy: seconds before the n-th reconnection attempt
            (default: exponential backoff from 1 s up to 60 s, with jitter).
        :param connect_timeout: seconds for the handshake and ``hello``.
        :param request_timeout: seconds a request may wait for a connection
            and its response (``None``: no limit).
        :param versions: the protocol versions offered in ``hello``.
        """
        if ack_batch < 1 or not ack_delay > 0:
            raise ValueError("ack_batch must be at least 1 and ack_delay positive")
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.endpoint = endpoint
        self.on_event = on_event
        self.clock: IReactorTime = clock
        self.gateway = gateway
        self.server_name = server_name
        self.ack_batch = ack_batch
        self.ack_delay = ack_delay
        self.retry_policy = retry_policy or backoffPolicy(initialDelay=1.0, maxDelay=60.0)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.versions = tuple(versions)
        self.cursor = EventCursor()
        self.hello: Mapping[str, Any] | None = None
        self.subscription: Subscription | None = None
        self._protocol: AppClientProtocol | None = None
        self._preparing: AppClientProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._waiters: list[tuple[Deferred[AppClientProtocol], int | None]] = []
        self._queue: deque[AppEvent] = deque()
        self._handling: int | None = None
        self._pumping = False
        self._ack_timer: IDelayedCall | None = None
        self._ack_in_flight = False

    @classmethod
    def for_gateway(
        cls,
        reactor: Any,
        host: str,
        port: int,
        credentials: AppCredentials,
        on_event: EventHandler | None = None,
        *,
        server_name: str | None = None,
        **kwargs: Any,
    ) -> AppClient:
        """
        A client for the gateway at ``host``/``port`` over mutual TLS.

        :param server_name: the name the gateway's certificate must hold (default ``host``).
        :param kwargs: the other arguments of :class:`AppClient`.
        :raise m2mgw.errors.ConfigError: the credential files are unusable.
        """
        options = credentials.tls_options(server_name or host)
        timeout = kwargs.get("connect_timeout", 30.0)
        endpoint = wrapClientTLS(options, HostnameEndpoint(reactor, host, port, timeout=timeout))
        gateway = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        kwargs.setdefault("clock", reactor)
        return cls(
            endpoint,
            on_event,
            gateway=gateway,
            server_name=server_name or host,
            **kwargs,
        )

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        """Start connecting (and reconnecting)."""
        super().startService()
        self._failures = 0
        self._attempt()

    def stopService(self) -> Deferred[None]:
        """Acknowledge what was processed (for up to 5 s), then disconnect."""
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._cancel_ack_timer()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self._preparing is not None:
            self._preparing.close("the client stopped")
        try:
            await self.flush_acks(timeout=5.0)
        except AppClientError as e:
            self.log.info("could not acknowledge before stopping: {reason}", reason=str(e))
        self._notify_waiters(AppConnectionError("the client stopped"), final=True)
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            closed = protocol.when_closed()
            protocol.close("the client stopped")
            await closed

    def _build_protocol(self) -> AppClientProtocol:
        return AppClientProtocol(
            self.clock,
            self._event_received,
            lambda error: describe_failure(error, self.gateway, self.server_name),
            self.connect_timeout,
        )

    def _attempt(self) -> None:
        """Connect once; then prepare the connection, or count a failure and retry."""
        self._retry = None
        factory = Factory.forProtocol(self._build_protocol)
        connecting: Deferred[Any] = self.endpoint.connect(factory)
        self._connecting = connecting

        def connected(protocol: Any) -> Deferred[None]:
            self._connecting = None
            if not isinstance(protocol, AppClientProtocol):
                raise AppProtocolError(f"the endpoint made {protocol!r}")
            self._preparing = protocol
            return ensureDeferred(self._prepare(protocol))

        def failed(failure: Failure) -> None:
            self._connecting = self._preparing = None
            if not self.running:
                return
            self._failures += 1
            cause = failure.value if failure.value is not None else RuntimeError("failed")
            error = AppConnectionError(describe_failure(cause, self.gateway, self.server_name))
            self.log.info(
                "cannot use {gateway}: {reason}; attempt {attempt}",
                gateway=self.gateway,
                reason=str(error),
                attempt=self._failures,
            )
            self._notify_waiters(error)
            self._schedule_retry()

        connecting.addCallback(connected).addErrback(failed)

    def _schedule_retry(self) -> None:
        if self.running and self._retry is None:
            delay = self.retry_policy(max(1, self._failures))
            self._retry = self.clock.callLater(delay, self._attempt)

    def _notify_waiters(
        self, outcome: AppClientProtocol | AppConnectionError, final: bool = False
    ) -> None:
        """
        Fire the :meth:`when_connected` waiters: all with a ready connection
        or a ``final`` error, else those whose patience ran out.
        """
        waiting, self._waiters = self._waiters, []
        for waiter, remaining in waiting:
            if isinstance(outcome, AppClientProtocol):
                waiter.callback(outcome)
            elif final or (remaining is not None and remaining <= 1):
                waiter.errback(outcome)
            else:
                self._waiters.append((waiter, None if remaining is None else remaining - 1))

    async def _prepare(self, protocol: AppClientProtocol) -> None:
        """A new connection: ``hello``, acknowledge what is due, subscribe again."""
        try:
            hello = await protocol.request("hello", {"versions": list(self.versions)})
            if not isinstance(hello, dict):
                raise AppProtocolError("the gateway's hello result is not an object")
            protocol.configure(hello)
            self.hello = MappingProxyType(hello)
            positions = _hello_positions(hello)
            if positions is not None and not self.cursor.resume(*positions):
                self._queue.clear()
                self.log.warn(
                    "the gateway's event stream restarted (last_seq {last}); "
                    "resuming from its acknowledged position {acked}",
                    last=positions[1],
                    acked=positions[0],
                )
            if self.cursor.processed > self.cursor.acked:
                result = await protocol.request("ack", {"seq": self.cursor.processed})
                self._acked(result, self.cursor.processed)
            self._protocol = protocol
            if self.subscription is not None:
                await protocol.request("subscribe", self.subscription.params())
        except BaseException as e:
            if self._protocol is protocol:
                self._protocol = None
            protocol.close(describe_failure(e, self.gateway, self.server_name))
            raise
        self._preparing = None
        if not self.running:
            self._protocol = None
            protocol.close("the client stopped")
            return
        self._failures = 0
        self.log.info(
            "connected to {gateway} as {principal}",
            gateway=self.gateway,
            principal=hello.get("principal"),
        )
        protocol.when_closed().addCallback(lambda _: self._connection_lost(protocol))
        self._notify_waiters(protocol)
        self._schedule_ack()

    def _connection_lost(self, protocol: AppClientProtocol) -> None:
        if self._protocol is not protocol:
            return
        self._protocol = None
        if self.running:
            self.log.info(
                "connection to {gateway} lost: {reason}",
                gateway=self.gateway,
                reason=str(protocol.lost_reason),
            )
            self._failures = 1
            self._schedule_retry()

    def when_connected(self, fail_after_failures: int | None = None) -> Deferred[AppClientProtocol]:
        """
        :param fail_after_failures: give up after this many failed attempts
            from now on (default: wait for as long as it takes).
        :return: a Deferred firing with a ready connection (after ``hello``
            and the subscription), or failing with :class:`AppConnectionError`.
        """
        if self._protocol is not None and self._preparing is None and not self._protocol.abandoned:
            return succeed(self._protocol)
        if not self.running:
            return fail(AppConnectionError("the client is not running"))
        waiter: Deferred[AppClientProtocol] = Deferred()
        self._waiters.append((waiter, fail_after_failures))
        return waiter

    # -- requests --------------------------------------------------------------------------

    def request(self, op: str, **params: Any) -> Deferred[dict[str, Any]]:
        """
        Send a request once connected.

        :return: a Deferred firing with the result object; failing with
            :class:`AppError` (refused), :class:`AppConnectionError` (the
            connection ended before the response, or ``request_timeout``
            passed), :class:`AppProtocolError`.
        """
        return ensureDeferred(self._request(op, params))

    async def _request(self, op: str, params: Mapping[str, Any]) -> dict[str, Any]:
        async def send() -> Any:
            protocol = await self.when_connected()
            return await protocol.request(op, params)

        attempt: Deferred[Any] = ensureDeferred(send())
        if self.request_timeout is not None:
            attempt.addTimeout(self.request_timeout, self.clock)
        try:
            result = await attempt
        except (defer.TimeoutError, twisted_error.TimeoutError, TimeoutError):
            raise AppConnectionError(
                f"no answer to {op} from {self.gateway} within {self.request_timeout:g} s"
            ) from None
        if not isinstance(result, dict):
            raise AppProtocolError(f"the result of {op} is not an object")
        return result

    def submit(
        self,
        module: str,
        kind: str,
        body: Any = None,
        *,
        ttl: int | None = None,
        not_after: int | None = None,
        idempotency_key: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """``submit``: queue an instruction; the result has its ``iid`` and ``state``."""
        params = _submit_params(module, kind, body, ttl, not_after, idempotency_key)
        return self.request("submit", **params)

    def cancel(self, module: str, iid: int) -> Deferred[dict[str, Any]]:
        """``cancel``: the instruction, now ``cancelled``."""
        return self.request("cancel", module=module, iid=iid)

    def get(self, module: str, iid: int) -> Deferred[dict[str, Any]]:
        """``get``: an instruction's state and history."""
        return self.request("get", module=module, iid=iid)

    def modules(
        self, module: str | None = None, *, offset: int = 0, limit: int = 100
    ) -> Deferred[dict[str, Any]]:
        """``modules``: one page of the modules you may see, or one of them."""
        if module is not None:
            return self.request("modules", module=module)
        return self.request("modules", offset=offset, limit=limit)

    def rotate(self, module: str, params: int | str | None = None) -> Deferred[dict[str, Any]]:
        """``rotate``: queue a key rotation (``params``: a parameter set's pid or name)."""
        if params is None:
            return self.request("rotate", module=module)
        return self.request("rotate", module=module, params=params)

    def approve(self, module: str) -> Deferred[dict[str, Any]]:
        """``approve``: enable a module pending approval."""
        return self.request("approve", module=module)

    def refuse(self, module: str) -> Deferred[dict[str, Any]]:
        """``refuse``: disable a module pending approval."""
        return self.request("refuse", module=module)

    def ping(self) -> Deferred[dict[str, Any]]:
        """``ping``: the gateway's time."""
        return self.request("ping")

    def subscribe(
        self,
        modules: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        events: Sequence[str] | None = None,
    ) -> Deferred[dict[str, Any] | None]:
        """
        Receive events (filtered; ``None`` lets everything through), now and
        on every later connection. Events a filter withholds are acknowledged
        on the application's behalf (``docs/app-protocol.md``).

        :return: a Deferred firing with the ``subscribe`` result if connected
            now, else ``None`` (the subscription is made on connecting).
        """
        self.subscription = _subscription(modules, groups, events)
        protocol = self._protocol
        if protocol is None:
            return succeed(None)
        # Delivery restarts after the acknowledged position: what is queued
        # comes again (under the new filters); the event in hand does not.
        self._queue.clear()
        self.cursor.rewind()
        if self._handling is not None:
            self.cursor.accept(self._handling)
        return protocol.request("subscribe", self.subscription.params())

    def unsubscribe(self) -> Deferred[dict[str, Any] | None]:
        """Stop event delivery, now and on later connections."""
        self.subscription = None
        protocol = self._protocol
        if protocol is None:
            return succeed(None)
        return protocol.request("unsubscribe")

    # -- events and acknowledgements -------------------------------------------------------

    def _event_received(self, protocol: AppClientProtocol, event: AppEvent) -> None:
        if protocol is not self._protocol or protocol.abandoned:
            return  # a connection being abandoned
        if event.seq is None:
            if self.on_event is not None:
                maybeDeferred(self.on_event, event).addErrback(
                    lambda f: self.log.failure("event handler failed on {kind}", f, kind=event.kind)
                )
            return
        if not self.cursor.accept(event.seq):
            return
        self._queue.append(event)
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and self._handling is None:
                event = self._queue.popleft()
                self._handling = event.seq
                handled: Deferred[Any] = maybeDeferred(self.on_event or _ignore, event)
                handled.addCallbacks(
                    self._processed,
                    self._handler_failed,
                    callbackArgs=(event,),
                    errbackArgs=(event,),
                )
        finally:
            self._pumping = False

    def _processed(self, _: object, event: AppEvent) -> None:
        self._handling = None
        assert event.seq is not None
        self.cursor.mark_processed(event.seq)
        self._schedule_ack()
        self._pump()

    def _handler_failed(self, failure: Failure, event: AppEvent) -> None:
        self._handling = None
        self.log.failure(
            "event handler failed on event {seq} ({kind}); reconnecting to receive it again",
            failure,
            seq=event.seq,
            kind=event.kind,
        )
        self._queue.clear()
        self.cursor.rewind()
        protocol = self._protocol
        if protocol is not None:
            protocol.abandoned = True
            protocol.close("the event handler failed")

    def _effective_batch(self) -> int:
        batch = self.ack_batch
        window = _optional_int((self.hello or {}).get("max_unacked"))
        if window is not None and window > 0:
            batch = min(batch, max(1, window // 2))
        return batch

    def _schedule_ack(self) -> None:
        if self.cursor.unacked <= 0 or self._ack_in_flight:
            return
        if self.cursor.unacked >= self._effective_batch():
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = self.clock.callLater(self.ack_delay, self._ack_timer_fired)

    def _ack_timer_fired(self) -> None:
        self._ack_timer = None
        self._send_ack()

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None

    def _send_ack(self) -> None:
        self._cancel_ack_timer()
        protocol = self._protocol
        seq = self.cursor.processed
        if protocol is None or self._ack_in_flight or seq <= self.cursor.acked:
            return
        self._ack_in_flight = True

        def done(result: Any) -> None:
            self._ack_in_flight = False
            self._acked(result, seq)
            self._schedule_ack()

        def failed(failure: Failure) -> None:
            self._ack_in_flight = False
            self.log.info("acknowledgement not confirmed: {reason}", reason=str(failure.value))
            if not protocol.lost and self._ack_timer is None:
                self._ack_timer = self.clock.callLater(self.ack_delay, self._ack_timer_fired)

        protocol.request("ack", {"seq": seq}).addCallbacks(done, failed)

    def _acked(self, result: Any, seq: int) -> None:
        acked = _optional_int(result.get("acked_seq")) if isinstance(result, dict) else None
        self.cursor.mark_acked(acked if acked is not None else seq)

    def flush_acks(self, timeout: float | None = None) -> Deferred[None]:
        """
        Acknowledge every processed event now, if connected.

        :return: a Deferred firing once the gateway confirmed it (at once if
            nothing is due or there is no connection).
        """
        return ensureDeferred(self._flush_acks(timeout))

    async def _flush_acks(self, timeout: float | None) -> None:
        self._cancel_ack_timer()
        protocol = self._protocol
        seq = self.cursor.processed
        if protocol is None or seq <= self.cursor.acked:
            return
        sent = protocol.request("ack", {"seq": seq})
        if timeout is not None:
            sent.addTimeout(timeout, self.clock)
        try:
            result = await sent
        except (defer.TimeoutError, twisted_error.TimeoutError, TimeoutError):
            raise AppConnectionError("the gateway did not confirm the acknowledgement") from None
        self._acked(result, seq)


def _ignore(event: AppEvent) -> None:
    return None


def _submit_params(
    module: str,
    kind: str,
    body: Any,
    ttl: int | None,
    not_after: int | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"module": module, "kind": kind, "body": body}
    if ttl is not None:
        params["ttl"] = ttl
    if not_after is not None:
        params["not_after"] = not_after
    if idempotency_key is not None:
        params["idempotency_key"] = idempotency_key
    return params


# -- blocking --------------------------------------------------------------------------------------


#: Opens a connected, TLS-wrapped socket with the given timeout (for tests).
SocketOpener: TypeAlias = Callable[[float], Any]


class BlockingAppClient:
    """
    The application protocol on a plain socket, in the calling thread.

    One thread at a time. Keep-alive and batched acknowledgements happen
    while the client waits for something (a response, an event): a script
    that stays away longer than the gateway's ``idle_timeout`` finds the
    connection closed (:class:`AppConnectionError`) and may :meth:`connect`
    again. :meth:`events` reconnects by itself.

    :ivar hello: the last ``hello`` result.
    :ivar cursor: the position in the event stream (see :class:`EventCursor`).
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        credentials: AppCredentials | None = None,
        *,
        server_name: str | None = None,
        timeout: float = 30.0,
        ack_batch: int = 100,
        ack_delay: float = 1.0,
        versions: Sequence[int] = PROTOCOL_VERSIONS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        opener: SocketOpener | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        """
        :param host: the gateway's host name or address.
        :param credentials: the client certificate (required unless ``opener`` is given).
        :param server_name: the name the gateway's certificate must hold (default ``host``).
        :param timeout: seconds for connecting and for each response.
        :param ack_batch: with :meth:`events`, acknowledge once this many were processed ...
        :param ack_delay: ... or this many seconds after the first of them.
        :param clock: a monotonic clock; ``sleep`` waits between reconnections.
        :param opener: makes the connected socket instead of TCP + TLS (tests).
        :param on_notice: told (one line) when a connection is lost and retried.
        :raise m2mgw.errors.ConfigError: the credential files are unusable.
        """
        if credentials is None and opener is None:
            raise ValueError("credentials are needed")
        if ack_batch < 1 or not ack_delay > 0 or not timeout > 0:
            raise ValueError("ack_batch must be at least 1, ack_delay and timeout positive")
        self.host = host
        self.port = port
        self.gateway = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.server_name = server_name or host
        self.timeout = timeout
        self.ack_batch = ack_batch
        self.ack_delay = ack_delay
        self.versions = tuple(versions)
        self.clock = clock
        self.sleep = sleep
        self.on_notice = on_notice
        self._context = credentials.ssl_context() if credentials is not None else None
        self._opener = opener
        self.hello: Mapping[str, Any] | None = None
        self.cursor = EventCursor()
        self.subscription: Subscription | None = None
        self._sock: Any = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._outstanding: dict[int, str] = {}
        self._responses: dict[int, AppResponse] = {}
        self._events: deque[AppEvent] = deque()
        self._last_sent = 0.0
        self._last_received = 0.0
        self._send_after: float | None = None
        self._dead_after: float | None = None
        self._max_line: int | None = None
        self._ack_due_at: float | None = None
        self._ack_in_flight: int | None = None

    # -- connection ------------------------------------------------------------------------

    def __enter__(self) -> BlockingAppClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is open."""
        return self._sock is not None

    def connect(self) -> Mapping[str, Any]:
        """
        Connect, say ``hello``, acknowledge what is due and subscribe again
        if :meth:`subscribe` was called before.

        :return: the ``hello`` result.
        :raise AppConnectionError: no connection (the message says why).
        :raise AppError: the gateway refused ``hello`` or the subscription.
        """
        self._drop()
        try:
            self._sock = self._open()
        except OSError as e:
            raise AppConnectionError(describe_failure(e, self.gateway, self.server_name)) from None
        now = self.clock()
        self._last_sent = self._last_received = now
        self._send_after, self._dead_after = None, None
        self._max_line = None
        try:
            hello = self._call("hello", {"versions": list(self.versions)})
            self.hello = MappingProxyType(hello)
            self._max_line = _optional_int(hello.get("max_line"))
            self._send_after, self._dead_after = keepalive_timing(hello)
            positions = _hello_positions(hello)
            if positions is not None and not self.cursor.resume(*positions):
                self._events.clear()
            if self.cursor.processed > self.cursor.acked:
                self.ack()
            if self.subscription is not None:
                self._call("subscribe", self.subscription.params())
        except BaseException:
            self._drop()
            raise
        return self.hello

    def _open(self) -> Any:
        if self._opener is not None:
            return self._opener(self.timeout)
        assert self._context is not None
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            wrapped = self._context.wrap_socket(raw, server_hostname=self.server_name)
        except BaseException:
            raw.close()
            raise
        return wrapped

    def close(self) -> None:
        """Acknowledge what was processed (best effort, briefly) and disconnect."""
        if self._sock is not None and self.cursor.processed > self.cursor.acked:
            with contextlib.suppress(AppClientError):
                self.ack(timeout=min(self.timeout, 5.0))
        self._drop()

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._buffer.clear()
        self._outstanding.clear()
        self._responses.clear()
        self._ack_in_flight = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _fail(self, error: BaseException) -> AppConnectionError:
        self._drop()
        if isinstance(error, AppConnectionError):
            return error
        return AppConnectionError(describe_failure(error, self.gateway, self.server_name))

    # -- requests --------------------------------------------------------------------------

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        """
        Send a request and wait for its response (events arriving meanwhile
        are kept for :meth:`next_event`).

        :return: the result object.
        :raise AppError: the gateway refused it.
        :raise AppConnectionError: not connected, the connection ended, or no
            answer in time (then the connection is closed).
        """
        return self._call(op, params)

    def _call(
        self, op: str, params: Mapping[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        request_id = self._send(op, params, background=False)
        deadline = self.clock() + (self.timeout if timeout is None else timeout)
        while request_id not in self._responses:
            if not self._pump_once(deadline):
                error = AppConnectionError(f"no answer to {op} from {self.gateway} in time")
                raise self._fail(error)
        response = self._responses.pop(request_id)
        if not response.ok:
            assert response.error is not None
            raise response.error
        if not isinstance(response.result, dict):
            raise AppProtocolError(f"the result of {op} is not an object")
        return response.result

    def _send(self, op: str, params: Mapping[str, Any], background: bool) -> int:
        if self._sock is None:
            raise AppConnectionError(f"not connected to {self.gateway}")
        request_id = next(self._ids)
        line = encode_request(request_id, op, params)
        if self._max_line is not None and len(line) > self._max_line:
            raise AppError("line-too-long", f"the request is longer than {self._max_line} bytes")
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line + b"\n")
        except (OSError, ValueError) as e:
            raise self._fail(e) from None
        self._outstanding[request_id] = op if background else ""
        self._last_sent = self.clock()
        return request_id

    def submit(
        self,
        module: str,
        kind: str,
        body: Any = None,
        *,
        ttl: int | None = None,
        not_after: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """``submit``: queue an instruction; the result has its ``iid`` and ``state``."""
        return self.request(
            "submit", **_submit_params(module, kind, body, ttl, not_after, idempotency_key)
        )

    def subscribe(
        self,
        modules: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        events: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """
        Receive events (filtered; ``None`` lets everything through), now and
        after every reconnection. Events a filter withholds are acknowledged
        on the application's behalf (``docs/app-protocol.md``).

        :return: the ``subscribe`` result (``acked_seq``, ``last_seq``).
        """
        subscription = _subscription(modules, groups, events)
        result = self._call("subscribe", subscription.params())
        self.subscription = subscription
        self._events = deque(e for e in self._events if e.seq is None)
        self.cursor.rewind()
        return result

    def wait_for_outcome(
        self,
        module: str,
        iid: int,
        timeout: float | None = None,
        poll: tuple[float, float] = (0.25, 2.0),
    ) -> dict[str, Any]:
        """
        Wait until an instruction is final (``confirmed``, ``failed``,
        ``expired`` or ``cancelled``), asking ``get`` every ``poll[0]``
        seconds at first and every ``poll[1]`` at most. Polling leaves the
        application's event stream to its subscriber.

        :return: the last ``get`` result.
        :raise AppConnectionError: ``timeout`` seconds passed first (or the connection ended).
        """
        deadline = None if timeout is None else self.clock() + timeout
        delay = poll[0]
        while True:
            state = self.request("get", module=module, iid=iid)
            if state.get("state") in FINAL_STATES:
                return state
            now = self.clock()
            if deadline is not None and now >= deadline:
                raise AppConnectionError(
                    f"instruction {iid} of {module} is still {state.get('state')} "
                    f"after {timeout:g} s"
                )
            wake = now + delay if deadline is None else min(now + delay, deadline)
            while self._pump_once(wake):
                pass
            delay = min(delay * 2, poll[1])

    # -- events ----------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> AppEvent | None:
        """
        The next event (sequenced ones in order, duplicates dropped); ``ping``
        events are answered, not returned.

        :param timeout: seconds to wait (``None``: for as long as it takes).
        :return: the event, or ``None`` if none came in time.
        :raise AppConnectionError: the connection ended.
        """
        deadline = None if timeout is None else self.clock() + timeout
        while not self._events:
            if not self._pump_once(deadline):
                return None
        return self._events.popleft()

    def events(
        self, *, auto_ack: bool = True, reconnect: bool = True, timeout: float | None = None
    ) -> Iterator[AppEvent]:
        """
        Iterate over events.

        :param auto_ack: an event counts as processed (and is acknowledged in
            a batch) when the loop asks for the next one; the event in hand
            when the loop ends early is not, so call :meth:`mark_processed`
            first if it was.
        :param reconnect: on a lost connection, reconnect with backoff (1 s
            growing to 60 s) and resume; else raise :class:`AppConnectionError`.
        :param timeout: stop when no event came for this many seconds.
        """
        previous: AppEvent | None = None
        attempt = 0
        while True:
            if previous is not None and auto_ack and previous.seq is not None:
                self.mark_processed(previous.seq)
            previous = None
            try:
                if self._sock is None:
                    self.connect()
                    attempt = 0
                event = self.next_event(timeout)
            except AppConnectionError as e:
                if not reconnect:
                    raise
                attempt += 1
                delay = min(60.0, 1.5 ** (attempt - 1)) * (0.8 + random.random() * 0.4)  # noqa: S311
                if self.on_notice is not None:
                    self.on_notice(f"{e}; connecting again in {delay:.1f} s")
                self._drop()
                self.sleep(delay)
                continue
            if event is None:
                return
            previous = event
            yield event

    def mark_processed(self, seq: int) -> None:
        """The application is done with every event up to ``seq``: acknowledge it soon."""
        self.cursor.mark_processed(seq)
        if self._ack_due_at is None and self.cursor.unacked > 0:
            self._ack_due_at = self.clock() + self.ack_delay

    def ack(self, seq: int | None = None, timeout: float | None = None) -> int:
        """
        Acknowledge every event up to ``seq`` (default: every processed one) now.

        :return: the gateway's acknowledged position.
        """
        if seq is None:
            seq = self.cursor.processed
        else:
            self.cursor.mark_processed(seq)
        result = self._call("ack", {"seq": seq}, timeout)
        acked = _optional_int(result.get("acked_seq"))
        self.cursor.mark_acked(acked if acked is not None else seq)
        if self.cursor.unacked == 0:
            self._ack_due_at = None
        return self.cursor.acked

    def flush_acks(self) -> None:
        """Acknowledge every processed event now, if any is due."""
        if self.cursor.processed > self.cursor.acked:
            self.ack()

    # -- the reading loop ------------------------------------------------------------------

    def _pump_once(self, deadline: float | None) -> bool:
        """
        Handle one incoming message, or wait until ``deadline``, doing
        keep-alive and due acknowledgements meanwhile.

        :return: ``False`` if the deadline passed with nothing received.
        :raise AppConnectionError: the connection ended (it is closed).
        """
        if self._sock is None:
            raise AppConnectionError(f"not connected to {self.gateway}")
        while True:
            now = self.clock()
            self._background_work(now)
            line = self._take_line()
            if line is not None:
                if line.strip():
                    self._route(line)
                    return True
                continue
            if self._dead_after is not None and now - self._last_received >= self._dead_after:
                raise self._fail(
                    AppConnectionError(f"no data from the gateway for {self._dead_after:g} s")
                )
            waits = [] if deadline is None else [deadline - now]
            if self._send_after is not None:
                waits.append(self._last_sent + self._send_after - now)
            if self._dead_after is not None:
                waits.append(self._last_received + self._dead_after - now)
            if self._ack_due_at is not None and self._ack_in_flight is None:
                waits.append(self._ack_due_at - now)
            if deadline is not None and now >= deadline:
                return False
            wait = max(0.0, min(waits)) if waits else None
            try:
                self._sock.settimeout(wait if wait is None else max(wait, 0.001))
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except ssl.SSLWantReadError:
                continue
            except (OSError, ValueError) as e:
                raise self._fail(e) from None
            if not data:
                raise self._fail(ConnectionResetError())
            self._last_received = self.clock()
            self._buffer += data

    def _take_line(self) -> bytes | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_RECEIVED_LINE:
                raise self._fail(
                    AppProtocolError(
                        f"the gateway sent a line longer than {MAX_RECEIVED_LINE} bytes"
                    )
                )
            return None
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        return line

    def _route(self, line: bytes) -> None:
        try:
            message = parse_message(line)
        except AppProtocolError as e:
            raise self._fail(AppConnectionError(str(e))) from None
        if isinstance(message, AppEvent):
            if message.kind == "ping":
                interval = self._send_after or DEFAULT_PING_INTERVAL
                if self.clock() - self._last_sent >= interval / 2:
                    self._send("ping", {}, background=True)
            elif message.seq is None or self.cursor.accept(message.seq):
                self._events.append(message)
            return
        request_id = message.id
        if request_id is None and not message.ok and self._outstanding:
            request_id = next(iter(self._outstanding))  # answered in order
        if not isinstance(request_id, int) or request_id not in self._outstanding:
            return
        background = self._outstanding.pop(request_id)
        if message.error is not None and message.error.code in _CLOSING_CODES:
            raise self._fail(
                AppConnectionError(f"the gateway closed the connection: {message.error}")
            )
        if not background:
            self._responses[request_id] = message
        elif background == "ack":
            self._ack_in_flight = None
            if message.ok and isinstance(message.result, dict):
                acked = _optional_int(message.result.get("acked_seq"))
                if acked is not None:
                    self.cursor.mark_acked(acked)
            if self.cursor.unacked > 0 and self._ack_due_at is None:
                self._ack_due_at = self.clock() + self.ack_delay

    def _background_work(self, now: float) -> None:
        """Send a keep-alive ``ping`` or a due acknowledgement."""
        if self._ack_in_flight is None and self.cursor.unacked > 0:
            due = self._ack_due_at is not None and now >= self._ack_due_at
            if due or self.cursor.unacked >= self._effective_batch():
                self._ack_due_at = None
                self._ack_in_flight = self._send("ack", {"seq": self.cursor.processed}, True)
        if self._send_after is not None and now - self._last_sent >= self._send_after:
            self._send("ping", {}, background=True)

    def _effective_batch(self) -> int:
        batch = self.ack_batch
        window = _optional_int((self.hello or {}).get("max_unacked"))
        if window is not None and window > 0:
            batch = min(batch, max(1, window // 2))
        return batch
