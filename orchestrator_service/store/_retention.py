"""Retention: finished swarms older than the configured age are deleted, so the database stays
bounded. Unfinished swarms are never deleted, however old."""

from __future__ import annotations

import asyncio
import logging
import time

from orchestrator_service.store._interface import Store, StoreError

log = logging.getLogger("swarm.orchestrator.retention")
# Small deletions, so that appends queued behind one are not held up for long.
SWARMS_PER_DELETE = 50
LONGEST_PAUSE_S = 3600.0
SHORTEST_PAUSE_S = 1.0


async def expire(store: Store, max_age_s: float) -> int:
    """Deletes every swarm that ended more than `max_age_s` ago; returns how many."""
    ended_before_ns = time.time_ns() - int(max_age_s * 1e9)
    deleted = 0
    while count := await store.delete_finished(ended_before_ns=ended_before_ns, limit=SWARMS_PER_DELETE):
        deleted += count
    return deleted


async def expire_forever(store: Store, max_age_s: float) -> None:
    """Expires now, then again every half `max_age_s` (between 1 s and an hour), so no swarm is
    kept much past its age."""
    pause = min(LONGEST_PAUSE_S, max(SHORTEST_PAUSE_S, max_age_s / 2))
    while True:
        try:
            deleted = await expire(store, max_age_s)
        except StoreError as error:  # a failed sweep must not stop the next one
            log.error(f"retention sweep failed: {error}")
        else:
            if deleted:
                log.info(f"deleted {deleted} swarm(s) that ended more than {max_age_s:g}s ago")
        await asyncio.sleep(pause)
