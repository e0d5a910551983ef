"""The retransmission cache of MGP/1 §8.4."""

from __future__ import annotations

from twisted.internet.task import Clock

from m2mgw.protocol.retransmit import ReplyCache


def test_identical_request_gets_identical_reply_within_ttl() -> None:
    clock = Clock()
    cache = ReplyCache(clock.seconds, ttl=60)
    cache.put(b"request", b"reply")
    clock.advance(59)
    assert cache.get(b"request") == b"reply"
    assert cache.get(b"request!") is None


def test_entries_expire() -> None:
    clock = Clock()
    cache = ReplyCache(clock.seconds, ttl=60)
    cache.put(b"a", b"1")
    clock.advance(30)
    cache.put(b"b", b"2")
    clock.advance(30)
    assert cache.get(b"a") is None
    assert cache.get(b"b") == b"2"
    clock.advance(30)
    assert cache.get(b"b") is None
    assert len(cache) == 0


def test_byte_budget_evicts_oldest_first() -> None:
    clock = Clock()
    cache = ReplyCache(clock.seconds, ttl=60, max_bytes=3 * (100 + 200))
    for i in range(5):
        cache.put(bytes([i]), bytes(100))
    assert len(cache) == 3
    assert cache.evicted_early == 2
    assert cache.get(bytes([0])) is None
    assert cache.get(bytes([4])) == bytes(100)
