"""A swarm's event log: the one path for events. The swarm appends; RunSwarm, WatchSwarm and GetSwarm
read. Sequence numbers are given here, 1, 2, 3 ... with no gaps, and nothing follows a terminal event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from google.protobuf.message import Message

from swarm.v1 import events_pb2

TERMINAL_KINDS = frozenset({"swarm_completed", "swarm_failed", "swarm_cancelled"})


class LogClosed(RuntimeError):
    """An event was appended after the swarm's terminal event: a bug in the caller."""


class EventLog:
    def __init__(
        self, swarm_id: str, on_append: Callable[[events_pb2.SwarmEvent], None] | None = None
    ) -> None:
        self.swarm_id = swarm_id
        self._events: list[events_pb2.SwarmEvent] = []
        self._grew = asyncio.Event()
        self._on_append = on_append
        self.closed = False

    def __len__(self) -> int:
        return len(self._events)

    @property
    def last(self) -> events_pb2.SwarmEvent | None:
        return self._events[-1] if self._events else None

    def append(self, kind: str, body: Message) -> events_pb2.SwarmEvent:
        """Appends one event of `kind` (a SwarmEvent oneof field name) and wakes every follower."""
        if self.closed:
            raise LogClosed(f"swarm {self.swarm_id} already ended; cannot append {kind}")
        event = events_pb2.SwarmEvent(swarm_id=self.swarm_id, sequence=len(self._events) + 1)
        event.time.FromNanoseconds(time.time_ns())
        getattr(event, kind).CopyFrom(body)
        self._events.append(event)
        if kind in TERMINAL_KINDS:
            self.closed = True
        if self._on_append is not None:
            self._on_append(event)
        self._grew.set()
        self._grew = asyncio.Event()
        return event

    async def follow(self, after_sequence: int = 0) -> AsyncIterator[events_pb2.SwarmEvent]:
        """The events after `after_sequence`, then each new one as it is appended, until the terminal one."""
        index = after_sequence
        while True:
            while index < len(self._events):
                index += 1
                yield self._events[index - 1]
            if self.closed:
                return
            await self._grew.wait()
