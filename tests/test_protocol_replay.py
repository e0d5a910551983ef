"""The replay window (MGP/1 §8): examples and properties against a simple model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from m2mgw.protocol.replay import WindowState, accept_counter

EMPTY = WindowState(0, 0)


def feed(counters: list[int], size: int = 64) -> tuple[WindowState, list[bool]]:
    state, verdicts = EMPTY, []
    for ctr in counters:
        new = accept_counter(state, ctr, size)
        verdicts.append(new is not None)
        state = new or state
    return state, verdicts


def test_in_order_counters_are_accepted_once() -> None:
    state, verdicts = feed([1, 2, 3, 3, 2, 1])
    assert verdicts == [True, True, True, False, False, False]
    assert state.highest == 3


def test_out_of_order_within_window() -> None:
    _, verdicts = feed([10, 5, 7, 5, 9, 10])
    assert verdicts == [True, True, True, False, True, False]


def test_below_window_is_refused() -> None:
    _, verdicts = feed([100, 37, 36, 99], size=64)
    assert verdicts == [True, True, False, True]


def test_zero_and_negative_are_refused() -> None:
    assert accept_counter(EMPTY, 0) is None
    assert accept_counter(EMPTY, -5) is None


def test_big_jump_forgets_the_old_window() -> None:
    state, verdicts = feed([1, 2, 1000, 999, 2])
    assert verdicts == [True, True, True, True, False]
    assert state == WindowState(1000, 0b11)


@settings(max_examples=300, deadline=None)
@given(
    counters=st.lists(st.integers(min_value=-2, max_value=300), max_size=80),
    size=st.sampled_from([1, 2, 8, 64, 100]),
)
def test_matches_the_set_model(counters: list[int], size: int) -> None:
    """Accepted iff ctr >= 1, ctr > highest - size and never accepted before."""
    seen: set[int] = set()
    highest = 0
    state = EMPTY
    for ctr in counters:
        expected = ctr >= 1 and ctr > highest - size and ctr not in seen
        new = accept_counter(state, ctr, size)
        assert (new is not None) == expected
        if new is not None:
            seen.add(ctr)
            highest = max(highest, ctr)
            state = new
        assert state.highest == highest
        assert state.bits < (1 << size)
