"""
The decision rules every store applies, as pure functions on records.

Which instructions ride in a reply and which expire or fail on the way, how
a key's dates change with its status, who an event is addressed to and what
it says: each rule is written here once, and :mod:`m2mgw.store.operations`
applies it inside a store's transaction.  Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from m2mgw.errors import DecodeError
from m2mgw.protocol import cbor
from m2mgw.records import (
    PENDING_INSTRUCTION_STATES,
    Confirmation,
    Delivery,
    Instruction,
    InstructionState,
    KeyStatus,
    ModuleKey,
    NewEvent,
    NewInstruction,
    RotationQuery,
)

#: How many DATA ``tok`` values (with their outcome) a store remembers per module (MGP/1 §8.4).
TOKEN_MEMORY = 16

#: ``source`` values that name the gateway's own producers, not an application principal.
NON_APP_SOURCES = frozenset({"operator", "spool", "gateway"})

#: The largest integer a store must keep (SQLite's signed 64-bit ``INTEGER``).
INT64_MAX = 2**63 - 1

#: The states in which an instruction waits for delivery or for its confirmation.
PENDING_STATES = PENDING_INSTRUCTION_STATES
#: The pending states of an instruction that has not ridden yet.
UNSENT_STATES = (InstructionState.QUEUED, InstructionState.WAITING)

#: The key states that can open a session.
USABLE_KEY_STATES = (KeyStatus.ACTIVE, KeyStatus.PENDING)

#: The key states an expired key may be in and still open a session in its grace period.
GRACE_KEY_STATES = (KeyStatus.ACTIVE, KeyStatus.EXPIRED)

#: The key states that end a key's use; entering one stamps ``retired_at``.
ENDED_KEY_STATES = (KeyStatus.RETIRED, KeyStatus.EXPIRED, KeyStatus.REVOKED)

#: The ``event`` of a ``key`` event, by the key's new status.
KEY_EVENTS = {
    KeyStatus.PENDING: "registered",
    KeyStatus.ACTIVE: "activated",
    KeyStatus.RETIRED: "retired",
    KeyStatus.EXPIRED: "expired",
    KeyStatus.REVOKED: "revoked",
}

#: The instruction kind whose queuing is a key event ``requested`` (MGP/1 §8.2).
KEYGEN_KIND = "keygen"

#: Event kinds raised by a module's payload that wait while the module waits
#: for approval: forwarding data is what approval allows.
HELD_EVENT_KINDS = frozenset({"report", "alert"})


def fits_int64(value: int) -> bool:
    """
    True if ``value`` can be stored as it is by every store.

    Module-supplied integers (``ts``, ``ctr``, ``iid`` in a ``conf``) are CBOR
    unsigned integers of up to 64 bits; the top half of that range cannot be
    stored and is refused rather than truncated.
    """
    return 0 <= value <= INT64_MAX


def storable_int(value: int | None) -> int | None:
    """``value`` if :func:`fits_int64`, else ``None`` (module-supplied, informative values)."""
    return value if value is not None and fits_int64(value) else None


# -- instructions ------------------------------------------------------------------


def queued_instruction(new: NewInstruction, iid: int, now: int) -> Instruction:
    """The :class:`Instruction` that queuing ``new`` as ``iid`` at ``now`` creates."""
    return Instruction(
        module_id=new.module_id,
        iid=iid,
        kind=new.kind,
        body=new.body,
        wire_size=new.wire_size,
        state=InstructionState.QUEUED,
        not_after=new.not_after,
        source=new.source,
        idempotency_key=new.idempotency_key,
        created_at=now,
        updated_at=now,
    )


def instruction_expired(instruction: Instruction, now: int) -> bool:
    """True if the instruction's ``not_after`` has passed (it was valid up to that second)."""
    return instruction.not_after is not None and instruction.not_after < now


def with_state(instruction: Instruction, state: InstructionState, now: int) -> Instruction:
    """``instruction`` moved to ``state`` at ``now``."""
    return replace(instruction, state=state, updated_at=now)


def confirmed(instruction: Instruction, confirmation: Confirmation, now: int) -> Instruction:
    """
    ``instruction`` (in state ``sent``) after the module's ``confirmation``.

    A module time or status too large to store is recorded as unknown (``None``).
    """
    return replace(
        instruction,
        state=InstructionState.CONFIRMED,
        exec_ts=storable_int(confirmation.ts),
        status=storable_int(confirmation.status),
        result=confirmation.result,
        updated_at=now,
    )


@dataclass
class DeliveryPlan:
    """
    What claiming instructions for one reply changes.

    :ivar expired: instructions found past their ``not_after``, now ``expired``.
    :ivar failed: instructions that rode ``max_attempts`` times, now ``failed``.
    :ivar taken: the instructions that ride, ``iid`` ascending, now ``sent``
        with one more attempt.
    :ivar first_ride: the ``iid``s of those among ``taken`` that were
        ``queued`` (their state changes; the others were ``sent`` already).
    :ivar more: deliverable instructions remain that did not fit.
    """

    expired: list[Instruction] = field(default_factory=list)
    failed: list[Instruction] = field(default_factory=list)
    taken: list[Instruction] = field(default_factory=list)
    first_ride: set[int] = field(default_factory=set)
    more: bool = False


def plan_delivery(
    pending: Iterable[Instruction],
    preferred: Sequence[Instruction],
    delivery: Delivery,
    now: int,
) -> DeliveryPlan:
    """
    Choose the instructions that ride in a reply (MGP/1 §8.3).

    The candidates are considered in this order: ``preferred`` (the
    instructions the message being answered has just created, e.g. a
    ``keygen`` answering ``req "params"``: they ride in this very reply,
    leaving out older ones if room is short), then ``pending`` (the module's
    ``queued`` and ``sent`` instructions, ``iid`` ascending).  A candidate
    past its ``not_after`` becomes ``expired`` and one that already rode
    ``max_attempts`` times becomes ``failed``; neither rides.  The others are
    taken while the sum of their ``wire_size`` stays within the budget; the
    first that does not fit ends the choice, and ``more`` is set.

    ``pending`` is consumed lazily and only as far as needed, so a store can
    page through a long queue.

    :param pending: the module's deliverable instructions, ``iid`` ascending;
        it may include the ``preferred`` ones, which are skipped there.
    :param preferred: instructions to consider first, ``iid`` ascending.
    """
    plan = DeliveryPlan()
    budget = delivery.budget
    chosen: list[Instruction] = []
    preferred_iids = {instruction.iid for instruction in preferred}

    def consider(instruction: Instruction) -> bool:
        """Handle one candidate; False ends the choice."""
        nonlocal budget
        if instruction_expired(instruction, now):
            plan.expired.append(with_state(instruction, InstructionState.EXPIRED, now))
        elif instruction.attempts >= delivery.max_attempts:
            plan.failed.append(with_state(instruction, InstructionState.FAILED, now))
        elif instruction.wire_size <= budget:
            budget -= instruction.wire_size
            chosen.append(instruction)
        else:
            plan.more = True
            return False
        return True

    if all(consider(instruction) for instruction in preferred):
        for instruction in pending:
            if instruction.iid not in preferred_iids and not consider(instruction):
                break
    chosen.sort(key=lambda instruction: instruction.iid)
    plan.first_ride = {i.iid for i in chosen if i.state in UNSENT_STATES}
    plan.taken = [
        replace(
            instruction,
            state=InstructionState.SENT,
            attempts=instruction.attempts + 1,
            updated_at=now,
        )
        for instruction in chosen
    ]
    return plan


# -- keys --------------------------------------------------------------------------


def key_with_status(key: ModuleKey, status: KeyStatus, now: int) -> ModuleKey:
    """
    ``key`` moved to ``status`` at ``now``: becoming ``active`` stamps
    ``activated_at``; ending (retired, expired, revoked) stamps ``retired_at``
    unless an earlier end already did.
    """
    if status is KeyStatus.ACTIVE:
        return replace(key, status=status, activated_at=now)
    if status in ENDED_KEY_STATES:
        return replace(
            key, status=status, retired_at=now if key.retired_at is None else key.retired_at
        )
    return replace(key, status=status)


def rotation_group_matches(group: str, query: RotationQuery) -> bool:
    """True if a module of ``group`` is among those ``query`` selects by group."""
    if query.groups is not None and group not in query.groups:
        return False
    return group not in query.exclude_groups


def rotation_due(key: ModuleKey, query: RotationQuery) -> bool:
    """True if the active ``key`` is due for rotation by age, expiry or suite under ``query``."""
    started = key.activated_at if key.activated_at is not None else key.created_at
    if query.activated_before is not None and started <= query.activated_before:
        return True
    if (
        query.expiring_before is not None
        and key.not_after is not None
        and key.not_after <= query.expiring_before
    ):
        return True
    return key.suite in query.suites


def key_expired(key: ModuleKey, now: int) -> bool:
    """True if the key is usable by status but its ``not_after`` has passed."""
    return key.status in USABLE_KEY_STATES and key.not_after is not None and key.not_after < now


def keys_retired_by(keys: Iterable[ModuleKey], kid: int, now: int) -> list[ModuleKey]:
    """
    The keys that activating key ``kid`` retires (MGP/1 §9): every older key
    still active or pending, after the change.  Newer pending keys stay pending.
    """
    return [
        key_with_status(key, KeyStatus.RETIRED, now)
        for key in keys
        if key.kid < kid and key.status in USABLE_KEY_STATES
    ]


# -- application events ------------------------------------------------------------


def instruction_event(instruction: Instruction) -> NewEvent:
    """
    The ``instruction`` event reporting ``instruction``'s current state
    (MGP/1 §10): to the application that submitted it, or, for the gateway's
    own sources, to every application of the module.
    """
    source = instruction.source
    return NewEvent(
        kind="instruction",
        module_id=instruction.module_id,
        payload={
            "iid": instruction.iid,
            "state": instruction.state.value,
            "kind": instruction.kind,
            "exec_ts": instruction.exec_ts,
            "status": instruction.status,
            "attempts": instruction.attempts,
        },
        app=None if source in NON_APP_SOURCES else source,
    )


def key_event(key: ModuleKey) -> NewEvent:
    """The ``key`` event reporting that ``key`` was recorded or changed status."""
    return NewEvent(
        kind="key",
        module_id=key.module_id,
        payload={
            "event": KEY_EVENTS[key.status],
            "kid": key.kid,
            "status": key.status.value,
            "suite": key.suite,
        },
    )


def keygen_requested_event(instruction: Instruction) -> NewEvent | None:
    """
    The ``key`` event ``requested`` for a queued ``keygen`` instruction, from
    its Params (``suite`` 1, ``kid`` 7, ``pid`` 9); ``None`` for another kind
    or a body that is not a Params map.
    """
    if instruction.kind != KEYGEN_KIND:
        return None
    try:
        params = cbor.decode(instruction.body)
    except DecodeError:
        return None
    if not isinstance(params, dict):
        return None
    kid, suite, pid = params.get(7), params.get(1), params.get(9)
    if not isinstance(kid, int) or not isinstance(suite, str) or not fits_int64(kid):
        return None
    return NewEvent(
        kind="key",
        module_id=instruction.module_id,
        payload={
            "event": "requested",
            "kid": kid,
            "status": None,
            "suite": suite,
            "pid": pid if isinstance(pid, int) and fits_int64(pid) else None,
            "iid": instruction.iid,
            "source": instruction.source,
        },
    )


def module_event(module_id: str, event: str, now: int, **fields: Any) -> NewEvent:
    """A ``module`` event (``pending-approval``, ``approved``, ``disabled``) for its apps."""
    return NewEvent(
        kind="module",
        module_id=module_id,
        payload={"event": event, "module": module_id, "at": now, **fields},
    )


#: The syslog severity of the gateway's own alerts (3: error).
ALERT_LEVEL_ERROR = 3


def events_dropped_event(
    app: str, first_seq: int, last_seq: int, max_events: int, max_age: int
) -> NewEvent:
    """The ``alert`` telling ``app`` that its events ``first_seq``-``last_seq`` were dropped."""
    dropped = last_seq - first_seq + 1
    limits = f"{max_events or 'unlimited'} events, {max_age or 'unlimited'} s"
    return NewEvent(
        kind="alert",
        module_id=None,
        payload={
            "origin": "gateway",
            "code": "events-dropped",
            "level": ALERT_LEVEL_ERROR,
            "text": f"{dropped} unacknowledged events were dropped (retention: {limits})",
            "dropped": dropped,
            "first_seq": first_seq,
            "last_seq": last_seq,
        },
        app=app,
    )


def event_recipients(event: NewEvent, module_apps: Sequence[str]) -> list[str]:
    """The applications ``event`` goes to: its ``app``, or every application of its module."""
    return [event.app] if event.app is not None else sorted(module_apps)


def encode_payload(payload: Mapping[str, Any]) -> str:
    """
    An event payload as the JSON text the stores keep.

    :raise TypeError: the payload is not JSON-compatible.
    :raise ValueError: it holds a NaN or an infinity.
    """
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def decode_payload(text: str) -> dict[str, Any]:
    """The payload :func:`encode_payload` wrote."""
    payload: dict[str, Any] = json.loads(text)
    return payload


# -- replay window -----------------------------------------------------------------


def window_to_bytes(bits: int) -> bytes:
    """A replay window bitmap as big-endian bytes (it may exceed 64 bits)."""
    return bits.to_bytes((bits.bit_length() + 7) // 8, "big")


def window_from_bytes(data: bytes) -> int:
    """The bitmap :func:`window_to_bytes` wrote."""
    return int.from_bytes(data, "big")
