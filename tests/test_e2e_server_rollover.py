"""
Server key rollover and certificate renewal end to end, over real sockets.

1. The real service tree in this process (SQLite store, keys from the data
   directory) and the project's module client over UDP on 127.0.0.1: a new
   server key is added, announced and the old one retired; one module
   confirms the ``skey`` and switches to the new ``skid`` in its next HELLO,
   another keeps using the old one until it confirms, and after retirement a
   HELLO on the old ``skid`` gets no reply.
2. A real ``twistd`` process: the gateway's TLS certificate is renewed
   (files replaced) and a server key added, then SIGHUP: new TLS
   connections see the new certificate, an open one keeps working, the new
   ``skid`` is accepted, and module traffic continues throughout.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import threads

from m2mgw.client.module import ModuleEndpoint, ModuleState, ServerPublicKey
from m2mgw.client.transport import BlockingTransport, run_blocking, wake_plan
from m2mgw.datadir import DataDir
from m2mgw.protocol.drops import DropReason
from m2mgw.records import InstructionState, Module, ServerKeyStatus
from m2mgw.service import find_service
from m2mgw.tap import Options, makeService
from tests.test_admin_cli import InProcess
from tests.test_e2e_modules import BIN, exchange
from tests.test_twistd import Gateway, free_port, start

PSK = bytes(range(50, 82))
CONFIG = "[gateway]\nsuites = p256\n[apps]\nkey_type = ec\n[jobs]\nserver_key_interval = 3600\n"


def admin_process(workdir: Path, *args: str) -> Any:
    """``m2mgw-admin --json ARGS`` as a process, on the gateway's configuration."""
    done = subprocess.run(
        [str(BIN / "m2mgw-admin"), "--config", "gw.conf", "--data-dir", "data", "--json", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def public_keys(datadir: DataDir) -> dict[int, ServerPublicKey]:
    return {
        pair.skid: ServerPublicKey(pair.skid, pair.suite, pair.public, pair.sig_public)
        for pair in datadir.server_keys()
    }


def endpoint(datadir: DataDir, module_id: str) -> ModuleEndpoint:
    state = ModuleState(
        identity=module_id, suite="p256", psk=PSK, server_keys=public_keys(datadir), skid=1
    )
    return ModuleEndpoint(state, execute=lambda kind, body: (0, None))


def wake(port: int, module: ModuleEndpoint, **options: Any) -> Any:
    with BlockingTransport([("127.0.0.1", port)], timeout=1.0) as transport:
        return run_blocking(transport, wake_plan(module, **options))


@pytest_twisted.ensureDeferred
async def test_rollover_with_modules_on_the_old_and_the_new_skid(tmp_path: Path) -> None:
    from twisted.internet import reactor

    config = tmp_path / "gw.conf"
    config.write_text(CONFIG, encoding="utf-8")
    data = tmp_path / "data"
    options = Options()
    options.parseOptions(
        ["-c", str(config), "--data-dir", str(data), "--module-address", "127.0.0.1",
         "--module-port", "0", "--app-address", "127.0.0.1", "--app-port", "0"]
    )  # fmt: skip
    root = makeService(options, reactor)
    root.privilegedStartService()
    await root.startService()
    admin = InProcess(str(config))
    try:
        store = find_service(root, "store").store  # type: ignore[attr-defined]
        controller = find_service(root, "modules").protocol.handler  # type: ignore[attr-defined]
        port = find_service(root, "modules").listening_port().getHost().port  # type: ignore[attr-defined]
        reload = find_service(root, "reload")
        check = find_service(root, "jobs/server-keys").work  # type: ignore[attr-defined]
        datadir = DataDir(str(data))

        await store.add_modules([Module("early", psk=PSK), Module("late", psk=PSK)])
        early, late = endpoint(datadir, "early"), endpoint(datadir, "late")
        for module in (early, late):
            result = await threads.deferToThread(wake, port, module, data=[{0: "t", 2: 1}])
            assert result.ok, result
        assert {(await store.get_module_session(m)).skid for m in ("early", "late")} == {1}

        # The operator adds skid 2; the gateway picks it up on reload (SIGHUP).
        added = await admin(
            "--data-dir", str(data), "--json", "server-key", "add", "--suite", "p256"
        )
        assert added.json()["server_key"]["skid"] == 2
        outcome = await reload.reload()  # type: ignore[attr-defined]
        assert outcome == {"server keys": True, "application TLS certificate": True}
        told = await admin("--data-dir", str(data), "--json", "server-key", "announce", "2")
        assert told.json()["told"] == 2
        retiring = await admin(
            "--data-dir", str(data), "--json", "server-key", "retire", "1", "--deadline",
            str(int(reactor.seconds()) + 3600),
        )  # fmt: skip
        assert retiring.code == 0, retiring.stderr

        # "early" wakes: its DATA_REPLY carries the skey (signed by skid 1, its
        # session's key); it stores skid 2 and confirms.
        result = await threads.deferToThread(
            wake, port, early, data=[{0: "t", 2: 2}], confirm_now=True
        )
        assert result.ok, result
        assert early.state.skid == 2
        [skey] = [i for i in await store.list_instructions("early") if i.kind == "skey"]
        assert skey.state == InstructionState.CONFIRMED
        await check()
        statuses = {k.skid: k.status for k in await store.list_server_keys()}
        assert statuses[1] == ServerKeyStatus.RETIRING  # "late" has not confirmed

        # Its next HELLO uses skid 2.
        early.state.session = None
        result = await threads.deferToThread(wake, port, early, data=[{0: "t", 2: 3}])
        assert result.ok, result
        assert (await store.get_module_session("early")).skid == 2

        # "late" still knows only skid 1: its HELLO is accepted while skid 1 is retiring.
        late.state.session = None
        assert late.state.skid == 1
        result = await threads.deferToThread(
            wake, port, late, data=[{0: "t", 2: 4}], confirm_now=True
        )
        assert result.ok, result
        assert (await store.get_module_session("late")).skid == 1
        assert late.state.skid == 2  # it got the skey in that HELLO_REPLY and confirmed

        # Everyone told has confirmed: the job retires skid 1 and reloads.
        await check()
        statuses = {k.skid: k.status for k in await store.list_server_keys()}
        assert statuses == {1: ServerKeyStatus.RETIRED, 2: ServerKeyStatus.ACTIVE}

        # A HELLO on the old skid now gets no reply at all.
        late.state.session = None
        drops = controller.drops.by_reason.get(DropReason.UNKNOWN_SKID.value, 0)
        stale = late.build_hello(skid=1)
        assert await threads.deferToThread(exchange, port, stale.datagram, 1.0) is None
        assert controller.drops.by_reason[DropReason.UNKNOWN_SKID.value] == drops + 1
        # On the new one both keep working.
        for module in (early, late):
            module.state.session = None
            result = await threads.deferToThread(wake, port, module, data=[{0: "t", 2: 5}])
            assert result.ok, result
        listed = await admin("--data-dir", str(data), "--json", "server-key", "list")
        [old, new] = listed.json()["server_keys"]
        assert (old["status"], new["status"]) == ("retired", "active")
        assert new["announcement"]["confirmed"] == 2
    finally:
        await root.stopService()


# -- SIGHUP in a real twistd ------------------------------------------------------------------


def peer_certificate(port: int, cert: str, key: str, ca: str) -> bytes:
    """The DER certificate the gateway presents to a new TLS connection."""
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
        assert der is not None
        return der


class OpenConnection:
    """A TLS connection to the gateway kept open across the reload."""

    def __init__(self, port: int, cert: str, key: str, ca: str) -> None:
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.connection = context.wrap_socket(raw, server_hostname="localhost")
        self.reader = self.connection.makefile("rb")
        der = self.connection.getpeercert(binary_form=True)
        assert der is not None
        self.certificate = der

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.connection.sendall(json.dumps(request).encode() + b"\n")
        while True:
            answer: dict[str, Any] = json.loads(self.reader.readline())
            if answer.get("id") == request["id"]:
                return answer

    def close(self) -> None:
        self.reader.close()
        self.connection.close()


class Traffic(threading.Thread):
    """One module waking up again and again (a DATA each time) until stopped."""

    def __init__(self, port: int, module: ModuleEndpoint) -> None:
        super().__init__(daemon=True)
        self.port, self.module = port, module
        self.stopping = threading.Event()
        self.results: list[bool] = []

    def run(self) -> None:
        count = 0
        while not self.stopping.is_set():
            count += 1
            self.results.append(wake(self.port, self.module, data=[{0: "n", 2: count}]).ok)


@pytest.mark.slow
def test_sighup_renews_the_tls_certificate_and_loads_new_server_keys(tmp_path: Path) -> None:
    (tmp_path / "gw.conf").write_text(CONFIG, encoding="utf-8")
    udp_port, tls_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    gateway: Gateway = start(tmp_path, udp_port, tls_port)
    traffic: Traffic | None = None
    try:
        gateway.wait_for("SIGHUP reloads server keys, application TLS certificate")
        gateway.wait_for("server keys accepted: 1; retired: none")
        datadir = DataDir(str(tmp_path / "data"))
        cert, key = datadir.issue_app_cert("ops", str(tmp_path / "client"), key_type="ec")
        cert_path, _, ca = datadir.tls_paths
        before = peer_certificate(tls_port, cert, key, ca)
        served = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        assert before == served.public_bytes(Encoding.DER)
        held = OpenConnection(tls_port, cert, key, ca)

        admin_process(tmp_path, "module", "add", "meter", "--psk", PSK.hex())
        module = endpoint(datadir, "meter")
        assert wake(udp_port, module, data=[{0: "n", 2: 0}]).ok
        traffic = Traffic(udp_port, module)
        traffic.start()

        renewed = admin_process(tmp_path, "gateway-cert", "renew", "--days", "30")
        added = admin_process(tmp_path, "server-key", "add", "--suite", "p256")
        assert added["server_key"]["skid"] == 2
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for("reloaded application TLS certificate")
        gateway.wait_for("server keys accepted: 1, 2; retired: none")

        after = peer_certificate(tls_port, cert, key, ca)
        assert after != before
        new_certificate = x509.load_pem_x509_certificate(Path(renewed["certificate"]).read_bytes())
        assert x509.load_der_x509_certificate(after) == new_certificate
        # The connection opened before the reload is still served, on its old certificate.
        answer = held.ask({"id": 7, "op": "hello"})
        assert answer["ok"] is True and answer["result"]["principal"] == "ops"
        assert held.certificate == before
        held.close()

        traffic.stopping.set()
        traffic.join(timeout=30)
        assert len(traffic.results) >= 1 and all(traffic.results), traffic.results
        # The new skid is accepted at once.
        module.state.server_keys = public_keys(datadir)
        module.state.session = None
        module.state.skid = 2
        assert wake(udp_port, module, data=[{0: "n", 2: -1}]).ok
        assert gateway.process.poll() is None
    finally:
        if traffic is not None:
            traffic.stopping.set()
            traffic.join(timeout=30)
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(timeout=20)
    output = gateway.rest()
    assert "Traceback" not in output
    assert "PRIVATE KEY" not in output
