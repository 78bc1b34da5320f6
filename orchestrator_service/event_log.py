"""A swarm's event log: the one path for events. The swarm appends; RunSwarm, WatchSwarm and GetSwarm
read. Sequence numbers are given here, 1, 2, 3 ... with no gaps, and nothing follows a terminal event.

Append, then publish: `append` numbers the event, applies it to the swarm's record and hands it to
the store, and readers see it only once the store has made it durable, so no client is ever shown
an event that a crash could take back. Appends made while the store is writing go to it together
in the next write.

Serialized once: `append` turns the event into bytes, and the store and every reader share them.
The bytes readers get are already a whole RunSwarmResponse, which is a WatchSwarmResponse too
(each is `SwarmEvent event = 1` and nothing else), so RunSwarm and WatchSwarm send them as they
are, to any number of watchers, with no copy and no serializing per watcher: a watcher costs a
write per event, nothing more.

Fencing: the log writes under the epoch of the swarm's lease that its orchestrator holds. Should
the store refuse it (another orchestrator took the swarm over), nothing more is stored or shown
here: readers are told the swarm goes on elsewhere (LogHandedOver), and the owner is told
(`on_lease_lost`) so that it stops running the swarm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from google.protobuf.message import Message
from prometheus_client import Histogram

from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import FIRST_EPOCH, Entry, LeaseLost, Store, StoreError, SubtaskRow
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_common import telemetry
from swarm_common.usage import add, subtract

TERMINAL_KINDS = frozenset({"swarm_completed", "swarm_failed", "swarm_cancelled"})
REPLAY_PAGE = 1000

log = logging.getLogger("swarm.orchestrator.event_log")

APPEND_SECONDS = Histogram(
    "swarm_event_append_seconds",
    "From an event's append to its being durable, when readers may see it (the oldest event of each write)",
    buckets=telemetry.LATENCY_BUCKETS,
)
COMMIT_SECONDS = Histogram(
    "swarm_store_commit_seconds",
    "One write of a swarm's events to the store, from its hand-over to its commit",
    buckets=telemetry.LATENCY_BUCKETS,
)
STREAM_LAG = Histogram(
    "swarm_stream_lag_seconds",
    "From an event's append (or a reader's arrival, if later) to its hand-over to the reader's stream: "
    "the oldest event each time a live reader wakes",
    buckets=telemetry.LATENCY_BUCKETS,
)


def _appended_at(event: events_pb2.SwarmEvent) -> float:
    return event.time.seconds + event.time.nanos * 1e-9


class LogClosed(RuntimeError):
    """An event was appended after the swarm's terminal event, or after it was suspended: a bug in
    the caller."""


class LogSuspended(Exception):
    """The orchestrator stopped before the swarm ended; a restart on the same store resumes it."""


class LogHandedOver(LogSuspended):
    """Another orchestrator took the swarm over (its lease): its events go on in the store."""


# The tag of field 1 (`event`, length-delimited) in RunSwarmResponse and WatchSwarmResponse.
_EVENT_FIELD = b"\x0a"


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


@dataclass(frozen=True, slots=True)
class Logged:
    """An event as its readers get it: `frame` is the bytes of a RunSwarmResponse (and of a
    WatchSwarmResponse) holding it, made once for all of them."""

    sequence: int
    frame: bytes
    appended_at: float  # the event's time, in seconds since the epoch

    @classmethod
    def serialized(cls, data: bytes, sequence: int, appended_at: float) -> Logged:
        """`data`: the event of this sequence, serialized."""
        return cls(sequence, _EVENT_FIELD + _varint(len(data)) + data, appended_at)

    @classmethod
    def of(cls, event: events_pb2.SwarmEvent) -> Logged:
        return cls.serialized(event.SerializeToString(), event.sequence, _appended_at(event))

    @property
    def event(self) -> events_pb2.SwarmEvent:
        return orchestrator_pb2.RunSwarmResponse.FromString(self.frame).event


# The tag of field 2 (`more_events`, repeated, length-delimited) in both responses.
_MORE_EVENTS_FIELD = b"\x12"
# A response of several events stays well within a client's default limit (4 MiB) for one message.
BATCH_BYTES = 1 << 20


def responses(batch: list[Logged], most: int) -> Iterator[bytes]:
    """The batch as responses (RunSwarmResponse or WatchSwarmResponse) of at most `most` events
    each, the first in `event` and the rest in `more_events`; one event to a response for
    `most` <= 1. An event's bytes become a `more_events` entry by their tag alone: the length that
    follows it is the same."""
    if most <= 1:
        for logged in batch:
            yield logged.frame
        return
    parts: list[bytes] = []
    size = 0
    for logged in batch:
        if parts and (len(parts) >= most or size + len(logged.frame) > BATCH_BYTES):
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(logged.frame if not parts else _MORE_EVENTS_FIELD + logged.frame[1:])
        size += len(logged.frame)
    if parts:
        yield b"".join(parts)


class EventLog:
    def __init__(
        self,
        record: SwarmRecord,
        store: Store,
        *,
        epoch: int = FIRST_EPOCH,
        on_store_failure: Callable[[StoreError], None] | None = None,
        on_lease_lost: Callable[[str, int], None] | None = None,
        on_spent: Callable[[str, events_pb2.Usage], None] | None = None,
    ) -> None:
        """A log that goes on from `record`, whose events the store already holds (none for a new
        swarm; all of them for a resumed one), writing under `epoch`. `on_spent(swarm_id, usage)`
        hears what the swarm's record counts as newly spent, once the events that spent it are
        durable."""
        self.record = record
        self.swarm_id = record.swarm_id
        self.closed = record.finished
        self._store = store
        self._on_store_failure = on_store_failure
        self.epoch = epoch
        self._on_lease_lost = on_lease_lost
        self._lost = False
        self._on_spent = on_spent
        # The record's spending as last reported, and what the unstored events spent since.
        self._spent_told = record.spent
        self._base = record.last_sequence  # the events through here are read from the store
        self._events: list[Logged] = []  # those appended since: base+1, base+2 ...
        self._durable = self._base
        self._unstored: list[Entry] = []
        # What the unstored events changed of the swarm's view: its summary, and which subtasks.
        self._summary_changed = False
        self._subtasks_changed: dict[str, None] = {}  # in the order they changed
        self._storing: asyncio.Task[None] | None = None
        self._failure: StoreError | None = None
        self._suspended = False
        self._changed = asyncio.Event()

    @property
    def last_sequence(self) -> int:
        return self._base + len(self._events)

    def append(self, kind: str, body: Message) -> events_pb2.SwarmEvent:
        """Appends one event of `kind` (a SwarmEvent oneof field name); readers see it once stored."""
        if self.closed or self._suspended:
            raise LogClosed(f"swarm {self.swarm_id} already ended or stopped; cannot append {kind}")
        event = events_pb2.SwarmEvent(swarm_id=self.swarm_id, sequence=self.last_sequence + 1)
        event.time.FromNanoseconds(time.time_ns())
        getattr(event, kind).CopyFrom(body)
        if self._lost:
            return event  # the swarm's new owner writes its events; the run here is being stopped
        change = self.record.apply(event)
        self._summary_changed |= change.summary
        for subtask_id in change.subtask_ids:
            self._subtasks_changed[subtask_id] = None
        data = event.SerializeToString()
        self._events.append(Logged.serialized(data, event.sequence, _appended_at(event)))
        self._unstored.append(Entry(event, data))
        if kind in TERMINAL_KINDS:
            self.closed = True
        if self._storing is None:
            self._storing = asyncio.get_running_loop().create_task(self._store_all())
        return event

    async def _store_all(self) -> None:
        """Stores what was appended, batch after batch, and publishes each batch once it is durable."""
        try:
            while self._unstored and self._failure is None:
                batch, spent = self._take_unstored()
                handed_over = time.monotonic()
                try:
                    await self._store.append(batch, epoch=self.epoch)
                except LeaseLost as error:
                    log.warning(
                        f"another orchestrator took the swarm over: {error}",
                        extra={"swarm_id": self.swarm_id},
                    )
                    self.hand_over()
                    if self._on_lease_lost is not None:
                        self._on_lease_lost(self.swarm_id, self.epoch)
                except Exception as error:  # whatever it is, these events are not durable
                    if self._lost:
                        break  # handed over meanwhile: another orchestrator writes the swarm now
                    log.error("cannot store events", exc_info=error, extra={"swarm_id": self.swarm_id})
                    self._failure = error if isinstance(error, StoreError) else StoreError(repr(error))
                    if self._on_store_failure is not None:
                        self._on_store_failure(self._failure)
                else:
                    self._durable = batch[-1].event.sequence
                    if self._on_spent is not None and spent.ByteSize():
                        self._on_spent(self.swarm_id, spent)
                    COMMIT_SECONDS.observe(time.monotonic() - handed_over)
                    APPEND_SECONDS.observe(time.time() - _appended_at(batch[0].event))
                self._wake()
        finally:
            self._storing = None

    def _take_unstored(self) -> tuple[list[Entry], events_pb2.Usage]:
        """The events to store next, and what they spent. The parts of the swarm's view that they
        changed are made once for the write, as they stand after the last event, and go with the
        first (where a store learns of a new swarm). A store keeps only a swarm's latest summary and
        each subtask's latest status, so views made for each event, most of them overwritten in the
        same write, were a large part of an event's cost."""
        batch, self._unstored = self._unstored, []
        summary: orchestrator_pb2.Swarm | None = None
        spent = events_pb2.Usage()
        if self._summary_changed:
            summary = self.record.to_proto(with_subtasks=False)
            if self._on_spent is not None:  # only events that change the summary change what is spent
                now = self.record.spent
                add(spent, now)
                subtract(spent, self._spent_told)
                self._spent_told = now
        subtasks = self.record.subtasks
        rows = tuple(
            [SubtaskRow(subtasks[i].position, subtasks[i].to_proto()) for i in self._subtasks_changed]
        )
        self._summary_changed, self._subtasks_changed = False, {}
        if summary is not None or rows:
            first = batch[0]
            batch[0] = Entry(first.event, first.data, summary, rows)
        return batch, spent

    def hand_over(self) -> None:
        """Another orchestrator owns the swarm now: nothing more is stored or shown here, and
        readers, once they have every stored event, get LogHandedOver."""
        self._lost = True
        self._unstored = []
        self._summary_changed = False
        self._subtasks_changed = {}
        self._wake()

    def suspend(self) -> None:
        """The swarm stops here without an end: readers get LogSuspended once they have every
        stored event, and nothing more is appended."""
        self._suspended = True
        self._wake()

    async def stored(self, through: int | None = None) -> None:
        """Waits until the events through `through` (by default all appended so far) are durable."""
        target = self.last_sequence if through is None else through
        while self._durable < target:
            self._raise_if_failed()
            await self._changed.wait()

    async def follow(self, after_sequence: int = 0) -> AsyncIterator[list[Logged]]:
        """The events after `after_sequence`, then each new one once it is durable, until the
        terminal one. The switch from stored to live events has no gap and no duplicate: both come
        from this one numbered sequence. They come in batches, a page of stored events or all that
        became durable since the reader last looked, so that a reader can send them in one message."""
        index = after_sequence
        if index < self._base:
            async for page in replay_pages(
                self._store, self.swarm_id, after_sequence=index, through=self._base
            ):
                index = page[-1].sequence
                yield [Logged.of(event) for event in page]
            if index < self._base:
                raise StoreError(f"swarm {self.swarm_id}: events {index + 1}..{self._base} are missing")
        joined = time.time()
        while True:
            if index < self._durable:
                waited = time.time() - max(joined, self._events[index - self._base].appended_at)
                STREAM_LAG.observe(waited)
                durable = self._durable
                batch = self._events[index - self._base : durable - self._base]
                index = durable
                yield batch
                continue
            if self.closed and self._durable == self.last_sequence:
                return  # everything through the terminal event is out
            if self._lost:
                raise LogHandedOver(
                    f"swarm {self.swarm_id} goes on at another orchestrator: WatchSwarm it after sequence {index}"
                )
            self._raise_if_failed()
            if self._suspended and self._durable == self.last_sequence:
                raise LogSuspended(
                    f"the orchestrator stopped before swarm {self.swarm_id} ended; it goes on when the "
                    f"orchestrator restarts: WatchSwarm it after sequence {index}"
                )
            await self._changed.wait()

    def _raise_if_failed(self) -> None:
        if self._lost:
            raise LeaseLost(f"swarm {self.swarm_id} goes on at another orchestrator")
        if self._failure is not None:
            raise StoreError(f"swarm {self.swarm_id}: {self._failure}")

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def replay(
    store: Store, swarm_id: str, *, after_sequence: int = 0, through: int | None = None
) -> AsyncIterator[events_pb2.SwarmEvent]:
    """A swarm's stored events after `after_sequence` (through `through`, or all)."""
    async for page in replay_pages(store, swarm_id, after_sequence=after_sequence, through=through):
        for event in page:
            yield event


async def replay_pages(
    store: Store, swarm_id: str, *, after_sequence: int = 0, through: int | None = None
) -> AsyncIterator[list[events_pb2.SwarmEvent]]:
    """A swarm's stored events after `after_sequence` (through `through`, or all), page by page."""
    index = after_sequence
    while through is None or index < through:
        limit = REPLAY_PAGE if through is None else min(REPLAY_PAGE, through - index)
        page = await store.events(swarm_id, after_sequence=index, limit=limit)
        if page:
            yield page
        if len(page) < limit:
            return
        index = page[-1].sequence
