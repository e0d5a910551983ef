"""Properties of the stores' shared decision rules (:mod:`m2mgw.store.logic`)."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from m2mgw.records import Delivery, Instruction, InstructionState, KeyStatus, ModuleKey
from m2mgw.store import logic

NOW = 1000

instructions = st.lists(
    st.builds(
        lambda size, not_after, attempts, state: (size, not_after, attempts, state),
        st.integers(0, 40),
        st.none() | st.integers(NOW - 2, NOW + 2),
        st.integers(0, 4),
        st.sampled_from(logic.PENDING_STATES),
    ),
    max_size=12,
).map(
    lambda rows: [
        Instruction("m", iid, "k", b"", size, state, not_after, attempts)
        for iid, (size, not_after, attempts, state) in enumerate(rows, start=1)
    ]
)


@given(instructions, st.integers(0, 3), st.integers(0, 120), st.integers(1, 4))
def test_plan_delivery(
    pending: list[Instruction], preferred_count: int, budget: int, max_attempts: int
) -> None:
    preferred = pending[len(pending) - min(preferred_count, len(pending)) :]
    consumed: list[int] = []

    def lazily() -> Iterator[Instruction]:
        for instruction in pending:
            consumed.append(instruction.iid)
            yield instruction

    plan = logic.plan_delivery(lazily(), preferred, Delivery(budget, max_attempts), NOW)
    order = preferred + [i for i in pending if i not in preferred]
    decided = {i.iid for i in plan.expired + plan.failed + plan.taken}
    # What was decided is a prefix of the order of consideration...
    assert decided == {i.iid for i in order[: len(decided)]}
    # ...ended either by the queue's end or by the first deliverable one that did not fit.
    remaining = budget - sum(i.wire_size for i in plan.taken)
    assert remaining >= 0
    if plan.more:
        blocker = order[len(decided)]
        assert blocker.wire_size > remaining
        assert not logic.instruction_expired(blocker, NOW) and blocker.attempts < max_attempts
    else:
        assert len(decided) == len(order)
    for instruction in plan.expired:
        assert instruction.state is InstructionState.EXPIRED and instruction.not_after is not None
        assert instruction.not_after < NOW
    for instruction in plan.failed:
        assert instruction.state is InstructionState.FAILED
        assert instruction.attempts >= max_attempts
    by_iid = {i.iid: i for i in pending}
    assert [i.iid for i in plan.taken] == sorted(i.iid for i in plan.taken)
    for taken in plan.taken:
        before = by_iid[taken.iid]
        assert (taken.state, taken.attempts, taken.updated_at) == (
            InstructionState.SENT,
            before.attempts + 1,
            NOW,
        )
        assert before.attempts < max_attempts and not logic.instruction_expired(before, NOW)
        assert (taken.iid in plan.first_ride) == (before.state in logic.UNSENT_STATES)
    assert plan.first_ride <= {i.iid for i in plan.taken}
    # The queue is read only as far as needed.
    if plan.more and order[len(decided)] not in preferred:
        assert consumed[-1] == order[len(decided)].iid


def test_key_with_status_stamps() -> None:
    key = ModuleKey("m", 1, "p256", b"k")
    active = logic.key_with_status(key, KeyStatus.ACTIVE, 5)
    assert (active.activated_at, active.retired_at) == (5, None)
    retired = logic.key_with_status(active, KeyStatus.RETIRED, 7)
    assert logic.key_with_status(retired, KeyStatus.REVOKED, 9).retired_at == 7
    assert logic.key_with_status(key, KeyStatus.PENDING, 9) == key


def test_instruction_events_go_to_the_submitting_application() -> None:
    by_app = Instruction("m", 1, "set", b"", 1, source="app-7")
    assert logic.instruction_event(by_app).app == "app-7"
    for source in sorted(logic.NON_APP_SOURCES):
        assert (
            logic.instruction_event(Instruction("m", 1, "set", b"", 1, source=source)).app is None
        )


@given(st.integers(0, 2**200))
def test_window_bytes_round_trip(bits: int) -> None:
    assert logic.window_from_bytes(logic.window_to_bytes(bits)) == bits
