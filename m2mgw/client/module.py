"""
The module side of MGP/1 as a pure state machine: no sockets, no reactor.

:class:`ModuleState` is everything a module keeps between wake-ups (its
identity, PSK and key series, the gateway's public keys, the HELLO ``ts``
counter, the session, the instructions it executed, the confirmations and
key registration it still has to deliver, the one DATA still unanswered);
:mod:`m2mgw.client.state` writes it to a file.  :class:`ModuleEndpoint`
builds the module's datagrams from that state and handles the gateway's
replies, executing the instructions they carry.  Randomness and the clock
are injected, so fixed draws reproduce the MGP/1 vectors byte for byte.

Every method that changes the state does so *before* it returns the
datagram that depends on it: a caller persists :attr:`ModuleEndpoint.state`
and only then sends (MGP/1 needs ``ts`` and ``ctr`` durable before they leave).

Choices where MGP/1 leaves room (see ``docs/protocol.md``):

- HELLO ``ts`` is ``max(clock, last ts + 1)``: the clock when it is sane, a
  counter when it is not.
- A HELLO's ``tok`` is 16 random bytes, a DATA's 8.
- Reports, confirmations and key registrations travel in DATA by default:
  a DATA's ``tok`` makes it apply once however it is retried.  The DataBody
  that is still unanswered (the *outbox*) is kept, and re-sent with the same
  ``tok`` under a new ``ctr`` or in a later session.
- A HELLO authenticates with the newest usable key (``registered`` keys
  first, to activate them), else the PSK.  Once a HELLO with a key is
  answered, older keys and the PSK are deleted.
- A ``"keygen"`` key is derived from
  ``HKDF(salt = seed, ikm = 32 module random bytes, info = "MGP1 keygen")``
  with the suite's hash, read as the suite's one key-derivation draw
  (EC: ``d = m mod (n - 1) + 1``; Ed25519: the seed); RSA keys come from the
  system generator.
"""

from __future__ import annotations

import enum
import hmac
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from m2mgw.crypto.ec import ECSuite, compress_point
from m2mgw.crypto.randomness import system_random
from m2mgw.errors import CryptoError, M2MGWError, UnknownPlugin
from m2mgw.interfaces import ICipherSuite, RandomSource
from m2mgw.protocol import cbor, keyschedule
from m2mgw.protocol.bodies import (
    KIND_KEYGEN,
    KIND_REHELLO,
    KIND_SKEY,
    MAX_ID,
    MISSING,
    AuthMethod,
    ConfEntry,
    ConfStatus,
    DataBody,
    ErrorEntry,
    HelloBody,
    InstructionItem,
    KeyReg,
    KeyRegResult,
    KeyRegStatus,
    Payload,
    ReplyBody,
    build_hello_plaintext,
    parse_hello_reply_plaintext,
    parse_params,
    parse_reply_body,
    parse_skey_body,
)
from m2mgw.protocol.messages import (
    MAX_RECEIVED_DATAGRAM,
    Data,
    DataReply,
    Hello,
    HelloReply,
    MalformedMessage,
    parse_reply,
)
from m2mgw.registry import lookup

__all__ = [
    "DATA_TOK_BYTES",
    "HELLO_TOK_BYTES",
    "KEYGEN_INFO",
    "KEYGEN_RANDOM_BYTES",
    "MAX_EXECUTED",
    "ClientError",
    "DataContext",
    "Executed",
    "Executor",
    "HelloContext",
    "InstructionOutcome",
    "KeyFactory",
    "KeyState",
    "ModuleEndpoint",
    "ModuleKeyPair",
    "ModuleSession",
    "ModuleState",
    "Outbox",
    "Outgoing",
    "PendingKeyReg",
    "ReplyOutcome",
    "ServerPublicKey",
    "keygen_random",
    "refuse_unknown",
]

#: ``tok`` sizes: a HELLO's (8-32 allowed) and a DATA's (4-32 allowed).
HELLO_TOK_BYTES: Final = 16
DATA_TOK_BYTES: Final = 8
#: Module randomness mixed with a keygen ``seed`` (MGP/1 §9: at least 32 bytes).
KEYGEN_RANDOM_BYTES: Final = 32
#: The HKDF info of keygen derivation (MGP/1 §9's example).
KEYGEN_INFO: Final = b"MGP1 keygen"
#: How many executed ``iid`` s are remembered (docs/protocol.md asks for 64 at least).
MAX_EXECUTED: Final = 256
#: How many unanswered DATA counters of a session are remembered.
MAX_UNANSWERED: Final = 32
#: How many confirmations may wait to be delivered; the oldest go first.
MAX_PENDING_CONFS: Final = 256
#: Start a new HELLO this many seconds before the session's expiry.
DEFAULT_RENEW_BEFORE: Final = 300.0

#: ``execute(kind, body) -> (status, result)``: an application's instruction
#: handler.  ``status`` is a :class:`~m2mgw.protocol.bodies.ConfStatus` value;
#: ``result`` any CBOR value for the application, or ``None`` for none.
Executor = Callable[[str, Any], tuple[int, Any]]
#: ``key_factory(suite, random) -> private key``: how new module keys are made.
KeyFactory = Callable[[ICipherSuite, RandomSource], Any]

_HELLO_METHODS: Final = {"sig": AuthMethod.SIG, "sdh": AuthMethod.SDH}
#: The cipher suites found so far, by name (see :meth:`ModuleEndpoint.suite`).
_FOUND_SUITES: dict[str, ICipherSuite] = {}
_HINT_MODES: Final = ("alias", "identity", "hidden")


class ClientError(M2MGWError):
    """
    The module cannot do what was asked in its current state (no credential,
    no server key, no session, a DATA still unanswered, a message too large).
    The message is one line a person can act on.
    """


class KeyState(str, enum.Enum):
    """Where one of the module's own keys stands, as far as the module knows."""

    #: The gateway accepted its KeyReg: it is ``pending`` there until a HELLO uses it.
    REGISTERED = "registered"
    #: A HELLO authenticated with it was answered (or the operator provisioned it).
    ACTIVE = "active"


def refuse_unknown(kind: str, body: Any) -> tuple[int, Any]:
    """The default :data:`Executor`: refuses every application instruction (status 2)."""
    return int(ConfStatus.REFUSED), f"kind {kind!r} not supported"


# -- the persistent state ---------------------------------------------------------------------


@dataclass
class ModuleKeyPair:
    """
    One of the module's own keys.

    :ivar private: the private key as unencrypted PKCS#8 DER.
    :ivar pid: the Params it was generated from (0: unsolicited or provisioned).
    :ivar not_after: the gateway time it expires at (from Params ``ttl``), if known.
    """

    kid: int
    suite: str
    private: bytes = field(repr=False)
    status: KeyState = KeyState.ACTIVE
    pid: int = 0
    not_after: int | None = None


@dataclass(frozen=True)
class ServerPublicKey:
    """
    A gateway key pair the module knows (MGP/1 §4).

    :ivar public: the agreement (or RSA) public key in wire encoding.
    :ivar sig_public: the Ed25519 signature key for ``x25519``, else ``None``.
    """

    skid: int
    suite: str
    public: bytes
    sig_public: bytes | None = None

    @property
    def verify_key(self) -> bytes:
        """The public key that checks this server key's signatures."""
        return self.sig_public if self.sig_public is not None else self.public


@dataclass
class ModuleSession:
    """
    The module's live session (MGP/1 §5).

    :ivar kid: the module key that authenticated its HELLO (0: the PSK).
    :ivar expires_at: the module clock time it expires at.
    :ivar next_ctr: the ``ctr`` of the next DATA.
    :ivar unanswered: ``ctr -> tok`` of the DATA sent and not yet answered.
    """

    sid: bytes
    suite: str
    skid: int
    kid: int
    k_up: bytes = field(repr=False)
    k_down: bytes = field(repr=False)
    expires_at: float
    next_ctr: int = 1
    unanswered: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Executed:
    """An instruction the module executed (or refused): never again."""

    iid: int
    status: int
    ts: int


@dataclass
class PendingKeyReg:
    """
    A new key whose KeyReg (MGP/1 §9) has not been answered yet.

    :ivar proof_kid: the credential ``proof`` was made with (0: the PSK).
    :ivar keygen_iid: the ``"keygen"`` instruction it answers, if any (its
        confirmation travels with the KeyReg).
    :ivar hello_carriers: how many HELLOs carried it.  One whose reply never
        came may have registered it, so then a "kid taken" answer means
        "registered".
    """

    kid: int
    suite: str
    private: bytes = field(repr=False)
    pub: bytes
    pid: int
    proof: bytes
    pop: bytes
    proof_kid: int
    ttl: int | None = None
    keygen_iid: int | None = None
    hello_carriers: int = 0

    def keyreg(self) -> KeyReg:
        """The KeyReg map to send."""
        return KeyReg(
            kid=self.kid,
            pub=self.pub,
            suite=self.suite,
            pid=self.pid,
            proof=self.proof,
            pop=self.pop,
        )


@dataclass(frozen=True)
class Outbox:
    """
    The DataBody sent and not yet answered: re-sent as is (same ``tok``)
    until a reply acknowledges it, in this session or a later one.

    :ivar body: the DataBody bytes.
    :ivar conf_iids: the confirmations it carries.
    :ivar keyreg_kid: the KeyReg it carries, if any.
    """

    tok: bytes
    body: bytes
    conf_iids: tuple[int, ...] = ()
    keyreg_kid: int | None = None


@dataclass
class ModuleState:
    """
    Everything a module keeps across wake-ups and reboots.

    :ivar identity: the module identity ``id``.
    :ivar suite: the suite of the PSK HELLOs (and the default of new keys).
    :ivar server_keys: the gateway keys the module knows, by ``skid``.
    :ivar skid: the server key the module prefers for its HELLOs.
    :ivar psk: the pre-shared key until a key is active, else ``None``.
    :ivar keys: the module's own keys by ``kid``.
    :ivar require_server_signature: drop HELLO_REPLYs without a server signature.
    :ivar hello_method: ``"sig"`` or ``"sdh"`` (SDH where the suite offers it).
    :ivar hint_mode: the HELLO ``hint``: ``"alias"`` (the last alias, else the
        identity), ``"identity"`` or ``"hidden"`` (an empty bstr).
    :ivar gateways: where the gateway listens, as ``"host:port"`` (the transport's business).
    :ivar last_ts: the ``ts`` of the last HELLO sent.
    :ivar executed: the last :data:`MAX_EXECUTED` instructions executed, oldest first.
    :ivar alias: the last alias the gateway issued.
    :ivar gateway_time: the last gateway ``time`` received.
    :ivar gateway_time_at: the module clock when it was received.
    :ivar pending_confs: confirmations not yet acknowledged by the gateway.
    :ivar pending_keyreg: a key registration not yet answered.
    :ivar outbox: the DataBody not yet answered.
    """

    identity: str
    suite: str
    server_keys: dict[int, ServerPublicKey]
    skid: int
    psk: bytes | None = field(default=None, repr=False)
    keys: dict[int, ModuleKeyPair] = field(default_factory=dict)
    require_server_signature: bool = True
    hello_method: str = "sig"
    hint_mode: str = "alias"
    gateways: list[str] = field(default_factory=list)
    last_ts: int = 0
    session: ModuleSession | None = None
    executed: list[Executed] = field(default_factory=list)
    alias: bytes | None = None
    gateway_time: int | None = None
    gateway_time_at: float | None = None
    pending_confs: list[ConfEntry] = field(default_factory=list)
    pending_keyreg: PendingKeyReg | None = None
    outbox: Outbox | None = None

    def check(self) -> None:
        """
        Check the state's invariants.

        :raise ValueError: the first problem found, in words.
        """
        size = len(self.identity.encode("utf-8"))
        if not 1 <= size <= MAX_ID:
            raise ValueError(f"the identity must be 1-{MAX_ID} bytes of UTF-8")
        if self.psk is not None and not 16 <= len(self.psk) <= 64:
            raise ValueError("the PSK must be 16-64 bytes")
        if self.psk is None and not self.keys:
            raise ValueError("the module has neither a PSK nor a key")
        if self.skid not in self.server_keys:
            raise ValueError(f"no server key with skid {self.skid}")
        for skid, server in self.server_keys.items():
            if server.skid != skid:
                raise ValueError(f"server key {skid} is filed under another skid")
        for kid, key in self.keys.items():
            if key.kid != kid or kid < 1:
                raise ValueError(f"module key {kid} is filed under another kid or kid < 1")
        if self.hello_method not in _HELLO_METHODS:
            raise ValueError(f"hello_method must be one of {', '.join(_HELLO_METHODS)}")
        if self.hint_mode not in _HINT_MODES:
            raise ValueError(f"hint_mode must be one of {', '.join(_HINT_MODES)}")
        if self.last_ts < 0:
            raise ValueError("last_ts must not be negative")
        if self.session is not None and self.session.next_ctr < 1:
            raise ValueError("the session's next ctr must be at least 1")

    def executed_iids(self) -> set[int]:
        """The ``iid`` s of the remembered executed instructions."""
        return {entry.iid for entry in self.executed}


# -- what the endpoint hands out ---------------------------------------------------------------


@dataclass(frozen=True)
class HelloContext:
    """
    What the module needs to read the reply to one HELLO (kept in memory only).

    :ivar conf_iids: the confirmations its ``pl`` carries.
    :ivar keyreg_kid: the KeyReg its ``pl`` carries, if any.
    """

    suite: str
    skid: int
    kid: int
    method: AuthMethod
    tok: bytes
    ts: int
    hello_aad: bytes
    k_hreply: bytes = field(repr=False)
    z_es: bytes = field(repr=False)
    conf_iids: tuple[int, ...] = ()
    keyreg_kid: int | None = None


@dataclass(frozen=True)
class DataContext:
    """Which DATA a datagram is: its session, counter and ``tok``."""

    sid: bytes
    ctr: int
    tok: bytes


@dataclass(frozen=True)
class Outgoing:
    """A datagram to send, and what identifies its reply."""

    datagram: bytes
    context: HelloContext | DataContext

    @property
    def is_hello(self) -> bool:
        """True for a HELLO, false for a DATA."""
        return isinstance(self.context, HelloContext)


@dataclass(frozen=True)
class InstructionOutcome:
    """
    What became of one instruction a reply carried.

    :ivar status: the confirmation status (:class:`ConfStatus`).
    :ivar result: the result confirmed, or :data:`~m2mgw.protocol.bodies.MISSING`.
    :ivar duplicate: it had been executed before: not executed again.
    """

    iid: int
    kind: str
    status: int
    result: Any = MISSING
    duplicate: bool = False


@dataclass(frozen=True)
class ReplyOutcome:
    """
    The result of handling one received datagram.

    :ivar accepted: false when the datagram was dropped (``reason`` says why);
        a dropped datagram changes nothing.
    :ivar kind: ``"hello"`` or ``"data"`` for an accepted reply.
    :ivar keyreg: the gateway's answer to a key registration, if one was answered.
    :ivar rehello: a ``"rehello"`` was executed: the session is gone.
    :ivar more: the gateway has more instructions queued.
    """

    accepted: bool
    reason: str | None = None
    kind: str | None = None
    body: ReplyBody | None = None
    instructions: tuple[InstructionOutcome, ...] = ()
    keyreg: KeyRegResult | None = None
    errors: tuple[ErrorEntry, ...] = ()
    rehello: bool = False
    more: bool = False

    @classmethod
    def dropped(cls, reason: str) -> ReplyOutcome:
        """A dropped datagram."""
        return cls(False, reason)


def keygen_random(suite: ICipherSuite, seed: bytes, module_random: bytes) -> RandomSource:
    """
    The random source a ``"keygen"`` key is derived from (MGP/1 §9).

    Draws are consecutive bytes of
    ``HKDF-Expand(HKDF-Extract(salt = seed, ikm = module_random), "MGP1 keygen", L)``
    with the suite's hash, so a suite that derives its key from one draw of
    ``n`` bytes gets exactly ``HKDF(seed, module_random, "MGP1 keygen", n)``.

    :raise m2mgw.errors.CryptoError: more than 255 hash lengths are drawn.
    """
    prk = suite.hkdf_extract(seed, module_random)
    position = 0

    def draw(n: int) -> bytes:
        nonlocal position
        if n < 0:
            raise ValueError("cannot draw a negative number of bytes")
        if n == 0:
            return b""
        stream = suite.hkdf_expand(prk, KEYGEN_INFO, position + n)
        position += n
        return bytes(stream[position - n :])

    return draw


def _default_key_factory(suite: ICipherSuite, random: RandomSource) -> Any:
    return suite.generate_signing_key(random)


def _cbor_ok(value: Any) -> bool:
    try:
        cbor.encode(value)
    except (TypeError, ValueError):
        return False
    return True


# -- the endpoint --------------------------------------------------------------------------------


class ModuleEndpoint:
    """
    The module side of MGP/1 over a :class:`ModuleState`.

    :param state: the module's state; the endpoint changes it in place.
    :param random: the randomness source (ephemeral keys, ``tok``, new keys,
        RSA-PSS salts).
    :param clock: the module clock, seconds since the epoch.
    :param execute: the application's instruction handler (reserved kinds
        are handled here); the default refuses every instruction.
    :param key_factory: makes new module keys from a suite and a random source.
    :param renew_before: start a new HELLO this many seconds before the
        session expires.
    :param keep_psk: keep the PSK after a key became active (the gateway's
        policy decides whether it still accepts it).
    :param compress_points: send a HELLO's ephemeral key as a compressed
        SEC1 point in the EC suites (33 bytes instead of 65 with P-256;
        MGP/1 §3 has every receiver accept both), for lean links.  Off by
        default: the fixed-key vectors carry uncompressed points.
    :raise ValueError: ``state`` breaks its invariants (:meth:`ModuleState.check`).
    """

    def __init__(
        self,
        state: ModuleState,
        *,
        random: RandomSource = system_random,
        clock: Callable[[], float] = time.time,
        execute: Executor = refuse_unknown,
        key_factory: KeyFactory = _default_key_factory,
        renew_before: float = DEFAULT_RENEW_BEFORE,
        keep_psk: bool = False,
        compress_points: bool = False,
    ) -> None:
        state.check()
        self.state = state
        self._random = random
        self._clock = clock
        self._execute = execute
        self._key_factory = key_factory
        self._renew_before = renew_before
        self._keep_psk = keep_psk
        self._compress_points = compress_points
        self._loaded_keys: dict[tuple[int, bytes], Any] = {}

    # -- time and lookups ---------------------------------------------------------------

    def now(self) -> float:
        """The module clock."""
        return self._clock()

    def gateway_now(self) -> float | None:
        """
        The module's estimate of the gateway's time: the last ``time`` received
        plus the time elapsed since (MGP/1 §8.2); ``None`` before any.
        """
        state = self.state
        if state.gateway_time is None or state.gateway_time_at is None:
            return None
        return state.gateway_time + max(0.0, self.now() - state.gateway_time_at)

    @staticmethod
    def suite(name: str) -> ICipherSuite:
        """
        A cipher suite by name.

        :raise ClientError: no such suite is installed.
        """
        found = _FOUND_SUITES.get(name)
        if found is not None:
            return found
        try:
            suite: ICipherSuite = lookup(ICipherSuite, name)
        except UnknownPlugin as e:
            raise ClientError(str(e)) from None
        # A plugin scan costs more than the crypto of a message: remember what
        # was found (a suite plugin, once installed, stays the same object).
        _FOUND_SUITES[name] = suite
        return suite

    def _private_key(self, suite: ICipherSuite, der: bytes) -> Any:
        cache_key = (id(suite), der)
        key = self._loaded_keys.get(cache_key)
        if key is None:
            try:
                key = suite.load_signing_key(der)
            except CryptoError as e:
                raise ClientError(f"a stored {suite.name} key does not load: {e}") from None
            self._loaded_keys[cache_key] = key
        return key

    def _key(self, kid: int) -> tuple[ModuleKeyPair, ICipherSuite, Any]:
        pair = self.state.keys.get(kid)
        if pair is None:
            raise ClientError(f"the module has no key with kid {kid}")
        suite = self.suite(pair.suite)
        return pair, suite, self._private_key(suite, pair.private)

    # -- sessions and credentials ------------------------------------------------------

    def has_session(self) -> bool:
        """True if the session is live and not about to expire."""
        session = self.state.session
        return session is not None and self.now() < session.expires_at - self._renew_before

    def needs_hello(self) -> bool:
        """True if the next message must be a HELLO."""
        return not self.has_session()

    def highest_kid(self) -> int:
        """The module's highest key id (0 with none)."""
        kids = list(self.state.keys)
        if self.state.pending_keyreg is not None:
            kids.append(self.state.pending_keyreg.kid)
        return max(kids, default=0)

    def _usable(self, pair: ModuleKeyPair) -> bool:
        estimate = self.gateway_now()
        return pair.not_after is None or estimate is None or estimate < pair.not_after

    def hello_credential(self, *, fallback: bool = False) -> tuple[int, AuthMethod]:
        """
        The ``kid`` and method a HELLO uses by default: the newest usable key
        (a ``registered`` one first, to activate it) with the configured
        method, else the PSK.

        :param fallback: the first choice went unanswered: prefer the newest
            ``active`` key (or the PSK) to a ``registered`` one, in case the
            gateway no longer accepts the latter.
        :raise ClientError: the module has no usable credential.
        """
        state = self.state
        keys = [pair for pair in state.keys.values() if self._usable(pair)]
        if keys:
            registered = [pair for pair in keys if pair.status == KeyState.REGISTERED]
            active = [pair for pair in keys if pair.status == KeyState.ACTIVE]
            if fallback and registered and not active and state.psk is not None:
                return 0, AuthMethod.PSK
            preferred = (active if fallback else registered) or keys
            pair = max(preferred, key=lambda pair: pair.kid)
            method = _HELLO_METHODS[state.hello_method]
            if method == AuthMethod.SDH and not self.suite(pair.suite).supports_sdh:
                method = AuthMethod.SIG
            return pair.kid, method
        if state.psk is not None:
            return 0, AuthMethod.PSK
        raise ClientError("the module has no usable key and no PSK: provision it again")

    def _server_key(self, suite_name: str, skid: int | None) -> ServerPublicKey:
        servers = self.state.server_keys
        if skid is not None:
            server = servers.get(skid)
            if server is None or server.suite != suite_name:
                raise ClientError(f"no {suite_name} server key with skid {skid}")
            return server
        preferred = servers.get(self.state.skid)
        if preferred is not None and preferred.suite == suite_name:
            return preferred
        candidates = [server for server in servers.values() if server.suite == suite_name]
        if not candidates:
            raise ClientError(f"the module knows no {suite_name} server key")
        return max(candidates, key=lambda server: server.skid)

    # -- payload assembly ---------------------------------------------------------------

    def _outbox_iids(self) -> set[int]:
        outbox = self.state.outbox
        return set() if outbox is None else set(outbox.conf_iids)

    def _proof(self, vouching_kid: int, tbs_k: bytes) -> bytes:
        if vouching_kid == 0:
            if self.state.psk is None:
                raise ClientError("a PSK proof is needed but the module no longer has its PSK")
            return keyschedule.psk_keyreg_proof(self.state.psk, self.state.identity, tbs_k)
        _, suite, key = self._key(vouching_kid)
        return bytes(suite.sign(key, tbs_k, self._random))

    def _keyreg_vouched_by(self, kid: int) -> KeyReg:
        pending = self.state.pending_keyreg
        assert pending is not None
        if pending.proof_kid != kid:
            tbs_k = keyschedule.keyreg_tbs(
                self.state.identity, pending.kid, pending.pub, pending.suite, pending.pid
            )
            pending.proof = self._proof(kid, tbs_k)
            pending.proof_kid = kid
        return pending.keyreg()

    def _merge(
        self,
        payload: Payload | None,
        confs: Sequence[ConfEntry],
        keyreg: KeyReg | None,
    ) -> Payload | None:
        base = payload if payload is not None else Payload()
        if base.errors:
            raise ClientError("a payload with parse errors cannot be sent")
        if keyreg is not None and base.keyreg is not None:
            raise ClientError("a payload carries one key registration at most")
        merged = replace(
            base,
            conf=tuple(base.conf) + tuple(confs),
            keyreg=base.keyreg if keyreg is None else keyreg,
        )
        return None if merged == Payload() else merged

    # -- HELLO -------------------------------------------------------------------------------

    def build_hello(
        self,
        payload: Payload | None = None,
        *,
        kid: int | None = None,
        method: AuthMethod | None = None,
        skid: int | None = None,
        include_keyreg: bool = False,
        include_confs: bool = True,
        fallback: bool = False,
    ) -> Outgoing:
        """
        Build a HELLO (MGP/1 §5) and advance ``last_ts``.

        Draws, in order: the ephemeral key (RSA: ``Z_es`` then the OAEP
        seed), ``tok``, then for an RSA signature its salt.  Waiting
        confirmations ride in ``pl`` (not those already in the outbox, nor a
        keygen's, which travels with its KeyReg).

        :param payload: what the HELLO's ``pl`` carries besides confirmations.
        :param kid: the key to authenticate with (0: the PSK); default
            :meth:`hello_credential`.
        :param method: the authentication method; default the state's
            (PSK for ``kid`` 0).
        :param skid: the server key; default the preferred one of the suite.
        :param include_keyreg: carry the pending key registration, vouched for
            by this HELLO's credential.
        :param include_confs: carry the waiting confirmations.
        :param fallback: choose the default credential as
            :meth:`hello_credential` does with ``fallback``.
        :raise ClientError: no such credential or server key, nothing pending
            to include, or a message over 1472 bytes.
        """
        state = self.state
        if kid is None:
            kid, default_method = self.hello_credential(fallback=fallback)
            method = method or default_method
        elif kid == 0:
            if state.psk is None:
                raise ClientError("the module no longer has its PSK")
            method = AuthMethod.PSK
        else:
            _, suite_of_key, _ = self._key(kid)
            if method is None:
                method = _HELLO_METHODS[state.hello_method]
                if method == AuthMethod.SDH and not suite_of_key.supports_sdh:
                    method = AuthMethod.SIG
        if (kid == 0) != (method == AuthMethod.PSK):
            raise ClientError(f"kid {kid} cannot authenticate with method {method.name}")
        suite_name = state.suite if kid == 0 else state.keys[kid].suite
        suite = self.suite(suite_name)
        if method == AuthMethod.SDH and not suite.supports_sdh:
            raise ClientError(f"suite {suite_name} has no SDH authentication")
        server = self._server_key(suite_name, skid)

        keyreg = None
        keyreg_kid = None
        if include_keyreg:
            if state.pending_keyreg is None:
                raise ClientError("no key registration is pending")
            keyreg = self._keyreg_vouched_by(kid)
            keyreg_kid = keyreg.kid
        confs: list[ConfEntry] = []
        if include_confs:
            skip = self._outbox_iids()
            pending = state.pending_keyreg
            if pending is not None and pending.keygen_iid is not None and not include_keyreg:
                skip.add(pending.keygen_iid)
            confs = [conf for conf in state.pending_confs if conf.iid not in skip]
        pl = self._merge(payload, confs, keyreg)

        epk, z_es = suite.encapsulate(server.public, self._random)
        if self._compress_points and isinstance(suite, ECSuite):
            epk = compress_point(epk)
        tok = self._random(HELLO_TOK_BYTES)
        ts = max(int(self.now()), state.last_ts + 1)
        hint: bytes | str
        if state.hint_mode == "hidden":
            hint = b""
        elif state.hint_mode == "alias" and state.alias is not None:
            hint = state.alias
        else:
            hint = state.identity
        body = HelloBody(id=state.identity, kid=kid, ts=ts, tok=tok, pl=pl).encode()
        aad = Hello.aad_for(hint, suite_name, server.skid, epk)
        tbs = keyschedule.hello_auth_tbs(aad, body)
        if method == AuthMethod.PSK:
            assert state.psk is not None
            value = keyschedule.psk_mac(state.psk, epk, tbs)
        else:
            _, _, key = self._key(kid)
            if method == AuthMethod.SIG:
                value = bytes(suite.sign(key, tbs, self._random))
            else:
                z_ss = suite.static_agree(key, server.public)
                value = keyschedule.sdh_mac(suite, z_ss, epk, tbs)
        keys = keyschedule.hello_keys(suite, z_es)
        plaintext = build_hello_plaintext(body, method, value)
        ct = suite.seal(keys.k_hello, keyschedule.zero_nonce(suite), aad, plaintext)
        datagram = Hello(hint, suite_name, server.skid, epk, ct).encode()
        if len(datagram) > MAX_RECEIVED_DATAGRAM:
            raise ClientError(
                f"the HELLO would be {len(datagram)} bytes; MGP/1 allows {MAX_RECEIVED_DATAGRAM}"
            )
        state.last_ts = ts
        if keyreg is not None and state.pending_keyreg is not None:
            state.pending_keyreg.hello_carriers += 1
        context = HelloContext(
            suite=suite_name,
            skid=server.skid,
            kid=kid,
            method=method,
            tok=tok,
            ts=ts,
            hello_aad=aad,
            k_hreply=keys.k_hreply,
            z_es=z_es,
            conf_iids=tuple(conf.iid for conf in confs),
            keyreg_kid=keyreg_kid,
        )
        return Outgoing(datagram, context)

    def handle_hello_reply(self, datagram: bytes, context: HelloContext) -> ReplyOutcome:
        """
        Read the HELLO_REPLY to the HELLO of ``context`` and open its session.

        Checks, dropping at the first failure: a well-formed HELLO_REPLY, the
        AEAD tag, the plaintext, ``ack`` equal to the HELLO's ``tok``, and the
        server signature (required when the state says so).  Then the
        session replaces any earlier one, the key used becomes active (older
        keys and the PSK are forgotten), and the reply's instructions are executed.
        """
        state = self.state
        try:
            reply = parse_reply(datagram)
        except MalformedMessage as e:
            return ReplyOutcome.dropped(f"malformed: {e.reason}")
        if not isinstance(reply, HelloReply):
            return ReplyOutcome.dropped("not a HELLO_REPLY")
        suite = self.suite(context.suite)
        try:
            plaintext = suite.open(
                context.k_hreply, keyschedule.zero_nonce(suite), reply.aad, reply.ct
            )
        except CryptoError:
            return ReplyOutcome.dropped("bad tag")
        try:
            parsed = parse_hello_reply_plaintext(plaintext)
        except MalformedMessage as e:
            return ReplyOutcome.dropped(f"malformed plaintext: {e.detail}")
        body = parsed.body
        if not hmac.compare_digest(body.ack, context.tok):
            return ReplyOutcome.dropped("ack is not the HELLO's tok")
        server = state.server_keys.get(context.skid)
        if server is None:
            return ReplyOutcome.dropped("server key unknown")
        if parsed.sig is None:
            if state.require_server_signature:
                return ReplyOutcome.dropped("unsigned reply")
        else:
            tbs = keyschedule.reply_tbs(context.hello_aad, reply.aad, parsed.body_bytes)
            try:
                suite.verify(server.verify_key, parsed.sig, tbs)
            except CryptoError:
                return ReplyOutcome.dropped("bad server signature")
        assert body.stok is not None and body.exp is not None and body.time is not None

        now = self.now()
        keys = keyschedule.session_keys(
            suite, context.z_es, body.stok, reply.sid, state.identity, context.kid
        )
        state.session = ModuleSession(
            sid=reply.sid,
            suite=context.suite,
            skid=context.skid,
            kid=context.kid,
            k_up=keys.k_up,
            k_down=keys.k_down,
            expires_at=now + body.exp,
        )
        state.alias = body.alias
        state.gateway_time, state.gateway_time_at = body.time, now
        if context.kid > 0:
            self._activate(context.kid)
        self._acknowledged_confs(context.conf_iids)
        keyreg = self._keyreg_answered(context.keyreg_kid, body, in_hello=True)
        return self._finish(body, "hello", keyreg)

    def _activate(self, kid: int) -> None:
        """A HELLO with key ``kid`` was answered: it is active, older keys are retired."""
        state = self.state
        state.keys[kid].status = KeyState.ACTIVE
        for older in [other for other in state.keys if other < kid]:
            del state.keys[older]
        if not self._keep_psk:
            state.psk = None
        self._loaded_keys.clear()

    # -- DATA ------------------------------------------------------------------------------

    def _live_session(self) -> ModuleSession:
        session = self.state.session
        if session is None or self.now() >= session.expires_at:
            raise ClientError("no live session: send a HELLO first")
        return session

    def build_data(self, payload: Payload | None = None) -> Outgoing:
        """
        Build a DATA carrying a new DataBody (MGP/1 §8) and keep it as the outbox.

        Draws ``tok``.  Waiting confirmations and the pending key
        registration (vouched for by the session's credential) ride along;
        ``ts`` is the module clock.

        :raise ClientError: no live session, the outbox still holds an
            unanswered DataBody (re-send it first), or a message over 1472 bytes.
        """
        state = self.state
        session = self._live_session()
        if state.outbox is not None:
            raise ClientError("the previous DATA is unanswered: re-send it first")
        keyreg = None
        if state.pending_keyreg is not None:
            keyreg = self._keyreg_vouched_by(session.kid)
        confs = list(state.pending_confs)
        pl = self._merge(payload, confs, keyreg)
        tok = self._random(DATA_TOK_BYTES)
        body = DataBody(ts=int(self.now()), tok=tok, pl=pl).encode()
        outbox = Outbox(
            tok=tok,
            body=body,
            conf_iids=tuple(conf.iid for conf in confs),
            keyreg_kid=None if keyreg is None else keyreg.kid,
        )
        outgoing = self._seal(session, outbox)
        state.outbox = outbox
        return outgoing

    def resend_outbox(self) -> Outgoing:
        """
        The unanswered DataBody again, same ``tok``, under a new ``ctr`` of the
        live session (MGP/1 §8: the gateway applies it once).

        :raise ClientError: nothing is unanswered, or no live session.
        """
        outbox = self.state.outbox
        if outbox is None:
            raise ClientError("no DATA is waiting for an answer")
        return self._seal(self._live_session(), outbox)

    def resend_under_new_ctr(self, outgoing: Outgoing) -> Outgoing:
        """
        ``outgoing`` (a DATA) again: the same DataBody and ``tok`` under a new ``ctr``.

        :raise ClientError: it is not a DATA, or it was answered meanwhile.
        """
        context = outgoing.context
        outbox = self.state.outbox
        if not isinstance(context, DataContext):
            raise ClientError("only a DATA can be re-sent under a new counter")
        if outbox is None or not hmac.compare_digest(outbox.tok, context.tok):
            raise ClientError("that DATA was answered already")
        return self.resend_outbox()

    def _seal(self, session: ModuleSession, outbox: Outbox) -> Outgoing:
        suite = self.suite(session.suite)
        ctr = session.next_ctr
        nonce = keyschedule.nonce_for_ctr(suite, ctr)
        aad = Data.aad_for(session.sid, ctr)
        ct = suite.seal(session.k_up, nonce, aad, outbox.body)
        datagram = Data(session.sid, ctr, ct).encode()
        if len(datagram) > MAX_RECEIVED_DATAGRAM:
            raise ClientError(
                f"the DATA would be {len(datagram)} bytes; MGP/1 allows {MAX_RECEIVED_DATAGRAM}"
            )
        session.next_ctr = ctr + 1
        session.unanswered[ctr] = outbox.tok
        while len(session.unanswered) > MAX_UNANSWERED:
            del session.unanswered[min(session.unanswered)]
        return Outgoing(datagram, DataContext(session.sid, ctr, outbox.tok))

    def handle_data_reply(self, datagram: bytes) -> ReplyOutcome:
        """
        Read a DATA_REPLY: accepted only for a ``ctr`` of the live session sent
        and not yet answered, with a good tag and ``ack`` equal to that DATA's
        ``tok``.  The DataBody it answers leaves the outbox; its instructions
        are executed.
        """
        state = self.state
        try:
            reply = parse_reply(datagram)
        except MalformedMessage as e:
            return ReplyOutcome.dropped(f"malformed: {e.reason}")
        if not isinstance(reply, DataReply):
            return ReplyOutcome.dropped("not a DATA_REPLY")
        session = state.session
        if session is None or not hmac.compare_digest(session.sid, reply.sid):
            return ReplyOutcome.dropped("not the live session")
        tok = session.unanswered.get(reply.ctr)
        if tok is None:
            return ReplyOutcome.dropped("no unanswered DATA with this ctr")
        suite = self.suite(session.suite)
        try:
            plaintext = suite.open(
                session.k_down, keyschedule.nonce_for_ctr(suite, reply.ctr), reply.aad, reply.ct
            )
        except CryptoError:
            return ReplyOutcome.dropped("bad tag")
        try:
            body = parse_reply_body(plaintext)
        except MalformedMessage as e:
            return ReplyOutcome.dropped(f"malformed plaintext: {e.detail}")
        if not hmac.compare_digest(body.ack, tok):
            return ReplyOutcome.dropped("ack is not the DATA's tok")
        for ctr in [ctr for ctr, other in session.unanswered.items() if other == tok]:
            del session.unanswered[ctr]
        if body.time is not None:
            state.gateway_time, state.gateway_time_at = body.time, self.now()
        if body.alias is not None:
            state.alias = body.alias
        keyreg = None
        outbox = state.outbox
        if outbox is not None and hmac.compare_digest(outbox.tok, tok):
            state.outbox = None
            self._acknowledged_confs(outbox.conf_iids)
            keyreg = self._keyreg_answered(outbox.keyreg_kid, body, in_hello=False)
        return self._finish(body, "data", keyreg)

    def handle_reply(self, datagram: bytes, contexts: Iterable[HelloContext] = ()) -> ReplyOutcome:
        """
        Handle any received datagram: a DATA_REPLY, or a HELLO_REPLY to one of
        the HELLOs of ``contexts`` (newest last; each is tried).
        """
        if _is_type(datagram, 2):
            outcome = ReplyOutcome.dropped("no HELLO is waiting for a reply")
            for context in reversed(list(contexts)):
                outcome = self.handle_hello_reply(datagram, context)
                if outcome.accepted:
                    break
            return outcome
        return self.handle_data_reply(datagram)

    # -- what a reply carries ---------------------------------------------------------------

    def _acknowledged_confs(self, iids: Iterable[int]) -> None:
        done = set(iids)
        if done:
            self.state.pending_confs = [c for c in self.state.pending_confs if c.iid not in done]

    def _keyreg_answered(
        self, kid: int | None, body: ReplyBody, *, in_hello: bool
    ) -> KeyRegResult | None:
        """Apply the gateway's answer to the KeyReg that rode in the answered message."""
        state = self.state
        pending = state.pending_keyreg
        if kid is None or pending is None or pending.kid != kid:
            return None
        try:
            result = body.keyreg_result
        except MalformedMessage:
            result = None
        if result is None or result.kid != kid:
            result = KeyRegResult(kid, int(KeyRegStatus.NOT_ACCEPTABLE), "no result in the reply")
        # An earlier HELLO that carried it and got no reply may have registered it.
        unanswered_carriers = pending.hello_carriers - (1 if in_hello else 0)
        accepted = result.status == KeyRegStatus.ACCEPTED or (
            result.status == KeyRegStatus.WRONG_KID and unanswered_carriers > 0
        )
        if accepted:
            not_after = None
            estimate = self.gateway_now()
            if pending.ttl is not None and estimate is not None:
                not_after = int(estimate) + pending.ttl
            state.keys[kid] = ModuleKeyPair(
                kid=kid,
                suite=pending.suite,
                private=pending.private,
                status=KeyState.REGISTERED,
                pid=pending.pid,
                not_after=not_after,
            )
        state.pending_keyreg = None
        return result

    def _finish(self, body: ReplyBody, kind: str, keyreg: KeyRegResult | None) -> ReplyOutcome:
        outcomes: list[InstructionOutcome] = []
        rehello = False
        for item in body.ins:
            outcome = self._instruction(item)
            outcomes.append(outcome)
            if item.kind == KIND_REHELLO and not outcome.duplicate:
                rehello = rehello or outcome.status == ConfStatus.DONE
        if rehello:
            self.state.session = None
        return ReplyOutcome(
            True,
            kind=kind,
            body=body,
            instructions=tuple(outcomes),
            keyreg=keyreg,
            errors=body.err,
            rehello=rehello,
            more=body.more,
        )

    # -- instructions ----------------------------------------------------------------------

    def _remember(self, iid: int, status: int, result: Any) -> ConfEntry:
        state = self.state
        ts = int(self.now())
        state.executed.append(Executed(iid, status, ts))
        del state.executed[:-MAX_EXECUTED]
        conf = ConfEntry(iid, status, ts, result)
        state.pending_confs.append(conf)
        del state.pending_confs[:-MAX_PENDING_CONFS]
        return conf

    def _instruction(self, item: InstructionItem) -> InstructionOutcome:
        state = self.state
        for done in state.executed:
            if done.iid == item.iid:
                waiting = {conf.iid for conf in state.pending_confs}
                if item.iid not in waiting:
                    # Executed and confirmed, yet sent again: confirm again, never re-execute.
                    state.pending_confs.append(ConfEntry(item.iid, done.status, done.ts))
                return InstructionOutcome(item.iid, item.kind, done.status, duplicate=True)
        estimate = self.gateway_now()
        status: int
        result: Any
        if item.not_after is not None and estimate is not None and estimate > item.not_after:
            status, result = int(ConfStatus.REFUSED), "not_after passed"
        elif item.kind == KIND_KEYGEN:
            status, result = self._keygen(item)
        elif item.kind == KIND_SKEY:
            status, result = self._skey(item)
        elif item.kind == KIND_REHELLO:
            status, result = int(ConfStatus.DONE), MISSING
        else:
            try:
                status, result = self._execute(item.kind, item.body)
            except Exception as e:  # the application's handler: contain its failure
                status, result = int(ConfStatus.FAILED), f"{type(e).__name__}: {e}"[:200]
            if result is None:
                result = MISSING
            if status not in tuple(ConfStatus):
                status, result = int(ConfStatus.FAILED), f"handler returned status {status!r}"
            elif result is not MISSING and not _cbor_ok(result):
                status, result = int(ConfStatus.FAILED), "result is not CBOR-encodable"
        self._remember(item.iid, int(status), result)
        return InstructionOutcome(item.iid, item.kind, int(status), result)

    def _keygen(self, item: InstructionItem) -> tuple[int, Any]:
        """Generate the key a ``"keygen"`` asks for; its KeyReg rides with the confirmation."""
        state = self.state
        session = state.session
        try:
            params = parse_params(item.body)
        except MalformedMessage as e:
            return int(ConfStatus.FAILED), f"malformed Params: {e.detail}"
        if session is None:
            return int(ConfStatus.FAILED), "no session to vouch for the new key"
        try:
            suite = self.suite(params.suite)
        except ClientError:
            return int(ConfStatus.REFUSED), f"unknown suite {params.suite}"
        try:
            suite.check_params(params.to_cbor())
        except CryptoError as e:
            return int(ConfStatus.REFUSED), str(e)[:200]
        if state.pending_keyreg is not None:
            return int(ConfStatus.FAILED), "another key registration is in progress"
        if params.kid in state.keys or params.kid < 1:
            return int(ConfStatus.REFUSED), f"kid {params.kid} is taken"
        stream = keygen_random(suite, params.seed, self._random(KEYGEN_RANDOM_BYTES))
        try:
            self.start_key_registration(
                kid=params.kid,
                pid=params.pid,
                suite_name=params.suite,
                ttl=params.ttl,
                keygen_iid=item.iid,
                key_random=stream,
                rsa_bits=params.rsa_bits,
            )
        except ClientError as e:
            return int(ConfStatus.FAILED), str(e)[:200]
        return int(ConfStatus.DONE), MISSING

    def _skey(self, item: InstructionItem) -> tuple[int, Any]:
        """Check and store a new server key (MGP/1 §8.2)."""
        state = self.state
        session = state.session
        try:
            skey = parse_skey_body(item.body)
        except MalformedMessage as e:
            return int(ConfStatus.REFUSED), f"malformed skey: {e.detail}"
        carrier = None if session is None else state.server_keys.get(session.skid)
        if session is None or carrier is None:
            return int(ConfStatus.REFUSED), "no session key to check the signature with"
        tbs = keyschedule.skey_tbs(skey.skid, skey.suite, skey.pub, skey.sig_pub)
        try:
            self.suite(session.suite).verify(carrier.verify_key, skey.sig, tbs)
        except CryptoError:
            return int(ConfStatus.REFUSED), "bad signature"
        try:
            announced = self.suite(skey.suite)
        except ClientError:
            return int(ConfStatus.REFUSED), f"unknown suite {skey.suite}"
        try:
            # A throwaway agreement validates the key (point, size, low order)
            # without drawing from the module's own (possibly scripted) source.
            announced.encapsulate(skey.pub, system_random)
            if skey.sig_pub is not None:
                announced.validate_public_key(skey.sig_pub)
        except CryptoError:
            return int(ConfStatus.REFUSED), "unusable public key"
        existing = state.server_keys.get(skey.skid)
        new = ServerPublicKey(skey.skid, skey.suite, skey.pub, skey.sig_pub)
        if existing is not None and existing != new:
            return int(ConfStatus.REFUSED), f"skid {skey.skid} names another key"
        state.server_keys[skey.skid] = new
        current_suite = session.suite
        if skey.suite == current_suite:
            state.skid = skey.skid
        return int(ConfStatus.DONE), MISSING

    # -- key registration ----------------------------------------------------------------

    def start_key_registration(
        self,
        *,
        kid: int | None = None,
        pid: int = 0,
        suite_name: str | None = None,
        vouching_kid: int | None = None,
        ttl: int | None = None,
        keygen_iid: int | None = None,
        key_random: RandomSource | None = None,
        rsa_bits: int | None = None,
    ) -> PendingKeyReg:
        """
        Make a new key and its KeyReg (MGP/1 §9); the next DATA carries it
        (or a HELLO with ``include_keyreg``).

        Draws, in order: the key (from ``key_random``, default the module's
        source), then the proof's RSA salt if the voucher signs with RSA,
        then the proof of possession's.

        :param kid: the new ``kid``; default the highest + 1 (unsolicited).
        :param pid: the Params it answers (0: unsolicited).
        :param suite_name: the new key's suite; default the current key's.
        :param vouching_kid: the credential that vouches (0: the PSK);
            default the session's, else what the next HELLO would use.
        :param rsa_bits: refuse if the new RSA key does not have this size.
        :raise ClientError: a registration is already pending, or no credential.
        """
        state = self.state
        if state.pending_keyreg is not None:
            raise ClientError("a key registration is already pending")
        if vouching_kid is None:
            if state.session is not None:
                vouching_kid = state.session.kid
            else:
                vouching_kid, _ = self.hello_credential()
        if suite_name is None:
            suite_name = state.suite if vouching_kid == 0 else self._key(vouching_kid)[0].suite
        if kid is None:
            kid = self.highest_kid() + 1
        suite = self.suite(suite_name)
        private = self._key_factory(suite, key_random or self._random)
        size = getattr(private, "key_size", None)
        if rsa_bits is not None and isinstance(size, int) and size != rsa_bits:
            raise ClientError(f"this module makes {size}-bit RSA keys, not {rsa_bits}")
        pub = bytes(suite.signing_public(private))
        tbs_k = keyschedule.keyreg_tbs(state.identity, kid, pub, suite_name, pid)
        proof = self._proof(vouching_kid, tbs_k)
        pop = bytes(suite.sign(private, tbs_k, self._random))
        pending = PendingKeyReg(
            kid=kid,
            suite=suite_name,
            private=bytes(suite.dump_signing_key(private)),
            pub=pub,
            pid=pid,
            proof=proof,
            pop=pop,
            proof_kid=vouching_kid,
            ttl=ttl,
            keygen_iid=keygen_iid,
        )
        state.pending_keyreg = pending
        return pending


def _is_type(datagram: bytes, kind: int) -> bool:
    """A cheap look at a datagram's message type (``[1, kind, ...]``), before parsing."""
    return len(datagram) >= 3 and datagram[1] == 0x01 and datagram[2] == kind
