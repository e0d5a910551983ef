"""
The gateway side of MGP/1 reproduces the vectors byte for byte.

For every suite of both vectors files (the independent reference, and
m2mgw's own in ``docs/test-vectors/``), one gateway (memory store, the
vectors' server keys, fixed clock, the vectors' gateway randomness) is fed the
module's datagrams of every step in order, and must answer with exactly the
vectors' reply datagrams.
"""

from __future__ import annotations

from typing import Any

import pytest

from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import KIND_SKEY, instruction_wire_size
from m2mgw.protocol.drops import DropReason
from m2mgw.records import InstructionState, KeyStatus, NewInstruction
from m2mgw.registry import lookup
from tests.codec_helpers import file_suites, h
from tests.engine_helpers import (
    exchange,
    gateway,
    hello_draws,
    result_of,
    server_key,
    skey_draws,
)


@pytest.mark.parametrize(("file", "suite_name"), file_suites())
def test_every_step_reproduces_the_vector_reply(file: str, suite_name: str) -> None:
    controller, store, draws, vectors = gateway(suite_name, file=file)
    module_id = vectors["identity"]
    hello_order = hello_draws(file)

    steps: list[tuple[str, dict[str, Any]]] = [
        ("hello_psk", vectors["hello_psk"]),
        ("data", vectors["data"]),
        ("keyreg", vectors["keyreg"]),
        ("hello_sig", vectors["hello_sig"]),
        ("hello_sig/data", vectors["hello_sig"]["data"]),
    ]
    if "hello_sdh" in vectors:
        steps += [
            ("hello_sdh", vectors["hello_sdh"]),
            ("hello_sdh/data", vectors["hello_sdh"]["data"]),
        ]
    steps.append(("hello_keyreg", vectors["hello_keyreg"]))
    for name, step in steps:
        draws.load(step, hello_order)
        assert exchange(controller, step) == h(step["reply"]), name
        assert draws.queue == [], name

    # The skey step: the gateway queues the announcement of the new server
    # key just before the DATA that fetches it, and signs it when it builds
    # the reply, with the key of the session's skid.
    skey = vectors["skey"]
    suite = lookup(ICipherSuite, suite_name)
    announced = server_key(suite, skey)
    body: dict[int, Any] = {1: announced.skid, 2: suite_name, 3: announced.public}
    if announced.sig_public is not None:
        body[4] = announced.sig_public
    sized = {**body, 5: bytes(suite.signature_len)}
    queued = result_of(
        store.enqueue(
            NewInstruction(
                module_id,
                KIND_SKEY,
                cbor.encode(body),
                wire_size=instruction_wire_size(KIND_SKEY, sized),
                source="gateway",
            ),
            vectors["clock"],
        )
    )
    assert queued.iid == 1
    draws.load(skey, skey_draws(file))
    assert exchange(controller, skey) == h(skey["reply"])

    hello_skey = vectors["hello_skey"]
    draws.load(hello_skey, hello_order)
    assert exchange(controller, hello_skey) == h(hello_skey["reply"])
    confirmed = result_of(store.get_instruction(module_id, 1))
    assert confirmed.state == InstructionState.CONFIRMED
    assert confirmed.exec_ts == vectors["clock"]

    keys = {key.kid: key for key in result_of(store.list_keys(module_id))}
    assert keys[1].status == KeyStatus.ACTIVE
    assert keys[2].status == KeyStatus.PENDING
    assert controller.drops.total == 0


@pytest.mark.parametrize(("file", "suite_name"), file_suites())
def test_replayed_and_retransmitted_datagrams(file: str, suite_name: str) -> None:
    controller, store, draws, vectors = gateway(suite_name, file=file)
    hello = vectors["hello_psk"]
    draws.load(hello, hello_draws(file))
    first = exchange(controller, hello)
    assert first == h(hello["reply"])
    # A byte-identical copy is answered from the cache, with no new draw.
    assert exchange(controller, hello) == first
    data = vectors["data"]
    assert exchange(controller, data) == h(data["reply"])
    assert exchange(controller, data) == h(data["reply"])
    # One report from the HELLO's pl, one from the DATA: none twice.
    reports = result_of(store.list_reports(vectors["identity"]))
    assert len(reports) == 2
    # Once the cache has forgotten it, the same DATA is a replay: silence.
    controller.replies = type(controller.replies)(lambda: 0.0)
    assert exchange(controller, data) is None
    assert controller.drops.by_reason[DropReason.REPLAY.value] == 1
    # And so is the HELLO (its ts is no longer fresh).
    draws.load(hello, hello_draws(file))
    assert exchange(controller, hello) is None
    assert controller.drops.by_reason[DropReason.STALE_TS.value] == 1
