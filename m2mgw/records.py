"""
Value types shared by the store, the protocol engine and the operator tools.

Every record is a frozen dataclass holding plain values (``bytes``, ``int``,
``str``), so a store can persist it without knowing about cipher suites and a
test can compare two of them with ``==``.  Times are integer seconds since the
epoch, taken from the injected clock, never from the wall clock directly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ModuleStatus(str, enum.Enum):
    """Whether a module may talk to the gateway."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    #: Authenticates, but gets no instructions and no data forwarding until approved.
    PENDING_APPROVAL = "pending-approval"


class KeyStatus(str, enum.Enum):
    """The life of a module public key (MGP/1 §9)."""

    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"
    EXPIRED = "expired"
    REVOKED = "revoked"


class ServerKeyStatus(str, enum.Enum):
    """The life of one of the gateway's module-side key pairs."""

    ACTIVE = "active"
    #: Still accepted, no longer announced; retired once its modules have moved.
    RETIRING = "retiring"
    RETIRED = "retired"


class InstructionState(str, enum.Enum):
    """The states of a queued instruction (MGP/1 §8.3)."""

    QUEUED = "queued"
    #: Queued, and its module was heard from without it riding in the reply
    #: (no room left, or the module waits for approval): it waits for a later one.
    WAITING = "waiting"
    SENT = "sent"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True for the states an instruction never leaves."""
        return self not in (
            InstructionState.QUEUED,
            InstructionState.WAITING,
            InstructionState.SENT,
        )


#: The states in which an instruction waits for delivery or for its confirmation.
PENDING_INSTRUCTION_STATES = (
    InstructionState.QUEUED,
    InstructionState.WAITING,
    InstructionState.SENT,
)

#: ``vouched_by`` value of a key registered under PSK authentication.
VOUCHED_BY_PSK = 0
#: ``vouched_by`` value of a key the operator imported (manufacture-time key).
VOUCHED_BY_OPERATOR = -1


@dataclass(frozen=True)
class Module:
    """
    A provisioned module.

    :ivar module_id: the MGP/1 identity ``id`` (1-64 bytes of UTF-8).
    :ivar psk: the pre-shared secret (16-64 bytes), or ``None``.
    :ivar psk_reusable: keep accepting the PSK after a key is active (policy override).
    :ivar last_hello_ts: the ``ts`` of the last accepted HELLO (0: none yet).
    """

    module_id: str
    status: ModuleStatus = ModuleStatus.ENABLED
    psk: bytes | None = field(default=None, repr=False)
    psk_reusable: bool = False
    group: str = "default"
    last_hello_ts: int = 0
    created_at: int = 0


@dataclass(frozen=True)
class ModuleKey:
    """
    One public key of a module's key series.

    :ivar public: the wire encoding of the key (SEC1 point, raw Ed25519, DER SPKI).
    :ivar vouched_by: the ``kid`` of the key whose proof vouched for this one,
        :data:`VOUCHED_BY_PSK` or :data:`VOUCHED_BY_OPERATOR`.
    :ivar not_after: the key's expiry, or ``None`` for no expiry.
    :ivar pid: the parameter set it was generated from (0: unsolicited or imported).
    """

    module_id: str
    kid: int
    suite: str
    public: bytes
    status: KeyStatus = KeyStatus.PENDING
    vouched_by: int = VOUCHED_BY_OPERATOR
    created_at: int = 0
    activated_at: int | None = None
    retired_at: int | None = None
    not_after: int | None = None
    pid: int = 0


@dataclass(frozen=True)
class ServerKey:
    """
    A reference to one of the gateway's module-side key pairs.

    The private half lives in a file of the data directory (mode 0600); the
    store only records which ``skid`` exists, its suite, public key and status.

    :ivar public: the public key as modules are provisioned with it (the
        agreement key for ``x25519``).
    :ivar sig_public: the Ed25519 signature key of an ``x25519`` pair, else ``None``.
    :ivar retire_after: for a ``retiring`` key, the deadline after which it is
        retired even if modules told about its successor have not confirmed
        (``None``: no deadline; see :mod:`m2mgw.keys.server_rollover`).
    """

    skid: int
    suite: str
    public: bytes
    sig_public: bytes | None = None
    status: ServerKeyStatus = ServerKeyStatus.ACTIVE
    created_at: int = 0
    retire_after: int | None = None


@dataclass(frozen=True)
class Session:
    """
    A live MGP/1 session with its durable replay state.

    :ivar highest_ctr: the highest DATA ``ctr`` accepted (0: none yet).
    :ivar window: bit ``i`` set means ``highest_ctr - i`` was accepted
        (bit 0 is ``highest_ctr`` itself once any counter was accepted).
    """

    sid: bytes
    module_id: str
    kid: int
    suite: str
    skid: int
    k_up: bytes = field(repr=False)
    k_down: bytes = field(repr=False)
    created_at: int
    expires_at: int
    highest_ctr: int = 0
    window: int = 0


@dataclass(frozen=True)
class Instruction:
    """
    An instruction in a module's durable queue.

    :ivar body: the instruction body, CBOR-encoded.
    :ivar wire_size: the size in bytes the instruction takes inside a reply's
        ``ins`` array, computed by the protocol engine when it is queued.
    :ivar source: who submitted it (an application principal, ``operator``, ``spool``, ``gateway``).
    :ivar exec_ts: the module's execution time from its confirmation.
    :ivar status: the module's ``conf`` status (0 done, 1 failed, 2 refused).
    :ivar result: the module's ``conf`` result, CBOR-encoded, if any.
    """

    module_id: str
    iid: int
    kind: str
    body: bytes
    wire_size: int
    state: InstructionState = InstructionState.QUEUED
    not_after: int | None = None
    attempts: int = 0
    source: str = "operator"
    idempotency_key: str | None = None
    created_at: int = 0
    updated_at: int = 0
    exec_ts: int | None = None
    status: int | None = None
    result: bytes | None = None


@dataclass(frozen=True)
class NewInstruction:
    """What a source asks to queue; the store assigns ``iid`` and dates."""

    module_id: str
    kind: str
    body: bytes
    wire_size: int
    not_after: int | None = None
    source: str = "operator"
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Event:
    """
    An application event in the durable outbox.

    :ivar seq: the per-application sequence number (1, 2, 3, ...).
    :ivar app: the application principal the event is addressed to.
    :ivar kind: ``report``, ``instruction``, ``key``, ``module`` or ``alert``.
    :ivar payload: a JSON-compatible mapping.
    """

    app: str
    seq: int
    kind: str
    module_id: str | None
    payload: Mapping[str, Any]
    created_at: int


@dataclass(frozen=True)
class NewEvent:
    """An event to append: to every application the module belongs to (or ``app``)."""

    kind: str
    module_id: str | None
    payload: Mapping[str, Any]
    #: Address a single application instead of the module's applications.
    app: str | None = None


@dataclass(frozen=True)
class SecurityEvent:
    """
    A security event or audit entry.

    :ivar category: ``drop`` (a datagram dropped, with ``reason``), ``auth``
        (something authenticated but refused), ``audit`` (an operator or
        application action).
    :ivar source: the peer address as ``host:port``, or the actor for audit entries.
    :ivar claimed_id: the identity the message claimed, if it could be read.
    """

    at: int
    category: str
    reason: str
    source: str = ""
    claimed_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Report:
    """A module's data report, as stored (``data`` is the CBOR the module sent)."""

    module_id: str
    received_at: int
    data: bytes
    module_ts: int | None = None


@dataclass(frozen=True)
class Confirmation:
    """A ``conf`` entry of a Payload: instruction ``iid`` executed at module time ``ts``."""

    iid: int
    status: int
    ts: int
    result: bytes | None = None


@dataclass(frozen=True)
class PayloadEffects:
    """
    What applying one authenticated Payload changes, decided by the protocol
    engine before it calls the store.  The store applies all of it in the
    transaction that accepts the message, or none of it.
    """

    report: Report | None = None
    confirmations: tuple[Confirmation, ...] = ()
    #: A verified key registration to record as ``pending`` (the store appends its ``key`` event).
    new_key: ModuleKey | None = None
    #: Instructions the engine queues in answer (e.g. a ``keygen`` for ``req "params"``).
    new_instructions: tuple[NewInstruction, ...] = ()
    events: tuple[NewEvent, ...] = ()


@dataclass(frozen=True)
class Delivery:
    """
    How to claim queued instructions for a reply being built.

    :ivar budget: bytes the ``ins`` array's elements may take in total.
    :ivar max_attempts: an instruction that has ridden this often becomes ``failed``.
    """

    budget: int
    max_attempts: int = 8


@dataclass(frozen=True)
class HelloCommit:
    """
    An authenticated HELLO to accept atomically (MGP/1 §5).

    The store accepts it only if ``ts`` is greater than the module's stored
    ``last_hello_ts``; it then stores ``ts``, ends the module's earlier session,
    stores ``session``, activates the key ``session.kid`` if it is pending
    (retiring every older key), records ``alias`` (if any), applies ``effects``
    and claims instructions per ``delivery``.
    """

    session: Session
    ts: int
    now: int
    effects: PayloadEffects = field(default_factory=PayloadEffects)
    alias: bytes | None = None
    alias_expires_at: int | None = None
    delivery: Delivery | None = None
    #: The engine's grace policy accepted ``session.kid`` although it has
    #: expired: the store accepts it ``active`` or ``expired`` (never retired
    #: or revoked) and changes no key status.
    expired_key_grace: bool = False


@dataclass(frozen=True)
class DataCommit:
    """
    An authenticated DATA to accept atomically (MGP/1 §8).

    The store accepts it only if ``ctr`` passes the session's replay window.
    If ``tok`` was already processed for the module, ``effects`` are *not*
    applied and the remembered ``outcome`` is returned instead; otherwise the
    effects are applied and ``outcome`` remembered with ``tok``.
    """

    sid: bytes
    ctr: int
    window_size: int
    tok: bytes
    now: int
    effects: PayloadEffects = field(default_factory=PayloadEffects)
    #: Engine-encoded result of processing (``res``/``err``), remembered with ``tok``.
    outcome: bytes = b""
    delivery: Delivery | None = None


@dataclass(frozen=True)
class ExchangeResult:
    """
    What the store returns for an accepted HELLO or DATA.

    :ivar instructions: claimed for the reply, ``iid`` ascending; already
        counted as one more attempt and in state ``sent``.
    :ivar more: instructions remain queued that did not fit.
    :ivar duplicate_outcome: for a DATA whose ``tok`` was seen before, the
        outcome remembered then (the effects were not applied again).
    :ivar created: the instructions created from ``effects.new_instructions``.
    """

    instructions: tuple[Instruction, ...] = ()
    more: bool = False
    duplicate_outcome: bytes | None = None
    created: tuple[Instruction, ...] = ()
    #: ``False`` when a ``new_key``'s kid was already taken (recorded nothing).
    key_recorded: bool = True
    #: Confirmations ignored because their instruction was not ``sent``
    #: (unknown, already confirmed, expired, failed or cancelled; MGP/1 §8.2).
    ignored_confirmations: int = 0
    #: The instructions whose state this exchange changed (``queued`` -> ``sent``,
    #: ``sent`` -> ``confirmed``, -> ``expired``, -> ``failed``), as they are after
    #: the change; the store appended an ``instruction`` event for each.
    transitions: tuple[Instruction, ...] = ()


@dataclass(frozen=True)
class RotationQuery:
    """
    Which modules are due for a key rotation (see
    :meth:`~m2mgw.interfaces.IModuleStore.keys_due_for_rotation`).

    A module matches if it is ``enabled``, has no ``pending`` key and no
    ``queued`` or ``sent`` ``keygen`` instruction, and its ``active`` key
    meets at least one of the criteria.

    :ivar activated_before: due by age: the key was activated (or, if it
        never was, created) at or before this time; ``None``: not by age.
    :ivar expiring_before: due by expiry: the key's ``not_after`` is at or
        before this time; ``None``: not by expiry.
    :ivar suites: due by suite retirement: the key is of one of these suites.
    :ivar groups: only modules of these groups (``None``: any group).
    :ivar exclude_groups: not the modules of these groups.
    :ivar after_module: only module identities above this one (paging).
    """

    activated_before: int | None = None
    expiring_before: int | None = None
    suites: tuple[str, ...] = ()
    groups: tuple[str, ...] | None = None
    exclude_groups: tuple[str, ...] = ()
    after_module: str = ""
