"""
The gateway's configuration: an INI file turned into frozen, validated objects.

:func:`load_config` reads ``etc/m2mgw.conf`` (or the file given), applies the
command line's overrides and checks every value: unknown sections and keys,
malformed numbers, ports and addresses, and names of cipher suites, stores and
instruction sources that match no installed plugin all raise
:class:`m2mgw.errors.ConfigError` with one line a person can act on.  Nothing
here opens a socket, a database or a key file; :mod:`m2mgw.tap` turns the
result into services.

Sections (``etc/m2mgw.conf`` documents every key)::

    [gateway]        data_dir, node_name, suites
    [modules]        address, port, max_datagram,         (UDP, MGP/1)
                     poll_apps_ms, reuse_port, receive_buffer
    [apps]           address, port, key_type, rsa_bits,   (mutual TLS, JSON lines)
                     idle_timeout, max_line, ping_interval,
                     max_unacked, event_poll_interval,
                     permissions, retention_events, retention_age
    [app.NAME]       permissions, hours, networks,        (one application)
                     retention_events, retention_age
    [store]          backend, keep_reports, keep_security_events, keep_instructions
    [store.NAME]     the options of store plugin NAME
    [protocol]       MGP/1 policy
    [params.NAME]    a parameter set for new module keys (MGP/1 §9)
    [rotation]       key rotation policy; [rotation.GROUP] per module group
    [jobs]           expiry_interval, housekeeping_interval
    [source.NAME]    enables instruction source plugin NAME, with its options
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from m2mgw import registry
from m2mgw.apps.policy import (
    DEFAULT_PERMISSIONS,
    DEFAULT_RETENTION_AGE,
    DEFAULT_RETENTION_EVENTS,
    AppPolicies,
    AppPolicy,
    parse_hours,
    parse_networks,
    parse_permissions,
)
from m2mgw.errors import BadParameters, ConfigError
from m2mgw.interfaces import ICipherSuite, IInstructionSourceFactory, IModuleStoreFactory
from m2mgw.keys.params import ParameterSet, builtin_set, complete_sets
from m2mgw.modules.udp import DEFAULT_RECEIVE_BUFFER, MAX_RECEIVED_DATAGRAM
from m2mgw.tls import TLS_KEY_TYPES, is_valid_app_name

#: The file :func:`load_config` reads when no path is given, if it exists
#: (relative to the current directory).
DEFAULT_CONFIG_PATH = "etc/m2mgw.conf"

#: The cipher suites every gateway offers unless configured otherwise (MGP/1 §3).
DEFAULT_SUITES: tuple[str, ...] = ("p256", "p256-ccm8", "p384", "x25519", "rsa")

#: ``ProtocolPolicy.alias_mode`` values: an alias is accepted as a HELLO hint
#: until the next one replaces it, or only once.
ALIAS_MODES: tuple[str, ...] = ("until-replaced", "once")

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _default_node_name() -> str:
    """The host name, which names this node in logs and in a shared store."""
    return socket.gethostname() or "m2mgw"


@dataclass(frozen=True)
class ModuleListenerConfig:
    """
    The UDP listener modules talk MGP/1 to (``[modules]``).

    :ivar address: the IP address to bind (``""``: every interface).
    :ivar port: the UDP port (0: any free port, for tests).
    :ivar max_datagram: the largest datagram the gateway sends (MGP/1 §1).
    :ivar poll_apps_ms: when a module wakes with nothing queued, ask its
        connected applications for an instruction and wait this many
        milliseconds for one before replying (0: never ask).
    :ivar reuse_port: bind with ``SO_REUSEPORT``, so that several gateway
        processes on one host share the port.
    :ivar receive_buffer: the socket's receive buffer (``SO_RCVBUF``) in
        bytes; 0 keeps the system's default.
    """

    address: str = ""
    port: int = 5740
    max_datagram: int = 1232
    poll_apps_ms: int = 0
    reuse_port: bool = False
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER


@dataclass(frozen=True)
class AppListenerConfig:
    """
    The mutual-TLS listener application servers connect to (``[apps]``).

    :ivar key_type: the type of the gateway's TLS key, created on first start
        (one of :data:`m2mgw.tls.TLS_KEY_TYPES`: ``rsa`` or ``ec``).
    :ivar rsa_bits: its size when it is an RSA key.
    :ivar idle_timeout: seconds of silence after which a connection is
        closed (0: never).
    :ivar max_line: the longest request line accepted, in bytes.
    :ivar ping_interval: seconds without sending anything after which the
        gateway sends a ``ping`` event.
    :ivar max_unacked: the most events sent to a connection beyond the
        application's acknowledged position.
    :ivar event_poll_interval: seconds between checks for events appended by
        other processes (``m2mgw-admin``, another node).
    :ivar permissions: what applications without an ``[app.NAME]`` section may do.
    :ivar retention_events: the most unacknowledged events kept per
        application (0: no limit), unless its ``[app.NAME]`` says otherwise.
    :ivar retention_age: the age in seconds beyond which unacknowledged events
        are dropped (0: no limit), unless its ``[app.NAME]`` says otherwise.
    """

    address: str = ""
    port: int = 5741
    key_type: str = "rsa"
    rsa_bits: int = 3072
    idle_timeout: int = 300
    max_line: int = 65536
    ping_interval: int = 60
    max_unacked: int = 1000
    event_poll_interval: float = 2.0
    permissions: tuple[str, ...] = DEFAULT_PERMISSIONS
    retention_events: int = DEFAULT_RETENTION_EVENTS
    retention_age: int = DEFAULT_RETENTION_AGE


@dataclass(frozen=True)
class StoreConfig:
    """
    The module database (``[store]`` and ``[store.BACKEND]``).

    :ivar backend: the name of an :class:`~m2mgw.interfaces.IModuleStoreFactory` plugin.
    :ivar options: the ``[store.BACKEND]`` section, keys checked against the plugin.
    :ivar keep_reports: seconds a module report is kept after it arrived (0: for ever).
    :ivar keep_security_events: seconds a security event (the audit trail) is kept.
    :ivar keep_instructions: seconds a confirmed, failed, expired or cancelled
        instruction is kept after its last change.
    """

    backend: str = "sqlite"
    options: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    keep_reports: int = 30 * 86400
    keep_security_events: int = 365 * 86400
    keep_instructions: int = 90 * 86400

    def retention(self, now: int) -> dict[str, int]:
        """
        The times to give :meth:`~m2mgw.interfaces.IModuleStore.purge` at
        ``now``; the kinds kept for ever are left out.
        """
        kept = {
            "reports": self.keep_reports,
            "security_events": self.keep_security_events,
            "instructions": self.keep_instructions,
        }
        return {kind: now - seconds for kind, seconds in kept.items() if seconds}


@dataclass(frozen=True)
class ProtocolPolicy:
    """
    MGP/1 policy (``[protocol]``); the spec names each default.

    :ivar sid_bytes: session identifier length, 4-8 (MGP/1 §6).
    :ivar session_lifetime: seconds a session lives after its HELLO.
    :ivar replay_window: how many recent DATA counters are remembered (MGP/1 §8).
    :ivar sign_replies: sign HELLO_REPLY with the server key.
    :ivar aliases: issue a transitory alias in every HELLO_REPLY (MGP/1 §7).
    :ivar alias_mode: ``"until-replaced"`` or ``"once"``.
    :ivar max_attempts: replies an instruction rides in before it is ``failed``.
    :ivar retransmit_seconds: how long an exact duplicate datagram is answered
        from the retransmission cache (MGP/1 §1, §8.4).
    :ivar psk_single_use: refuse PSK authentication once a module key is active.
    :ivar time_in_data_reply: put the gateway's time in every DATA_REPLY.
    :ivar default_suite: the suite offered to modules that do not choose.
    :ivar key_ttl: lifetime in seconds of a module key registered without
        Params (unsolicited) and the ``ttl`` of the gateway's default Params.
    :ivar alias_lifetime: seconds an unused alias stays valid.
    """

    sid_bytes: int = 6
    session_lifetime: int = 86400
    replay_window: int = 64
    sign_replies: bool = True
    aliases: bool = True
    alias_mode: str = "until-replaced"
    max_attempts: int = 8
    retransmit_seconds: int = 60
    psk_single_use: bool = True
    time_in_data_reply: bool = False
    default_suite: str = "p256"
    key_ttl: int = 365 * 86400
    alias_lifetime: int = 30 * 86400


@dataclass(frozen=True)
class JobsConfig:
    """
    Periodic jobs (``[jobs]``), intervals in seconds.

    :ivar expiry_interval: how often expired sessions, aliases, instructions
        and keys are swept (:meth:`~m2mgw.interfaces.IModuleStore.expire`).
    :ivar housekeeping_interval: how often the gateway logs its counters.
    :ivar security_interval: how often the counted drops are written to the
        store as aggregated security events (MGP/1 §11).
    :ivar server_key_interval: how often retiring server keys are checked
        (and retired when their time has come) and the server keys reloaded
        from the data directory and the store (SIGHUP reloads at once).
    :ivar retention_interval: how often the applications' outboxes are
        checked against their retention limits.
    """

    expiry_interval: float = 60.0
    housekeeping_interval: float = 3600.0
    security_interval: float = 10.0
    retention_interval: float = 300.0
    server_key_interval: float = 60.0


@dataclass(frozen=True)
class RotationPolicy:
    """
    When a module's key is rotated (``[rotation]``, or ``[rotation.GROUP]``
    for the modules of one group); times in seconds.

    :ivar rotate_after: rotate an active key this long after its activation
        (0: never by age).
    :ivar renew_before: rotate an active key this long before its
        ``not_after`` (0: never by expiry).
    :ivar params: the parameter set of new keys (``""``: the default set of
        the active key's suite).
    :ivar grace: how long after its expiry a module's last active key may
        still open a session to vouch for its successor (0: not at all).
    """

    rotate_after: int = 0
    renew_before: int = 30 * 86400
    params: str = ""
    grace: int = 0


@dataclass(frozen=True)
class RotationConfig:
    """
    The rotation policy (``[rotation]`` and ``[rotation.GROUP]``).

    :ivar default: the policy of the modules of every group without its own.
    :ivar groups: the policies of groups with a ``[rotation.GROUP]`` section.
    :ivar check_interval: seconds between runs of the rotation job.
    :ivar batch: the most ``keygen`` instructions one run queues.
    :ivar rehello: after accepting a key registration that answers a
        ``keygen``, queue a ``rehello`` so the module activates the new key at once.
    :ivar retire_suites: suite being retired -> the name of the parameter set
        its modules' keys are replaced from (a set of another suite).
    """

    default: RotationPolicy = field(default_factory=RotationPolicy)
    groups: Mapping[str, RotationPolicy] = field(default_factory=lambda: _EMPTY_POLICIES)
    check_interval: float = 3600.0
    batch: int = 1000
    rehello: bool = True
    retire_suites: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def for_group(self, group: str) -> RotationPolicy:
        """The policy of the modules of ``group``."""
        return self.groups.get(group, self.default)


_EMPTY_POLICIES: Mapping[str, RotationPolicy] = MappingProxyType({})


@dataclass(frozen=True)
class SourceConfig:
    """
    One enabled instruction source (a ``[source.NAME]`` section).

    :ivar name: the name of an :class:`~m2mgw.interfaces.IInstructionSourceFactory` plugin.
    :ivar options: the section's keys, checked against the plugin.
    """

    name: str
    options: Mapping[str, str]


@dataclass(frozen=True)
class GatewayConfig:
    """
    Everything the gateway is configured with.

    :ivar data_dir: the data directory (keys and the SQLite database); an
        absolute path once :func:`load_config` made it.
    :ivar node_name: this node's name (default: the host name).
    :ivar suites: the cipher suites served, each with its own server key.
    :ivar sources: the enabled instruction sources, in file order.
    :ivar params: the parameter sets by name (``[params.NAME]``, and the
        built-in set of every suite that has none, named after the suite).
    :ivar rotation: the key rotation policy.
    :ivar app_policies: each application's permissions, hours, networks and
        retention (``[app.NAME]``; the ``[apps]`` defaults for the others).
    :ivar config_file: the file the configuration was read from, if any.
    """

    data_dir: str = "var/m2mgw"
    node_name: str = field(default_factory=_default_node_name)
    suites: tuple[str, ...] = DEFAULT_SUITES
    modules: ModuleListenerConfig = field(default_factory=ModuleListenerConfig)
    apps: AppListenerConfig = field(default_factory=AppListenerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    protocol: ProtocolPolicy = field(default_factory=ProtocolPolicy)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    sources: tuple[SourceConfig, ...] = ()
    app_policies: AppPolicies = field(default_factory=AppPolicies)
    params: Mapping[str, ParameterSet] = field(default_factory=lambda: _EMPTY_SETS)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    config_file: str | None = None


# --- value parsers: each takes the raw string, returns the value or raises ValueError ---


def _parse_int(low: int, high: int) -> Callable[[str], int]:
    """A parser of decimal integers in ``[low, high]``."""

    def parse(raw: str) -> int:
        text = raw.strip()
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError("not an integer")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"not between {low} and {high}")
        return value

    return parse


def _parse_port(raw: str) -> int:
    """A port number; 0 asks the system for any free port."""
    try:
        return _parse_int(0, 65535)(raw)
    except ValueError:
        raise ValueError("not a port number (1-65535, or 0 for any free port)") from None


def _parse_interval(raw: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


_BOOLEANS = {
    "1": True,
    "yes": True,
    "true": True,
    "on": True,
    "0": False,
    "no": False,
    "false": False,
    "off": False,
}


def _parse_bool(raw: str) -> bool:
    """``yes/no``, ``true/false``, ``on/off`` or ``1/0``."""
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError("not a boolean (yes/no, true/false, on/off, 1/0)") from None


def _parse_address(raw: str) -> str:
    """An IPv4 or IPv6 address literal, or empty for every interface."""
    text = raw.strip()
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("not an IP address (leave it empty for every interface)") from None


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser accepting one of ``choices``."""

    def parse(raw: str) -> str:
        text = raw.strip()
        if text not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return text

    return parse


def _parse_node_name(raw: str) -> str:
    """A host-name-like node name: letters, digits, ``.``, ``_`` and ``-``."""
    text = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,253}", text):
        raise ValueError("must be 1-253 letters, digits, '.', '_' or '-'")
    return text


def _parse_path(raw: str) -> str:
    """A non-empty path; ``~`` is expanded and a relative path is made absolute."""
    text = raw.strip()
    if not text:
        raise ValueError("must not be empty")
    return os.path.abspath(os.path.expanduser(text))


def _parse_names(raw: str) -> tuple[str, ...]:
    """A comma- or space-separated list of distinct names."""
    names = tuple(part for part in re.split(r"[\s,]+", raw.strip()) if part)
    if not names:
        raise ValueError("must name at least one")
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{name!r} is listed twice")
    return names


def _parse_str(raw: str) -> str:
    """Any string, stripped."""
    return raw.strip()


def _parse_curve(raw: str) -> tuple[int, ...]:
    """A custom curve: ``p, a, b, gx, gy, n, h`` as decimal or ``0x`` hexadecimal integers."""
    parts = [part for part in re.split(r"[\s,]+", raw.strip()) if part]
    if len(parts) != 7:
        raise ValueError("a custom curve is 7 integers: p, a, b, gx, gy, n, h")
    try:
        return tuple(int(part, 0) for part in parts)
    except ValueError:
        raise ValueError("a custom curve is 7 integers: p, a, b, gx, gy, n, h") from None


def _parse_retirements(raw: str) -> tuple[tuple[str, str], ...]:
    """``SUITE:SET`` pairs: a suite being retired and the parameter set replacing its keys."""
    pairs = []
    for part in re.split(r"[\s,]+", raw.strip()):
        if not part:
            continue
        suite, colon, target = part.partition(":")
        if not colon or not suite or not target:
            raise ValueError(f"{part!r} is not SUITE:PARAMETER-SET (e.g. p256:x25519)")
        pairs.append((suite, target))
    suites = [suite for suite, _ in pairs]
    for suite in suites:
        if suites.count(suite) > 1:
            raise ValueError(f"suite {suite!r} is listed twice")
    return tuple(pairs)


_EMPTY_SETS: Mapping[str, ParameterSet] = MappingProxyType({})
#: Seconds a key may live or wait: up to 20 years.
_MAX_KEY_SECONDS = 20 * 366 * 86400


#: For each fixed section: key -> parser.  Keys equal the dataclass field names.
_SECTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "gateway": {
        "data_dir": _parse_path,
        "node_name": _parse_node_name,
        "suites": _parse_names,
    },
    "modules": {
        "address": _parse_address,
        "port": _parse_port,
        "max_datagram": _parse_int(256, MAX_RECEIVED_DATAGRAM),
        "poll_apps_ms": _parse_int(0, 5000),
        "reuse_port": _parse_bool,
        "receive_buffer": _parse_int(0, 1 << 30),
    },
    "apps": {
        "address": _parse_address,
        "port": _parse_port,
        "key_type": _parse_choice(TLS_KEY_TYPES),
        "rsa_bits": _parse_int(2048, 8192),
        "idle_timeout": _parse_int(0, 7 * 86400),
        "max_line": _parse_int(1024, 16 * 1024 * 1024),
        "ping_interval": _parse_int(1, 86400),
        "max_unacked": _parse_int(1, 1_000_000),
        "event_poll_interval": _parse_interval,
        "permissions": parse_permissions,
        "retention_events": _parse_int(0, 2**62),
        "retention_age": _parse_int(0, 20 * 366 * 86400),
    },
    "store": {
        "backend": _parse_str,
        "keep_reports": _parse_int(0, 100 * 365 * 86400),
        "keep_security_events": _parse_int(0, 100 * 365 * 86400),
        "keep_instructions": _parse_int(0, 100 * 365 * 86400),
    },
    "protocol": {
        "sid_bytes": _parse_int(4, 8),
        "session_lifetime": _parse_int(60, 366 * 86400),
        "replay_window": _parse_int(1, 1024),
        "sign_replies": _parse_bool,
        "aliases": _parse_bool,
        "alias_mode": _parse_choice(ALIAS_MODES),
        "max_attempts": _parse_int(1, 1000),
        "retransmit_seconds": _parse_int(0, 3600),
        "psk_single_use": _parse_bool,
        "time_in_data_reply": _parse_bool,
        "default_suite": _parse_str,
        "key_ttl": _parse_int(3600, 20 * 366 * 86400),
        "alias_lifetime": _parse_int(60, 366 * 86400),
    },
    "rotation": {
        "rotate_after": _parse_int(0, _MAX_KEY_SECONDS),
        "renew_before": _parse_int(0, _MAX_KEY_SECONDS),
        "params": _parse_str,
        "grace": _parse_int(0, 366 * 86400),
        "check_interval": _parse_interval,
        "batch": _parse_int(1, 1_000_000),
        "rehello": _parse_bool,
        "retire_suites": _parse_retirements,
    },
    "jobs": {
        "expiry_interval": _parse_interval,
        "housekeeping_interval": _parse_interval,
        "security_interval": _parse_interval,
        "retention_interval": _parse_interval,
        "server_key_interval": _parse_interval,
    },
}

#: The keys of an ``[app.NAME]`` section: key -> parser.
_APP_SECTION: dict[str, Callable[[str], Any]] = {
    "permissions": parse_permissions,
    "hours": parse_hours,
    "networks": parse_networks,
    "retention_events": _parse_int(0, 2**62),
    "retention_age": _parse_int(0, 20 * 366 * 86400),
}

#: The keys of a ``[rotation.GROUP]`` section (the rest of ``[rotation]`` is global).
_ROTATION_GROUP_SECTION: dict[str, Callable[[str], Any]] = {
    key: _SECTIONS["rotation"][key] for key in ("rotate_after", "renew_before", "params", "grace")
}

#: The keys of a ``[params.NAME]`` section.
_PARAMS_SECTION: dict[str, Callable[[str], Any]] = {
    "pid": _parse_int(1, 2**31 - 1),
    "suite": _parse_str,
    "ttl": _parse_int(3600, _MAX_KEY_SECONDS),
    "curve": _parse_str,
    "eq": _parse_curve,
    "rsa_bits": _parse_int(2048, 3072),
    "hash": _parse_str,
}

#: Sections named ``PREFIX.NAME``, one per plugin.
_PLUGIN_SECTION_PREFIXES = ("store", "source")
#: Sections named ``PREFIX.NAME`` for a parameter set or a module group.
_NAMED_SECTION_PREFIXES = ("params", "rotation")


class _Settings:
    """
    The raw configuration values, remembering where each came from, so an
    error message can point at the file or at the command line.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin
        #: section -> key -> (raw value, where it came from); sections in file order
        self.sections: dict[str, dict[str, tuple[str, str]]] = {}
        #: section -> where it was first seen
        self.section_origins: dict[str, str] = {}

    def add_section(self, section: str, where: str) -> None:
        """Record that a section exists (it may have no keys)."""
        self.sections.setdefault(section, {})
        self.section_origins.setdefault(section, where)

    def set(self, section: str, key: str, value: str, where: str) -> None:
        """Record a value (a later one replaces an earlier one)."""
        self.add_section(section, where)
        self.sections[section][key] = (value, where)

    def error(self, section: str, key: str, problem: str) -> ConfigError:
        """A one-line error about one key."""
        raw, where = self.sections[section][key]
        return ConfigError(f"{where}: [{section}] {key} = {raw!r}: {problem}")

    def parsed(
        self, section: str, parsers: Mapping[str, Callable[[str], Any]] | None = None
    ) -> dict[str, Any]:
        """A section's keys, parsed (by ``parsers`` or the fixed ones); unknown keys are errors."""
        if parsers is None:
            parsers = _SECTIONS[section]
        values: dict[str, Any] = {}
        for key, (raw, where) in self.sections.get(section, {}).items():
            parser = parsers.get(key)
            if parser is None:
                known = ", ".join(sorted(parsers))
                raise ConfigError(f"{where}: unknown key {key!r} in [{section}] (known: {known})")
            try:
                values[key] = parser(raw)
            except ValueError as e:
                raise self.error(section, key, str(e)) from None
        return values

    def plugin_options(self, section: str, accepted: Mapping[str, str]) -> Mapping[str, str]:
        """The keys of a plugin's section, checked against the plugin's ``options``."""
        options: dict[str, str] = {}
        for key, (raw, where) in self.sections.get(section, {}).items():
            if key not in accepted:
                known = ", ".join(sorted(accepted)) or "none"
                raise ConfigError(f"{where}: unknown key {key!r} in [{section}] (known: {known})")
            options[key] = raw.strip()
        return MappingProxyType(options)


def _one_line(text: str) -> str:
    """Collapse a possibly multi-line message into one line."""
    return " ".join(text.split())


def _read_file(settings: _Settings, path: str) -> None:
    """
    Read an INI file into ``settings``.

    :raise m2mgw.errors.ConfigError: the file cannot be read or parsed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text") from None
    # No DEFAULT section magic and no interpolation: a value means what it says.
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\x00no-default-section", strict=True
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError(f"cannot parse config file {path}: {_one_line(str(e))}") from None
    for section in parser.sections():
        settings.add_section(section, path)
        for key, value in parser.items(section, raw=True):
            settings.set(section, key, value, path)


def _apply_overrides(settings: _Settings, overrides: Mapping[str, str]) -> None:
    """
    Apply ``{"section.key": value}`` overrides (``store.sqlite.path`` names
    key ``path`` of ``[store.sqlite]``).

    :raise m2mgw.errors.ConfigError: a name has no section part.
    """
    for name, value in overrides.items():
        section, dot, key = name.rpartition(".")
        if not dot or not section or not key:
            raise ConfigError(f"command line: {name!r} is not a SECTION.KEY setting")
        settings.set(section, key.lower(), value, "command line")


def _check_sections(settings: _Settings) -> None:
    """:raise m2mgw.errors.ConfigError: a section is not known."""
    for section in settings.sections:
        if section in _SECTIONS:
            continue
        prefix, dot, name = section.partition(".")
        if dot and name and prefix in _PLUGIN_SECTION_PREFIXES + _NAMED_SECTION_PREFIXES:
            continue
        where = settings.section_origins[section]
        if dot and prefix == "app":
            if is_valid_app_name(name):
                continue
            raise ConfigError(
                f"{where}: [{section}]: {name!r} is not an application name (1-64 letters,"
                " digits, '.', '_' or '-', as in its certificate)"
            )
        known = ", ".join(
            [*_SECTIONS, "store.NAME", "source.NAME", "app.NAME", "params.NAME", "rotation.GROUP"]
        )
        raise ConfigError(f"{where}: unknown section [{section}] (known: {known})")


def _lookup(where: str, interface: Any, name: str) -> Any:
    """
    Find the plugin providing ``interface`` named ``name``.

    :param where: what named it, for the error message (``"etc/m2mgw.conf: [store] backend"``).
    :raise m2mgw.errors.ConfigError: none has that name; the known ones are listed.
    """
    try:
        return registry.lookup(interface, name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _key_origin(settings: _Settings, section: str, key: str, default: object) -> str:
    """``"FILE: [section] key"``, or ``"[section] key (default ...)"`` if it was not set."""
    if key in settings.sections.get(section, {}):
        return f"{settings.sections[section][key][1]}: [{section}] {key}"
    return f"built-in default: [{section}] {key} = {default!r}"


def _build(settings: _Settings) -> GatewayConfig:
    """Turn checked settings into a :class:`GatewayConfig`."""
    _check_sections(settings)
    gateway = settings.parsed("gateway")
    config = GatewayConfig(
        **{k: v for k, v in gateway.items() if k != "data_dir"},
        data_dir=gateway.get("data_dir", _parse_path(GatewayConfig.data_dir)),
        modules=ModuleListenerConfig(**settings.parsed("modules")),
        apps=AppListenerConfig(**settings.parsed("apps")),
        protocol=ProtocolPolicy(**settings.parsed("protocol")),
        jobs=JobsConfig(**settings.parsed("jobs")),
        config_file=settings.origin if settings.origin != "defaults" else None,
    )

    suites_origin = _key_origin(settings, "gateway", "suites", ", ".join(config.suites))
    for suite in config.suites:
        _lookup(suites_origin, ICipherSuite, suite)
    if config.protocol.default_suite not in config.suites:
        origin = _key_origin(settings, "protocol", "default_suite", config.protocol.default_suite)
        raise ConfigError(
            f"{origin}: {config.protocol.default_suite!r} is not one of the configured"
            f" suites ({', '.join(config.suites)})"
        )

    store_section = settings.parsed("store")
    backend = store_section.get("backend", StoreConfig.backend)
    store_options: Mapping[str, str] = _EMPTY
    sources: list[SourceConfig] = []
    for section in settings.sections:
        prefix, dot, name = section.partition(".")
        if not dot:
            continue
        where = f"{settings.section_origins[section]}: [{section}]"
        if prefix == "store":
            factory = _lookup(where, IModuleStoreFactory, name)
            options = settings.plugin_options(section, factory.options)
            if name == backend:
                store_options = options
        elif prefix == "source":
            factory = _lookup(where, IInstructionSourceFactory, name)
            sources.append(SourceConfig(name, settings.plugin_options(section, factory.options)))
    _lookup(_key_origin(settings, "store", "backend", backend), IModuleStoreFactory, backend)

    return dataclasses.replace(
        config,
        store=StoreConfig(
            backend=backend,
            options=store_options,
            keep_reports=store_section.get("keep_reports", StoreConfig.keep_reports),
            keep_security_events=store_section.get(
                "keep_security_events", StoreConfig.keep_security_events
            ),
            keep_instructions=store_section.get("keep_instructions", StoreConfig.keep_instructions),
        ),
        sources=tuple(sources),
        app_policies=_app_policies(settings, config.apps),
        **_key_lifecycle(settings, config),
    )


def _parameter_set(
    settings: _Settings, section: str, suites: Mapping[str, ICipherSuite], key_ttl: int
) -> ParameterSet:
    """One ``[params.NAME]`` section, checked against its suite."""
    name = section.partition(".")[2]
    where = f"{settings.section_origins[section]}: [{section}]"
    values = settings.parsed(section, _PARAMS_SECTION)
    for required in ("pid", "suite"):
        if required not in values:
            raise ConfigError(f"{where}: {required} is required")
    suite = suites.get(values["suite"])
    if suite is None:
        raise settings.error(
            section, "suite", f"not one of the configured suites ({', '.join(suites)})"
        )
    if name in suites and name != suite.name:
        raise ConfigError(f"{where}: a set named after suite {name!r} must be of that suite")
    base = builtin_set(suite, values.get("ttl", key_ttl))
    if "eq" in values:  # a custom curve replaces the named one
        base = dataclasses.replace(base, curve=None)
    param_set = dataclasses.replace(base, name=name, **values)
    try:
        param_set.check(suite)
    except BadParameters as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # a value outside MGP/1's Params ranges
        raise ConfigError(f"{where}: {_one_line(str(e))}") from None
    return param_set


def _key_lifecycle(settings: _Settings, config: GatewayConfig) -> dict[str, Any]:
    """``params`` and ``rotation``: the parameter sets and the rotation policy, cross-checked."""
    suites = {name: registry.lookup(ICipherSuite, name) for name in config.suites}
    configured: dict[str, ParameterSet] = {}
    pids: dict[int, str] = {}
    for section in settings.sections:
        prefix, dot, name = section.partition(".")
        if not dot or prefix != "params":
            continue
        param_set = _parameter_set(settings, section, suites, config.protocol.key_ttl)
        if param_set.pid in pids:
            raise ConfigError(
                f"{settings.section_origins[section]}: [{section}]: pid {param_set.pid}"
                f" is also the pid of [params.{pids[param_set.pid]}]"
            )
        pids[param_set.pid] = name
        configured[name] = param_set
    sets = complete_sets(configured, suites, config.protocol.key_ttl)

    def check_set(section: str, key: str, name: str) -> None:
        if name and name not in sets:
            known = ", ".join(sorted(sets))
            raise settings.error(section, key, f"no such parameter set (known: {known})")

    values = settings.parsed("rotation")
    retirements = values.pop("retire_suites", ())
    for key in ("check_interval", "batch", "rehello"):
        values.setdefault(key, getattr(RotationConfig, key))
    global_keys = {key: values.pop(key) for key in ("check_interval", "batch", "rehello")}
    default = RotationPolicy(**values)
    check_set("rotation", "params", default.params)
    for suite, target in retirements:
        if suite not in suites:
            raise settings.error(
                "rotation", "retire_suites", f"{suite!r} is not a configured suite"
            )
        check_set("rotation", "retire_suites", target)
        if sets[target].suite == suite:
            raise settings.error(
                "rotation", "retire_suites", f"{target!r} is a set of {suite!r} itself"
            )
    groups: dict[str, RotationPolicy] = {}
    for section in settings.sections:
        prefix, dot, group = section.partition(".")
        if dot and prefix == "rotation":
            policy = dataclasses.replace(
                default, **settings.parsed(section, _ROTATION_GROUP_SECTION)
            )
            check_set(section, "params", policy.params)
            groups[group] = policy
    rotation = RotationConfig(
        default=default,
        groups=MappingProxyType(groups),
        retire_suites=MappingProxyType(dict(retirements)),
        **global_keys,
    )
    return {"params": MappingProxyType(sets), "rotation": rotation}


def _app_policies(settings: _Settings, apps: AppListenerConfig) -> AppPolicies:
    """The ``[app.NAME]`` sections, with ``[apps]`` supplying what they leave out."""
    default = AppPolicy(
        permissions=apps.permissions,
        retention_events=apps.retention_events,
        retention_age=apps.retention_age,
    )
    by_app: dict[str, AppPolicy] = {}
    for section in settings.sections:
        prefix, dot, name = section.partition(".")
        if dot and prefix == "app":
            values = settings.parsed(section, _APP_SECTION)
            by_app[name] = dataclasses.replace(default, **values)
    return AppPolicies(default=default, by_app=MappingProxyType(by_app))


def load_config(path: str | None, overrides: Mapping[str, str] = _EMPTY) -> GatewayConfig:
    """
    Read, override and validate the gateway's configuration.

    :param path: the INI file; ``None`` reads :data:`DEFAULT_CONFIG_PATH` if it
        exists and otherwise uses the built-in defaults.
    :param overrides: ``{"section.key": value}`` settings that win over the
        file (the command line's options), e.g. ``{"modules.port": "5750"}``.
    :return: the validated configuration; ``data_dir`` is absolute (a relative
        one is relative to the current directory).
    :raise m2mgw.errors.ConfigError: with one line naming the file or the
        command line, the section and key, and what is wrong.
    """
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    settings = _Settings(path if path is not None else "defaults")
    if path is not None:
        _read_file(settings, path)
    _apply_overrides(settings, overrides)
    return _build(settings)
