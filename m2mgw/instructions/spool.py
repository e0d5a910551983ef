"""
The ``spool`` instruction source: instructions dropped as files into a directory.

Enabled by a ``[source.spool]`` section.  Operators and scripts write one
instruction per file into the spool directory (``directory``, default
``spool`` in the data directory)::

    {"module": "sensor-17", "kind": "set", "body": {"interval": 60},
     "ttl": 600, "idempotency_key": "ticket-4711"}

``module`` and ``kind`` are required; ``body`` is any JSON value (default
``null``); ``ttl`` (seconds from now) or ``not_after`` (seconds since the
epoch) bound the delivery; ``idempotency_key`` makes resubmitting the same
instruction harmless.  Other keys are refused, so that a misspelt one is not
silently ignored.  The rules of :mod:`m2mgw.instructions.submission` apply
(``keygen`` and ``skey`` are the gateway's own, ``rehello`` takes no body, the
instruction must fit in a reply).

**Writing a file.**  Only names ending in ``.json`` and not starting with a
dot are read, so a writer must not create the final name and then fill it:
it writes ``NAME.json.tmp`` (or ``.NAME.json``) in the same directory and
renames it to ``NAME.json`` when complete (``mv`` on one file system, or
``os.replace``), which makes it appear whole.

**What happens to it.**  Every ``interval`` seconds the directory is scanned
and the files are taken in name order (code point order: use zero-padded
numbers or UTC timestamps to order them), at most :data:`FILES_PER_SCAN`
per scan and scanning again while there are more.  Each file is handled
once:

- queued: moved to ``accepted/NAME`` *after* the store committed the
  instruction, with ``accepted/NAME.iid`` holding its ``iid``;
- refused (not UTF-8 JSON, an unknown key, a reserved kind, too large, an
  unknown module, ...): moved to ``rejected/NAME``, with
  ``rejected/NAME.reason`` holding one line saying why;
- the store failed otherwise: the file stays where it is, the failure is
  logged and the scan ends; the next one tries again, in the same order.

A name already taken in ``accepted/`` or ``rejected/`` gets a number
(``NAME.1.json``).  A file without an ``idempotency_key`` is queued with one
derived from its name, modification time and content, so a crash between the
commit and the move (the file is read again after the restart) does not
queue it twice, while a later file that reuses the name is a new instruction.

The directory and its two subdirectories are created with mode 0700 on
start; a directory every user may write to is refused, since whoever can
write into it can instruct every module.

**Threads.**  Scanning the directory and reading, writing and moving files
run in the reactor's thread pool, never on the reactor thread: a directory
holding many files, or one on a slow or network file system, must not delay
the replies to modules.  Queueing into the sink happens on the reactor
thread, one file after the other, each once the previous one was committed,
which keeps the name order.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from m2mgw.config import ModuleListenerConfig
from m2mgw.errors import ConfigError, UnknownModule
from m2mgw.instructions.submission import (
    REPLY_OVERHEAD,
    InvalidInstruction,
    new_instruction,
    parse_json,
)
from m2mgw.interfaces import IInstructionSink, IInstructionSource, IInstructionSourceFactory
from m2mgw.protocol.messages import MAX_RECEIVED_DATAGRAM
from m2mgw.records import Instruction, NewInstruction

__all__ = [
    "FILES_PER_SCAN",
    "SpoolDirectory",
    "SpoolFile",
    "SpoolSource",
    "SpoolSourceFactory",
    "parse_spool_file",
]

T = TypeVar("T")

#: The name of the source, of its configuration section and of the ``source``
#: of the instructions it queues.
SOURCE_NAME: Final = "spool"

#: Only files whose name ends in this are read.
FILE_SUFFIX: Final = ".json"
#: Subdirectories of the spool directory for the files handled.
ACCEPTED_DIR: Final = "accepted"
REJECTED_DIR: Final = "rejected"
#: ``accepted/NAME`` + this holds the ``iid``; ``rejected/NAME`` + the other the reason.
IID_SUFFIX: Final = ".iid"
REASON_SUFFIX: Final = ".reason"

#: The most files taken from one directory scan.  A scan that finds more is
#: followed at once by another, so a backlog drains without waiting for
#: ``interval``, while the names held in memory stay bounded.
FILES_PER_SCAN: Final = 100

#: The keys an instruction file may hold.
FILE_KEYS: Final = ("module", "kind", "body", "ttl", "not_after", "idempotency_key")
#: The longest ``idempotency_key`` a file may give, in characters.
MAX_IDEMPOTENCY_KEY: Final = 256
#: The longest reason written to a ``.reason`` file, in characters.
MAX_REASON: Final = 500

DEFAULT_DIRECTORY: Final = "spool"
DEFAULT_INTERVAL: Final = 1.0
DEFAULT_MAX_FILE_BYTES: Final = 65536
#: What a reply of the default ``[modules] max_datagram`` can carry.
DEFAULT_MAX_INSTRUCTION_BYTES: Final = ModuleListenerConfig.max_datagram - REPLY_OVERHEAD

_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block a pool thread
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)


# -- the file format ----------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolFile:
    """
    One instruction file as read from the spool directory.

    :ivar name: its name in the spool directory.
    :ivar data: its content.
    :ivar mtime_ns: its modification time, in nanoseconds.
    """

    name: str
    data: bytes
    mtime_ns: int

    def default_idempotency_key(self) -> str:
        """
        The idempotency key of a file that gives none: the same for the same
        file read again (after a crash), different for a later file of the
        same name (another modification time or content).
        """
        digest = hashlib.sha256(self.data).hexdigest()[:16]
        return f"file:{self.name}:{self.mtime_ns}:{digest}"


def _describe(value: object) -> str:
    """The JSON type name of a parsed JSON value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _string(fields: Mapping[str, Any], key: str) -> str:
    """:raise InvalidInstruction: ``key`` is missing or not a string."""
    if key not in fields:
        raise InvalidInstruction(f"{key!r} is missing")
    value = fields[key]
    if not isinstance(value, str):
        raise InvalidInstruction(f"{key!r} must be a string, not a {_describe(value)}")
    return value


def _optional_int(fields: Mapping[str, Any], key: str) -> int | None:
    """:raise InvalidInstruction: ``key`` is present, not ``null`` and not an integer."""
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInstruction(f"{key!r} must be an integer, not a {_describe(value)}")
    return value


def _idempotency_key(fields: Mapping[str, Any], spool_file: SpoolFile) -> str:
    """The file's ``idempotency_key``, or one derived from the file."""
    if fields.get("idempotency_key") is None:
        return spool_file.default_idempotency_key()
    key = _string(fields, "idempotency_key")
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidInstruction(
            f"'idempotency_key' must be 1-{MAX_IDEMPOTENCY_KEY} printable characters"
        )
    return key


def parse_spool_file(
    spool_file: SpoolFile, *, now: int, source: str, max_size: int | None
) -> NewInstruction:
    """
    The instruction an instruction file asks for.

    :param spool_file: the file.
    :param now: the current time (``ttl`` counts from it).
    :param source: the ``source`` of the instruction.
    :param max_size: the largest ``wire_size`` accepted.
    :raise m2mgw.instructions.submission.InvalidInstruction: the file is not
        an acceptable instruction; the message says why, in one line.
    """
    try:
        text = spool_file.data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInstruction("the file is not UTF-8 text") from None
    fields = parse_json(text, "the file")
    if not isinstance(fields, dict):
        raise InvalidInstruction(f"the file holds a JSON {_describe(fields)}, not an object")
    unknown = sorted(set(fields) - set(FILE_KEYS))
    if unknown:
        raise InvalidInstruction(f"unknown key {unknown[0]!r} (known: {', '.join(FILE_KEYS)})")
    return new_instruction(
        _string(fields, "module"),
        _string(fields, "kind"),
        fields.get("body"),
        now=now,
        source=source,
        ttl=_optional_int(fields, "ttl"),
        not_after=_optional_int(fields, "not_after"),
        max_size=max_size,
        idempotency_key=_idempotency_key(fields, spool_file),
    )


def one_line(text: str) -> str:
    """``text`` on one line, at most :data:`MAX_REASON` characters."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


# -- the directory (blocking: call from a thread) ------------------------------------------


class SpoolDirectory:
    """
    The file operations on a spool directory.  Every method blocks: the
    :class:`SpoolSource` calls them from the reactor's thread pool.

    :ivar path: the spool directory.
    :ivar max_file_bytes: larger files are refused unread.
    """

    def __init__(self, path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        """
        :param path: the spool directory (created by :meth:`prepare`).
        :param max_file_bytes: see :attr:`max_file_bytes`.
        """
        self.path = path
        self.max_file_bytes = max_file_bytes
        self.accepted_path = os.path.join(path, ACCEPTED_DIR)
        self.rejected_path = os.path.join(path, REJECTED_DIR)

    def prepare(self) -> None:
        """
        Create the directory and its ``accepted/`` and ``rejected/``
        subdirectories (mode 0700) if missing, and check them.

        :raise m2mgw.errors.ConfigError: one cannot be created or used, or
            every user may write to it.
        """
        for path in (self.path, self.accepted_path, self.rejected_path):
            existed = os.path.isdir(path)
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                if not existed:
                    os.chmod(path, 0o700)  # whatever the umask
                mode = os.stat(path).st_mode
            except OSError as e:
                raise ConfigError(
                    f"cannot create spool directory {path}: {e.strerror or e}"
                ) from None
            if not stat.S_ISDIR(mode):
                raise ConfigError(f"spool directory {path} is not a directory")
            if mode & stat.S_IWOTH:
                raise ConfigError(
                    f"spool directory {path} is writable by every user, who could then"
                    " instruct every module: remove that permission (chmod o-w)"
                )
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                raise ConfigError(f"spool directory {path} is not readable and writable")

    def pending(self, limit: int = FILES_PER_SCAN) -> list[str]:
        """
        The first ``limit`` names, in order, of the entries that are due:
        names ending in ``.json`` that do not start with a dot.
        """
        with os.scandir(self.path) as entries:
            due = (
                entry.name
                for entry in entries
                if entry.name.endswith(FILE_SUFFIX) and not entry.name.startswith(".")
            )
            return heapq.nsmallest(limit, due)

    def read(self, name: str) -> SpoolFile | None:
        """
        Read the file ``name``.

        :return: the file, or ``None`` if it is gone.
        :raise m2mgw.instructions.submission.InvalidInstruction: it is not a
            regular file, is larger than :attr:`max_file_bytes`, or cannot be read.
        """
        path = os.path.join(self.path, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        self._check_file(info)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InvalidInstruction(f"cannot read the file: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            self._check_file(info)
            data = f.read(self.max_file_bytes + 1)
        self._check_size(len(data))
        return SpoolFile(name, data, info.st_mtime_ns)

    def _check_file(self, info: os.stat_result) -> None:
        """:raise InvalidInstruction: not a regular file, or too large."""
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInstruction("not a regular file")
        self._check_size(info.st_size)

    def _check_size(self, size: int) -> None:
        """:raise InvalidInstruction: ``size`` is above :attr:`max_file_bytes`."""
        if size > self.max_file_bytes:
            raise InvalidInstruction(
                f"the file is larger than {self.max_file_bytes} bytes"
                f" ([source.{SOURCE_NAME}] max_file_bytes)"
            )

    def accept(self, name: str, iid: int) -> str:
        """
        Record that ``name`` was queued as ``iid``: write ``accepted/NAME.iid``,
        then move the file to ``accepted/NAME``.

        :return: the name it got in ``accepted/``.
        """
        return self._move_aside(name, self.accepted_path, IID_SUFFIX, f"{iid}\n")

    def reject(self, name: str, reason: str) -> str:
        """
        Record that ``name`` was refused: write ``rejected/NAME.reason`` (one
        line), then move the entry to ``rejected/NAME``.

        :return: the name it got in ``rejected/``.
        """
        return self._move_aside(name, self.rejected_path, REASON_SUFFIX, one_line(reason) + "\n")

    def _move_aside(self, name: str, directory: str, suffix: str, record: str) -> str:
        """
        Write ``record`` next to where ``name`` goes in ``directory``, then move it there.

        The record comes first: if the process dies in between, the file is
        handled again on the next start and the record rewritten.
        """
        target = _free_name(directory, name)
        _write_file(os.path.join(directory, target + suffix), record)
        # A file removed meanwhile leaves only the record, which says what became of it.
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(self.path, name), os.path.join(directory, target))
        return target


def _free_name(directory: str, name: str) -> str:
    """``name``, or ``STEM.N.json`` with the smallest ``N`` not taken in ``directory``."""
    stem = name[: -len(FILE_SUFFIX)]
    candidate, number = name, 0
    while os.path.lexists(os.path.join(directory, candidate)):
        number += 1
        candidate = f"{stem}.{number}{FILE_SUFFIX}"
    return candidate


def _write_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) through a temporary file and a rename."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


# -- the source ----------------------------------------------------------------------------


@implementer(IInstructionSource)
class SpoolSource:
    """
    Queues the instructions of the files dropped into a :class:`SpoolDirectory`.

    :ivar name: ``"spool"``, the ``source`` of the instructions it queues.
    :ivar directory: the spool directory.
    :ivar interval: seconds between scans.
    :ivar max_instruction_bytes: the largest instruction (``wire_size``) accepted.
    :ivar accepted: how many files were queued since the start.
    :ivar rejected: how many files were refused since the start.
    :ivar retried: how many times the sink failed and a file was left for later.
    """

    log = Logger()

    def __init__(
        self,
        directory: SpoolDirectory,
        reactor: Any,
        *,
        interval: float = DEFAULT_INTERVAL,
        max_instruction_bytes: int | None = DEFAULT_MAX_INSTRUCTION_BYTES,
    ) -> None:
        """
        :param directory: the spool directory.
        :param reactor: provides ``IReactorTime`` (the scans' clock and ``now``)
            and ``IReactorThreads`` (the file I/O runs in its thread pool).
        :param interval: see :attr:`interval`.
        :param max_instruction_bytes: see :attr:`max_instruction_bytes` (``None``: no limit).
        """
        self.name = SOURCE_NAME
        self.directory = directory
        self.interval = interval
        self.max_instruction_bytes = max_instruction_bytes
        self.accepted = 0
        self.rejected = 0
        self.retried = 0
        self._reactor = reactor
        self._sink: IInstructionSink | None = None
        self._loop: LoopingCall | None = None
        self._running = False
        self._in_flight = 0
        self._idle: list[Deferred[None]] = []

    # -- IInstructionSource --------------------------------------------------------------

    def start(self, sink: IInstructionSink) -> Deferred[None]:
        """
        Prepare the directory, then scan it now and every :attr:`interval` seconds.

        :return: a Deferred firing once the directory is ready (the first
            scan has begun), or failing with :class:`~m2mgw.errors.ConfigError`
            if it cannot be used.
        :raise RuntimeError: the source runs already (start it again only
            once :meth:`stop`'s Deferred has fired).
        """
        if self._running or self._in_flight:
            raise RuntimeError("the spool source is already running")
        self._running = True
        self._sink = sink
        return self._track(Deferred.fromCoroutine(self._start()))

    async def _start(self) -> None:
        """Prepare the directory, then begin the scans."""
        try:
            await self._blocking(self.directory.prepare)
        except Exception:
            self._running = False  # may be started again
            raise
        if not self._running:  # stopped meanwhile
            return
        self.log.info(
            "spool: reading *.json files from {directory} every {interval} s",
            directory=self.directory.path,
            interval=self.interval,
        )
        self._loop = LoopingCall(self._scan)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(self._loop_failed)

    def stop(self) -> Deferred[None]:
        """
        Stop scanning.  The file being handled is finished (queued and moved,
        or left in place); no other file is started.  Idempotent.

        :return: a Deferred firing once nothing is in progress.
        """
        self._running = False
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None
        if not self._in_flight:
            return succeed(None)
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        return idle

    # -- scanning ------------------------------------------------------------------------

    def _scan(self) -> Deferred[None]:
        """One scheduled scan (the LoopingCall's function); never fails."""
        scanning = Deferred.fromCoroutine(self._handle_due_files())
        scanning.addErrback(self._scan_failed)
        return self._track(scanning)

    async def _handle_due_files(self) -> None:
        """Handle the due files in order, until none is left, one is deferred, or we stop."""
        sink = self._sink
        assert sink is not None
        while self._running:
            names = await self._blocking(self.directory.pending, FILES_PER_SCAN)
            for name in names:
                if not self._running or not await self._handle(sink, name):
                    return
            if len(names) < FILES_PER_SCAN:
                return

    async def _handle(self, sink: IInstructionSink, name: str) -> bool:
        """
        Queue, or refuse, the file ``name``.

        :return: whether to go on with the next file (``False``: the sink
            failed; the file stays for the next scan).
        """
        now = int(self._reactor.seconds())
        try:
            spool_file = await self._blocking(self.directory.read, name)
            if spool_file is None:  # removed meanwhile
                return True
            new = parse_spool_file(
                spool_file, now=now, source=self.name, max_size=self.max_instruction_bytes
            )
        except InvalidInstruction as e:
            await self._reject(name, str(e))
            return True
        try:
            instruction: Instruction = await maybeDeferred(sink.submit, new)
        except UnknownModule:
            await self._reject(name, f"unknown module {new.module_id!r}")
            return True
        except Exception:
            self.retried += 1
            self.log.failure("spool: could not queue {name}; it stays for the next scan", name=name)
            return False
        target = await self._blocking(self.directory.accept, name, instruction.iid)
        self.accepted += 1
        self.log.info(
            "spool: {name} queued as instruction {iid} ({kind}) for {module}; moved to {target}",
            name=name,
            iid=instruction.iid,
            kind=instruction.kind,
            module=instruction.module_id,
            target=f"{ACCEPTED_DIR}/{target}",
        )
        return True

    async def _reject(self, name: str, reason: str) -> None:
        """Move ``name`` aside as refused, with its reason."""
        target = await self._blocking(self.directory.reject, name, reason)
        self.rejected += 1
        self.log.warn(
            "spool: {name} rejected: {reason}; moved to {target}",
            name=name,
            reason=one_line(reason),
            target=f"{REJECTED_DIR}/{target}",
        )

    def _scan_failed(self, failure: Failure) -> None:
        """
        Log a scan that failed (the directory vanished, a move was not
        permitted): one line for a file system error, else the traceback.
        The next scan tries again.
        """
        if failure.check(OSError):
            self.log.warn(
                "spool: scanning {directory} failed: {error}; trying again in {interval} s",
                directory=self.directory.path,
                error=str(failure.value),
                interval=self.interval,
            )
            return
        self.log.failure(
            "spool: scanning {directory} failed; trying again in {interval} s",
            failure,
            directory=self.directory.path,
            interval=self.interval,
        )

    def _loop_failed(self, failure: Failure) -> None:
        """The loop itself failed (it cannot, as a scan never fails): say so."""
        self.log.failure("spool: the scans stopped", failure)

    # -- helpers ---------------------------------------------------------------------------

    def _blocking(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``work(*args)`` in the reactor's thread pool."""
        result: Deferred[T] = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), work, *args
        )
        return result

    def _track(self, work: Deferred[T]) -> Deferred[T]:
        """Count ``work`` as in progress until it has its result (which passes through)."""
        self._in_flight += 1

        def finished(result: T | Failure) -> T | Failure:
            self._in_flight -= 1
            if not self._in_flight:
                idle, self._idle = self._idle, []
                for waiting in idle:
                    waiting.callback(None)
            return result

        return work.addBoth(finished)


# -- the plugin ------------------------------------------------------------------------------


def _option(
    options: Mapping[str, str], key: str, default: T, parse: Callable[[str], T], problem: str
) -> T:
    """
    The parsed option ``key``, or ``default`` if it is absent or empty.

    :raise m2mgw.errors.ConfigError: ``parse`` refuses it; ``problem`` says what it must be.
    """
    raw = options.get(key, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"[source.{SOURCE_NAME}] {key} = {raw!r}: {problem}") from None


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    """A parser of decimal integers in ``[low, high]``."""

    def parse(raw: str) -> int:
        value = int(raw, 10)
        if not low <= value <= high:
            raise ValueError(raw)
        return value

    return parse


def _seconds(raw: str) -> float:
    """A number of seconds, from 0.01 to one day."""
    value = float(raw)
    if not math.isfinite(value) or not 0.01 <= value <= 86400:
        raise ValueError(raw)
    return value


@implementer(IPlugin, IInstructionSourceFactory)
class SpoolSourceFactory:
    """The ``spool`` instruction source plugin (see :mod:`m2mgw.instructions.spool`)."""

    name = SOURCE_NAME
    options: Mapping[str, str] = {
        "directory": (
            f"where instruction files are dropped, relative to the data directory"
            f" (default {DEFAULT_DIRECTORY})"
        ),
        "interval": f"seconds between scans of the directory (default {DEFAULT_INTERVAL:g})",
        "max_file_bytes": (f"larger files are rejected unread (default {DEFAULT_MAX_FILE_BYTES})"),
        "max_instruction_bytes": (
            f"the largest instruction accepted, at most [modules] max_datagram - {REPLY_OVERHEAD}"
            f" (default {DEFAULT_MAX_INSTRUCTION_BYTES})"
        ),
    }

    def create(self, options: Mapping[str, str], data_dir: str, reactor: Any) -> SpoolSource:
        """
        A :class:`SpoolSource` configured by ``options``.

        :param options: the ``[source.spool]`` section (keys already checked).
        :param data_dir: the data directory; a relative ``directory`` is in it.
        :param reactor: provides ``IReactorTime`` and ``IReactorThreads``.
        :raise m2mgw.errors.ConfigError: a value is unusable.
        """
        directory = _option(options, "directory", DEFAULT_DIRECTORY, str, "not a path")
        path = os.path.join(data_dir, os.path.expanduser(directory))
        interval = _option(
            options, "interval", DEFAULT_INTERVAL, _seconds, "not a number of seconds (0.01-86400)"
        )
        max_file_bytes = _option(
            options,
            "max_file_bytes",
            DEFAULT_MAX_FILE_BYTES,
            _bounded_int(2, 16 * 1024 * 1024),
            "not a number of bytes (2-16777216)",
        )
        max_instruction_bytes = _option(
            options,
            "max_instruction_bytes",
            DEFAULT_MAX_INSTRUCTION_BYTES,
            _bounded_int(16, MAX_RECEIVED_DATAGRAM - REPLY_OVERHEAD),
            f"not a number of bytes (16-{MAX_RECEIVED_DATAGRAM - REPLY_OVERHEAD})",
        )
        return SpoolSource(
            SpoolDirectory(os.path.abspath(path), max_file_bytes),
            reactor,
            interval=interval,
            max_instruction_bytes=max_instruction_bytes,
        )
