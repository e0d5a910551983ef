"""
Silence, counted (MGP/1 §11).

The gateway answers nothing it cannot authenticate, but it counts every drop
per reason, per source address and per claimed identity, and turns the counts
into security events.  :class:`DropCounters` is the in-memory side: cheap
enough to call for every datagram, bounded in memory whatever an attacker
sends, and drained periodically into the store as aggregated
:class:`~m2mgw.records.SecurityEvent` records (one row per reason, source and
identity per flush, not one per datagram, so a flood cannot turn into a
write amplification attack on the database).
"""

from __future__ import annotations

import enum
from collections import Counter

from m2mgw.records import SecurityEvent


class DropReason(str, enum.Enum):
    """Why a datagram got no reply."""

    SIZE = "size"
    MALFORMED = "malformed"
    UNKNOWN_SUITE = "unknown-suite"
    UNKNOWN_SKID = "unknown-skid"
    BAD_POINT = "bad-point"
    BAD_TAG = "bad-tag"
    BAD_PLAINTEXT = "bad-plaintext"
    UNKNOWN_MODULE = "unknown-module"
    DISABLED_MODULE = "disabled-module"
    BAD_KID = "bad-kid"
    UNKNOWN_KID = "unknown-kid"
    RETIRED_KID = "retired-kid"
    EXPIRED_KID = "expired-kid"
    BAD_SIGNATURE = "bad-signature"
    BAD_PSK_MAC = "bad-psk-mac"
    PSK_REFUSED = "psk-refused"
    STALE_TS = "stale-ts"
    UNKNOWN_SID = "unknown-sid"
    EXPIRED_SID = "expired-sid"
    REPLAY = "replay"
    MALFORMED_BODY = "malformed-body"
    INTERNAL = "internal"

    @property
    def after_decryption(self) -> bool:
        """True when the datagram decrypted: the drop concerns a claimed identity."""
        return self in _AFTER_DECRYPTION


_AFTER_DECRYPTION = frozenset(
    {
        DropReason.BAD_PLAINTEXT,
        DropReason.UNKNOWN_MODULE,
        DropReason.DISABLED_MODULE,
        DropReason.BAD_KID,
        DropReason.UNKNOWN_KID,
        DropReason.RETIRED_KID,
        DropReason.EXPIRED_KID,
        DropReason.BAD_SIGNATURE,
        DropReason.BAD_PSK_MAC,
        DropReason.PSK_REFUSED,
        DropReason.STALE_TS,
        DropReason.MALFORMED_BODY,
    }
)


class DropCounters:
    """
    Drop counts by reason (unbounded: the reasons are a fixed set), and
    pending aggregated security events by (reason, source host, claimed
    identity), bounded by ``max_pending`` distinct keys; beyond it, further
    keys are folded into one ``(reason, "*", None)`` entry per reason.
    """

    def __init__(self, max_pending: int = 10_000) -> None:
        self.by_reason: Counter[str] = Counter()
        self._pending: Counter[tuple[str, str, str | None]] = Counter()
        self._max_pending = max_pending

    def drop(self, reason: DropReason, source: str, claimed_id: str | None = None) -> None:
        """Count one dropped datagram from ``source`` (a host) claiming ``claimed_id``."""
        self.by_reason[reason.value] += 1
        key = (reason.value, source, claimed_id)
        if key not in self._pending and len(self._pending) >= self._max_pending:
            key = (reason.value, "*", None)
        self._pending[key] += 1

    @property
    def total(self) -> int:
        """Every drop counted since start."""
        return sum(self.by_reason.values())

    def drain(self, now: int) -> list[SecurityEvent]:
        """The aggregated security events since the last drain, and reset them."""
        events = [
            SecurityEvent(
                at=now,
                category="drop",
                reason=reason,
                source=source,
                claimed_id=claimed,
                detail=f"count={count}",
            )
            for (reason, source, claimed), count in sorted(
                self._pending.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")
            )
        ]
        self._pending.clear()
        return events
