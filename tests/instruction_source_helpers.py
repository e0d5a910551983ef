"""
Fakes for testing instruction sources: a clock with a thread pool that runs
work in the calling thread (optionally held until released), a sink that
records what it is given, and a writer of spool files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.errors import UnknownModule
from m2mgw.interfaces import IInstructionSink
from m2mgw.records import Instruction, NewInstruction


class InlineThreadPool:
    """
    Stands for a reactor's thread pool: work runs in the calling thread, at
    once, or when :meth:`release` is called if :attr:`hold` is set.
    """

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Callable[[], None]] = []
        #: How many pieces of work were run.
        self.runs = 0

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None],
        func: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Run ``func`` (now, or later if held) and report to ``onResult``."""

        def work() -> None:
            self.runs += 1
            try:
                result = func(*args, **kwargs)
            except BaseException:
                onResult(False, Failure())
            else:
                onResult(True, result)

        if self.hold:
            self.held.append(work)
        else:
            work()

    def callInThread(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func`` (now, or later if held), ignoring its result."""
        self.callInThreadWithCallback(lambda ok, result: None, func, *args, **kwargs)

    def release(self) -> None:
        """Stop holding and run the held work, and whatever it queues, in order."""
        self.hold = False
        while self.held:
            self.held.pop(0)()


class ThreadedClock(Clock):
    """A :class:`~twisted.internet.task.Clock` that also offers a thread pool (inline)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = InlineThreadPool()

    def getThreadPool(self) -> InlineThreadPool:
        """The (inline) thread pool."""
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``f`` at once: the "threads" are this thread."""
        f(*args, **kwargs)

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``f`` in the (inline) pool."""
        self.pool.callInThread(f, *args, **kwargs)


@implementer(IInstructionSink)
class RecordingSink:
    """
    An :class:`~m2mgw.interfaces.IInstructionSink` that records every
    submission and answers at once with a queued instruction (``iid`` 1, 2, ...
    per module), or fails with :attr:`fail_with` (or ``UnknownModule`` for a
    module in :attr:`unknown`), or, with :attr:`hold`, answers only when the
    test fires the Deferred in :attr:`pending`.
    """

    def __init__(self) -> None:
        self.received: list[NewInstruction] = []
        self.fail_with: Exception | None = None
        #: Modules the sink does not know: it fails with UnknownModule for them.
        self.unknown: set[str] = set()
        self.hold = False
        #: With hold: fire one (with None) to let its submission be queued.
        self.pending: list[Deferred[None]] = []
        self._iids: dict[str, int] = {}

    def submit(self, instruction: NewInstruction) -> Deferred[Instruction]:
        """Record ``instruction``; answer as configured."""
        self.received.append(instruction)
        if self.fail_with is not None:
            return fail(self.fail_with)
        if instruction.module_id in self.unknown:
            return fail(UnknownModule(instruction.module_id))
        iid = self._iids.get(instruction.module_id, 0) + 1
        self._iids[instruction.module_id] = iid
        queued = Instruction(
            iid=iid,
            **{f.name: getattr(instruction, f.name) for f in dataclasses.fields(NewInstruction)},
        )
        if self.hold:
            held: Deferred[None] = Deferred()
            self.pending.append(held)
            return held.addCallback(lambda _: queued)
        return succeed(queued)


def drop_file(directory: Path, name: str, content: Any, *, raw: bool = False) -> Path:
    """
    Write an instruction file the way writers must: ``NAME.tmp``, then a
    rename to ``NAME``.

    :param content: a JSON-compatible value, or with ``raw`` the bytes to write.
    """
    data = content if raw else json.dumps(content).encode("utf-8")
    temporary = directory / f"{name}.tmp"
    temporary.write_bytes(data)
    os.replace(temporary, directory / name)
    return directory / name
