"""
A simulated fleet of 1 000 modules rotates every key with zero lost reports,
as ``m2mgw-module simulate`` reports it: the fleet simulator (one real UDP
socket per module, the Twisted transport, state files) against the MGP/1
engine on 127.0.0.1, in one process.  The rotation is the policy's: the
rotation job, on the gateway's injected clock, finds every key too old.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest_twisted

from m2mgw.client.cli import build_parser, simulate
from m2mgw.client.module import ModuleKeyPair, ModuleState
from m2mgw.client.state import StateFile
from m2mgw.config import RotationConfig, RotationPolicy
from m2mgw.keys.rotation import RotationJob
from m2mgw.records import VOUCHED_BY_OPERATOR, KeyStatus, Module, ModuleKey
from tests.key_lifecycle_helpers import SUITES, start_gateway
from tests.test_client_cli import server_keys_json

MODULES = 1000
DAY = 86400
#: Simulator runs at most (one is enough unless the machine is very slow).
MAX_RUNS = 3


def provision(gw: Any, state_dir: Path) -> tuple[list[Module], list[ModuleKey]]:
    """Modules with a key made at manufacture: state files, and the keys for the gateway."""
    p256 = SUITES["p256"]
    servers = {s.skid: s.public_key() for s in gw.servers}
    modules, keys = [], []
    state_dir.mkdir(mode=0o700)
    for n in range(MODULES):
        module_id = f"sim-{n:05d}"
        private = p256.generate_signing_key()
        state = ModuleState(
            identity=module_id,
            suite="p256",
            keys={1: ModuleKeyPair(1, "p256", bytes(p256.dump_signing_key(private)))},
            server_keys=servers,
            skid=1,
            gateways=[f"127.0.0.1:{gw.port}"],
        )
        StateFile(str(state_dir / f"{module_id}.json"), durable=False).save(state)
        modules.append(Module(module_id))
        keys.append(
            ModuleKey(
                module_id,
                1,
                "p256",
                bytes(p256.signing_public(private)),
                status=KeyStatus.ACTIVE,
                vouched_by=VOUCHED_BY_OPERATOR,
                created_at=gw.now,
                activated_at=gw.now,
            )
        )
    return modules, keys


@pytest_twisted.ensureDeferred
async def test_a_fleet_of_1000_rotates_every_key_with_zero_lost_reports(tmp_path: Path) -> None:
    from twisted.internet import reactor

    gw = await start_gateway(suites=("p256",))
    try:
        state_dir = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path
        state_dir = state_dir / f"m2mgw-fleet-{secrets.token_hex(4)}"
        modules, keys = provision(gw, state_dir)
        await gw.store.add_modules(modules, keys)
        keys_file = tmp_path / "keys.json"
        keys_file.write_text(server_keys_json(*gw.servers))
        csv_file = tmp_path / "fleet.csv"  # the simulator's list; the state files hold the keys
        csv_file.write_text("id,psk\n" + "".join(f"{m.module_id},{'00' * 16}\n" for m in modules))

        # The policy: keys older than 90 days.  A year later, every key is due.
        policy = RotationConfig(
            default=RotationPolicy(rotate_after=90 * DAY, renew_before=0), batch=MODULES
        )
        job = RotationJob(gw.store, policy, gw.params, gw.clock, secrets.token_bytes)
        assert (await job.run()).total == 0
        gw.clock.now += 365 * DAY
        assert dict((await job.run()).queued) == {"age": MODULES}

        totals: dict[str, int] = {"rotated": 0, "sent": 0, "acknowledged": 0, "wakes": 0}
        for _ in range(MAX_RUNS):
            args = build_parser().parse_args(
                [
                    "--json", "--gateway", f"127.0.0.1:{gw.port}", "--timeout", "10",
                    "simulate", "--modules", str(MODULES), "--interval", "10", "--duration", "11",
                    "--csv", str(csv_file), "--server-key", str(keys_file),
                    "--state-dir", str(state_dir), "--confirm-now",
                ]
            )  # fmt: skip
            out, err = io.StringIO(), io.StringIO()
            assert await simulate(args, reactor, out, err) == 0, err.getvalue()
            summary = json.loads(out.getvalue())
            assert summary["failures"] == {}, summary
            assert summary["keys"]["enrolled"] == 0
            totals["rotated"] += summary["keys"]["rotated"]
            totals["sent"] += summary["reports"]["sent"]
            totals["acknowledged"] += summary["reports"]["acknowledged"]
            totals["wakes"] += summary["wakes"]
            if totals["rotated"] == MODULES:
                break

        assert totals["rotated"] == MODULES, totals
        # Zero lost reports: each reading sent was acknowledged, and stored once.
        stored = 0
        for module in modules:
            series = {k.kid: k.status for k in await gw.store.list_keys(module.module_id)}
            assert series == {1: KeyStatus.RETIRED, 2: KeyStatus.ACTIVE}, module.module_id
            stored += len(await gw.store.list_reports(module.module_id, 100))
        assert totals["sent"] == totals["acknowledged"] == stored == totals["wakes"]
        assert gw.controller.drops.total == 0
        assert (await job.run()).total == 0  # every key is young again
    finally:
        await gw.stop()
        for path in state_dir.glob("*.json"):
            path.unlink()
        state_dir.rmdir()
