"""One swarm's life: accepted -> planned -> subtasks on the pool -> synthesis -> one terminal event.

Everything the swarm does is an event appended to its log; a failure or a cancellation becomes the
terminal event, never an exception that escapes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from orchestrator_service.event_log import EventLog
from orchestrator_service.planner import Planner, PlanningFailed
from orchestrator_service.scheduler import Scheduler, SubtaskFailed
from orchestrator_service.state import SwarmRecord
from orchestrator_service.worker_pool import NoWorkersAvailable
from swarm.v1 import events_pb2
from swarm_common.errors import ProviderError
from swarm_common.providers import Usage

log = logging.getLogger("swarm.orchestrator.swarm")


@dataclass(frozen=True, slots=True)
class SwarmSpec:
    idea: str
    num_agents: int
    model: str
    request_id: str = ""


def usage_proto(usage: Usage) -> events_pb2.Usage:
    return events_pb2.Usage(
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, cost_usd=usage.cost_usd
    )


def usage_of(proto: events_pb2.Usage) -> Usage:
    return Usage(proto.input_tokens, proto.output_tokens, proto.cost_usd)


class Swarm:
    def __init__(self, swarm_id: str, spec: SwarmSpec, *, provider_name: str) -> None:
        self.id = swarm_id
        self.spec = spec
        self.record = SwarmRecord(swarm_id)
        self.log = EventLog(swarm_id, on_append=self.record.apply)
        self.cancel_reason = ""
        self.task: asyncio.Task[None] | None = None
        self.log.append(
            "accepted",
            events_pb2.SwarmAccepted(
                idea=spec.idea,
                num_agents=spec.num_agents,
                model=spec.model,
                provider=provider_name,
                request_id=spec.request_id,
            ),
        )

    @property
    def finished(self) -> bool:
        return self.log.closed

    def cancel(self, reason: str) -> bool:
        """Asks the run to stop; it appends swarm_cancelled once its in-flight calls are cancelled."""
        if self.finished or self.task is None or self.task.done():
            return False
        self.cancel_reason = self.cancel_reason or reason
        self.task.cancel()
        return True

    async def run(self, planner: Planner, scheduler: Scheduler) -> None:
        """Runs the swarm to its terminal event. Never raises: failures become swarm_failed."""
        try:
            await self._run(planner, scheduler)
        except asyncio.CancelledError:
            # The run is this object's own task: its cancellation is the swarm's end, told as an event.
            self.log.append(
                "swarm_cancelled", events_pb2.SwarmCancelled(reason=self.cancel_reason or "cancelled")
            )
        except SwarmError as error:
            self._fail(str(error))
        except Exception as error:
            log.error("swarm failed unexpectedly", exc_info=error, extra={"swarm_id": self.id})
            self._fail(f"internal error: {type(error).__name__}")

    async def _run(self, planner: Planner, scheduler: Scheduler) -> None:
        usage = Usage()
        try:
            plan = await planner.plan(
                idea=self.spec.idea, num_agents=self.spec.num_agents, model=self.spec.model
            )
        except PlanningFailed as error:
            raise SwarmError(str(error)) from None
        usage += plan.usage
        self.log.append("plan_created", events_pb2.PlanCreated(subtasks=plan.subtasks))
        try:
            async with asyncio.TaskGroup() as group:
                runs = [
                    group.create_task(
                        scheduler.run(self.log, subtask, idea=self.spec.idea, model=self.spec.model)
                    )
                    for subtask in plan.subtasks
                ]
        except ExceptionGroup as group:
            raise SwarmError(_summary(group)) from None
        results = []
        for subtask, run in zip(plan.subtasks, runs, strict=True):
            outcome = run.result()
            usage += usage_of(outcome.usage)
            results.append((subtask.title, outcome.output))
        parts: list[str] = []
        try:
            async for item in planner.synthesize(idea=self.spec.idea, results=results, model=self.spec.model):
                if isinstance(item, str):
                    parts.append(item)
                    self.log.append("synthesis_delta", events_pb2.SynthesisDelta(text=item))
                else:
                    usage += item
        except ProviderError as error:
            raise SwarmError(f"synthesis failed: {error.message}") from None
        self.log.append(
            "swarm_completed", events_pb2.SwarmCompleted(result="".join(parts), usage=usage_proto(usage))
        )

    def _fail(self, error: str) -> None:
        if not self.log.closed:
            self.log.append("swarm_failed", events_pb2.SwarmFailed(error=error))


class SwarmError(Exception):
    """An expected way for a swarm to fail; the message is the swarm_failed error."""


def _summary(group: ExceptionGroup[Exception]) -> str:
    """What failed, first the errors a user can act on; unexpected errors are re-raised."""
    known = [error for error in group.exceptions if isinstance(error, SubtaskFailed | NoWorkersAvailable)]
    if not known:
        raise group.exceptions[0]
    more = f" (and {len(known) - 1} more)" if len(known) > 1 else ""
    return f"{known[0]}{more}"
