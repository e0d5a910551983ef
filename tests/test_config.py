"""Tests for m2mgw.config: defaults, the sample file, overrides and every kind of error."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import m2mgw.plugins
from m2mgw import registry
from m2mgw.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SUITES,
    AppListenerConfig,
    GatewayConfig,
    JobsConfig,
    ModuleListenerConfig,
    ProtocolPolicy,
    SourceConfig,
    StoreConfig,
    load_config,
)
from m2mgw.errors import ConfigError
from m2mgw.interfaces import IInstructionSourceFactory, IModuleStoreFactory

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "m2mgw.conf"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def test_defaults_without_a_file(in_tmp: Path) -> None:
    config = load_config(None)
    assert config.config_file is None
    assert config.data_dir == str(in_tmp / "var" / "m2mgw")
    assert config.suites == ("p256", "p256-ccm8", "p384", "x25519", "rsa") == DEFAULT_SUITES
    assert config.modules == ModuleListenerConfig("", 5740, 1232)
    assert config.apps == AppListenerConfig("", 5741, "rsa", 3072, 300, 65536)
    assert config.store.backend == "sqlite" and dict(config.store.options) == {}
    assert config.protocol == ProtocolPolicy()
    assert config.protocol.sid_bytes == 6 and config.protocol.alias_mode == "until-replaced"
    assert config.jobs == JobsConfig(60.0, 3600.0)
    assert config.sources == ()
    assert config.node_name  # the host name


def test_default_path_is_read_when_present(in_tmp: Path) -> None:
    (in_tmp / "etc").mkdir()
    write(in_tmp / DEFAULT_CONFIG_PATH, "[modules]\nport = 6000\n")
    config = load_config(None)
    assert config.modules.port == 6000
    assert config.config_file == DEFAULT_CONFIG_PATH


def test_config_is_frozen(in_tmp: Path) -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.modules.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.store.options["path"] = "x"  # type: ignore[index]


def test_sample_file_equals_the_defaults(in_tmp: Path) -> None:
    from_sample = load_config(str(SAMPLE))
    defaults = load_config(None)
    assert dataclasses.replace(from_sample, config_file=None) == defaults
    assert from_sample.config_file == str(SAMPLE)


def _sample_sections() -> dict[str, str]:
    """Section name -> the text of that section in the sample file."""
    text = SAMPLE.read_text(encoding="utf-8")
    parts = re.split(r"^\[([^\]]+)\]\s*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _documented(section_text: str, key: str) -> bool:
    """Whether ``key`` is set or shown commented out, with a comment above it."""
    lines = section_text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(rf"(# )?{re.escape(key)} =.*", line):
            return i > 0 and lines[i - 1].startswith("#")
    return False


@pytest.mark.parametrize(
    ("section", "cls"),
    [
        ("modules", ModuleListenerConfig),
        ("apps", AppListenerConfig),
        ("protocol", ProtocolPolicy),
        ("jobs", JobsConfig),
    ],
)
def test_sample_documents_every_key(section: str, cls: type) -> None:
    sections = _sample_sections()
    for f in dataclasses.fields(cls):
        assert _documented(sections[section], f.name), f"[{section}] {f.name}"


def test_sample_documents_gateway_and_store_keys() -> None:
    sections = _sample_sections()
    for key in ("data_dir", "node_name", "suites"):
        assert _documented(sections["gateway"], key), key
    assert _documented(sections["store"], "backend")


def test_sample_documents_every_shipped_store_and_source_option() -> None:
    sections = _sample_sections()
    stores = registry.all_plugins(IModuleStoreFactory)
    assert {"memory", "sqlite"} <= set(stores)
    for name, factory in stores.items():
        assert f"store.{name}" in sections, f"[store.{name}] is not in the sample"
        for option in factory.options:
            assert _documented(sections[f"store.{name}"], option), f"[store.{name}] {option}"
    text = SAMPLE.read_text(encoding="utf-8")
    for name, factory in registry.all_plugins(IInstructionSourceFactory).items():
        assert f"[source.{name}]" in text, f"[source.{name}] is not in the sample"
        for option in factory.options:
            assert re.search(rf"^# {re.escape(option)} =", text, re.MULTILINE), option


def test_file_values_and_overrides(in_tmp: Path) -> None:
    path = write(
        in_tmp / "gw.conf",
        """
        [gateway]
        data_dir = data
        node_name = gw-7
        suites = p256 x25519
        [modules]
        address = ::1
        port = 0
        [apps]
        address = 127.0.0.1
        port = 6001
        key_type = ec
        [store]
        backend = memory
        [store.sqlite]
        path = other.sqlite
        [protocol]
        sign_replies = off
        alias_mode = once
        default_suite = x25519
        [jobs]
        expiry_interval = 0.5
        """,
    )
    config = load_config(
        path, {"modules.port": "7000", "store.backend": "sqlite", "gateway.data_dir": "/srv/gw"}
    )
    assert config.data_dir == "/srv/gw"
    assert config.node_name == "gw-7"
    assert config.suites == ("p256", "x25519")
    assert config.modules == ModuleListenerConfig("::1", 7000, 1232)
    assert config.apps.address == "127.0.0.1" and config.apps.port == 6001
    assert config.apps.key_type == "ec"
    assert config.store == StoreConfig("sqlite", {"path": "other.sqlite"})
    assert config.protocol.sign_replies is False and config.protocol.alias_mode == "once"
    assert config.jobs.expiry_interval == 0.5

    plain = load_config(path)
    assert plain.modules.port == 0
    assert plain.data_dir == str(in_tmp / "data")
    assert plain.store == StoreConfig("memory", {})  # [store.sqlite] is checked, not used


def test_an_empty_plugin_section_is_allowed(in_tmp: Path) -> None:
    path = write(in_tmp / "gw.conf", "[store.sqlite]\n[store.memory]\n")
    assert load_config(path).store.backend == "sqlite"


ERRORS = [
    ("[bogus]\nx = 1\n", r"unknown section \[bogus\] \(known: gateway, modules"),
    ("[DEFAULT]\nport = 1\n", r"unknown section \[DEFAULT\]"),
    ("[empty]\n", r"unknown section \[empty\]"),
    (
        "[modules]\nprot = 1\n",
        r"unknown key 'prot' in \[modules\] \(known: address, max_datagram, poll_apps_ms, port,"
        r" receive_buffer, reuse_port\)",
    ),
    ("[modules]\nport = abc\n", r"\[modules\] port = 'abc': not a port number"),
    ("[modules]\nport = 65536\n", r"\[modules\] port = '65536': not a port number"),
    ("[apps]\nport = -1\n", r"\[apps\] port = '-1': not a port number"),
    (
        "[modules]\naddress = example.com\n",
        r"\[modules\] address = 'example.com': not an IP address",
    ),
    ("[modules]\nmax_datagram = 2000\n", r"max_datagram = '2000': not between 256 and 1472"),
    ("[apps]\nkey_type = dsa\n", r"key_type = 'dsa': not one of rsa, ec"),
    ("[apps]\nrsa_bits = 1024\n", r"rsa_bits = '1024': not between 2048 and 8192"),
    ("[protocol]\nsign_replies = maybe\n", r"sign_replies = 'maybe': not a boolean"),
    ("[protocol]\nsid_bytes = 9\n", r"sid_bytes = '9': not between 4 and 8"),
    ("[protocol]\nalias_mode = twice\n", r"alias_mode = 'twice': not one of until-replaced, once"),
    ("[jobs]\nexpiry_interval = 0\n", r"expiry_interval = '0': must be a positive"),
    ("[jobs]\nexpiry_interval = nan\n", r"expiry_interval = 'nan': must be a positive"),
    ("[gateway]\nnode_name = a b\n", r"node_name = 'a b': must be"),
    ("[gateway]\ndata_dir =\n", r"data_dir = '': must not be empty"),
    (
        "[gateway]\nsuites = p256 ecc\n",
        r"\[gateway\] suites: unknown cipher suite 'ecc' "
        r"\(known: p256, p256-ccm8, p384, rsa, x25519\)",
    ),
    ("[gateway]\nsuites = p256 p256\n", r"'p256' is listed twice"),
    ("[gateway]\nsuites = ,\n", r"must name at least one"),
    (
        "[gateway]\nsuites = x25519\n",
        r"\[protocol\] default_suite = 'p256'.*not one of the configured suites \(x25519\)",
    ),
    (
        "[protocol]\ndefault_suite = p384\n[gateway]\nsuites = p256\n",
        r"\[protocol\] default_suite: 'p384' is not one of",
    ),
    (
        "[store]\nbackend = oracle\n",
        r"\[store\] backend: unknown store 'oracle' \(known: memory, postgres, sqlite\)",
    ),
    (
        "[store.oracle]\n",
        r"\[store.oracle\]: unknown store 'oracle' \(known: memory, postgres, sqlite\)",
    ),
    (
        "[store.sqlite]\npaht = x\n",
        r"unknown key 'paht' in \[store.sqlite\] "
        r"\(known: busy_timeout_ms, group_commit_max, path, synchronous\)",
    ),
    ("[store.memory]\npath = x\n", r"unknown key 'path' in \[store.memory\] \(known: none\)"),
    (
        "[source.carrier-pigeon]\n",
        r"\[source.carrier-pigeon\]: unknown instruction source 'carrier-pigeon'",
    ),
    (
        "[modules]\nport = 1\nport = 2\n",
        r"cannot parse config file .*option 'port' in section 'modules' already exists",
    ),
    ("port = 1\n", r"cannot parse config file .*no section headers"),
    ("[modules]\nthis line is wrong\n", r"cannot parse config file .*"),
]


@pytest.mark.parametrize(("text", "pattern"), ERRORS)
def test_errors_are_one_line_and_say_where(in_tmp: Path, text: str, pattern: str) -> None:
    path = write(in_tmp / "bad.conf", text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    assert str(in_tmp / "bad.conf") in message or "built-in default" in message


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"modules.port": "x"}, r"^command line: \[modules\] port = 'x': not a port number"),
        ({"apps.port": "99999"}, r"^command line: \[apps\] port = '99999'"),
        ({"store.backend": "nope"}, r"^command line: \[store\] backend: unknown store 'nope'"),
        ({"modules.colour": "red"}, r"^command line: unknown key 'colour' in \[modules\]"),
        ({"port": "1"}, r"'port' is not a SECTION.KEY setting"),
    ],
)
def test_override_errors_name_the_command_line(
    in_tmp: Path, overrides: dict[str, str], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_unreadable_or_missing_file(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read config file .*nope.conf: No such file"):
        load_config(str(in_tmp / "nope.conf"))
    with pytest.raises(ConfigError, match=r"^cannot read config file .*: Is a directory"):
        load_config(str(in_tmp))
    (in_tmp / "latin1.conf").write_bytes(b"[gateway]\nnode_name = caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8"):
        load_config(str(in_tmp / "latin1.conf"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of mode 000")
def test_file_without_permission(in_tmp: Path) -> None:
    path = write(in_tmp / "secret.conf", "[modules]\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match=r"Permission denied"):
        load_config(path)


def test_no_interpolation(in_tmp: Path) -> None:
    path = write(in_tmp / "gw.conf", "[store.sqlite]\npath = 100%(x)s.sqlite\n")
    assert load_config(path).store.options["path"] == "100%(x)s.sqlite"


# -- instruction sources, with a plugin made for the test ----------------------------

SOURCE_PLUGIN = """
from zope.interface import implementer
from twisted.plugin import IPlugin
from m2mgw.interfaces import IInstructionSourceFactory


@implementer(IPlugin, IInstructionSourceFactory)
class TestSourceFactory:
    def __init__(self, name):
        self.name = name
        self.options = {"directory": "where instructions are dropped", "interval": "seconds"}

    def create(self, options, data_dir, reactor):
        raise NotImplementedError


spool = TestSourceFactory("test-spool")
inbox = TestSourceFactory("test-inbox")
"""


@pytest.fixture
def source_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "m2mgw_test_sources.py").write_text(SOURCE_PLUGIN, encoding="utf-8")
    monkeypatch.setattr(m2mgw.plugins, "__path__", [*m2mgw.plugins.__path__, str(directory)])
    yield


def test_sources_in_file_order_with_checked_options(in_tmp: Path, source_plugins: None) -> None:
    path = write(
        in_tmp / "gw.conf",
        """
        [source.test-inbox]
        [source.test-spool]
        directory = var/spool
        """,
    )
    config = load_config(path)
    assert config.sources == (
        SourceConfig("test-inbox", {}),
        SourceConfig("test-spool", {"directory": "var/spool"}),
    )
    bad = write(in_tmp / "bad.conf", "[source.test-spool]\ndirectroy = x\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'directroy' in \[source.test-spool\] \(known: directory, interval\)",
    ):
        load_config(bad)
    unknown = write(in_tmp / "unknown.conf", "[source.nope]\n")
    with pytest.raises(ConfigError, match=r"\(known: (.+, )?test-inbox, test-spool\)"):
        load_config(unknown)


def test_gateway_config_has_the_documented_defaults() -> None:
    config = GatewayConfig()
    assert config.data_dir == "var/m2mgw"
    assert config.store == StoreConfig()
    assert config.sources == ()
