"""
Turning an operator's ``instruction submit`` into a queued instruction.

:func:`instruction_wire_size` is the size an instruction takes inside a
reply's ``ins`` array (MGP/1 §8.2), computed before the ``iid`` is known by
assuming the largest ``iid`` encoding likely in practice.  It belongs with
the protocol engine; it lives here until the protocol package offers it.
"""

from __future__ import annotations

import json
from typing import Any

from m2mgw.admin import OperatorError
from m2mgw.protocol import cbor
from m2mgw.records import NewInstruction

__all__ = [
    "IID_PLACEHOLDER",
    "MAX_KIND_BYTES",
    "REPLY_OVERHEAD",
    "RESERVED_KINDS",
    "body_from_json",
    "instruction_wire_size",
    "new_operator_instruction",
]

#: Stands for the ``iid`` when sizing: 2**32 encodes in 9 bytes, the size of
#: any ``iid`` from 2**32 up, so the estimate is never smaller than the real size
#: for ``iid``s below 2**64.
IID_PLACEHOLDER = 1 << 32

#: The longest instruction kind accepted, in UTF-8 bytes.
MAX_KIND_BYTES = 64

#: Kinds MGP/1 §8.2 reserves; the gateway alone creates ``keygen`` and ``skey``.
RESERVED_KINDS = ("keygen", "rehello", "skey")

#: The largest ``BODY_JSON`` argument accepted, in characters.
MAX_BODY_JSON = 64 * 1024

#: Bytes of a DATA_REPLY that are not its ``ins`` entries, bounded from above
#: (envelope with an 8-byte ``sid`` and a 9-byte ``ctr``, AEAD tag, ``ack`` with a
#: 32-byte ``tok``, ``time``, ``more``, the ``ins`` head, an ``alias``): an
#: instruction larger than ``max_datagram`` minus this can never be delivered.
REPLY_OVERHEAD = 128


def instruction_wire_size(kind: str, body: bytes, not_after: int | None) -> int:
    """
    The encoded size of ``[iid, kind, body, ? not_after]`` with ``iid`` =
    :data:`IID_PLACEHOLDER`.

    :param body: the body, already CBOR-encoded.
    """
    elements: list[bytes] = [cbor.encode(IID_PLACEHOLDER), cbor.encode(kind), body]
    if not_after is not None:
        elements.append(cbor.encode(not_after))
    array_head = 1  # an array of 3 or 4 elements (RFC 8949 §3.1)
    return array_head + sum(len(e) for e in elements)


def _refuse_constant(name: str) -> Any:
    raise OperatorError(f"BODY_JSON: {name} is not a JSON value")


def body_from_json(text: str | None) -> Any:
    """
    The instruction body from its JSON text (``None``: JSON ``null``).

    :raise m2mgw.admin.OperatorError: not JSON, or too long.
    """
    if text is None:
        return None
    if len(text) > MAX_BODY_JSON:
        raise OperatorError(f"BODY_JSON is longer than {MAX_BODY_JSON} characters")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise OperatorError(f"BODY_JSON is not JSON: {e}") from None
    except RecursionError:
        raise OperatorError("BODY_JSON is nested too deeply") from None


def new_operator_instruction(
    module_id: str,
    kind: str,
    body: Any,
    *,
    now: int,
    ttl: int | None = None,
    not_after: int | None = None,
    max_size: int | None = None,
    source: str = "operator",
    idempotency_key: str | None = None,
) -> NewInstruction:
    """
    Check and encode an operator's instruction.

    :param body: a JSON-compatible value (encoded as deterministic CBOR).
    :param ttl: seconds from ``now`` after which it expires (or give ``not_after``).
    :param max_size: refuse an instruction whose ``ins`` entry alone is larger
        (it could never fit in a reply).
    :raise m2mgw.admin.OperatorError: a reserved or malformed kind, a
        ``rehello`` with a body, a time in the past, or an instruction too large.
    """
    raw_kind = kind.encode("utf-8", "surrogatepass")
    if not kind or len(raw_kind) > MAX_KIND_BYTES or not kind.isprintable():
        raise OperatorError(
            f"an instruction kind is 1-{MAX_KIND_BYTES} bytes of printable text, not {kind!r}"
        )
    if kind in ("keygen", "skey"):
        raise OperatorError(f"{kind!r} is reserved: only the gateway queues it (MGP/1 §8.2)")
    if kind == "rehello" and body is not None:
        raise OperatorError("a 'rehello' instruction has no body (BODY_JSON must be null)")
    if ttl is not None and not_after is not None:
        raise OperatorError("give --ttl or --not-after, not both")
    if ttl is not None:
        if ttl < 1:
            raise OperatorError(f"--ttl must be at least 1 second, not {ttl}")
        not_after = now + ttl
    if not_after is not None and not_after <= now:
        raise OperatorError(f"--not-after {not_after} is not in the future (now is {now})")
    try:
        encoded = cbor.encode(body)
    except (TypeError, ValueError) as e:
        raise OperatorError(f"the body cannot be encoded as CBOR: {e}") from None
    size = instruction_wire_size(kind, encoded, not_after)
    if max_size is not None and size > max_size:
        raise OperatorError(
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
