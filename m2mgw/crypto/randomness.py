"""
Random sources for MGP/1: the system one, and a scripted one for tests.

Every piece of code that needs randomness takes a
:data:`~m2mgw.interfaces.RandomSource` (``random(n) -> n bytes``), so a test or
the generator of ``docs/test-vectors/`` can replay the exact draws of a vector
with :class:`ScriptedRandom`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["RandomScriptError", "ScriptedRandom", "system_random"]


def system_random(n: int) -> bytes:
    """
    ``n`` bytes from the operating system's CSPRNG (:func:`os.urandom`).

    :raise ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError("cannot draw a negative number of bytes")
    return os.urandom(n)


class RandomScriptError(AssertionError):
    """
    A :class:`ScriptedRandom` was asked for a draw its script does not have:
    the next draw has another size, or the script is exhausted.  An
    ``AssertionError`` so that pytest reports it as a failed expectation.
    """


class ScriptedRandom:
    """
    A random source that returns pre-recorded draws, in order.

    Each call must ask for exactly the size of the next draw; anything else
    means the code under test draws in another order than the script, and
    raises :class:`RandomScriptError`.  The draws are not shown in ``repr``
    (they may be key material).

    :param draws: the byte strings to return, in order.
    """

    def __init__(self, draws: Sequence[bytes]) -> None:
        self._draws = [bytes(draw) for draw in draws]
        self._position = 0

    def __call__(self, n: int) -> bytes:
        """
        The next draw.

        :raise RandomScriptError: the script is exhausted or the next draw is
            not ``n`` bytes long.
        """
        if self._position >= len(self._draws):
            raise RandomScriptError(
                f"random script exhausted after {len(self._draws)} draws; asked for {n} bytes"
            )
        draw = self._draws[self._position]
        if len(draw) != n:
            raise RandomScriptError(
                f"draw {self._position} of the random script is {len(draw)} bytes; asked for {n}"
            )
        self._position += 1
        return draw

    @property
    def remaining(self) -> int:
        """How many draws have not been taken yet."""
        return len(self._draws) - self._position

    def check_exhausted(self) -> None:
        """
        :raise RandomScriptError: some draws were not taken.
        """
        if self.remaining:
            raise RandomScriptError(f"{self.remaining} scripted random draws were not taken")

    def __repr__(self) -> str:
        return f"<ScriptedRandom {self._position}/{len(self._draws)} draws taken>"
