"""Where swarms are kept: their event logs and the views derived from them, behind one interface."""

from __future__ import annotations

from orchestrator_service.store._interface import Cursor, Entry, Store, StoreError, SubtaskRow, compose_view
from orchestrator_service.store._memory import MemoryStore
from orchestrator_service.store._retention import expire, expire_forever
from orchestrator_service.store._sqlite import SqliteStore

__all__ = [
    "MEMORY",
    "Cursor",
    "Entry",
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "SubtaskRow",
    "compose_view",
    "expire",
    "expire_forever",
    "open_store",
]

# The `--db` value that keeps swarms in memory only, as SQLite itself spells an in-memory database.
MEMORY = ":memory:"


async def open_store(db: str) -> Store:
    """The store `--db` names: a SQLite file, or MEMORY."""
    if db == MEMORY:
        return MemoryStore()
    return await SqliteStore.open(db)
