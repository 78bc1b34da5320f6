"""A store in this process's memory: nothing outlives the process. Tests use it, the benchmark
measures the SQLite store against it, and `--db :memory:` runs the orchestrator on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator_service.store._interface import (
    FIRST_EPOCH,
    Cursor,
    Entry,
    OneOrchestrator,
    StoreError,
    compose_view,
)
from swarm.v1 import events_pb2, orchestrator_pb2


@dataclass
class _Stored:
    summary: orchestrator_pb2.Swarm
    events: list[events_pb2.SwarmEvent] = field(default_factory=list)
    subtasks: dict[int, orchestrator_pb2.SubtaskStatus] = field(default_factory=dict)
    update_ns: int = 0

    def view(self, *, with_subtasks: bool) -> orchestrator_pb2.Swarm:
        return compose_view(
            self.summary,
            last_sequence=len(self.events),
            update_ns=self.update_ns,
            subtasks=[self.subtasks[p] for p in sorted(self.subtasks)] if with_subtasks else (),
        )


class MemoryStore(OneOrchestrator):
    def __init__(self) -> None:
        self._swarms: dict[str, _Stored] = {}
        self._requests: dict[tuple[str, str], str] = {}  # (tenant, request_id) -> swarm_id

    @property
    def persistent(self) -> bool:
        return False

    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        for entry in entries:
            event = entry.event
            stored = self._swarms.get(event.swarm_id)
            if entry.summary is not None:
                if stored is None:
                    stored = self._swarms[event.swarm_id] = _Stored(entry.summary)
                    if entry.summary.request_id:
                        key = (entry.summary.tenant, entry.summary.request_id)
                        self._requests.setdefault(key, event.swarm_id)
                stored.summary = entry.summary
            if stored is None or event.sequence != len(stored.events) + 1:
                raise StoreError(f"swarm {event.swarm_id}: event {event.sequence} is out of order")
            stored.events.append(event)
            stored.update_ns = event.time.ToNanoseconds()
            for row in entry.subtasks:
                stored.subtasks[row.position] = row.status

    async def events(self, swarm_id: str, *, after_sequence: int, limit: int) -> list[events_pb2.SwarmEvent]:
        stored = self._swarms.get(swarm_id)
        return stored.events[after_sequence : after_sequence + limit] if stored is not None else []

    async def get_swarm(self, swarm_id: str, *, with_subtasks: bool = True) -> orchestrator_pb2.Swarm | None:
        stored = self._swarms.get(swarm_id)
        return stored.view(with_subtasks=with_subtasks) if stored is not None else None

    async def list_swarms(
        self, *, limit: int, state: int = 0, after: Cursor | None = None, tenant: str = ""
    ) -> list[orchestrator_pb2.Swarm]:
        views = [
            stored.view(with_subtasks=False)
            for stored in self._swarms.values()
            if stored.summary.tenant == tenant
        ]
        views.sort(key=Cursor.of, reverse=True)
        return [
            view
            for view in views
            if (not state or view.state == state) and (after is None or Cursor.of(view) < after)
        ][:limit]

    async def find_request(self, request_id: str, *, tenant: str = "") -> str | None:
        return self._requests.get((tenant, request_id))

    async def unfinished(self) -> list[str]:
        return [
            swarm_id for swarm_id, stored in self._swarms.items() if not stored.summary.HasField("end_time")
        ]

    async def delete_finished(self, *, ended_before_ns: int, limit: int) -> int:
        expired = [
            swarm_id
            for swarm_id, stored in self._swarms.items()
            if stored.summary.HasField("end_time")
            and stored.summary.end_time.ToNanoseconds() < ended_before_ns
        ][:limit]
        for swarm_id in expired:
            summary = self._swarms.pop(swarm_id).summary
            key = (summary.tenant, summary.request_id)
            if self._requests.get(key) == swarm_id:
                del self._requests[key]
        return len(expired)

    async def close(self) -> None:
        return None
