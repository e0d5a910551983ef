"""
What the three command-line tools (``m2mgw-admin``, ``m2mgw-module``,
``m2mgw-app``) share in parsing their arguments: a parser that raises instead
of exiting, so that every mistake becomes one line and an exit status chosen
by the tool, and the argument types they all use.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


class ParserExit(Exception):
    """argparse finished early (``--help``, ``--version``) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class RaisingParser(argparse.ArgumentParser):
    """
    An argument parser that raises instead of exiting.

    Subclasses name the exception a malformed command line raises in
    :attr:`usage_error`, and whether its message starts with the program name.
    """

    usage_error: type[Exception] = ValueError
    prefix_prog: bool = False

    def error(self, message: str) -> NoReturn:
        prefix = f"{self.prog}: " if self.prefix_prog else ""
        raise self.usage_error(f"{prefix}{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise ParserExit(status)


def positive_float(text: str) -> float:
    """A finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (ASCII digits only)."""
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def epoch(text: str) -> int:
    """A time in whole seconds since the epoch."""
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a time in seconds since the epoch")
    return int(text)
