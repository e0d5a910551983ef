"""
The key lifecycle's configuration: ``[params.NAME]`` parameter sets checked
against their suite, the built-in set of every other suite, ``[rotation]``
and ``[rotation.GROUP]``, and the sample file documenting all of it.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from m2mgw.config import RotationConfig, RotationPolicy, load_config
from m2mgw.errors import ConfigError
from m2mgw.keys.params import ParameterSet, default_set, find_set

SAMPLE = Path(__file__).parents[1] / "etc" / "m2mgw.conf"


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gw.conf"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def test_every_suite_has_a_builtin_set_by_default(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, "[gateway]\nsuites = p256, p384, x25519, rsa\n"))
    assert dict(config.params) == {
        "p256": ParameterSet("p256", 1, "p256", 31536000, "P-256", hash="SHA-256"),
        "p384": ParameterSet("p384", 1, "p384", 31536000, "P-384", hash="SHA-384"),
        "x25519": ParameterSet("x25519", 1, "x25519", 31536000, "Ed25519", hash="SHA-256"),
        "rsa": ParameterSet("rsa", 1, "rsa", 31536000, None, rsa_bits=2048, hash="SHA-256"),
    }
    assert config.rotation == RotationConfig()
    assert config.rotation.default == RotationPolicy(0, 30 * 86400, "", 0)


def test_configured_sets_replace_their_suites_builtin(tmp_path: Path) -> None:
    config = load_config(
        config_file(
            tmp_path,
            """
            [gateway]
            suites = p256, x25519, rsa
            [protocol]
            key_ttl = 7200
            [params.ed-short]
            pid = 7
            suite = x25519
            ttl = 3600
            [params.ed-long]
            pid = 9
            suite = x25519
            [params.rsa3k]
            pid = 12
            suite = rsa
            rsa_bits = 3072
            """,
        )
    )
    sets = config.params
    assert sets["ed-short"] == ParameterSet(
        "ed-short", 7, "x25519", 3600, "Ed25519", hash="SHA-256"
    )
    assert sets["ed-long"].ttl == 7200  # key_ttl
    assert sets["rsa3k"].rsa_bits == 3072
    assert sorted(sets) == ["ed-long", "ed-short", "p256", "rsa3k"]
    assert default_set(sets, "x25519") == sets["ed-short"]  # the lowest pid
    assert find_set(sets, "12") == sets["rsa3k"]
    with pytest.raises(KeyError, match=r"no parameter set 'nope' \(known: ed-long, "):
        find_set(sets, "nope")


def test_rotation_policy_and_group_overrides(tmp_path: Path) -> None:
    config = load_config(
        config_file(
            tmp_path,
            """
            [gateway]
            suites = p256, x25519
            [rotation]
            rotate_after = 7776000
            renew_before = 0
            params = x25519
            check_interval = 60
            batch = 10
            rehello = no
            retire_suites = p256:x25519
            [rotation.north]
            grace = 3600
            renew_before = 86400
            """,
        )
    )
    rotation = config.rotation
    assert rotation.default == RotationPolicy(7776000, 0, "x25519", 0)
    assert rotation.for_group("north") == RotationPolicy(7776000, 86400, "x25519", 3600)
    assert rotation.for_group("south") is rotation.default
    assert (rotation.check_interval, rotation.batch, rotation.rehello) == (60.0, 10, False)
    assert dict(rotation.retire_suites) == {"p256": "x25519"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[params.a]\nsuite = p256\n", r"\[params.a\]: pid is required"),
        ("[params.a]\npid = 2\n", r"\[params.a\]: suite is required"),
        ("[params.a]\npid = 2\nsuite = p384\n", r"suite = 'p384': not one of the configured"),
        ("[params.a]\npid = 0\nsuite = p256\n", r"pid = '0': not between 1 and"),
        ("[params.a]\npid = 2\nsuite = p256\nttl = 60\n", r"ttl = '60': not between 3600"),
        (
            "[params.a]\npid = 2\nsuite = p256\ncolour = red\n",
            r"unknown key 'colour' in \[params.a\]",
        ),
        (
            "[params.a]\npid = 2\nsuite = p256\ncurve = P-384\n",
            r"\[params.a\]: curve 'P-384' is not the curve of suite 'p256'",
        ),
        (
            "[params.a]\npid = 2\nsuite = p256\nhash = SHA-384\n",
            r"\[params.a\]: .*SHA-384",
        ),
        (
            "[params.a]\npid = 2\nsuite = p256\neq = 23, 1, 1, 3, 10, 7, 4\n",
            r"\[params.a\]: custom curves not supported by suite p256",
        ),
        ("[params.a]\npid = 2\nsuite = p256\neq = 1, 2\n", r"a custom curve is 7 integers"),
        (
            "[params.a]\npid = 2\nsuite = p256\nrsa_bits = 2048\n",
            r"rsa_bits\) does not apply to suite 'p256'",
        ),
        (
            "[params.a]\npid = 2\nsuite = p256\n[params.b]\npid = 2\nsuite = x25519\n",
            r"\[params.b\]: pid 2 is also the pid of \[params.a\]",
        ),
        (
            "[params.x25519]\npid = 2\nsuite = p256\n",
            r"a set named after suite 'x25519' must be of that suite",
        ),
        ("[rotation]\nparams = nope\n", r"\[rotation\] params = 'nope': no such parameter set"),
        ("[rotation.north]\nparams = nope\n", r"\[rotation.north\] params = 'nope'"),
        ("[rotation.north]\nbatch = 5\n", r"unknown key 'batch' in \[rotation.north\]"),
        ("[rotation]\nretire_suites = p256\n", r"'p256' is not SUITE:PARAMETER-SET"),
        ("[rotation]\nretire_suites = p384:x25519\n", r"'p384' is not a configured suite"),
        ("[rotation]\nretire_suites = p256:p256\n", r"'p256' is a set of 'p256' itself"),
        ("[rotation]\nretire_suites = p256:x25519 p256:x25519\n", r"listed twice"),
        ("[rotation]\nrehello = maybe\n", r"rehello = 'maybe': not a boolean"),
    ],
)
def test_mistakes_are_one_line_and_say_where(tmp_path: Path, text: str, message: str) -> None:
    path = config_file(tmp_path, "[gateway]\nsuites = p256, x25519\n" + text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(path)


def _section(name: str) -> str:
    text = SAMPLE.read_text(encoding="utf-8")
    parts = re.split(r"^\[([^\]]+)\]\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))[name]


def _documented(text: str, key: str) -> bool:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(rf"(# )?{re.escape(key)} =.*", line):
            return i > 0 and lines[i - 1].startswith("#")
    return False


def test_the_sample_documents_every_key() -> None:
    rotation = _section("rotation")
    for key in (
        "rotate_after",
        "renew_before",
        "params",
        "grace",
        "check_interval",
        "batch",
        "rehello",
        "retire_suites",
    ):
        assert _documented(rotation, key), key
    assert "# [rotation.meters-north]" in rotation
    protocol = _section("protocol")  # the commented [params.NAME] example lives there
    assert "# [params.fleet-2025]" in protocol
    for key in ("pid", "suite", "ttl", "curve", "eq", "rsa_bits", "hash"):
        assert re.search(rf"^# {key} = ", protocol, re.MULTILINE), key
