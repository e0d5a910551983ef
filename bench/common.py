"""
What the benchmark processes share: the module fleet, the JSON-lines control
protocol, and facts about processes and the machine.

The fleet is derived from a seed, so the gateway process (which provisions the
modules' public keys and PSKs in its store) and the load generator (which needs
the private keys) agree without exchanging key material.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from m2mgw.interfaces import ICipherSuite, RandomSource
from m2mgw.records import KeyStatus, Module, ModuleKey
from m2mgw.registry import lookup

#: Bytes of the module PSKs the fleet derives.
PSK_BYTES = 16
#: The kid of a keyed module's one key.
MODULE_KID = 1


@functools.cache
def cipher_suite(name: str) -> ICipherSuite:
    """
    A cipher suite by name, looked up once: :func:`m2mgw.registry.lookup`
    scans the plugins on every call (about a millisecond).
    """
    suite: ICipherSuite = lookup(ICipherSuite, name)
    return suite


def emit(event: str, **fields: Any) -> None:
    """Write one JSON line ``{"event": event, ...}`` to standard output and flush it."""
    sys.stdout.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


def derived_random(seed: bytes, label: bytes, index: int) -> RandomSource:
    """
    A deterministic random source: consecutive bytes of SHAKE-256 over
    ``seed``, ``label`` and ``index``.

    :param seed: the fleet seed.
    :param label: what the bytes are for (``b"key"``, ``b"psk"``).
    :param index: the module number.
    """
    prefix = seed + b"\x00" + label + b"\x00" + index.to_bytes(8, "big")
    position = 0

    def draw(n: int) -> bytes:
        nonlocal position
        stream = hashlib.shake_256(prefix).digest(position + n)
        position += n
        return stream[position - n :]

    return draw


@dataclass(frozen=True)
class Fleet:
    """
    A set of provisioned modules.

    Module ``i`` is called ``f"{prefix}{i:06d}"``.  The first ``keyed`` ones
    have one active module key (``kid`` 1, suite ``suite``, imported by the
    operator) and no PSK; the others only a PSK (provisioned, never seen).
    Every module belongs to the application ``app``, so that its reports are
    queued for it, as in production.

    :ivar seed: hex of the seed every key and PSK is derived from.
    """

    count: int
    keyed: int
    suite: str
    seed: str
    prefix: str = "m"
    app: str | None = "bench-app"

    def __post_init__(self) -> None:
        if not 0 <= self.keyed <= self.count:
            raise ValueError("keyed must be between 0 and count")

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Fleet:
        """The fleet a :meth:`to_json` value describes."""
        return cls(**value)

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible description."""
        return asdict(self)

    def cipher_suite(self) -> ICipherSuite:
        """The suite of the module keys."""
        return cipher_suite(self.suite)

    def module_id(self, index: int) -> str:
        """The identity of module ``index``."""
        return f"{self.prefix}{index:06d}"

    def private_key(self, index: int) -> Any:
        """The private key of keyed module ``index``."""
        seed = bytes.fromhex(self.seed)
        return self.cipher_suite().generate_signing_key(derived_random(seed, b"key", index))

    def psk(self, index: int) -> bytes:
        """The PSK of an unkeyed module ``index``."""
        return derived_random(bytes.fromhex(self.seed), b"psk", index)(PSK_BYTES)

    def records(
        self, now: int, chunk: int = 5000
    ) -> Iterator[tuple[list[Module], list[ModuleKey], dict[str, list[str]]]]:
        """
        The store records of every module, ``chunk`` modules at a time:
        ``(modules, keys, applications by module)``.

        :param now: the creation time recorded.
        """
        suite = self.cipher_suite()
        for start in range(0, self.count, chunk):
            modules: list[Module] = []
            keys: list[ModuleKey] = []
            for index in range(start, min(self.count, start + chunk)):
                module_id = self.module_id(index)
                if index < self.keyed:
                    modules.append(Module(module_id, created_at=now))
                    public = bytes(suite.signing_public(self.private_key(index)))
                    keys.append(
                        ModuleKey(
                            module_id=module_id,
                            kid=MODULE_KID,
                            suite=self.suite,
                            public=public,
                            status=KeyStatus.ACTIVE,
                            created_at=now,
                            activated_at=now,
                        )
                    )
                else:
                    modules.append(Module(module_id, psk=self.psk(index), created_at=now))
            apps = {} if self.app is None else {m.module_id: [self.app] for m in modules}
            yield modules, keys, apps


def rss_bytes(pid: int | str = "self") -> int:
    """The resident set size of a process (``VmRSS`` of ``/proc/<pid>/status``), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds() -> float:
    """User plus system CPU time of this process (all threads), in seconds."""
    times = os.times()
    return times.user + times.system


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` percentile (nearest rank) of already sorted values; ``None`` if empty."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or the platform's guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_cpu() -> tuple[float, float, float]:
    """
    ``(busy, interrupts, steal)``: CPU seconds since boot the whole machine
    spent running processes (user and system time, every process), handling
    interrupts (the loopback network stack runs there, charged to no
    process), and stolen by the hypervisor (``/proc/stat``).
    """
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system) / ticks, (irq + softirq) / ticks, steal / ticks


def machine_facts() -> dict[str, Any]:
    """The machine a run measured: CPUs, model, Python, load, the date."""
    load = os.getloadavg()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg": [round(value, 2) for value in load],
    }
