"""
Tests for ``m2mgw-admin``: argument parsing in-process, every command
in-process against a real SQLite store (through :func:`m2mgw.admin.cli.run`
on the test reactor), and end to end through the installed console script.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from m2mgw.admin import OperatorError, cli
from m2mgw.datadir import DataDir
from m2mgw.interfaces import IModuleStoreFactory
from m2mgw.records import (
    VOUCHED_BY_OPERATOR,
    HelloCommit,
    InstructionState,
    KeyStatus,
    ModuleStatus,
    Session,
)
from m2mgw.registry import lookup

NOW = int(time.time())
PSK = "00112233445566778899aabbccddeeff"
ADMIN = os.path.join(os.path.dirname(sys.executable), "m2mgw-admin")


@dataclass
class Result:
    """What one ``m2mgw-admin`` run printed and returned."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def assert_one_line_error(self, code: int = 1) -> str:
        assert self.code == code, (self.code, self.stdout, self.stderr)
        assert "Traceback" not in self.stderr
        assert self.stderr.endswith("\n") and self.stderr.count("\n") == 1, self.stderr
        return self.stderr


def write_config(tmp_path: Path, backend: str = "sqlite") -> str:
    path = tmp_path / "m2mgw.conf"
    path.write_text(
        "[gateway]\n"
        f"data_dir = {tmp_path / 'data'}\n"
        "suites = p256, x25519\n"
        "[apps]\n"
        "key_type = ec\n"
        "[store]\n"
        f"backend = {backend}\n"
    )
    return str(path)


class InProcess:
    """Runs ``m2mgw-admin`` commands in this process, on the running reactor."""

    def __init__(self, config: str) -> None:
        self.config = config

    async def __call__(self, *argv: str, clock: float | None = None) -> Result:
        from twisted.internet import reactor

        stdout, stderr = io.StringIO(), io.StringIO()
        code = await cli.run(
            ["--config", self.config, *argv],
            reactor,
            stdout=stdout,
            stderr=stderr,
            clock=(lambda: clock) if clock is not None else time.time,
        )
        return Result(code, stdout.getvalue(), stderr.getvalue())


async def open_store(config: Path) -> Any:
    from twisted.internet import reactor

    store = lookup(IModuleStoreFactory, "sqlite").create({}, str(config / "data"), reactor)
    await store.open()
    return store


@pytest.fixture
def admin(tmp_path: Path) -> InProcess:
    return InProcess(write_config(tmp_path))


def public_key_pem(tmp_path: Path) -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "module.pem"
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    wire = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return str(path), wire


# -- parsing ------------------------------------------------------------------------------------


def parse(*argv: str) -> tuple[Any, str]:
    stderr = io.StringIO()
    return cli.parse(list(argv), stderr), stderr.getvalue()


def test_usage_errors_exit_2_with_one_line() -> None:
    for argv in (
        [],
        ["module"],
        ["module", "add"],
        ["module", "add", "m", "--psk", PSK, "--generate-psk"],
        ["instruction", "cancel", "m", "x"],
        ["instruction", "submit", "m", "set", "--ttl", "5", "--not-after", "9"],
        ["frobnicate"],
        ["module", "add", "m", "--kid", "0"],
    ):
        result, stderr = parse(*argv)
        assert result == 2, argv
        assert stderr.startswith("m2mgw-admin") and stderr.count("\n") == 1, stderr
        assert "--help" in stderr


def test_global_options_go_before_or_after_the_command() -> None:
    args, _ = parse("--json", "module", "list", "--data-dir", "/x")
    assert args.json is True and args.data_dir == "/x"
    args, _ = parse("--config", "c.conf", "module", "show", "m", "--json")
    assert args.config == "c.conf" and args.json is True and args.module_id == "m"
    args, _ = parse("module", "list")
    assert not hasattr(args, "json") and not hasattr(args, "config")


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "module" in capsys.readouterr().out
    assert cli.main(["module", "import", "--help"]) == 0
    assert "id, psk, suite, kid, public_key" in capsys.readouterr().out
    assert cli.main(["module"]) == 2  # parsing fails before any reactor runs


def test_parse_since() -> None:
    assert cli.parse_since("12345", NOW) == 12345
    assert cli.parse_since("2h", 10_000) == 10_000 - 7200
    assert cli.parse_since("7d", 10) == 0
    assert cli.parse_since("2025-06-15T15:06:40", 0) == 1_750_000_000
    assert cli.parse_since("2025-06-15T17:06:40+02:00", 0) == 1_750_000_000
    with pytest.raises(OperatorError):
        cli.parse_since("yesterday", NOW)


# -- commands, in process -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_init_is_idempotent_and_registers_the_server_keys(
    admin: InProcess, tmp_path: Path
) -> None:
    first = await admin("init", "--json")
    assert first.code == 0, first.stderr
    document = first.json()
    kinds = [item["kind"] for item in document["created"]]
    assert kinds.count("server-key") == 2 and "tls-ca" in kinds and "tls-gateway" in kinds
    assert document["store"]["server_keys_registered"] == [1, 2]
    assert document["tls"]["ca_key_present"] is True
    again = await admin("init")
    assert again.code == 0
    assert "created" not in again.stdout and "server keys registered: none new" in again.stdout
    store = await open_store(tmp_path)
    try:
        assert [(k.skid, k.suite) for k in await store.list_server_keys()] == [
            (1, "p256"),
            (2, "x25519"),
        ]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_server_key_show(admin: InProcess, tmp_path: Path) -> None:
    await admin("init")
    result = await admin("server-key", "show", "--json")
    keys = result.json()["server_keys"]
    records = DataDir(str(tmp_path / "data")).server_key_records()
    assert [(k["skid"], k["suite"], k["public"]) for k in keys] == [
        (r.skid, r.suite, r.public.hex()) for r in records
    ]
    assert keys[0]["sig_public"] is None and len(bytes.fromhex(keys[1]["sig_public"])) == 32
    assert {k["status"] for k in keys} == {"active"}
    text = (await admin("server-key", "show", "--suite", "x25519")).stdout
    assert text.splitlines()[0].split() == ["SKID", "SUITE", "STATUS", "PUBLIC", "KEY"]
    assert f"{keys[1]['public']} sig {keys[1]['sig_public']}" in text
    assert "p256" not in text
    error = (await admin("server-key", "show", "--suite", "p999")).assert_one_line_error()
    assert "unknown cipher suite 'p999' (known:" in error


@pytest_twisted.ensureDeferred
async def test_generated_psk_is_printed_once(admin: InProcess, tmp_path: Path) -> None:
    await admin("init")
    added = await admin("module", "add", "m-1", "--generate-psk", "--app", "ops", "--json")
    assert added.code == 0, added.stderr
    psk_hex = added.json()["psk"]
    assert len(psk_hex) == 64
    store = await open_store(tmp_path)
    try:
        module = await store.get_module("m-1")
        assert module.psk == bytes.fromhex(psk_hex)
        assert await store.get_module_apps("m-1") == ["ops"]
    finally:
        await store.close()
    for argv in (("module", "show", "m-1"), ("module", "list"), ("security-events",)):
        for extra in ((), ("--json",)):
            result = await admin(*argv, *extra)
            assert result.code == 0 and psk_hex not in result.stdout
    human = await admin("module", "add", "m-2", "--generate-psk")
    (printed,) = [line for line in human.stdout.splitlines() if line.startswith("psk ")]
    assert human.stdout.count(printed[4:]) == 1 and "shown only now" in human.stdout


@pytest_twisted.ensureDeferred
async def test_module_add_with_a_public_key(admin: InProcess, tmp_path: Path) -> None:
    await admin("init")
    pem_path, wire = public_key_pem(tmp_path)
    result = await admin(
        "module", "add", "m-key", "--public-key", pem_path, "--kid", "4", "--suite", "p256",
        "--group", "north", "--pending-approval", "--app", "b", "--app", "a",
        clock=NOW,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "status pending-approval, psk no, key kid 4 suite p256" in result.stdout
    store = await open_store(tmp_path)
    try:
        module = await store.get_module("m-key")
        assert module.status is ModuleStatus.PENDING_APPROVAL and module.group == "north"
        assert module.psk is None and module.created_at == NOW
        (key,) = await store.list_keys("m-key")
        assert (key.kid, key.suite, key.public, key.status) == (4, "p256", wire, KeyStatus.ACTIVE)
        assert key.vouched_by == VOUCHED_BY_OPERATOR and key.activated_at == NOW
        assert await store.get_module_apps("m-key") == ["a", "b"]
    finally:
        await store.close()
    shown = (await admin("module", "show", "m-key", "--json")).json()
    assert shown["keys"][0]["public"] == wire.hex() and shown["apps"] == ["a", "b"]


REFUSALS = {
    "no credential": (["module", "add", "m"], "give the module a PSK"),
    "bad psk": (["module", "add", "m", "--psk", "00"], "a PSK is 16-64 bytes"),
    "long id": (["module", "add", "x" * 65, "--psk", PSK], "1-64 bytes of UTF-8, not 65"),
    "half a key": (["module", "add", "m", "--kid", "1"], "--public-key, --kid and --suite go"),
    "missing key file": (
        ["module", "add", "m", "--public-key", "/nonexistent", "--kid", "1", "--suite", "p256"],
        "cannot read public key file /nonexistent",
    ),
    "unknown suite": (
        ["module", "add", "m", "--public-key", "/dev/null", "--kid", "1", "--suite", "zz"],
        "unknown cipher suite 'zz'",
    ),
    "bad app": (["module", "add", "m", "--psk", PSK, "--app", "a b"], "bad application name"),
    "unknown module": (["module", "show", "ghost"], "no module 'ghost'"),
    "disable unknown": (["module", "disable", "ghost"], "no module 'ghost'"),
    "submit unknown": (["instruction", "submit", "ghost", "set"], "no module 'ghost'"),
    "cancel unknown": (["instruction", "cancel", "ghost", "1"], "has no instruction 1"),
    "reserved kind": (["instruction", "submit", "m", "keygen"], "'keygen' is reserved"),
    "bad json": (["instruction", "submit", "m", "set", "{"], "BODY_JSON is not JSON"),
    "missing csv": (["module", "import", "/nonexistent.csv"], "cannot read CSV file"),
    "bad since": (["security-events", "--since", "soon"], "--since 'soon'"),
}


@pytest.mark.parametrize(("argv", "message"), REFUSALS.values(), ids=REFUSALS.keys())
@pytest_twisted.ensureDeferred
async def test_refusals_are_one_line(admin: InProcess, argv: list[str], message: str) -> None:
    result = await admin(*argv)
    error = result.assert_one_line_error()
    assert error.startswith("m2mgw-admin: error: ")
    assert message in error
    assert result.stdout == ""


@pytest_twisted.ensureDeferred
async def test_bad_configuration_is_one_line(tmp_path: Path) -> None:
    missing = InProcess(str(tmp_path / "nope.conf"))
    assert "cannot read config file" in (await missing("module", "list")).assert_one_line_error()
    memory = InProcess(write_config(tmp_path, backend="memory"))
    error = (await memory("module", "list")).assert_one_line_error()
    assert "'memory', which keeps nothing between processes" in error


@pytest_twisted.ensureDeferred
async def test_duplicate_module(admin: InProcess) -> None:
    await admin("module", "add", "m", "--psk", PSK)
    error = (await admin("module", "add", "m", "--psk", PSK)).assert_one_line_error()
    assert "module 'm' already exists" in error


@pytest_twisted.ensureDeferred
async def test_import_list_and_show(admin: InProcess, tmp_path: Path) -> None:
    csv_path = tmp_path / "modules.csv"
    rows = [f"dev-{i:04d},{os.urandom(16).hex()},,g{i % 3}" for i in range(2500)]
    csv_path.write_text("id,psk,apps,group\n" + "\n".join(rows) + "\n")
    rows[7] = "dev-0007,,billing ops,g1"  # no credential: a bad row
    bad_path = tmp_path / "bad.csv"
    bad_path.write_text("id,psk,apps,group\n" + "\n".join(rows) + "\n")
    error = (await admin("module", "import", str(bad_path))).assert_one_line_error()
    assert "line 9: the row has neither a psk nor a public_key; nothing was imported" in error
    assert (await admin("module", "list", "--json")).json() == {"modules": [], "count": 0}

    imported = await admin("module", "import", str(csv_path), "--json")
    assert imported.code == 0, imported.stderr
    assert imported.json()["modules"] == 2500 and imported.json()["keys"] == 0

    listed = (await admin("module", "list", "--json")).json()
    assert listed["count"] == 2500
    assert [m["id"] for m in listed["modules"]] == [f"dev-{i:04d}" for i in range(2500)]
    text = (await admin("module", "list")).stdout.splitlines()
    assert len(text) == 2501 and text[0].split() == ["ID", "STATUS", "GROUP", "PSK", "CREATED"]
    assert text[-1].split()[:3] == ["dev-2499", "enabled", "g0"]

    again = tmp_path / "again.csv"
    again.write_text(f"id,psk\nnew-1,{PSK}\ndev-0003,{PSK}\n")
    error = (await admin("module", "import", str(again))).assert_one_line_error()
    assert "line 3: module 'dev-0003' already exists; nothing was imported" in error
    assert (await admin("module", "show", "new-1")).code == 1


@pytest_twisted.ensureDeferred
async def test_import_with_keys_and_apps(admin: InProcess, tmp_path: Path) -> None:
    _, wire = public_key_pem(tmp_path)
    csv_path = tmp_path / "keys.csv"
    csv_path.write_text(
        "id,suite,kid,public_key,apps,status\n"
        f"k-1,p256,1,{wire.hex()},billing ops,pending-approval\n"
    )
    result = await admin("module", "import", str(csv_path))
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("imported 1 modules (1 keys) from")
    shown = (await admin("module", "show", "k-1", "--json")).json()
    assert shown["apps"] == ["billing", "ops"]
    assert shown["module"]["status"] == "pending-approval"
    assert shown["keys"][0]["status"] == "active" and shown["keys"][0]["vouched_by"] == -1


@pytest_twisted.ensureDeferred
async def test_module_show_summarises_the_session(admin: InProcess, tmp_path: Path) -> None:
    await admin("module", "add", "m", "--psk", PSK)
    store = await open_store(tmp_path)
    try:
        session = Session(
            sid=bytes.fromhex("0a0b0c0d0e0f"),
            module_id="m",
            kid=0,
            suite="p256",
            skid=1,
            k_up=b"U" * 16,
            k_down=b"D" * 16,
            created_at=NOW,
            expires_at=NOW + 3600,
        )
        assert await store.accept_hello(HelloCommit(session, ts=NOW, now=NOW)) is not None
    finally:
        await store.close()
    shown = await admin("module", "show", "m", "--json", clock=NOW)
    assert shown.json()["session"] == {
        "sid": "0a0b0c0d0e0f",
        "kid": 0,
        "suite": "p256",
        "skid": 1,
        "created_at": NOW,
        "expires_at": NOW + 3600,
        "highest_ctr": 0,
        "expired": False,
    }
    assert shown.json()["module"]["last_hello_ts"] == NOW
    later = await admin("module", "show", "m", clock=NOW + 7200)
    assert "session       sid 0a0b0c0d0e0f kid 0 suite p256 skid 1 expired" in later.stdout
    for secret in (b"U" * 16, b"D" * 16):
        assert secret.hex() not in shown.stdout + later.stdout
        assert secret.decode() not in shown.stdout + later.stdout


@pytest_twisted.ensureDeferred
async def test_disable_enable_and_audit(admin: InProcess) -> None:
    await admin("module", "add", "m", "--psk", PSK, "--pending-approval")
    disabled = (await admin("module", "disable", "m", "--json")).json()
    assert disabled == {"id": "m", "status": "disabled", "previous_status": "pending-approval"}
    enabled = await admin("module", "enable", "m")
    assert enabled.stdout == "module m: disabled -> enabled\n"
    shown = (await admin("module", "show", "m", "--json")).json()
    assert shown["module"]["status"] == "enabled"
    events = (await admin("security-events", "--json")).json()["events"]
    assert [e["reason"] for e in events] == ["module-added", "module-disabled", "module-enabled"]
    assert {e["category"] for e in events} == {"audit"}
    assert all(e["source"].startswith("operator") and e["claimed_id"] == "m" for e in events)
    future = (await admin("security-events", "--since", str(NOW + 3600), "--json")).json()
    assert future["events"] == []


@pytest_twisted.ensureDeferred
async def test_instructions(admin: InProcess) -> None:
    await admin("module", "add", "m", "--psk", PSK)
    submitted = await admin(
        "instruction", "submit", "m", "set", '{"interval": 60}', "--ttl", "600", "--json",
        clock=NOW,
    )  # fmt: skip
    assert submitted.code == 0, submitted.stderr
    first = submitted.json()
    assert first["iid"] == 1 and first["body"] == {"interval": 60}
    assert first["not_after"] == NOW + 600 and first["source"] == "operator"
    assert first["state"] == "queued" and first["wire_size"] == 31
    rehello = await admin("instruction", "submit", "m", "rehello")
    assert rehello.stdout.startswith("queued instruction 2 (rehello,")
    refused = await admin("instruction", "submit", "m", "rehello", "{}")
    assert "has no body" in refused.assert_one_line_error()
    keyed = [
        (await admin("instruction", "submit", "m", "x", "--idempotency-key", "k1", "--json"))
        for _ in range(2)
    ]
    assert keyed[0].json()["iid"] == keyed[1].json()["iid"] == 3

    cancelled = (await admin("instruction", "cancel", "m", "1", "--json")).json()
    assert cancelled["state"] == InstructionState.CANCELLED.value
    error = (await admin("instruction", "cancel", "m", "1")).assert_one_line_error()
    assert "instruction 1 of 'm' is already cancelled" in error

    queued = (await admin("instruction", "list", "m", "--state", "queued", "--json")).json()
    assert [i["iid"] for i in queued["instructions"]] == [2, 3]
    everything = (await admin("instruction", "list")).stdout.splitlines()
    assert everything[0].split()[:4] == ["ID", "IID", "KIND", "STATE"] and len(everything) == 4
    shown = (await admin("module", "show", "m", "--json")).json()
    assert shown["pending_instructions"] == 2


@pytest_twisted.ensureDeferred
async def test_app_cert_issue(admin: InProcess, tmp_path: Path) -> None:
    await admin("init")
    out_dir = tmp_path / "certs"
    result = await admin("app-cert", "issue", "billing", "--out", str(out_dir), "--days", "30")
    assert result.code == 0, result.stderr
    assert sorted(os.listdir(out_dir)) == ["billing-key.pem", "billing.pem", "m2mgw-ca.pem"]
    assert os.stat(out_dir / "billing-key.pem").st_mode & 0o777 == 0o600
    assert (out_dir / "m2mgw-ca.pem").read_bytes() == (tmp_path / "data/tls/ca.pem").read_bytes()
    again = await admin("app-cert", "issue", "billing", "--out", str(out_dir))
    assert "already exists" in again.assert_one_line_error()
    events = (await admin("security-events", "--json")).json()["events"]
    assert events[-1]["reason"] == "app-cert-issued" and "billing" in events[-1]["detail"]


# -- end to end, through the console script ------------------------------------------------


def admin_process(config: str, *argv: str, cwd: Path) -> Result:
    completed = subprocess.run(
        [ADMIN, "--config", config, *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_every_command_end_to_end(tmp_path: Path) -> None:
    """The installed ``m2mgw-admin``, one flow through every command, while a store is open."""
    config = write_config(tmp_path)

    def run(*argv: str) -> Result:
        return admin_process(config, *argv, cwd=tmp_path)

    init = run("init", "--json")
    assert init.code == 0, init.stderr
    assert len(init.json()["created"]) == 3 + 2 + 2
    # From here on the "gateway" holds the database open, as a running gateway would.
    gateway_store = await open_store(tmp_path)
    try:
        keys = run("server-key", "show", "--json").json()["server_keys"]
        assert [k["suite"] for k in keys] == ["p256", "x25519"]

        added = run("module", "add", "e2e-1", "--generate-psk", "--json")
        assert added.code == 0, added.stderr
        psk = bytes.fromhex(added.json()["psk"])
        module = await gateway_store.get_module("e2e-1")
        assert module is not None and module.psk == psk

        csv_path = tmp_path / "fleet.csv"
        csv_path.write_text(f"id,psk,apps\ne2e-2,{PSK},billing\ne2e-3,{PSK},\n")
        imported = run("module", "import", str(csv_path))
        assert imported.code == 0 and "imported 2 modules (0 keys)" in imported.stdout
        assert await gateway_store.count_modules() == 3

        listed = run("module", "list", "--json").json()
        assert [m["id"] for m in listed["modules"]] == ["e2e-1", "e2e-2", "e2e-3"]
        assert run("module", "disable", "e2e-2").stdout == "module e2e-2: enabled -> disabled\n"
        assert run("module", "enable", "e2e-2").code == 0
        shown = run("module", "show", "e2e-2", "--json").json()
        assert shown["apps"] == ["billing"] and shown["module"]["status"] == "enabled"

        submitted = run("instruction", "submit", "e2e-1", "set", '{"a": 1}', "--json").json()
        assert submitted["iid"] == 1
        assert [i.iid for i in await gateway_store.list_instructions("e2e-1")] == [1]
        assert "e2e-1  1    set" in run("instruction", "list", "e2e-1").stdout
        assert run("instruction", "cancel", "e2e-1", "1").code == 0

        issued = run("app-cert", "issue", "ops", "--out", str(tmp_path / "ops"), "--json")
        assert issued.json()["certificate"] == str(tmp_path / "ops" / "ops.pem")

        events = run("security-events", "--json").json()["events"]
        reasons = [e["reason"] for e in events]
        assert reasons == [
            "module-added",
            "modules-imported",
            "module-disabled",
            "module-enabled",
            "instruction-submitted",
            "instruction-cancelled",
            "app-cert-issued",
        ]
        assert psk.hex() not in "".join(
            r.stdout for r in (run("module", "show", "e2e-1"), run("security-events"))
        )

        failed = run("module", "show", "nobody")
        assert failed.assert_one_line_error() == "m2mgw-admin: error: no module 'nobody'\n"
        usage = run("module", "add")
        usage.assert_one_line_error(code=2)
    finally:
        await gateway_store.close()
