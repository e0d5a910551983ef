"""
The application protocol's operations over the listener (``StringTransport``,
memory store, fake clock): every request, every refusal, the audit trail,
and every line exchanged validated against the JSON Schemas.
"""

from __future__ import annotations

from typing import Any

import pytest

from m2mgw.apps.policy import AppPolicies, AppPolicy, parse_hours, parse_networks
from m2mgw.errors import InvalidTransition, UnknownModule
from m2mgw.protocol import cbor
from m2mgw.records import (
    Confirmation,
    DataCommit,
    Delivery,
    HelloCommit,
    Instruction,
    ModuleKey,
    ModuleStatus,
    NewInstruction,
    PayloadEffects,
    Session,
)
from tests.apps_helpers import NOW, AppSide, payloads
from tests.doubles import fired

ALL = ("approve", "cancel", "rotate", "submit")


def side(**kwargs: Any) -> AppSide:
    return AppSide(**kwargs)


def open_session(app: AppSide, module_id: str, sid: bytes = b"sid-1") -> None:
    session = Session(sid, module_id, 0, "p256", 1, b"u" * 16, b"d" * 16, NOW, NOW + 3600)
    app.store.accept_hello(HelloCommit(session, 100, NOW, delivery=Delivery(budget=0)))


def data(app: AppSide, ctr: int, sid: bytes = b"sid-1", **effects: Any) -> Any:
    box: list[Any] = []
    commit = DataCommit(
        sid, ctr, 64, b"tok%d" % ctr, NOW, PayloadEffects(**effects), delivery=Delivery(1000)
    )
    app.store.accept_data(commit).addCallback(box.append)
    return box[0]


# -- hello, ping, framing ------------------------------------------------------------------


def test_hello_negotiates_and_tells_the_connection_facts() -> None:
    app = side(
        policies=AppPolicies(by_app={"billing": AppPolicy(hours=parse_hours("08:00-18:00"))})
    )
    client = app.connect()
    result = client.ok("hello", versions=[3, 1, 2])
    assert result["version"] == 1 and result["versions"] == [1]
    assert result["principal"] == "billing"
    assert result["permissions"] == ["cancel", "submit"]
    assert result["hours"] == ["08:00-18:00"]
    assert (result["idle_timeout"], result["ping_interval"], result["max_unacked"]) == (
        300,
        60,
        1000,
    )
    assert (result["acked_seq"], result["last_seq"]) == (0, 0)
    assert result["time"] == NOW
    assert client.error("hello", versions=[2, 3]) == "unsupported-version"
    assert client.error("hello", versions="1") == "bad-request"
    assert client.ok("ping") == {"time": NOW}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "bad-json"),
        (b'{"id":1,"op":"launch"}', "unknown-op"),
        (b'{"id":1,"op":"submit","module":"m1","kind":"set","colour":"red"}', "bad-request"),
        (b'{"id":1,"op":"hello","x":' + b'"a"' * 40000 + b"}", "line-too-long"),
    ],
)
def test_errors_leave_the_connection_usable(line: bytes, code: str) -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    client.send_raw(line + b"\n")
    (answer,) = client.lines()
    assert answer["ok"] is False and answer["error"]["code"] == code
    assert client.ok("submit", module="m1", kind="set")["iid"] == 1
    assert not client.transport.disconnecting


def test_reserved_principals_are_refused() -> None:
    app = side()
    client = app.connect(principal="operator")
    (answer,) = client.lines()
    assert answer["error"]["code"] == "unauthenticated"
    assert client.transport.disconnecting


def test_networks_limit_where_an_application_connects_from() -> None:
    policy = AppPolicy(networks=parse_networks("10.0.0.0/8 192.168.1.0/24"))
    app = side(policies=AppPolicies(by_app={"billing": policy}))
    inside = app.connect(host="192.168.1.7")
    assert inside.ok("ping")
    outside = app.connect(host="172.16.0.1")
    (answer,) = outside.lines()
    assert answer == {
        "id": None,
        "ok": False,
        "error": {"code": "network-refused", "message": answer["error"]["message"]},
    }
    assert outside.transport.disconnecting
    assert ("auth", "app-network", None) in app.security_reasons()
    # Applications without networks connect from anywhere.
    assert app.connect(principal="other", host="172.16.0.1").ok("ping")


# -- submit, get, cancel -------------------------------------------------------------------


def test_submit_queues_under_the_principal_and_audits() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    result = client.ok("submit", module="m1", kind="set", body={"led": [1, 2]}, ttl=600)
    assert result == {
        "module": "m1",
        "iid": 1,
        "state": "queued",
        "created_at": NOW,
        "not_after": NOW + 600,
    }
    instruction = app.store.data.instructions["m1"][1]
    assert instruction.source == "billing"
    assert cbor.decode(instruction.body) == {"led": [1, 2]}
    assert ("audit", "app-submit", "m1") in app.security_reasons()


def test_submit_is_idempotent_by_key() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    first = client.ok("submit", module="m1", kind="set", body=1, idempotency_key="k-1")
    again = client.ok("submit", module="m1", kind="set", body=2, idempotency_key="k-1")
    assert first["iid"] == again["iid"] == 1
    assert len(app.store.data.instructions["m1"]) == 1


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"kind": "keygen"}, "invalid-instruction"),
        ({"kind": "rehello", "body": 1}, "invalid-instruction"),
        ({"kind": "set", "body": "x" * 5000}, "invalid-instruction"),
        ({"kind": "set", "ttl": 5, "not_after": NOW + 10}, "invalid-instruction"),
        ({"kind": "set", "not_after": NOW - 1}, "invalid-instruction"),
        ({"kind": "set", "ttl": 0}, "bad-request"),
        ({"kind": "set", "ttl": True}, "bad-request"),
        ({"kind": ""}, "bad-request"),
        ({"kind": "set", "idempotency_key": "k" * 129}, "bad-request"),
    ],
)
def test_submit_refuses_bad_instructions(params: dict[str, Any], code: str) -> None:
    app = side()
    app.add_module("m1")
    assert app.connect().error("submit", module="m1", **params) == code
    assert app.store.data.instructions == {}


def test_get_shows_state_and_history_and_cancel_cancels() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    client.ok("submit", module="m1", kind="set", body={"a": b"x".hex()})
    shown = client.ok("get", module="m1", iid=1)
    assert shown["state"] == "queued" and shown["source"] == "billing"
    assert shown["history"] == [{"state": "queued", "at": NOW}]
    assert shown["body"] == {"a": "78"}
    app.clock.advance(5)
    cancelled = client.ok("cancel", module="m1", iid=1)
    assert cancelled["state"] == "cancelled"
    assert cancelled["history"] == [
        {"state": "queued", "at": NOW},
        {"state": "cancelled", "at": NOW + 5},
    ]
    assert client.error("cancel", module="m1", iid=1) == "conflict"
    assert client.error("get", module="m1", iid=9) == "not-found"
    assert client.error("cancel", module="m1", iid=9) == "not-found"
    assert ("audit", "app-cancel", "m1") in app.security_reasons()


def test_confirmed_instruction_shows_the_execution_time() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    client.ok("submit", module="m1", kind="set")
    open_session(app, "m1")
    data(app, 1)  # rides
    data(app, 2, confirmations=(Confirmation(1, 0, NOW - 7, cbor.encode({"ok": True})),))
    shown = client.ok("get", module="m1", iid=1)
    assert (shown["state"], shown["exec_ts"], shown["status"]) == ("confirmed", NOW - 7, 0)
    assert shown["result"] == {"ok": True} and shown["attempts"] == 1


# -- who may see and do what ---------------------------------------------------------------


def test_foreign_and_unknown_modules_are_forbidden_alike() -> None:
    app = side(policies=AppPolicies(default=AppPolicy(permissions=ALL)))
    app.add_module("mine")
    app.add_module("theirs", apps=("other",))
    client = app.connect()
    for module_id in ("theirs", "ghost"):
        assert client.error("submit", module=module_id, kind="set") == "forbidden"
        assert client.error("get", module=module_id, iid=1) == "forbidden"
        assert client.error("cancel", module=module_id, iid=1) == "forbidden"
        assert client.error("modules", module=module_id) == "forbidden"
        assert client.error("subscribe", modules=[module_id]) == "forbidden"
        assert client.error("rotate", module=module_id) == "forbidden"
        assert client.error("approve", module=module_id) == "forbidden"
    assert app.store.data.instructions == {}
    refusals = [r for r in app.security_reasons() if r[1] == "app-forbidden"]
    assert len(refusals) == 14
    assert ("auth", "app-forbidden", "ghost") in refusals


def test_instructions_of_another_application_are_private() -> None:
    app = side()
    app.add_module("shared", apps=("billing", "other"))
    other = app.connect(principal="other")
    other.ok("submit", module="shared", kind="set")
    client = app.connect()
    assert client.error("get", module="shared", iid=1) == "forbidden"
    assert client.error("cancel", module="shared", iid=1) == "forbidden"
    # The gateway's own instructions are visible but not cancellable.
    app.store.enqueue(NewInstruction("shared", "set", b"\xf6", 8, source="operator"), NOW)
    assert client.ok("get", module="shared", iid=2)["source"] == "operator"
    assert client.error("cancel", module="shared", iid=2) == "forbidden"


def test_permissions_come_from_the_policy() -> None:
    policies = AppPolicies(
        default=AppPolicy(permissions=()), by_app={"ops": AppPolicy(permissions=ALL)}
    )
    app = side(policies=policies)
    app.add_module("m1", apps=("billing", "ops"))
    reader = app.connect()
    assert reader.ok("hello")["permissions"] == []
    assert reader.error("submit", module="m1", kind="set") == "forbidden"
    assert reader.ok("modules")["modules"][0]["module"] == "m1"  # reading needs nothing
    assert app.connect(principal="ops").ok("submit", module="m1", kind="set")["iid"] == 1


def test_hours_limit_actions_not_reading() -> None:
    policy = AppPolicy(hours=parse_hours("08:00-18:00"))
    app = side(policies=AppPolicies(by_app={"billing": policy}))
    app.add_module("m1")
    client = app.connect()
    app.clock.advance(-(NOW % 86400) + 20 * 3600)  # 20:00 UTC
    assert client.error("submit", module="m1", kind="set") == "outside-hours"
    assert client.ok("modules")["modules"]
    assert ("auth", "app-outside-hours", "m1") in app.security_reasons()
    app.clock.advance(14 * 3600)  # 10:00 UTC the next day
    assert client.ok("submit", module="m1", kind="set")["state"] == "queued"


# -- modules ---------------------------------------------------------------------------------


def test_modules_lists_pages_and_shows_one() -> None:
    app = side()
    for n in range(5):
        app.add_module(f"m{n}", group="north" if n % 2 else "south")
    app.add_module("x", apps=("other",))
    client = app.connect()
    first = client.ok("modules", limit=2)
    assert [m["module"] for m in first["modules"]] == ["m0", "m1"] and first["next"] == 2
    last = client.ok("modules", offset=4, limit=2)
    assert [m["module"] for m in last["modules"]] == ["m4"] and last["next"] is None
    assert first["modules"][1] == {
        "module": "m1",
        "status": "enabled",
        "group": "north",
        "created_at": NOW - 10,
        "last_hello_ts": 1,
    }
    app.store.add_key(ModuleKey("m1", 1, "p256", b"\x04" * 65, created_at=NOW))
    client.ok("submit", module="m1", kind="set")
    open_session(app, "m1")
    shown = client.ok("modules", module="m1")["module"]
    assert [k["kid"] for k in shown["keys"]] == [1]
    assert shown["session"]["expires_at"] == NOW + 3600
    assert shown["pending_instructions"] == 1
    assert client.error("modules", limit=0) == "bad-request"


# -- events ----------------------------------------------------------------------------------


def test_events_are_pushed_in_order_and_acknowledged() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    assert client.events() == []  # nothing before subscribing
    client.ok("submit", module="m1", kind="set")
    open_session(app, "m1")
    data(app, 1)
    assert client.events() == []
    assert client.ok("subscribe") == {"acked_seq": 0, "last_seq": 3}
    # Queued; left behind by the HELLO reply, which had no room; sent with DATA 1.
    assert [
        (e["seq"], e["event"], e["module"], e["payload"]["state"]) for e in client.events()
    ] == [
        (1, "instruction", "m1", "queued"),
        (2, "instruction", "m1", "waiting"),
        (3, "instruction", "m1", "sent"),
    ]
    data(app, 2, confirmations=(Confirmation(1, 0, NOW - 3),))
    app.settle()
    confirmed = client.events()[-1]
    assert confirmed["seq"] == 4
    assert (confirmed["payload"]["state"], confirmed["payload"]["exec_ts"]) == (
        "confirmed",
        NOW - 3,
    )
    assert client.ok("ack", seq=4) == {"acked_seq": 4}
    # A reconnect resumes after the acknowledged position.
    again = app.connect()
    assert again.ok("subscribe") == {"acked_seq": 4, "last_seq": 4}
    assert again.events() == []


def test_ack_never_acknowledges_events_not_sent_on_the_connection() -> None:
    app = side(max_unacked=2)
    app.add_module("m1")
    client = app.connect()
    open_session(app, "m1")
    client.ok("subscribe", events=["instruction"])
    for n in range(4):
        client.ok("submit", module="m1", kind="set", body=n)
    # Four queued events; the window is two.
    assert [e["seq"] for e in client.events()] == [1, 2]
    assert client.ok("ack", seq=99) == {"acked_seq": 2}
    assert [e["seq"] for e in client.events()] == [1, 2, 3, 4]
    data(app, 1)  # the four ride: four sent events wait for room in the full window
    app.settle()
    assert [e["seq"] for e in client.events()] == [1, 2, 3, 4]
    assert client.ok("ack", seq=99) == {"acked_seq": 4}
    assert [e["seq"] for e in client.events()] == [1, 2, 3, 4, 5, 6]
    assert client.ok("ack", seq=99) == {"acked_seq": 6}
    assert [e["payload"]["state"] for e in client.events()] == ["queued"] * 4 + ["sent"] * 4
    assert client.ok("ack", seq=8) == {"acked_seq": 8}
    # Unsubscribed, an ack is clamped to the last event assigned.
    client.ok("unsubscribe")
    assert client.ok("ack", seq=99) == {"acked_seq": 8}


def test_subscription_filters_and_withheld_events_do_not_pile_up() -> None:
    app = side()
    app.add_module("a", group="north")
    app.add_module("b", group="south")
    client = app.connect()
    client.ok("subscribe", groups=["north"], events=["instruction"])
    client.ok("submit", module="b", kind="set")  # queued: withheld (south)
    open_session(app, "b", b"sid-b")  # no room in the HELLO reply: waiting, withheld
    data(app, 1, sid=b"sid-b")  # b's instruction rides: withheld
    assert client.events() == []
    # Withheld and nothing else outstanding: acknowledged on the app's behalf.
    assert app.store.data.outbox_position["billing"] == (3, 3)
    client.ok("submit", module="a", kind="set")  # north: pushed
    client.ok("submit", module="b", kind="set")  # withheld, behind an unacknowledged one
    assert [(e["seq"], e["module"]) for e in client.events()] == [(4, "a")]
    assert app.store.data.outbox_position["billing"] == (3, 5)
    assert client.ok("ack", seq=4) == {"acked_seq": 5}
    assert app.store.data.outbox_position["billing"] == (5, 5)
    assert client.error("subscribe", events=["weather"]) == "bad-request"


def test_a_full_send_buffer_pauses_events_and_reading() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    client.ok("subscribe")
    producer = client.transport.producer
    assert producer is not None and client.transport.streaming
    producer.pauseProducing()  # the transport's buffer is full
    assert client.transport.producerState == "paused"
    client.checker.ops["later"] = ["ping"]
    client.protocol.dataReceived(b'{"id":"later","op":"ping"}\n')
    assert all(m.get("id") != "later" for m in client.lines())  # not read yet
    open_session(app, "m1")
    app.operations.source.submit(NewInstruction("m1", "set", b"\xf6", 8, source="billing"))
    data(app, 1)
    app.settle()
    assert client.events() == []
    producer.resumeProducing()
    app.settle()
    lines = client.lines()
    assert [m.get("id") for m in lines if "event" not in m] == ["later"]
    assert [e["payload"]["state"] for e in client.events()] == ["queued", "sent"]
    assert client.transport.producerState == "producing"


def test_ping_event_after_silence_and_idle_close() -> None:
    app = side(ping_interval=60, idle_timeout=300)
    client = app.connect()
    client.ok("ping")
    app.clock.advance(60)  # something was sent in this interval: no ping yet
    assert client.events() == []
    app.clock.advance(60)
    assert client.events() == [{"event": "ping", "at": NOW + 120}]
    app.clock.advance(200)
    assert client.transport.disconnecting


def test_store_events_wake_the_delivery_without_polling() -> None:
    app = side()
    app.add_module("m1")
    client = app.connect()
    client.ok("subscribe")
    app.store.enqueue(NewInstruction("m1", "set", b"\xf6", 8, source="operator"), NOW)
    open_session(app, "m1")
    data(app, 1)
    app.settle()
    assert [e["payload"]["state"] for e in client.events()] == ["queued", "waiting", "sent"]


# -- rotate, approve, refuse -----------------------------------------------------------------


class FakeRotation:
    def __init__(self, app: AppSide) -> None:
        self.app = app
        self.calls: list[tuple[str, Any, str]] = []
        self.refuse: Exception | None = None
        self.busy = False

    async def __call__(self, module_id: str, params: Any, requested_by: str) -> Instruction | None:
        self.calls.append((module_id, params, requested_by))
        if self.refuse is not None:
            raise self.refuse
        if self.busy:
            return None
        new = NewInstruction(module_id, "keygen", b"\xa0", 20, source=requested_by)
        queued: Instruction = await self.app.store.enqueue(new, NOW)
        return queued


def test_rotate_calls_the_rotation_with_the_principal() -> None:
    app = side(policies=AppPolicies(default=AppPolicy(permissions=("rotate",))))
    rotation = FakeRotation(app)
    app.operations.rotation = rotation
    app.add_module("m1")
    client = app.connect()
    assert client.ok("rotate", module="m1", params=2) == {
        "module": "m1",
        "iid": 1,
        "state": "queued",
    }
    assert client.ok("rotate", module="m1", params="strong")["iid"] == 2
    assert rotation.calls == [("m1", 2, "billing"), ("m1", "strong", "billing")]
    rotation.busy = True
    assert client.error("rotate", module="m1") == "conflict"
    rotation.busy, rotation.refuse = False, InvalidTransition("disabled")
    assert client.error("rotate", module="m1") == "conflict"
    rotation.refuse = UnknownModule("m1")
    assert client.error("rotate", module="m1") == "forbidden"
    assert client.error("rotate", module="m1", params=0) == "bad-request"
    assert ("audit", "app-rotate", "m1") in app.security_reasons()


def test_rotate_without_a_rotation_is_unavailable() -> None:
    app = side(policies=AppPolicies(default=AppPolicy(permissions=("rotate",))))
    app.add_module("m1")
    assert app.connect().error("rotate", module="m1") == "unavailable"


def test_approve_and_refuse_pending_enrolments() -> None:
    app = side(policies=AppPolicies(default=AppPolicy(permissions=("approve",))))
    app.add_module("p1", status=ModuleStatus.PENDING_APPROVAL)
    app.add_module("p2", status=ModuleStatus.PENDING_APPROVAL)
    client = app.connect()
    assert client.ok("approve", module="p1") == {"module": "p1", "status": "enabled"}
    assert client.ok("refuse", module="p2") == {"module": "p2", "status": "disabled"}
    assert client.error("approve", module="p1") == "conflict"
    reasons = app.security_reasons()
    assert ("audit", "app-approve", "p1") in reasons and ("audit", "app-refuse", "p2") in reasons
    client.ok("subscribe", events=["module"])
    assert [p["event"] for p in payloads(client.events(), "module")] == ["approved", "disabled"]
    without = side()
    without.add_module("p3", status=ModuleStatus.PENDING_APPROVAL)
    assert without.connect().error("approve", module="p3") == "forbidden"


def test_a_source_stopped_refuses_submissions() -> None:
    app = side()
    app.add_module("m1")
    app.source.stop()
    assert app.connect().error("submit", module="m1", kind="set") == "unavailable"
    assert fired(app.store.list_instructions())
