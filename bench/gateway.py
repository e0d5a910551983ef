"""
The gateway under test, in a process of its own.

``python -m bench.gateway --config FILE [--fleet JSON] [--provision-only]``
builds the service tree exactly as ``twistd m2mgw`` does
(:func:`m2mgw.tap.makeService` on parsed :class:`m2mgw.tap.Options`), starts
it on the global reactor, provisions the fleet in its store if asked, and
prints one JSON line ``{"event": "ready", "port": ..., "server_keys": [...]}``.
It then obeys one command per line on its standard input, answering each
with one JSON line:

- ``stats``: counters, resident size and CPU time (see :func:`gateway_stats`);
- ``profile-start`` / ``profile-stop PATH``: cProfile of the reactor thread,
  written to ``PATH`` (pstats) and ``PATH.txt`` (the top functions);
- ``quit`` (or the end of standard input): stop the services and exit.

With ``--provision-only`` it provisions, stops and exits (the SQLite store
then holds the fleet for a later, clean gateway process).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from dataclasses import asdict
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver

from bench.common import Fleet, cpu_seconds, emit, rss_bytes
from m2mgw import tap
from m2mgw.datadir import DataDir
from m2mgw.service import find_service

reactor: Any = global_reactor

#: Seconds the services get to stop before the process exits anyway.
STOP_TIMEOUT = 30.0


def gateway_stats(root: Any) -> dict[str, Any]:
    """
    What the gateway counted so far, with its resident size and CPU time.

    :param root: the gateway's root service.
    """
    listener: Any = find_service(root, "modules")
    protocol = listener.protocol
    controller = protocol.handler
    store = _store(root)
    stats: dict[str, Any] = {
        "wall": time.monotonic(),
        "rss": rss_bytes(),
        "cpu": cpu_seconds(),
        "answered": dict(controller.answered),
        "drops": dict(controller.drops.by_reason),
        "udp": asdict(protocol.counters),
        "reply_cache": len(controller.replies),
        "session_cache": len(getattr(controller, "_sessions", ())),
        "zss_cache": len(getattr(controller, "_zss", ())),
    }
    if hasattr(store, "transactions"):
        stats["store"] = {"transactions": store.transactions, "operations": store.operations}
        if hasattr(store, "round_trips"):
            # The PostgreSQL store counts its round trips to the server.
            stats["store"]["round_trips"] = store.round_trips
    return stats


def _store(root: Any) -> Any:
    """The store of the gateway's service tree."""
    service: Any = find_service(root, "store")
    return service.store


async def provision(root: Any, fleet: Fleet) -> dict[str, Any]:
    """
    Add the fleet's modules and keys to the gateway's store.

    :return: how many modules and how long it took.
    """
    store = _store(root)
    started = time.monotonic()
    now = int(time.time())
    for modules, keys, apps in fleet.records(now):
        await store.add_modules(modules, keys, apps)
    return {"modules": fleet.count, "keyed": fleet.keyed, "seconds": time.monotonic() - started}


class Control(LineReceiver):
    """The command channel on standard input."""

    delimiter = b"\n"

    def __init__(self, process: GatewayProcess) -> None:
        self.process = process

    def lineReceived(self, line: bytes) -> None:
        """Run one command; a failure is reported, never raised."""
        try:
            self.process.command(line.decode("utf-8").strip())
        except Exception as e:
            emit("error", message=f"{type(e).__name__}: {e}")

    def connectionLost(self, reason: Any = None) -> None:
        """End of standard input: stop."""
        self.process.quit()


class GatewayProcess:
    """The gateway's service tree and the commands that drive it."""

    def __init__(self, options: tap.Options, fleet: Fleet | None, provision_only: bool) -> None:
        self.options = options
        self.fleet = fleet
        self.provision_only = provision_only
        self.root: Any = None
        self.profile: cProfile.Profile | None = None
        self.stopping = False
        self.started = False

    async def start(self) -> None:
        """Build, start, provision, announce (:attr:`started` once done)."""
        config = self.options.gateway_config
        self.root = tap.makeService(self.options, reactor)
        self.root.privilegedStartService()
        await self.root.startService()
        listener: Any = find_service(self.root, "modules")
        port = listener.listening_port()
        if port is None or not find_service(self.root, "store").running:
            emit("error", message="the gateway did not start (see its log)")
            self.quit()
            return
        provisioned = None
        if self.fleet is not None:
            provisioned = await provision(self.root, self.fleet)
        if self.provision_only:
            emit("provisioned", provisioned=provisioned)
            self.quit()
            return
        keys = [
            {"skid": k.skid, "suite": k.suite, "public": k.public.hex()}
            for k in DataDir(config.data_dir).server_keys(config.suites)
        ]
        emit(
            "ready",
            port=port.getHost().port,
            server_keys=keys,
            provisioned=provisioned,
            store=config.store.backend,
            stats=gateway_stats(self.root),
        )
        self.started = True
        stdio.StandardIO(Control(self))

    def give_up(self, seconds: float) -> None:
        """Exit at once if the gateway has not started (or stopped) within ``seconds``."""
        if not self.started and not self.stopping:
            emit("error", message=f"the gateway did not start within {seconds:.0f} s")
            os._exit(3)

    def command(self, line: str) -> None:
        """Run one command line."""
        name, _, argument = line.partition(" ")
        if name == "stats":
            emit("stats", stats=gateway_stats(self.root))
        elif name == "profile-start":
            self.profile = cProfile.Profile()
            self.profile.enable()
            emit("profiling")
        elif name == "profile-stop":
            profile, self.profile = self.profile, None
            if profile is None:
                emit("error", message="not profiling")
                return
            profile.disable()
            profile.dump_stats(argument)
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(45)
            with open(argument + ".txt", "w", encoding="utf-8") as out:
                out.write(text.getvalue())
            emit("profiled", path=argument)
        elif name == "quit":
            self.quit()
        elif name:
            emit("error", message=f"unknown command {name!r}")

    def quit(self) -> None:
        """Stop the services, then the reactor."""
        if self.stopping:
            return
        self.stopping = True
        # A store that cannot close must not keep the process alive.
        reactor.callLater(STOP_TIMEOUT, os._exit, 4)
        stopped: Deferred[Any]
        if self.root is not None and self.root.running:
            stopped = Deferred.fromCoroutine(self._stop())
        else:
            stopped = Deferred()
            stopped.callback(None)
        stopped.addBoth(lambda _: reactor.stop() if reactor.running else None)

    async def _stop(self) -> None:
        await self.root.stopService()
        emit("stopped")


def main(argv: list[str] | None = None) -> int:
    """Run the gateway process until ``quit``."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--config", required=True, help="the gateway configuration file")
    parser.add_argument("--fleet", help="JSON description of the modules to provision")
    parser.add_argument("--provision-only", action="store_true", help="provision, then exit")
    parser.add_argument("--log", help="log file (default: standard error)")
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="exit if not started (and provisioned) within this many seconds",
    )
    args = parser.parse_args(argv)

    log_file: Any = open(args.log, "a", encoding="utf-8") if args.log else sys.stderr  # noqa: SIM115
    observer = FilteringLogObserver(
        textFileLogObserver(log_file),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    options = tap.Options()
    options.parseOptions(["--config", args.config])
    fleet = Fleet.from_json(json.loads(args.fleet)) if args.fleet else None
    process = GatewayProcess(options, fleet, args.provision_only)

    def run() -> None:
        def failed(failure: Any) -> None:
            emit("error", message=failure.getErrorMessage())
            process.quit()

        Deferred.fromCoroutine(process.start()).addErrback(failed)

    reactor.callWhenRunning(run)
    reactor.callLater(args.start_timeout, process.give_up, args.start_timeout)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
