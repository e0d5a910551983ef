"""
Tests for the reactor-free parts of ``m2mgw-admin``: CSV import checking,
provisioning input checks, instruction sizing and output formatting; plus
the speed of a 100 000-row import into a real SQLite store.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from m2mgw.admin import OperatorError
from m2mgw.admin import output as out
from m2mgw.admin.csvimport import parse_module_csv
from m2mgw.admin.instructions import (
    IID_PLACEHOLDER,
    body_from_json,
    instruction_wire_size,
    new_operator_instruction,
)
from m2mgw.admin.provisioning import (
    check_app_names,
    check_group,
    check_module_id,
    parse_kid,
    parse_psk,
    parse_public_key,
)
from m2mgw.errors import ConfigError, ImportFailed
from m2mgw.interfaces import ICipherSuite, IModuleStoreFactory
from m2mgw.protocol import cbor
from m2mgw.records import (
    VOUCHED_BY_OPERATOR,
    Instruction,
    KeyStatus,
    Module,
    ModuleKey,
    ModuleStatus,
)
from m2mgw.registry import lookup

NOW = 1_750_000_000
PSK = "00112233445566778899aabbccddeeff"


def suite(name: str) -> Any:
    return lookup(ICipherSuite, name)


def p256_point() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def parse(text: str, **kwargs: Any) -> Any:
    return parse_module_csv(text.encode("utf-8"), suite, NOW, **kwargs)


# -- CSV -----------------------------------------------------------------------------------


def test_csv_rows_become_records() -> None:
    point = p256_point()
    text = (
        "\ufeffstatus, apps ,id,psk,suite,kid,public_key,group\n"
        f"enabled,billing ops billing,m-1,{PSK},,,,fleet a\n"
        "\n"
        f"pending-approval,,m-2,,p256,3,{point.hex().upper()},\n"
        f",,m-3,{PSK},p256,1,{point.hex()},\n"
    )
    progress: list[int] = []
    result = parse(text, progress=progress.append)
    assert result.modules == (
        Module("m-1", ModuleStatus.ENABLED, bytes.fromhex(PSK), group="fleet a", created_at=NOW),
        Module("m-2", ModuleStatus.PENDING_APPROVAL, None, created_at=NOW),
        Module("m-3", ModuleStatus.ENABLED, bytes.fromhex(PSK), created_at=NOW),
    )
    expected_key = ModuleKey(
        "m-2",
        3,
        "p256",
        point,
        KeyStatus.ACTIVE,
        VOUCHED_BY_OPERATOR,
        created_at=NOW,
        activated_at=NOW,
    )
    assert result.keys[0] == expected_key
    assert result.keys[1].module_id == "m-3" and result.keys[1].kid == 1
    assert result.apps == {"m-1": ["billing", "ops"]}
    assert result.lines == {"m-1": 2, "m-2": 4, "m-3": 5}
    assert progress == [3]


BAD_FILES = {
    "empty": ("", "line 1: the file is empty"),
    "no id column": ("psk\n00\n", "line 1: the header has no 'id' column"),
    "unknown column": ("id,colour\n", "line 1: unknown column 'colour'"),
    "column twice": ("id,psk,PSK\n", "line 1: column 'psk' appears twice"),
    "not utf-8": (b"id,psk\nok,00\n\xff,00\n", "line 3: not UTF-8 text"),
    "short row": (f"id,psk\nm,{PSK}\nn\n", "line 3: 1 fields, but the header has 2"),
    "bad psk": ("id,psk\nm,xyz\n", "line 2: the PSK is not hexadecimal"),
    "short psk": ("id,psk\nm,0011\n", "line 2: a PSK is 16-64 bytes"),
    "no credential": ("id,group\nm,g\n", "line 2: the row has neither a psk nor a public_key"),
    "key without suite": ("id,public_key\nm,04\n", "line 2: a public_key needs a suite and a kid"),
    "suite without key": (f"id,psk,suite\nm,{PSK},p256\n", "line 2: suite and kid are only for"),
    "unknown suite": ("id,suite,kid,public_key\nm,p999,1,04\n", "line 2: unknown cipher suite"),
    "bad point": ("id,suite,kid,public_key\nm,p256,1,04aa\n", "line 2: not an acceptable p256"),
    "kid zero": (
        "id,suite,kid,public_key\nm,p256,0,{point}\n",
        "line 2: kid must be at least 1",
    ),
    "duplicate": (f"id,psk\nm,{PSK}\nx,{PSK}\nm,{PSK}\n", "line 4: module 'm' is also on line 2"),
    "bad status": (f"id,psk,status\nm,{PSK},asleep\n", "line 2: unknown status 'asleep'"),
    "bad app": (f"id,psk,apps\nm,{PSK},bill/ing\n", "line 2: bad application name"),
    "long id": (f"id,psk\n{'é' * 33},{PSK}\n", "line 2: a module id is 1-64 bytes"),
    "quote": (f'id,psk\n"m,{PSK}\n', "line 2: unexpected end of data"),
}


@pytest.mark.parametrize(("content", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_names_its_first_bad_line(content: str | bytes, message: str) -> None:
    if isinstance(content, str):
        content = content.replace("{point}", p256_point().hex()).encode("utf-8")
    with pytest.raises(ImportFailed) as caught:
        parse_module_csv(content, suite, NOW)
    assert str(caught.value).startswith(message)
    assert caught.value.line == int(message.split()[1].rstrip(":"))


# -- provisioning checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "module_id", ["m", "IMEI-356938035643809", "é" * 32, "x" * 64, "modul 7", "日本"]
)
def test_good_module_ids(module_id: str) -> None:
    assert check_module_id(module_id) == module_id


@pytest.mark.parametrize(
    ("module_id", "message"),
    [
        ("", "1-64 bytes"),
        ("x" * 65, "1-64 bytes of UTF-8, not 65"),
        ("é" * 33, "not 66 bytes"),
        ("a\nb", "control character"),
        ("a\x85", "control character"),
        (" a", "white space"),
        ("a\udcff", "not valid UTF-8"),
    ],
)
def test_bad_module_ids(module_id: str, message: str) -> None:
    with pytest.raises(OperatorError, match=message):
        check_module_id(module_id)


def test_psk_and_kid_and_group_and_apps() -> None:
    assert parse_psk(PSK.upper()) == bytes.fromhex(PSK)
    assert len(parse_psk(bytes(range(64)).hex())) == 64
    for bad in ("ab" * 15, "ab" * 65, "abc", "00" * 16):
        with pytest.raises(OperatorError):
            parse_psk(bad)
    assert parse_kid("7") == 7 and parse_kid(9) == 9
    for bad_kid in ("0", "-1", "x", "\u0661"):
        with pytest.raises(OperatorError):
            parse_kid(bad_kid)
    assert check_group("fleet a") == "fleet a"
    for bad_group in ("", " g", "a\tb", "g" * 65):
        with pytest.raises(OperatorError):
            check_group(bad_group)
    assert check_app_names(["b", "a", "b"]) == ["a", "b"]
    with pytest.raises(OperatorError):
        check_app_names(["two words"])


def _spki(key: Any, encoding: serialization.Encoding) -> bytes:
    return key.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_public_key_formats_for_an_ec_suite() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    wire = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    compressed = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    p256 = suite("p256")
    assert parse_public_key(_spki(key, serialization.Encoding.PEM), p256) == wire
    assert parse_public_key(_spki(key, serialization.Encoding.DER), p256) == wire
    assert parse_public_key(wire, p256) == wire
    assert parse_public_key(wire.hex().encode() + b"\n", p256) == wire
    assert parse_public_key(b"0x" + wire.hex().upper().encode(), p256) == wire
    assert parse_public_key(_spki(key, serialization.Encoding.DER).hex().encode(), p256) == wire
    assert parse_public_key(compressed.hex().encode(), p256) == compressed
    assert parse_public_key(wire, p256, binary=True) == wire
    with pytest.raises(OperatorError, match="curve secp256r1, but suite p384 needs P-384"):
        parse_public_key(_spki(key, serialization.Encoding.PEM), suite("p384"))
    hybrid = b"\x06" + wire[1:]
    with pytest.raises(OperatorError, match="not an acceptable p256 public key"):
        parse_public_key(hybrid, p256)
    private_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(OperatorError, match="that is a private key"):
        parse_public_key(private_pem, p256)
    with pytest.raises(OperatorError, match="larger than"):
        parse_public_key(b"0" * 70000, p256)


def test_public_key_formats_for_x25519_and_rsa() -> None:
    signing = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = signing.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = suite("x25519")
    assert parse_public_key(raw, x) == raw
    assert parse_public_key(_spki(signing, serialization.Encoding.PEM), x) == raw
    agreement = x25519.X25519PrivateKey.generate().public_key()
    with pytest.raises(OperatorError, match="an X25519 key; module keys of suite x25519"):
        parse_public_key(_spki(agreement, serialization.Encoding.PEM), x)
    rsa_key = rsa.generate_private_key(65537, 2048).public_key()
    der = _spki(rsa_key, serialization.Encoding.DER)
    assert parse_public_key(_spki(rsa_key, serialization.Encoding.PEM), suite("rsa")) == der
    assert parse_public_key(der.hex().encode(), suite("rsa")) == der
    with pytest.raises(OperatorError, match="an RSA key, but suite p256 takes P-256 keys"):
        parse_public_key(_spki(rsa_key, serialization.Encoding.PEM), suite("p256"))
    with pytest.raises(OperatorError, match="an Ed25519 key, but suite rsa takes RSA keys"):
        parse_public_key(_spki(signing, serialization.Encoding.PEM), suite("rsa"))
    with pytest.raises(OperatorError, match="not an acceptable rsa public key"):
        parse_public_key(_spki(signing, serialization.Encoding.DER), suite("rsa"))


# -- instructions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "not_after"),
    [
        ("set", None, None),
        ("config", {"interval": 60, "mode": "eco", "list": [1, 2.5, True]}, 1_900_000_000),
        ("x" * 30, "a" * 300, 5),
        ("sleep", -(2**70), None),
    ],
)
def test_instruction_wire_size(kind: str, body: Any, not_after: int | None) -> None:
    encoded = cbor.encode(body)
    size = instruction_wire_size(kind, encoded, not_after)
    element = [IID_PLACEHOLDER, kind, body] + ([] if not_after is None else [not_after])
    assert size == len(cbor.encode(element))
    for iid in (1, 2**16, 2**32 - 1, 2**64 - 1):  # never smaller than the real size
        element[0] = iid
        assert size >= len(cbor.encode(element))


def test_new_operator_instruction() -> None:
    new = new_operator_instruction("m", "set", {"a": 1}, now=NOW, ttl=60, idempotency_key="k")
    assert new.not_after == NOW + 60 and new.source == "operator" and new.idempotency_key == "k"
    assert cbor.decode(new.body) == {"a": 1}
    assert new.wire_size == instruction_wire_size("set", new.body, NOW + 60)
    assert new_operator_instruction("m", "rehello", None, now=NOW).body == b"\xf6"
    refusals = [
        ({"kind": "keygen", "body": None}, "reserved"),
        ({"kind": "skey", "body": None}, "reserved"),
        ({"kind": "rehello", "body": {}}, "no body"),
        ({"kind": "", "body": None}, "printable"),
        ({"kind": "a\nb", "body": None}, "printable"),
        ({"kind": "set", "body": None, "not_after": NOW}, "not in the future"),
        ({"kind": "set", "body": None, "ttl": 0}, "at least 1 second"),
        ({"kind": "set", "body": None, "ttl": 5, "not_after": NOW + 9}, "not both"),
        ({"kind": "set", "body": "x" * 2000, "max_size": 1104}, "no reply can carry"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(OperatorError, match=message):
            new_operator_instruction("m", now=NOW, **kwargs)


def test_body_from_json() -> None:
    assert body_from_json(None) is None
    assert body_from_json('{"a": [1, null]}') == {"a": [1, None]}
    for bad in ("{", "NaN", "[Infinity]", "x" * 70000):
        with pytest.raises(OperatorError):
            body_from_json(bad)


# -- output ----------------------------------------------------------------------------------------


def test_format_table_and_time() -> None:
    assert out.format_table(("A", "LONG"), [("xyz", 1), ("b", "")]) == [
        "A    LONG",
        "xyz  1",
        "b",
    ]
    assert out.format_time(0) == "-" and out.format_time(None) == "-"
    assert out.format_time(1_750_000_000) == "2025-06-15 15:06:40Z"


def test_json_forms_never_show_secrets() -> None:
    module = Module("m", psk=b"\x42" * 32)
    document = out.module_json(module)
    assert document["has_psk"] is True
    assert "42" * 4 not in out.dumps(document)
    instruction = Instruction("m", 1, "set", cbor.encode({1: b"\x00"}), 10)
    assert out.instruction_json(instruction)["body"] == {"cbor": "a1014100"}
    assert out.body_json(cbor.encode({"a": [1]})) == {"a": [1]}


def test_progress_bar() -> None:
    stream = io.StringIO()
    ticks = iter([0.0, 0.05, 0.2, 0.3])
    progress = out.Progress(stream, 4, "checking", force=True, clock=lambda: next(ticks))
    progress.update(1)
    progress.update(2)  # within 0.1 s: not redrawn
    progress.update(3)
    progress.update(4)
    progress.update(4)  # the same count again: not redrawn
    progress.finish()
    frames = stream.getvalue().split("\r")[1:]
    assert [f.split("] ")[1].split()[0] for f in frames] == ["1/4", "3/4", "4/4"]
    assert frames[-1].endswith("100%\n")
    silent = io.StringIO()
    quiet = out.Progress(silent, 4, "x")  # StringIO is not a terminal
    quiet.update(4)
    quiet.finish()
    assert silent.getvalue() == ""


# -- speed -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_import_100k_rows_into_sqlite(tmp_path: Any) -> None:
    """Checking and storing 100 000 rows takes well under a minute (typically 3-4 s)."""
    from twisted.internet import reactor

    rows = [f"dev-{i:06d},{os.urandom(32).hex()},fleet{i % 7}" for i in range(100_000)]
    data = ("id,psk,group\n" + "\n".join(rows) + "\n").encode()
    started = time.monotonic()
    checked = parse_module_csv(data, suite, NOW)
    checked_at = time.monotonic()
    store = lookup(IModuleStoreFactory, "sqlite").create({}, str(tmp_path), reactor)
    await store.open()
    try:
        await store.add_modules(checked.modules, checked.keys)
        stored_at = time.monotonic()
        assert await store.count_modules() == 100_000
        last = await store.get_module("dev-099999")
        assert last is not None and last.psk == bytes.fromhex(rows[-1].split(",")[1])
    finally:
        await store.close()
    print(
        f"100k rows: checked in {checked_at - started:.2f} s, stored in "
        f"{stored_at - checked_at:.2f} s"
    )
    assert stored_at - started < 30


def test_config_errors_are_reported_per_line() -> None:
    def failing_lookup(name: str) -> Any:
        raise ConfigError(f"unknown cipher suite {name!r} (known: p256)")

    with pytest.raises(ImportFailed, match="line 2: unknown cipher suite 'zz' \\(known: p256\\)"):
        parse_module_csv(b"id,suite,kid,public_key\nm,zz,1,04\n", failing_lookup, NOW)
