"""Tests for m2mgw.apps.policy and the ``[app.NAME]`` configuration sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2mgw.apps.policy import (
    AppPolicies,
    AppPolicy,
    HourWindow,
    parse_hours,
    parse_networks,
    parse_permissions,
)
from m2mgw.config import load_config
from m2mgw.errors import ConfigError

DAY = 86400


def at(hh: int, mm: int = 0) -> int:
    return 20_000 * DAY + hh * 3600 + mm * 60


def test_permissions_parse_sorted_and_refuse_unknown_ones() -> None:
    assert parse_permissions("submit, rotate submit") == ("rotate", "submit")
    assert parse_permissions("") == ()
    with pytest.raises(ValueError, match="unknown permission 'launch'"):
        parse_permissions("submit launch")


def test_hours_windows_and_midnight() -> None:
    (day,) = parse_hours("08:00-18:00") or ()
    assert (day.contains(at(8)), day.contains(at(17, 59)), day.contains(at(18))) == (
        True,
        True,
        False,
    )
    assert not day.contains(at(7, 59))
    (night,) = parse_hours("22:00-06:00") or ()
    assert night.contains(at(23)) and night.contains(at(5, 59)) and not night.contains(at(6))
    (whole,) = parse_hours("00:00-24:00") or ()
    assert whole.contains(at(0)) and whole.contains(at(23, 59))
    assert str(night) == "22:00-06:00"
    assert parse_hours("") is None
    two = parse_hours("08:00-12:00 13:00-17:00")
    policy = AppPolicy(hours=two)
    assert policy.in_hours(at(9)) and not policy.in_hours(at(12, 30)) and policy.in_hours(at(16))
    assert policy.hours_text() == ["08:00-12:00", "13:00-17:00"]
    assert AppPolicy().in_hours(at(3)) and AppPolicy().hours_text() is None


@pytest.mark.parametrize("text", ["8-18", "08:00", "25:00-26:00", "08:00-08:00", "08:60-09:00"])
def test_bad_hours(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hours(text)


def test_networks_admit_addresses() -> None:
    policy = AppPolicy(networks=parse_networks("10.0.0.0/8, 2001:db8::/32 192.168.1.7"))
    assert policy.admits("10.9.8.7") and policy.admits("192.168.1.7")
    assert policy.admits("2001:db8::1") and policy.admits("::ffff:10.1.1.1")
    assert not policy.admits("192.168.1.8") and not policy.admits(None)
    assert not policy.admits("not-an-address")
    assert AppPolicy().admits(None) and AppPolicy().admits("203.0.113.9")
    with pytest.raises(ValueError, match="not a network"):
        parse_networks("10.0.0.1/8")


def test_policies_default_for_unnamed_applications() -> None:
    special = AppPolicy(permissions=("approve",))
    policies = AppPolicies(default=AppPolicy(), by_app={"ops": special})
    assert policies.for_app("ops") is special
    assert policies.for_app("billing").permissions == ("cancel", "submit")
    assert HourWindow(60, 120).contains(at(1, 30))


def test_app_sections_in_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "gw.conf"
    path.write_text(
        "[apps]\npermissions = submit\nretention_events = 50\n"
        "[app.billing]\npermissions = submit cancel rotate approve\nhours = 08:00-18:00\n"
        "networks = 10.0.0.0/8\nretention_age = 60\n"
        "[app.readonly]\npermissions =\n",
        encoding="utf-8",
    )
    config = load_config(str(path))
    billing = config.app_policies.for_app("billing")
    assert billing.permissions == ("approve", "cancel", "rotate", "submit")
    assert billing.hours_text() == ["08:00-18:00"]
    assert billing.admits("10.1.1.1") and not billing.admits("11.1.1.1")
    assert (billing.retention_events, billing.retention_age) == (50, 60)
    assert config.app_policies.for_app("readonly").permissions == ()
    assert config.app_policies.for_app("other").permissions == ("submit",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[app.billing]\ncolour = red\n", "unknown key 'colour' in \\[app.billing\\]"),
        ("[app.billing]\nhours = 9-5\n", "\\[app.billing\\] hours = '9-5'"),
        ("[app.bad name]\n", "not an application name"),
        ("[app.billing]\npermissions = fly\n", "unknown permission 'fly'"),
    ],
)
def test_bad_app_sections(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gw.conf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
