"""
The application protocol's JSON Schemas (``docs/app-protocol/schemas``), for
tests: which schema a message falls under, and validation against it.

A request is validated against ``request-OP.json``; a response against
``response-OP.json`` (``response-error.json`` for errors), which needs the op
of the request it answers; an event against ``event-KIND.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "app-protocol" / "schemas"
DOC_PATH = SCHEMA_DIR.parent.parent / "app-protocol.md"


@cache
def _registry() -> tuple[Registry, dict[str, dict[str, Any]]]:
    schemas: dict[str, dict[str, Any]] = {}
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        schemas[path.stem] = schema
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources), schemas


def schema_names() -> list[str]:
    """Every schema's name (file name without ``.json``)."""
    return sorted(_registry()[1])


def schema_name_for(message: Mapping[str, Any], op: str | None = None) -> str:
    """
    The schema a message falls under.

    :param op: for a response, the op of the request it answers.
    """
    if "event" in message:
        return f"event-{message['event']}"
    if "op" in message:
        return f"request-{message['op']}"
    if message.get("ok") is False:
        return "response-error"
    if op is None:
        raise ValueError(f"a response needs its request's op: {message!r}")
    return f"response-{op}"


def validate(message: Mapping[str, Any], op: str | None = None) -> str:
    """
    Validate ``message`` against its schema.

    :return: the schema's name.
    :raise jsonschema.ValidationError: it does not conform.
    :raise KeyError: no schema for it.
    """
    registry, schemas = _registry()
    name = schema_name_for(message, op)
    Draft202012Validator(schemas[name], registry=registry).validate(message)
    if name.startswith("request-"):
        Draft202012Validator(schemas["request"], registry=registry).validate(message)
    return name


class TrafficChecker:
    """
    Validates a conversation seen from the client: remembers the op of each
    request by id so that the response can be checked against the right schema.
    """

    def __init__(self) -> None:
        self.ops: dict[Any, list[str]] = {}
        self.checked: list[str] = []

    def sent(self, request: Mapping[str, Any]) -> None:
        """A request the client sent."""
        self.checked.append(validate(request))
        self.ops.setdefault(request["id"], []).append(request["op"])

    def received(self, message: Mapping[str, Any]) -> None:
        """A line the client received (response or event)."""
        op = None
        if "event" not in message and message.get("id") in self.ops:
            pending = self.ops[message["id"]]
            op = pending.pop(0) if pending else None
        self.checked.append(validate(message, op))
