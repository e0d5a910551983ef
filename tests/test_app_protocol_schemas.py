"""
``docs/app-protocol.md`` and its JSON Schemas agree: every schema is a valid
draft 2020-12 schema, every example on the page validates, and every
message kind has an example.  (Real traffic is validated by the listener's
tests: every line they exchange goes through the same schemas.)
"""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import ValidationError

from tests.app_protocol_helpers import DOC_PATH, TrafficChecker, schema_names, validate


def examples() -> list[dict[str, object]]:
    blocks = re.findall(r"```json\n(.*?)```", DOC_PATH.read_text(encoding="utf-8"), re.S)
    return [json.loads(block) for block in blocks]


def test_every_example_validates_and_every_message_kind_has_one() -> None:
    checker = TrafficChecker()
    for message in examples():
        if "op" in message:
            checker.sent(message)
        else:
            checker.received(message)
    used = set(checker.checked)
    events = {name for name in schema_names() if name.startswith("event-")}
    assert events <= used, sorted(events - used)
    wanted = ["response-error", "request-hello", "response-hello", "request-submit"]
    wanted += ["response-submit", "request-ack", "response-ack", "response-get"]
    wanted += ["request-subscribe", "response-modules", "request-rotate", "request-approve"]
    for name in wanted:
        assert name in used, name


@pytest.mark.parametrize(
    ("message", "op"),
    [
        ({"id": 1.5, "op": "hello"}, None),
        ({"id": 1, "op": "submit", "module": "m", "kind": "set", "colour": "red"}, None),
        ({"id": 1, "op": "submit", "module": "m", "kind": "set", "ttl": 5, "not_after": 9}, None),
        ({"id": 1, "ok": True, "result": {"module": "m", "iid": 0, "state": "queued"}}, "submit"),
        ({"event": "instruction", "seq": 1, "module": "m", "at": 1, "payload": {"iid": 1}}, None),
        ({"event": "ping", "at": 1, "seq": 3}, None),
        ({"id": None, "ok": False, "error": {"code": "Bad Code", "message": "x"}}, None),
    ],
)
def test_schemas_refuse_malformed_messages(message: dict[str, object], op: str | None) -> None:
    with pytest.raises(ValidationError):
        validate(message, op)
