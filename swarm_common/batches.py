"""Sending what is ready together: a stream message per batch, not per item, amortizes gRPC's
per-message cost when many subtasks share one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def batches(queue: asyncio.Queue[T | None]) -> AsyncIterator[list[T]]:
    """Waits for an item, then takes every item already queued with it; ends at None."""
    while True:
        batch: list[T] = []
        item = await queue.get()
        while item is not None:
            batch.append(item)
            if queue.empty():
                break
            item = queue.get_nowait()
        if batch:
            yield batch
        if item is None:
            return
