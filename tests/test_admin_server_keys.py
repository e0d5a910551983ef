"""
``m2mgw-admin server-key add/list/announce/retire`` and ``gateway-cert
renew``, in-process against a real SQLite store.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from m2mgw.datadir import DataDir
from m2mgw.protocol import cbor
from m2mgw.records import InstructionState
from tests.test_admin_cli import PSK, InProcess, open_store, write_config


@pytest_twisted.ensureDeferred
async def test_server_key_rollover_commands(tmp_path: Path) -> None:
    admin = InProcess(write_config(tmp_path))  # suites p256 (skid 1), x25519 (skid 2)
    assert (await admin("init")).code == 0
    for name in ("m1", "m2"):
        assert (await admin("module", "add", name, "--psk", PSK)).code == 0

    listed = (await admin("--json", "server-key", "list")).json()["server_keys"]
    assert [(k["skid"], k["suite"], k["status"], k["file"]) for k in listed] == [
        (1, "p256", "active", True),
        (2, "x25519", "active", True),
    ]

    refused = await admin("server-key", "add", "--suite", "rsa")
    assert "suite rsa is not served" in refused.assert_one_line_error()
    added = (await admin("--json", "server-key", "add", "--suite", "p256")).json()
    assert added["server_key"]["skid"] == 3
    assert (tmp_path / "data" / "keys" / "server-3-p256.pem").exists()

    # Retiring before anyone was told about the successor is refused.
    early = await admin("server-key", "retire", "1")
    assert "no module was told about skid 3" in early.assert_one_line_error()
    only = await admin("server-key", "retire", "2", "--force")
    assert "only active x25519 key" in only.assert_one_line_error()

    announced = (await admin("--json", "server-key", "announce", "3", "--batch", "1")).json()
    assert (announced["told"], announced["skipped"]) == (2, 0)
    assert announced["announcement"]["queued"] == 2
    again = (await admin("--json", "server-key", "announce", "3")).json()
    assert again["announcement"]["queued"] == 2  # nobody is told twice

    retiring = (
        await admin("--json", "server-key", "retire", "1", "--deadline", "4000000000")
    ).json()
    assert (retiring["status"], retiring["retire_after"]) == ("retiring", 4_000_000_000)
    text = (await admin("server-key", "list")).stdout.splitlines()
    assert text[0].split() == ["SKID", "SUITE", "STATUS", "RETIRE", "AFTER", "ANNOUNCEMENT", "FILE"]
    assert text[1].split()[:3] == ["1", "p256", "retiring"]
    assert text[3].split()[:3] + text[3].split()[-3:] == [
        "3",
        "p256",
        "active",
        "queued",
        "2",
        "yes",
    ]

    store = await open_store(tmp_path)
    try:
        skeys = await store.list_instructions(None, [InstructionState.QUEUED])
        assert {i.module_id for i in skeys if i.kind == "skey"} == {"m1", "m2"}
        body = cbor.decode(skeys[0].body)
        key = DataDir(str(tmp_path / "data")).server_key(3, "p256")
        assert body == {1: 3, 2: "p256", 3: key.public}
        audit = [e.reason for e in await store.list_security_events() if e.category == "audit"]
        assert audit[-4:] == [
            "server-key-added",
            "server-key-announced",
            "server-key-announced",
            "server-key-retiring",
        ]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_announce_refuses_an_unknown_or_retired_key(tmp_path: Path) -> None:
    admin = InProcess(write_config(tmp_path))
    assert (await admin("init")).code == 0
    missing = await admin("server-key", "announce", "9")
    assert "no server key with skid 9" in missing.assert_one_line_error()
    assert (await admin("server-key", "add", "--suite", "p256")).code == 0
    assert (await admin("server-key", "retire", "1", "--force")).code == 0
    retired = await admin("server-key", "announce", "1")
    assert "only an active key is announced" in retired.assert_one_line_error()


@pytest_twisted.ensureDeferred
async def test_gateway_cert_renew_replaces_the_pair(tmp_path: Path) -> None:
    admin = InProcess(write_config(tmp_path))
    assert (await admin("init")).code == 0
    datadir = DataDir(str(tmp_path / "data"))
    cert_path, key_path, _ = datadir.tls_paths
    before = (Path(cert_path).read_bytes(), Path(key_path).read_bytes())
    renewed = (await admin("--json", "gateway-cert", "renew", "--days", "90")).json()
    assert renewed["certificate"] == cert_path
    after = (Path(cert_path).read_bytes(), Path(key_path).read_bytes())
    assert after[0] != before[0] and after[1] != before[1]
    info = datadir.tls_certificate_info()
    assert info["gateway_not_after"] == renewed["not_after"]
    # The pair is consistent: a second init finds it as it is.
    assert (await admin("init")).code == 0
