"""
``m2mgw-module`` (:mod:`m2mgw.client.cli`): argument errors, SenML input, and
the provision / enroll / report / wake / rotate / listen / simulate flows in
process against a real gateway on 127.0.0.1 — the MGP/1 engine with a memory
store, and the whole ``twistd m2mgw`` service tree provisioned with
``m2mgw-admin``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred

from m2mgw.client.cli import build_parser, main, parse_senml, parse_values, simulate
from m2mgw.client.state import StateFile
from m2mgw.config import ProtocolPolicy
from m2mgw.interfaces import ICipherSuite
from m2mgw.modules.udp import ModuleDatagramProtocol
from m2mgw.protocol import cbor
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import InstructionState, KeyStatus, Module, NewInstruction
from m2mgw.registry import all_plugins
from m2mgw.store.memory import MemoryStore
from tests.client_helpers import PSK, LoadedServerKey, server_key

ENGINE = pytest.mark.skipif(
    not (Path(__file__).parents[1] / "m2mgw" / "protocol" / "engine.py").exists(),
    reason="needs the gateway engine (m2mgw/protocol/engine.py)",
)


def run_cli(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(stdin or ""))
    return status, out.getvalue(), err.getvalue()


def server_keys_json(*servers: LoadedServerKey) -> str:
    """What ``m2mgw-admin server-key show --json`` prints."""
    return json.dumps(
        {
            "server_keys": [
                {
                    "skid": s.skid,
                    "suite": s.suite,
                    "public": s.public.hex(),
                    "sig_public": None if s.sig_public is None else s.sig_public.hex(),
                    "status": "active",
                    "created_at": 0,
                }
                for s in servers
            ]
        }
    )


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, list[LoadedServerKey]]:
    servers = [server_key("p256", 1), server_key("x25519", 4)]
    path = tmp_path / "keys.json"
    path.write_text(server_keys_json(*servers))
    return path, servers


# -- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["report"], "one of the arguments --senml --value is required"),
        (["report", "--value", "novalue"], "--value 'novalue': expected NAME=VALUE"),
        (["report", "--senml", '[{"n": "t", "x": 1}]'], "record 1: unknown field 'x'"),
        (["report", "--senml", '[{"n": "t", "v": "hot"}]'], "record 1: 'v' has the wrong type"),
        (["report", "--senml", "[]"], "a SenML pack is a non-empty JSON array"),
        (["--timeout", "0", "wake"], "argument --timeout: must be a positive number"),
        (["--fec", "4", "wake"], "argument --fec: at most 3 copies"),
        (["--gateway", "host:99999", "wake"], "the port must be 1-65535"),
        (["wake"], "no such state file (create it with m2mgw-module provision)"),
        (
            ["provision", "--id", "x", "--psk", "00"],
            "the following arguments are required: --server-key",
        ),
        (
            ["simulate", "--modules", "0", "--interval", "1", "--duration", "1", "--csv", "x"],
            "argument --modules: '0' is not a whole number of at least 1",
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("M2MGW_MODULE_STATE", raising=False)
    status, _, err = run_cli(*argv)
    assert status == 1
    assert err.startswith("m2mgw-module: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out


# -- input conversion --------------------------------------------------------------------------


def test_senml_json_becomes_senml_cbor_labels() -> None:
    pack = parse_senml(
        '[{"bn": "urn:dev:1:", "bt": 1.7e9, "n": "temp", "u": "Cel", "v": 21.5},'
        ' {"n": "open", "vb": true}, {"n": "raw", "vd": "AQI"}, {"n": "fw", "vs": "1.2"}]'
    )
    assert pack == [
        {-2: "urn:dev:1:", -3: 1.7e9, 0: "temp", 1: "Cel", 2: 21.5},
        {0: "open", 4: True},
        {0: "raw", 8: b"\x01\x02"},
        {0: "fw", 3: "1.2"},
    ]
    assert cbor.decode(cbor.encode(pack)) == pack


def test_value_shortcuts() -> None:
    assert parse_values(["temp=21.5@Cel", "count=3", "door=true", "mode=eco", "big=1e3"]) == [
        {0: "temp", 1: "Cel", 2: 21.5},
        {0: "count", 2: 3},
        {0: "door", 4: True},
        {0: "mode", 3: "eco"},
        {0: "big", 2: 1000.0},
    ]


# -- provision ---------------------------------------------------------------------------------


def test_provision_with_a_psk_writes_a_private_state(
    tmp_path: Path, keys_file: tuple[Path, list[LoadedServerKey]]
) -> None:
    path, _ = keys_file
    state_path = tmp_path / "m.json"
    argv = ["--state", str(state_path), "provision", "--id", "dev-1", "--psk", PSK.hex()]
    status, out, err = run_cli(
        *argv, "--server-key", "-", "--gateway", "[::1]:6000", stdin=path.read_text()
    )
    assert (status, err) == (0, "")
    assert out == f"provisioned dev-1 in {state_path} (suite p256, server key 1)\n"
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
    state = StateFile(str(state_path)).load()
    assert (state.identity, state.psk, state.skid, state.gateways) == (
        "dev-1",
        PSK,
        1,
        ["[::1]:6000"],
    )
    assert sorted(state.server_keys) == [1, 4] and state.server_keys[4].sig_public is not None
    # Not twice.
    status, _, err = run_cli(*argv, "--server-key", str(path))
    assert status == 1 and "already exists" in err
    assert run_cli(*argv, "--server-key", str(path), "--force")[0] == 0


def test_provision_with_a_generated_key_prints_the_admin_command(
    tmp_path: Path, keys_file: tuple[Path, list[LoadedServerKey]]
) -> None:
    path, servers = keys_file
    public = tmp_path / "pub.hex"
    status, out, _ = run_cli(
        "--state", str(tmp_path / "m.json"), "provision", "--id", "dev-2", "--suite", "x25519",
        "--public-key", str(public), "--kid", "3", "--server-key", str(path),
    )  # fmt: skip
    assert status == 0
    assert f"m2mgw-admin module add dev-2 --public-key {public} --kid 3 --suite x25519" in out
    state = StateFile(str(tmp_path / "m.json")).load()
    assert state.psk is None and list(state.keys) == [3] and state.skid == servers[1].skid
    suite = all_plugins(ICipherSuite)["x25519"]
    private = suite.load_signing_key(state.keys[3].private)
    assert public.read_text().strip() == suite.signing_public(private).hex()


def test_provision_with_a_key_file(
    tmp_path: Path, keys_file: tuple[Path, list[LoadedServerKey]]
) -> None:
    path, _ = keys_file
    suite = all_plugins(ICipherSuite)["p256"]
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(suite.dump_server_key(suite.generate_signing_key()))
    status, _, err = run_cli(
        "--state", str(tmp_path / "m.json"), "provision", "--id", "dev-3",
        "--key-file", str(key_file), "--server-key", str(path),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert StateFile(str(tmp_path / "m.json")).load().keys[1].suite == "p256"
    key_file.write_text("not a key")
    status, _, err = run_cli(
        "--state", str(tmp_path / "n.json"), "provision", "--id", "dev-3",
        "--key-file", str(key_file), "--server-key", str(path),
    )  # fmt: skip
    assert status == 1 and "not an MGP/1 private key" in err


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("not json", "not JSON"),
        ('{"server_keys": []}', "no usable server key"),
        ('[{"skid": 1, "suite": "p256", "public": "04"}]', "not a valid p256 key"),
        ('[{"skid": 1, "suite": "nope", "public": "04"}]', "unknown cipher suite 'nope'"),
    ],
)
def test_provision_refuses_bad_server_keys(tmp_path: Path, keys: str, message: str) -> None:
    status, _, err = run_cli(
        "--state", str(tmp_path / "m.json"), "provision", "--id", "d", "--psk", PSK.hex(),
        "--server-key", "-", stdin=keys,
    )  # fmt: skip
    assert status == 1 and message in err and err.count("\n") == 1


# -- against the gateway engine ----------------------------------------------------------------


@dataclass
class Gateway:
    port: int
    store: MemoryStore
    controller: ModuleController
    keys: list[LoadedServerKey]


@pytest_twisted.async_yield_fixture
async def gateway() -> AsyncIterator[Gateway]:
    from twisted.internet import reactor

    keys = [server_key("p256", 1), server_key("x25519", 4)]
    store = MemoryStore()
    await store.open()
    await store.add_modules([Module("dev-1", psk=PSK), Module("dev-2", psk=PSK)])
    controller = ModuleController(
        store, all_plugins(ICipherSuite), keys, ProtocolPolicy(), now=reactor.seconds
    )
    port = reactor.listenUDP(0, ModuleDatagramProtocol(controller), interface="127.0.0.1")
    try:
        yield Gateway(port.getHost().port, store, controller, keys)
    finally:
        await port.stopListening()


def in_thread(*argv: str) -> Deferred[tuple[int, str, str]]:
    """Run the CLI in a thread: it blocks on its socket while the reactor serves the gateway."""
    return threads.deferToThread(run_cli, *argv)


@ENGINE
@pytest_twisted.ensureDeferred
async def test_provision_report_wake_enroll_rotate(tmp_path: Path, gateway: Gateway) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(server_keys_json(*gateway.keys))
    state = str(tmp_path / "dev-1.json")
    common = ["--state", state, "--timeout", "1"]
    status, _, err = await in_thread(
        *common, "provision", "--id", "dev-1", "--psk", PSK.hex(), "--server-key", str(keys),
        "--gateway", f"127.0.0.1:{gateway.port}",
    )  # fmt: skip
    assert (status, err) == (0, "")

    status, out, err = await in_thread(*common, "report", "--value", "temp=21.5@Cel")
    assert (status, err) == (0, "")
    assert out.splitlines() == ["2 datagrams sent, 2 replies", "reported 1 reading(s)"]
    reports = await gateway.store.list_reports("dev-1")
    assert [cbor.decode(r.data) for r in reports] == [[{0: "temp", 1: "Cel", 2: 21.5}]]

    for kind, body in (("set", {"led": "on"}), ("rehello", None)):
        await gateway.store.enqueue(
            NewInstruction("dev-1", kind, cbor.encode(body), wire_size=40, source="test"),
            int(gateway.controller._now()),
        )
    status, out, err = await in_thread(*common, "--json", "wake", "--confirm-now")
    assert (status, err) == (0, "")
    document = json.loads(out.splitlines()[-1])
    assert out.splitlines()[0] == 'instruction set {"led":"on"}'
    assert [(i["iid"], i["kind"], i["status"]) for i in document["instructions"]] == [
        (1, "set", 0),
        (2, "rehello", 0),
    ]
    assert document["ok"] and document["pending_confirmations"] == 0
    for iid in (1, 2):
        assert (
            await gateway.store.get_instruction("dev-1", iid)
        ).state == InstructionState.CONFIRMED

    status, out, err = await in_thread(*common, "enroll")
    assert (status, err) == (0, "")
    assert out.splitlines()[-1] == "enrolled: key 1 active; the PSK is forgotten"
    loaded = StateFile(state).load()
    assert loaded.psk is None and loaded.session is not None and loaded.session.kid == 1

    status, out, err = await in_thread(*common, "rotate")
    assert (status, err) == (0, "")
    assert out.splitlines()[-1] == "key 2 is active"
    stored = {key.kid: key.status for key in await gateway.store.list_keys("dev-1")}
    assert stored == {1: KeyStatus.RETIRED, 2: KeyStatus.ACTIVE}

    status, out, _ = await in_thread(*common, "listen", "--interval", "0.05", "--count", "2")
    assert status == 0 and out.count("1 datagram sent, 1 reply") == 2
    assert gateway.controller.drops.total == 0


@ENGINE
@pytest_twisted.ensureDeferred
async def test_x25519_report_in_the_hello_with_an_instruction_handler(
    tmp_path: Path, gateway: Gateway
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(server_keys_json(*gateway.keys))
    handler = tmp_path / "handler.py"
    handler.write_text(
        "import json, sys\nbody = json.load(sys.stdin)\n"
        "print(json.dumps({'kind': sys.argv[1], 'body': body}))\n"
        "sys.exit(2 if sys.argv[1] == 'forbidden' else 0)\n"
    )
    common = ["--state", str(tmp_path / "dev-2.json"), "--timeout", "1"]
    status, _, _ = await in_thread(
        *common, "provision", "--id", "dev-2", "--psk", PSK.hex(), "--suite", "x25519",
        "--server-key", str(keys), "--gateway", f"127.0.0.1:{gateway.port}",
    )  # fmt: skip
    assert status == 0
    for kind in ("config", "forbidden"):
        await gateway.store.enqueue(
            NewInstruction("dev-2", kind, cbor.encode([1, 2]), wire_size=40, source="test"),
            int(gateway.controller._now()),
        )
    status, out, err = await in_thread(
        *common, "report", "--senml", '[{"n": "t", "v": 1}]', "--in-hello", "--confirm-now",
        "--handler", f"{sys.executable} {handler}",
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out.splitlines()[:3] == [
        "2 datagrams sent, 2 replies",
        "instruction 1 config: done",
        "instruction 2 forbidden: refused",
    ]
    confirmed = await gateway.store.get_instruction("dev-2", 1)
    assert confirmed.state == InstructionState.CONFIRMED
    assert cbor.decode(confirmed.result) == {"kind": "config", "body": [1, 2]}
    assert len(await gateway.store.list_reports("dev-2")) == 1


@ENGINE
@pytest_twisted.ensureDeferred
async def test_an_unanswered_report_is_kept_and_sent_once_later(
    tmp_path: Path, gateway: Gateway
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(server_keys_json(*gateway.keys))
    state = str(tmp_path / "dev-1.json")
    await in_thread(
        "--state", state, "provision", "--id", "dev-1", "--psk", PSK.hex(),
        "--server-key", str(keys), "--gateway", f"127.0.0.1:{gateway.port}",
    )  # fmt: skip
    assert (await in_thread("--state", state, "report", "--value", "n=1"))[0] == 0
    # A gateway that does not answer: the report stays in the state.
    status, _, err = await in_thread(
        "--state",
        state,
        "--timeout",
        "0.02",
        "--gateway",
        "127.0.0.1:9",
        "report",
        "--value",
        "n=2",
    )
    assert status == 1
    assert err == "m2mgw-module: error: no answer (kept; it is re-sent next time)\n"
    assert StateFile(state).load().outbox is not None
    status, out, _ = await in_thread("--state", state, "report", "--value", "n=3")
    assert status == 0 and out.startswith("2 datagrams sent, 2 replies")
    reports = await gateway.store.list_reports("dev-1")
    assert sorted(cbor.decode(r.data)[0][2] for r in reports) == [1, 2, 3]


@ENGINE
@pytest_twisted.ensureDeferred
async def test_simulate_from_a_csv(tmp_path: Path, gateway: Gateway) -> None:
    from twisted.internet import reactor

    keys = tmp_path / "keys.json"
    keys.write_text(server_keys_json(*gateway.keys))
    csv_file = tmp_path / "modules.csv"
    csv_file.write_text(f"id,psk,group\ndev-1,{PSK.hex()},a\ndev-2,{PSK.hex()},b\n")
    args = build_parser().parse_args(
        [
            "--json", "--gateway", f"127.0.0.1:{gateway.port}", "--timeout", "0.5",
            "simulate", "--modules", "2", "--interval", "0.2", "--duration", "0.7",
            "--csv", str(csv_file), "--server-key", str(keys),
            "--state-dir", str(tmp_path / "sim"), "--enroll",
        ]
    )  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    assert await simulate(args, reactor, out, err) == 0
    summary = json.loads(out.getvalue())
    assert summary["modules"] == 2 and summary["failures"] == {}
    assert summary["wakes"] >= 4 and summary["answered"] == summary["exchanges"] > 0
    assert summary["latency_ms"]["p50"] is not None
    assert err.getvalue() == ""  # not a terminal: no progress line
    for module_id in ("dev-1", "dev-2"):
        stored = await gateway.store.list_keys(module_id)
        assert [key.status for key in stored] == [KeyStatus.ACTIVE]
        assert await gateway.store.list_reports(module_id)


# -- the whole gateway, provisioned with m2mgw-admin -------------------------------------------


@pytest.fixture(scope="module")
def data_dir_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.doubles import prepared_data_dir

    return prepared_data_dir(str(tmp_path_factory.mktemp("template") / "data"))


@ENGINE
@pytest_twisted.ensureDeferred
async def test_the_whole_gateway_with_admin_provisioning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir_template: str
) -> None:
    from twisted.internet import reactor

    from m2mgw.admin import cli as admin_cli
    from m2mgw.service import find_service
    from m2mgw.tap import Options, makeService

    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_dir_template, tmp_path / "var" / "m2mgw")
    Path("ec.conf").write_text("[apps]\nkey_type = ec\n", encoding="utf-8")
    options = Options()
    options.parseOptions(
        ["-c", "ec.conf", "--module-address", "127.0.0.1", "--module-port", "0",
         "--app-address", "127.0.0.1", "--app-port", "0"]
    )  # fmt: skip
    root = makeService(options, reactor)
    root.privilegedStartService()
    await root.startService()
    try:
        port = find_service(root, "modules").listening_port().getHost().port  # type: ignore[attr-defined]

        async def admin(*argv: str) -> Any:
            out = io.StringIO()
            status = await admin_cli.run(
                ["--config", "ec.conf", "--json", *argv], reactor, stdout=out
            )
            assert status == 0
            return json.loads(out.getvalue())

        keys = await admin("server-key", "show")
        added = await admin("module", "add", "dev-9", "--generate-psk")
        status, _, err = await threads.deferToThread(
            run_cli,
            "--state", "dev-9.json", "provision", "--id", "dev-9", "--psk", added["psk"],
            "--server-key", "-", "--gateway", f"127.0.0.1:{port}",
            stdin=json.dumps(keys),
        )  # fmt: skip
        assert (status, err) == (0, "")
        status, out, err = await threads.deferToThread(
            run_cli, "--state", "dev-9.json", "report", "--value", "t=1", "--in-hello"
        )
        assert (status, err) == (0, "")
        assert out.splitlines() == ["1 datagram sent, 1 reply", "reported 1 reading(s)"]
        shown = await admin("module", "show", "dev-9")
        assert shown["module"]["last_hello_ts"] > 0

        args = build_parser().parse_args(
            [
                "--json", "--gateway", f"127.0.0.1:{port}", "--timeout", "0.5",
                "simulate", "--modules", "3", "--interval", "0.3", "--duration", "0.8",
                "--provision-with-admin", "--admin-config", "ec.conf",
                "--state-dir", "sim", "--suite", "x25519",
            ]
        )  # fmt: skip
        sim_out, sim_err = io.StringIO(), io.StringIO()
        assert await simulate(args, reactor, sim_out, sim_err) == 0, sim_err.getvalue()
        summary = json.loads(sim_out.getvalue())
        assert summary["modules"] == 3 and summary["failures"] == {}
        assert summary["answered"] >= 6
        listed = await admin("module", "list")
        ids = {m["id"] for m in listed["modules"]}
        assert {"sim-00000", "sim-00001", "sim-00002"} <= ids
        assert sorted(os.listdir("sim")) == ["sim-00000.json", "sim-00001.json", "sim-00002.json"]
    finally:
        await root.stopService()
