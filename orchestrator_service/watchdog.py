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
    watch = _Watch(bounds)
    iterator = aiter(items)
    try:
        while True:
            watch.waiting()
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                watch.raise_if_expired()
                raise
            finally:
                watch.waited()
            yield item
    finally:
        watch.close()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class _Watch:
    """Both bounds of one watched stream, kept by one timer rather than one per item: a timer armed
    and cancelled for each of thousands of items a second cost more than the items' own work. The
    timer, when it fires, checks the wait under way, and is armed again for when it would end."""

    def __init__(self, bounds: Bounds) -> None:
        self._bounds = bounds
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "items are awaited by a task"
        self._task = task
        self._cancelling = task.cancelling()
        self._ends_at = self._loop.time() + bounds.timeout_s
        self._since: float | None = None  # when the wait under way began
        self._timer: asyncio.TimerHandle | None = None
        self._expired: TimeoutError | None = None

    def waiting(self) -> None:
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._due(self._since), self._check)

    def waited(self) -> None:
        self._since = None

    def _due(self, since: float) -> float:
        return min(since + self._bounds.silence_s, self._ends_at)

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # no wait under way; the next one arms the timer again
        due, now = self._due(self._since), self._loop.time()
        if now < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._expired = (
            Overtime(self._bounds.timeout_s) if now >= self._ends_at else Silent(self._bounds.silence_s)
        )
        self._task.cancel()

    def raise_if_expired(self) -> None:
        """Within the CancelledError that `_check` caused: the bound that passed, instead."""
        if self._expired is not None and self._task.uncancel() <= self._cancelling:
            raise self._expired from None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
