"""
The instruction sources shipped with m2mgw, as plugins.

``spool`` (:mod:`m2mgw.instructions.spool`): instructions dropped as ``*.json``
files into a directory, enabled by a ``[source.spool]`` section.
"""

from __future__ import annotations

from m2mgw.instructions.spool import SpoolSourceFactory

__all__ = ["spool"]

spool = SpoolSourceFactory()
