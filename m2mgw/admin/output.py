"""
What ``m2mgw-admin`` prints: the JSON form of each record, aligned tables
for people, and a progress bar for long imports.

The JSON forms are the contract for scripts: byte strings are lower-case
hex, times are integer seconds since the epoch, enums are their values.
Secrets never appear: a module's PSK is reported only as ``has_psk`` and a
session's traffic keys not at all.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from m2mgw.protocol import cbor
from m2mgw.records import (
    Instruction,
    Module,
    ModuleKey,
    SecurityEvent,
    ServerKey,
    Session,
)

__all__ = [
    "Progress",
    "body_json",
    "dumps",
    "dumps_compact",
    "format_table",
    "format_time",
    "instruction_json",
    "module_json",
    "module_key_json",
    "security_event_json",
    "server_key_json",
    "session_json",
]


def dumps(document: Any) -> str:
    """A JSON document as ``m2mgw-admin --json`` prints it (sorted keys, indented)."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)


def dumps_compact(document: Any) -> str:
    """A JSON value on one line (sorted keys), for streamed lists."""
    return json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def format_time(epoch: int | None) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM:SSZ`` (UTC), or ``-``."""
    if epoch is None or epoch == 0:
        return "-"
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *text_rows]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return lines


def module_json(module: Module) -> dict[str, Any]:
    """A module without its PSK."""
    return {
        "id": module.module_id,
        "status": module.status.value,
        "group": module.group,
        "has_psk": module.psk is not None,
        "psk_reusable": module.psk_reusable,
        "last_hello_ts": module.last_hello_ts,
        "created_at": module.created_at,
    }


def module_key_json(key: ModuleKey) -> dict[str, Any]:
    """One key of a module's series."""
    return {
        "kid": key.kid,
        "suite": key.suite,
        "public": key.public.hex(),
        "status": key.status.value,
        "vouched_by": key.vouched_by,
        "created_at": key.created_at,
        "activated_at": key.activated_at,
        "retired_at": key.retired_at,
        "not_after": key.not_after,
        "pid": key.pid,
    }


def server_key_json(key: ServerKey, status: str | None = None) -> dict[str, Any]:
    """A server key reference; ``status`` overrides the record's (the store's word)."""
    return {
        "skid": key.skid,
        "suite": key.suite,
        "public": key.public.hex(),
        "sig_public": key.sig_public.hex() if key.sig_public is not None else None,
        "status": status if status is not None else key.status.value,
        "created_at": key.created_at,
    }


def session_json(session: Session, now: int) -> dict[str, Any]:
    """A session summary, without its traffic keys; ``expired`` as of ``now``."""
    return {
        "expired": session.expires_at <= now,
        "sid": session.sid.hex(),
        "kid": session.kid,
        "suite": session.suite,
        "skid": session.skid,
        "created_at": session.created_at,
        "expires_at": session.expires_at,
        "highest_ctr": session.highest_ctr,
    }


def body_json(body: bytes) -> Any:
    """
    An instruction body or result for JSON: the decoded CBOR when it maps to
    JSON (text keys, no byte strings or tags), else ``{"cbor": hex}``.
    """
    try:
        value = cbor.decode(body, check_deterministic=False)
        json.dumps(value, allow_nan=False)
    except Exception:  # not plain JSON data: show the bytes
        return {"cbor": body.hex()}
    return value


def instruction_json(instruction: Instruction) -> dict[str, Any]:
    """A queued (or finished) instruction."""
    return {
        "id": instruction.module_id,
        "iid": instruction.iid,
        "kind": instruction.kind,
        "body": body_json(instruction.body),
        "wire_size": instruction.wire_size,
        "state": instruction.state.value,
        "not_after": instruction.not_after,
        "attempts": instruction.attempts,
        "source": instruction.source,
        "idempotency_key": instruction.idempotency_key,
        "created_at": instruction.created_at,
        "updated_at": instruction.updated_at,
        "exec_ts": instruction.exec_ts,
        "status": instruction.status,
        "result": body_json(instruction.result) if instruction.result is not None else None,
    }


def security_event_json(event: SecurityEvent) -> dict[str, Any]:
    """A security event or audit entry."""
    return {
        "at": event.at,
        "category": event.category,
        "reason": event.reason,
        "source": event.source,
        "claimed_id": event.claimed_id,
        "detail": event.detail,
    }


class Progress:
    """
    A one-line progress bar on a terminal, redrawn at most ten times a
    second; silent when ``stream`` is not a terminal.

    :param clock: monotonic seconds (injectable for tests).
    """

    WIDTH = 30

    def __init__(
        self,
        stream: IO[str],
        total: int,
        label: str,
        *,
        force: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.label = label
        self.clock = clock
        isatty = getattr(stream, "isatty", None)
        self.enabled = force if force is not None else bool(isatty and isatty())
        self._last = -1.0
        self._last_done = -1
        self._drawn = False

    def update(self, done: int) -> None:
        """Show ``done`` of ``total`` (throttled)."""
        if not self.enabled:
            return
        if done == self._last_done:
            return
        now = self.clock()
        if done < self.total and now - self._last < 0.1:
            return
        self._last, self._last_done = now, done
        fraction = min(done / self.total, 1.0)
        filled = int(self.WIDTH * fraction)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        percent = int(100 * fraction)  # never shows 100% before the end
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {percent:3d}%")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
