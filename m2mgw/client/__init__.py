"""
The module side of MGP/1, as a library a device team can build on.

- :mod:`m2mgw.client.module`: the pure state machine — :class:`ModuleState`
  (what a module remembers) and :class:`ModuleEndpoint` (builds HELLO and
  DATA datagrams, reads the replies, executes and confirms instructions,
  registers keys).  No sockets, no reactor; randomness and clock injected.
- :mod:`m2mgw.client.state`: the state in a file, written atomically, mode 0600.
- :mod:`m2mgw.client.transport`: the retry policy of ``docs/protocol.md`` as a
  pure :class:`~m2mgw.client.transport.Exchange`, driven by a blocking-socket
  transport (a Linux-class device, a script) or a Twisted one (the simulator).
- :mod:`m2mgw.client.cli`: the ``m2mgw-module`` command and the fleet simulator.

And the application side (an application server talking to the gateway over
mutual TLS, ``docs/app-protocol.md``):

- :mod:`m2mgw.client.app`: a Twisted :class:`~m2mgw.client.app.AppClient`
  (reconnects, resumes after the last acknowledged event) and a blocking
  :class:`~m2mgw.client.app.BlockingAppClient` for scripts.
- :mod:`m2mgw.client.appcli`: the ``m2mgw-app`` command.

A minimal device loop::

    from m2mgw.client.module import ModuleEndpoint
    from m2mgw.client.state import StateFile
    from m2mgw.client.transport import BlockingTransport, run_blocking, wake_plan

    store = StateFile("module-state.json")
    endpoint = ModuleEndpoint(store.load(), execute=my_handler)
    with BlockingTransport([("gateway.example", 5740)]) as transport:
        result = run_blocking(transport, wake_plan(endpoint, store.save, data=readings))
"""

from __future__ import annotations

from m2mgw.client.module import (
    ClientError,
    ModuleEndpoint,
    ModuleState,
    Outgoing,
    ReplyOutcome,
    ServerPublicKey,
)

__all__ = [
    "ClientError",
    "ModuleEndpoint",
    "ModuleState",
    "Outgoing",
    "ReplyOutcome",
    "ServerPublicKey",
]
