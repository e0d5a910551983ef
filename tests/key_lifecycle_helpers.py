"""
Shared by the key lifecycle tests (issue 4): a gateway made of the MGP/1
engine and a store, listening on 127.0.0.1 with a settable clock, and real
modules (:class:`~m2mgw.client.module.ModuleEndpoint` over a
:class:`~m2mgw.client.transport.TwistedTransport`) whose clock is the same.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from m2mgw.client.module import (
    KeyState,
    ModuleEndpoint,
    ModuleKeyPair,
    ModuleState,
    Outgoing,
)
from m2mgw.client.transport import (
    RetryPolicy,
    TwistedTransport,
    WakeResult,
    enroll_plan,
    run_twisted,
    wake_plan,
)
from m2mgw.config import ProtocolPolicy, RotationConfig
from m2mgw.interfaces import ICipherSuite, IModuleStore
from m2mgw.keys.params import ParameterSet, complete_sets
from m2mgw.modules.udp import ModuleDatagramProtocol
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import VOUCHED_BY_OPERATOR, KeyStatus, ModuleKey
from m2mgw.registry import all_plugins, lookup
from m2mgw.store.memory import MemoryStore
from tests.client_helpers import NOW, PSK, Clock, LoadedServerKey, server_key

SUITES: dict[str, ICipherSuite] = all_plugins(ICipherSuite)
#: A module's clean retry policy on loopback: replies come in milliseconds.
FAST = RetryPolicy(timeout=0.5, max_timeout=1.0)
#: For exchanges expected to go unanswered: give up quickly.
SILENT = RetryPolicy(
    timeout=0.05, max_timeout=0.1, same_bytes=0, new_ctr=0, hello_attempts=1, rehellos=0
)

_SERVER_KEYS: dict[str, LoadedServerKey] = {}


def cached_server_key(suite: str, skid: int) -> LoadedServerKey:
    """A server key pair per suite, made once per test run (RSA keys are slow)."""
    key = _SERVER_KEYS.get(suite)
    if key is None:
        key = _SERVER_KEYS[suite] = server_key(suite, skid)
    return key


#: The server keys of the test gateway: ``skid`` per suite.
SKIDS = {"p256": 1, "p384": 3, "x25519": 4}


@dataclass
class LiveGateway:
    """The engine on a store, listening on 127.0.0.1, on a settable clock."""

    store: IModuleStore
    controller: ModuleController
    clock: Clock
    port: int
    servers: list[LoadedServerKey]
    params: Mapping[str, ParameterSet]
    listening: Any = None
    modules: list[LiveModule] = field(default_factory=list)
    #: The public keys :meth:`preregistered` made, for the test to import.
    preregistered_keys: dict[str, ModuleKey] = field(default_factory=dict)

    @property
    def now(self) -> int:
        return int(self.clock())

    async def stop(self) -> None:
        for module in self.modules:
            await module.close()
        await self.listening.stopListening()

    def module(self, module_id: str, suite: str = "p256", **options: Any) -> LiveModule:
        """A real module provisioned with the PSK and every server key of the gateway."""
        state = ModuleState(
            identity=module_id,
            suite=suite,
            psk=PSK,
            server_keys={s.skid: s.public_key() for s in self.servers},
            skid=SKIDS[suite],
        )
        return self.attach(state, **options)

    def attach(
        self, state: ModuleState, *, policy: RetryPolicy = FAST, **options: Any
    ) -> LiveModule:
        """A real module with ``state``, on its own UDP socket."""
        from twisted.internet import reactor

        endpoint = ModuleEndpoint(
            state, clock=self.clock, execute=lambda kind, body: (0, {"ran": kind}), **options
        )
        transport = TwistedTransport(reactor, [("127.0.0.1", self.port)], policy=policy)
        port = reactor.listenUDP(0, transport, interface="127.0.0.1")
        module = LiveModule(endpoint, transport, port)
        self.modules.append(module)
        return module

    def preregistered(
        self, module_id: str, suite: str = "p256", kid: int = 1, not_after: int | None = None
    ) -> LiveModule:
        """
        A module whose key was made at manufacture; its public key is in
        :attr:`preregistered_keys` for the test to import.
        """
        suite_object = SUITES[suite]
        private = suite_object.generate_signing_key()
        state = ModuleState(
            identity=module_id,
            suite=suite,
            keys={kid: ModuleKeyPair(kid, suite, bytes(suite_object.dump_signing_key(private)))},
            server_keys={s.skid: s.public_key() for s in self.servers},
            skid=SKIDS[suite],
        )
        public = bytes(suite_object.signing_public(private))
        self.preregistered_keys[module_id] = ModuleKey(
            module_id,
            kid,
            suite,
            public,
            status=KeyStatus.ACTIVE,
            vouched_by=VOUCHED_BY_OPERATOR,
            created_at=self.now,
            activated_at=self.now,
            not_after=not_after,
        )
        return self.attach(state)


@dataclass
class LiveModule:
    """A real module on its own UDP socket."""

    endpoint: ModuleEndpoint
    transport: TwistedTransport
    port: Any

    @property
    def state(self) -> ModuleState:
        return self.endpoint.state

    def wake(self, **options: Any) -> Deferred[WakeResult]:
        """One wake-up (:func:`~m2mgw.client.transport.wake_plan`)."""
        return run_twisted(self.transport, wake_plan(self.endpoint, **options))

    def report(self, value: float, **options: Any) -> Deferred[WakeResult]:
        """A wake-up with one reading."""
        return self.wake(data=[{0: "t", 2: value}], **options)

    def enroll(self) -> Deferred[WakeResult]:
        """Enrolment with the PSK (:func:`~m2mgw.client.transport.enroll_plan`)."""
        return run_twisted(self.transport, enroll_plan(self.endpoint))

    def active_kid(self) -> int:
        """The module's newest active key (0: none)."""
        keys = self.state.keys.values()
        return max((k.kid for k in keys if k.status == KeyState.ACTIVE), default=0)

    async def close(self) -> None:
        await self.port.stopListening()


async def start_gateway(
    *,
    store: IModuleStore | None = None,
    policy: ProtocolPolicy | None = None,
    rotation: RotationConfig | None = None,
    params: Mapping[str, ParameterSet] | None = None,
    suites: Sequence[str] = ("p256", "x25519"),
    now: float = NOW,
) -> LiveGateway:
    """The engine on ``store`` (default: a memory store), listening on 127.0.0.1."""
    from twisted.internet import reactor

    if store is None:
        store = MemoryStore()
    await store.open()
    servers = [cached_server_key(suite, SKIDS[suite]) for suite in suites]
    clock = Clock(now)
    policy = policy or ProtocolPolicy()
    sets = complete_sets(params or {}, {s: SUITES[s] for s in suites}, policy.key_ttl)
    controller = ModuleController(
        store,
        {name: SUITES[name] for name in suites},
        servers,
        policy,
        now=clock,
        params=sets,
        rotation=rotation,
    )
    listening = reactor.listenUDP(0, ModuleDatagramProtocol(controller), interface="127.0.0.1")
    # A fleet's bursts overflow the default receive buffer (about 200 KiB).
    listening.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return LiveGateway(store, controller, clock, listening.getHost().port, servers, sets, listening)


class _Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append(datagram)


async def send_raw(port: int, outgoing: Outgoing | bytes, wait: float = 0.3) -> list[bytes]:
    """Send one datagram to the gateway from a fresh socket; the replies within ``wait``."""
    from twisted.internet import reactor

    collector = _Collector()
    listening = reactor.listenUDP(0, collector, interface="127.0.0.1")
    try:
        datagram = outgoing.datagram if isinstance(outgoing, Outgoing) else outgoing
        collector.transport.write(datagram, ("127.0.0.1", port))  # type: ignore[union-attr]
        await deferLater(reactor, wait, lambda: None)
    finally:
        await listening.stopListening()
    return collector.received


async def key_series(store: IModuleStore, module_id: str) -> dict[int, tuple[str, KeyStatus]]:
    """``kid -> (suite, status)`` of every key of a module."""
    return {k.kid: (k.suite, k.status) for k in await store.list_keys(module_id)}


async def events(store: IModuleStore, app: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The payloads of an application's events (of one kind), oldest first."""
    found = await store.events_after(app, 0, 10_000)
    return [dict(e.payload) for e in found if kind is None or e.kind == kind]


def lookup_suite(name: str) -> ICipherSuite:
    suite: ICipherSuite = lookup(ICipherSuite, name)
    return suite
