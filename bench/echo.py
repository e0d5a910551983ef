"""
The yardstick: a bare Twisted UDP echo server in a process of its own.

``python -m bench.echo`` listens on an ephemeral port of 127.0.0.1, prints
``{"event": "ready", "port": ...}`` and sends every datagram back to where it
came from, on the same default reactor the gateway uses.  Commands on standard
input, as for :mod:`bench.gateway`: ``stats`` and ``quit`` (or end of input).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet import stdio
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.basic import LineReceiver

from bench.common import cpu_seconds, emit, rss_bytes

reactor: Any = global_reactor


class Echo(DatagramProtocol):
    """Sends each datagram back to its source."""

    noisy = False

    def __init__(self) -> None:
        self.echoed = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Echo ``datagram``."""
        assert self.transport is not None
        self.transport.write(datagram, addr)
        self.echoed += 1


class Control(LineReceiver):
    """``stats`` and ``quit`` on standard input."""

    delimiter = b"\n"

    def __init__(self, echo: Echo) -> None:
        self.echo = echo

    def lineReceived(self, line: bytes) -> None:
        """Run one command."""
        command = line.decode("utf-8").strip()
        if command == "stats":
            emit(
                "stats",
                stats={
                    "wall": time.monotonic(),
                    "cpu": cpu_seconds(),
                    "rss": rss_bytes(),
                    "answered": {"echo": self.echo.echoed},
                },
            )
        elif command == "quit":
            self.connectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        """Stop the reactor."""
        if reactor.running:
            reactor.stop()


def main() -> int:
    """Serve until ``quit``."""
    echo = Echo()
    port = reactor.listenUDP(0, echo, interface="127.0.0.1", maxPacketSize=1473)

    def ready() -> None:
        emit("ready", port=port.getHost().port, stats={"cpu": cpu_seconds(), "rss": rss_bytes()})
        stdio.StandardIO(Control(echo))

    reactor.callWhenRunning(ready)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
