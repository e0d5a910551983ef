"""
The application side end to end over real sockets on 127.0.0.1: the
gateway's real service tree (SQLite store), application servers over mutual
TLS (a small blocking client here, and ``openssl s_client``), and modules
driven by the project's module client over UDP.

- submit -> the module's next wake-up receives it -> confirmation -> the
  application gets ``confirmed`` with the module's execution time;
- events survive a gateway restart and an application reconnect with no loss
  and no gap (duplicates only after the last acknowledgement);
- a slow application that never reads does not slow module traffic or the
  other applications;
- the polling variant: ``instruction-wanted``, and the instruction submitted
  in answer rides in the very reply.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred

from m2mgw.client.module import ModuleEndpoint
from m2mgw.client.transport import BlockingTransport, run_blocking, wake_plan
from m2mgw.datadir import DataDir
from m2mgw.records import Module, NewEvent
from m2mgw.service import find_service
from m2mgw.tap import Options, makeService
from tests.app_protocol_helpers import TrafficChecker
from tests.test_e2e_modules import PSK, module

pytestmark = pytest.mark.slow


class AppConnection:
    """A blocking application client (standard library TLS), for threads."""

    def __init__(self, port: int, cert: str, key: str, ca: str, timeout: float = 10.0) -> None:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.checker = TrafficChecker()
        self._next = 0

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def _line(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("the gateway closed the connection")
        message: dict[str, Any] = json.loads(line)
        self.checker.received(message)
        return message

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        """Send a request; return its response (events meanwhile go to :attr:`events`)."""
        self._next += 1
        request = {"id": self._next, "op": op, **params}
        self.checker.sent(request)
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._line()
            if "event" in message:
                self.events.append(message)
            elif message["id"] == self._next:
                return message

    def ok(self, op: str, **params: Any) -> Any:
        response = self.request(op, **params)
        assert response["ok"] is True, response
        return response["result"]

    def wait_event(self, match: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The first event (seen or to come) for which ``match(event)`` is true."""
        for event in self.events:
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._line()
            if "event" in message:
                self.events.append(message)
                if match(message):
                    return message
        raise AssertionError("no such event")

    def sequenced(self) -> list[int]:
        """The ``seq`` of every sequenced event received, in order."""
        return [e["seq"] for e in self.events if "seq" in e]


class Gateway:
    """The real service tree on 127.0.0.1 (free ports) in this reactor."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        from twisted.internet import reactor

        options = Options()
        options.parseOptions(
            ["-c", str(workdir / "gw.conf"), "--data-dir", str(workdir / "data"),
             "--module-address", "127.0.0.1", "--module-port", "0",
             "--app-address", "127.0.0.1", "--app-port", "0", *extra]
        )  # fmt: skip
        self.root = makeService(options, reactor)
        self.datadir = DataDir(str(workdir / "data"))

    async def start(self) -> Gateway:
        self.root.privilegedStartService()
        await self.root.startService()
        return self

    async def stop(self) -> None:
        await self.root.stopService()

    @property
    def store(self) -> Any:
        return find_service(self.root, "store").store  # type: ignore[attr-defined]

    @property
    def app_port(self) -> int:
        port: int = find_service(self.root, "apps").listening_port().getHost().port  # type: ignore[attr-defined]
        return port

    @property
    def module_port(self) -> int:
        port: int = find_service(self.root, "modules").listening_port().getHost().port  # type: ignore[attr-defined]
        return port

    @property
    def apps(self) -> Any:
        return find_service(self.root, "apps").factory  # type: ignore[attr-defined]

    def wake(self, endpoint: ModuleEndpoint, **plan: Any) -> Deferred[Any]:
        """One wake-up of ``endpoint`` (in a thread)."""
        port = self.module_port

        def run() -> Any:
            with BlockingTransport([("127.0.0.1", port)], timeout=2.0) as transport:
                return run_blocking(transport, wake_plan(endpoint, **plan))

        return threads.deferToThread(run)


def write_config(workdir: Path, apps: str = "", modules: str = "") -> None:
    """A configuration for one suite (fast keys), with extra ``[apps]``/``[modules]`` lines."""
    (workdir / "gw.conf").write_text(
        f"[apps]\nkey_type = ec\n{apps}\n[modules]\n{modules}\n"
        "[gateway]\nsuites = p256\n[protocol]\ndefault_suite = p256\n",
        encoding="utf-8",
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    write_config(tmp_path)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def credentials(gateway: Gateway, workdir: Path, name: str) -> tuple[str, str, str]:
    cert, key = gateway.datadir.issue_app_cert(name, str(workdir / "apps" / name), key_type="ec")
    return cert, key, gateway.datadir.tls_paths[2]


async def connect(gateway: Gateway, creds: tuple[str, str, str]) -> AppConnection:
    connection: AppConnection = await threads.deferToThread(AppConnection, gateway.app_port, *creds)
    return connection


async def call(connection: AppConnection, method: str, *args: Any, **kwargs: Any) -> Any:
    return await threads.deferToThread(getattr(connection, method), *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_submit_wake_confirm_and_the_confirmed_event(workdir: Path) -> None:
    gateway = await Gateway(workdir).start()
    try:
        await gateway.store.add_modules([Module("meter-1", psk=PSK)], apps={"meter-1": ["billing"]})
        endpoint = module(gateway.datadir, "meter-1", "p256")
        assert (await gateway.wake(endpoint, data=[{0: "t", 2: 20}])).ok
        app = await connect(gateway, credentials(gateway, workdir, "billing"))
        try:
            hello = await call(app, "ok", "hello", versions=[1])
            assert hello["principal"] == "billing" and hello["last_seq"] >= 2
            await call(app, "ok", "subscribe")
            first_seen = await call(app, "wait_event", lambda e: e["event"] == "module")
            assert first_seen["payload"]["event"] == "first-seen"
            report = await call(app, "wait_event", lambda e: e["event"] == "report")
            assert report["payload"]["data"] == [{"n": "t", "v": 20}]
            queued = await call(app, "ok", "submit", module="meter-1", kind="set",
                                body={"led": 1}, ttl=600)  # fmt: skip
            assert (queued["iid"], queued["state"]) == (1, "queued")

            before = int(time.time())
            result = await gateway.wake(endpoint, data=[{0: "t", 2: 21}], confirm_now=True)
            assert result.ok and [i.iid for i in result.instructions] == [1]

            confirmed = await call(
                app,
                "wait_event",
                lambda e: e["event"] == "instruction" and e["payload"]["state"] == "confirmed",
            )
            states = [e["payload"]["state"] for e in app.events if e["event"] == "instruction"]
            assert states == ["queued", "sent", "confirmed"]
            payload = confirmed["payload"]
            assert (payload["iid"], payload["status"]) == (1, 0)
            assert before - 5 <= payload["exec_ts"] <= int(time.time()) + 5
            shown = await call(app, "ok", "get", module="meter-1", iid=1)
            assert shown["exec_ts"] == payload["exec_ts"] and shown["state"] == "confirmed"
            last = app.sequenced()[-1]
            assert app.sequenced() == list(range(1, last + 1))
            assert (await call(app, "ok", "ack", seq=last)) == {"acked_seq": last}
        finally:
            await call(app, "close")
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_no_loss_and_no_gap_across_a_restart_and_a_reconnect(workdir: Path) -> None:
    gateway = await Gateway(workdir).start()
    creds = credentials(gateway, workdir, "billing")
    await gateway.store.add_modules([Module("meter-1", psk=PSK)], apps={"meter-1": ["billing"]})
    endpoint = module(gateway.datadir, "meter-1", "p256")
    try:
        for n in range(3):
            assert (await gateway.wake(endpoint, data=[{0: "t", 2: n}])).ok
        app = await connect(gateway, creds)
        await call(app, "ok", "subscribe")
        await call(
            app,
            "wait_event",
            lambda e: e["event"] == "report" and e["payload"]["data"][0]["v"] == 2,
        )
        seen_first = app.sequenced()
        acked = seen_first[1]  # acknowledge only some of what was received
        await call(app, "ok", "ack", seq=acked)
        await call(app, "close")
        for n in range(3, 5):  # events while the application is away
            assert (await gateway.wake(endpoint, data=[{0: "t", 2: n}])).ok
    finally:
        await gateway.stop()

    gateway = await Gateway(workdir).start()  # a new tree on the same SQLite file
    try:
        for n in range(5, 7):
            assert (await gateway.wake(endpoint, data=[{0: "t", 2: n}])).ok
        app = await connect(gateway, creds)
        subscribed = await call(app, "ok", "subscribe")
        assert subscribed["acked_seq"] == acked
        last = subscribed["last_seq"]
        await call(app, "wait_event", lambda e: e.get("seq") == last)
        again = app.sequenced()
        # Everything after the acknowledgement, in order, none missing.
        assert again == list(range(acked + 1, last + 1))
        values = [e["payload"]["data"][0]["v"] for e in app.events if e["event"] == "report"]
        redelivered = [v for v in values if v < 3]
        assert values == [*redelivered, 3, 4, 5, 6] and redelivered == sorted(redelivered)
        await call(app, "ok", "ack", seq=last)
        await call(app, "close")
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_slow_application_does_not_slow_modules_or_other_applications(
    workdir: Path,
) -> None:
    write_config(workdir, apps="max_unacked = 100000")
    gateway = await Gateway(workdir).start()
    try:
        store = gateway.store
        await store.add_modules(
            [Module("noisy", psk=PSK), Module("meter-1", psk=PSK)],
            apps={"noisy": ["slow"], "meter-1": ["fast"]},
        )
        big = {"origin": "module", "level": 6, "code": 1, "text": "x" * 8000}
        for _ in range(10):
            await store.append_events([NewEvent("alert", "noisy", big)] * 200, int(time.time()))
        slow_creds = credentials(gateway, workdir, "slow")
        slow = await connect(gateway, slow_creds)
        # Subscribe, then never read again: 16 MB of events pile up against it.
        slow.sock.sendall(b'{"id":1,"op":"subscribe"}\n')
        deadline = time.monotonic() + 10
        connection: Any = None
        while time.monotonic() < deadline:
            found = [c for c in gateway.apps.connections if c.principal == "slow"]
            connection = found[0] if found else None
            if connection is not None and connection._output_full:
                break
            await threads.deferToThread(time.sleep, 0.05)
        assert connection is not None
        assert connection._output_full, "the send buffer never filled"
        assert connection.delivery is not None and connection.delivery.pushed_count < 2000

        fast = await connect(gateway, credentials(gateway, workdir, "fast"))
        await call(fast, "ok", "subscribe", events=["report"])
        endpoint = module(gateway.datadir, "meter-1", "p256")
        started = time.monotonic()
        for n in range(5):
            assert (await gateway.wake(endpoint, data=[{0: "t", 2: n}])).ok
        elapsed = time.monotonic() - started
        assert elapsed < 5.0, f"5 module wake-ups took {elapsed:.1f} s"
        report = await call(
            fast,
            "wait_event",
            lambda e: e["event"] == "report" and e["payload"]["data"][0]["v"] == 4,
        )
        assert report["module"] == "meter-1"
        assert connection._output_full  # still stuck, and nobody waited for it
        await call(fast, "close")
        await call(slow, "close")
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_polling_variant_rides_in_the_same_reply(workdir: Path) -> None:
    write_config(workdir, modules="poll_apps_ms = 2000")
    gateway = await Gateway(workdir).start()
    try:
        await gateway.store.add_modules([Module("meter-1", psk=PSK)], apps={"meter-1": ["billing"]})
        endpoint = module(gateway.datadir, "meter-1", "p256")
        app = await connect(gateway, credentials(gateway, workdir, "billing"))
        await call(app, "ok", "subscribe", events=["instruction"])

        def answer() -> None:
            wanted = app.wait_event(lambda e: e["event"] == "instruction-wanted", timeout=20)
            assert wanted["module"] == "meter-1" and wanted["wait_ms"] == 2000
            app.ok("submit", module="meter-1", kind="set", body={"now": True})

        answering = threading.Thread(target=answer)
        answering.start()
        result = await gateway.wake(endpoint, data=[{0: "t", 2: 1}])
        await threads.deferToThread(answering.join, 20)
        assert result.ok
        assert [(i.iid, i.kind) for i in result.instructions] == [(1, "set")]
        await call(app, "close")
    finally:
        await gateway.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_speaks_the_protocol(workdir: Path) -> None:
    gateway = await Gateway(workdir).start()
    try:
        await gateway.store.add_modules([Module("meter-1", psk=PSK)], apps={"meter-1": ["ops"]})
        cert, key, ca = credentials(gateway, workdir, "ops")
        command = [
            "openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{gateway.app_port}",
            "-cert", cert, "-key", key, "-CAfile", ca, "-verify_return_error",
            "-servername", "localhost", "-verify_hostname", "localhost",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(b'{"id":1,"op":"hello"}\n{"id":2,"op":"subscribe"}\n')
            process.stdin.flush()
            checker = TrafficChecker()
            checker.ops.update({1: ["hello"], 2: ["subscribe"]})

            def read_until_event() -> list[dict[str, Any]]:
                lines = []
                while True:
                    line = process.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        return lines
                    lines.append(json.loads(line))
                    checker.received(lines[-1])
                    if "event" in lines[-1]:
                        return lines

            reading = threads.deferToThread(read_until_event)
            await threads.deferToThread(time.sleep, 0.5)
            alert = {"origin": "module", "level": 4, "code": 7, "text": "door open"}
            await gateway.store.append_events([NewEvent("alert", "meter-1", alert)], 1)
            lines = await reading
            hello, subscribed, event = lines
            assert hello["result"]["principal"] == "ops"
            assert subscribed["result"] == {"acked_seq": 0, "last_seq": 0}
            assert (event["event"], event["seq"], event["payload"]["text"]) == (
                "alert",
                1,
                "door open",
            )
        finally:
            process.kill()
            process.communicate(timeout=10)
    finally:
        await gateway.stop()
