"""The orchestrator's front: validates requests, starts and resumes swarms, and finds them again.
No gRPC here.

Swarms that are running live here, in memory; a finished swarm lives in the store alone, which is
where GetSwarm, WatchSwarm and ListSwarms find it, so memory holds only the swarms in flight.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator_service.event_log import replay
from orchestrator_service.planner import Planner
from orchestrator_service.scheduler import Scheduler
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import Cursor, Store, StoreError
from orchestrator_service.swarm import Swarm, SwarmSpec
from swarm.v1 import events_pb2, orchestrator_pb2

log = logging.getLogger("swarm.orchestrator")

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
MAX_REQUEST_ID = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Limits:
    max_agents: int = 256
    max_idea_bytes: int = 64 * 1024


class InvalidRequest(ValueError):
    """Bad input: (field, description) pairs, all of them, not just the first."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {text}" for field, text in violations))
        self.violations = violations


class SwarmNotFound(LookupError):
    pass


class ShuttingDown(RuntimeError):
    pass


def validate(spec: SwarmSpec, limits: Limits) -> None:
    violations: list[tuple[str, str]] = []
    if not spec.idea.strip():
        violations.append(("idea", "must not be empty"))
    elif len(spec.idea.encode()) > limits.max_idea_bytes:
        violations.append(
            ("idea", f"is {len(spec.idea.encode())} bytes; the limit is {limits.max_idea_bytes} bytes")
        )
    if not 1 <= spec.num_agents <= limits.max_agents:
        violations.append(("num_agents", f"must be between 1 and {limits.max_agents}, got {spec.num_agents}"))
    if spec.model and not MODEL_NAME.fullmatch(spec.model):  # `$` would let a final newline through
        violations.append(("model", f"{spec.model[:40]!r} is not a model name"))
    if len(spec.request_id) > MAX_REQUEST_ID:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID} characters"))
    if spec.max_parallel < 0:
        violations.append(("max_parallel", f"must not be negative, got {spec.max_parallel}"))
    if violations:
        raise InvalidRequest(violations)


class Orchestrator:
    def __init__(
        self,
        planner: Planner,
        scheduler: Scheduler,
        store: Store,
        *,
        default_model: str,
        limits: Limits | None = None,
    ) -> None:
        self.planner = planner
        self.scheduler = scheduler
        self.store = store
        self.default_model = default_model
        self.limits = limits or Limits()
        self._swarms: dict[str, Swarm] = {}
        self._by_request_id: dict[str, Swarm] = {}
        self.accepting = True
        # The first failed store write: the orchestrator can no longer keep its promise that what
        # clients see is durable, so it stops (and a restart resumes from what was stored).
        self.store_failure: StoreError | None = None
        self.store_failed = asyncio.Event()

    async def recover(self) -> list[str]:
        """Resumes every unfinished swarm in the store: rebuilds it from its events and runs it on
        from there. Resumed swarms are detached: the RunSwarm calls that started them are gone."""
        resumed: list[str] = []
        for swarm_id in await self.store.unfinished():
            record = SwarmRecord(swarm_id)
            try:
                async for event in replay(self.store, swarm_id):
                    record.apply(event)
            except (ValueError, KeyError) as error:
                raise StoreError(f"cannot resume swarm {swarm_id} from its stored events: {error}") from None
            stored_through = record.last_sequence
            swarm = Swarm.resume(record, self.store, on_store_failure=self._store_failed)
            self._launch(swarm)
            resumed.append(swarm_id)
            log.info(
                f"swarm resumed after its stored event {stored_through}",
                extra={"swarm_id": swarm_id, "model": swarm.spec.model},
            )
        return resumed

    async def start(
        self,
        *,
        idea: str,
        num_agents: int,
        model: str = "",
        request_id: str = "",
        max_parallel: int = 0,
        deadline: float | None = None,
    ) -> str:
        """Validates and starts a swarm; a request_id seen before gives back that swarm instead.
        `deadline` (epoch seconds) bounds every attempt: the attached call's own deadline."""
        spec = SwarmSpec(
            idea=idea,
            num_agents=num_agents,
            model=model or self.default_model,
            request_id=request_id,
            max_parallel=max_parallel,
        )
        validate(spec, self.limits)
        if request_id:
            seen = await self._find_request(request_id)
            if seen is not None:
                return seen
        if not self.accepting:
            raise ShuttingDown("the orchestrator is shutting down and takes no new swarms")
        swarm = Swarm.accept(
            uuid.uuid4().hex,
            spec,
            provider_name=self.planner.provider.name,
            store=self.store,
            on_store_failure=self._store_failed,
        )
        swarm.deadline = deadline
        self._launch(swarm)
        log.info(f"swarm accepted: {num_agents} agents", extra={"swarm_id": swarm.id, "model": spec.model})
        return swarm.id

    async def _find_request(self, request_id: str) -> str | None:
        running = self._by_request_id.get(request_id)
        if running is not None:
            return running.id
        stored = await self.store.find_request(request_id)
        # Looked up again after the wait: a start with the same request_id may have won the race.
        running = self._by_request_id.get(request_id)
        return running.id if running is not None else stored

    def _launch(self, swarm: Swarm) -> None:
        self._swarms[swarm.id] = swarm
        if swarm.spec.request_id:
            self._by_request_id.setdefault(swarm.spec.request_id, swarm)
        swarm.task = asyncio.get_running_loop().create_task(self._run(swarm), name=f"swarm-{swarm.id}")

    async def _run(self, swarm: Swarm) -> None:
        await swarm.run(self.planner, self.scheduler)
        if not swarm.finished:
            return  # suspended: it stays unfinished in the store for the next start
        try:
            await swarm.log.stored()
        except StoreError:
            return  # the orchestrator is stopping for it (`store_failed`)
        # Durable now, so the store answers for it from here on.
        del self._swarms[swarm.id]
        if self._by_request_id.get(swarm.spec.request_id) is swarm:
            del self._by_request_id[swarm.spec.request_id]

    def _store_failed(self, error: StoreError) -> None:
        if self.store_failure is None:
            self.store_failure = error
            self.store_failed.set()

    async def get(self, swarm_id: str) -> orchestrator_pb2.Swarm:
        running = self._swarms.get(swarm_id)
        if running is not None:
            return await running.view()
        stored = await self.store.get_swarm(swarm_id)
        if stored is None:
            raise SwarmNotFound(f"no swarm with id {swarm_id!r}")
        return stored

    async def watch(self, swarm_id: str, after_sequence: int = 0) -> AsyncIterator[events_pb2.SwarmEvent]:
        """The swarm's events after `after_sequence`: live while it runs here, else from the store
        (a finished swarm is stored whole before it leaves memory)."""
        running = self._swarms.get(swarm_id)
        if running is not None:
            return running.log.follow(after_sequence)
        if await self.store.get_swarm(swarm_id, with_subtasks=False) is None:
            raise SwarmNotFound(f"no swarm with id {swarm_id!r}")
        return replay(self.store, swarm_id, after_sequence=after_sequence)

    def release(self, swarm_id: str, reason: str) -> None:
        """The RunSwarm call attached to the swarm is gone: an unfinished swarm is cancelled."""
        running = self._swarms.get(swarm_id)
        if running is not None:
            running.cancel(reason)

    async def cancel(self, swarm_id: str, reason: str = "", wait_s: float = 5.0) -> orchestrator_pb2.Swarm:
        """Cancels the swarm and waits (a bounded time) for its swarm_cancelled; a finished swarm is
        left as it is."""
        running = self._swarms.get(swarm_id)
        if running is None:
            return await self.get(swarm_id)
        if running.cancel(reason or "cancelled by CancelSwarm") and running.task is not None:
            await asyncio.wait([running.task], timeout=wait_s)
        return await running.view()

    async def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0
    ) -> tuple[list[orchestrator_pb2.Swarm], str]:
        """Newest first. The token names the last swarm of the previous page, so swarms started in
        between do not shift the pages."""
        size = min(MAX_PAGE_SIZE, page_size if page_size > 0 else DEFAULT_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        swarms = await self.store.list_swarms(limit=size + 1, state=state, after=after)
        page = swarms[:size]
        token = _encode_token(Cursor.of(page[-1])) if len(swarms) > size else ""
        return page, token

    async def drain(self, grace_s: float) -> None:
        """Takes no new swarms and lets running ones finish within the grace. The rest are stopped
        unfinished, for the next start to resume, when the store keeps them; else cancelled."""
        self.accepting = False
        running = [s.task for s in self._swarms.values() if s.task is not None and not s.task.done()]
        if not running:
            return
        log.info(f"waiting up to {grace_s:g}s for {len(running)} running swarm(s)")
        _, pending = await asyncio.wait(running, timeout=grace_s)
        if not pending:
            return
        resumable = self.store.persistent and self.store_failure is None
        for swarm in list(self._swarms.values()):
            if resumable:
                swarm.suspend()
            else:
                swarm.cancel("the orchestrator is shutting down")
        await asyncio.wait(pending, timeout=5)
        swarms = list(self._swarms.values())
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(swarm.log.stored(), 5) for swarm in swarms), return_exceptions=True
        )
        for swarm, outcome in zip(swarms, outcomes, strict=True):
            if outcome is not None:
                log.error(
                    f"the swarm's last events were not stored: {outcome!r}", extra={"swarm_id": swarm.id}
                )
        if resumable:
            log.info(f"{len(self._swarms)} unfinished swarm(s) left to resume at the next start")


def _encode_token(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(f"{cursor.create_ns}:{cursor.swarm_id}".encode()).decode()


def _decode_token(token: str) -> Cursor:
    try:
        create_ns, swarm_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        return Cursor(int(create_ns), swarm_id)
    except ValueError:  # bad base64, bad UTF-8, no colon, no number
        raise InvalidRequest([("page_token", "is not a token this server gave out")]) from None
