"""
The module database: the :class:`~m2mgw.interfaces.IModuleStore` implementations.

- :mod:`m2mgw.store.memory` -- dictionaries, no durability (tests, experiments);
- :mod:`m2mgw.store.sqlite` -- one SQLite file in the data directory (the default);
- :mod:`m2mgw.store.postgres` -- one PostgreSQL database that several gateway nodes share.

All are plugins (``m2mgw/plugins/m2mgw_stores.py``) chosen by name in the
configuration.  Their behaviour is written once: :mod:`m2mgw.store.logic` holds
the decision rules, :mod:`m2mgw.store.operations` every operation against the
row primitives of :class:`m2mgw.store.tables.Tables`, and
:class:`m2mgw.store.base.TransactionalStore` maps the interface onto them; a
store only supplies its tables and its way of running a transaction.
"""
