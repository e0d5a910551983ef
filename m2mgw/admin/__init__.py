"""
The operator's tools: the ``m2mgw-admin`` command (:mod:`m2mgw.admin.cli`).

``m2mgw-admin`` reads the gateway's configuration and data directory and
talks to the same store, so it can be used while the gateway runs.  The
pieces that do not touch a store or the terminal (input checks, CSV import
validation, instruction sizing, output formatting) live in their own modules
so that they can be tested and reused without a reactor.
"""

from __future__ import annotations

__all__ = ["OperatorError"]


class OperatorError(Exception):
    """
    Something the operator asked for cannot be done as asked (a bad
    argument, a file that does not parse).  The message is one line naming
    what to fix; ``m2mgw-admin`` prints it and exits with status 1.
    """
