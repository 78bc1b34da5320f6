"""How often a subtask's output reaches clients: one subtask_delta per delta window, and a window
that widens while many subtasks of one swarm stream at once.

Every watcher of a swarm gets every one of its events, and each costs the orchestrator a write per
watcher. At 50 ms, 100 subtasks streaming make 2,000 events a second, and 200 would make 4,000, more
than any screen shows. So a swarm's streaming subtasks share a budget of `max_rate` events a second:
one window serves `max_rate` x `window_s` of them (100 at the defaults), and beyond that each one's
window is the base window times how many such shares the swarm needs (a 200-agent swarm's subtasks
send every 100 ms: 2,000 events a second in all). Whole multiples change seldom, so the workers are
told seldom.

The worker holds the text to the window (`worker_service/outbox.py`): each start names the window
of its moment, and a change reaches the swarm's running subtasks through `tell`.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class DeltaWindows:
    def __init__(self, window_s: float, max_rate: float, tell: Callable[[str, float], None]) -> None:
        """`window_s`: the base window (0 = each chunk as it comes, never widened); `max_rate`:
        subtask_delta events a second one swarm sends at most (0 = no limit); `tell(swarm_id,
        window_s)` gives the swarm's running subtasks their new window."""
        self.window_s = window_s
        self._share = max(1, round(max_rate * window_s)) if max_rate > 0 else 0
        self._tell = tell
        self._streaming: dict[str, int] = {}

    def of(self, streaming: int) -> float:
        """The window of each subtask while `streaming` subtasks of its swarm stream."""
        if not self._share or self.window_s <= 0:
            return self.window_s
        return self.window_s * max(1, math.ceil(streaming / self._share))

    def streaming(self, swarm_id: str) -> _Streaming:
        """Counts one more subtask of the swarm streaming, while a `with` block runs; gives its
        window."""
        return _Streaming(self, swarm_id)

    def _count(self, swarm_id: str, step: int) -> float:
        """The swarm's window once `step` more subtasks stream."""
        before = self._streaming.get(swarm_id, 0)
        after = before + step
        if after:
            self._streaming[swarm_id] = after
        else:
            del self._streaming[swarm_id]
        window_s = self.of(after)
        if after and window_s != self.of(before):
            self._tell(swarm_id, window_s)
        return window_s


class _Streaming:
    """A context manager of its own, not a generator's: one is made for each attempt."""

    def __init__(self, windows: DeltaWindows, swarm_id: str) -> None:
        self._windows = windows
        self._swarm_id = swarm_id

    def __enter__(self) -> float:
        return self._windows._count(self._swarm_id, +1)

    def __exit__(self, *_: object) -> None:
        self._windows._count(self._swarm_id, -1)
