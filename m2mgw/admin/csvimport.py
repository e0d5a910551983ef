"""
Bulk provisioning from CSV: every row is checked before anything is written.

The file is UTF-8 (a byte-order mark is allowed) with a header row naming
the columns, in any order::

    id,psk,suite,kid,public_key,group,apps,status

``id`` is required; the others may be left out or empty.  ``psk`` and
``public_key`` are hex (``public_key`` in the suite's wire encoding or DER
SubjectPublicKeyInfo); ``suite`` and ``kid`` go with ``public_key``; ``apps``
is a space-separated list of application names; ``status`` is ``enabled``
(default), ``disabled`` or ``pending-approval``.  Each row needs a PSK or a
public key.  A public key is recorded ``active``, vouched for by the operator.

:func:`parse_module_csv` returns the records or raises
:class:`m2mgw.errors.ImportFailed` naming the first bad line; nothing is
written until every row has passed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from m2mgw.admin import OperatorError
from m2mgw.admin.provisioning import (
    check_app_names,
    check_group,
    check_module_id,
    parse_hex,
    parse_kid,
    parse_psk,
    parse_public_key,
    parse_status,
)
from m2mgw.errors import ConfigError, ImportFailed
from m2mgw.records import VOUCHED_BY_OPERATOR, KeyStatus, Module, ModuleKey, ModuleStatus

__all__ = ["COLUMNS", "MAX_CSV_BYTES", "ModuleImport", "parse_module_csv"]

#: The columns a file may have; ``id`` is required.
COLUMNS = ("id", "psk", "suite", "kid", "public_key", "group", "apps", "status")

#: The largest file accepted (about 3 million rows of a PSK and an id).
MAX_CSV_BYTES = 512 * 1024 * 1024

#: The longest cell accepted (a hex RSA-3072 key is under 1 KiB).
MAX_CELL = 4096


@dataclass(frozen=True)
class ModuleImport:
    """
    The checked content of a CSV file, ready for :meth:`~m2mgw.interfaces.IModuleStore.add_modules`.

    :ivar lines: the file line of each module, by identity (for error messages).
    :ivar apps: the applications of each module that has any.
    """

    modules: tuple[Module, ...]
    keys: tuple[ModuleKey, ...]
    apps: dict[str, list[str]]
    lines: dict[str, int]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ImportFailed(f"line {line}: not UTF-8 text", line) from None


def parse_module_csv(
    data: bytes,
    suite_lookup: Callable[[str], Any],
    now: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> ModuleImport:
    """
    Check a provisioning file and build the records.

    :param suite_lookup: finds a cipher suite by name, raising
        :class:`m2mgw.errors.ConfigError` (with the known names) for an unknown one.
    :param now: the import time, for ``created_at`` and ``activated_at``.
    :param progress: called with the number of rows checked so far, now and then.
    :raise m2mgw.errors.ImportFailed: the first problem, as ``line N: reason``.
    """
    if len(data) > MAX_CSV_BYTES:
        raise ImportFailed(f"the file is larger than {MAX_CSV_BYTES} bytes; split it")
    reader = csv.reader(io.StringIO(_decode(data), newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise ImportFailed("line 1: the file is empty (a header row is required)", 1) from None
    except csv.Error as e:
        raise ImportFailed(f"line 1: {e}", 1) from None
    index = _columns(header)
    modules: list[Module] = []
    keys: list[ModuleKey] = []
    apps: dict[str, list[str]] = {}
    lines: dict[str, int] = {}
    suites: dict[str, Any] = {}
    width = len(header)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ImportFailed(f"line {reader.line_num}: {e}", reader.line_num) from None
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != width:
            raise ImportFailed(f"line {line}: {len(row)} fields, but the header has {width}", line)
        try:
            module, key, module_apps = _row(row, index, suites, suite_lookup, now)
        except (OperatorError, ConfigError) as e:
            raise ImportFailed(f"line {line}: {e}", line) from None
        if module.module_id in lines:
            first = lines[module.module_id]
            raise ImportFailed(
                f"line {line}: module {module.module_id!r} is also on line {first}", line
            )
        lines[module.module_id] = line
        modules.append(module)
        if key is not None:
            keys.append(key)
        if module_apps:
            apps[module.module_id] = module_apps
        if progress is not None and len(modules) % 1000 == 0:
            progress(len(modules))
    if progress is not None:
        progress(len(modules))
    return ModuleImport(tuple(modules), tuple(keys), apps, lines)


def _columns(header: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, raw in enumerate(header):
        name = raw.strip().lower()
        if name not in COLUMNS:
            raise ImportFailed(f"line 1: unknown column {raw!r} (known: {', '.join(COLUMNS)})", 1)
        if name in index:
            raise ImportFailed(f"line 1: column {name!r} appears twice", 1)
        index[name] = position
    if "id" not in index:
        raise ImportFailed("line 1: the header has no 'id' column", 1)
    return index


def _row(
    row: Sequence[str],
    index: dict[str, int],
    suites: dict[str, Any],
    suite_lookup: Callable[[str], Any],
    now: int,
) -> tuple[Module, ModuleKey | None, list[str]]:
    def cell(name: str) -> str:
        position = index.get(name)
        if position is None:
            return ""
        value = row[position].strip()
        if len(value) > MAX_CELL:
            raise OperatorError(f"the {name} field is longer than {MAX_CELL} characters")
        return value

    module_id = check_module_id(cell("id"))
    psk_text, public_text = cell("psk"), cell("public_key")
    suite_name, kid_text = cell("suite"), cell("kid")
    psk = parse_psk(psk_text) if psk_text else None
    key = None
    if public_text:
        if not suite_name or not kid_text:
            raise OperatorError("a public_key needs a suite and a kid")
        suite = suites.get(suite_name)
        if suite is None:
            suite = suites[suite_name] = suite_lookup(suite_name)
        public = parse_public_key(parse_hex(public_text, "public_key"), suite, binary=True)
        key = ModuleKey(
            module_id=module_id,
            kid=parse_kid(kid_text),
            suite=suite_name,
            public=public,
            status=KeyStatus.ACTIVE,
            vouched_by=VOUCHED_BY_OPERATOR,
            created_at=now,
            activated_at=now,
        )
    elif suite_name or kid_text:
        raise OperatorError("suite and kid are only for a row with a public_key")
    if psk is None and key is None:
        raise OperatorError("the row has neither a psk nor a public_key")
    status_text = cell("status")
    module = Module(
        module_id=module_id,
        status=parse_status(status_text) if status_text else ModuleStatus.ENABLED,
        psk=psk,
        group=check_group(cell("group")) if cell("group") else "default",
        created_at=now,
    )
    return module, key, check_app_names(cell("apps").split())
