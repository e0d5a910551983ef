"""
The key lifecycle from the operator's side: ``m2mgw-admin`` (in process)
against the whole ``twistd m2mgw`` service tree on 127.0.0.1 with its SQLite
store, and real modules (the module client, and ``m2mgw-module``): a PSK kept
per module, a key registered at manufacture, approval and refusal, rotation
on request, the key series, revocation and retiring a suite.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from m2mgw.admin import cli as admin_cli
from m2mgw.client.cli import main as module_main
from m2mgw.client.module import ModuleEndpoint, ModuleState, ServerPublicKey
from m2mgw.client.state import StateFile
from m2mgw.client.transport import (
    RetryPolicy,
    TwistedTransport,
    WakeResult,
    enroll_plan,
    run_twisted,
    wake_plan,
)
from m2mgw.datadir import DataDir
from m2mgw.interfaces import IModuleStore
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import KeyStatus, ModuleStatus
from m2mgw.service import find_service
from m2mgw.tap import Options, makeService
from tests.client_helpers import PSK
from tests.key_lifecycle_helpers import send_raw

FAST = RetryPolicy(timeout=1.0, max_timeout=2.0)


@pytest.fixture(scope="module")
def data_dir_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.doubles import prepared_data_dir

    return prepared_data_dir(str(tmp_path_factory.mktemp("template") / "data"))


@dataclass
class Gateway:
    """The running service tree, ``m2mgw-admin`` on its configuration, and modules."""

    root: Any
    config: str
    port: int
    store: IModuleStore
    controller: ModuleController
    server_keys: dict[int, ServerPublicKey]
    ports: list[Any]

    async def admin(self, *argv: str, ok: bool = True) -> Any:
        from twisted.internet import reactor

        out, err = io.StringIO(), io.StringIO()
        status = await admin_cli.run(
            ["--config", self.config, *argv], reactor, stdout=out, stderr=err
        )
        if not ok:
            assert status == 1 and err.getvalue().count("\n") == 1, err.getvalue()
            return err.getvalue()
        assert status == 0, err.getvalue()
        text = out.getvalue()
        return json.loads(text) if "--json" in argv else text

    def module(self, module_id: str, suite: str = "p256") -> ModuleEndpoint:
        skid = max(k.skid for k in self.server_keys.values() if k.suite == suite)
        state = ModuleState(
            identity=module_id, suite=suite, psk=PSK, server_keys=self.server_keys, skid=skid
        )
        return ModuleEndpoint(state, execute=lambda kind, body: (0, None))

    async def run(self, endpoint: ModuleEndpoint, plan: Any) -> WakeResult:
        from twisted.internet import reactor

        transport = TwistedTransport(reactor, [("127.0.0.1", self.port)], policy=FAST)
        port = reactor.listenUDP(0, transport, interface="127.0.0.1")
        try:
            result: WakeResult = await run_twisted(transport, plan)
        finally:
            await port.stopListening()
        return result

    async def report(self, endpoint: ModuleEndpoint, value: float) -> WakeResult:
        return await self.run(endpoint, wake_plan(endpoint, data=[{0: "t", 2: value}]))


@pytest_twisted.async_yield_fixture
async def gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir_template: str
) -> AsyncIterator[Gateway]:
    from twisted.internet import reactor

    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_dir_template, tmp_path / "data")
    config = tmp_path / "gw.conf"
    config.write_text(
        f"[gateway]\ndata_dir = {tmp_path / 'data'}\n[apps]\nkey_type = ec\n"
        "[params.fleet]\npid = 7\nsuite = x25519\nttl = 86400\n"
    )
    options = Options()
    options.parseOptions(
        ["-c", str(config), "--module-address", "127.0.0.1", "--module-port", "0",
         "--app-address", "127.0.0.1", "--app-port", "0"]
    )  # fmt: skip
    root = makeService(options, reactor)
    root.privilegedStartService()
    await root.startService()
    modules = find_service(root, "modules")
    keys = {
        k.skid: ServerPublicKey(k.skid, k.suite, k.public, k.sig_public)
        for k in DataDir(str(tmp_path / "data")).server_keys()
    }
    try:
        yield Gateway(
            root,
            str(config),
            modules.listening_port().getHost().port,  # type: ignore[attr-defined]
            find_service(root, "store").store,  # type: ignore[attr-defined]
            modules.protocol.handler,  # type: ignore[attr-defined]
            keys,
            [],
        )
    finally:
        await root.stopService()


def run_module_cli(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = module_main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return status, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_a_key_from_manufacture_and_a_psk_kept_per_module(
    gateway: Gateway, tmp_path: Path
) -> None:
    gw = gateway
    keys = await gw.admin("server-key", "show", "--json")
    # The module makes its key (a secure element would); the operator imports the public half.
    state = str(tmp_path / "se-1.json")
    status, _, err = await threads.deferToThread(
        run_module_cli,
        "--state", state, "provision", "--id", "se-1", "--public-key", str(tmp_path / "se-1.hex"),
        "--server-key", "-", "--gateway", f"127.0.0.1:{gw.port}", stdin=json.dumps(keys),
    )  # fmt: skip
    assert status == 0, err
    added = await gw.admin(
        "module", "add", "se-1", "--public-key", str(tmp_path / "se-1.hex"), "--kid", "1",
        "--suite", "p256", "--json",
    )  # fmt: skip
    assert added["keys"][0]["status"] == "active" and added["module"]["has_psk"] is False
    status, _, err = await threads.deferToThread(
        run_module_cli, "--state", state, "--timeout", "1", "report", "--value", "t=1"
    )
    assert (status, err) == (0, ""), err
    loaded = StateFile(state).load()
    assert loaded.psk is None and loaded.session is not None and loaded.session.kid == 1
    session = await gw.store.get_module_session("se-1")
    assert session is not None and session.kid == 1  # SIG from the first message
    assert gw.controller.drops.total == 0

    # --keep-psk: the PSK stays usable once a key is active.
    shown = await gw.admin("module", "add", "kept-1", "--psk", PSK.hex(), "--keep-psk", "--json")
    assert shown["module"]["psk_reusable"] is True
    assert "--keep-psk needs a PSK" in await gw.admin(
        "module", "add", "x-1", "--public-key", str(tmp_path / "se-1.hex"), "--kid", "1",
        "--suite", "p256", "--keep-psk", ok=False,
    )  # fmt: skip
    endpoint = gw.module("kept-1")
    assert (await gw.run(endpoint, enroll_plan(endpoint))).ok
    endpoint.state.psk = PSK  # the module kept it too
    assert len(await send_raw(gw.port, endpoint.build_hello(kid=0))) == 1


@pytest_twisted.ensureDeferred
async def test_approve_and_refuse(gateway: Gateway) -> None:
    gw = gateway
    await gw.admin(
        "module", "add", "new-1", "--psk", PSK.hex(), "--pending-approval", "--app", "ops"
    )
    await gw.admin(
        "module", "add", "new-2", "--psk", PSK.hex(), "--pending-approval", "--app", "ops"
    )
    await gw.admin("instruction", "submit", "new-1", "set", '{"rate": 5}')
    first, second = gw.module("new-1"), gw.module("new-2")
    for endpoint in (first, second):
        result = await gw.report(endpoint, 1)
        assert result.ok and result.instructions == []
    events = await gw.store.events_after("ops", 0)
    assert [(e.kind, e.payload.get("event")) for e in events if e.kind != "instruction"] == [
        ("module", "pending-approval"),
        ("module", "pending-approval"),
    ]
    # The operator's instruction: queued, then left waiting by the replies to new-1.
    assert [(e.module_id, e.payload["state"]) for e in events if e.kind == "instruction"] == [
        ("new-1", "queued"),
        ("new-1", "waiting"),
    ]

    approved = await gw.admin("module", "approve", "new-1", "--json")
    assert approved == {"id": "new-1", "status": "enabled", "previous_status": "pending-approval"}
    assert "not waiting for approval" in await gw.admin("module", "refuse", "new-1", ok=False)
    text = await gw.admin("module", "refuse", "new-2")
    assert text == "module new-2: pending-approval -> disabled\n"
    later = await gw.store.events_after("ops", len(events))
    assert [(e.kind, e.module_id, e.payload.get("event")) for e in later] == [
        ("module", "new-1", "approved"),
        ("report", "new-1", None),
        ("module", "new-2", "disabled"),
    ]
    result = await gw.report(first, 2)
    assert result.ok and [i.kind for i in result.instructions] == ["set"]
    assert await send_raw(gw.port, second.build_hello()) == []
    audit = [e.reason for e in await gw.store.list_security_events() if e.category == "audit"]
    assert audit[-2:] == ["module-approved", "module-refused"]


@pytest_twisted.ensureDeferred
async def test_rotate_show_the_series_and_revoke(gateway: Gateway) -> None:
    gw = gateway
    await gw.admin("module", "add", "m-1", "--psk", PSK.hex())
    endpoint = gw.module("m-1")
    assert (await gw.run(endpoint, enroll_plan(endpoint))).ok

    queued = await gw.admin("module", "rotate", "m-1", "--params", "fleet", "--json")
    assert (queued["kind"], queued["params"], queued["pid"], queued["kid"]) == (
        "keygen",
        "fleet",
        7,
        2,
    )
    assert "already under way" in await gw.admin("module", "rotate", "m-1", ok=False)
    for value in range(3):
        assert (await gw.report(endpoint, value)).ok
    assert len(await gw.store.list_reports("m-1")) == 3  # reports flowed all along
    series = await gw.admin("module", "keys", "m-1", "--json")
    chain = [(k["kid"], k["suite"], k["status"], k["vouched_by"], k["pid"]) for k in series["keys"]]
    assert chain == [(1, "p256", "retired", 0, 0), (2, "x25519", "active", 1, 7)]
    assert all(k["created_at"] and k["activated_at"] for k in series["keys"])
    assert series["keys"][0]["retired_at"] and series["keys"][1]["retired_at"] is None
    table = (await gw.admin("module", "keys", "m-1")).splitlines()
    assert table[0].split()[:5] == ["KID", "SUITE", "STATUS", "PID", "VOUCHED"]
    assert table[1].split()[:5] == ["1", "p256", "retired", "0", "psk"]
    assert table[2].split()[:6] == ["2", "x25519", "active", "7", "kid", "1"]

    # By default, the set of the active key's suite ([params.fleet] is x25519's: no built-in).
    queued = await gw.admin("module", "rotate", "m-1", "--json")
    assert (queued["params"], queued["kid"]) == ("fleet", 3)

    revoked = await gw.admin("module", "revoke-key", "m-1", "2", "--json")
    assert revoked["status"] == "revoked" and revoked["previous_status"] == "active"
    assert await send_raw(gw.port, endpoint.build_data()) == []
    assert (await gw.store.get_key("m-1", 2)).status is KeyStatus.REVOKED
    assert "has no key 9" in await gw.admin("module", "revoke-key", "m-1", "9", ok=False)


@pytest_twisted.ensureDeferred
async def test_retire_a_suite(gateway: Gateway) -> None:
    gw = gateway
    endpoints = []
    for n in range(2):
        await gw.admin("module", "add", f"p-{n}", "--psk", PSK.hex())
        endpoint = gw.module(f"p-{n}")
        assert (await gw.run(endpoint, enroll_plan(endpoint))).ok
        endpoints.append(endpoint)
    assert "another suite" in await gw.admin("suite", "retire", "p256", "--to", "p256", ok=False)
    assert "is of suite x25519" in await gw.admin(
        "suite", "retire", "p256", "--to", "p384", "--params", "fleet", ok=False
    )
    done = await gw.admin("suite", "retire", "p256", "--to", "x25519", "--json")
    assert (done["queued"], done["under_way"], done["params"]) == (2, 0, "fleet")
    again = await gw.admin("suite", "retire", "p256", "--to", "x25519", "--json")
    assert (again["queued"], again["under_way"]) == (0, 0)  # a rotation is under way: skipped
    for n, endpoint in enumerate(endpoints):
        for value in range(3):
            assert (await gw.report(endpoint, value)).ok
        keys = {k.kid: (k.suite, k.status) for k in await gw.store.list_keys(f"p-{n}")}
        assert keys == {1: ("p256", KeyStatus.RETIRED), 2: ("x25519", KeyStatus.ACTIVE)}
    assert (await gw.store.get_module("p-0")).status is ModuleStatus.ENABLED
    assert gw.controller.drops.total == 0
