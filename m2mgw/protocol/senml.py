"""
Turning a module's ``data`` (any CBOR) into JSON for application servers.

SenML (RFC 8428) in its CBOR representation uses integer labels; the gateway
forwards it as SenML JSON, with the names of RFC 8428 §6 and ``vd`` as
base64url (§5 of the RFC).  Any other value is forwarded as plain JSON: byte
strings become ``{"bytes": base64}``, tags ``{"tag": n, "value": ...}``, map
keys that are not text become their JSON text, and floats that JSON cannot
hold (NaN, infinities) become strings.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

import cbor2

#: RFC 8428 §6: CBOR label -> SenML JSON name.
SENML_LABELS: dict[int, str] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}


def is_senml(data: Any) -> bool:
    """True if ``data`` is a SenML pack: a non-empty array of maps with SenML labels only."""
    return (
        isinstance(data, list)
        and bool(data)
        and all(
            isinstance(record, Mapping)
            and bool(record)
            and all(type(key) is int and key in SENML_LABELS for key in record)
            for record in data
        )
    )


def _senml_record(record: Mapping[int, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, value in record.items():
        name = SENML_LABELS[label]
        if name == "vd" and isinstance(value, (bytes, bytearray)):
            out[name] = base64.urlsafe_b64encode(bytes(value)).rstrip(b"=").decode("ascii")
        else:
            out[name] = to_json(value)
    return out


def to_json(value: Any) -> Any:
    """A JSON-compatible rendering of a decoded CBOR value (see the module docstring)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {
            (key if isinstance(key, str) else _key_text(key)): to_json(item)
            for key, item in value.items()
        }
    if isinstance(value, cbor2.CBORTag):
        return {"tag": value.tag, "value": to_json(value.value)}
    if isinstance(value, cbor2.CBORSimpleValue):
        return {"simple": value.value}
    if value is cbor2.undefined:
        return None
    return str(value)


def _key_text(key: Any) -> str:
    if isinstance(key, (bytes, bytearray)):
        return "h'" + bytes(key).hex() + "'"
    if isinstance(key, (int, float, bool)) or key is None:
        return str(key).lower() if isinstance(key, bool) or key is None else str(key)
    return json.dumps(to_json(key), sort_keys=True, separators=(",", ":"))


def report_json(data: Any) -> tuple[str, Any]:
    """
    The format name and JSON rendering of a report's ``data``.

    :return: ``("senml", [...])`` for a SenML pack, else ``("cbor", value)``.
    """
    if is_senml(data):
        return "senml", [_senml_record(record) for record in data]
    return "cbor", to_json(data)
