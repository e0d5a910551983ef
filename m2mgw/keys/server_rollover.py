"""
Server key rollover (issue 4 item 5): a new module-side server key, its
announcement to the modules, and the retirement of the old one.

The life of a server key (``skid``), :class:`~m2mgw.records.ServerKeyStatus`:

1. ``active`` -- created by ``m2mgw-admin server-key add`` (a key file in the
   data directory, a record in the store).  The running gateway accepts it
   from the next reload (SIGHUP, or the ``server-keys`` job, every
   ``[jobs] server_key_interval`` seconds).
2. Announced -- ``m2mgw-admin server-key announce SKID`` queues, for every
   module that uses the key's suite (:func:`module_uses_suite`), one ``skey``
   instruction (MGP/1 §8.2) under the idempotency key ``skey:SKID``, source
   ``gateway``: re-running it queues nothing twice.  The engine signs each one
   when it builds the reply that carries it, with the server key of that
   reply's session.  A module verifies it, stores the key, confirms, and uses
   the new ``skid`` from its next HELLO.
3. ``retiring`` -- ``m2mgw-admin server-key retire OLD [--deadline EPOCH]``:
   still accepted, no longer announced.
4. ``retired`` -- by :func:`retirement_reason`, checked by the ``server-keys``
   job: once no announcement of an ``active`` successor of the same suite is
   still ``queued`` or ``sent`` (every module told has confirmed, or its
   instruction failed, expired or was cancelled), or once the deadline has
   passed.  The last ``active`` key of a suite is never retired.  From then on
   a HELLO naming the old ``skid`` is dropped (silently, as an unknown
   ``skid``); sessions it opened before run on until they expire (they need
   no server key, except to sign an ``skey``, which the retired key still does).

The state is in the store, so every gateway node sharing it reaches the same
decisions; each node reloads its own key set.  :class:`ServerKeyRollover` is
the gateway's side: it installs the accepted keys into the
:class:`~m2mgw.protocol.engine.ModuleController` and runs the retirement check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from m2mgw.datadir import DataDir, LoadedServerKey, register_server_keys
from m2mgw.errors import M2MGWError
from m2mgw.interfaces import ICipherSuite, IModuleStore
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import KIND_SKEY, instruction_wire_size
from m2mgw.records import (
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    NewInstruction,
    SecurityEvent,
    ServerKey,
    ServerKeyStatus,
    Session,
)

__all__ = [
    "SKEY_SOURCE",
    "Announcement",
    "RolloverRefused",
    "ServerKeyRollover",
    "announce",
    "announcement_key",
    "begin_retirement",
    "module_uses_suite",
    "retire_due_keys",
    "retirement_reason",
    "signature_allowance",
    "skey_instruction",
]

log = Logger()

#: The ``source`` of the ``skey`` instructions the gateway queues.
SKEY_SOURCE = "gateway"
#: Server key statuses a HELLO may name.
ACCEPTED = (ServerKeyStatus.ACTIVE, ServerKeyStatus.RETIRING)
#: Modules read per store call while announcing.
MODULE_PAGE = 1000
#: Store calls (reads, then enqueues) in flight at once while announcing.
DEFAULT_BATCH = 100

_PENDING = (InstructionState.QUEUED.value, InstructionState.SENT.value)


class RolloverRefused(M2MGWError):
    """An operator's rollover step is not safe or makes no sense now; the message says why."""


def announcement_key(skid: int) -> str:
    """The idempotency key of the ``skey`` instructions announcing ``skid``."""
    return f"skey:{skid}"


# -- the announcement ----------------------------------------------------------------------


def signature_allowance(suites: Iterable[ICipherSuite], server_keys: Iterable[Any] = ()) -> int:
    """
    The signature size to reserve in an ``skey`` instruction's wire size.

    The ``sig`` is added when the reply is built, by the server key of the
    session that carries it -- of whatever suite that session is -- so the
    largest signature of any enabled suite is reserved (for ``rsa``, that of
    the largest server key modulus): the size is an upper bound, never an
    underestimate that could push a reply over ``max_datagram``.

    :param server_keys: loaded server key pairs (their RSA modulus sizes count).
    """
    by_name = {suite.name: suite for suite in suites}
    sizes = [int(suite.signature_len) for suite in by_name.values()]
    for pair in server_keys:
        suite = by_name.get(pair.suite)
        key_size = getattr(pair.key, "key_size", None)
        if suite is not None and suite.curve is None and isinstance(key_size, int):
            sizes.append((key_size + 7) // 8)
    return max(sizes, default=0)


def skey_instruction(module_id: str, key: ServerKey, signature_len: int) -> NewInstruction:
    """
    The ``skey`` instruction announcing ``key`` to one module: body
    ``{1: skid, 2: suite, 3: pub, ? 4: sig_pub}`` (the engine adds ``5: sig``
    when it builds the reply), sized with a ``signature_len``-byte signature.
    """
    body: dict[int, Any] = {1: key.skid, 2: key.suite, 3: key.public}
    if key.sig_public is not None:
        body[4] = key.sig_public
    sized = {**body, 5: bytes(signature_len)}
    return NewInstruction(
        module_id=module_id,
        kind=KIND_SKEY,
        body=cbor.encode(body),
        wire_size=instruction_wire_size(KIND_SKEY, sized),
        source=SKEY_SOURCE,
        idempotency_key=announcement_key(key.skid),
    )


def module_uses_suite(suite: str, keys: Sequence[ModuleKey], session: Session | None) -> bool:
    """
    Whether a module talks ``suite`` to the gateway, so that it must learn
    that suite's new server keys.

    A module key authenticates HELLOs of its suite only (MGP/1 §3), so a
    module with an ``active`` or ``pending`` key uses the suites of those
    keys.  A module without one (PSK only) uses the suite of its last
    session; one that never opened a session may have been provisioned for
    any suite and is told (an ``skey`` of a suite it does not use is harmless).
    """
    usable = [key for key in keys if key.status in (KeyStatus.ACTIVE, KeyStatus.PENDING)]
    if usable:
        return any(key.suite == suite for key in usable)
    if session is not None:
        return session.suite == suite
    return True


@dataclass(frozen=True)
class Announcement:
    """
    What :func:`announce` did.

    :ivar told: modules with an ``skey`` for the key (queued now, or earlier).
    :ivar skipped: modules left out: disabled, or using other suites.
    """

    skid: int
    told: int
    skipped: int


async def _gather(calls: Sequence[Callable[[], Deferred[Any]]]) -> list[Any]:
    """Run the store calls concurrently (the SQLite store commits them together)."""
    if not calls:
        return []
    results: list[Any] = await gatherResults([call() for call in calls], consumeErrors=True)
    return results


async def announce(
    store: IModuleStore,
    key: ServerKey,
    signature_len: int,
    now: int,
    *,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> Announcement:
    """
    Queue an ``skey`` for ``key`` for every enabled module that uses its
    suite, :data:`MODULE_PAGE` modules read at a time and at most ``batch``
    store calls in flight.  Idempotent: a module already told is not told twice.

    :param progress: called with ``(told, skipped)`` after each batch.
    :raise RolloverRefused: the key is not ``active``.
    """
    if key.status is not ServerKeyStatus.ACTIVE:
        raise RolloverRefused(
            f"skid {key.skid} is {key.status.value}; only an active key is announced"
        )
    told = skipped = 0
    offset = 0
    while True:
        page: list[Module] = await store.list_modules(offset, MODULE_PAGE)
        offset += len(page)
        for start in range(0, len(page), batch):
            window = page[start : start + batch]
            chunk = [m for m in window if m.status is not ModuleStatus.DISABLED]
            skipped += len(window) - len(chunk)
            keys = await _gather([_bind(store.list_keys, m.module_id) for m in chunk])
            sessions = await _gather([_bind(store.get_module_session, m.module_id) for m in chunk])
            wanted = [
                m.module_id
                for m, module_keys, session in zip(chunk, keys, sessions, strict=True)
                if module_uses_suite(key.suite, module_keys, session)
            ]
            skipped += len(chunk) - len(wanted)
            instructions = [skey_instruction(mid, key, signature_len) for mid in wanted]
            await _gather([_bind(store.enqueue, i, now) for i in instructions])
            told += len(wanted)
            if progress is not None:
                progress(told, skipped)
        if len(page) < MODULE_PAGE:
            break
    return Announcement(key.skid, told, skipped)


def _bind(function: Callable[..., Deferred[Any]], *args: Any) -> Callable[[], Deferred[Any]]:
    return lambda: function(*args)


# -- retirement ------------------------------------------------------------------------------


def successors_of(key: ServerKey, keys: Iterable[ServerKey]) -> list[ServerKey]:
    """The ``active`` keys of ``key``'s suite other than ``key``: what its modules move to."""
    return [
        other
        for other in keys
        if other.suite == key.suite
        and other.skid != key.skid
        and other.status is ServerKeyStatus.ACTIVE
    ]


def retirement_reason(
    key: ServerKey, successors: Sequence[ServerKey], outstanding: int, now: int
) -> str | None:
    """
    THE retirement rule: whether a server key is retired now, and why.

    A ``retiring`` key with at least one ``active`` successor of its suite is
    retired when its deadline (``retire_after``) has come, or when no
    announcement of a successor is outstanding (``queued`` or ``sent``):
    every module told has confirmed, or its ``skey`` failed, expired or was
    cancelled.  Any other key stays as it is -- in particular the last key of
    a suite, which modules could never replace.

    :param successors: :func:`successors_of` ``key``.
    :param outstanding: how many announcements of the successors are
        ``queued`` or ``sent``.
    :return: ``"deadline"``, ``"confirmed"`` or ``None`` (not now).
    """
    if key.status is not ServerKeyStatus.RETIRING or not successors:
        return None
    if key.retire_after is not None and now >= key.retire_after:
        return "deadline"
    if outstanding == 0:
        return "confirmed"
    return None


async def _announcement_counts(store: IModuleStore, keys: Iterable[ServerKey]) -> dict[str, int]:
    """The summed state counts of the announcements of ``keys``."""
    total: dict[str, int] = {}
    for key in keys:
        counts = await store.count_instructions(SKEY_SOURCE, announcement_key(key.skid))
        for state, count in counts.items():
            total[state] = total.get(state, 0) + count
    return total


async def retire_due_keys(store: IModuleStore, now: int) -> list[tuple[ServerKey, str]]:
    """
    Apply :func:`retirement_reason` to every ``retiring`` key: retire those
    whose time has come, with an audit entry each.

    :return: the keys retired and why.
    """
    keys: list[ServerKey] = await store.list_server_keys()
    retired = []
    for key in keys:
        if key.status is not ServerKeyStatus.RETIRING:
            continue
        successors = successors_of(key, keys)
        counts = await _announcement_counts(store, successors)
        outstanding = sum(counts.get(state, 0) for state in _PENDING)
        reason = retirement_reason(key, successors, outstanding, now)
        if reason is None:
            if not successors:
                log.warn(
                    "server key {skid} stays retiring: no active {suite} key replaces it",
                    skid=key.skid,
                    suite=key.suite,
                )
            continue
        await store.set_server_key_status(key.skid, ServerKeyStatus.RETIRED)
        detail = f"skid {key.skid} ({key.suite}): {reason}"
        if reason == "deadline":
            detail += f"; {outstanding} announcements still outstanding"
        await store.record_security_events(
            [SecurityEvent(now, "audit", "server-key-retired", SKEY_SOURCE, None, detail)]
        )
        log.info(
            "server key {skid} ({suite}) retired: {reason}",
            skid=key.skid,
            suite=key.suite,
            reason=reason,
        )
        retired.append((key, reason))
    return retired


async def begin_retirement(
    store: IModuleStore,
    skid: int,
    now: int,
    *,
    deadline: int | None = None,
    force: bool = False,
) -> ServerKey:
    """
    Make ``skid`` ``retiring`` (the operator's ``server-key retire``), or
    move the deadline of a key already retiring.

    :param deadline: retire it at this time at the latest (epoch seconds).
    :param force: retire it even though no successor was announced.
    :return: the key as it now is.
    :raise RolloverRefused: no such key; it is retired; it is the only active
        key of its suite; no module was told about a successor (without
        ``force``); the deadline has passed.
    """
    keys: list[ServerKey] = await store.list_server_keys()
    key = next((k for k in keys if k.skid == skid), None)
    if key is None:
        raise RolloverRefused(f"no server key with skid {skid}")
    if key.status is ServerKeyStatus.RETIRED:
        raise RolloverRefused(f"skid {skid} is already retired")
    if deadline is not None and deadline <= now:
        raise RolloverRefused(f"the deadline {deadline} has passed (now {now})")
    successors = successors_of(key, keys)
    if not successors:
        raise RolloverRefused(
            f"skid {skid} is the only active {key.suite} key; add its successor first"
            f" (m2mgw-admin server-key add --suite {key.suite}) and announce it"
        )
    counts = await _announcement_counts(store, successors)
    if not force and sum(counts.values()) == 0:
        names = ", ".join(str(s.skid) for s in successors)
        raise RolloverRefused(
            f"no module was told about skid {names}; run m2mgw-admin server-key announce"
            " first (or --force: modules that do not know the new key lose the gateway"
            " once this one is retired)"
        )
    await store.set_server_key_status(skid, ServerKeyStatus.RETIRING, deadline)
    updated: list[ServerKey] = await store.list_server_keys()
    return next(k for k in updated if k.skid == skid)


async def announcement_progress(store: IModuleStore, skid: int) -> dict[str, int]:
    """How the ``skey`` instructions announcing ``skid`` stand, by state."""
    counts: dict[str, int] = await store.count_instructions(SKEY_SOURCE, announcement_key(skid))
    return counts


# -- the gateway's side ------------------------------------------------------------------------


class ServerKeyConsumer(Protocol):
    """What takes the accepted server keys: :class:`~m2mgw.protocol.engine.ModuleController`."""

    def set_server_keys(self, server_keys: Iterable[Any], retired: Iterable[Any] = ()) -> None: ...


@dataclass(frozen=True)
class KeySet:
    """The server keys a reload installed: ``accepted`` (active or retiring) and ``retired``."""

    accepted: tuple[int, ...]
    retired: tuple[int, ...]


class ServerKeyRollover:
    """
    The gateway's side of server key rollover: loads the key files of the
    data directory, registers those the store does not know, and installs
    into the module controller the ones the store says are ``active`` or
    ``retiring`` (the ``retired`` ones only sign ``skey`` instructions of the
    sessions they opened); and runs the retirement check.

    :param suites: the configured suites (other key files are ignored).
    :param clock: seconds since the epoch.
    """

    def __init__(
        self,
        datadir: DataDir,
        store: IModuleStore,
        controller: ServerKeyConsumer,
        suites: Sequence[str],
        clock: Callable[[], float],
    ) -> None:
        self.datadir = datadir
        self.store = store
        self.controller = controller
        self.suites = tuple(suites)
        self.clock = clock
        #: What the last reload installed (``None`` before the first).
        self.installed: KeySet | None = None
        self._files: dict[tuple[int, str, float], LoadedServerKey] = {}

    def _load_files(self) -> list[LoadedServerKey]:
        """The key files, parsed once per (skid, suite, mtime): a poll reads only what changed."""
        found: dict[tuple[int, str, float], LoadedServerKey] = {}
        for skid, suite in self.datadir.server_key_files(self.suites):
            path = self.datadir.server_key_path(skid, suite)
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue  # removed meanwhile; the next reload sees it gone
            cache_key = (skid, suite, mtime)
            loaded = self._files.get(cache_key)
            if loaded is None:
                loaded = self.datadir.server_key(skid, suite)
            found[cache_key] = loaded
        self._files = found
        return sorted(found.values(), key=lambda pair: pair.skid)

    async def reload(self) -> KeySet:
        """
        Read the key files and the store's statuses and install the result.

        :return: the skids now accepted and those retired.
        :raise m2mgw.errors.ConfigError: a key file is unreadable (nothing changes).
        """
        loaded = self._load_files()
        records: list[ServerKey] = await self.store.list_server_keys()
        known = {record.skid for record in records}
        if any(pair.skid not in known for pair in loaded):
            for record in await register_server_keys(
                self.store, self.datadir.server_key_records(self.suites)
            ):
                log.info(
                    "recorded server key {skid} ({suite}) in the store",
                    skid=record.skid,
                    suite=record.suite,
                )
            records = await self.store.list_server_keys()
        status = {record.skid: record.status for record in records}
        accepted = [pair for pair in loaded if status.get(pair.skid) in ACCEPTED]
        retired = [pair for pair in loaded if status.get(pair.skid) is ServerKeyStatus.RETIRED]
        self.controller.set_server_keys(accepted, retired=retired)
        installed = KeySet(
            tuple(pair.skid for pair in accepted), tuple(pair.skid for pair in retired)
        )
        if installed != self.installed:
            log.info(
                "server keys accepted: {accepted}; retired: {retired}",
                accepted=", ".join(map(str, installed.accepted)) or "none",
                retired=", ".join(map(str, installed.retired)) or "none",
            )
        self.installed = installed
        return installed

    async def check(self) -> KeySet:
        """The periodic job: retire the keys whose time has come, then reload."""
        await retire_due_keys(self.store, int(self.clock()))
        return await self.reload()
