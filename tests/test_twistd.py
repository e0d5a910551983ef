"""
``twistd -n m2mgw`` as a real process: it binds, answers over UDP and mutual
TLS, stops cleanly on SIGTERM, and refuses bad configuration and busy ports
with one line and no traceback.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from m2mgw.datadir import DataDir
from tests.doubles import tls_exchange, udp_exchange

pytestmark = pytest.mark.slow

TWISTD = str(Path(sys.executable).parent / "twistd")
START_TIMEOUT = 30.0


def free_port(kind: int) -> int:
    """A port on 127.0.0.1 that is free right now for ``kind`` (SOCK_DGRAM/SOCK_STREAM)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Gateway:
    """A running ``twistd -n m2mgw`` and its output, read line by line."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> str:
        """The first output line (from now on or already seen) containing ``text``."""
        for line in self.seen:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.seen))
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line

    def rest(self) -> str:
        """All output once the process has exited."""
        self.process.wait(timeout=30)
        time.sleep(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "\n".join(self.seen)


def twistd(*args: str) -> list[str]:
    return [TWISTD, "--pidfile=", "-n", "m2mgw", *args]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "gw.conf").write_text(
        "[apps]\nkey_type = ec\n[jobs]\nhousekeeping_interval = 0.2\n", encoding="utf-8"
    )
    return tmp_path


def start(workdir: Path, udp_port: int, tls_port: int) -> Gateway:
    command = twistd(
        "--config",
        "gw.conf",
        "--data-dir",
        "data",
        "--module-address",
        "127.0.0.1",
        "--module-port",
        str(udp_port),
        "--app-address",
        "127.0.0.1",
        "--app-port",
        str(tls_port),
    )
    process = subprocess.Popen(
        command,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return Gateway(process)


@pytest.fixture
def running(workdir: Path) -> Iterator[tuple[Gateway, int, int]]:
    udp_port, tls_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    gateway = start(workdir, udp_port, tls_port)
    try:
        yield gateway, udp_port, tls_port
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait(timeout=10)


def test_serves_udp_and_tls_and_stops_cleanly_on_sigterm(
    workdir: Path, running: tuple[Gateway, int, int]
) -> None:
    gateway, udp_port, tls_port = running
    data = workdir / "data"
    gateway.wait_for(f"data directory {data}")
    gateway.wait_for(f"listening for modules (UDP) on 127.0.0.1 port {udp_port}")
    gateway.wait_for(f"listening for application servers (TLS) on 127.0.0.1 port {tls_port}")
    gateway.wait_for("store sqlite is open")

    # First start created the data directory: keys private, directories closed.
    assert os.stat(data).st_mode & 0o777 == 0o700
    for key in (data / "keys").glob("server-*.pem"):
        assert os.stat(key).st_mode & 0o777 == 0o600
    assert os.stat(data / "tls" / "gateway-key.pem").st_mode & 0o777 == 0o600
    assert (data / "m2mgw.sqlite").exists()

    # UDP: reached (the status line counts it), and silent without an engine.
    assert udp_exchange("127.0.0.1", udp_port, b"\x85\x01\x03\x46abcdef\x01\x40", 0.3) is None
    gateway.wait_for("datagrams: 1 received, 0 answered, 1 unanswered")

    # Mutual TLS with a client certificate issued by the gateway's application CA.
    cert, key = DataDir(str(data)).issue_app_cert("billing", str(workdir / "client"), key_type="ec")
    _, _, ca = DataDir(str(data)).tls_paths
    answers = tls_exchange(
        "127.0.0.1", tls_port, cert, key, ca, [{"id": 1, "op": "hello"}, {"id": 2, "op": "x"}]
    )
    assert answers[0]["ok"] is True and answers[0]["id"] == 1
    assert answers[0]["result"]["version"] == 1
    assert answers[0]["result"]["principal"] == "billing"
    assert answers[1]["error"]["code"] == "unknown-op"

    stopping = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    gateway.process.wait(timeout=10)
    assert time.monotonic() - stopping < 5
    output = gateway.rest()
    # twistd shuts down, then re-raises SIGTERM so supervisors see why it ended.
    assert gateway.process.returncode == -signal.SIGTERM
    assert "store sqlite is closed" in output
    assert "Server Shut Down." in output
    assert "Traceback" not in output
    assert "PRIVATE KEY" not in output
    assert output.index("store sqlite is closed") > output.index(f"UDP Port {udp_port} Closed")


def run_to_exit(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twistd(*args),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_config_is_one_line_and_no_traceback(workdir: Path) -> None:
    (workdir / "bad.conf").write_text("[modules]\nport = 99999\n", encoding="utf-8")
    result = run_to_exit(workdir, "--config", "bad.conf", "--data-dir", "data")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.endswith(
        "bad.conf: [modules] port = '99999': not a port number (1-65535, or 0 for any free port)"
    )
    assert not (workdir / "data").exists()  # nothing was started or created


def test_unknown_store_lists_the_known_ones(workdir: Path) -> None:
    result = run_to_exit(workdir, "--store", "cassandra", "--data-dir", "data")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .endswith(
            "command line: [store] backend: unknown store 'cassandra'"
            " (known: memory, postgres, sqlite)"
        )
    )


@pytest.mark.parametrize("kind", ["udp", "tls"])
def test_port_in_use_is_one_line_and_no_traceback(workdir: Path, kind: str) -> None:
    busy_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, busy_type) as busy:
        busy.bind(("127.0.0.1", 0))
        if kind == "tls":
            busy.listen()
        port = busy.getsockname()[1]
        udp_port = port if kind == "udp" else free_port(socket.SOCK_DGRAM)
        tls_port = port if kind == "tls" else free_port(socket.SOCK_STREAM)
        gateway = start(workdir, udp_port, tls_port)
        output = gateway.rest()
    assert gateway.process.returncode == 1
    assert "Traceback" not in output
    what = "modules (UDP)" if kind == "udp" else "application servers (TLS)"
    message = f"m2mgw: cannot listen for {what} on 127.0.0.1 port {port}: Address already in use"
    assert [line for line in output.splitlines() if "cannot listen" in line] == [
        line for line in output.splitlines() if line.endswith(message)
    ]
    assert any(line.endswith(message) for line in output.splitlines())
    assert "store sqlite is open" not in output


def test_unusable_key_file_is_one_line_and_no_traceback(workdir: Path) -> None:
    data = workdir / "data"
    DataDir(str(data)).ensure(["p256", "p256-ccm8", "p384", "x25519", "rsa"], tls_key_type="ec")
    key = data / "tls" / "gateway-key.pem"
    key.write_text("not a key\n")
    result = run_to_exit(workdir, "--config", "gw.conf", "--data-dir", "data")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("m2mgw: ")
    ]
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(key) in result.stderr


def test_twistd_lists_the_plugin(workdir: Path) -> None:
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert any(line.split()[:1] == ["m2mgw"] for line in result.stdout.splitlines())
