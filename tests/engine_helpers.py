"""Shared set-up for the module controller's tests: a gateway built from the vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import load_der_private_key
from twisted.internet.defer import Deferred

from m2mgw.config import ProtocolPolicy
from m2mgw.crypto.primitives import pkcs8_pem
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import Module, ModuleKey
from m2mgw.registry import all_plugins, lookup
from m2mgw.store.memory import MemoryStore
from tests.codec_helpers import VECTOR_FILES, VECTORS, h, pss_salt

SUITES = sorted(name for name in VECTORS if not name.startswith("_"))
ADDR = ("192.0.2.10", 40000)
#: The gateway's random draws of a HELLO, in the order the reference vectors list them.
HELLO_DRAWS = ("sid", "stok", "alias", "pss_salt")


def hello_draws(file: str = "reference") -> tuple[str, ...]:
    """The gateway's random draws of a HELLO, in the order the vectors of ``file`` list them."""
    return ("sid", "stok", "alias", pss_salt(file, "reply"))


def skey_draws(file: str = "reference") -> tuple[str, ...]:
    """The gateway's random draws of the skey step (a salt for ``rsa``)."""
    return (pss_salt(file, "skey"),)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (the memory store is synchronous)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@dataclass(frozen=True)
class LoadedKey:
    skid: int
    suite: str
    key: Any
    public: bytes
    sig_public: bytes | None


class Draws:
    """A randomness source that is re-loaded with each step's gateway draws."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def load(self, step: dict[str, Any], order: tuple[str, ...]) -> None:
        draws = step.get("gateway_random", {})
        assert set(draws) <= set(order), draws
        self.queue = [h(draws[name]) for name in order if name in draws]

    def __call__(self, n: int) -> bytes:
        assert self.queue, f"unexpected draw of {n} bytes"
        value = self.queue.pop(0)
        assert len(value) == n, (len(value), n)
        return value


def server_key(suite: Any, holder: dict[str, Any]) -> LoadedKey:
    agreement = h(holder["server_agreement_private"])
    signature = h(holder["server_signature_private"])
    if suite.name == "x25519":
        pem = pkcs8_pem(load_der_private_key(agreement, None)) + pkcs8_pem(
            load_der_private_key(signature, None)
        )
        key = suite.load_server_key(pem)
    else:
        key = suite.load_server_key(agreement)
    public, sig_public = suite.server_public(key)
    return LoadedKey(holder["skid"], suite.name, key, public, sig_public)


def gateway(
    suite_name: str,
    module: Module | None = None,
    keys: tuple[ModuleKey, ...] = (),
    policy: ProtocolPolicy | None = None,
    now: list[float] | None = None,
    file: str = "reference",
) -> tuple[ModuleController, MemoryStore, Draws, dict[str, Any]]:
    """
    A gateway on a memory store holding the vectors' module (or ``module``)
    and server keys, whose clock reads ``now[0]`` (default: the vectors' clock).

    :param file: the vectors file (a name of :data:`tests.codec_helpers.VECTOR_FILES`).
    """
    vectors = VECTOR_FILES[file][suite_name]
    suite = lookup(ICipherSuite, suite_name)
    store = MemoryStore()
    result_of(store.open())
    if module is None:
        module = Module(vectors["identity"], psk=h(vectors["psk"]))
    result_of(store.add_modules([module], keys))
    clock = now if now is not None else [float(vectors["clock"])]
    server_keys = [server_key(suite, vectors), server_key(suite, vectors["skey"])]
    draws = Draws()
    controller = ModuleController(
        store,
        all_plugins(ICipherSuite),
        server_keys,
        policy or ProtocolPolicy(),
        now=lambda: clock[0],
        random=draws,
    )
    return controller, store, draws, vectors


def exchange(controller: ModuleController, step: dict[str, Any]) -> bytes | None:
    reply: bytes | None = result_of(controller.handle(h(step["datagram"]), ADDR))
    return reply
