"""What the orchestrator keeps about swarms, and the one interface every store implements.

A store holds, per swarm: its tenant (whose swarm it is, from its `accepted` event: listing and
request ids are per tenant), its event log (swarm_id, sequence, event), the source of truth; and a
view derived from it by the reducer in `state.py` (the summary that GetSwarm and ListSwarms show,
and one status row per planned subtask, with its attempts and output), so that reading a swarm
never means replaying its events. The view rows arrive with the events that change them, in the
same `append`, so the two never disagree.

The interface leaves room for a server database shared by several orchestrator replicas: events
are keyed by (swarm_id, sequence), so a second writer of the same sequence is refused, not merged,
and `unfinished` is where a replica would claim swarms (with a lease) instead of taking them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from swarm.v1 import events_pb2, orchestrator_pb2


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class SubtaskRow:
    position: int  # the subtask's place in the plan
    status: orchestrator_pb2.SubtaskStatus


@dataclass(frozen=True, slots=True)
class Entry:
    """One event to store, with the parts of the swarm's view that it changed."""

    event: events_pb2.SwarmEvent
    # The event serialized: made once, for the store and every reader alike.
    data: bytes
    # The swarm's view without subtasks, when the event changed more than its sequence and time.
    summary: orchestrator_pb2.Swarm | None = None
    subtasks: tuple[SubtaskRow, ...] = ()


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A place in ListSwarms' newest-first order: the last swarm of the previous page."""

    create_ns: int
    swarm_id: str

    @classmethod
    def of(cls, swarm: orchestrator_pb2.Swarm) -> Cursor:
        return cls(swarm.create_time.ToNanoseconds(), swarm.swarm_id)


class Store(Protocol):
    @property
    def persistent(self) -> bool:
        """Whether swarms outlive this process (so a restart can resume them)."""
        ...

    async def append(self, entries: Sequence[Entry]) -> None:
        """Stores the entries in order; when it returns they are durable. A swarm's first entry is
        its `accepted` event, which carries its summary."""
        ...

    async def events(self, swarm_id: str, *, after_sequence: int, limit: int) -> list[events_pb2.SwarmEvent]:
        """Up to `limit` stored events of the swarm after `after_sequence`, in order."""
        ...

    async def get_swarm(
        self, swarm_id: str, *, with_subtasks: bool = True
    ) -> orchestrator_pb2.Swarm | None: ...

    async def list_swarms(
        self, *, limit: int, state: int = 0, after: Cursor | None = None, tenant: str = ""
    ) -> list[orchestrator_pb2.Swarm]:
        """The tenant's swarms (a swarm's `tenant`, "" when started without a token), newest first,
        without subtasks; only `state` unless it is 0; only past `after`."""
        ...

    async def find_request(self, request_id: str, *, tenant: str = "") -> str | None:
        """The swarm the tenant first started with this request_id: each tenant's ids are its own."""
        ...

    async def unfinished(self) -> list[str]:
        """Swarms without a terminal event, oldest first."""
        ...

    async def delete_finished(self, *, ended_before_ns: int, limit: int) -> int:
        """Deletes up to `limit` swarms that ended before the time, with their events; how many."""
        ...

    async def close(self) -> None: ...


def compose_view(
    summary: orchestrator_pb2.Swarm,
    *,
    last_sequence: int,
    update_ns: int,
    subtasks: Iterable[orchestrator_pb2.SubtaskStatus] = (),
) -> orchestrator_pb2.Swarm:
    """The GetSwarm view from stored parts: the summary is rewritten only when it changes, while
    the last sequence and update time move with every event."""
    view = orchestrator_pb2.Swarm()
    view.CopyFrom(summary)
    view.last_sequence = last_sequence
    view.update_time.FromNanoseconds(update_ns)
    view.subtasks.extend(subtasks)
    return view
