"""The module stores shipped with m2mgw: ``memory`` and ``sqlite``."""

from m2mgw.store.memory import MemoryStoreFactory
from m2mgw.store.sqlite import SQLiteStoreFactory

memory_store = MemoryStoreFactory()
sqlite_store = SQLiteStoreFactory()
