"""
Instruction sources: what puts instructions into the gateway's durable queue.

- :mod:`m2mgw.instructions.submission` -- the rules every source applies to
  an instruction before it is queued (kind, body, expiry, size), shared by the
  operator's ``m2mgw-admin instruction submit`` and the sources here;
- :mod:`m2mgw.instructions.spool` -- the ``spool`` source: operators and
  scripts drop ``*.json`` files into a directory.

Sources are :class:`~m2mgw.interfaces.IInstructionSource` objects made by
:class:`~m2mgw.interfaces.IInstructionSourceFactory` plugins
(:mod:`m2mgw.plugins.m2mgw_sources`), enabled by a ``[source.NAME]`` section of
the configuration, and fed the store's queue by
:class:`m2mgw.service.InstructionSourceService`.
"""
