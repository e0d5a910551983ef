"""Tests of :mod:`m2mgw.crypto.randomness`."""

from __future__ import annotations

import pytest

from m2mgw.crypto.randomness import RandomScriptError, ScriptedRandom, system_random


def test_system_random_gives_the_size_asked() -> None:
    assert len(system_random(0)) == 0
    assert len(system_random(32)) == 32
    assert system_random(16) != system_random(16)
    with pytest.raises(ValueError):
        system_random(-1)


def test_scripted_random_returns_the_draws_in_order() -> None:
    random = ScriptedRandom([b"\x01" * 4, b"\x02" * 8])
    assert random.remaining == 2
    assert random(4) == b"\x01" * 4
    assert random(8) == b"\x02" * 8
    assert random.remaining == 0
    random.check_exhausted()


def test_scripted_random_refuses_a_size_mismatch() -> None:
    random = ScriptedRandom([b"\x01" * 4])
    with pytest.raises(RandomScriptError, match=r"draw 0 .* 4 bytes; asked for 5"):
        random(5)
    assert random(4) == b"\x01" * 4


def test_scripted_random_refuses_to_run_past_the_script() -> None:
    random = ScriptedRandom([b"\x01"])
    random(1)
    with pytest.raises(RandomScriptError, match="exhausted"):
        random(1)


def test_check_exhausted_reports_untaken_draws() -> None:
    random = ScriptedRandom([b"\x01", b"\x02"])
    random(1)
    with pytest.raises(RandomScriptError, match="1 scripted random draws"):
        random.check_exhausted()


def test_repr_hides_the_draws() -> None:
    random = ScriptedRandom([bytes.fromhex("deadbeef")])
    assert "deadbeef" not in repr(random)
    assert "\\xde" not in repr(random)
    assert repr(random) == "<ScriptedRandom 0/1 draws taken>"
