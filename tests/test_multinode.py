"""
A set of servers: two and three real gateway processes (``twistd -n m2mgw``)
on 127.0.0.1 sharing one module database (see ``tests/multinode_helpers.py``).

- an instruction an application submits on one node rides in the reply of
  another, and the application on the first node gets ``confirmed`` promptly;
- a session opened on one node is served by the others, with no new HELLO;
- a datagram accepted on one node and replayed to another gets no reply, and
  of two HELLOs with the same ``ts`` sent at once to two nodes one is accepted;
- a node that committed a DATA and died before replying: the other node is
  silent to the same bytes, and the module's re-send under a new ``ctr`` is
  answered and applied once;
- ``kill -9`` of a node in the middle of traffic, the modules failing over by
  their next gateway address or through a port the nodes share
  (``SO_REUSEPORT``): no new HELLO, and nothing lost or done twice, counted
  end to end.

Every test runs on each shared store (``shared_store``): SQLite (one WAL file
opened by every process) and PostgreSQL (``tests/conftest.py`` starts a
throwaway server, or skips these with the reason when there is none).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from m2mgw.client.module import ModuleEndpoint
from m2mgw.client.transport import RetryPolicy
from m2mgw.interfaces import IModuleStore
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import Payload, instruction_wire_size
from m2mgw.protocol.messages import HelloReply, parse_reply
from m2mgw.records import InstructionState, Module, NewInstruction
from tests.multinode_helpers import PSK, Cluster, ModuleRunner, SharedStore, exchange
from tests.test_apps_e2e import AppConnection
from tests.test_e2e_modules import module

pytestmark = pytest.mark.slow

#: The application the test modules belong to.
APP = "billing"
#: Short waits: the nodes are on this host.
FAST = RetryPolicy(timeout=0.3, backoff=2.0, max_timeout=2.0)

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="module", params=BACKENDS)
def shared_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[], SharedStore]:
    """Makes a new, empty shared database of the backend under test, per call."""
    backend: str = request.param
    if backend == "postgres":
        # tests/conftest.py: started here, or given by the environment; skipped without one.
        server = request.getfixturevalue("postgres_server")
        return lambda: SharedStore("postgres", {"dsn": server.new_database()})

    def new() -> SharedStore:
        folder = tmp_path_factory.mktemp(backend)
        # normal is durable across a process crash (kill -9), not a power cut: enough here.
        return SharedStore(
            "sqlite", {"path": str(folder / "shared.sqlite"), "synchronous": "normal"}
        )

    return new


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


async def open_store(cluster: Cluster) -> IModuleStore:
    """The shared database, opened by the test process (a third writer, as m2mgw-admin is)."""
    store = cluster.store.open(str(cluster.datadir.path), reactor())
    await store.open()
    return store


def instruction(module_id: str, n: int) -> NewInstruction:
    body = {"n": n}
    return NewInstruction(
        module_id, "set", cbor.encode(body), wire_size=instruction_wire_size("set", body)
    )


def readings(reports: list[Any]) -> list[int]:
    """The ``v`` of every stored report (each test reading is ``[{0: "seq", 2: v}]``)."""
    return sorted(int(cbor.decode(report.data)[0][2]) for report in reports)


@pytest.fixture(scope="module")
def trio(
    shared_store: Callable[[], SharedStore], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Three nodes, a, b and c, for the tests that kill none."""
    cluster = Cluster(tmp_path_factory.mktemp("trio"), shared_store())
    try:
        cluster.start("a", "b", "c")
        yield cluster
    finally:
        cluster.stop()


# -- cooperation ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_submitted_on_one_node_delivered_and_confirmed_through_another(
    trio: Cluster, tmp_path: Path
) -> None:
    a, b = trio.nodes["a"], trio.nodes["b"]
    store = await open_store(trio)
    runner = ModuleRunner(trio.datadir, "meter-x", [b.address], reactor(), FAST)
    cert, key = trio.datadir.issue_app_cert(APP, str(tmp_path / "app"), key_type="ec")
    app: AppConnection = await threads.deferToThread(
        AppConnection, a.app_port, cert, key, trio.datadir.tls_paths[2]
    )
    try:
        await store.add_modules([Module("meter-x", psk=PSK)], apps={"meter-x": [APP]})
        await threads.deferToThread(app.ok, "subscribe")
        queued = await threads.deferToThread(
            app.ok, "submit", module="meter-x", kind="set", body={"n": 7}, ttl=600
        )
        assert queued["state"] == "queued"

        result = await runner.wake()  # through b only
        assert result.ok and [i.iid for i in result.instructions] == [queued["iid"]]
        assert runner.executed == {7: 1}
        answered = time.monotonic()

        def confirmed(event: dict[str, Any]) -> bool:
            payload = event["payload"]
            return bool(event["event"] == "instruction" and payload["state"] == "confirmed")

        event = await threads.deferToThread(app.wait_event, confirmed)
        latency = time.monotonic() - answered
        assert event["payload"]["iid"] == queued["iid"] and event["payload"]["status"] == 0
        states = [e["payload"]["state"] for e in app.events if e["event"] == "instruction"]
        assert states[-2:] == ["sent", "confirmed"] and states.count("confirmed") == 1
        # Node a learns of b's events by polling the outbox ([apps]
        # event_poll_interval = 0.2 here): well under a second.
        assert latency < 5.0, latency
        print(f"confirmed event on node a {latency * 1000:.0f} ms after b's reply")
    finally:
        await threads.deferToThread(app.close)
        await runner.close()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_session_opened_on_one_node_is_served_by_the_others(trio: Cluster) -> None:
    store = await open_store(trio)
    await store.add_modules([Module("meter-s", psk=PSK)])
    nodes = [trio.nodes[name] for name in ("a", "b", "c")]
    runners = [
        ModuleRunner(trio.datadir, "meter-s", [node.address], reactor(), FAST) for node in nodes
    ]
    endpoint = runners[0].endpoint
    try:
        assert (await runners[0].wake()).ok  # HELLO and DATA on a
        session = endpoint.state.session
        assert session is not None and runners[0].hellos_since(0) == 1
        await store.enqueue(instruction("meter-s", 1), int(time.time()))
        for runner in runners[1:]:  # the same module, its state, through b, then c
            runner.endpoint = endpoint
            runner.readings = runners[0].readings
            result = await runner.wake()
            runners[0].readings = runner.readings
            assert result.ok and runner.hellos_since(0) == 0
            assert endpoint.state.session is not None
            assert endpoint.state.session.sid == session.sid
        # The instruction queued meanwhile rode in b's reply, was confirmed through b.
        (done,) = await store.list_instructions("meter-s")
        assert done.state == InstructionState.CONFIRMED
        assert readings(await store.list_reports("meter-s")) == [1, 2, 3]
    finally:
        for runner in runners:
            await runner.close()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_datagram_accepted_on_one_node_replayed_to_another_gets_no_reply(
    trio: Cluster,
) -> None:
    a, b, c = (trio.nodes[name] for name in ("a", "b", "c"))
    store = await open_store(trio)
    await store.add_modules([Module("meter-r", psk=PSK)])
    endpoint = module(trio.datadir, "meter-r", "p256")

    def talk(address: tuple[str, int], datagram: bytes) -> Any:
        return threads.deferToThread(exchange, address, datagram, 1.0)

    try:
        hello = endpoint.build_hello()
        hello_reply = await talk(a.address, hello.datagram)
        assert hello_reply is not None
        assert endpoint.handle_reply(hello_reply, [hello.context]).accepted  # type: ignore[list-item]
        data = endpoint.build_data(Payload(data=[{0: "seq", 2: 1}]))
        reply = await talk(a.address, data.datagram)
        assert reply is not None and endpoint.handle_data_reply(reply).accepted

        # The same bytes: a's reply cache answers them, byte for byte; the
        # other nodes find the counter (and the HELLO's ts) used and stay silent.
        assert await talk(a.address, data.datagram) == reply
        assert await talk(a.address, hello.datagram) == hello_reply
        silences = [
            talk(other.address, datagram)
            for other in (b, c)
            for datagram in (data.datagram, hello.datagram)
        ]
        assert await gatherResults(silences) == [None] * 4
        assert readings(await store.list_reports("meter-r")) == [1]
    finally:
        await store.close()


def _answers(sends: list[tuple[tuple[str, int], bytes]], timeout: float) -> list[bytes | None]:
    """Send every datagram at once, each from its own socket; the answers."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in sends]
    try:
        for sock, (address, datagram) in zip(sockets, sends, strict=True):
            sock.sendto(datagram, address)
        answers: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(sockets) and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(sockets, [], [], left)
            for sock in readable:
                answers[sockets.index(sock)] = sock.recv(2048)
        return [answers.get(index) for index in range(len(sockets))]
    finally:
        for sock in sockets:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_hellos_with_the_same_ts_to_two_nodes_accept_one(trio: Cluster) -> None:
    a, b = trio.nodes["a"], trio.nodes["b"]
    store = await open_store(trio)
    await store.add_modules([Module("meter-h", psk=PSK)])
    state = module(trio.datadir, "meter-h", "p256").state
    frozen = time.time()
    endpoint = ModuleEndpoint(state, clock=lambda: frozen)  # every ts from last_ts + 1
    try:
        for _ in range(3):
            first = endpoint.build_hello()
            state.last_ts -= 1  # a second, different HELLO with the same ts
            second = endpoint.build_hello()
            assert first.context.ts == second.context.ts  # type: ignore[union-attr]
            assert first.datagram != second.datagram
            answers = await threads.deferToThread(
                _answers, [(a.address, first.datagram), (b.address, second.datagram)], 1.0
            )
            accepted = [answer for answer in answers if answer is not None]
            assert len(accepted) == 1, answers
            reply = parse_reply(accepted[0])
            assert isinstance(reply, HelloReply)
            # The one accepted opened the module's one session.
            live = await store.get_module_session("meter-h")
            assert live is not None and live.sid == reply.sid
    finally:
        await store.close()


# -- failover -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_reply_lost_with_its_node_is_recovered_under_a_new_counter(
    shared_store: Callable[[], SharedStore], tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path, shared_store())
    try:
        a, b = cluster.start("a", "b")
        store = await open_store(cluster)
        await store.add_modules([Module("meter-l", psk=PSK)], apps={"meter-l": [APP]})
        runner = ModuleRunner(cluster.datadir, "meter-l", [a.address, b.address], reactor(), FAST)
        try:
            assert (await runner.wake()).ok  # the session, opened on a
            sid = runner.endpoint.state.session.sid  # type: ignore[union-attr]
            exchanges = len(runner.exchanges)
            await store.enqueue(instruction("meter-l", 1), int(time.time()))

            # A DATA a accepts, committing its report and sending the
            # instruction in its reply -- which is lost: a dies at once.
            data = runner.endpoint.build_data(Payload(data=[{0: "seq", 2: 100}]))
            runner._save(runner.endpoint.state)
            lost = await threads.deferToThread(exchange, a.address, data.datagram, 2.0)
            assert lost is not None
            cluster.kill("a")
            (sent,) = await store.list_instructions("meter-l")
            assert sent.state == InstructionState.SENT

            # b never saw the reply: the same bytes fail its replay check.
            assert await threads.deferToThread(exchange, b.address, data.datagram, 1.0) is None

            # The module's retries: the same DataBody under a new counter,
            # to a (dead), then b, which answers it as a duplicate of the
            # first (applied once) and carries the instruction again.
            result = await runner.wake()
            assert result.ok, result
            assert runner.hellos_since(exchanges) == 0
            assert runner.endpoint.state.session.sid == sid  # type: ignore[union-attr]
            assert sorted(runner.acknowledged) == [1, 2, 100]
            assert runner.executed == {1: 1}
            (done,) = await store.list_instructions("meter-l")
            assert done.state == InstructionState.CONFIRMED
            assert readings(await store.list_reports("meter-l")) == [1, 2, 100]
            events = await store.events_after(APP, 0, 1000)
            reported = [e.payload["data"][0]["v"] for e in events if e.kind == "report"]
            assert sorted(reported) == [1, 2, 100]
            states = [e.payload["state"] for e in events if e.kind == "instruction"]
            assert states.count("confirmed") == 1
        finally:
            await runner.close()
            await store.close()
    finally:
        cluster.stop()


async def _traffic(runners: list[ModuleRunner], stop: list[bool], deadline: float) -> None:
    """Every module wakes again and again until ``stop[0]`` or ``deadline``."""

    async def loop(runner: ModuleRunner) -> None:
        while not stop[0] and time.monotonic() < deadline:
            await runner.wake()
            await deferLater(reactor(), 0.02, lambda: None)

    for done in [ensureDeferred(loop(runner)) for runner in runners]:
        await done


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Poll ``condition`` until it holds (true) or ``timeout`` seconds pass (false)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor(), 0.05, lambda: None)
    return True


@pytest.mark.parametrize("failover", ["next-address", "shared-port"])
@pytest_twisted.ensureDeferred
async def test_kill_9_mid_traffic_loses_nothing_and_does_nothing_twice(
    shared_store: Callable[[], SharedStore], tmp_path: Path, failover: str
) -> None:
    if failover == "shared-port":
        # Two nodes on one port: the kernel moves the dead node's modules.
        cluster = Cluster(tmp_path, shared_store(), modules="reuse_port = yes")
        first = cluster.start("a")[0]
        second = cluster.start("b", udp_port=first.udp_port)[0]
        assert second.udp_port == first.udp_port
        for node in (first, second):
            assert any("port shared (SO_REUSEPORT)" in line for line in node.output())
        addresses = [first.address]
    else:
        cluster = Cluster(tmp_path, shared_store())
        cluster.start("a", "b", "c")
        addresses = [node.address for node in cluster.nodes.values()]
    ids = [f"meter-k{index}" for index in range(3)]
    store = await open_store(cluster)
    runners = [ModuleRunner(cluster.datadir, i, addresses, reactor(), FAST) for i in ids]
    stop = [False]
    traffic = None
    try:
        await store.add_modules([Module(i, psk=PSK) for i in ids], apps={i: [APP] for i in ids})
        now = int(time.time())
        for module_id in ids:
            for n in (1, 2):
                await store.enqueue(instruction(module_id, n), now)
        traffic = ensureDeferred(_traffic(runners, stop, time.monotonic() + 45))

        async def acknowledged(count: int) -> bool:
            return all(len(r.acknowledged) >= count for r in runners)

        assert await _until(lambda: acknowledged(4), 20)
        nodes = list(cluster.nodes.values())

        async def status_seen() -> bool:
            return sum(node.datagrams_received() for node in nodes) > 0

        assert await _until(status_seen, 5)
        # The node serving the most (with one address each: the first).
        victim = max(nodes, key=lambda node: node.datagrams_received())
        assert victim.datagrams_received() > 0  # it serves modules (one socket each, one node)
        before = {r.module_id: (len(r.exchanges), r.endpoint.state.session) for r in runners}
        cluster.kill(victim.name)  # mid-traffic: the modules wake every 20 ms
        killed_at = time.monotonic()
        for module_id in ids:
            for n in (3, 4):
                await store.enqueue(instruction(module_id, n), int(time.time()))
        target = {r.module_id: len(r.acknowledged) + 4 for r in runners}

        async def finished() -> bool:
            if not all(len(r.acknowledged) >= target[r.module_id] for r in runners):
                return False
            listed = await store.list_instructions(None)
            return all(i.state == InstructionState.CONFIRMED for i in listed)

        assert await _until(finished, 25), {r.module_id: r.acknowledged for r in runners}
        recovered = time.monotonic() - killed_at
        stop[0] = True
        await traffic

        # -- counted end to end --
        worst = 0.0
        events = await store.events_after(APP, 0, 100_000)
        for runner in runners:
            module_id = runner.module_id
            exchanges_before, session = before[module_id]
            # The session went on: no new HELLO after the kill.
            assert runner.hellos_since(exchanges_before) == 0, module_id
            assert runner.endpoint.state.session is not None and session is not None
            assert runner.endpoint.state.session.sid == session.sid
            # Every acknowledged report is stored, and none twice.
            stored = readings(await store.list_reports(module_id, limit=10_000))
            assert len(stored) == len(set(stored)), module_id
            assert set(runner.acknowledged) <= set(stored), module_id
            # Every report went out as an event, once.
            reported = sorted(
                e.payload["data"][0]["v"]
                for e in events
                if e.kind == "report" and e.module_id == module_id
            )
            assert reported == stored, module_id
            # Every instruction delivered, executed exactly once, confirmed once.
            assert runner.executed == {1: 1, 2: 1, 3: 1, 4: 1}, module_id
            confirmations = [
                e.payload["iid"]
                for e in events
                if e.kind == "instruction"
                and e.module_id == module_id
                and e.payload["state"] == "confirmed"
            ]
            assert sorted(confirmations) == [1, 2, 3, 4], module_id
            worst = max(
                [worst] + [outcome.elapsed for outcome in runner.exchanges[exchanges_before:]]
            )
        retried = sum(
            outcome.sent > 1 for runner in runners for outcome in runner.exchanges
        )  # fmt: skip
        print(
            f"{failover}: killed {victim.name}; all caught up {recovered:.2f} s later; longest "
            f"exchange after the kill {worst:.2f} s; {retried} exchanges needed retries; "
            f"reports acknowledged {sum(len(r.acknowledged) for r in runners)}"
        )
    finally:
        stop[0] = True
        if traffic is not None:
            await traffic
        for runner in runners:
            await runner.close()
        await store.close()
        cluster.stop()
