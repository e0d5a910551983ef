"""
The application API as an instruction source.

Application servers submit instructions over the TLS listener
(:mod:`m2mgw.apps.operations`, op ``submit``); they reach the gateway's queue
through this :class:`~m2mgw.interfaces.IInstructionSource`, started with the
gateway's sink like every other source.  Unlike the spool, which queues under
its own name, this source queues on behalf of authenticated principals: the
``source`` of each instruction is the submitting application's principal
(its certificate's common name), never one of the gateway's own source names
(``operator``, ``spool``, ``gateway``), so that the instruction's events go to
that application alone.

The source is always part of the gateway (the listener always runs); the
``apps`` plugin exists so that it is configured, listed and contract-tested
like the others, and a ``[source.apps]`` section is accepted but optional.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.internet.defer import Deferred, fail
from twisted.plugin import IPlugin
from zope.interface import implementer

from m2mgw.errors import M2MGWError
from m2mgw.interfaces import IInstructionSink, IInstructionSource, IInstructionSourceFactory
from m2mgw.records import Instruction, NewInstruction
from m2mgw.store.logic import NON_APP_SOURCES

__all__ = ["SOURCE_NAME", "ApplicationSource", "ApplicationSourceFactory", "SourceStopped"]

#: The name of the source (its service under ``sources`` and its plugin).
SOURCE_NAME: Final = "apps"


class SourceStopped(M2MGWError):
    """The source is not running (the gateway is starting or stopping)."""


@implementer(IInstructionSource)
class ApplicationSource:
    """
    Queues the instructions applications submit, each under the principal
    that submitted it.

    :ivar records_principals: always true: ``source`` of the instructions
        queued is the submitting principal, not :attr:`name`.
    """

    name = SOURCE_NAME
    records_principals = True

    def __init__(self) -> None:
        self._sink: IInstructionSink | None = None
        self._listeners: list[Callable[[Instruction], object]] = []

    def start(self, sink: IInstructionSink) -> None:
        """Accept submissions into ``sink``."""
        self._sink = sink

    def stop(self) -> None:
        """Refuse submissions from now on (those in flight finish)."""
        self._sink = None

    @property
    def running(self) -> bool:
        """Whether submissions are accepted."""
        return self._sink is not None

    def add_listener(self, listener: Callable[[Instruction], object]) -> None:
        """Call ``listener`` with every instruction this source queued (or found idempotent)."""
        self._listeners.append(listener)

    def submit(self, instruction: NewInstruction) -> Deferred[Instruction]:
        """
        Queue ``instruction``, submitted by the application ``instruction.source``.

        :return: the queued :class:`~m2mgw.records.Instruction`.
        :raise SourceStopped: the source is not running.
        :raise ValueError: ``source`` is one of the gateway's own source names.
        :raise m2mgw.errors.UnknownModule: from the sink.
        """
        if instruction.source in NON_APP_SOURCES or instruction.source == SOURCE_NAME:
            return fail(ValueError(f"{instruction.source!r} is not an application principal"))
        if self._sink is None:
            return fail(SourceStopped("the application source is not running"))
        queued: Deferred[Instruction] = self._sink.submit(instruction)
        return queued.addCallback(self._queued)

    def _queued(self, instruction: Instruction) -> Instruction:
        """Tell the listeners."""
        for listener in self._listeners:
            listener(instruction)
        return instruction


@implementer(IPlugin, IInstructionSourceFactory)
class ApplicationSourceFactory:
    """The ``apps`` source plugin (no options)."""

    name = SOURCE_NAME
    options: Mapping[str, str] = {}

    def create(self, options: Mapping[str, str], data_dir: str, reactor: Any) -> ApplicationSource:
        """A new, stopped :class:`ApplicationSource`."""
        return ApplicationSource()
