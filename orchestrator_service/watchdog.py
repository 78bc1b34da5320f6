"""The two bounds on anything the orchestrator waits for from a model, directly or through a worker:
its whole time, and the longest silence within it. A hang can come at any moment, the first
message included, so both bounds run from the start.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class Silent(TimeoutError):
    """Nothing arrived for the silence bound."""

    def __init__(self, silence_s: float) -> None:
        super().__init__(f"no output for {silence_s:g}s")
        self.silence_s = silence_s


class Overtime(TimeoutError):
    """The whole bound passed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"took longer than its {timeout_s:.3g}s")
        self.timeout_s = timeout_s


@dataclass(frozen=True, slots=True)
class Bounds:
    timeout_s: float
    silence_s: float


async def watched(items: AsyncIterator[T], bounds: Bounds) -> AsyncGenerator[T, None]:
    """`items` as they come, or Silent / Overtime when a bound passes first. The timer covers the
    wait for each item, never the caller's work between items; an unfinished `items` is closed."""
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + bounds.timeout_s
    iterator = aiter(items)
    try:
        while True:
            try:
                async with asyncio.timeout_at(min(loop.time() + bounds.silence_s, ends_at)):
                    item = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise (
                    Overtime(bounds.timeout_s) if loop.time() >= ends_at else Silent(bounds.silence_s)
                ) from None
            yield item
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
