"""
Finding implementations of the extension points by their configuration name.

Every lookup goes through :func:`twisted.plugin.getPlugins` on
:mod:`m2mgw.plugins`, so an installed third-party plugin is found exactly like
the shipped ones.  An unknown name raises :class:`m2mgw.errors.UnknownPlugin`
listing the names that are known.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.plugin import getPlugins
from zope.interface.interface import InterfaceClass

from m2mgw import plugins
from m2mgw.errors import ConfigError, UnknownPlugin

T = TypeVar("T")

_KINDS = {
    "ICipherSuite": "cipher suite",
    "IModuleStoreFactory": "store",
    "IInstructionSourceFactory": "instruction source",
}


def all_plugins(interface: InterfaceClass) -> dict[str, Any]:
    """
    Every plugin providing ``interface``, by name.

    :raise m2mgw.errors.ConfigError: two plugins claim the same name.
    """
    found: dict[str, Any] = {}
    plugin: Any
    for plugin in getPlugins(interface, plugins):  # type: ignore[arg-type]
        name = plugin.name
        if name in found and found[name] is not plugin:
            raise ConfigError(
                f"two {_KINDS.get(interface.__name__, 'plugins')} plugins are named {name!r}"
            )
        found[name] = plugin
    return found


def lookup(interface: InterfaceClass, name: str) -> Any:
    """
    The plugin providing ``interface`` named ``name``.

    :raise m2mgw.errors.UnknownPlugin: no such plugin; the message lists the known names.
    """
    found = all_plugins(interface)
    try:
        return found[name]
    except KeyError:
        kind = _KINDS.get(interface.__name__, "plugin")
        known = ", ".join(sorted(found)) or "none"
        raise UnknownPlugin(f"unknown {kind} {name!r} (known: {known})") from None
