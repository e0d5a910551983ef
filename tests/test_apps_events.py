"""
Event delivery details: retention (never silent), the poll for events of
other processes, delivery restarting after a store failure, and the polling
variant's ``instruction-wanted``.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from m2mgw.apps.events import EventFilter, enforce_retention, event_message
from m2mgw.apps.policy import AppPolicies, AppPolicy
from m2mgw.records import Event, InstructionState, NewEvent, NewInstruction
from tests.apps_helpers import NOW, AppSide, payloads


def report(n: int) -> NewEvent:
    """A report event as the engine makes them."""
    payload = {"module": "m1", "received_at": NOW, "module_ts": None, "format": "cbor", "data": n}
    return NewEvent("report", "m1", payload)


def test_retention_drops_old_events_with_an_alert() -> None:
    policies = AppPolicies(
        default=AppPolicy(retention_events=3, retention_age=0),
        by_app={"patient": AppPolicy(retention_events=0, retention_age=0)},
    )
    app = AppSide(policies=policies)
    app.add_module("m1", apps=("billing", "patient"))
    for n in range(6):
        app.store.append_events([report(n)], NOW)
    alerts: list[Event] = []
    trimmed = Deferred.fromCoroutine(enforce_retention(app.store, policies, NOW + 10))
    trimmed.addCallback(alerts.extend)
    (alert,) = alerts
    assert alert.app == "billing"
    assert alert.payload["code"] == "events-dropped"
    assert (alert.payload["dropped"], alert.payload["first_seq"], alert.payload["last_seq"]) == (
        4,
        1,
        4,
    )
    client = app.connect()
    client.ok("subscribe")
    assert [(e["seq"], e["event"]) for e in client.events()] == [
        (5, "report"),
        (6, "report"),
        (7, "alert"),
    ]
    assert payloads(client.events(), "alert")[0]["origin"] == "gateway"
    assert ("audit", "app-events-dropped", None) in app.security_reasons()
    # The application without limits kept everything.
    assert app.store.data.outbox_position["patient"] == (0, 6)


def test_events_of_other_processes_arrive_with_the_poll() -> None:
    app = AppSide()
    app.add_module("m1")
    client = app.connect()
    client.ok("subscribe")
    app.store.remove_event_listener(app.hub.events_appended)  # as if m2mgw-admin wrote them
    app.store.append_events(
        [NewEvent("alert", "m1", {"origin": "module", "level": 4, "code": 1})], NOW
    )
    assert client.events() == []
    app.hub.wake_all()
    assert [e["seq"] for e in client.events()] == [1]


def test_delivery_survives_a_store_failure() -> None:
    app = AppSide()
    app.add_module("m1")
    client = app.connect()
    client.ok("subscribe")
    original = app.store.events_after
    failures = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import fail

        failures.append(args)
        return fail(RuntimeError("disk on fire"))

    app.store.events_after = broken  # type: ignore[method-assign]
    app.store.append_events([report(1)], NOW)
    assert client.events() == [] and failures
    app.store.events_after = original  # type: ignore[method-assign]
    app.hub.wake_all()
    assert [e["seq"] for e in client.events()] == [1]


def test_event_filter_and_message() -> None:
    event = Event("a", 3, "report", "m1", {"x": 1}, NOW)
    assert event_message(event) == {
        "event": "report",
        "seq": 3,
        "module": "m1",
        "at": NOW,
        "payload": {"x": 1},
    }
    assert EventFilter().passes(event)
    assert not EventFilter(kinds=frozenset({"key"})).passes(event)
    assert EventFilter(modules=frozenset({"m1"})).passes(event)
    assert not EventFilter(groups=frozenset({"g"})).passes(event, "h")
    gateway = Event("a", 4, "alert", None, {}, NOW)
    assert EventFilter(modules=frozenset({"m9"}), groups=frozenset({"g"})).passes(gateway)


@pytest_twisted.ensureDeferred
async def test_instruction_wanted_and_a_submit_in_time() -> None:
    app = AppSide(poll_ms=50)
    app.add_module("m1")
    client = app.connect()
    client.ok("subscribe", events=["instruction"])
    assert app.poll is not None
    waiting = app.poll.wait_for_instruction  # what the engine awaits
    from twisted.internet.defer import Deferred

    answered = Deferred.fromCoroutine(waiting("m1"))
    (wanted,) = [e for e in client.events() if e["event"] == "instruction-wanted"]
    assert wanted == {"event": "instruction-wanted", "module": "m1", "at": NOW, "wait_ms": 50}
    assert app.poll.waiting == 1
    client.ok("submit", module="m1", kind="set")
    assert await answered is True
    assert app.poll.waiting == 0
    # Something is queued now: nobody is asked.
    assert await Deferred.fromCoroutine(waiting("m1")) is False
    assert app.poll.asked == 1 and app.poll.answered == 1


@pytest_twisted.ensureDeferred
async def test_instruction_wanted_times_out_and_skips_unconnected_modules() -> None:
    from twisted.internet.defer import Deferred

    app = AppSide(poll_ms=50)
    app.add_module("m1")
    app.add_module("lonely", apps=("nobody",))
    assert app.poll is not None
    assert await Deferred.fromCoroutine(app.poll.wait_for_instruction("lonely")) is False
    client = app.connect()
    client.ok("subscribe")
    waiting = Deferred.fromCoroutine(app.poll.wait_for_instruction("m1"))
    app.clock.advance(0.049)
    assert not waiting.called
    app.clock.advance(0.002)
    assert await waiting is False
    assert app.poll.asked == 1 and app.poll.answered == 0
    # An instruction already sent (it rides again) also means nobody is asked.
    app.store.enqueue(NewInstruction("m1", "set", b"\xf6", 8, source="operator"), NOW)
    instructions: list[Any] = []
    app.store.list_instructions("m1").addCallback(instructions.extend)
    assert instructions[0].state is InstructionState.QUEUED
    assert await Deferred.fromCoroutine(app.poll.wait_for_instruction("m1")) is False
    assert app.poll.asked == 1
