"""
What each application may do, and when, and from where: the ``[app.NAME]``
sections of the configuration, as values.

An application *reads* (``hello``, ``get``, ``subscribe``, ``ack``, ...)
without any permission, limited to its own modules.  It *acts* (``submit``,
``cancel``, ``rotate``, ``approve``/``refuse``) only with the matching
permission, and, if the operator set ``hours``, only inside one of those
daily UTC windows.  ``networks`` limits the source addresses it may connect
from.  ``retention_events`` and ``retention_age`` bound how many of its
unacknowledged events the gateway keeps, and for how long.

Everything here is pure: the parsers take the configuration's text and raise
:class:`ValueError` with a message for a person; the checks take the time and
the address as arguments.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

__all__ = [
    "ACTION_PERMISSIONS",
    "AppPolicies",
    "AppPolicy",
    "HourWindow",
    "Network",
    "parse_hours",
    "parse_networks",
    "parse_permissions",
]

#: The permissions an application can be given, one per kind of action
#: (``approve`` covers ``approve`` and ``refuse``).
ACTION_PERMISSIONS: Final = ("submit", "cancel", "rotate", "approve")

#: What an application may do when the configuration says nothing.
DEFAULT_PERMISSIONS: Final = ("cancel", "submit")

#: Default retention: at most this many unacknowledged events per application ...
DEFAULT_RETENTION_EVENTS: Final = 100_000
#: ... and none older than this many seconds (7 days).
DEFAULT_RETENTION_AGE: Final = 7 * 86400

#: A source network an application may connect from.
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_SECONDS_PER_DAY: Final = 86400
_WINDOW: Final = re.compile(r"([0-2][0-9]):([0-5][0-9])-([0-2][0-9]):([0-5][0-9])\Z")


@dataclass(frozen=True)
class HourWindow:
    """
    A daily window of UTC time, ``start`` included, ``end`` excluded, in
    minutes after midnight.  A window whose end is not after its start wraps
    midnight (``22:00-06:00``); ``00:00-24:00`` is the whole day.
    """

    start: int
    end: int

    def contains(self, now: int) -> bool:
        """Whether the time ``now`` (seconds since the epoch) falls in the window."""
        minute = (now % _SECONDS_PER_DAY) // 60
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        """``HH:MM-HH:MM``, as it is written in the configuration."""
        start = f"{self.start // 60:02d}:{self.start % 60:02d}"
        return f"{start}-{self.end // 60:02d}:{self.end % 60:02d}"


def parse_permissions(raw: str) -> tuple[str, ...]:
    """
    A space- or comma-separated list of permissions (possibly empty: the
    application may only read), sorted.

    :raise ValueError: an unknown permission.
    """
    names = [part for part in re.split(r"[\s,]+", raw.strip()) if part]
    for name in names:
        if name not in ACTION_PERMISSIONS:
            known = ", ".join(ACTION_PERMISSIONS)
            raise ValueError(f"unknown permission {name!r} (known: {known})")
    return tuple(sorted(set(names)))


def parse_hours(raw: str) -> tuple[HourWindow, ...] | None:
    """
    Space- or comma-separated ``HH:MM-HH:MM`` UTC windows; empty means always.

    :raise ValueError: a malformed window or a time past 24:00.
    """
    windows = []
    for part in (p for p in re.split(r"[\s,]+", raw.strip()) if p):
        match = _WINDOW.match(part)
        if match is None:
            raise ValueError(f"{part!r} is not a HH:MM-HH:MM window (UTC)")
        sh, sm, eh, em = (int(g) for g in match.groups())
        start, end = sh * 60 + sm, eh * 60 + em
        if start >= 24 * 60 or end > 24 * 60:
            raise ValueError(f"{part!r}: times run from 00:00 to 24:00")
        if start == end:
            raise ValueError(f"{part!r} is empty (start and end are equal)")
        windows.append(HourWindow(start, end))
    return tuple(windows) or None


def parse_networks(raw: str) -> tuple[Network, ...] | None:
    """
    Space- or comma-separated networks (``10.0.0.0/8``, ``2001:db8::/32``,
    or single addresses); empty means any address.

    :raise ValueError: not a network, or one with host bits set.
    """
    networks = []
    for part in (p for p in re.split(r"[\s,]+", raw.strip()) if p):
        try:
            networks.append(ipaddress.ip_network(part, strict=True))
        except ValueError as e:
            raise ValueError(f"{part!r} is not a network ({e})") from None
    return tuple(networks) or None


@dataclass(frozen=True)
class AppPolicy:
    """
    One application's rights and limits.

    :ivar permissions: the actions it may take (see :data:`ACTION_PERMISSIONS`).
    :ivar hours: the UTC windows in which it may act, ``None`` for always.
    :ivar networks: the source networks it may connect from, ``None`` for any.
    :ivar retention_events: the most unacknowledged events kept for it (0: no limit).
    :ivar retention_age: the oldest unacknowledged event kept, in seconds (0: no limit).
    """

    permissions: tuple[str, ...] = DEFAULT_PERMISSIONS
    hours: tuple[HourWindow, ...] | None = None
    networks: tuple[Network, ...] | None = None
    retention_events: int = DEFAULT_RETENTION_EVENTS
    retention_age: int = DEFAULT_RETENTION_AGE

    def may(self, permission: str) -> bool:
        """Whether the application holds ``permission`` (at some time of day)."""
        return permission in self.permissions

    def in_hours(self, now: int) -> bool:
        """Whether ``now`` is inside the application's hours (always true without hours)."""
        return self.hours is None or any(window.contains(now) for window in self.hours)

    def admits(self, host: str | None) -> bool:
        """
        Whether a connection from ``host`` (an IP address literal; ``None``
        when it is not an IP connection) is allowed.
        """
        if self.networks is None:
            return True
        if host is None:
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def hours_text(self) -> list[str] | None:
        """The hours as ``HH:MM-HH:MM`` strings, ``None`` for always."""
        return None if self.hours is None else [str(window) for window in self.hours]


@dataclass(frozen=True)
class AppPolicies:
    """
    The policy of every application: the ones named in ``[app.NAME]``
    sections, and :attr:`default` for all others.
    """

    default: AppPolicy = field(default_factory=AppPolicy)
    by_app: Mapping[str, AppPolicy] = field(default_factory=lambda: MappingProxyType({}))

    def for_app(self, app: str) -> AppPolicy:
        """The policy of ``app``."""
        return self.by_app.get(app, self.default)
