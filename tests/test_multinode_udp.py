"""
The module listener's socket options (:func:`m2mgw.modules.udp.listen_module_udp`):
``SO_REUSEPORT``, so that several gateway processes on one host share the
module port, and the receive buffer.  Real sockets on 127.0.0.1, except for
the wiring of the configuration, checked on a memory reactor.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from m2mgw.modules.udp import (
    ModuleDatagramProtocol,
    listen_module_udp,
    receive_buffer_size,
)
from m2mgw.service import ModuleListenerService, find_service
from m2mgw.tap import Options, makeService
from tests.doubles import RecordingHandler, UDPMemoryReactor

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="the system has no SO_REUSEPORT"
)


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def listener(name: str) -> ModuleDatagramProtocol:
    return ModuleDatagramProtocol(RecordingHandler(lambda data: name.encode() + b":" + data))


@pytest_twisted.ensureDeferred
async def test_two_listeners_sharing_a_port_both_receive_and_answer() -> None:
    first, second = listener("first"), listener("second")
    ports: list[IListeningPort] = []
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
    try:
        ports.append(listen_module_udp(reactor(), 0, first, "127.0.0.1", reuse_port=True))
        number = ports[0].getHost().port  # type: ignore[attr-defined]
        ports.append(listen_module_udp(reactor(), number, second, "127.0.0.1", reuse_port=True))
        assert ports[1].getHost().port == number  # type: ignore[attr-defined]
        # The kernel picks a socket by the source address: many sources reach both.
        for index, client in enumerate(clients):
            client.sendto(b"%d" % index, ("127.0.0.1", number))
        deadline = time.monotonic() + 5
        while first.counters.received + second.counters.received < len(clients):
            assert time.monotonic() < deadline, "datagrams went missing"
            await deferLater(reactor(), 0.01, lambda: None)
        assert first.counters.received > 0 and second.counters.received > 0
        # Each answer comes back from the shared port, from the process that got it.
        for index, client in enumerate(clients):
            assert select.select([client], [], [], 5)[0]
            answer, source = client.recvfrom(2048)
            assert source == ("127.0.0.1", number)
            assert answer in (b"first:%d" % index, b"second:%d" % index)
        assert first.counters.answered + second.counters.answered == len(clients)
    finally:
        for client in clients:
            client.close()
        for port in ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_port_is_shared_only_if_every_listener_asks() -> None:
    plain = listen_module_udp(reactor(), 0, listener("plain"), "127.0.0.1")
    try:
        number = plain.getHost().port  # type: ignore[attr-defined]
        with pytest.raises(CannotListenError):
            listen_module_udp(reactor(), number, listener("shared"), "127.0.0.1", reuse_port=True)
    finally:
        await plain.stopListening()
    shared = listen_module_udp(reactor(), 0, listener("shared"), "127.0.0.1", reuse_port=True)
    try:
        number = shared.getHost().port  # type: ignore[attr-defined]
        with pytest.raises(CannotListenError):
            listen_module_udp(reactor(), number, listener("plain"), "127.0.0.1")
    finally:
        await shared.stopListening()


@pytest.mark.parametrize("reuse_port", [False, True])
@pytest_twisted.ensureDeferred
async def test_the_receive_buffer_is_set(reuse_port: bool) -> None:
    small = listen_module_udp(
        reactor(), 0, listener("x"), "127.0.0.1", reuse_port=reuse_port, receive_buffer=8192
    )
    large = listen_module_udp(
        reactor(), 0, listener("y"), "127.0.0.1", reuse_port=reuse_port, receive_buffer=1 << 20
    )
    try:
        small_size, large_size = receive_buffer_size(small), receive_buffer_size(large)
        assert small_size is not None and large_size is not None
        # Linux reports twice the value set, and caps it at net.core.rmem_max.
        assert 8192 <= small_size < large_size
    finally:
        await small.stopListening()
        await large.stopListening()


def test_the_configuration_reaches_the_listener(tmp_path: Path) -> None:
    (tmp_path / "gw.conf").write_text(
        "[apps]\nkey_type = ec\n[gateway]\nsuites = p256\n"
        "[modules]\nreuse_port = yes\nreceive_buffer = 65536\n",
        encoding="utf-8",
    )
    options = Options()
    options.parseOptions(
        ["-c", str(tmp_path / "gw.conf"), "--data-dir", str(tmp_path / "data"),
         "--store", "memory", "--module-address", "127.0.0.1", "--module-port", "0"]
    )  # fmt: skip
    memory = UDPMemoryReactor()
    root = makeService(options, memory)
    service = find_service(root, "modules")
    assert isinstance(service, ModuleListenerService)
    assert (service.reuse_port, service.receive_buffer) == (True, 65536)

    # Binding adopts a socket made here (listenUDP cannot set SO_REUSEPORT).
    service.privilegedStartService()
    try:
        ((_, family, protocol, max_packet),) = memory.adoptedPorts
        assert (family, protocol, max_packet) == (socket.AF_INET, service.protocol, 1473)
        assert memory.udpPorts == []
    finally:
        service.stopService()
