"""
The instruction sources shipped with m2mgw, as plugins.

``spool`` (:mod:`m2mgw.instructions.spool`): instructions dropped as ``*.json``
files into a directory, enabled by a ``[source.spool]`` section.

``apps`` (:mod:`m2mgw.apps.source`): instructions application servers submit
over the TLS listener, queued under each application's principal; always on
(its ``[source.apps]`` section is optional and has no options).
"""

from __future__ import annotations

from m2mgw.apps.source import ApplicationSourceFactory
from m2mgw.instructions.spool import SpoolSourceFactory

__all__ = ["apps", "spool"]

apps = ApplicationSourceFactory()
spool = SpoolSourceFactory()
