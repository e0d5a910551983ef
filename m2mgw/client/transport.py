"""
Getting a module's datagrams answered: the retry policy, and two transports.

The policy of ``docs/protocol.md`` is a pure state machine, :class:`Exchange`:
it asks the :class:`~m2mgw.client.module.ModuleEndpoint` for datagrams,
says what to send where and how long to wait (:class:`Send`), and is told
what came back or that the wait ran out.  For one logical message:

1. send it and wait ``timeout`` (default 2 s);
2. no answer: send the *same bytes* again (the gateway answers a copy from
   its 60-second reply cache) and wait twice as long;
3. still nothing: the same DataBody, same ``tok``, under a *new* ``ctr``,
   to the next gateway address if there are several (another node may lack
   the cached reply), waiting twice as long again;
4. then a *new HELLO* (fresh ``epk``, ``ts`` and ``tok``; its own byte-
   identical retry; a second fresh HELLO if that fails, with the newest
   *active* key or the PSK should the first have used a key only just
   registered) and the DataBody again in the new session;
5. then give up: the DataBody stays in the outbox for the next wake-up.

With several gateway addresses (nodes sharing one database), an exchange
starts at the address that answered last (the transports remember it), so
that once a node is down only the first message after its failure pays the
timeouts.  A new ``ctr`` rather than the same bytes goes to the next address:
the same bytes would be answered there only if the first node never
accepted them -- if it did, and died before replying, the next node has no
cached reply and its replay check keeps it silent -- while the same DataBody
under a new ``ctr`` is answered in both cases and applied once (its ``tok``).

A session about to expire is renewed with a HELLO first.  Each datagram may
go out in up to 3 back-to-back copies (forward error correction, MGP/1 §1).
The state is saved (``save``) after every change and before the datagram
that depends on it leaves.

:func:`wake_plan` strings exchanges into one wake-up (the unanswered DataBody
first, then this wake's report and confirmations, more rounds while the
gateway says ``more``).  :class:`BlockingTransport` runs exchanges on a
blocking UDP socket (a Linux-class device, a script); :class:`TwistedTransport`
is a ``DatagramProtocol`` running them on a reactor (the fleet simulator).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from m2mgw.client.module import (
    ClientError,
    HelloContext,
    InstructionOutcome,
    KeyState,
    ModuleEndpoint,
    ModuleState,
    Outgoing,
    ReplyOutcome,
)
from m2mgw.protocol.bodies import MISSING, AuthMethod, KeyRegResult, Payload
from m2mgw.protocol.messages import MAX_RECEIVED_DATAGRAM

__all__ = [
    "BlockingTransport",
    "DataOperation",
    "Exchange",
    "ExchangeOutcome",
    "Finished",
    "HelloOperation",
    "RetryPolicy",
    "Send",
    "TwistedTransport",
    "WakeResult",
    "enroll_plan",
    "parse_address",
    "rotate_plan",
    "run_blocking",
    "run_twisted",
    "wake_plan",
]

#: At most this many copies of a datagram go out back to back (MGP/1 §1).
MAX_FEC_COPIES: Final = 3
#: How many DATA rounds one wake-up makes at most (``more`` instructions, confirmations).
DEFAULT_MAX_ROUNDS: Final = 8
#: Receive buffer: larger than any MGP/1 datagram, so an oversized one is seen and dropped.
_RECEIVE_BUFFER: Final = 4096

Address = tuple[str, int]
T = TypeVar("T")
Save = Callable[[ModuleState], None]


@dataclass(frozen=True)
class RetryPolicy:
    """
    How long to wait and how often to try (see the module docstring).

    :ivar timeout: the first wait, in seconds.
    :ivar backoff: each further wait of a message is this much longer.
    :ivar max_timeout: no wait is longer.
    :ivar same_bytes: byte-identical retransmissions of each new datagram.
    :ivar new_ctr: re-sends of a DataBody under a new ``ctr`` per session.
    :ivar hello_attempts: fresh HELLOs tried before a HELLO stage fails.
    :ivar rehellos: times an unanswered DATA falls back to a new HELLO.
    :ivar fec_copies: copies of every datagram sent back to back (1-3).
    """

    timeout: float = 2.0
    backoff: float = 2.0
    max_timeout: float = 30.0
    same_bytes: int = 1
    new_ctr: int = 1
    hello_attempts: int = 2
    rehellos: int = 1
    fec_copies: int = 1

    def __post_init__(self) -> None:
        if not self.timeout > 0 or self.backoff < 1 or self.max_timeout < self.timeout:
            raise ValueError("timeout must be > 0, backoff >= 1 and max_timeout >= timeout")
        if min(self.same_bytes, self.new_ctr, self.rehellos) < 0 or self.hello_attempts < 1:
            raise ValueError("retry counts must not be negative; hello_attempts at least 1")
        if not 1 <= self.fec_copies <= MAX_FEC_COPIES:
            raise ValueError(f"fec_copies must be 1 to {MAX_FEC_COPIES}")

    def wait(self, attempt: int) -> float:
        """The wait after attempt ``attempt`` (0-based) of one message."""
        return float(min(self.timeout * self.backoff**attempt, self.max_timeout))


# -- one exchange -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HelloOperation:
    """
    Open a session: a HELLO, with what its ``pl`` carries.

    :ivar kid: the key to use (``None``: the endpoint's choice).
    """

    payload: Payload | None = None
    kid: int | None = None
    method: AuthMethod | None = None
    include_keyreg: bool = False


@dataclass(frozen=True)
class DataOperation:
    """
    Get a DataBody answered: a new one with ``payload``, or (``resend``) the
    unanswered one of the outbox.  A HELLO comes first when there is no
    live session.
    """

    payload: Payload | None = None
    resend: bool = False


@dataclass(frozen=True)
class Send:
    """
    What to do next: send ``datagrams`` (copies of one datagram) to the
    gateway address number ``address``, then wait ``timeout`` seconds.
    """

    datagrams: tuple[bytes, ...]
    address: int
    timeout: float


@dataclass(frozen=True)
class ExchangeOutcome:
    """
    How an exchange ended.

    :ivar ok: the message was answered.
    :ivar failure: why not: ``"no answer"``, ``"error: ..."``.
    :ivar replies: the accepted replies, in order (a HELLO_REPLY, then the DATA_REPLY).
    :ivar sent: datagrams sent, copies included.
    :ivar hellos: HELLOs built.
    :ivar dropped: received datagrams the endpoint dropped.
    :ivar elapsed: seconds from the first send to the end (set by the transport).
    :ivar address: the number of the gateway address that last answered, if any.
    """

    ok: bool
    failure: str | None = None
    replies: tuple[ReplyOutcome, ...] = ()
    sent: int = 0
    hellos: int = 0
    dropped: int = 0
    elapsed: float = 0.0
    address: int | None = None

    @property
    def last(self) -> ReplyOutcome | None:
        """The last accepted reply."""
        return self.replies[-1] if self.replies else None


@dataclass(frozen=True)
class Finished:
    """The exchange is over."""

    outcome: ExchangeOutcome


Step = Send | Finished
_Flow = Generator[Send, "ReplyOutcome | None", ExchangeOutcome]
_Stage = Generator[Send, "ReplyOutcome | None", "ReplyOutcome | None"]


class Exchange:
    """
    One logical message under the retry policy, as a pure state machine.

    Drive it with :meth:`start`, then :meth:`datagram_received` for every
    datagram that arrives and :meth:`timed_out` when a wait runs out; each
    returns the next :class:`Step` (``None`` from :meth:`datagram_received`:
    the datagram was not an answer, keep waiting until the same deadline).

    :param endpoint: the module.
    :param operation: a :class:`HelloOperation` or :class:`DataOperation`.
    :param save: persists the state; called before every datagram whose
        bytes depend on a state change, and after every accepted reply.
    """

    def __init__(
        self,
        endpoint: ModuleEndpoint,
        operation: HelloOperation | DataOperation,
        save: Save | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.operation = operation
        self._save = save
        self._policy = RetryPolicy()
        self._addresses = 1
        self._address = 0
        self._flow: _Flow | None = None
        self._contexts: list[HelloContext] = []
        self._replies: list[ReplyOutcome] = []
        self._sent = 0
        self._hellos = 0
        self._dropped = 0
        self._awaiting_hello = False
        self._target_tok: bytes | None = None
        self._answered_by: int | None = None
        self.finished: ExchangeOutcome | None = None

    # -- driving ------------------------------------------------------------------------

    def start(
        self, policy: RetryPolicy | None = None, addresses: int = 1, first_address: int = 0
    ) -> Step:
        """
        Begin: the first datagram to send (or the end, if nothing can be sent).

        :param policy: the transport's retry policy.
        :param addresses: how many gateway addresses the transport knows.
        :param first_address: the number of the address to try first (the
            one that answered last).
        """
        if self._flow is not None:
            raise RuntimeError("the exchange has started already")
        self._policy = policy or RetryPolicy()
        self._addresses = max(1, addresses)
        self._address = first_address % self._addresses
        self._flow = self._run()
        return self._step(None, first=True)

    def datagram_received(self, datagram: bytes) -> Step | None:
        """
        Hand a received datagram to the endpoint.

        :return: the next step if it was an answer, ``None`` if it was dropped.
        """
        if self._flow is None or self.finished is not None:
            return None
        outcome = self.endpoint.handle_reply(datagram, self._contexts)
        if not outcome.accepted:
            self._dropped += 1
            return None
        self._replies.append(outcome)
        self._answered_by = self._address
        self._persist()
        relevant = self._awaiting_hello if outcome.kind == "hello" else self._data_answered()
        if not relevant:
            # Authentic, handled (instructions executed), but not what this
            # exchange waits for (a late reply of an earlier one): keep waiting.
            return None
        return self._step(outcome)

    def abandon(self, reason: str) -> Finished:
        """End the exchange now, unanswered (the transport went away)."""
        if self.finished is None:
            self.finished = self._outcome(ExchangeOutcome(False, reason))
            if self._flow is not None:
                self._flow.close()
        return Finished(self.finished)

    def _outcome(self, outcome: ExchangeOutcome) -> ExchangeOutcome:
        return replace(
            outcome,
            replies=tuple(self._replies),
            sent=self._sent,
            hellos=self._hellos,
            dropped=self._dropped,
            address=self._answered_by,
        )

    def _data_answered(self) -> bool:
        """True once the DataBody this exchange is about left the outbox."""
        target = self._target_tok
        outbox = self.endpoint.state.outbox
        return target is not None and (outbox is None or outbox.tok != target)

    def timed_out(self) -> Step:
        """The wait of the last :class:`Send` ran out: the next step."""
        if self._flow is None:
            raise RuntimeError("the exchange has not started")
        if self.finished is not None:
            return Finished(self.finished)
        return self._step(None)

    def _step(self, value: ReplyOutcome | None, first: bool = False) -> Step:
        assert self._flow is not None
        try:
            send = next(self._flow) if first else self._flow.send(value)
        except StopIteration as stop:
            self.finished = self._outcome(stop.value)
            return Finished(self.finished)
        except ClientError as e:
            self.finished = self._outcome(ExchangeOutcome(False, f"error: {e}"))
            return Finished(self.finished)
        self._sent += len(send.datagrams)
        return send

    def _persist(self) -> None:
        if self._save is not None:
            self._save(self.endpoint.state)

    # -- the policy ---------------------------------------------------------------------

    def _send(self, datagram: bytes, attempt: int) -> Send:
        copies = (datagram,) * self._policy.fec_copies
        return Send(copies, self._address, self._policy.wait(attempt))

    def _next_address(self) -> None:
        self._address = (self._address + 1) % self._addresses

    def _message(self, outgoing: Outgoing, attempt: int) -> _Stage:
        """Send ``outgoing`` and its byte-identical retransmissions; the answer or ``None``."""
        self._persist()
        answer = yield self._send(outgoing.datagram, attempt)
        for retry in range(self._policy.same_bytes):
            if answer is not None:
                break
            answer = yield self._send(outgoing.datagram, attempt + 1 + retry)
        return answer

    def _hello_stage(self, operation: HelloOperation) -> _Stage:
        """
        Fresh HELLOs until one is answered: the HELLO_REPLY's outcome, or
        ``None``, or a DATA_REPLY that answered this exchange's DataBody late.
        """
        self._awaiting_hello = True
        try:
            return (yield from self._hellos_until_answered(operation))
        finally:
            self._awaiting_hello = False
            self._contexts.clear()

    def _hellos_until_answered(self, operation: HelloOperation) -> _Stage:
        for attempt in range(self._policy.hello_attempts):
            if attempt:
                self._next_address()
            outgoing = self.endpoint.build_hello(
                operation.payload,
                kid=operation.kid,
                method=operation.method,
                include_keyreg=operation.include_keyreg,
                fallback=attempt > 0,
            )
            assert isinstance(outgoing.context, HelloContext)
            self._hellos += 1
            self._contexts.append(outgoing.context)
            answer = yield from self._message(outgoing, 0)
            if answer is not None:
                return answer
        return None

    def _data_stage(self, outgoing: Outgoing) -> _Stage:
        """A DataBody: same bytes, then under new counters; the DATA_REPLY's outcome or ``None``."""
        answer = yield from self._message(outgoing, 0)
        attempt = 1 + self._policy.same_bytes
        for _ in range(self._policy.new_ctr):
            if answer is not None:
                break
            self._next_address()
            outgoing = self.endpoint.resend_under_new_ctr(outgoing)
            self._persist()
            answer = yield self._send(outgoing.datagram, attempt)
            attempt += 1
        return answer

    def _run(self) -> _Flow:
        operation = self.operation
        endpoint = self.endpoint
        if isinstance(operation, HelloOperation):
            answer = yield from self._hello_stage(operation)
            if answer is None:
                return ExchangeOutcome(False, "no answer")
            return ExchangeOutcome(True)
        if operation.resend:
            outbox = endpoint.state.outbox
            if outbox is None:
                raise ClientError("no DATA is waiting for an answer")
            self._target_tok = outbox.tok
        if endpoint.needs_hello():
            if (yield from self._hello_stage(HelloOperation())) is None:
                return ExchangeOutcome(False, "no answer")
            if self._data_answered():
                return ExchangeOutcome(True)
        if operation.resend:
            outgoing = endpoint.resend_outbox()
        else:
            outgoing = endpoint.build_data(operation.payload)
            assert endpoint.state.outbox is not None
            self._target_tok = endpoint.state.outbox.tok
        rehellos = self._policy.rehellos
        while True:
            answer = yield from self._data_stage(outgoing)
            if answer is not None:
                return ExchangeOutcome(True)
            if rehellos == 0:
                return ExchangeOutcome(False, "no answer")
            rehellos -= 1
            self._next_address()
            if (yield from self._hello_stage(HelloOperation())) is None:
                return ExchangeOutcome(False, "no answer")
            if self._data_answered():
                return ExchangeOutcome(True)
            outgoing = endpoint.resend_outbox()


# -- a wake-up ------------------------------------------------------------------------------


@dataclass
class WakeResult:
    """
    What one wake-up did.

    :ivar ok: every exchange was answered.
    :ivar failure: why the wake-up stopped early.
    :ivar exchanges: the outcome of each exchange.
    :ivar instructions: every instruction handled (executed, refused or a duplicate).
    :ivar keyreg: the last key registration result received.
    """

    ok: bool = True
    failure: str | None = None
    exchanges: list[ExchangeOutcome] = field(default_factory=list)
    instructions: list[InstructionOutcome] = field(default_factory=list)
    keyreg: KeyRegResult | None = None

    @property
    def sent(self) -> int:
        """Datagrams sent."""
        return sum(outcome.sent for outcome in self.exchanges)

    @property
    def answered(self) -> int:
        """Replies accepted."""
        return sum(len(outcome.replies) for outcome in self.exchanges)

    def add(self, outcome: ExchangeOutcome) -> bool:
        """Record an exchange; true if it was answered."""
        self.exchanges.append(outcome)
        for reply in outcome.replies:
            self.instructions.extend(reply.instructions)
            if reply.keyreg is not None:
                self.keyreg = reply.keyreg
        if not outcome.ok:
            self.ok = False
            self.failure = outcome.failure
        return outcome.ok


def _needs_another_round(endpoint: ModuleEndpoint, last: ReplyOutcome | None, flush: bool) -> bool:
    state = endpoint.state
    if last is not None and last.more:
        return True
    return flush and (bool(state.pending_confs) or state.pending_keyreg is not None)


def wake_plan(
    endpoint: ModuleEndpoint,
    save: Save | None = None,
    *,
    data: Any = MISSING,
    payload: Payload | None = None,
    in_hello: bool = False,
    confirm_now: bool = False,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
) -> Generator[Exchange, ExchangeOutcome, WakeResult]:
    """
    One wake-up as a sequence of exchanges (run it with :func:`run_blocking`
    or :func:`run_twisted`).

    1. The DataBody a previous wake-up left unanswered, if any, is re-sent.
    2. This wake-up's message: ``payload`` (or a Payload with ``data``) and the
       waiting confirmations and key registration, in a DATA (after a HELLO
       if there is no session).  With ``in_hello`` and no session, the
       payload rides in the HELLO instead: one round trip, but MGP/1 applies
       a HELLO's ``pl`` once per accepted HELLO, so a lost reply can
       duplicate it.
    3. More DATA rounds while the gateway says ``more`` (to fetch queued
       instructions) or, with ``confirm_now``, while confirmations wait;
       otherwise confirmations ride in the next wake-up's first message.

    :return: a :class:`WakeResult` (the generator's return value).
    """
    result = WakeResult()
    if data is not MISSING:
        payload = replace(payload or Payload(), data=data)
    if endpoint.state.outbox is not None:
        earlier = yield Exchange(endpoint, DataOperation(resend=True), save)
        if not result.add(earlier):
            return result
    operation: HelloOperation | DataOperation
    if in_hello and endpoint.needs_hello():
        operation = HelloOperation(payload)
    else:
        operation = DataOperation(payload)
    outcome = yield Exchange(endpoint, operation, save)
    if not result.add(outcome):
        return result
    rounds = 1
    while rounds < max_rounds and _needs_another_round(endpoint, outcome.last, confirm_now):
        rounds += 1
        outcome = yield Exchange(endpoint, DataOperation(), save)
        if not result.add(outcome):
            break
    return result


def enroll_plan(
    endpoint: ModuleEndpoint, save: Save | None = None, *, in_hello: bool = False
) -> Generator[Exchange, ExchangeOutcome, WakeResult]:
    """
    Enrolment (MGP/1 §4, §9): register the module's first key, vouched for
    by the PSK, then activate it with a HELLO signed by it — after which the
    module forgets its PSK.

    By default: a PSK HELLO (unless a PSK session is live), then a DATA
    carrying the KeyReg (its ``tok`` makes it apply once however it is
    retried), then the HELLO with the new key.  With ``in_hello`` the KeyReg
    rides in the PSK HELLO itself (one round trip less).

    :raise ClientError: the module has no PSK, or a key is active already.
    """
    state = endpoint.state
    if any(key.status == KeyState.ACTIVE for key in state.keys.values()):
        raise ClientError("the module is enrolled already (it has an active key)")
    if state.psk is None:
        raise ClientError("the module has no PSK to enrol with")
    result = WakeResult()
    if state.outbox is not None:
        earlier = yield Exchange(endpoint, DataOperation(resend=True), save)
        if not result.add(earlier):
            return result
    if state.pending_keyreg is None and not state.keys:
        endpoint.start_key_registration(vouching_kid=0)
        if save is not None:
            save(state)
    if state.pending_keyreg is not None:
        session = state.session
        if in_hello:
            operation: HelloOperation | DataOperation = HelloOperation(kid=0, include_keyreg=True)
        elif session is None or session.kid != 0 or not endpoint.has_session():
            if not result.add((yield Exchange(endpoint, HelloOperation(kid=0), save))):
                return result
            operation = DataOperation()
        else:
            operation = DataOperation()
        if not result.add((yield Exchange(endpoint, operation, save))):
            return result
    registered = [key.kid for key in state.keys.values()]
    if not registered:
        result.ok = False
        result.failure = "the gateway refused the key registration"
        return result
    activate = HelloOperation(kid=max(registered))
    result.add((yield Exchange(endpoint, activate, save)))
    return result


def rotate_plan(
    endpoint: ModuleEndpoint, save: Save | None = None, *, activate: bool = True
) -> Generator[Exchange, ExchangeOutcome, WakeResult]:
    """
    An unsolicited key rotation (MGP/1 §9): a new key with ``kid`` = highest
    + 1, vouched for by the session's credential, registered in a DATA; then
    (``activate``) a HELLO with it, which retires the older keys.
    """
    state = endpoint.state
    result = WakeResult()
    if state.outbox is not None:
        earlier = yield Exchange(endpoint, DataOperation(resend=True), save)
        if not result.add(earlier):
            return result
    if state.pending_keyreg is None:
        endpoint.start_key_registration()
        if save is not None:
            save(state)
    kid = state.pending_keyreg.kid if state.pending_keyreg is not None else None
    if not result.add((yield Exchange(endpoint, DataOperation(), save))):
        return result
    if kid is None or kid not in state.keys:
        result.ok = False
        result.failure = "the gateway refused the key registration"
        return result
    if activate:
        result.add((yield Exchange(endpoint, HelloOperation(kid=kid), save)))
    return result


def run_blocking(transport: BlockingTransport, plan: Generator[Exchange, ExchangeOutcome, T]) -> T:
    """Run every exchange of ``plan`` on ``transport``; the plan's return value."""
    try:
        exchange = next(plan)
        while True:
            exchange = plan.send(transport.run(exchange))
    except StopIteration as stop:
        value: T = stop.value
        return value


def run_twisted(
    transport: TwistedTransport, plan: Generator[Exchange, ExchangeOutcome, T]
) -> Deferred[T]:
    """Run every exchange of ``plan`` on ``transport``; a Deferred of the plan's return value."""

    async def run() -> T:
        try:
            exchange = next(plan)
            while True:
                outcome = await transport.run(exchange)
                exchange = plan.send(outcome)
        except StopIteration as stop:
            value: T = stop.value
            return value

    return ensureDeferred(run())


# -- transports ---------------------------------------------------------------------------------


def parse_address(text: str, default_port: int = 5740) -> Address:
    """
    ``"host:port"``, ``"[v6]:port"`` or ``"host"`` as ``(host, port)``.

    :raise ValueError: an empty host or a bad port.
    """
    text = text.strip()
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: unclosed [")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected :port after ]")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return host, int(port)


class BlockingTransport:
    """
    Runs exchanges over a blocking UDP socket.

    :param server_addrs: the gateway's addresses (several: gateway nodes
        sharing one database, tried in turn by new datagrams).
    :param timeout: the first wait (see :class:`RetryPolicy`).
    :param policy: the whole retry policy (overrides ``timeout`` and ``fec_copies``).
    :param fec_copies: copies of every datagram sent back to back (1-3).
    :param monotonic: the clock of the waits (injectable for tests).
    :raise ValueError: no address, or an address that does not resolve.
    """

    def __init__(
        self,
        server_addrs: Sequence[Address],
        timeout: float = 2.0,
        *,
        policy: RetryPolicy | None = None,
        fec_copies: int = 1,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not server_addrs:
            raise ValueError("no gateway address")
        self.policy = policy or RetryPolicy(timeout=timeout, fec_copies=fec_copies)
        self._monotonic = monotonic
        self._targets: list[tuple[int, Any]] = []
        for host, port in server_addrs:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except (socket.gaierror, UnicodeError) as e:
                raise ValueError(f"cannot resolve {host}: {e}") from None
            family, _, _, _, sockaddr = infos[0]
            self._targets.append((family, sockaddr))
        self._sockets: dict[int, socket.socket] = {}
        #: The number of the address the next exchange starts at: the last that answered.
        self.address = 0

    def __enter__(self) -> BlockingTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets."""
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sockets[family] = sock
        return sock

    def run(self, exchange: Exchange) -> ExchangeOutcome:
        """
        Run ``exchange`` to its end, blocking.

        :raise m2mgw.client.state.StateFileError: saving the state failed
            (nothing depending on it was sent).
        """
        started = self._monotonic()
        step: Step | None = exchange.start(self.policy, len(self._targets), self.address)
        while isinstance(step, Send):
            family, sockaddr = self._targets[step.address]
            sock = self._socket(family)
            for datagram in step.datagrams:
                with suppress(OSError):  # lost, as far as the policy is concerned
                    sock.sendto(datagram, sockaddr)
            deadline = self._monotonic() + step.timeout
            step = None
            while step is None:
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    step = exchange.timed_out()
                    break
                step = self._receive(exchange, remaining)
        assert isinstance(step, Finished)
        if step.outcome.address is not None:
            self.address = step.outcome.address
        return replace(step.outcome, elapsed=self._monotonic() - started)

    def _receive(self, exchange: Exchange, remaining: float) -> Step | None:
        """Wait up to ``remaining`` seconds for one datagram and hand it over."""
        readable, _, _ = select.select(list(self._sockets.values()), [], [], remaining)
        if not readable:
            return None
        sock = readable[0]
        sock.setblocking(False)
        try:
            datagram, _ = sock.recvfrom(_RECEIVE_BUFFER)
        except (TimeoutError, BlockingIOError):
            return None
        except OSError:
            return None  # e.g. an ICMP error reported on the socket
        if len(datagram) > MAX_RECEIVED_DATAGRAM:
            return None
        return exchange.datagram_received(datagram)


class TwistedTransport(DatagramProtocol):
    """
    Runs exchanges on a reactor: listen with it (``reactor.listenUDP(0, transport)``),
    then :meth:`run` one exchange at a time.

    :param clock: the reactor's time (``task.Clock`` in tests).
    :param server_addrs: the gateway's addresses, as IP literals.
    :param timeout: the first wait (see :class:`RetryPolicy`).
    :param policy: the whole retry policy (overrides ``timeout`` and ``fec_copies``).
    """

    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        server_addrs: Sequence[Address],
        timeout: float = 2.0,
        *,
        policy: RetryPolicy | None = None,
        fec_copies: int = 1,
    ) -> None:
        if not server_addrs:
            raise ValueError("no gateway address")
        self.clock = clock
        self.server_addrs = list(server_addrs)
        self.policy = policy or RetryPolicy(timeout=timeout, fec_copies=fec_copies)
        self._exchange: Exchange | None = None
        self._done: Deferred[ExchangeOutcome] | None = None
        self._timer: IDelayedCall | None = None
        self._started = 0.0
        #: The number of the address the next exchange starts at: the last that answered.
        self.address = 0

    def run(self, exchange: Exchange) -> Deferred[ExchangeOutcome]:
        """
        Run ``exchange``; the Deferred fires with its outcome (never fails
        for the network's sake: no answer is an outcome).

        :raise RuntimeError: another exchange is running, or not listening.
        """
        if self._exchange is not None:
            raise RuntimeError("one exchange at a time")
        if self.transport is None:
            raise RuntimeError("the transport is not listening")
        done: Deferred[ExchangeOutcome] = Deferred(lambda _: self._cancel())
        self._exchange, self._done = exchange, done
        self._started = self.clock.seconds()
        try:
            step = exchange.start(self.policy, len(self.server_addrs), self.address)
        except BaseException:
            self._exchange = self._done = None
            raise
        self._apply(step)
        return done

    def _apply(self, step: Step | None) -> None:
        if step is None:
            return  # not an answer: keep waiting for the same deadline
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if isinstance(step, Finished):
            done = self._done
            self._exchange = self._done = None
            outcome = replace(step.outcome, elapsed=self.clock.seconds() - self._started)
            if outcome.address is not None:
                self.address = outcome.address
            if done is not None:
                done.callback(outcome)
            return
        assert self.transport is not None
        address = self.server_addrs[step.address]
        # The wait first: an answer may come back before write() returns (a
        # test double) and must find the timer to cancel.
        self._timer = self.clock.callLater(step.timeout, self._timed_out)
        for datagram in step.datagrams:
            with suppress(OSError):  # lost, as far as the policy is concerned
                self.transport.write(datagram, address)

    def _timed_out(self) -> None:
        self._timer = None
        if self._exchange is not None:
            self._step(self._exchange.timed_out)

    def _step(self, advance: Callable[[], Step | None]) -> None:
        try:
            step = advance()
        except BaseException:
            self._fail()
            return
        self._apply(step)

    def _fail(self) -> None:
        failure = Failure()
        done = self._done
        self._exchange = self._done = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if done is not None:
            done.errback(failure)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._exchange = self._done = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Hand a datagram to the running exchange (ignored when none runs)."""
        exchange = self._exchange
        if exchange is None or len(datagram) > MAX_RECEIVED_DATAGRAM:
            return
        self._step(lambda: exchange.datagram_received(datagram))

    def stopProtocol(self) -> None:
        """The port closed: a running exchange ends without an answer."""
        exchange = self._exchange
        if exchange is not None:
            self._apply(exchange.abandon("transport stopped"))
