"""
Shared by the module client tests: a scripted gateway (pure, no store) that
answers the module's datagrams exactly as a test wants, and a real gateway
(the engine with a memory store) listening on 127.0.0.1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from m2mgw.client.module import ModuleEndpoint, ModuleState, ServerPublicKey
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import keyschedule
from m2mgw.protocol.bodies import (
    DataBody,
    HelloBody,
    InstructionItem,
    ReplyBody,
    build_hello_reply_plaintext,
    parse_data_body,
    parse_hello_plaintext,
)
from m2mgw.protocol.messages import Data, DataReply, Hello, HelloReply, parse_request
from m2mgw.registry import lookup

IDENTITY = "client-test-module"
PSK = bytes(range(1, 33))
NOW = 1_700_000_000.0


@dataclass(frozen=True)
class LoadedServerKey:
    """A server key pair as the engine wants it (``ServerKeyPair``)."""

    skid: int
    suite: str
    key: Any
    public: bytes
    sig_public: bytes | None

    def public_key(self) -> ServerPublicKey:
        return ServerPublicKey(self.skid, self.suite, self.public, self.sig_public)


def server_key(suite_name: str = "p256", skid: int = 1) -> LoadedServerKey:
    suite = lookup(ICipherSuite, suite_name)
    key = suite.generate_server_key()
    public, sig_public = suite.server_public(key)
    return LoadedServerKey(skid, suite_name, key, public, sig_public)


class Clock:
    """A settable module clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def module_state(server: LoadedServerKey, **changes: Any) -> ModuleState:
    state = ModuleState(
        identity=IDENTITY,
        suite=server.suite,
        psk=PSK,
        server_keys={server.skid: server.public_key()},
        skid=server.skid,
    )
    for name, value in changes.items():
        setattr(state, name, value)
    return state


@dataclass
class GatewaySession:
    sid: bytes
    kid: int
    k_up: bytes
    k_down: bytes


@dataclass
class OpenedHello:
    hello: Hello
    body: HelloBody
    method: int
    value: bytes
    z_es: bytes
    k_hreply: bytes


@dataclass
class ScriptedGateway:
    """
    The gateway side of MGP/1 for tests, without a store: it opens HELLOs and
    DATA with its server keys and builds whatever reply a test asks for
    (unsigned, with instructions, with a keyreg result ...).  It checks no
    credential: that is the engine's business, tested elsewhere.
    """

    servers: dict[int, LoadedServerKey]
    now: float = NOW
    sessions: dict[bytes, GatewaySession] = field(default_factory=dict)
    counter: int = 0

    @classmethod
    def for_server(cls, *servers: LoadedServerKey) -> ScriptedGateway:
        return cls({server.skid: server for server in servers})

    def _suite(self, name: str) -> ICipherSuite:
        suite: ICipherSuite = lookup(ICipherSuite, name)
        return suite

    def open_hello(self, datagram: bytes) -> OpenedHello:
        hello = parse_request(datagram)
        assert isinstance(hello, Hello)
        server = self.servers[hello.skid]
        suite = self._suite(hello.suite)
        z_es = suite.agree(server.key, hello.epk)
        keys = keyschedule.hello_keys(suite, z_es)
        plaintext = suite.open(keys.k_hello, keyschedule.zero_nonce(suite), hello.aad, hello.ct)
        parsed = parse_hello_plaintext(plaintext)
        return OpenedHello(hello, parsed.body, parsed.method, parsed.value, z_es, keys.k_hreply)

    def hello_reply(
        self,
        datagram: bytes,
        *,
        sign: bool = True,
        forge: bool = False,
        ins: tuple[InstructionItem, ...] = (),
        res: dict[int, Any] | None = None,
        alias: bytes | None = None,
        exp: int = 86400,
        ack: bytes | None = None,
        more: bool = False,
    ) -> bytes:
        """Accept the HELLO and answer it (``forge``: a signature by another key)."""
        opened = self.open_hello(datagram)
        hello, body = opened.hello, opened.body
        suite = self._suite(hello.suite)
        server = self.servers[hello.skid]
        self.counter += 1
        sid = self.counter.to_bytes(6, "big")
        stok = os.urandom(16)
        reply_body = ReplyBody(
            ack=body.tok if ack is None else ack,
            stok=stok,
            exp=exp,
            time=int(self.now),
            ins=ins,
            more=more,
            alias=alias,
            res=res or {},
        ).encode()
        reply_aad = HelloReply.aad_for(sid)
        sig = None
        if sign:
            signer = suite.generate_server_key() if forge else server.key
            tbs = keyschedule.reply_tbs(hello.aad, reply_aad, reply_body)
            sig = suite.sign(signer, tbs)
        plaintext = build_hello_reply_plaintext(reply_body, sig)
        ct = suite.seal(opened.k_hreply, keyschedule.zero_nonce(suite), reply_aad, plaintext)
        session = keyschedule.session_keys(suite, opened.z_es, stok, sid, body.id, body.kid)
        self.sessions[sid] = GatewaySession(sid, body.kid, session.k_up, session.k_down)
        return HelloReply(sid, ct).encode()

    def open_data(self, datagram: bytes, suite_name: str = "p256") -> tuple[Data, DataBody]:
        data = parse_request(datagram)
        assert isinstance(data, Data)
        session = self.sessions[data.sid]
        suite = self._suite(suite_name)
        plaintext = suite.open(
            session.k_up, keyschedule.nonce_for_ctr(suite, data.ctr), data.aad, data.ct
        )
        return data, parse_data_body(plaintext)

    def data_reply(
        self,
        datagram: bytes,
        *,
        suite_name: str = "p256",
        ins: tuple[InstructionItem, ...] = (),
        res: dict[int, Any] | None = None,
        time: int | None = None,
        ack: bytes | None = None,
        ctr: int | None = None,
        more: bool = False,
        alias: bytes | None = None,
    ) -> bytes:
        data, body = self.open_data(datagram, suite_name)
        suite = self._suite(suite_name)
        session = self.sessions[data.sid]
        ctr = data.ctr if ctr is None else ctr
        reply_body = ReplyBody(
            ack=body.tok if ack is None else ack,
            time=time,
            ins=ins,
            res=res or {},
            more=more,
            alias=alias,
        ).encode()
        nonce = keyschedule.nonce_for_ctr(suite, ctr)
        ct = suite.seal(session.k_down, nonce, DataReply.aad_for(data.sid, ctr), reply_body)
        return DataReply(data.sid, ctr, ct).encode()

    def answer(self, datagram: bytes, suite_name: str = "p256") -> bytes:
        """A plain answer to any request."""
        message = parse_request(datagram)
        if isinstance(message, Hello):
            return self.hello_reply(datagram)
        return self.data_reply(datagram, suite_name=suite_name)


def warm_endpoint(
    suite_name: str = "p256", **options: Any
) -> tuple[ModuleEndpoint, ScriptedGateway, Clock]:
    """An endpoint with a live PSK session opened through a scripted gateway."""
    server = server_key(suite_name)
    clock = Clock()
    endpoint = ModuleEndpoint(module_state(server), clock=clock, **options)
    gateway = ScriptedGateway.for_server(server)
    hello = endpoint.build_hello()
    outcome = endpoint.handle_hello_reply(gateway.hello_reply(hello.datagram), hello.context)  # type: ignore[arg-type]
    assert outcome.accepted, outcome.reason
    return endpoint, gateway, clock


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]
