"""The orchestrator's front: validates requests, starts swarms, and finds them again. No gRPC here."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator_service.planner import Planner
from orchestrator_service.scheduler import Scheduler
from orchestrator_service.swarm import Swarm, SwarmSpec
from swarm.v1 import events_pb2, orchestrator_pb2

log = logging.getLogger("swarm.orchestrator")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
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
    if spec.model and not MODEL_NAME.match(spec.model):
        violations.append(("model", f"{spec.model[:40]!r} is not a model name"))
    if len(spec.request_id) > MAX_REQUEST_ID:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID} characters"))
    if violations:
        raise InvalidRequest(violations)


class Orchestrator:
    def __init__(
        self,
        planner: Planner,
        scheduler: Scheduler,
        *,
        default_model: str,
        limits: Limits | None = None,
    ) -> None:
        self.planner = planner
        self.scheduler = scheduler
        self.default_model = default_model
        self.limits = limits or Limits()
        self._swarms: dict[str, Swarm] = {}
        self._by_request_id: dict[str, Swarm] = {}
        self.accepting = True

    def start(self, *, idea: str, num_agents: int, model: str = "", request_id: str = "") -> Swarm:
        """Validates and starts a swarm; a request_id seen before gives back that swarm instead."""
        spec = SwarmSpec(
            idea=idea, num_agents=num_agents, model=model or self.default_model, request_id=request_id
        )
        validate(spec, self.limits)
        if request_id and request_id in self._by_request_id:
            return self._by_request_id[request_id]
        if not self.accepting:
            raise ShuttingDown("the orchestrator is shutting down and takes no new swarms")
        swarm = Swarm(uuid.uuid4().hex, spec, provider_name=self.planner.provider.name)
        self._swarms[swarm.id] = swarm
        if request_id:
            self._by_request_id[request_id] = swarm
        swarm.task = asyncio.get_running_loop().create_task(
            swarm.run(self.planner, self.scheduler), name=f"swarm-{swarm.id}"
        )
        log.info(f"swarm accepted: {num_agents} agents", extra={"swarm_id": swarm.id, "model": spec.model})
        return swarm

    def get(self, swarm_id: str) -> Swarm:
        swarm = self._swarms.get(swarm_id)
        if swarm is None:
            raise SwarmNotFound(f"no swarm with id {swarm_id!r}")
        return swarm

    def watch(self, swarm_id: str, after_sequence: int = 0) -> AsyncIterator[events_pb2.SwarmEvent]:
        return self.get(swarm_id).log.follow(after_sequence)

    async def cancel(self, swarm_id: str, reason: str = "", wait_s: float = 5.0) -> Swarm:
        """Cancels the swarm and waits (a bounded time) for its swarm_cancelled; a finished swarm is
        left as it is."""
        swarm = self.get(swarm_id)
        if swarm.cancel(reason or "cancelled by CancelSwarm") and swarm.task is not None:
            await asyncio.wait([swarm.task], timeout=wait_s)
        return swarm

    def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0
    ) -> tuple[list[orchestrator_pb2.Swarm], str]:
        """Newest first. The token names the last swarm of the previous page, so swarms started in
        between do not shift the pages."""
        size = min(MAX_PAGE_SIZE, page_size if page_size > 0 else DEFAULT_PAGE_SIZE)
        after: Swarm | None = None
        if page_token:
            try:
                after = self._swarms[base64.urlsafe_b64decode(page_token.encode()).decode()]
            except (ValueError, KeyError):
                raise InvalidRequest([("page_token", "is not a token this server gave out")]) from None
        page: list[Swarm] = []
        more = False
        for swarm in reversed(self._swarms.values()):
            if after is not None:
                if swarm is after:
                    after = None
                continue
            if state and swarm.record.state != state:
                continue
            if len(page) == size:
                more = True
                break
            page.append(swarm)
        token = base64.urlsafe_b64encode(page[-1].id.encode()).decode() if more else ""
        return [swarm.record.to_proto(with_subtasks=False) for swarm in page], token

    async def drain(self, grace_s: float) -> None:
        """Takes no new swarms, lets running ones finish within the grace, then cancels the rest."""
        self.accepting = False
        running = [s.task for s in self._swarms.values() if s.task is not None and not s.task.done()]
        if not running:
            return
        log.info(f"waiting up to {grace_s:g}s for {len(running)} running swarm(s)")
        _, pending = await asyncio.wait(running, timeout=grace_s)
        for swarm in self._swarms.values():
            swarm.cancel("the orchestrator is shutting down")
        if pending:
            await asyncio.wait(pending, timeout=5)
