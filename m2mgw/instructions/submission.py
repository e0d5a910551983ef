"""
The rules every instruction source applies before it queues an instruction.

An instruction arrives as a module identity, a kind, a JSON-compatible body
and an optional expiry (``ttl`` seconds from now, or an absolute
``not_after``).  :func:`new_instruction` checks it and returns the
:class:`~m2mgw.records.NewInstruction` to queue, with the body encoded as
deterministic CBOR and its ``wire_size`` computed by
:func:`m2mgw.protocol.bodies.instruction_wire_size`, the function the protocol
engine sizes its own instructions with.  A refusal is an
:class:`InvalidInstruction` whose message is one line naming what to fix;
each source reports it its own way (``m2mgw-admin`` prints it, the spool
writes it into a ``.reason`` file).

Nothing here does I/O or reads a clock: ``now`` is given.
"""

from __future__ import annotations

import json
from typing import Any, Final

from m2mgw.errors import M2MGWError
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import (
    KIND_KEYGEN,
    KIND_REHELLO,
    KIND_SKEY,
    MAX_ID,
    MIN_ID,
    instruction_wire_size,
)
from m2mgw.records import NewInstruction

__all__ = [
    "GATEWAY_KINDS",
    "MAX_BODY_DEPTH",
    "MAX_KIND_BYTES",
    "MAX_NOT_AFTER",
    "REPLY_OVERHEAD",
    "RESERVED_KINDS",
    "InvalidInstruction",
    "encoded_wire_size",
    "new_instruction",
    "parse_json",
]

#: The longest instruction kind accepted, in UTF-8 bytes.
MAX_KIND_BYTES: Final = 64

#: The kinds MGP/1 §8.2 reserves.
RESERVED_KINDS: Final = (KIND_KEYGEN, KIND_REHELLO, KIND_SKEY)

#: The reserved kinds only the gateway itself queues (``rehello`` may be
#: submitted, without a body).
GATEWAY_KINDS: Final = (KIND_KEYGEN, KIND_SKEY)

#: Bytes of a DATA_REPLY that are not its ``ins`` entries, bounded from above
#: (envelope with an 8-byte ``sid`` and a 9-byte ``ctr``, AEAD tag, ``ack`` with a
#: 32-byte ``tok``, ``time``, ``more``, the ``ins`` head, an ``alias``): an
#: instruction larger than ``max_datagram`` minus this can never be delivered.
REPLY_OVERHEAD: Final = 128

#: The latest ``not_after`` accepted: the stores keep times as signed 64-bit integers.
MAX_NOT_AFTER: Final = 2**63 - 1

#: The deepest body accepted (a scalar is 1 deep, ``[1]`` 2).  A reply's
#: plaintext holds the body three levels down (ReplyBody map, ``ins`` array,
#: instruction array) and no decoder accepts more than
#: :data:`m2mgw.protocol.cbor.MAX_DEPTH` levels: a deeper body could be queued
#: but never delivered.
MAX_BODY_DEPTH: Final = cbor.MAX_DEPTH - 3

_NULL: Final = cbor.encode(None)


class InvalidInstruction(M2MGWError):
    """
    A submitted instruction breaks a rule (a reserved or malformed kind, a
    past expiry, a body too large, not JSON).  The message is one line naming
    what to fix.
    """


def encoded_wire_size(kind: str, encoded_body: bytes, not_after: int | None = None) -> int:
    """
    :func:`~m2mgw.protocol.bodies.instruction_wire_size` of an instruction
    whose body is already encoded as CBOR (an upper bound, since the ``iid``
    is not known yet).  The body is one element of the instruction's array, so
    its encoding takes the place of ``null``'s one byte.

    :param kind: the instruction kind.
    :param encoded_body: the body, CBOR-encoded.
    :param not_after: the expiry, if any.
    :raise ValueError: ``kind`` or ``not_after`` is of the wrong type or range.
    """
    return instruction_wire_size(kind, None, not_after) - len(_NULL) + len(encoded_body)


def _refuse_constant(name: str) -> Any:
    """Refuse ``NaN`` and ``Infinity``, which JSON does not have."""
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text: str, what: str) -> Any:
    """
    A JSON value from its text; ``NaN`` and ``Infinity`` are refused.

    :param text: the JSON text.
    :param what: names the text in the error message (``"BODY_JSON"``).
    :raise InvalidInstruction: it is not JSON, or is nested too deeply.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise InvalidInstruction(f"{what} is not JSON: {e}") from None
    except RecursionError:
        raise InvalidInstruction(f"{what} is nested too deeply") from None


def _check_module_id(module_id: str) -> None:
    """:raise InvalidInstruction: not 1-64 bytes of UTF-8 (MGP/1 §4)."""
    try:
        size = len(module_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInstruction("the module id is not valid UTF-8") from None
    if not MIN_ID <= size <= MAX_ID:
        raise InvalidInstruction(f"a module id is {MIN_ID}-{MAX_ID} bytes of UTF-8, not {size}")


def _check_kind(kind: str, body: Any) -> None:
    """:raise InvalidInstruction: a malformed or reserved kind, or a ``rehello`` with a body."""
    raw_kind = kind.encode("utf-8", "surrogatepass")
    if not kind or len(raw_kind) > MAX_KIND_BYTES or not kind.isprintable():
        raise InvalidInstruction(
            f"an instruction kind is 1-{MAX_KIND_BYTES} bytes of printable text,"
            f" not {kind[: MAX_KIND_BYTES + 1]!r}"
        )
    if kind in GATEWAY_KINDS:
        raise InvalidInstruction(f"{kind!r} is reserved: only the gateway queues it (MGP/1 §8.2)")
    if kind == KIND_REHELLO and body is not None:
        raise InvalidInstruction("a 'rehello' instruction has no body (the body must be null)")


def _check_depth(body: Any) -> None:
    """:raise InvalidInstruction: ``body`` is nested deeper than :data:`MAX_BODY_DEPTH`."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_BODY_DEPTH:
            raise InvalidInstruction(
                f"the body is nested more than {MAX_BODY_DEPTH} levels deep (MGP/1 decoders"
                f" accept {cbor.MAX_DEPTH} in a reply)"
            )
        if isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())


def _expiry(now: int, ttl: int | None, not_after: int | None) -> int | None:
    """
    The ``not_after`` of an instruction given ``ttl`` or ``not_after``.

    :raise InvalidInstruction: both given, a ``ttl`` below 1, or a time not in the future.
    """
    if ttl is not None and not_after is not None:
        raise InvalidInstruction("give ttl or not_after, not both")
    if ttl is not None:
        if ttl < 1:
            raise InvalidInstruction(f"ttl must be at least 1 second, not {ttl}")
        not_after = now + ttl
    if not_after is not None:
        if not_after <= now:
            raise InvalidInstruction(f"not_after {not_after} is not in the future (now is {now})")
        if not_after > MAX_NOT_AFTER:
            raise InvalidInstruction(f"not_after {not_after} is beyond {MAX_NOT_AFTER}")
    return not_after


def new_instruction(
    module_id: str,
    kind: str,
    body: Any,
    *,
    now: int,
    source: str,
    ttl: int | None = None,
    not_after: int | None = None,
    max_size: int | None = None,
    idempotency_key: str | None = None,
) -> NewInstruction:
    """
    Check an instruction and encode it for the queue.

    :param module_id: the module it is for (whether it exists is the store's question).
    :param kind: the instruction kind; ``keygen`` and ``skey`` are refused
        (only the gateway queues them) and ``rehello`` takes no body.
    :param body: a JSON-compatible value, encoded as deterministic CBOR.
    :param now: the current time, in seconds since the epoch.
    :param source: who submits it (``operator``, ``spool``, an application).
    :param ttl: seconds from ``now`` after which it expires (or give ``not_after``).
    :param not_after: the time after which it expires.
    :param max_size: refuse an instruction whose ``ins`` entry alone is
        larger (no reply could ever carry it).
    :param idempotency_key: see :meth:`m2mgw.interfaces.IModuleStore.enqueue`.
    :return: the instruction to queue.
    :raise InvalidInstruction: a malformed module id, a reserved or malformed
        kind, a ``rehello`` with a body, a bad expiry, a body nested too deeply
        or that CBOR cannot encode, or an instruction too large.
    """
    _check_module_id(module_id)
    _check_kind(kind, body)
    not_after = _expiry(now, ttl, not_after)
    _check_depth(body)
    try:
        encoded = cbor.encode(body)
    except (TypeError, ValueError) as e:
        raise InvalidInstruction(f"the body cannot be encoded as CBOR: {e}") from None
    size = encoded_wire_size(kind, encoded, not_after)
    if max_size is not None and size > max_size:
        raise InvalidInstruction(
            f"the instruction takes {size} bytes; no reply can carry more than {max_size}"
        )
    return NewInstruction(
        module_id=module_id,
        kind=kind,
        body=encoded,
        wire_size=size,
        not_after=not_after,
        source=source,
        idempotency_key=idempotency_key,
    )
