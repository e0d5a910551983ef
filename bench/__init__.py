"""
Benchmarks of m2mgw that print ratios measured in one run (issue 3).

Run them with ``python -m bench.run`` (``--quick`` for a short smoke run,
``--only NAME`` for one benchmark); ``bench/RESULTS.md`` records the figures
measured on the project's machine.

- :mod:`bench.run`: the orchestrator; starts the processes below, prints the tables.
- :mod:`bench.gateway`: the gateway's real service tree (``m2mgw.tap.makeService``)
  in a process of its own, driven over its standard input.
- :mod:`bench.echo`: a bare Twisted UDP echo server, the yardstick.
- :mod:`bench.loadgen`: the closed-loop load generator (pre-built datagrams,
  plain non-blocking sockets and :mod:`selectors`).
- :mod:`bench.crypto_limit`: the per-core limit of a HELLO's public-key crypto.
- :mod:`bench.wire`: bytes on the wire, built in-process with the module client
  and the gateway engine.
- :mod:`bench.common`: what they share (the module fleet, the line protocol,
  process facts).
"""
