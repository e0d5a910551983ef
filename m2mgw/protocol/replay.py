"""
The DATA replay window of MGP/1 §8, as a pure function.

A session keeps the highest ``ctr`` accepted and a bitmap of the ``size``
counters at and below it.  Every store applies :func:`accept_counter` inside
the transaction that accepts a DATA, so the decision and the new state are
committed together.
"""

from __future__ import annotations

from typing import NamedTuple

#: The default window size (MGP/1 §8).
DEFAULT_WINDOW = 64


class WindowState(NamedTuple):
    """
    :ivar highest: the highest counter accepted (0: none yet).
    :ivar bits: bit ``i`` set means ``highest - i`` was accepted.
    """

    highest: int
    bits: int


def accept_counter(state: WindowState, ctr: int, size: int = DEFAULT_WINDOW) -> WindowState | None:
    """
    Decide whether DATA counter ``ctr`` is fresh.

    Accepted are counters above ``highest - size`` that were not accepted
    before; counters must be at least 1.

    :return: the new state, or ``None`` if ``ctr`` is a replay, below the
        window, or not positive.
    """
    if ctr < 1 or size < 1:
        return None
    highest, bits = state
    if ctr > highest:
        shift = ctr - highest
        bits = ((bits << shift) | 1) & ((1 << size) - 1) if shift < size else 1
        return WindowState(ctr, bits)
    offset = highest - ctr
    if offset >= size:
        return None
    if bits >> offset & 1:
        return None
    return WindowState(highest, bits | (1 << offset))
