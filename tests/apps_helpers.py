"""
Shared by the application listener's tests: a gateway's application side on
a memory store and a fake clock, and clients on ``StringTransport``s whose
every line (both ways) is validated against the protocol's JSON Schemas.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from m2mgw.apps.events import EventHub
from m2mgw.apps.listener import AppFactory, AppProtocol, Dispatcher, ListenerSettings
from m2mgw.apps.operations import AppOperations, RotationRequest
from m2mgw.apps.policy import AppPolicies
from m2mgw.apps.polling import InstructionPoll
from m2mgw.apps.source import ApplicationSource
from m2mgw.records import Module
from m2mgw.service import QueueSink
from m2mgw.store.memory import MemoryStore
from tests.app_protocol_helpers import TrafficChecker

NOW = 1_750_000_000


class AppClient:
    """One application connection: requests written in, lines read out, all schema-checked."""

    def __init__(self, side: AppSide, protocol: AppProtocol, transport: StringTransport) -> None:
        self.side = side
        self.protocol = protocol
        self.transport = transport
        self.checker = TrafficChecker()
        self._read = 0
        self._next_id = 0
        #: Every line received so far, parsed.
        self.received: list[dict[str, Any]] = []

    def send(self, op: str, check: bool = True, **params: Any) -> int:
        """Send a request (validated against its schema if ``check``); return its id."""
        self._next_id += 1
        request = {"id": self._next_id, "op": op, **params}
        if check:
            self.checker.sent(request)
        else:
            self.checker.ops.setdefault(request["id"], []).append(op)
        self.send_raw(json.dumps(request).encode() + b"\n")
        return self._next_id

    def send_raw(self, data: bytes) -> None:
        """Feed raw bytes to the gateway and let it run."""
        self.protocol.dataReceived(data)
        self.side.settle()

    def lines(self) -> list[dict[str, Any]]:
        """The lines received since the last call (each validated), once the gateway settled."""
        self.side.settle()
        data = self.transport.value()
        new = data[self._read :]
        complete = new[: new.rfind(b"\n") + 1]
        self._read += len(complete)
        parsed = [json.loads(line) for line in complete.splitlines()]
        for message in parsed:
            self.checker.received(message)
        self.received.extend(parsed)
        return parsed

    def request(self, op: str, check: bool = True, **params: Any) -> dict[str, Any]:
        """Send a request and return its response (events received meanwhile are kept)."""
        request_id = self.send(op, check, **params)
        for message in self.lines():
            if message.get("id") == request_id and "event" not in message:
                return message
        raise AssertionError(f"no response to {op} {params}")

    def ok(self, op: str, **params: Any) -> Any:
        """The result of a request that must succeed."""
        response = self.request(op, **params)
        assert response["ok"] is True, response
        return response["result"]

    def error(self, op: str, **params: Any) -> str:
        """The error code of a request that must fail (the request may break its schema)."""
        response = self.request(op, False, **params)
        assert response["ok"] is False, response
        return str(response["error"]["code"])

    def events(self) -> list[dict[str, Any]]:
        """The events received so far (reading what is new first)."""
        self.lines()
        return [message for message in self.received if "event" in message]


class AppSide:
    """The application side of a gateway on a memory store and a fake clock."""

    def __init__(
        self,
        policies: AppPolicies | None = None,
        rotation: RotationRequest | None = None,
        poll_ms: int = 0,
        max_unacked: int = 1000,
        ping_interval: int = 60,
        idle_timeout: int = 300,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.source = ApplicationSource()
        self.source.start(QueueSink(self.store, self.clock))
        self.hub = EventHub()
        self.store.add_event_listener(self.hub.events_appended)
        self.policies = policies if policies is not None else AppPolicies()
        self.poll = (
            InstructionPoll(self.store, self.hub, self.clock, poll_ms) if poll_ms > 0 else None
        )
        settings = ListenerSettings(
            idle_timeout=idle_timeout, ping_interval=ping_interval, max_unacked=max_unacked
        )
        self.operations = AppOperations(
            self.store,
            self.source,
            self.policies,
            self.clock,
            settings,
            rotation=rotation,
            poll=self.poll,
        )
        self.factory = AppFactory(
            Dispatcher(self.operations.table()),
            idle_timeout=idle_timeout,
            clock=self.clock,
            principal_of=lambda transport: getattr(transport, "app_principal", None),
            store=self.store,
            hub=self.hub,
            policies=self.policies,
            ping_interval=ping_interval,
            max_unacked=max_unacked,
        )

    def settle(self) -> None:
        """Run what was scheduled for now (event deliveries read in the next turn)."""
        for _ in range(10):
            if not any(call.getTime() <= self.clock.seconds() for call in self.clock.calls):
                return
            self.clock.advance(0)

    def connect(self, principal: str = "billing", host: str = "10.1.2.3") -> AppClient:
        """A connected (and authenticated) application."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        transport.app_principal = principal  # type: ignore[attr-defined]
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        return AppClient(self, protocol, transport)

    def add_module(
        self, module_id: str, apps: tuple[str, ...] = ("billing",), **fields: Any
    ) -> None:
        """Provision a module belonging to ``apps`` (seen before, unless ``last_hello_ts=0``)."""
        fields.setdefault("last_hello_ts", 1)
        self.store.add_modules([Module(module_id, created_at=NOW - 10, **fields)])
        self.store.set_module_apps(module_id, apps)

    def security_reasons(self) -> list[tuple[str, str, str | None]]:
        """``(category, reason, claimed_id)`` of the recorded security events."""
        events: list[Any] = []
        self.store.list_security_events(0).addCallback(events.extend)
        return [(e.category, e.reason, e.claimed_id) for e in events]


def payloads(events: list[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The payloads of the events of ``kind``."""
    return [dict(e["payload"]) for e in events if e["event"] == kind]
