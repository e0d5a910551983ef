"""
Several real gateway processes (``twistd -n m2mgw``) on 127.0.0.1 sharing
one module database, for the multi-node tests.

- :class:`SharedStore` names the database every node (and the test itself)
  opens: the ``[store]`` backend and its ``[store.NAME]`` options.  The
  ``shared_store`` fixture of ``tests/test_multinode.py`` yields one per
  backend (an SQLite file in WAL mode shared by the processes; PostgreSQL
  when its test harness is there).
- :class:`Cluster` starts nodes: the first creates the data directory (server
  keys, TLS key and application CA), the others get a copy of it without
  the SQLite file -- exactly what ``docs/operations.md`` tells an operator to
  do -- and all open the shared database.  Ports are ephemeral, read back
  from each node's start-up log.
- :class:`ModuleRunner` is one module (the project's client) on the test's
  reactor, with every gateway address it knows, counting end to end: the
  reports it sent and saw acknowledged, the instructions it executed.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import maybeDeferred

from m2mgw.client.module import ModuleEndpoint, ModuleState
from m2mgw.client.transport import (
    ExchangeOutcome,
    RetryPolicy,
    TwistedTransport,
    WakeResult,
    run_twisted,
    wake_plan,
)
from m2mgw.datadir import DataDir
from m2mgw.errors import M2MGWError
from m2mgw.interfaces import IModuleStore, IModuleStoreFactory
from m2mgw.protocol import cbor
from m2mgw.registry import lookup
from tests.test_e2e_modules import PSK, module
from tests.test_twistd import Gateway, twistd

__all__ = ["PSK", "Cluster", "ModuleRunner", "Node", "SharedStore"]

_UDP_LINE = re.compile(r"listening for modules \(UDP\) on \S+ port (\d+)")
_TLS_LINE = re.compile(r"listening for application servers \(TLS\) on \S+ port (\d+)")
_STATUS_LINE = re.compile(r"datagrams: (\d+) received, (\d+) answered")


@dataclass(frozen=True)
class SharedStore:
    """
    The database the nodes share.

    :ivar backend: the store plugin's name (``[store] backend``).
    :ivar options: its ``[store.BACKEND]`` options (an SQLite ``path``
        must be absolute: each node has its own data directory).
    """

    backend: str
    options: Mapping[str, str] = field(default_factory=dict)

    def config(self) -> str:
        """The ``[store]`` and ``[store.BACKEND]`` sections of a node's configuration."""
        lines = ["[store]", f"backend = {self.backend}", f"[store.{self.backend}]"]
        lines += [f"{key} = {value}" for key, value in self.options.items()]
        return "\n".join(lines) + "\n"

    def open(self, data_dir: str, reactor: Any) -> IModuleStore:
        """An unopened store on the shared database, for the test's own checks."""
        factory = lookup(IModuleStoreFactory, self.backend)
        store: IModuleStore = factory.create(dict(self.options), data_dir, reactor)
        return store


@dataclass
class Node:
    """One running gateway process."""

    name: str
    gateway: Gateway
    data_dir: Path
    udp_port: int
    app_port: int

    @property
    def address(self) -> tuple[str, int]:
        """Where modules send datagrams."""
        return ("127.0.0.1", self.udp_port)

    @property
    def pid(self) -> int:
        return self.gateway.process.pid

    def alive(self) -> bool:
        return self.gateway.process.poll() is None

    def output(self) -> list[str]:
        """Every line the node has written so far."""
        lines = self.gateway.lines
        while True:
            try:
                self.gateway.seen.append(lines.get_nowait())
            except queue.Empty:
                return self.gateway.seen

    def datagrams_received(self) -> int:
        """The count of the node's last status line (``[jobs] housekeeping_interval``)."""
        counts = [int(m[1]) for line in self.output() if (m := _STATUS_LINE.search(line))]
        return counts[-1] if counts else 0


class Cluster:
    """
    Gateway processes sharing ``store``, in ``workdir``.

    :param modules: extra lines for every node's ``[modules]`` section.
    """

    def __init__(self, workdir: Path, store: SharedStore, modules: str = "") -> None:
        self.workdir = workdir
        self.store = store
        self.modules = modules
        self.nodes: dict[str, Node] = {}

    @property
    def datadir(self) -> DataDir:
        """The first node's data directory (server keys, the application CA)."""
        first = next(iter(self.nodes.values()))
        return DataDir(str(first.data_dir))

    def _config(self, name: str) -> Path:
        path = self.workdir / f"{name}.conf"
        path.write_text(
            f"[gateway]\nnode_name = {name}\nsuites = p256\n"
            "[protocol]\ndefault_suite = p256\n"
            "[apps]\nkey_type = ec\nevent_poll_interval = 0.2\n"
            "[jobs]\nhousekeeping_interval = 0.3\n"
            f"[modules]\n{self.modules}\n" + self.store.config(),
            encoding="utf-8",
        )
        return path

    def _launch(self, name: str, udp_port: int) -> tuple[Gateway, Path]:
        data = self.workdir / f"data-{name}"
        if self.nodes and not data.exists():
            # A node's data directory is a copy of the first's, database aside.
            source = next(iter(self.nodes.values())).data_dir
            shutil.copytree(source, data, ignore=shutil.ignore_patterns("*.sqlite*", ".lock"))
        command = twistd(
            "--config", str(self._config(name)), "--data-dir", str(data),
            "--module-address", "127.0.0.1", "--module-port", str(udp_port),
            "--app-address", "127.0.0.1", "--app-port", "0",
        )  # fmt: skip
        process = subprocess.Popen(
            command,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return Gateway(process), data

    def _ready(self, name: str, gateway: Gateway, data: Path) -> Node:
        udp = _UDP_LINE.search(gateway.wait_for("listening for modules (UDP)"))
        tls = _TLS_LINE.search(gateway.wait_for("listening for application servers (TLS)"))
        assert udp is not None and tls is not None
        gateway.wait_for(f"store {self.store.backend} is open")
        node = Node(name, gateway, data, int(udp[1]), int(tls[1]))
        self.nodes[name] = node
        return node

    def start(self, *names: str, udp_port: int = 0) -> list[Node]:
        """
        Start nodes ``names`` and wait until they serve.  The first node of
        the cluster starts alone (it creates the data directory and the
        schema); later ones start together.

        :param udp_port: the module port (0: each its own free port; with
            ``reuse_port = yes`` in ``modules``, the nodes may share one).
        """
        pending = list(names)
        started = []
        if not self.nodes:
            first = pending.pop(0)
            started.append(self._ready(first, *self._launch(first, udp_port)))
        launched = [(name, *self._launch(name, udp_port)) for name in pending]
        started += [self._ready(name, gateway, data) for name, gateway, data in launched]
        return started

    def kill(self, name: str) -> None:
        """``kill -9`` node ``name``."""
        process = self.nodes[name].gateway.process
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every node still running (SIGTERM, then SIGKILL); no traceback allowed."""
        for node in self.nodes.values():
            if node.alive():
                node.gateway.process.terminate()
        for node in self.nodes.values():
            try:
                node.gateway.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.gateway.process.kill()
                node.gateway.process.wait(timeout=10)
        for node in self.nodes.values():
            output = "\n".join(node.output())
            assert "Traceback" not in output, f"node {node.name}:\n{output}"


def exchange(address: tuple[str, int], datagram: bytes, timeout: float) -> bytes | None:
    """Send one datagram from a fresh socket; the reply, or ``None`` after ``timeout``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, address)
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def _reading(body: bytes) -> Any:
    """The ``data`` of a DataBody's payload, if it carries one."""
    try:
        decoded = cbor.decode(body)
    except M2MGWError:
        return None
    payload = decoded.get(5) if isinstance(decoded, dict) else None
    return payload.get(10) if isinstance(payload, dict) else None


class ModuleRunner:
    """
    One module on the test's reactor, talking to ``addresses`` in turn,
    counting end to end.

    :ivar sent: the reading (its ``v``) of every DataBody that left, by ``tok``.
    :ivar acknowledged: the readings a DATA_REPLY acknowledged.
    :ivar executed: how many times the module executed each ``iid``.
    :ivar exchanges: every exchange's outcome, in order.
    """

    def __init__(
        self,
        datadir: DataDir,
        module_id: str,
        addresses: Sequence[tuple[str, int]],
        reactor: Any,
        policy: RetryPolicy,
    ) -> None:
        self.module_id = module_id
        self.reactor = reactor
        self.executed: Counter[int] = Counter()
        self.sent: dict[bytes, int] = {}
        self.acknowledged: list[int] = []
        self.exchanges: list[ExchangeOutcome] = []
        state = module(datadir, module_id, "p256").state
        self.endpoint = ModuleEndpoint(state, execute=self._execute)
        self.transport = TwistedTransport(reactor, list(addresses), policy=policy)
        self.port = reactor.listenUDP(0, self.transport, interface="127.0.0.1")
        self.readings = 0

    def _execute(self, kind: str, body: Any) -> tuple[int, Any]:
        # The endpoint passes no iid; the body of every test instruction names it.
        self.executed[int(body["n"])] += 1
        return 0, {"done": body["n"]}

    def _save(self, state: ModuleState) -> None:
        # Called before every datagram that depends on a state change: a new
        # DataBody is seen here before it leaves.
        outbox = state.outbox
        if outbox is not None and outbox.tok not in self.sent:
            reading = _reading(outbox.body)
            if isinstance(reading, list) and reading and isinstance(reading[0], dict):
                self.sent[outbox.tok] = int(reading[0][2])

    def _count(self, result: WakeResult) -> None:
        for outcome in result.exchanges:
            self.exchanges.append(outcome)
            for reply in outcome.replies:
                if reply.kind == "data" and reply.body is not None:
                    value = self.sent.get(reply.body.ack)
                    if value is not None and value not in self.acknowledged:
                        self.acknowledged.append(value)

    async def wake(self, confirm_now: bool = True) -> WakeResult:
        """One wake-up with the next reading; counted."""
        self.readings += 1
        reading = [{0: "seq", 2: self.readings}]
        plan = wake_plan(self.endpoint, self._save, data=reading, confirm_now=confirm_now)
        result: WakeResult = await run_twisted(self.transport, plan)
        self._count(result)
        return result

    def hellos_since(self, index: int) -> int:
        """HELLOs built by the exchanges from number ``index`` on."""
        return sum(outcome.hellos for outcome in self.exchanges[index:])

    async def close(self) -> None:
        """Close the module's socket."""
        await maybeDeferred(self.port.stopListening)
