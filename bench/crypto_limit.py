"""
The per-core limit of a HELLO's crypto, timed in this process.

The gateway answers a HELLO on one core (it is single-threaded Python), so
the most HELLOs per second it could ever answer is set by the crypto of one
HELLO, made with the very calls the engine makes on the suite objects
(:mod:`m2mgw.protocol.engine`):

- SIG (``p256``, signed replies): one ECDH (``suite.agree``: the ``epk``
  point decoded and validated), the HELLO HKDFs (``keyschedule.hello_keys``),
  one ECDSA verify (with the module's public key loaded once, as the engine
  keeps it per module key: ``suite.verifier(public).verify``), the session
  HKDFs (``keyschedule.session_keys``) and one ECDSA sign of the reply
  (``suite.sign``);
- SDH (cached ``Z_ss``, unsigned replies): one ECDH, the HELLO HKDFs, the
  SDH HKDF and HMAC (``keyschedule.sdh_mac``) and the session HKDFs.

The two AEAD operations of a HELLO (open the HELLO, seal the reply) are not
part of the limit the issue defines; they are timed too and shown apart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import cbor, keyschedule
from m2mgw.protocol.bodies import (
    AuthMethod,
    DataBody,
    HelloBody,
    Payload,
    ReplyBody,
    build_hello_plaintext,
    build_hello_reply_plaintext,
)
from m2mgw.protocol.messages import Data, DataReply, Hello, HelloReply
from m2mgw.registry import lookup

#: Distinct HELLOs cycled through, so no call sees the same input twice in a row.
VARIANTS = 64
#: Sizes of the signed and MACed data, close to a real HELLO's TBS and reply TBS.
TBS_BYTES = 170
REPLY_TBS_BYTES = 190
#: Plaintext sizes of the HELLO and its signed reply (for the AEAD timing).
HELLO_PLAINTEXT_BYTES = 150
REPLY_PLAINTEXT_BYTES = 140


@dataclass(frozen=True)
class HelloMaterial:
    """One HELLO's inputs, as the gateway sees them."""

    epk: bytes
    tbs: bytes
    signature: bytes
    sdh_mac: bytes
    hello_ct: bytes


class HelloCrypto:
    """
    The crypto of HELLOs of one suite, with a server key, a module key and
    :data:`VARIANTS` pre-made HELLOs.
    """

    def __init__(self, suite_name: str = "p256") -> None:
        suite: ICipherSuite = lookup(ICipherSuite, suite_name)
        self.suite = suite
        self.server_key = suite.generate_server_key()
        self.server_public = suite.server_public(self.server_key)[0]
        module_key = suite.generate_signing_key()
        self.module_public = bytes(suite.signing_public(module_key))
        loader: Any = suite  # an ICipherSuite with the optional ``verifier``
        self.module_verifier = loader.verifier(self.module_public)
        self.z_ss = suite.static_agree(module_key, self.server_public)
        self.stok = os.urandom(16)
        self.sid = os.urandom(6)
        self.reply_tbs = os.urandom(REPLY_TBS_BYTES)
        self.reply_plaintext = os.urandom(REPLY_PLAINTEXT_BYTES)
        self.materials = []
        for _ in range(VARIANTS):
            epk, z_es = suite.encapsulate(self.server_public, os.urandom)
            tbs = os.urandom(TBS_BYTES)
            keys = keyschedule.hello_keys(suite, z_es)
            hello_ct = suite.seal(
                keys.k_hello,
                keyschedule.zero_nonce(suite),
                b"aad",
                os.urandom(HELLO_PLAINTEXT_BYTES),
            )
            self.materials.append(
                HelloMaterial(
                    epk=epk,
                    tbs=tbs,
                    signature=bytes(suite.sign(module_key, tbs)),
                    sdh_mac=keyschedule.sdh_mac(suite, self.z_ss, epk, tbs),
                    hello_ct=hello_ct,
                )
            )

    def sig_hello(self, material: HelloMaterial) -> None:
        """The public-key crypto and HKDFs of one SIG HELLO with a signed reply."""
        suite = self.suite
        z_es = suite.agree(self.server_key, material.epk)
        keyschedule.hello_keys(suite, z_es)
        self.module_verifier.verify(material.signature, material.tbs)
        keyschedule.session_keys(suite, z_es, self.stok, self.sid, "m000001", 1)
        suite.sign(self.server_key, self.reply_tbs)

    def sdh_hello(self, material: HelloMaterial) -> None:
        """The crypto of one SDH HELLO with ``Z_ss`` cached and an unsigned reply."""
        suite = self.suite
        z_es = suite.agree(self.server_key, material.epk)
        keyschedule.hello_keys(suite, z_es)
        mac = keyschedule.sdh_mac(suite, self.z_ss, material.epk, material.tbs)
        if mac != material.sdh_mac:
            raise AssertionError("the SDH MAC does not reproduce")
        keyschedule.session_keys(suite, z_es, self.stok, self.sid, "m000001", 1)

    def operations(self) -> dict[str, Callable[[HelloMaterial], Any]]:
        """Each operation alone, for the breakdown table."""
        suite = self.suite
        z_es = suite.agree(self.server_key, self.materials[0].epk)
        keys = keyschedule.hello_keys(suite, z_es)
        zero = keyschedule.zero_nonce(suite)
        loader: Any = suite  # an ICipherSuite with the optional ``verifier``
        return {
            "ECDH (agree, point checked)": lambda m: suite.agree(self.server_key, m.epk),
            "ECDSA verify (key loaded)": lambda m: self.module_verifier.verify(m.signature, m.tbs),
            "module key decode (not in the limit)": lambda m: loader.verifier(self.module_public),
            "ECDSA sign": lambda m: suite.sign(self.server_key, self.reply_tbs),
            "HKDFs (hello + session keys)": lambda m: (
                keyschedule.hello_keys(suite, z_es),
                keyschedule.session_keys(suite, z_es, self.stok, self.sid, "m000001", 1),
            ),
            "SDH HKDF + HMAC": lambda m: keyschedule.sdh_mac(suite, self.z_ss, m.epk, m.tbs),
            "AEAD open HELLO + seal reply": lambda m: (
                suite.open(keys.k_hello, zero, b"aad", self.materials[0].hello_ct),
                suite.seal(keys.k_hreply, zero, b"aad", self.reply_plaintext),
            ),
        }


_M = TypeVar("_M")


def rate(
    operation: Callable[[_M], Any],
    materials: list[_M],
    seconds: float,
    rounds: int,
) -> float:
    """
    Calls per second of ``operation``: the best of ``rounds`` rounds of about
    ``seconds`` each (the best, since a limit is what the core can do when
    nothing else takes it).
    """
    best = 0.0
    count = len(materials)
    for _ in range(rounds):
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        while True:
            for material in materials:
                operation(material)
            done += count
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - started))
    return best


def limit(method: str, seconds: float, rounds: int, crypto: HelloCrypto | None = None) -> float:
    """
    The per-core limit of ``method`` (``"sig"`` or ``"sdh"``) HELLOs per second.

    :param crypto: the keys and HELLOs to use (default: new ones, ``p256``).
    """
    crypto = crypto or HelloCrypto()
    operation = crypto.sig_hello if method == "sig" else crypto.sdh_hello
    return rate(operation, crypto.materials, seconds, rounds)


def measure(seconds: float = 1.0, rounds: int = 3, suite_name: str = "p256") -> dict[str, Any]:
    """
    The per-core HELLO crypto limits and the cost of each operation.

    :return: ``{"sig": HELLOs/s, "sdh": HELLOs/s, "operations": {name: µs}, ...}``.
    """
    crypto = HelloCrypto(suite_name)
    materials = crypto.materials
    sig = rate(crypto.sig_hello, materials, seconds, rounds)
    sdh = rate(crypto.sdh_hello, materials, seconds, rounds)
    operations = {
        name: 1e6 / rate(operation, materials, seconds / 3, rounds)
        for name, operation in crypto.operations().items()
    }
    return {
        "suite": suite_name,
        "seconds": seconds,
        "rounds": rounds,
        "sig": sig,
        "sdh": sdh,
        "operations_us": operations,
    }


# -- the floor of a HELLO ---------------------------------------------------------------------


class HelloFloor:
    """
    The CBOR work of answering a HELLO that no implementation of MGP/1 in
    this process can skip, made with the calls the engine makes: the
    envelope, the plaintext and the HelloBody decoded with the determinism
    check; the AAD and the TBS of ``auth``; the reply body (``ack``,
    ``stok``, ``exp``, ``time``, ``alias``), the reply AAD, the reply TBS
    (signed replies only), the reply plaintext and envelope encoded.  With the
    crypto limit, the AEAD open and seal of a HELLO and the echo server's
    cost per datagram, it bounds the HELLO/limit ratio from above.
    """

    def __init__(self, suite_name: str = "p256") -> None:
        suite: ICipherSuite = lookup(ICipherSuite, suite_name)
        self.suite = suite
        self.sid = os.urandom(6)
        self.materials: list[HelloBytes] = []
        for ts in range(1_700_000_000, 1_700_000_000 + VARIANTS):
            epk, _ = suite.encapsulate(
                suite.server_public(suite.generate_server_key())[0], os.urandom
            )
            body = HelloBody(id="356938035643809", kid=1, ts=ts, tok=os.urandom(16)).encode()
            plaintext = build_hello_plaintext(body, AuthMethod.SIG, os.urandom(64))
            ct = plaintext + os.urandom(suite.tag_len)  # the size of the real ciphertext
            datagram = Hello(b"", suite.name, 1, epk, ct).encode()
            self.materials.append(HelloBytes(datagram, plaintext))
        self.reply_body = ReplyBody.hello_base(
            ack=os.urandom(16),
            stok=os.urandom(16),
            exp=86_400,
            time=1_700_000_000,
            alias=os.urandom(12),
        )
        self.reply_ct = os.urandom(len(self.reply_body.encode()) + 70 + suite.tag_len)
        self.signature = os.urandom(64)

    def cbor(self, material: HelloBytes, signed: bool) -> None:
        """Decode (checked) and encode what a HELLO and its reply hold."""
        envelope = cbor.decode(material.datagram)
        _, _, hint, suite_name, skid, epk, _ = envelope
        aad = b"".join(
            (
                b"\x86\x01\x01",
                cbor.encode_bytes(hint),
                cbor.encode_text(suite_name),
                cbor.head(0, skid),
                cbor.encode_bytes(epk),
            )
        )
        body_bytes, _ = cbor.decode(material.plaintext)
        cbor.decode(body_bytes)
        keyschedule.hello_auth_tbs(aad, body_bytes)
        reply_body = self.reply_body.encode()
        reply_aad = HelloReply.aad_for(self.sid)
        signature = None
        if signed:
            keyschedule.reply_tbs(aad, reply_aad, reply_body)
            signature = self.signature
        build_hello_reply_plaintext(reply_body, signature)
        HelloReply(self.sid, self.reply_ct).encode()

    def run(self, signed: bool, seconds: float, rounds: int) -> float:
        """µs per HELLO of :meth:`cbor`, the best of ``rounds``."""
        return 1e6 / rate(
            lambda m: self.cbor(m, signed),
            self.materials,
            seconds,
            rounds,
        )


@dataclass(frozen=True)
class HelloBytes:
    """One HELLO's datagram and plaintext, for :class:`HelloFloor`."""

    datagram: bytes
    plaintext: bytes


def hello_floor(seconds: float = 0.5, rounds: int = 3) -> dict[str, float]:
    """µs per HELLO of :class:`HelloFloor`: ``{"cbor_sig": ..., "cbor_sdh": ...}``."""
    floor = HelloFloor()
    return {
        "cbor_sig": floor.run(True, seconds, rounds),
        "cbor_sdh": floor.run(False, seconds, rounds),
    }


# -- the floor of a warm DATA ----------------------------------------------------------------


class DataFloor:
    """
    The parts of answering a warm DATA that no implementation of MGP/1 in
    this process can skip, made with the calls the engine makes: the AEAD
    open of the DATA and seal of its reply (``cryptography``, keys set up
    once per session), and the CBOR work (the envelope and DataBody decoded
    with the determinism check, the reply body and envelope encoded).  With
    the echo server's own cost per datagram (one ``recvfrom`` and one
    ``sendto`` through the reactor), it bounds the DATA/echo ratio from above.
    """

    def __init__(self, suite_name: str = "p256", payload_bytes: int = 16) -> None:
        suite: ICipherSuite = lookup(ICipherSuite, suite_name)
        self.suite = suite
        sid = os.urandom(6)
        k_up, k_down = os.urandom(suite.key_len), os.urandom(suite.key_len)
        keyed = getattr(suite, "keyed_aead", None)
        if keyed is None:
            raise ValueError(f"suite {suite_name} has no keyed AEAD")
        self.up, self.down = keyed(k_up), keyed(k_down)
        self.materials: list[DataMaterial] = []
        for ctr in range(1000, 1000 + VARIANTS):
            tok = os.urandom(8)
            body = DataBody(
                ts=int(time.time()), tok=tok, pl=Payload(data=os.urandom(payload_bytes))
            ).encode()
            nonce = keyschedule.nonce_for_ctr(suite, ctr)
            aad = Data.aad_for(sid, ctr)
            ct = suite.seal(k_up, nonce, aad, body)
            reply = ReplyBody(ack=tok).encode()
            datagram = Data(sid, ctr, ct).encode()
            self.materials.append(
                DataMaterial(datagram, nonce, aad, ct, body, reply, DataReply.aad_for(sid, ctr))
            )

    def aead(self, material: DataMaterial) -> None:
        """Open the DATA, seal the reply."""
        self.up.open(material.nonce, material.aad, material.ct)
        self.down.seal(material.nonce, material.reply_aad, material.reply)

    def cbor(self, material: DataMaterial) -> None:
        """Decode the envelope and the body (determinism checked), encode the reply."""
        envelope = cbor.decode(material.datagram)
        value = cbor.decode(material.body)
        reply = cbor.encode({1: value[4]})
        cbor.encode([1, 4, envelope[2], envelope[3], reply])

    def run(self, operation: Callable[[DataMaterial], Any], seconds: float, rounds: int) -> float:
        """µs per call of ``operation``, the best of ``rounds``."""
        return 1e6 / rate(operation, self.materials, seconds, rounds)


@dataclass(frozen=True)
class DataMaterial:
    """One warm DATA's bytes and its reply's, for :class:`DataFloor`."""

    datagram: bytes
    nonce: bytes
    aad: bytes
    ct: bytes
    body: bytes
    reply: bytes
    reply_aad: bytes


def data_floor(seconds: float = 0.5, rounds: int = 3) -> dict[str, float]:
    """µs per warm DATA of :class:`DataFloor`'s parts: ``{"aead": ..., "cbor": ...}``."""
    floor = DataFloor()
    return {
        "aead": floor.run(floor.aead, seconds, rounds),
        "cbor": floor.run(floor.cbor, seconds, rounds),
    }
