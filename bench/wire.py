"""
Bytes on the wire: UDP payload sizes of a wake-up, measured by building the
datagrams in-process with the project's module client
(:class:`m2mgw.client.module.ModuleEndpoint`) and answering them with the
gateway's engine (:class:`m2mgw.protocol.engine.ModuleController` on a memory
store).  Every reply measured is also accepted by the module client (or, for
the hand-built variants, decrypted and its ``ack`` checked), so no size is of
a datagram the other side would drop.

- *Warm wake*: a DATA on an open session carrying 16 opaque bytes
  (``pl = {10: h'16 bytes'}``), answered with an ack.  Measured with the
  smallest DataBody MGP/1 allows -- a 4-byte ``tok`` (the minimum of §8.1),
  no ``ts``, the session's first ``ctr`` -- sealed with the client's session
  keys; and, for comparison, as the client builds it (8-byte ``tok`` and ``ts``).
- *Cold wake in one round trip*: a HELLO carrying the 16 bytes in ``pl``,
  ``hint`` the empty bstr (identity hidden), answered with a HELLO_REPLY with
  the 12-byte alias: SDH with an unsigned reply on ``p256-ccm8``, and the
  patent's full mode (SIG, signed reply) on ``p256``.  Measured as the client
  builds it (uncompressed ``epk``, 16-byte ``tok``) and as the protocol
  allows at its leanest (compressed ``epk``, 8-byte ``tok``), hand-built from
  the protocol modules and accepted by the engine.

The module identity is a 15-digit IMEI, carried inside ``ct`` only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from m2mgw.client.module import (
    HelloContext,
    KeyState,
    ModuleEndpoint,
    ModuleKeyPair,
    ModuleState,
)
from m2mgw.client.module import ServerPublicKey as ClientServerKey
from m2mgw.config import ProtocolPolicy
from m2mgw.crypto.ec import compress_point
from m2mgw.datadir import LoadedServerKey
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import keyschedule
from m2mgw.protocol.bodies import (
    AuthMethod,
    DataBody,
    HelloBody,
    Payload,
    build_hello_plaintext,
    parse_hello_reply_plaintext,
)
from m2mgw.protocol.engine import ModuleController
from m2mgw.protocol.messages import Data, Hello, parse_reply
from m2mgw.records import KeyStatus, Module, ModuleKey
from m2mgw.registry import all_plugins, lookup
from m2mgw.store.memory import MemoryStore

#: The module identity (an IMEI: 15 digits).
IDENTITY = "356938035643809"
#: The opaque application bytes a wake-up carries.
PAYLOAD_BYTES = 16
#: The smallest DATA ``tok`` MGP/1 allows (§8.1) and the smallest HELLO ``tok`` (§5).
MIN_DATA_TOK = 4
MIN_HELLO_TOK = 8
#: Where the engine thinks the datagrams come from.
ADDRESS = ("192.0.2.1", 40000)

#: CoAP + OSCORE, the leanest standard peer (issue 3): warm request/response with
#: 16 bytes each way, and a cold EDHOC start (2 round trips).
COAP_OSCORE_WARM = (39, 34)
COAP_EDHOC_COLD = (123, 86)

TARGETS = {
    "warm p256-ccm8": (48, 36),
    "warm p256": (56, 44),
    "cold SDH p256-ccm8": (150, 90),
    "cold SIG p256": (260, 200),
}


def _result(deferred: Deferred[Any]) -> Any:
    """The result of an already fired Deferred (the memory store is synchronous)."""
    box: list[Any] = []
    deferred.addBoth(box.append)
    if not box:
        raise RuntimeError("the engine did not answer synchronously")
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@dataclass(frozen=True)
class Row:
    """One measured exchange."""

    name: str
    variant: str
    up: int
    down: int
    target: tuple[int, int] | None
    note: str

    @property
    def met(self) -> tuple[bool, bool] | None:
        """Whether the up and down sizes meet the target."""
        if self.target is None:
            return None
        return self.up <= self.target[0], self.down <= self.target[1]


class WakeBench:
    """One gateway engine and one module client, for one suite and policy."""

    def __init__(
        self,
        suite_name: str,
        policy: ProtocolPolicy,
        method: str,
        require_signature: bool,
        compress_points: bool = False,
    ) -> None:
        self.suite: ICipherSuite = lookup(ICipherSuite, suite_name)
        suite = self.suite
        self.now = int(time.time())
        server_key = suite.generate_server_key()
        public, sig_public = suite.server_public(server_key)
        self.server = LoadedServerKey(1, suite_name, server_key, public, sig_public)
        self.module_key = suite.generate_signing_key()
        self.store = MemoryStore()
        _result(self.store.open())
        module_public = bytes(suite.signing_public(self.module_key))
        _result(
            self.store.add_modules(
                [Module(IDENTITY, created_at=self.now)],
                [ModuleKey(IDENTITY, 1, suite_name, module_public, KeyStatus.ACTIVE, created_at=0)],
            )
        )
        self.controller = ModuleController(
            self.store,
            all_plugins(ICipherSuite),
            [self.server],
            policy,
            now=lambda: float(self.now),
        )
        state = ModuleState(
            identity=IDENTITY,
            suite=suite_name,
            server_keys={1: ClientServerKey(1, suite_name, public, sig_public)},
            skid=1,
            keys={
                1: ModuleKeyPair(
                    1, suite_name, bytes(suite.dump_signing_key(self.module_key)), KeyState.ACTIVE
                )
            },
            require_server_signature=require_signature,
            hello_method=method,
            hint_mode="hidden",
        )
        self.endpoint = ModuleEndpoint(
            state, clock=lambda: float(self.now), compress_points=compress_points
        )

    def answer(self, datagram: bytes) -> bytes:
        """The engine's reply to ``datagram``.

        :raise RuntimeError: it stayed silent.
        """
        reply: bytes | None = _result(self.controller.handle(datagram, ADDRESS))
        if reply is None:
            raise RuntimeError(
                f"the gateway dropped the datagram: {self.controller.drops.by_reason}"
            )
        return reply

    # -- cold wake ------------------------------------------------------------------------------

    def client_hello(self, payload: Payload | None) -> tuple[int, int, Any]:
        """A HELLO as the client builds it, its reply; ``(up, down, reply body)``."""
        outgoing = self.endpoint.build_hello(payload)
        reply = self.answer(outgoing.datagram)
        if not isinstance(outgoing.context, HelloContext):
            raise RuntimeError("build_hello did not build a HELLO")
        outcome = self.endpoint.handle_hello_reply(reply, outgoing.context)
        if not outcome.accepted:
            raise RuntimeError(f"the client refused the HELLO_REPLY: {outcome.reason}")
        return len(outgoing.datagram), len(reply), outcome.body

    def lean_hello(self, payload: Payload, method: AuthMethod) -> tuple[int, int, Any]:
        """
        The leanest HELLO MGP/1 allows (compressed ``epk``, 8-byte ``tok``,
        empty hint), built from the protocol modules; ``(up, down, reply body)``.
        """
        suite = self.suite
        epk_uncompressed, z_es = suite.encapsulate(self.server.public, os.urandom)
        epk = compress_point(epk_uncompressed)
        self.endpoint.state.last_ts += 1
        ts = max(self.now, self.endpoint.state.last_ts)
        self.endpoint.state.last_ts = ts
        tok = os.urandom(MIN_HELLO_TOK)
        body = HelloBody(id=IDENTITY, kid=1, ts=ts, tok=tok, pl=payload).encode()
        aad = Hello.aad_for(b"", suite.name, self.server.skid, epk)
        tbs = keyschedule.hello_auth_tbs(aad, body)
        if method == AuthMethod.SDH:
            z_ss = suite.static_agree(self.module_key, self.server.public)
            value = keyschedule.sdh_mac(suite, z_ss, epk, tbs)
        else:
            value = bytes(suite.sign(self.module_key, tbs))
        keys = keyschedule.hello_keys(suite, z_es)
        plaintext = build_hello_plaintext(body, method, value)
        ct = suite.seal(keys.k_hello, keyschedule.zero_nonce(suite), aad, plaintext)
        datagram = Hello(b"", suite.name, self.server.skid, epk, ct).encode()
        reply = self.answer(datagram)
        parsed = parse_reply(reply)
        opened = suite.open(keys.k_hreply, keyschedule.zero_nonce(suite), parsed.aad, parsed.ct)
        reply_body = parse_hello_reply_plaintext(opened).body
        if reply_body.ack != tok:
            raise RuntimeError("the HELLO_REPLY does not acknowledge the HELLO")
        return len(datagram), len(reply), reply_body

    # -- warm wake ------------------------------------------------------------------------------

    def open_session(self) -> None:
        """A HELLO (not measured) to open the client's session."""
        self.client_hello(None)

    def lean_data(self, data: bytes) -> tuple[int, int]:
        """
        The smallest DATA carrying ``data``: 4-byte ``tok``, no ``ts``, sealed
        with the client's session keys under its next ``ctr``; the client
        accepts the reply.  ``(up, down)``.
        """
        session = self.endpoint.state.session
        if session is None:
            raise RuntimeError("no session")
        suite = self.suite
        tok = os.urandom(MIN_DATA_TOK)
        body = DataBody(tok=tok, pl=Payload(data=data)).encode()
        ctr = session.next_ctr
        nonce = keyschedule.nonce_for_ctr(suite, ctr)
        ct = suite.seal(session.k_up, nonce, Data.aad_for(session.sid, ctr), body)
        datagram = Data(session.sid, ctr, ct).encode()
        # What the client's own sealing records, so that it reads the reply.
        session.next_ctr = ctr + 1
        session.unanswered[ctr] = tok
        reply = self.answer(datagram)
        outcome = self.endpoint.handle_data_reply(reply)
        if not outcome.accepted:
            raise RuntimeError(f"the client refused the DATA_REPLY: {outcome.reason}")
        return len(datagram), len(reply)

    def client_data(self, data: bytes) -> tuple[int, int]:
        """A DATA as the client builds it (8-byte ``tok``, ``ts``); ``(up, down)``."""
        outgoing = self.endpoint.build_data(Payload(data=data))
        reply = self.answer(outgoing.datagram)
        outcome = self.endpoint.handle_data_reply(reply)
        if not outcome.accepted:
            raise RuntimeError(f"the client refused the DATA_REPLY: {outcome.reason}")
        return len(outgoing.datagram), len(reply)


def _row(name: str, variant: str, sizes: tuple[int, int], note: str, judged: bool) -> Row:
    return Row(name, variant, sizes[0], sizes[1], TARGETS[name] if judged else None, note)


def measure() -> list[Row]:
    """Build and answer every wake-up; the measured rows."""
    data = os.urandom(PAYLOAD_BYTES)
    payload = Payload(data=data)
    rows = []
    for suite_name in ("p256-ccm8", "p256"):
        name = f"warm {suite_name}"
        bench = WakeBench(suite_name, ProtocolPolicy(), "sig", True)
        bench.open_session()
        rows.append(
            _row(name, "4-byte tok, no ts, ctr 1", bench.lean_data(data), "DATA / ack", True)
        )
        rows.append(
            _row(
                name,
                "as the client builds it",
                bench.client_data(data),
                "8-byte tok, ts",
                False,
            )
        )
    cold: list[tuple[str, str, AuthMethod, bool]] = [
        ("cold SDH p256-ccm8", "p256-ccm8", AuthMethod.SDH, False),
        ("cold SIG p256", "p256", AuthMethod.SIG, True),
    ]
    for name, suite_name, method, signed in cold:
        policy = ProtocolPolicy(sign_replies=signed, aliases=True)
        bench = WakeBench(suite_name, policy, method.name.lower(), signed)
        up, down, body = bench.client_hello(payload)
        if body.alias is None:
            raise RuntimeError("the HELLO_REPLY carries no alias")
        note = f"reply with a {len(body.alias)}-byte alias{', signed' if signed else ''}"
        rows.append(
            _row(
                name,
                "as the client builds it (default)",
                (up, down),
                f"uncompressed epk, 16-byte tok; {note}",
                False,
            )
        )
        compact = WakeBench(suite_name, policy, method.name.lower(), signed, compress_points=True)
        up, down, body = compact.client_hello(payload)
        rows.append(
            _row(
                name,
                "as the client builds it, compress_points=True",
                (up, down),
                f"compressed epk, 16-byte tok; {note}",
                True,
            )
        )
        up, down, body = bench.lean_hello(payload, method)
        rows.append(
            _row(
                name,
                "leanest MGP/1 allows",
                (up, down),
                f"compressed epk, 8-byte tok; {note}",
                False,
            )
        )
    return rows


def report_lines(rows: list[Row]) -> list[str]:
    """The table of :func:`measure`, with the targets and the CoAP + OSCORE figures."""

    def judged(row: Row) -> str:
        met = row.met
        if met is None or row.target is None:
            return "(not judged)"
        up = "met" if met[0] else "MISSED"
        down = "met" if met[1] else "MISSED"
        return f"target <= {row.target[0]} / <= {row.target[1]}: up {up}, down {down}"

    lines = [
        f"  {'exchange':<20} {'variant':<46} {'up':>4} {'down':>5}   verdict; what it holds",
    ]
    for row in rows:
        lines.append(
            f"  {row.name:<20} {row.variant:<46} {row.up:>4} {row.down:>5}   "
            f"{judged(row)}; {row.note}"
        )
    lines.append(
        f"  CoAP + OSCORE (issue 3): warm {COAP_OSCORE_WARM[0]} B up / {COAP_OSCORE_WARM[1]} B "
        f"down (16-byte request and response); cold EDHOC start {COAP_EDHOC_COLD[0]} B / "
        f"{COAP_EDHOC_COLD[1]} B in 2 round trips"
    )
    lines.append(
        f"  (module identity: {len(IDENTITY)}-byte IMEI inside ct; hint: empty bstr; "
        f"{PAYLOAD_BYTES} opaque bytes as a bstr in pl.data)"
    )
    return lines


def rows_as_json(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as JSON-compatible dictionaries."""
    return [
        {
            "name": row.name,
            "variant": row.variant,
            "up": row.up,
            "down": row.down,
            "target": row.target,
            "met": row.met,
            "note": row.note,
        }
        for row in rows
    ]
