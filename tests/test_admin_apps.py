"""``m2mgw-admin module apps`` and ``group apps``: which applications see a module."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted

from tests.test_admin_cli import PSK, InProcess, write_config


@pytest.fixture
def admin(tmp_path: Path) -> InProcess:
    return InProcess(write_config(tmp_path))


@pytest_twisted.ensureDeferred
async def test_module_apps_sets_shows_and_clears(admin: InProcess) -> None:
    await admin("module", "add", "m1", "--psk", PSK, "--app", "old")
    shown = await admin("module", "apps", "m1", "--json")
    assert shown.json() == {"id": "m1", "apps": ["old"]}
    changed = await admin("module", "apps", "m1", "billing", "ops", "billing")
    assert changed.stdout == "module m1: applications billing ops\n"
    assert (await admin("module", "apps", "m1", "--json")).json()["apps"] == ["billing", "ops"]
    cleared = await admin("module", "apps", "m1", "--none", "--json")
    assert cleared.json() == {"id": "m1", "apps": []}
    (await admin("module", "apps", "ghost", "ops")).assert_one_line_error()
    (await admin("module", "apps", "m1", "bad name")).assert_one_line_error()
    (await admin("module", "apps", "m1", "x", "--none")).assert_one_line_error()
    reasons = [e["reason"] for e in (await admin("security-events", "--json")).json()["events"]]
    assert reasons.count("module-apps") == 2


@pytest_twisted.ensureDeferred
async def test_group_apps_sets_every_module_of_the_group(admin: InProcess) -> None:
    for module_id, group in (("a", "north"), ("b", "north"), ("c", "south")):
        await admin("module", "add", module_id, "--psk", PSK, "--group", group)
    done = await admin("group", "apps", "north", "billing", "--json")
    assert done.json() == {"group": "north", "apps": ["billing"], "modules": 2}
    assert (await admin("module", "apps", "a", "--json")).json()["apps"] == ["billing"]
    assert (await admin("module", "apps", "c", "--json")).json()["apps"] == []
    (await admin("group", "apps", "nowhere", "billing")).assert_one_line_error()
