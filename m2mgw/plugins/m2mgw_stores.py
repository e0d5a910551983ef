"""The module stores shipped with m2mgw: ``memory``, ``sqlite`` and ``postgres``."""

from m2mgw.store.memory import MemoryStoreFactory
from m2mgw.store.postgres import PostgresStoreFactory
from m2mgw.store.sqlite import SQLiteStoreFactory

memory_store = MemoryStoreFactory()
sqlite_store = SQLiteStoreFactory()
postgres_store = PostgresStoreFactory()
