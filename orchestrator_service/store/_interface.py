"""What the orchestrator keeps about swarms, and the one interface every store implements.

A store holds, per swarm: its tenant (whose swarm it is, from its `accepted` event: listing and
request ids are per tenant), its event log (swarm_id, sequence, event), the source of truth; and a
view derived from it by the reducer in `state.py` (the summary that GetSwarm and ListSwarms show,
and one status row per planned subtask, with its attempts and output), so that reading a swarm
never means replaying its events. The view rows arrive with the events that change them, in the
same `append`, so the two never disagree.

Several orchestrator replicas may share one store (PostgreSQL). Each unfinished swarm is then
owned by one replica through a lease that the replica renews while it lives; a replica that stops
renewing loses its swarms to the first replica that `claim`s them, under a higher epoch. Every
append carries the epoch its writer holds, and the store refuses a stale one (`LeaseLost`), so an
old owner that comes back (stopped, paused, cut off) cannot write after its lease is gone. A store
that one orchestrator has to itself (SQLite, memory) is `OneOrchestrator`: its orchestrator owns
every swarm, and the lease methods come down to taking all unfinished swarms once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from swarm.v1 import events_pb2, orchestrator_pb2


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says which file and why."""


class LeaseLost(StoreError):
    """Another orchestrator took the swarm over: the epoch this append carried is no longer the
    swarm's. Not a failure of the store: the writer stops running the swarm, and writes nothing."""


# The epoch under which a new swarm is first stored; each takeover adds one.
FIRST_EPOCH = 1
TERMINAL_KINDS = frozenset({"swarm_completed", "swarm_failed", "swarm_cancelled"})
# A page of events read at a time.
EVENTS_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Claim:
    """An unfinished swarm now owned by the claiming orchestrator, under `epoch`."""

    swarm_id: str
    epoch: int
    # Non-empty when a CancelSwarm asked for the swarm's end while no replica held it.
    cancel_reason: str = ""


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a lease renewal found: swarms whose lease another replica took (stop running them), and
    cancellations that CancelSwarm calls on other replicas asked for (swarm_id -> reason)."""

    lost: list[str] = field(default_factory=list)
    cancels: dict[str, str] = field(default_factory=dict)
    # Orchestrators alive on the store, this one included.
    orchestrators: int = 1


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

    @property
    def shared(self) -> bool:
        """Whether other orchestrators may use this store at the same time (leases then matter)."""
        ...

    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        """Stores the entries in order; when it returns they are durable. A swarm's first entry is
        its `accepted` event, which carries its summary; its swarm is then owned by this store's
        orchestrator under `epoch`. A shared store raises LeaseLost, storing nothing, when the
        swarm's epoch is no longer `epoch`."""
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

    async def claim(self) -> list[Claim]:
        """Takes the unfinished swarms that no orchestrator holds a live lease on, each under a new
        epoch, oldest first."""
        ...

    async def renew(self, held: Mapping[str, int]) -> Renewal:
        """Extends the leases on the swarms held (swarm_id -> epoch), and this orchestrator's own
        sign of life, which tells the others how many share the store."""
        ...

    async def release(self, held: Mapping[str, int]) -> None:
        """Gives up the leases held (swarm_id -> epoch), so that another orchestrator takes those
        swarms over at once rather than when the leases run out."""
        ...

    async def request_cancel(self, swarm_id: str, reason: str) -> None:
        """Asks whichever orchestrator owns the unfinished swarm (now, or after a takeover) to
        cancel it."""
        ...

    async def wait_for_requests(self) -> None:
        """Returns when another orchestrator has asked this one's swarms for something (a
        cancellation, told at the next `renew`)."""
        ...

    def follow(self, swarm_id: str, *, after_sequence: int) -> AsyncIterator[events_pb2.SwarmEvent]:
        """The swarm's stored events after `after_sequence`, then those that any orchestrator
        appends, until its terminal event."""
        ...

    def request_lock(self, request_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a swarm is started under `request_id`, so that two orchestrators given the
        same request at once start one swarm."""
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


# The columns of a stored swarm's row that `stored_view` reads, in its order; SQLite's and
# PostgreSQL's tables alike.
VIEW_COLUMNS = "view, last_sequence, update_ns"


def stored_view(
    row: Sequence[Any], subtasks: Iterable[orchestrator_pb2.SubtaskStatus] = ()
) -> orchestrator_pb2.Swarm:
    """The GetSwarm view from a row of VIEW_COLUMNS and the subtasks' statuses."""
    view, last_sequence, update_ns = row
    return compose_view(
        orchestrator_pb2.Swarm.FromString(bytes(view)),
        last_sequence=int(last_sequence),
        update_ns=int(update_ns),
        subtasks=subtasks,
    )


def listing_query(
    mark: str, *, limit: int, state: int, after: Cursor | None, tenant: str
) -> tuple[str, list[int | str]]:
    """ListSwarms' query of VIEW_COLUMNS, newest first, and its parameters; `mark` is the
    driver's placeholder ("?" or "%s")."""
    where = [f"tenant = {mark}"]
    parameters: list[int | str] = [tenant]
    if state:
        where.append(f"state = {mark}")
        parameters.append(state)
    if after is not None:
        where.append(f"(create_ns, swarm_id) < ({mark}, {mark})")
        parameters += [after.create_ns, after.swarm_id]
    query = (
        f"SELECT {VIEW_COLUMNS} FROM swarms WHERE {' AND '.join(where)} "
        f"ORDER BY create_ns DESC, swarm_id DESC LIMIT {mark}"
    )
    return query, [*parameters, limit]


class _Readable(Protocol):
    async def events(
        self, swarm_id: str, *, after_sequence: int, limit: int
    ) -> list[events_pb2.SwarmEvent]: ...

    async def unfinished(self) -> list[str]: ...


class OneOrchestrator:
    """The lease methods of a store that one orchestrator has to itself (it keeps others out, as
    SQLite's file lock does): that orchestrator owns every swarm, and a swarm it does not run has
    ended, so following one is reading its stored events."""

    @property
    def shared(self) -> bool:
        return False

    async def claim(self: _Readable) -> list[Claim]:
        return [Claim(swarm_id, FIRST_EPOCH) for swarm_id in await self.unfinished()]

    async def renew(self, held: Mapping[str, int]) -> Renewal:
        return Renewal()

    async def release(self, held: Mapping[str, int]) -> None:
        return None

    async def request_cancel(self, swarm_id: str, reason: str) -> None:
        return None

    async def wait_for_requests(self) -> None:
        await asyncio.Event().wait()  # never: no other orchestrator shares the store

    async def follow(
        self: _Readable, swarm_id: str, *, after_sequence: int
    ) -> AsyncIterator[events_pb2.SwarmEvent]:
        while page := await self.events(swarm_id, after_sequence=after_sequence, limit=EVENTS_PAGE):
            for event in page:
                yield event
            after_sequence = page[-1].sequence

    def request_lock(self, request_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()
