"""Where swarms are kept: their event logs and the views derived from them, behind one interface."""

from __future__ import annotations

from orchestrator_service.store._interface import (
    FIRST_EPOCH,
    TERMINAL_KINDS,
    Claim,
    Cursor,
    Entry,
    LeaseLost,
    Renewal,
    Store,
    StoreError,
    SubtaskRow,
    compose_view,
)
from orchestrator_service.store._memory import MemoryStore
from orchestrator_service.store._postgres import PostgresStore, is_postgres, redacted
from orchestrator_service.store._retention import expire, expire_forever
from orchestrator_service.store._sqlite import SqliteStore

__all__ = [
    "FIRST_EPOCH",
    "MEMORY",
    "TERMINAL_KINDS",
    "Claim",
    "Cursor",
    "Entry",
    "LeaseLost",
    "MemoryStore",
    "PostgresStore",
    "Renewal",
    "SqliteStore",
    "Store",
    "StoreError",
    "SubtaskRow",
    "compose_view",
    "expire",
    "expire_forever",
    "open_store",
    "redacted",
]

# The `--db` value that keeps swarms in memory only, as SQLite itself spells an in-memory database.
MEMORY = ":memory:"


async def open_store(db: str, *, lease_ttl_s: float = 15.0) -> Store:
    """The store `--db` names: a PostgreSQL URL (shared by replicas, leases of `lease_ttl_s`), a
    SQLite file, or MEMORY."""
    if db == MEMORY:
        return MemoryStore()
    if is_postgres(db):
        return await PostgresStore.open(db, lease_ttl_s=lease_ttl_s)
    return await SqliteStore.open(db)
