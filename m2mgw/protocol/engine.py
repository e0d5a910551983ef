"""
The module controller: MGP/1 on the gateway side.

:class:`ModuleController` takes one received datagram and its source address
and returns the reply bytes, or ``None`` for silence.  It owns no socket: the
UDP listener (:mod:`m2mgw.modules.udp`) feeds it and sends what it returns.
Everything durable goes through the :class:`~m2mgw.interfaces.IModuleStore`,
in one transaction per accepted message (:class:`~m2mgw.records.HelloCommit`,
:class:`~m2mgw.records.DataCommit`), committed before the reply is returned,
so any gateway node sharing the store can answer the module's next datagram.

Node-local state is limited to what cannot let a replay or a double
execution through: the retransmission cache (replies to byte-identical
requests), a cache of session keys (the store still decides, per DATA,
whether the session is live and the counter fresh), and a cache of SDH
``Z_ss`` values (the key's status is read from the store on every HELLO).

The order of checks is MGP/1 §5 (HELLO) and §8 (DATA); every failure is a
silent drop counted in :class:`~m2mgw.protocol.drops.DropCounters`.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from m2mgw.config import ProtocolPolicy, RotationConfig, RotationPolicy
from m2mgw.crypto.randomness import system_random
from m2mgw.errors import (
    BadKey,
    BadPoint,
    BadSignature,
    BadTag,
    CryptoError,
    DecodeError,
    StoreError,
)
from m2mgw.interfaces import ICipherSuite, IModuleStore, RandomSource
from m2mgw.keys.params import (
    ParameterSet,
    complete_sets,
    default_set,
    keygen_instruction,
    rsa_modulus_bits,
)
from m2mgw.protocol import cbor, keyschedule
from m2mgw.protocol.bodies import (
    KIND_KEYGEN,
    KIND_REHELLO,
    KIND_SKEY,
    MISSING,
    REQ_PARAMS,
    REQ_TIME,
    AuthMethod,
    ErrorCode,
    ErrorEntry,
    InstructionItem,
    InvalidKeyReg,
    KeyReg,
    KeyRegResult,
    KeyRegStatus,
    Params,
    Payload,
    ReplyBody,
    ReplyFrame,
    build_hello_reply_plaintext,
    ins_budget,
    instruction_wire_size,
    parse_data_body,
    parse_hello_plaintext,
    parse_params,
)
from m2mgw.protocol.drops import DropCounters, DropReason
from m2mgw.protocol.messages import (
    MAX_RECEIVED_DATAGRAM,
    Data,
    DataReply,
    Hello,
    HelloReply,
    MalformedMessage,
    parse_request,
)
from m2mgw.protocol.retransmit import ReplyCache
from m2mgw.protocol.senml import report_json
from m2mgw.records import (
    PENDING_INSTRUCTION_STATES,
    VOUCHED_BY_PSK,
    Confirmation,
    DataCommit,
    Delivery,
    ExchangeResult,
    HelloCommit,
    Instruction,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    NewEvent,
    NewInstruction,
    PayloadEffects,
    Report,
    Session,
)

__all__ = ["ModuleController", "ServerKeyPair"]

Address = tuple[str, int]

#: Payload key of a keyreg, for ``res`` (MGP/1 §8.2).
_RES_KEYREG = 12
#: Transitory alias size (MGP/1 §7: 8-16; the vectors use 12).
_ALIAS_BYTES = 12
#: ``stok`` size (MGP/1 §5).
_STOK_BYTES = 16
#: How many sid draws before giving up on a (vanishingly unlikely) collision.
_SID_TRIES = 4
#: Distinct reply shapes whose instruction budget is remembered (a handful in practice).
_BUDGET_MEMORY = 1024


class ServerKeyPair(Protocol):
    """A loaded module-side server key pair (see :class:`m2mgw.datadir.LoadedServerKey`)."""

    @property
    def skid(self) -> int: ...

    @property
    def suite(self) -> str: ...

    @property
    def key(self) -> Any: ...

    @property
    def public(self) -> bytes: ...

    @property
    def sig_public(self) -> bytes | None: ...


class _Drop(Exception):
    """Internal: stop processing this datagram silently, counted under ``reason``."""

    def __init__(self, reason: DropReason, claimed_id: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.claimed_id = claimed_id


class _LRU(OrderedDict[Any, Any]):
    """A small bounded mapping: least recently used entries go first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def get_fresh(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self._size:
            self.popitem(last=False)


@dataclass
class _PayloadOutcome:
    """What processing a Payload decided, before the store applies it."""

    effects: PayloadEffects = field(default_factory=PayloadEffects)
    err: list[ErrorEntry] = field(default_factory=list)
    res: dict[int, Any] = field(default_factory=dict)
    want_time: bool = False
    #: The kid of a keygen's Params created for a ``req "params"``, if any.
    keygen_requested: bool = False

    def encode_outcome(self) -> bytes:
        """The ``[err, res]`` remembered with a DATA's ``tok`` (MGP/1 §8.4)."""
        if not self.err and not self.res:
            return _EMPTY_OUTCOME
        return cbor.encode([[list(e) for e in self.err], self.res])


#: ``CBOR [[], {}]``: the outcome of a DATA without ``err`` or ``res``.
_EMPTY_OUTCOME = cbor.encode([[], {}])


class _SuiteAead:
    """A session key and its suite's ``seal``/``open``, for a suite without ``keyed_aead``."""

    def __init__(self, suite: ICipherSuite, key: bytes) -> None:
        self._suite = suite
        self._key = key

    def seal(self, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        return bytes(self._suite.seal(self._key, nonce, aad, plaintext))

    def open(self, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        return bytes(self._suite.open(self._key, nonce, aad, ciphertext))


class _SuiteVerifier:
    """A module key and its suite's ``verify``, for a suite without ``verifier``."""

    __slots__ = ("_public", "_suite")

    def __init__(self, suite: ICipherSuite, public: bytes) -> None:
        self._suite = suite
        self._public = public

    def verify(self, signature: bytes, data: bytes) -> None:
        self._suite.verify(self._public, signature, data)


class _CachedSession:
    """
    A session in the engine's cache, with its AEADs keyed once (on first
    use): ``cryptography`` sets a key up on every call otherwise.
    """

    __slots__ = ("_aeads", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self._aeads: tuple[Any, Any] | None = None

    def aeads(self, suite: ICipherSuite) -> tuple[Any, Any]:
        """``(up, down)``: the AEADs with ``k_up`` and ``k_down`` (``seal``, ``open``)."""
        aeads = self._aeads
        if aeads is None:
            session = self.session
            keyed = getattr(suite, "keyed_aead", None)
            if keyed is not None:
                aeads = (keyed(session.k_up), keyed(session.k_down))
            else:
                aeads = (_SuiteAead(suite, session.k_up), _SuiteAead(suite, session.k_down))
            self._aeads = aeads
        return aeads


def _resume(
    coroutine: Coroutine[Any, Any, bytes | None], waiting: Any
) -> Generator[Any, Any, bytes | None]:
    """
    Hand a coroutine that has already run up to its first real wait (on
    ``waiting``) to Twisted: what it is sent or thrown goes on to the coroutine.
    """
    while True:
        try:
            value = yield waiting
        except BaseException as e:
            try:
                waiting = coroutine.throw(e)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                waiting = coroutine.send(value)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


def _decode_outcome(data: bytes) -> tuple[list[ErrorEntry], dict[int, Any]]:
    value = cbor.decode(data) if data else [[], {}]
    err = [ErrorEntry(int(code), str(text)) for code, text in value[0]]
    return err, dict(value[1])


@dataclass(frozen=True)
class _Credential:
    """
    How the module authenticated the HELLO of a session (for keyreg proofs).

    :ivar grace_until: the key had expired and was accepted in its grace
        period, which ends then (see :meth:`ModuleController._authenticate`).
    """

    kid: int
    key: ModuleKey | None
    grace_until: int | None = None


class ModuleController:
    """
    MGP/1 on the gateway side.

    :param store: the module database.
    :param suites: the enabled cipher suites by name.
    :param server_keys: the accepted server key pairs.
    :param policy: the ``[protocol]`` policy.
    :param now: returns the current time in seconds (the reactor's ``seconds``).
    :param random: the randomness source (``sid``, ``stok``, aliases, seeds, RSA-PSS salts).
    :param max_datagram: the largest reply the gateway sends.
    :param params: the parameter sets by name (``[params.NAME]``); every
        suite without one gets its built-in set.
    :param rotation: the rotation policy (grace periods, the set a
        ``req "params"`` gets, ``rehello`` after a solicited keyreg).
    :param instruction_poll: the polling variant
        (:meth:`m2mgw.apps.polling.InstructionPoll.wait_for_instruction`):
        awaited with the module's identity before the reply to an accepted
        message claims its instructions; it must not fail.
    :param verifier_cache_size: how many module public keys are kept loaded
        (point decoded and validated: about 8 µs and 2 KiB each for P-256),
        most recently used first, for the SIG HELLOs of modules seen lately.
    """

    log = Logger()

    def __init__(
        self,
        store: IModuleStore,
        suites: Mapping[str, ICipherSuite],
        server_keys: Iterable[ServerKeyPair],
        policy: ProtocolPolicy,
        now: Callable[[], float],
        random: RandomSource = system_random,
        max_datagram: int = 1232,
        session_cache_size: int = 100_000,
        zss_cache_size: int = 100_000,
        verifier_cache_size: int = 1_000,
        params: Mapping[str, ParameterSet] | None = None,
        rotation: RotationConfig | None = None,
        instruction_poll: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self._store = store
        self._instruction_poll = instruction_poll
        self._suites = dict(suites)
        self._params = complete_sets(params or {}, self._suites, policy.key_ttl)
        self._rotation = rotation if rotation is not None else RotationConfig()
        self._server_keys: dict[int, ServerKeyPair] = {}
        self._retired_server_keys: dict[int, ServerKeyPair] = {}
        self.set_server_keys(server_keys)
        self._policy = policy
        self._now = now
        self._random = random
        self._max_datagram = max_datagram
        self.replies = ReplyCache(now, ttl=policy.retransmit_seconds)
        self.drops = DropCounters()
        #: Datagrams answered, by message type.
        self.answered: dict[str, int] = {"hello": 0, "data": 0, "retransmission": 0}
        #: Confirmations ignored because their instruction was not ``sent``.
        self.ignored_confirmations = 0
        self._inflight: dict[bytes, list[Deferred[bytes | None]]] = {}
        self._sessions = _LRU(session_cache_size)
        self._zss = _LRU(zss_cache_size)
        self._verifiers = _LRU(verifier_cache_size)
        #: :func:`ins_budget` by what it depends on (sizes, not values); see :meth:`_ins_budget`.
        self._budgets: dict[tuple[Any, ...], int] = {}

    # -- configuration ---------------------------------------------------------------

    def set_server_keys(
        self, server_keys: Iterable[ServerKeyPair], retired: Iterable[ServerKeyPair] = ()
    ) -> None:
        """
        Replace the server key pairs (server key rollover,
        :mod:`m2mgw.keys.server_rollover`).

        :param server_keys: the pairs a HELLO may name (``active`` and ``retiring``).
        :param retired: pairs no HELLO may name any more; the sessions they
            opened before run on, and they still sign the ``skey``
            instructions carried in those sessions' replies.
        """
        accepted = {pair.skid: pair for pair in server_keys}
        self._server_keys = accepted
        self._retired_server_keys = {p.skid: p for p in retired if p.skid not in accepted}

    # -- entry point -----------------------------------------------------------------

    def handle(self, data: bytes, addr: Address) -> Deferred[bytes | None]:
        """
        Process one datagram from ``addr``.

        :return: a Deferred firing with the reply bytes, or ``None`` for
            silence; it never fails (unexpected errors are logged, counted
            under ``internal`` and answered with silence).
        """
        if len(data) > MAX_RECEIVED_DATAGRAM:
            self.drops.drop(DropReason.SIZE, addr[0])
            return succeed(None)
        cached = self.replies.get(data)
        if cached is not None:
            self.answered["retransmission"] += 1
            return succeed(cached)
        waiters = self._inflight.get(data)
        if waiters is not None:
            # A copy of a datagram still being processed (forward error
            # correction): it gets the same answer, processed once.
            waiter: Deferred[bytes | None] = Deferred()
            waiters.append(waiter)
            return waiter
        self._inflight[data] = []
        # Run the coroutine at once: with a store whose Deferreds have already
        # fired (memory), or a datagram decided without the store, it
        # finishes here, without Twisted's coroutine machinery.
        coroutine = self._process(data, addr)
        try:
            waiting = coroutine.send(None)
        except StopIteration as done:
            return succeed(self._finish(done.value, data))
        except Exception:
            self._internal_error(Failure(), addr)
            return succeed(self._finish(None, data))
        result = Deferred.fromCoroutine(_resume(coroutine, waiting))
        result.addErrback(self._internal_error, addr)
        result.addBoth(self._finish, data)
        return result

    def _finish(self, reply: bytes | None, data: bytes) -> bytes | None:
        waiters = self._inflight.pop(data, [])
        if reply is not None:
            self.replies.put(data, reply)
        for waiter in waiters:
            waiter.callback(reply)
        return reply

    def _internal_error(self, failure: Failure, addr: Address) -> None:
        self.log.failure("processing a datagram from {host} failed", failure, host=addr[0])
        self.drops.drop(DropReason.INTERNAL, addr[0])
        return None

    async def _process(self, data: bytes, addr: Address) -> bytes | None:
        try:
            try:
                message = parse_request(data)
            except MalformedMessage as e:
                raise _Drop(DropReason.MALFORMED, e.claimed_id) from None
            if isinstance(message, Hello):
                reply = await self._hello(message)
                self.answered["hello"] += 1
            else:
                reply = await self._data(message)
                self.answered["data"] += 1
            return reply
        except _Drop as drop:
            self.drops.drop(drop.reason, addr[0], drop.claimed_id)
            self.log.debug(
                "dropped a datagram from {host}: {reason}",
                host=addr[0],
                reason=drop.reason.value,
                claimed_id=drop.claimed_id,
            )
            return None

    # -- HELLO (MGP/1 §5, §6) --------------------------------------------------------

    async def _hello(self, hello: Hello) -> bytes:
        suite = self._suites.get(hello.suite)
        if suite is None:
            raise _Drop(DropReason.UNKNOWN_SUITE)
        server = self._server_keys.get(hello.skid)
        if server is None or server.suite != suite.name:
            raise _Drop(DropReason.UNKNOWN_SKID)
        try:
            z_es = suite.agree(server.key, hello.epk)
        except (BadPoint, CryptoError):
            raise _Drop(DropReason.BAD_POINT) from None
        keys = keyschedule.hello_keys(suite, z_es)
        zero = keyschedule.zero_nonce(suite)
        hello_aad = hello.aad
        try:
            plaintext = suite.open(keys.k_hello, zero, hello_aad, hello.ct)
        except BadTag:
            raise _Drop(DropReason.BAD_TAG) from None
        try:
            parsed = parse_hello_plaintext(plaintext)
        except MalformedMessage as e:
            raise _Drop(DropReason.BAD_PLAINTEXT, e.claimed_id) from None
        body = parsed.body
        module_id = body.id
        module = await self._store.get_module(module_id)
        if module is None:
            raise _Drop(DropReason.UNKNOWN_MODULE, module_id)
        if module.status == ModuleStatus.DISABLED:
            raise _Drop(DropReason.DISABLED_MODULE, module_id)
        now = int(self._now())
        tbs = keyschedule.hello_auth_tbs(hello_aad, parsed.body_bytes)
        credential = await self._authenticate(
            suite, server, module, parsed.method, body.kid, parsed.value, hello.epk, tbs, now
        )

        policy = self._policy
        lifetime = policy.session_lifetime
        if credential.grace_until is not None:
            # A grace session ends with the grace period (MGP/1 §9: policy).
            lifetime = min(lifetime, credential.grace_until - now)
        stok_sid_alias = self._draw_session_randomness()
        sid, stok, alias = stok_sid_alias
        session_keys = keyschedule.session_keys(suite, z_es, stok, sid, module_id, body.kid)
        session = Session(
            sid=sid,
            module_id=module_id,
            kid=body.kid,
            suite=suite.name,
            skid=server.skid,
            k_up=session_keys.k_up,
            k_down=session_keys.k_down,
            created_at=now,
            expires_at=now + lifetime,
        )
        if body.pl is None:  # the usual HELLO: nothing to apply
            outcome = _PayloadOutcome()
        else:
            outcome = await self._payload(body.pl, module, session, credential, body.ts, now)
        if credential.grace_until is not None and not outcome.keygen_requested:
            # The point of the grace session: the module's successor key.
            keygen = await self._keygen_instruction(module, session, now, if_none=True)
            if keygen is not None:
                outcome.effects = replace(
                    outcome.effects,
                    new_instructions=(*outcome.effects.new_instructions, keygen),
                )
        base = ReplyBody.hello_base(
            ack=body.tok,
            stok=stok,
            exp=lifetime,
            time=now,
            alias=alias,
            err=tuple(outcome.err),
            res=outcome.res,
        )
        sig_len = self._signature_len(suite, server) if policy.sign_replies else None
        frame = ReplyFrame.hello_reply(sid, tag_len=suite.tag_len, sig_len=sig_len)
        base_bytes = base.encode()
        delivery = self._delivery(module, base, frame, len(base_bytes))
        if delivery.budget > 0 and self._instruction_poll is not None:
            await self._poll_applications(module_id)
        commit = HelloCommit(
            session=session,
            ts=body.ts,
            now=now,
            effects=outcome.effects,
            alias=alias,
            alias_expires_at=None if alias is None else now + policy.alias_lifetime,
            delivery=delivery,
            expired_key_grace=credential.grace_until is not None,
        )
        try:
            result = await self._store.accept_hello(commit)
        except StoreError:
            # A sid held by another live session: a 48-bit collision.  The
            # module retries; its next HELLO draws anew.
            self.log.warn("sid collision for module {module_id}", module_id=module_id)
            raise _Drop(DropReason.INTERNAL, module_id) from None
        if result is None:
            raise _Drop(DropReason.STALE_TS, module_id)
        self._note_result(result)
        self._sessions.put(sid, _CachedSession(session))
        body_bytes = self._reply_body_bytes(base, base_bytes, result, server, suite)
        reply_aad = HelloReply.aad_for(sid)
        sig = None
        if policy.sign_replies:
            tbs_reply = keyschedule.reply_tbs(hello_aad, reply_aad, body_bytes)
            sig = suite.sign(server.key, tbs_reply, self._random)
        plaintext_reply = build_hello_reply_plaintext(body_bytes, sig)
        ct = suite.seal(keys.k_hreply, zero, reply_aad, plaintext_reply)
        return HelloReply(sid, ct).encode()

    def _draw_session_randomness(self) -> tuple[bytes, bytes, bytes | None]:
        """``sid``, ``stok`` and the alias, drawn in the order the vectors list them."""
        sid = self._random(self._policy.sid_bytes)
        stok = self._random(_STOK_BYTES)
        alias = self._random(_ALIAS_BYTES) if self._policy.aliases else None
        return sid, stok, alias

    @staticmethod
    def _signature_len(suite: ICipherSuite, server: ServerKeyPair) -> int:
        size = getattr(server.key, "key_size", None)
        if isinstance(size, int) and suite.curve is None:
            return (size + 7) // 8
        return int(suite.signature_len)

    async def _authenticate(
        self,
        suite: ICipherSuite,
        server: ServerKeyPair,
        module: Module,
        method: AuthMethod,
        kid: int,
        value: bytes,
        epk: bytes,
        tbs: bytes,
        now: int,
    ) -> _Credential:
        """Select the credential and verify ``auth`` (MGP/1 §5); raise :class:`_Drop`."""
        module_id = module.module_id
        if method == AuthMethod.PSK:
            if module.psk is None:
                raise _Drop(DropReason.PSK_REFUSED, module_id)
            if self._policy.psk_single_use and not module.psk_reusable:
                keys = await self._store.list_keys(module_id)
                if any(key.status == KeyStatus.ACTIVE for key in keys):
                    raise _Drop(DropReason.PSK_REFUSED, module_id)
            expected = keyschedule.psk_mac(module.psk, epk, tbs)
            if not hmac.compare_digest(expected, value):
                raise _Drop(DropReason.BAD_PSK_MAC, module_id)
            return _Credential(VOUCHED_BY_PSK, None)
        key = await self._store.get_key(module_id, kid)
        if key is None:
            raise _Drop(DropReason.UNKNOWN_KID, module_id)
        if key.suite != suite.name:
            raise _Drop(DropReason.BAD_KID, module_id)
        if key.status not in (KeyStatus.ACTIVE, KeyStatus.PENDING, KeyStatus.EXPIRED):
            raise _Drop(DropReason.RETIRED_KID, module_id)
        grace_until = None
        if key.status == KeyStatus.EXPIRED or (key.not_after is not None and key.not_after <= now):
            grace_until = await self._grace_until(module, key, now)
            if grace_until is None:
                raise _Drop(DropReason.EXPIRED_KID, module_id)
        if method == AuthMethod.SIG:
            try:
                self._verifier(suite, module_id, kid, key.public).verify(value, tbs)
            except (BadSignature, BadKey):
                raise _Drop(DropReason.BAD_SIGNATURE, module_id) from None
        else:  # SDH
            if not suite.supports_sdh:
                raise _Drop(DropReason.BAD_SIGNATURE, module_id)
            cache_key = (module_id, kid, server.skid, key.public)
            z_ss = self._zss.get_fresh(cache_key)
            if z_ss is None:
                try:
                    z_ss = suite.static_agree(server.key, key.public)
                except CryptoError:
                    raise _Drop(DropReason.BAD_SIGNATURE, module_id) from None
                self._zss.put(cache_key, z_ss)
            expected = keyschedule.sdh_mac(suite, z_ss, epk, tbs)
            if not hmac.compare_digest(expected, value):
                raise _Drop(DropReason.BAD_SIGNATURE, module_id)
        return _Credential(kid, key, grace_until)

    def _verifier(self, suite: ICipherSuite, module_id: str, kid: int, public: bytes) -> Any:
        """
        The module key ``public`` loaded once (point decoded and validated),
        remembered per ``(module, kid, suite, public key bytes)``: a changed
        key is a new entry.  The key's status is still read from the store
        on every HELLO.

        :raise m2mgw.errors.BadKey: ``public`` is not a valid key of ``suite``.
        """
        cache_key = (module_id, kid, suite.name, public)
        verifier = self._verifiers.get_fresh(cache_key)
        if verifier is None:
            load = getattr(suite, "verifier", None)
            verifier = load(public) if load is not None else _SuiteVerifier(suite, public)
            self._verifiers.put(cache_key, verifier)
        return verifier

    def _rotation_policy(self, module: Module) -> RotationPolicy:
        return self._rotation.for_group(module.group)

    async def _grace_until(self, module: Module, key: ModuleKey, now: int) -> int | None:
        """
        The end of an expired key's grace period, or ``None`` if it has none now.

        The rule (policy ``grace``, per module group, default 0 = none): the
        module's *last active* key -- one that was activated, is ``active``
        or ``expired`` (never retired or revoked), and has no newer key
        ``active`` or ``pending`` -- may open sessions for ``grace`` seconds
        after its ``not_after``, to vouch for one successor.  Such a session
        ends with the grace period, and its HELLO_REPLY carries a ``keygen``
        if none is outstanding.  Once the successor is registered the old
        key has a newer pending key and its grace is over.
        """
        grace = self._rotation_policy(module).grace
        if grace <= 0 or key.not_after is None or key.activated_at is None:
            return None
        if key.status not in (KeyStatus.ACTIVE, KeyStatus.EXPIRED):
            return None
        end = key.not_after + grace
        if now >= end:
            return None
        keys = await self._store.list_keys(module.module_id)
        newer = (KeyStatus.ACTIVE, KeyStatus.PENDING)
        if any(other.kid > key.kid and other.status in newer for other in keys):
            return None
        return end

    # -- DATA (MGP/1 §8) -------------------------------------------------------------

    async def _data(self, data: Data) -> bytes:
        now = int(self._now())
        cached = self._sessions.get_fresh(data.sid)
        if cached is None:
            stored = await self._store.get_session(data.sid)
            if stored is None:
                raise _Drop(DropReason.UNKNOWN_SID)
            cached = _CachedSession(stored)
            self._sessions.put(data.sid, cached)
        session = cached.session
        if session.expires_at <= now:
            raise _Drop(DropReason.EXPIRED_SID, session.module_id)
        suite = self._suites.get(session.suite)
        if suite is None:
            raise _Drop(DropReason.UNKNOWN_SUITE, session.module_id)
        up, down = cached.aeads(suite)
        nonce = keyschedule.nonce_for_ctr(suite, data.ctr)
        try:
            plaintext = up.open(nonce, data.aad, data.ct)
        except BadTag:
            raise _Drop(DropReason.BAD_TAG) from None
        window = self._policy.replay_window
        try:
            body = parse_data_body(plaintext)
        except MalformedMessage:
            # §8: a malformed DataBody is dropped, but its ctr counts as accepted.
            await self._store.accept_data(
                DataCommit(sid=data.sid, ctr=data.ctr, window_size=window, tok=b"", now=now)
            )
            raise _Drop(DropReason.MALFORMED_BODY, session.module_id) from None

        module: Module | None = None
        credential = _Credential(session.kid, None)
        if body.pl is not None and (body.pl.keyreg is not None or REQ_PARAMS in body.pl.req):
            module = await self._store.get_module(session.module_id)
            if module is None:
                raise _Drop(DropReason.UNKNOWN_MODULE, session.module_id)
            if session.kid != VOUCHED_BY_PSK:
                credential = _Credential(
                    session.kid, await self._store.get_key(session.module_id, session.kid)
                )
        outcome = await self._payload(body.pl, module, session, credential, body.ts, now)
        want_time = outcome.want_time or self._policy.time_in_data_reply
        if outcome.err or outcome.res:
            base = ReplyBody(
                ack=body.tok,
                time=now if want_time else None,
                err=tuple(outcome.err),
                res=outcome.res,
            )
        else:  # the usual reply: the tok parse_data_body checked, and the time
            base = ReplyBody.ack_only(body.tok, now if want_time else None)
        frame = ReplyFrame.data_reply(data.sid, data.ctr, tag_len=suite.tag_len)
        base_bytes = base.encode()
        await self._poll_applications(session.module_id)
        commit = DataCommit(
            sid=data.sid,
            ctr=data.ctr,
            window_size=window,
            tok=body.tok,
            now=now,
            effects=outcome.effects,
            outcome=outcome.encode_outcome(),
            delivery=self._delivery(module, base, frame, len(base_bytes)),
        )
        result = await self._store.accept_data(commit)
        if result is None:
            self._sessions.pop(data.sid, None)
            raise _Drop(DropReason.REPLAY, session.module_id)
        self._note_result(result)
        if result.duplicate_outcome is not None:
            err, res = _decode_outcome(result.duplicate_outcome)
            base = replace(base, err=tuple(err), res=res)
            base_bytes = base.encode()
        server = self._server_keys.get(session.skid) or self._retired_server_keys.get(session.skid)
        body_bytes = self._reply_body_bytes(base, base_bytes, result, server, suite)
        if frame.datagram_size(len(body_bytes)) > self._max_datagram:
            # Only possible when a remembered outcome is larger than the new
            # one; the instructions stay sent and ride in the next reply.
            body_bytes = replace(base, ins=(), more=True).encode()
        ct = down.seal(nonce, DataReply.aad_for(data.sid, data.ctr), body_bytes)
        return DataReply(data.sid, data.ctr, ct).encode()

    # -- replies ------------------------------------------------------------------------

    async def _poll_applications(self, module_id: str) -> None:
        """
        The polling variant (``[modules] poll_apps_ms``): give the module's
        applications a chance to queue an instruction for this very reply.
        """
        if self._instruction_poll is not None:
            await self._instruction_poll(module_id)

    def _delivery(
        self, module: Module | None, base: ReplyBody, frame: ReplyFrame, base_size: int
    ) -> Delivery:
        """
        How many bytes of instructions the reply to ``base`` (``base_size``
        bytes) can carry.  (A module waiting for approval claims none: the
        store decides that, in the transaction that knows its status.)
        """
        return Delivery(
            budget=self._ins_budget(base, frame, base_size),
            max_attempts=self._policy.max_attempts,
        )

    def _ins_budget(self, base: ReplyBody, frame: ReplyFrame, base_size: int) -> int:
        """
        :func:`ins_budget`, remembered by all it depends on: the size of
        ``base`` (without instructions) and its number of map keys, and the
        sizes in ``frame`` -- not their values, so a few entries serve every reply.
        """
        fields = 1 + bool(base.err) + bool(base.res)
        fields += sum(value is not None for value in (base.stok, base.exp, base.time, base.alias))
        ctr_size = None if frame.ctr is None else len(cbor.head(0, frame.ctr))
        key = (base_size, fields, len(frame.sid), ctr_size, frame.sig_len, frame.tag_len)
        budget = self._budgets.get(key)
        if budget is None:
            budget = ins_budget(base, frame, self._max_datagram)
            if len(self._budgets) >= _BUDGET_MEMORY:
                self._budgets.clear()
            self._budgets[key] = budget
        return budget

    def _note_result(self, result: ExchangeResult) -> None:
        self.ignored_confirmations += result.ignored_confirmations

    def _reply_body_bytes(
        self,
        base: ReplyBody,
        base_bytes: bytes,
        result: ExchangeResult,
        server: ServerKeyPair | None,
        suite: ICipherSuite,
    ) -> bytes:
        """The reply body: ``base`` (encoded: ``base_bytes``) with the instructions claimed."""
        if not result.instructions and not result.more:
            return base_bytes
        return self._with_instructions(base, result, server, suite).encode()

    def _with_instructions(
        self,
        base: ReplyBody,
        result: ExchangeResult,
        server: ServerKeyPair | None,
        suite: ICipherSuite,
    ) -> ReplyBody:
        items = tuple(self._instruction_item(i, server, suite) for i in result.instructions)
        return replace(base, ins=items, more=result.more)

    def _instruction_item(
        self, instruction: Instruction, server: ServerKeyPair | None, suite: ICipherSuite
    ) -> InstructionItem:
        body = cbor.decode(instruction.body)
        if instruction.kind == KIND_SKEY and isinstance(body, dict) and server is not None:
            # §8.2: signed when the reply is built, by the session's server key.
            tbs = keyschedule.skey_tbs(body[1], body[2], body[3], body.get(4))
            body = {**body, 5: suite.sign(server.key, tbs, self._random)}
        return InstructionItem(instruction.iid, instruction.kind, body, instruction.not_after)

    # -- payloads (MGP/1 §8.1, §9) -----------------------------------------------------

    async def _payload(
        self,
        payload: Payload | None,
        module: Module | None,
        session: Session,
        credential: _Credential,
        module_ts: int | None,
        now: int,
    ) -> _PayloadOutcome:
        outcome = _PayloadOutcome()
        if payload is None:
            return outcome
        module_id = session.module_id
        report: Report | None = None
        events: list[NewEvent] = []
        new_key: ModuleKey | None = None
        new_instructions: list[NewInstruction] = []
        for error in payload.errors:
            outcome.err.append(ErrorEntry(ErrorCode.MALFORMED_ITEM, error.text))
        if payload.data is not MISSING:
            report = Report(module_id, now, cbor.encode(payload.data), module_ts)
            fmt, rendered = report_json(payload.data)
            events.append(
                NewEvent(
                    "report",
                    module_id,
                    {
                        "module": module_id,
                        "received_at": now,
                        "module_ts": module_ts,
                        "format": fmt,
                        "data": rendered,
                    },
                )
            )
        confirmations = tuple(
            Confirmation(
                entry.iid,
                entry.status,
                entry.ts,
                None if entry.result is MISSING else cbor.encode(entry.result),
            )
            for entry in payload.conf
        )
        if payload.note is not None:
            note = payload.note
            events.append(
                NewEvent(
                    "alert",
                    module_id,
                    {
                        "origin": "module",
                        "module": module_id,
                        "level": note.level,
                        "code": note.code,
                        "text": note.text,
                        "received_at": now,
                    },
                )
            )
        for request in payload.req:
            if request == REQ_TIME:
                outcome.want_time = True
            elif request == REQ_PARAMS:
                keygen = await self._keygen_instruction(module, session, now, if_none=False)
                if keygen is None:
                    outcome.err.append(ErrorEntry(ErrorCode.NOT_PERMITTED, "no rotation now"))
                else:
                    new_instructions.append(keygen)
                    outcome.keygen_requested = True
            else:
                outcome.err.append(ErrorEntry(ErrorCode.UNKNOWN_REQUEST, f"unknown {request}"))
        if payload.keyreg is not None:
            result, new_key = await self._keyreg(payload.keyreg, module, session, credential, now)
            outcome.res[_RES_KEYREG] = result.to_cbor()
            if result.status != KeyRegStatus.ACCEPTED:
                events.append(_rejected_event(module_id, payload.keyreg, result))
            elif new_key is not None and new_key.pid != 0 and self._rotation.rehello:
                # A gateway-driven rotation: activate the new key at once.
                new_instructions.append(_rehello_instruction(module_id))
        outcome.effects = PayloadEffects(
            report=report,
            confirmations=confirmations,
            new_key=new_key,
            new_instructions=tuple(new_instructions),
            events=tuple(events),
        )
        return outcome

    def _params_for(self, module: Module, suite_name: str) -> ParameterSet | None:
        """The parameter set of a ``keygen`` for a ``suite_name`` key, by the module's policy."""
        for named in (
            self._rotation.retire_suites.get(suite_name, ""),
            self._rotation_policy(module).params,
        ):
            if named and named in self._params:
                return self._params[named]
        return default_set(self._params, suite_name)

    async def _keygen_instruction(
        self, module: Module | None, session: Session, now: int, *, if_none: bool
    ) -> NewInstruction | None:
        """
        A ``keygen`` for the module (``req "params"``, a grace session);
        ``None`` when policy allows no rotation now (the module is not
        enabled, no parameter set applies) or, with ``if_none``, when one is
        under way already.
        """
        if module is None or module.status != ModuleStatus.ENABLED:
            return None
        param_set = self._params_for(module, session.suite)
        if param_set is None:
            return None
        keys = await self._store.list_keys(module.module_id)
        if if_none and (
            any(key.status == KeyStatus.PENDING for key in keys)
            or await self._expected_keygen(module.module_id)
        ):
            return None
        next_kid = max((key.kid for key in keys), default=0) + 1
        return keygen_instruction(module.module_id, param_set, next_kid, self._random, "gateway")

    async def _expected_keygen(self, module_id: str) -> list[Params]:
        """The Params of the module's outstanding keygen instructions."""
        pending = await self._store.list_instructions(module_id, states=PENDING_INSTRUCTION_STATES)
        found = []
        for instruction in pending:
            if instruction.kind != KIND_KEYGEN:
                continue
            try:
                found.append(parse_params(cbor.decode(instruction.body)))
            except (DecodeError, ValueError):
                continue  # not Params (an operator's hand-made body): nothing to match
        return found

    async def _keyreg(
        self,
        keyreg: KeyReg | InvalidKeyReg,
        module: Module | None,
        session: Session,
        credential: _Credential,
        now: int,
    ) -> tuple[KeyRegResult, ModuleKey | None]:
        """Verify a key registration (MGP/1 §9); the result for ``res`` and the key to record."""

        def refuse(status: KeyRegStatus, reason: str) -> tuple[KeyRegResult, None]:
            return KeyRegResult(keyreg.kid, int(status), reason), None

        if isinstance(keyreg, InvalidKeyReg):
            return refuse(KeyRegStatus.NOT_ACCEPTABLE, keyreg.reason)
        if module is None:
            return refuse(KeyRegStatus.REFUSED, "module unavailable")
        module_id = module.module_id
        suite = self._suites.get(keyreg.suite)
        if suite is None:
            return refuse(KeyRegStatus.NOT_ACCEPTABLE, f"unknown suite {keyreg.suite}")
        keys = await self._store.list_keys(module_id)
        taken = {key.kid for key in keys}
        ttl = self._policy.key_ttl
        params: Params | None = None
        if keyreg.pid == 0:
            expected_kid = max((key.kid for key in keys), default=0) + 1
        else:
            match = [p for p in await self._expected_keygen(module_id) if p.pid == keyreg.pid]
            if not match:
                return refuse(KeyRegStatus.NOT_ACCEPTABLE, f"unknown pid {keyreg.pid}")
            params = next((p for p in match if p.kid == keyreg.kid), match[-1])
            if params.suite != keyreg.suite:
                return refuse(KeyRegStatus.NOT_ACCEPTABLE, "suite differs from the Params")
            if params.curve is not None and params.curve != suite.curve:
                return refuse(KeyRegStatus.NOT_ACCEPTABLE, "curve differs from the Params")
            expected_kid, ttl = params.kid, params.ttl
        try:
            suite.validate_public_key(keyreg.pub)
        except BadKey:
            return refuse(KeyRegStatus.NOT_ACCEPTABLE, "public key not acceptable")
        if params is not None and params.rsa_bits is not None:
            bits = rsa_modulus_bits(keyreg.pub)
            if bits != params.rsa_bits:
                return refuse(
                    KeyRegStatus.NOT_ACCEPTABLE,
                    f"RSA modulus size differs from the Params ({bits})",
                )
        if keyreg.kid != expected_kid or keyreg.kid in taken:
            return refuse(KeyRegStatus.WRONG_KID, f"expected kid {expected_kid}")
        tbs_k = keyschedule.keyreg_tbs(module_id, keyreg.kid, keyreg.pub, keyreg.suite, keyreg.pid)
        if credential.kid == VOUCHED_BY_PSK:
            if module.psk is None or (
                any(key.status == KeyStatus.ACTIVE for key in keys)
                and self._policy.psk_single_use
                and not module.psk_reusable
            ):
                return refuse(KeyRegStatus.REFUSED, "PSK proof refused once a key is active")
            expected = keyschedule.psk_keyreg_proof(module.psk, module_id, tbs_k)
            if not hmac.compare_digest(expected, keyreg.proof):
                return refuse(KeyRegStatus.BAD_PROOF, "bad proof")
        else:
            vouching = credential.key
            vouching_suite = None if vouching is None else self._suites.get(vouching.suite)
            if vouching is None or vouching_suite is None:
                return refuse(KeyRegStatus.BAD_PROOF, "vouching key unavailable")
            try:
                vouching_suite.verify(vouching.public, keyreg.proof, tbs_k)
            except (BadSignature, BadKey):
                return refuse(KeyRegStatus.BAD_PROOF, "bad proof")
        try:
            suite.verify(keyreg.pub, keyreg.pop, tbs_k)
        except (BadSignature, BadKey):
            return refuse(KeyRegStatus.BAD_POP, "bad proof of possession")
        key = ModuleKey(
            module_id=module_id,
            kid=keyreg.kid,
            suite=keyreg.suite,
            public=keyreg.pub,
            status=KeyStatus.PENDING,
            vouched_by=credential.kid,
            created_at=now,
            not_after=now + ttl,
            pid=keyreg.pid,
        )
        return KeyRegResult(keyreg.kid, int(KeyRegStatus.ACCEPTED)), key


def _rejected_event(
    module_id: str, keyreg: KeyReg | InvalidKeyReg, result: KeyRegResult
) -> NewEvent:
    """The ``key`` event ``rejected`` for a refused key registration, with its reason."""
    return NewEvent(
        "key",
        module_id,
        {
            "event": "rejected",
            "kid": result.kid,
            "status": None,
            "suite": keyreg.suite if isinstance(keyreg, KeyReg) else None,
            "pid": keyreg.pid if isinstance(keyreg, KeyReg) else None,
            "code": result.status,
            "reason": result.reason,
        },
    )


def _rehello_instruction(module_id: str) -> NewInstruction:
    """A ``rehello`` (MGP/1 §8.2): open a new session now, with the key just registered."""
    return NewInstruction(
        module_id=module_id,
        kind=KIND_REHELLO,
        body=cbor.encode(None),
        wire_size=instruction_wire_size(KIND_REHELLO, None),
        source="gateway",
    )
