"""
Smoke tests of ``bench/cluster.py``: its pieces run, quickly, with no timing assertion.

The benchmark itself runs with ``python -m bench.cluster``; these tests make
sure that its load generator (one socket per slot, so that nodes sharing a
port by ``SO_REUSEPORT`` each get their share) opens sessions and matches
DATA replies over real sockets on 127.0.0.1, that the configurations it
writes are ones the gateway accepts, and that its summary computes the
figures of issue 6 from what was measured.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import cluster, loadgen
from bench.common import Fleet, cipher_suite
from m2mgw.config import ProtocolPolicy, load_config
from tests.test_bench_smoke import SEED, _gateway, fired


class _Server:
    """A UDP server thread answering ``answer(datagram, source)`` and noting every source."""

    def __init__(self, answer: Callable[[bytes, Any], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.answer = answer
        self.sources: list[Any] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def _serve(self) -> None:
        while self.running:
            try:
                datagram, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self.sources.append(addr)
            reply = self.answer(datagram, addr)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def udp_server() -> Iterator[Callable[[Callable[[bytes, Any], bytes | None]], _Server]]:
    servers: list[_Server] = []

    def start(answer: Callable[[bytes, Any], bytes | None]) -> _Server:
        server = _Server(answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_settings() -> None:
    quick = cluster.Settings.make(True, None, 64, None)
    full = cluster.Settings.make(False, None, 64, None)
    assert quick.duration < full.duration and quick.modules < full.modules
    assert quick.stats_delay < full.stats_delay == cluster.PG_STATS_DELAY
    assert cluster.Settings.make(False, 3.0, 8, 0.0).duration == 3.0
    assert (
        cluster.PG_SETTINGS["fsync"] == "on" and cluster.PG_SETTINGS["synchronous_commit"] == "on"
    )


def test_each_slot_owns_its_modules() -> None:
    owned = cluster.owned_modules(10, 4)
    assert owned == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert cluster.owned_modules(3, 3) == [[0], [1], [2]]


def test_slot_phase_uses_one_source_address_per_slot(
    udp_server: Callable[[Callable[[bytes, Any], bytes | None]], _Server],
) -> None:
    suite = cipher_suite("p256")
    per_module = [
        loadgen.build_session_data(suite, bytes([m]) * 6, bytes(16), bytes(16), 1, 3, 16)
        for m in range(4)
    ]
    dropped = {per_module[0][1].datagram}
    server = udp_server(lambda datagram, _: None if datagram in dropped else datagram)
    sockets = cluster.slot_sockets(server.address, 2)
    try:
        owned = cluster.owned_modules(4, 2)
        orders = [loadgen.interleave([per_module[i] for i in modules], 1)[0] for modules in owned]
        result = cluster.run_slot_phase(
            sockets,
            orders,
            cluster._data_datagram,
            cluster._echo_accept,
            duration=None,
            timeout=0.2,
        )
        assert (result.sent, result.answered, result.lost, result.stale) == (12, 11, 1, 0)
        # Slot 0 sent modules 0 and 2, slot 1 modules 1 and 3: two source ports only.
        assert {addr[1] for addr in server.sources} == {sock.getsockname()[1] for sock in sockets}
    finally:
        for sock in sockets:
            sock.close()


def test_warm_up_and_data_against_the_engine_over_udp(
    udp_server: Callable[[Callable[[bytes, Any], bytes | None]], _Server],
) -> None:
    fleet = Fleet(count=5, keyed=5, suite="p256", seed=SEED)
    controller, server_keys = _gateway(fleet, ProtocolPolicy())
    server = udp_server(lambda datagram, addr: fired(controller.handle(datagram, addr)))
    job = loadgen.Job.from_json(
        json.loads(
            json.dumps(
                {
                    "mode": "data",
                    "target": list(server.address),
                    "fleet": fleet.to_json(),
                    "modules": 5,
                    "server_keys": server_keys,
                    "window": 2,
                    "duration": None,
                    "timeout": 2.0,
                    "per_module": 3,
                    "verify_every": 1,
                }
            )
        )
    )
    phase, info = cluster.prepare(job)
    assert info["warm_up"]["warm"] == 5 and info["built"] == 15
    result = phase()
    assert (result.sent, result.answered, result.lost) == (15, 15, 0)
    assert (result.verified, result.verify_failures) == (15, 0)
    assert controller.answered["hello"] == 5 and controller.answered["data"] == 15


def test_configurations_are_accepted(tmp_path: Path) -> None:
    conf = tmp_path / "node.conf"
    dsn = "host=/tmp/x port=5432 user=postgres dbname=postgres options='-csearch_path=s1'"
    cluster.write_config(
        str(conf), str(tmp_path / "d"), "pg2-2", "postgres", dsn, 40000, reuse_port=True
    )
    config = load_config(str(conf))
    assert config.modules.reuse_port and config.modules.port == 40000
    assert config.store.backend == "postgres" and config.store.options["dsn"] == dsn
    assert config.protocol.sign_replies and config.node_name == "pg2-2"
    cluster.write_config(str(conf), str(tmp_path / "d"), "sqlite-1", "sqlite")
    config = load_config(str(conf))
    assert config.store.backend == "sqlite" and not config.modules.reuse_port


def test_thread_cpu_splits_the_main_thread_from_the_others() -> None:
    spun, done = threading.Event(), threading.Event()

    def spin() -> None:
        deadline = time.thread_time() + 0.1
        while time.thread_time() < deadline:
            pass
        spun.set()
        done.wait(5)

    worker = threading.Thread(target=spin)
    before = cluster.thread_cpu(os.getpid())
    worker.start()
    try:
        assert spun.wait(5)
        # Read while the worker lives: an ended thread leaves /proc/PID/task.
        after = cluster.thread_cpu(os.getpid())
    finally:
        done.set()
        worker.join(5)
    assert after[1] > before[1] and after[0] >= before[0]
    assert cluster.thread_cpu(2**22 + 12345) == (0.0, 0.0)


def test_database_cpu_is_only_measured_for_our_cluster(tmp_path: Path) -> None:
    assert cluster.PostgresServer("dbname=x", "elsewhere").cpu() is None
    pid_file = tmp_path / "postmaster.pid"
    # This process stands for the postmaster: its CPU time is counted.
    pid_file.write_text(f"{os.getpid()}\n")
    cpu = cluster.PostgresServer("dbname=x", "ours", str(pid_file)).cpu()
    assert cpu is not None and cpu > 0


def _measured(rate: float, data: int, cpu: float, **store: int) -> dict[str, Any]:
    return {
        "result": {"rate": rate},
        "data": data,
        "per_server_cpu_second": rate / cpu,
        "echo_rate": 100_000.0,
        "echo_ratio": rate / 100_000.0,
        "cpu": {"nodes": [cpu], "servers": cpu, "database": 0.3, "loadgen": 0.1, "others": 0.0},
        "store": store,
        "transactions_per_datagram": store.get("transactions", 0) / data,
        "round_trips_per_datagram": store["round_trips"] / data if "round_trips" in store else None,
    }


def test_cpu_per_datagram() -> None:
    measured = _measured(2000.0, 20_000, 0.8, transactions=1)
    measured["result"]["elapsed"] = 10.0
    cost = cluster.cpu_per_datagram(measured)
    # 0.8 CPU for 10 s over 20,000 DATA; the database 0.3 CPU.
    assert cost is not None
    assert (cost["nodes"], cost["database"], cost["total"]) == pytest.approx((400.0, 150.0, 550.0))
    measured["cpu"]["database"] = None
    measured["threads"] = [6.0, 2.0]
    cost = cluster.cpu_per_datagram(measured)
    assert cost is not None and cost["database"] is None
    assert (cost["total"], cost["reactor_thread"], cost["other_threads"]) == pytest.approx(
        (400.0, 300.0, 100.0)
    )
    measured["data"] = 0
    assert cluster.cpu_per_datagram(measured) is None


def test_summary_figures_and_verdicts() -> None:
    runs = {
        "sqlite": _measured(4000.0, 40_000, 1.0, transactions=1000),
        "pg1": _measured(2400.0, 24_000, 0.8, transactions=600, round_trips=1200),
        "pg2": _measured(3000.0, 30_000, 1.0, transactions=900, round_trips=1800),
    }
    runs["sqlite"]["cpu_us_per_datagram"] = {"nodes": 250.0, "database": None, "total": 250.0}
    runs["pg1"]["cpu_us_per_datagram"] = {"nodes": 400.0, "database": 100.0, "total": 500.0}
    lines = "\n".join(cluster.summary(runs))
    assert runs["pg1_vs_sqlite_machine_cpu"] == pytest.approx(0.5)
    assert "= 500 µs: PG1 / SQLite per machine CPU-second 0.500" in lines
    assert runs["pg1_vs_sqlite"] == pytest.approx(0.6)
    assert runs["pg2_vs_pg1"] == pytest.approx(1.25)
    assert "PG1 / SQLite: 0.600   target >= 0.50: met" in lines
    assert "round trips per DATA 0.0500   target <= 0.05: met" in lines
    assert "round trips per DATA 0.0600   target <= 0.05: MISSED" in lines
    assert "PG2 / PG1 (1 -> 2 nodes): 1.25" in lines
