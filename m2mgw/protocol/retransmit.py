"""
The retransmission cache of MGP/1 §8.4.

The gateway keeps, for ``ttl`` seconds, the reply bytes of every message it
accepted, keyed by the request bytes.  A datagram equal to a cached request is
answered with the cached reply, unchanged, before any other processing: a
module's repeated datagram (forward error correction, or a retry after a lost
reply) is processed once and always gets the same answer.

Entries are keyed by a SHA-256 digest of the request, so the cache holds
32 bytes per request instead of up to 1472, and are evicted oldest first when
they expire or when the cache exceeds its byte budget (the module then falls
back to re-sending under a new counter, which the ``tok`` memory still
applies once).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

#: Accounting overhead per entry (digest, tuple, dict slot), in bytes.
_ENTRY_OVERHEAD = 200


class ReplyCache:
    """
    Reply bytes by request bytes, for ``ttl`` seconds, within ``max_bytes``.

    :param now: returns the current time in seconds.
    """

    def __init__(self, now: Callable[[], float], ttl: float = 60.0, max_bytes: int = 64 << 20):
        self._now = now
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        #: Entries evicted before their time because of the byte budget.
        self.evicted_early = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(request: bytes) -> bytes:
        return hashlib.sha256(request).digest()

    def get(self, request: bytes) -> bytes | None:
        """The cached reply to ``request``, or ``None``."""
        self._expire()
        entry = self._entries.get(self._key(request))
        return None if entry is None else entry[1]

    def put(self, request: bytes, reply: bytes) -> None:
        """Remember ``reply`` as the answer to ``request`` for ``ttl`` seconds."""
        key = self._key(request)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1]) + _ENTRY_OVERHEAD
        self._entries[key] = (self._now() + self._ttl, reply)
        self._bytes += len(reply) + _ENTRY_OVERHEAD
        self._expire()
        while self._bytes > self._max_bytes and self._entries:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= len(dropped) + _ENTRY_OVERHEAD
            self.evicted_early += 1

    def _expire(self) -> None:
        now = self._now()
        entries = self._entries
        while entries:
            key, (expires, reply) = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]
            self._bytes -= len(reply) + _ENTRY_OVERHEAD
