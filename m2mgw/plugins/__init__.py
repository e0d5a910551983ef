"""
m2mgw's plugin package.

Third parties extend m2mgw by installing a module into this package (or into
any ``m2mgw/plugins`` directory on ``sys.path``) that defines objects
providing :class:`twisted.plugin.IPlugin` and one of the factory interfaces of
:mod:`m2mgw.interfaces`.  Like ``twisted/plugins``, this package has its
``__path__`` extended so that plugin directories of other distributions are
searched too.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
