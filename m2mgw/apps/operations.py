"""
The operations of the application protocol (``docs/app-protocol.md``).

:class:`AppOperations` holds what the operations need (the store, the
application instruction source, the policies, the clock) and gives the
:class:`~m2mgw.apps.listener.Dispatcher` its table (:meth:`AppOperations.table`).
Every operation checks its parameters strictly (an unknown parameter is a
``bad-request``, so a misspelt one is never ignored), then who is asking:

- reading (``hello``, ``ping``, ``get``, ``modules``, ``subscribe``,
  ``unsubscribe``, ``ack``) needs no permission, only that the modules named
  are the application's;
- acting (``submit``, ``cancel``, ``rotate``, ``approve``, ``refuse``) needs
  the permission, inside the application's hours, on its own modules.

A module that is not the application's and a module that does not exist get
the same ``forbidden``, so an application cannot probe for identities.  Every
action is recorded as an ``audit`` security event, every refusal as an
``auth`` one (source ``app:NAME``).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from m2mgw.apps.events import EVENT_KINDS, EventFilter
from m2mgw.apps.listener import (
    APP_PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    AppRequest,
    AppRequestError,
    ListenerSettings,
    Operation,
)
from m2mgw.apps.policy import AppPolicies
from m2mgw.apps.polling import InstructionPoll
from m2mgw.apps.source import ApplicationSource, SourceStopped
from m2mgw.errors import (
    DecodeError,
    InvalidTransition,
    M2MGWError,
    UnknownInstruction,
    UnknownModule,
)
from m2mgw.instructions.submission import InvalidInstruction, new_instruction
from m2mgw.interfaces import IModuleStore
from m2mgw.protocol import cbor
from m2mgw.protocol.senml import to_json
from m2mgw.records import (
    PENDING_INSTRUCTION_STATES,
    Instruction,
    InstructionState,
    Module,
    ModuleKey,
    SecurityEvent,
    Session,
)
from m2mgw.store.logic import NON_APP_SOURCES

__all__ = [
    "AppConnection",
    "AppOperations",
    "RotationRequest",
    "instruction_view",
    "module_summary",
]

#: The longest ``idempotency_key`` accepted, in characters.
MAX_IDEMPOTENCY_KEY = 128
#: The most entries in a ``subscribe`` filter list.
MAX_FILTER_ENTRIES = 10_000
#: ``modules`` pages: default and largest ``limit``.
DEFAULT_PAGE, MAX_PAGE = 100, 1000

_PENDING = PENDING_INSTRUCTION_STATES


class RotationRequest(Protocol):
    """
    What the ``rotate`` op calls (the key lifecycle's shared function):
    queue a ``keygen`` for ``module_id`` with the parameter set ``params``
    (a ``pid``, a name, or ``None`` for the module's default), on behalf of
    ``requested_by``.

    It returns the queued instruction, or ``None`` if a rotation is already
    under way; it raises :class:`m2mgw.errors.UnknownModule`,
    :class:`m2mgw.errors.InvalidTransition` (the module cannot rotate now) or
    another :class:`m2mgw.errors.M2MGWError` (an unknown parameter set).
    """

    def __call__(
        self, module_id: str, params: int | str | None, requested_by: str
    ) -> Awaitable[Instruction | None]: ...


class AppConnection(Protocol):
    """What operations need from the connection a request came on."""

    def subscribe(self, event_filter: EventFilter, acked: int) -> None:
        """Start (or restart) event delivery after ``acked`` through ``event_filter``."""

    def unsubscribe(self) -> None:
        """Stop event delivery."""

    def acknowledge(self, seq: int) -> Awaitable[None] | None:
        """Acknowledge events up to ``seq`` through the delivery (``None``: not subscribed)."""


# -- views ------------------------------------------------------------------------------


def _decoded(data: bytes | None) -> Any:
    """A CBOR value stored by the gateway, rendered as JSON (``None`` if absent)."""
    if data is None:
        return None
    try:
        return to_json(cbor.decode(data))
    except DecodeError:
        return {"bytes-undecodable": len(data)}


def instruction_view(instruction: Instruction) -> dict[str, Any]:
    """An instruction as ``get`` and ``cancel`` show it."""
    history = [{"state": InstructionState.QUEUED.value, "at": instruction.created_at}]
    if instruction.state is not InstructionState.QUEUED:
        history.append({"state": instruction.state.value, "at": instruction.updated_at})
    return {
        "module": instruction.module_id,
        "iid": instruction.iid,
        "kind": instruction.kind,
        "body": _decoded(instruction.body),
        "state": instruction.state.value,
        "source": instruction.source,
        "idempotency_key": instruction.idempotency_key,
        "created_at": instruction.created_at,
        "updated_at": instruction.updated_at,
        "not_after": instruction.not_after,
        "attempts": instruction.attempts,
        "exec_ts": instruction.exec_ts,
        "status": instruction.status,
        "result": _decoded(instruction.result),
        "history": history,
    }


def module_summary(module: Module) -> dict[str, Any]:
    """A module as ``modules`` lists it."""
    return {
        "module": module.module_id,
        "status": module.status.value,
        "group": module.group,
        "created_at": module.created_at,
        "last_hello_ts": module.last_hello_ts,
    }


def _key_view(key: ModuleKey) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "suite": key.suite,
        "status": key.status.value,
        "created_at": key.created_at,
        "activated_at": key.activated_at,
        "retired_at": key.retired_at,
        "not_after": key.not_after,
        "pid": key.pid,
    }


def _session_view(session: Session | None, now: int) -> dict[str, Any] | None:
    if session is None or session.expires_at <= now:
        return None
    return {
        "kid": session.kid,
        "suite": session.suite,
        "created_at": session.created_at,
        "expires_at": session.expires_at,
    }


# -- parameters -------------------------------------------------------------------------


def _not_yours(module_id: str) -> AppRequestError:
    return AppRequestError("forbidden", f"module {module_id!r} is not one of yours")


def _no_instruction(module_id: str, iid: int) -> AppRequestError:
    return AppRequestError("not-found", f"module {module_id!r} has no instruction {iid}")


def _bad(request: AppRequest, message: str) -> AppRequestError:
    return AppRequestError("bad-request", message)


def _only(request: AppRequest, *names: str) -> None:
    """:raise AppRequestError: a parameter other than ``names`` was given."""
    unknown = sorted(set(request.params) - set(names))
    if unknown:
        allowed = ", ".join(names) or "none"
        raise _bad(request, f"unknown parameter {unknown[0]!r} for {request.op} (known: {allowed})")


def _string(request: AppRequest, name: str, max_length: int = 256) -> str:
    """A required, non-empty string parameter."""
    value = request.params.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(request, f"{request.op} needs {name!r}, a non-empty string")
    if len(value) > max_length:
        raise _bad(request, f"{name!r} is longer than {max_length} characters")
    return value


def _integer(
    request: AppRequest,
    name: str,
    minimum: int,
    maximum: int = 2**63 - 1,
    default: int | None = None,
    required: bool = False,
) -> int | None:
    """An integer parameter in ``[minimum, maximum]`` (booleans are not integers)."""
    if name not in request.params or (request.params[name] is None and not required):
        if required:
            raise _bad(request, f"{request.op} needs {name!r}, an integer")
        return default
    value = request.params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(request, f"{name!r} must be an integer")
    if not minimum <= value <= maximum:
        raise _bad(request, f"{name!r} must be between {minimum} and {maximum}")
    return value


def _string_list(request: AppRequest, name: str) -> frozenset[str] | None:
    """An optional list of strings, as a set (``None`` when absent or null)."""
    value = request.params.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_FILTER_ENTRIES
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise _bad(request, f"{name!r} must be a list of non-empty strings")
    return frozenset(value)


def _module_and_iid(request: AppRequest) -> tuple[str, int]:
    _only(request, "module", "iid")
    module_id = _string(request, "module")
    iid = _integer(request, "iid", 1, required=True)
    assert iid is not None
    return module_id, iid


# -- the operations ---------------------------------------------------------------------


@dataclass
class AppOperations:
    """
    Every operation of the application protocol.

    :ivar store: the module store.
    :ivar source: the application instruction source (submissions go through it).
    :ivar policies: each application's permissions, hours and networks.
    :ivar clock: the time (hours, expiries, audit entries).
    :ivar settings: the listener's limits, told by ``hello``.
    :ivar max_instruction_bytes: the largest instruction accepted (its size in a reply).
    :ivar rotation: queues a key rotation (``None``: ``rotate`` is ``unavailable``).
    :ivar poll: the polling variant's waits, ended by submissions (optional).
    """

    store: IModuleStore
    source: ApplicationSource
    policies: AppPolicies
    clock: IReactorTime
    settings: ListenerSettings
    max_instruction_bytes: int = 1104
    rotation: RotationRequest | None = None
    poll: InstructionPoll | None = None

    log = Logger()

    def __post_init__(self) -> None:
        if self.poll is not None:
            self.source.add_listener(self.poll.instruction_submitted)

    def table(self) -> dict[str, Operation]:
        """The ``op`` name -> operation table for a :class:`~m2mgw.apps.listener.Dispatcher`."""
        return {
            "hello": self.hello,
            "ping": self.ping,
            "submit": self.submit,
            "cancel": self.cancel,
            "get": self.get,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "ack": self.ack,
            "modules": self.modules,
            "rotate": self.rotate,
            "approve": self.approve,
            "refuse": self.refuse,
        }

    def _now(self) -> int:
        return int(self.clock.seconds())

    # -- who may ---------------------------------------------------------------------

    async def _security_event(
        self, category: str, reason: str, request: AppRequest, module_id: str | None, detail: str
    ) -> None:
        """Record an audit or auth security event; a store failure is only logged."""
        event = SecurityEvent(
            at=self._now(),
            category=category,
            reason=reason,
            source=f"app:{request.principal}",
            claimed_id=module_id,
            detail=detail,
        )
        try:
            await self.store.record_security_events([event])
        except Exception:
            self.log.failure("recording {reason} for {principal} failed", reason=reason,
                             principal=request.principal)  # fmt: skip

    async def _audit(self, request: AppRequest, module_id: str, detail: str = "") -> None:
        await self._security_event("audit", f"app-{request.op}", request, module_id, detail)

    async def _refuse(
        self, request: AppRequest, module_id: str | None, code: str, message: str
    ) -> AppRequestError:
        """Record a refusal and return the error to raise."""
        reason = "app-outside-hours" if code == "outside-hours" else "app-forbidden"
        await self._security_event("auth", reason, request, module_id, f"op={request.op}")
        self.log.info(
            "refused {op} of {principal}: {message}",
            op=request.op,
            principal=request.principal,
            message=message,
        )
        return AppRequestError(code, message)

    async def _own_module(self, request: AppRequest, module_id: str) -> None:
        """:raise AppRequestError: ``forbidden`` unless ``module_id`` is the application's."""
        if request.principal not in await self.store.get_module_apps(module_id):
            error = _not_yours(module_id)
            raise await self._refuse(request, module_id, error.code, error.message)

    async def _may(self, request: AppRequest, permission: str, module_id: str) -> None:
        """
        :raise AppRequestError: ``forbidden`` without the permission or the
            module, ``outside-hours`` outside the application's hours.
        """
        policy = self.policies.for_app(request.principal)
        if not policy.may(permission):
            raise await self._refuse(
                request, module_id, "forbidden", f"this application may not {permission}"
            )
        if not policy.in_hours(self._now()):
            hours = " ".join(policy.hours_text() or [])
            raise await self._refuse(
                request,
                module_id,
                "outside-hours",
                f"this application may {permission} only at {hours} (UTC)",
            )
        await self._own_module(request, module_id)

    # -- hello, ping -----------------------------------------------------------------

    async def hello(self, request: AppRequest) -> dict[str, Any]:
        """Negotiate the version; tell the connection's facts."""
        _only(request, "versions")
        offered = request.params.get("versions", [APP_PROTOCOL_VERSION])
        if (
            not isinstance(offered, list)
            or not offered
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in offered)
        ):
            raise _bad(request, "'versions' must be a non-empty list of integers")
        common = set(offered) & set(SUPPORTED_VERSIONS)
        if not common:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise AppRequestError("unsupported-version", f"this gateway speaks version {supported}")
        policy = self.policies.for_app(request.principal)
        acked, last = await self.store.outbox_position(request.principal)
        settings = self.settings
        return {
            "version": max(common),
            "versions": list(SUPPORTED_VERSIONS),
            "principal": request.principal,
            "time": self._now(),
            "permissions": list(policy.permissions),
            "hours": policy.hours_text(),
            "idle_timeout": settings.idle_timeout,
            "ping_interval": settings.ping_interval,
            "max_line": settings.max_line,
            "max_unacked": settings.max_unacked,
            "acked_seq": acked,
            "last_seq": last,
        }

    def ping(self, request: AppRequest) -> dict[str, Any]:
        """Keep-alive."""
        _only(request)
        return {"time": self._now()}

    # -- instructions ----------------------------------------------------------------

    async def submit(self, request: AppRequest) -> dict[str, Any]:
        """Queue an instruction for one of the application's modules."""
        _only(request, "module", "kind", "body", "ttl", "not_after", "idempotency_key")
        module_id = _string(request, "module")
        kind = _string(request, "kind")
        ttl = _integer(request, "ttl", 1)
        not_after = _integer(request, "not_after", 0)
        key = request.params.get("idempotency_key")
        if key is not None and (
            not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY
        ):
            raise _bad(request, f"'idempotency_key' must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        await self._may(request, "submit", module_id)
        now = self._now()
        try:
            new = new_instruction(
                module_id,
                kind,
                request.params.get("body"),
                now=now,
                source=request.principal,
                ttl=ttl,
                not_after=not_after,
                max_size=self.max_instruction_bytes,
                idempotency_key=key,
            )
        except InvalidInstruction as e:
            raise AppRequestError("invalid-instruction", str(e)) from None
        try:
            instruction = await self.source.submit(new)
        except UnknownModule:
            raise AppRequestError(
                "forbidden", f"module {module_id!r} is not one of yours"
            ) from None
        except SourceStopped:
            raise AppRequestError(
                "unavailable", "the gateway is not accepting instructions"
            ) from None
        await self._audit(request, module_id, f"iid={instruction.iid} kind={kind}")
        return {
            "module": module_id,
            "iid": instruction.iid,
            "state": instruction.state.value,
            "created_at": instruction.created_at,
            "not_after": instruction.not_after,
        }

    async def _visible_instruction(
        self, request: AppRequest, module_id: str, iid: int
    ) -> Instruction:
        """
        The instruction, if the application may see it (its own, or the gateway's).

        :raise AppRequestError: ``not-found`` or ``forbidden``.
        """
        instruction: Instruction | None = await self.store.get_instruction(module_id, iid)
        if instruction is None:
            raise _no_instruction(module_id, iid)
        if instruction.source != request.principal and instruction.source not in NON_APP_SOURCES:
            raise await self._refuse(
                request, module_id, "forbidden", f"instruction {iid} is another application's"
            )
        return instruction

    async def cancel(self, request: AppRequest) -> dict[str, Any]:
        """Cancel one of the application's queued or sent instructions."""
        module_id, iid = _module_and_iid(request)
        await self._may(request, "cancel", module_id)
        instruction = await self._visible_instruction(request, module_id, iid)
        if instruction.source != request.principal:
            raise await self._refuse(
                request, module_id, "forbidden", f"instruction {iid} was not submitted by you"
            )
        try:
            cancelled = await self.store.cancel_instruction(module_id, iid, self._now())
        except UnknownInstruction:
            raise AppRequestError(
                "not-found", f"module {module_id!r} has no instruction {iid}"
            ) from None
        except InvalidTransition:
            raise AppRequestError(
                "conflict", f"instruction {iid} is already {instruction.state.value}"
            ) from None
        await self._audit(request, module_id, f"iid={iid}")
        return instruction_view(cancelled)

    async def get(self, request: AppRequest) -> dict[str, Any]:
        """An instruction's state and history."""
        module_id, iid = _module_and_iid(request)
        await self._own_module(request, module_id)
        return instruction_view(await self._visible_instruction(request, module_id, iid))

    # -- events ----------------------------------------------------------------------

    def _connection(self, request: AppRequest) -> AppConnection:
        if request.connection is None:
            raise AppRequestError("unavailable", "events need a connection")
        connection: AppConnection = request.connection
        return connection

    async def subscribe(self, request: AppRequest) -> dict[str, Any]:
        """Start or change event delivery on this connection."""
        _only(request, "modules", "groups", "events")
        modules = _string_list(request, "modules")
        groups = _string_list(request, "groups")
        kinds = _string_list(request, "events")
        if kinds is not None and not kinds <= set(EVENT_KINDS):
            unknown = sorted(kinds - set(EVENT_KINDS))[0]
            raise _bad(request, f"unknown event kind {unknown!r} (known: {', '.join(EVENT_KINDS)})")
        connection = self._connection(request)
        for module_id in sorted(modules or ()):
            await self._own_module(request, module_id)
        acked, last = await self.store.outbox_position(request.principal)
        connection.subscribe(EventFilter(modules, groups, kinds), acked)
        return {"acked_seq": acked, "last_seq": last}

    def unsubscribe(self, request: AppRequest) -> dict[str, Any]:
        """Stop event delivery on this connection."""
        _only(request)
        self._connection(request).unsubscribe()
        return {}

    async def ack(self, request: AppRequest) -> dict[str, Any]:
        """Acknowledge events up to ``seq``."""
        _only(request, "seq")
        seq = _integer(request, "seq", 0, required=True)
        assert seq is not None
        acknowledged = None if request.connection is None else request.connection.acknowledge(seq)
        if acknowledged is None:
            await self.store.ack_events(request.principal, seq)
        else:
            await acknowledged
        return {"acked_seq": await self.store.acked_seq(request.principal)}

    # -- modules ---------------------------------------------------------------------

    async def modules(self, request: AppRequest) -> dict[str, Any]:
        """List the application's modules, or show one."""
        if "module" in request.params:
            _only(request, "module")
            module_id = _string(request, "module")
            await self._own_module(request, module_id)
            return {"module": await self._module_detail(request, module_id)}
        _only(request, "offset", "limit")
        offset = _integer(request, "offset", 0, default=0)
        limit = _integer(request, "limit", 1, MAX_PAGE, default=DEFAULT_PAGE)
        assert offset is not None and limit is not None
        page = await self.store.list_app_modules(request.principal, offset, limit + 1)
        return {
            "modules": [module_summary(module) for module in page[:limit]],
            "next": offset + limit if len(page) > limit else None,
        }

    async def _module_detail(self, request: AppRequest, module_id: str) -> dict[str, Any]:
        module = await self.store.get_module(module_id)
        if module is None:  # removed since the check
            raise _not_yours(module_id)
        keys = await self.store.list_keys(module_id)
        session = await self.store.get_module_session(module_id)
        pending = await self.store.list_instructions(module_id, _PENDING, MAX_PAGE)
        return {
            **module_summary(module),
            "keys": [_key_view(key) for key in keys],
            "session": _session_view(session, self._now()),
            "pending_instructions": len(pending),
        }

    # -- keys and enrolment ----------------------------------------------------------

    async def rotate(self, request: AppRequest) -> dict[str, Any]:
        """Ask for a key rotation of one of the application's modules."""
        _only(request, "module", "params")
        module_id = _string(request, "module")
        params = request.params.get("params")
        if params is not None and (
            isinstance(params, bool)
            or not isinstance(params, (int, str))
            or (isinstance(params, int) and params < 1)
            or params == ""
        ):
            raise _bad(request, "'params' must be a parameter set's pid (>= 1) or name")
        await self._may(request, "rotate", module_id)
        if self.rotation is None:
            raise AppRequestError("unavailable", "key rotation is not available on this gateway")
        try:
            instruction = await self.rotation(module_id, params, request.principal)
        except UnknownModule:
            raise AppRequestError(
                "forbidden", f"module {module_id!r} is not one of yours"
            ) from None
        except InvalidTransition as e:
            raise AppRequestError("conflict", str(e)) from None
        except M2MGWError as e:
            raise AppRequestError("bad-request", str(e)) from None
        if instruction is None:
            raise AppRequestError("conflict", f"a key rotation of {module_id!r} is under way")
        await self._audit(request, module_id, f"iid={instruction.iid} params={params}")
        return {"module": module_id, "iid": instruction.iid, "state": instruction.state.value}

    async def _decide(self, request: AppRequest, approve: bool) -> dict[str, Any]:
        _only(request, "module")
        module_id = _string(request, "module")
        await self._may(request, "approve", module_id)
        try:
            module: Module = await self.store.decide_approval(module_id, approve, self._now())
        except UnknownModule:
            raise AppRequestError(
                "forbidden", f"module {module_id!r} is not one of yours"
            ) from None
        except InvalidTransition:
            raise AppRequestError(
                "conflict", f"module {module_id!r} is not waiting for approval"
            ) from None
        await self._audit(request, module_id, f"status={module.status.value}")
        return {"module": module_id, "status": module.status.value}

    async def approve(self, request: AppRequest) -> dict[str, Any]:
        """Approve a module waiting for approval (it becomes enabled)."""
        return await self._decide(request, True)

    async def refuse(self, request: AppRequest) -> dict[str, Any]:
        """Refuse a module waiting for approval (it becomes disabled)."""
        return await self._decide(request, False)
