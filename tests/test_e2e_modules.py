"""
End to end over real UDP sockets on 127.0.0.1: the project's module client
against the gateway's real service tree (SQLite store, keys from the data
directory), for every suite and every HELLO authentication; and a gateway
restart (a new ``twistd`` process on the same SQLite file) that keeps
sessions, replay state and queued instructions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from m2mgw.client.module import (
    KeyState,
    ModuleEndpoint,
    ModuleState,
    Outgoing,
    ServerPublicKey,
)
from m2mgw.client.transport import BlockingTransport, enroll_plan, run_blocking, wake_plan
from m2mgw.datadir import DataDir
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import Payload
from m2mgw.records import InstructionState, KeyStatus, Module, NewInstruction
from m2mgw.service import find_service
from m2mgw.tap import Options, makeService
from tests.test_twistd import Gateway, free_port, start

SUITES = ("p256", "p256-ccm8", "p384", "x25519", "rsa")
PSK = bytes(range(100, 132))
BIN = Path(sys.executable).parent


def server_keys(datadir: DataDir) -> dict[int, ServerPublicKey]:
    return {
        key.skid: ServerPublicKey(key.skid, key.suite, key.public, key.sig_public)
        for key in datadir.server_keys()
    }


def module(datadir: DataDir, module_id: str, suite: str, method: str = "sig") -> ModuleEndpoint:
    keys = server_keys(datadir)
    skid = next(skid for skid, key in keys.items() if key.suite == suite)
    state = ModuleState(
        identity=module_id,
        suite=suite,
        psk=PSK,
        server_keys=keys,
        skid=skid,
        hello_method=method,
    )
    return ModuleEndpoint(state, execute=lambda kind, body: (0, {"done": kind}))


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "gw.conf").write_text("[apps]\nkey_type = ec\n", encoding="utf-8")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest_twisted.ensureDeferred
async def test_every_suite_and_authentication_over_udp(workdir: Path) -> None:
    from twisted.internet import reactor

    options = Options()
    options.parseOptions(
        ["-c", "gw.conf", "--data-dir", str(workdir / "data"), "--module-address", "127.0.0.1",
         "--module-port", "0", "--app-address", "127.0.0.1", "--app-port", "0"]
    )  # fmt: skip
    root = makeService(options, reactor)
    root.privilegedStartService()
    await root.startService()
    try:
        store = find_service(root, "store").store  # type: ignore[attr-defined]
        controller = find_service(root, "modules").protocol.handler  # type: ignore[attr-defined]
        port = find_service(root, "modules").listening_port().getHost().port  # type: ignore[attr-defined]
        datadir = DataDir(str(workdir / "data"))

        for suite in SUITES:
            module_id = f"meter-{suite}"
            await store.add_modules([Module(module_id, psk=PSK)])
            endpoint = module(datadir, module_id, suite)

            def run(plan: Any) -> Any:
                with BlockingTransport([("127.0.0.1", port)], timeout=1.0) as transport:
                    return run_blocking(transport, plan)

            # PSK HELLO, then a report in a DATA.
            result = await threads.deferToThread(run, wake_plan(endpoint, data=[{0: "t", 2: 1}]))
            assert result.ok, (suite, result)
            assert endpoint.state.session is not None and endpoint.state.session.kid == 0

            # Enrolment: KeyReg vouched for by the PSK, then a SIG HELLO with the new key.
            result = await threads.deferToThread(run, enroll_plan(endpoint))
            assert result.ok, (suite, result)
            keys = {key.kid: key.status for key in await store.list_keys(module_id)}
            assert keys == {1: KeyStatus.ACTIVE}, suite
            assert endpoint.state.session is not None and endpoint.state.session.kid == 1

            # An instruction rides in the next reply and is confirmed.
            await store.enqueue(
                NewInstruction(module_id, "set", cbor.encode({"led": 1}), wire_size=32),
                int(reactor.seconds()),
            )
            result = await threads.deferToThread(
                run, wake_plan(endpoint, data=[{0: "t", 2: 2}], confirm_now=True)
            )
            assert result.ok, (suite, result)
            instruction = await store.get_instruction(module_id, 1)
            assert instruction.state == InstructionState.CONFIRMED, suite

            if suite in ("p256", "p256-ccm8", "p384"):
                # SDH: a new session authenticated by static-static ECDH.
                endpoint.state.hello_method = "sdh"
                endpoint.state.session = None
                result = await threads.deferToThread(run, wake_plan(endpoint, data=[{0: "t"}]))
                assert result.ok, (suite, result)
                assert endpoint.state.session is not None

            reports = await store.list_reports(module_id)
            expected = 3 if suite in ("p256", "p256-ccm8", "p384") else 2
            assert len(reports) == expected, suite
            assert all(k.status == KeyState.ACTIVE for k in endpoint.state.keys.values())
        assert controller.drops.total == 0, dict(controller.drops.by_reason)
    finally:
        await root.stopService()


# -- a restart: a new process on the same SQLite file ------------------------------------------


def admin(workdir: Path, *args: str) -> Any:
    done = subprocess.run(
        [str(BIN / "m2mgw-admin"), "--data-dir", str(workdir / "data"), "--json", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def exchange(port: int, datagram: bytes, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, ("127.0.0.1", port))
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def stop(gateway: Gateway) -> None:
    gateway.process.terminate()
    gateway.process.wait(timeout=20)


def test_restart_keeps_sessions_replay_state_and_queued_instructions(workdir: Path) -> None:
    udp_port, tls_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    first = start(workdir, udp_port, tls_port)
    try:
        first.wait_for(f"listening for modules (UDP) on 127.0.0.1 port {udp_port}")
        admin(workdir, "module", "add", "tracker-1", "--psk", PSK.hex())
        endpoint = module(DataDir(str(workdir / "data")), "tracker-1", "p256")
        with BlockingTransport([("127.0.0.1", udp_port)], timeout=1.0) as transport:
            assert run_blocking(transport, wake_plan(endpoint, data=[{0: "x", 2: 1}])).ok
        session = endpoint.state.session
        assert session is not None

        sent: Outgoing = endpoint.build_data(Payload(data=[{0: "x", 2: 2}]))
        reply = exchange(udp_port, sent.datagram, 2.0)
        assert reply is not None and endpoint.handle_data_reply(reply).accepted
        admin(workdir, "instruction", "submit", "tracker-1", "set", '{"rate": 60}')
    finally:
        stop(first)

    second = start(workdir, udp_port, tls_port)
    try:
        second.wait_for(f"listening for modules (UDP) on 127.0.0.1 port {udp_port}")
        # The datagram accepted before the restart is a replay now: silence.
        assert exchange(udp_port, sent.datagram, 1.0) is None
        # The session lives on: a new DATA, no HELLO, fetches the queued instruction.
        fresh = endpoint.build_data(Payload(data=[{0: "x", 2: 3}]))
        assert endpoint.state.session is session or endpoint.state.session == session
        reply = exchange(udp_port, fresh.datagram, 2.0)
        assert reply is not None
        outcome = endpoint.handle_data_reply(reply)
        assert outcome.accepted
        assert [(i.iid, i.kind) for i in outcome.instructions] == [(1, "set")]
        listed = admin(workdir, "instruction", "list", "tracker-1")
        assert [i["state"] for i in listed["instructions"]] == ["sent"]
    finally:
        stop(second)
