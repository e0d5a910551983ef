"""
Server key rollover (:mod:`m2mgw.keys.server_rollover`): the retirement
rule, who is told, the operator's steps and their refusals, and the gateway's
side -- the key set the module controller accepts, the ``server-keys`` job
on an injected clock (the deadline path), and the engine signing an ``skey``
that the project's module client accepts.  Memory store, no sockets.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred

from m2mgw.client.module import ModuleEndpoint, ModuleState, ServerPublicKey
from m2mgw.config import ProtocolPolicy
from m2mgw.crypto.ec import P256
from m2mgw.datadir import DataDir, LoadedServerKey
from m2mgw.interfaces import ICipherSuite
from m2mgw.keys.server_rollover import (
    SKEY_SOURCE,
    RolloverRefused,
    ServerKeyRollover,
    announce,
    announcement_key,
    begin_retirement,
    module_uses_suite,
    retire_due_keys,
    retirement_reason,
    signature_allowance,
    skey_instruction,
)
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import KIND_SKEY, InstructionItem
from m2mgw.protocol.drops import DropReason
from m2mgw.protocol.engine import ModuleController
from m2mgw.records import (
    InstructionState,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
    ServerKey,
    ServerKeyStatus,
    Session,
)
from m2mgw.registry import all_plugins
from m2mgw.service import PeriodicJob, ReloadService
from m2mgw.store.memory import MemoryStore
from m2mgw.tls import ReloadableServerTLS, app_server_tls_options
from tests.doubles import fired

NOW = 1_700_000_000
PSK = bytes(range(7, 39))
ADDR = ("192.0.2.7", 4000)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (the memory store is synchronous)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def run(coroutine: Any) -> Any:
    return result_of(Deferred.fromCoroutine(coroutine))


def record(skid: int, suite: str = "p256", status: ServerKeyStatus = ServerKeyStatus.ACTIVE,
           retire_after: int | None = None) -> ServerKey:  # fmt: skip
    return ServerKey(skid, suite, b"\x04" + bytes([skid]) * 64, None, status, NOW, retire_after)


def memory_store() -> MemoryStore:
    store = MemoryStore()
    result_of(store.open())
    return store


# -- the retirement rule ---------------------------------------------------------------------


RETIRING = ServerKeyStatus.RETIRING


@pytest.mark.parametrize(
    ("key", "successors", "outstanding", "now", "expected"),
    [
        (record(1, status=RETIRING), [record(2)], 0, NOW, "confirmed"),
        (record(1, status=RETIRING), [record(2)], 3, NOW, None),
        (record(1, status=RETIRING, retire_after=NOW), [record(2)], 3, NOW, "deadline"),
        (record(1, status=RETIRING, retire_after=NOW + 1), [record(2)], 3, NOW, None),
        # The last key of a suite is never retired, deadline or not.
        (record(1, status=RETIRING, retire_after=NOW - 9), [], 0, NOW, None),
        # Only a retiring key is retired.
        (record(1), [record(2)], 0, NOW, None),
        (record(1, status=ServerKeyStatus.RETIRED), [record(2)], 0, NOW, None),
    ],
)
def test_retirement_rule(
    key: ServerKey, successors: list[ServerKey], outstanding: int, now: int, expected: str | None
) -> None:
    assert retirement_reason(key, successors, outstanding, now) == expected


def _key(suite: str, status: KeyStatus) -> ModuleKey:
    return ModuleKey("m", 1, suite, b"k", status)


def _session(suite: str) -> Session:
    return Session(b"s" * 6, "m", 0, suite, 1, b"u" * 16, b"d" * 16, NOW, NOW + 60)


@pytest.mark.parametrize(
    ("keys", "session", "expected"),
    [
        ([_key("p256", KeyStatus.ACTIVE)], None, True),
        ([_key("p384", KeyStatus.ACTIVE)], _session("p256"), False),
        ([_key("p384", KeyStatus.ACTIVE), _key("p256", KeyStatus.PENDING)], None, True),
        # Retired keys do not count: the session's suite decides, else the module is told.
        ([_key("p384", KeyStatus.RETIRED)], _session("p256"), True),
        ([_key("p384", KeyStatus.RETIRED)], _session("x25519"), False),
        ([], None, True),
    ],
)
def test_who_uses_a_suite(keys: list[ModuleKey], session: Session | None, expected: bool) -> None:
    assert module_uses_suite("p256", keys, session) is expected


def test_skey_instruction_reserves_the_signature() -> None:
    x25519 = ServerKey(5, "x25519", b"a" * 32, b"s" * 32)
    instruction = skey_instruction("m", x25519, 64)
    body = cbor.decode(instruction.body)
    assert body == {1: 5, 2: "x25519", 3: b"a" * 32, 4: b"s" * 32}
    assert (instruction.kind, instruction.source) == (KIND_SKEY, SKEY_SOURCE)
    assert instruction.idempotency_key == announcement_key(5) == "skey:5"
    # What rides in a reply: the body with a 64-byte signature, and the largest iid.
    signed = InstructionItem(2**63, KIND_SKEY, {**body, 5: bytes(64)})
    assert instruction.wire_size >= signed.encoded_size()
    assert instruction.wire_size - signed.encoded_size() < 8


def test_signature_allowance_is_the_largest_signature() -> None:
    suites = all_plugins(ICipherSuite)
    assert signature_allowance([suites["p256"], suites["x25519"]]) == 64
    assert signature_allowance(suites.values()) == max(64, 96, suites["rsa"].signature_len)

    class Big:
        key_size = 3072

    big = LoadedServerKey(9, "rsa", Big(), b"k", None)
    assert signature_allowance([suites["rsa"], suites["p384"]], [big]) == 384


# -- announcing and retiring -----------------------------------------------------------------------


def _fleet(store: MemoryStore) -> None:
    modules = [
        Module("a-enrolled"),
        Module("b-psk-only", psk=PSK),
        Module("c-other-suite"),
        Module("d-disabled", status=ModuleStatus.DISABLED, psk=PSK),
        Module("e-pending-approval", status=ModuleStatus.PENDING_APPROVAL, psk=PSK),
    ]
    keys = [
        ModuleKey("a-enrolled", 1, "p256", b"k", KeyStatus.ACTIVE),
        ModuleKey("c-other-suite", 1, "x25519", b"k", KeyStatus.ACTIVE),
    ]
    result_of(store.add_modules(modules, keys))


def test_announce_tells_each_module_of_the_suite_once() -> None:
    store = memory_store()
    _fleet(store)
    new = record(2)
    seen: list[tuple[int, int]] = []
    result = run(announce(store, new, 64, NOW, batch=2, progress=lambda *a: seen.append(a)))
    assert (result.skid, result.told, result.skipped) == (2, 3, 2)
    assert seen[-1] == (3, 2) and len(seen) == 3  # 5 modules in batches of 2
    told = {
        i.module_id
        for i in result_of(store.list_instructions(None, [InstructionState.QUEUED]))
        if i.kind == KIND_SKEY
    }
    assert told == {"a-enrolled", "b-psk-only", "e-pending-approval"}
    # Again: nothing is queued twice.
    assert run(announce(store, new, 64, NOW + 5)).told == 3
    counts = result_of(store.count_instructions(SKEY_SOURCE, "skey:2"))
    assert counts["queued"] == 3 and sum(counts.values()) == 3


def test_only_an_active_key_is_announced() -> None:
    with pytest.raises(RolloverRefused, match="only an active key"):
        run(announce(memory_store(), record(2, status=RETIRING), 64, NOW))


def test_retirement_refusals() -> None:
    store = memory_store()
    _fleet(store)
    for key in (record(1), record(3, "x25519")):
        result_of(store.add_server_key(key))
    with pytest.raises(RolloverRefused, match="no server key with skid 7"):
        run(begin_retirement(store, 7, NOW))
    with pytest.raises(RolloverRefused, match="only active p256 key"):
        run(begin_retirement(store, 1, NOW))
    result_of(store.add_server_key(record(2)))
    with pytest.raises(RolloverRefused, match="no module was told about skid 2"):
        run(begin_retirement(store, 1, NOW))
    with pytest.raises(RolloverRefused, match="has passed"):
        run(begin_retirement(store, 1, NOW, deadline=NOW, force=True))
    key = run(begin_retirement(store, 1, NOW, force=True))
    assert (key.status, key.retire_after) == (RETIRING, None)
    run(announce(store, record(2), 64, NOW))
    key = run(begin_retirement(store, 1, NOW, deadline=NOW + 60))  # moves the deadline
    assert (key.status, key.retire_after) == (RETIRING, NOW + 60)
    result_of(store.set_server_key_status(1, ServerKeyStatus.RETIRED))
    with pytest.raises(RolloverRefused, match="already retired"):
        run(begin_retirement(store, 1, NOW))


def test_a_key_retires_once_every_module_told_has_answered() -> None:
    store = memory_store()
    _fleet(store)
    for key in (record(1), record(2), record(3, "x25519")):
        result_of(store.add_server_key(key))
    run(announce(store, record(2), 64, NOW))
    run(begin_retirement(store, 1, NOW))
    result_of(store.set_server_key_status(3, RETIRING))  # the only x25519 key: stays
    assert run(retire_due_keys(store, NOW)) == []
    pending = [
        i for i in result_of(store.list_instructions(None, [InstructionState.QUEUED]))
        if i.kind == KIND_SKEY
    ]  # fmt: skip
    # Each module's skey ends (cancelled here; confirmed, failed or expired count the same).
    result_of(store.cancel_instruction(pending[0].module_id, pending[0].iid, NOW))
    result_of(store.cancel_instruction(pending[1].module_id, pending[1].iid, NOW))
    assert run(retire_due_keys(store, NOW)) == []
    result_of(store.cancel_instruction(pending[2].module_id, pending[2].iid, NOW))
    [(retired, reason)] = run(retire_due_keys(store, NOW + 1))
    assert (retired.skid, reason) == (1, "confirmed")
    statuses = {k.skid: k.status for k in result_of(store.list_server_keys())}
    assert statuses == {1: ServerKeyStatus.RETIRED, 2: ServerKeyStatus.ACTIVE, 3: RETIRING}
    [audit] = result_of(store.list_security_events())
    assert (audit.category, audit.reason) == ("audit", "server-key-retired")
    assert audit.detail == "skid 1 (p256): confirmed"


# -- the gateway's side: the controller's key set, on an injected clock ---------------------------


class Gateway:
    """A module controller on a memory store, its keys from a data directory, on a task.Clock."""

    def __init__(self, path: Path) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.datadir = DataDir(str(path), clock=self.clock.seconds)
        self.datadir.ensure(["p256"], tls_key_type="ec")
        self.store = memory_store()
        self.controller = ModuleController(
            self.store, {"p256": P256}, (), ProtocolPolicy(), now=self.clock.seconds
        )
        self.rollover = ServerKeyRollover(
            self.datadir, self.store, self.controller, ["p256"], self.clock.seconds
        )
        self.job = PeriodicJob("server-keys", 60, self.rollover.check, self.clock)

    def public(self, skid: int) -> ServerPublicKey:
        pair = self.datadir.server_key(skid, "p256")
        return ServerPublicKey(pair.skid, pair.suite, pair.public, pair.sig_public)

    def module(self, module_id: str) -> ModuleEndpoint:
        result_of(self.store.add_modules([Module(module_id, psk=PSK)]))
        state = ModuleState(
            identity=module_id, suite="p256", psk=PSK, server_keys={1: self.public(1)}, skid=1
        )
        return ModuleEndpoint(state, clock=self.clock.seconds)

    def hello(self, endpoint: ModuleEndpoint, skid: int | None = None) -> bool:
        endpoint.state.session = None
        sent = endpoint.build_hello(skid=skid)
        reply = result_of(self.controller.handle(sent.datagram, ADDR))
        if reply is None:
            return False
        assert endpoint.handle_hello_reply(reply, sent.context).accepted  # type: ignore[arg-type]
        return True

    def data(self, endpoint: ModuleEndpoint) -> Any:
        sent = endpoint.build_data()
        reply = result_of(self.controller.handle(sent.datagram, ADDR))
        assert reply is not None
        outcome = endpoint.handle_data_reply(reply)
        assert outcome.accepted
        return outcome


def test_no_key_is_accepted_before_the_first_reload(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    endpoint = gateway.module("m1")
    assert not gateway.hello(endpoint)
    assert gateway.controller.drops.by_reason[DropReason.UNKNOWN_SKID.value] == 1
    run(gateway.rollover.reload())
    assert gateway.hello(endpoint)
    # The data directory's key was recorded in the store on the way.
    assert [k.skid for k in result_of(gateway.store.list_server_keys())] == [1]


def test_deadline_retires_a_key_on_the_injected_clock(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.job.startService()  # runs once now: registers and installs skid 1
    sleeper, mover = gateway.module("sleeper"), gateway.module("mover")
    assert gateway.hello(sleeper) and gateway.hello(mover)

    new = gateway.datadir.add_server_key("p256")
    result_of(gateway.store.add_server_key(new))
    run(gateway.rollover.reload())
    assert gateway.rollover.installed is not None
    assert gateway.rollover.installed.accepted == (1, 2)
    assert run(announce(gateway.store, new, 64, NOW)).told == 2
    run(begin_retirement(gateway.store, 1, NOW, deadline=NOW + 600))

    # The mover's next DATA fetches the skey, signed with the key of its session (skid 1).
    outcome = gateway.data(mover)
    [skey] = outcome.instructions
    assert (skey.kind, skey.status) == (KIND_SKEY, 0)
    assert mover.state.skid == 2 and mover.state.server_keys[2] == gateway.public(2)
    gateway.data(mover)  # carries the confirmation
    assert gateway.hello(mover)  # on skid 2 now
    assert result_of(gateway.store.get_module_session("mover")).skid == 2

    # The sleeper wakes once more on the old key, but its confirmation never
    # arrives: at the deadline the old key is retired anyway.
    gateway.clock.advance(599)
    statuses = {k.skid: k.status for k in result_of(gateway.store.list_server_keys())}
    assert statuses[1] is RETIRING
    assert gateway.hello(sleeper, skid=1)  # still accepted while retiring
    sleeper.state.pending_confs.clear()  # (it never confirms)
    gateway.clock.advance(60)
    statuses = {k.skid: k.status for k in result_of(gateway.store.list_server_keys())}
    assert statuses == {1: ServerKeyStatus.RETIRED, 2: ServerKeyStatus.ACTIVE}
    installed: Any = gateway.rollover.installed  # (mypy narrowed it to the earlier value)
    assert installed.accepted == (2,)
    drops = gateway.controller.drops.by_reason.get(DropReason.UNKNOWN_SKID.value, 0)
    assert not gateway.hello(sleeper, skid=1)
    assert gateway.controller.drops.by_reason[DropReason.UNKNOWN_SKID.value] == drops + 1
    assert gateway.hello(mover)
    [audit] = [e for e in result_of(gateway.store.list_security_events()) if e.category == "audit"]
    assert audit.detail == "skid 1 (p256): deadline; 1 announcements still outstanding"
    gateway.job.stopService()


def test_sessions_of_a_retired_key_run_on_and_it_still_signs_their_skey(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    run(gateway.rollover.reload())
    endpoint = gateway.module("m1")
    assert gateway.hello(endpoint)  # a session under skid 1
    two = gateway.datadir.add_server_key("p256")
    result_of(gateway.store.add_server_key(two))
    result_of(gateway.store.set_server_key_status(1, ServerKeyStatus.RETIRED))
    run(gateway.rollover.reload())
    assert gateway.rollover.installed is not None
    assert (gateway.rollover.installed.accepted, gateway.rollover.installed.retired) == ((2,), (1,))
    run(announce(gateway.store, two, 64, NOW))
    [skey] = gateway.data(endpoint).instructions
    assert skey.status == 0, skey.result  # the signature of retired skid 1 verified
    assert not gateway.hello(endpoint, skid=1)
    assert gateway.hello(endpoint, skid=2)


def test_a_corrupt_key_file_changes_nothing(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    run(gateway.rollover.reload())
    bad = Path(gateway.datadir.server_key_path(5, "p256"))
    bad.write_bytes(b"not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(Exception, match="not a p256 server key"):
        run(gateway.rollover.reload())
    endpoint = gateway.module("m1")
    assert gateway.hello(endpoint)


# -- reloads: the service and the TLS settings ----------------------------------------------------


def test_reload_service_runs_reloaders_in_order_and_contains_failures() -> None:
    calls: list[str] = []

    def broken() -> None:
        calls.append("tls")
        raise ValueError("bad file")

    service = ReloadService(
        [("keys", lambda: calls.append("keys")), ("tls", broken)],
        task.Clock(),
        at_start=("keys",),
        signal_number=None,
    )
    started = service.startService()
    assert fired(started) and calls == ["keys"]
    outcome = result_of(service.reload())
    assert outcome == {"keys": True, "tls": False}
    assert calls == ["keys", "keys", "tls"] and service.reloads == 1
    assert fired(service.stopService())


def test_a_failing_start_reloader_fails_the_start() -> None:
    def broken() -> None:
        raise ValueError("no keys")

    service = ReloadService([("keys", broken)], task.Clock(), at_start=("keys",))
    started = service.startService()
    with pytest.raises(ValueError, match="no keys"):
        result_of(started)
    service.stopService()
    assert signal.getsignal(signal.SIGHUP) != service._signalled


def test_reloads_do_not_overlap() -> None:
    gates: list[Deferred[None]] = []
    order: list[str] = []

    def slow() -> Deferred[None]:
        order.append("start")
        gate: Deferred[None] = Deferred()
        gate.addCallback(lambda _: order.append("end"))
        gates.append(gate)
        return gate

    service = ReloadService([("slow", slow)], task.Clock(), signal_number=None)
    service.startService()
    first, second = service.reload(), service.reload()
    assert order == ["start"] and not fired(first)
    gates[0].callback(None)
    assert fired(first) and order == ["start", "end", "start"]
    gates[1].callback(None)
    assert result_of(second) == {"slow": True}


@pytest_twisted.ensureDeferred
async def test_sighup_asks_for_a_reload() -> None:
    from twisted.internet import reactor

    previous = signal.getsignal(signal.SIGHUP)
    reloaded: Deferred[None] = Deferred()
    service = ReloadService(
        [("marker", lambda: reloaded.callback(None))], reactor, signal_number=signal.SIGHUP
    )
    await service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        reloaded.addTimeout(5, reactor)
        await reloaded
        assert service.reloads == 1
    finally:
        await service.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_tls_settings_reload_from_the_renewed_files(tmp_path: Path) -> None:
    datadir = DataDir(str(tmp_path / "data"))
    datadir.ensure(["p256"], tls_key_type="ec")
    settings = ReloadableServerTLS(lambda: app_server_tls_options(datadir))
    before = settings.options
    old_info = datadir.tls_certificate_info()
    datadir.renew_gateway_certificate("ec", days=30)
    assert settings.options is before  # nothing changes until asked
    settings.reload()
    assert settings.options is not before
    assert settings.options.certificate != before.certificate
    assert datadir.tls_certificate_info()["gateway_not_after"] < old_info["gateway_not_after"]
    # A broken file keeps the current settings.
    cert_path, _, _ = datadir.tls_paths
    Path(cert_path).write_text("garbage")
    current = settings.options
    with pytest.raises(Exception, match="not a PEM certificate"):
        settings.reload()
    assert settings.options is current


def test_unused_suites_are_not_loaded(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.datadir.ensure(["p256", "x25519"], tls_key_type="ec")
    run(gateway.rollover.reload())
    assert gateway.rollover.installed is not None
    assert gateway.rollover.installed.accepted == (1,)
    assert [k.skid for k in result_of(gateway.store.list_server_keys())] == [1]
