"""Straggler hedging: which slow attempt of a swarm gets a second attempt on another worker, and when.

One slow agent holds up the synthesis. So, per swarm (when its request or `--hedging` turns it on):

- **When.** Once half of the swarm's subtasks have completed, an attempt that has run longer than
  `factor` (2) times the median time of the completed ones straggles.
- **How many.** Hedges may add at most `max_extra` (10%) of the subtasks as extra attempts. They are
  kept for the end: stragglers are hedged once there are no more of them than hedges left, since a
  swarm waits for its slowest subtask, and hedging some stragglers while more of them run on does
  not bring its end nearer.
- **Where.** Only while the pool has a free slot, so a hedge never waits in front of a subtask that
  has not started; and only if the swarm's budget gives it the max_tokens of the attempt it hedges.

The scheduler races the two attempts (`Scheduler.run`): the first to complete wins, the other is
cancelled, and both are charged.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Running:
    started: float
    signal: asyncio.Event = field(default_factory=asyncio.Event)
    # Picked: a subtask is hedged once at most.
    settled: bool = False


class Hedger:
    def __init__(
        self,
        total: int,
        *,
        max_extra: float = 0.1,
        factor: float = 2.0,
        free_slots: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.allowed = int(max_extra * total)
        self.factor = factor
        self.used = 0
        self._free_slots = free_slots
        self._clock = clock
        self._durations: list[float] = []
        self._running: dict[str, _Running] = {}

    def started(self, subtask_id: str) -> asyncio.Event:
        """A subtask's attempt started: the event is set when it should be hedged."""
        running = self._running[subtask_id] = _Running(self._clock())
        return running.signal

    def completed(self, subtask_id: str, duration_s: float) -> None:
        self._running.pop(subtask_id, None)
        self._durations.append(duration_s)

    def ended(self, subtask_id: str) -> None:
        """The subtask's attempt ended without completing it (a retry starts afresh)."""
        self._running.pop(subtask_id, None)

    def declined(self) -> None:
        """A picked straggler's hedge did not start (no budget for it, or it completed first)."""
        self.used -= 1

    def threshold_s(self) -> float | None:
        """How long an attempt may run before it straggles; None until half have completed."""
        if not self._durations or 2 * len(self._durations) < self.total:
            return None
        return self.factor * statistics.median(self._durations)

    def pick(self) -> list[str]:
        """Signals the stragglers to hedge now, oldest first."""
        threshold = self.threshold_s()
        left = self.allowed - self.used
        if threshold is None or left <= 0:
            return []
        now = self._clock()
        stragglers = sorted(
            (r.started, subtask_id)
            for subtask_id, r in self._running.items()
            if not r.settled and now - r.started > threshold
        )
        if not stragglers or len(stragglers) > left:
            return []
        chosen = [subtask_id for _, subtask_id in stragglers[: min(left, self._free_slots())]]
        for subtask_id in chosen:
            self._running[subtask_id].settled = True
            self._running[subtask_id].signal.set()
        self.used += len(chosen)
        return chosen

    async def watch(self, tick_s: float = 0.05) -> None:
        """Picks stragglers as time passes, until cancelled."""
        while True:
            await asyncio.sleep(tick_s)
            self.pick()
