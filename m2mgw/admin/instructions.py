"""
Turning an operator's ``instruction submit`` into a queued instruction.

The rules are those of every instruction source,
:mod:`m2mgw.instructions.submission`; this module reads the command's
``BODY_JSON`` argument and turns a refusal into an
:class:`~m2mgw.admin.OperatorError`, which ``m2mgw-admin`` prints as one line.
"""

from __future__ import annotations

from typing import Any, Final

from m2mgw.admin import OperatorError
from m2mgw.instructions.submission import (
    MAX_KIND_BYTES,
    REPLY_OVERHEAD,
    RESERVED_KINDS,
    InvalidInstruction,
    new_instruction,
    parse_json,
)
from m2mgw.instructions.submission import encoded_wire_size as instruction_wire_size
from m2mgw.records import NewInstruction

__all__ = [
    "IID_PLACEHOLDER",
    "MAX_BODY_JSON",
    "MAX_KIND_BYTES",
    "REPLY_OVERHEAD",
    "RESERVED_KINDS",
    "body_from_json",
    "instruction_wire_size",
    "new_operator_instruction",
]

#: An ``iid`` whose encoding (9 bytes) is as long as that of any ``iid``
#: below 2**64: :func:`instruction_wire_size` is the size of an instruction
#: with this ``iid``, never smaller than the real size.
IID_PLACEHOLDER: Final = 1 << 32

#: The largest ``BODY_JSON`` argument accepted, in characters.
MAX_BODY_JSON: Final = 64 * 1024


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
        return parse_json(text, "BODY_JSON")
    except InvalidInstruction as e:
        raise OperatorError(str(e)) from None


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
    Check and encode an operator's instruction
    (:func:`m2mgw.instructions.submission.new_instruction`).

    :raise m2mgw.admin.OperatorError: it breaks a rule; the message names it.
    """
    try:
        return new_instruction(
            module_id,
            kind,
            body,
            now=now,
            source=source,
            ttl=ttl,
            not_after=not_after,
            max_size=max_size,
            idempotency_key=idempotency_key,
        )
    except InvalidInstruction as e:
        raise OperatorError(str(e)) from None
