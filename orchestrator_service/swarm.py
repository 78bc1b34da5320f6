"""One swarm's life: accepted -> planned -> subtasks on the pool -> synthesis -> one terminal event.

Everything the swarm does is an event appended to its log; a failure or a cancellation becomes the
terminal event, never an exception that escapes. The run reads where it stands from its record
(the events so far), so a swarm resumed after a restart runs the same code as a new one: a plan
already made is not made again, and a subtask already completed is not run again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator_service.event_log import EventLog
from orchestrator_service.planner import Planner, PlanningFailed
from orchestrator_service.scheduler import Scheduler, SubtaskFailed
from orchestrator_service.state import SwarmRecord, T
from orchestrator_service.store import FIRST_EPOCH, Store, StoreError
from orchestrator_service.synthesis import CannotFit, SynthesisTree
from orchestrator_service.worker_pool import NoWorkersAvailable
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_common.errors import ProviderError
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS, Usage
from swarm_common.rpc_errors import internal_message, new_error_id

log = logging.getLogger("swarm.orchestrator.swarm")

RESTARTED = "orchestrator restarted"


@dataclass(frozen=True, slots=True)
class SwarmSpec:
    idea: str
    num_agents: int
    model: str
    request_id: str = ""
    max_parallel: int = 0
    # The request's own answer budget per subtask; 0 = the orchestrator's default.
    answer_max_tokens: int = 0

    @classmethod
    def of(cls, record: SwarmRecord) -> SwarmSpec:
        """What the swarm was asked for, from its record (its first events are enough)."""
        accepted = record.accepted
        return cls(
            accepted.idea,
            accepted.num_agents,
            accepted.model,
            accepted.request_id,
            accepted.max_parallel,
            record.answer_max_tokens,
        )


def usage_proto(usage: Usage) -> events_pb2.Usage:
    return events_pb2.Usage(
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, cost_usd=usage.cost_usd
    )


def usage_of(proto: events_pb2.Usage) -> Usage:
    return Usage(proto.input_tokens, proto.output_tokens, proto.cost_usd)


class Swarm:
    def __init__(self, log: EventLog) -> None:
        """Use `accept` or `resume`."""
        self.log = log
        self.record = log.record
        self.id = log.swarm_id
        self.cancel_reason = ""
        self.task: asyncio.Task[None] | None = None
        # When the RunSwarm call that is attached to the swarm runs out (epoch seconds): every
        # attempt ends by then. Not stored: a resumed swarm is attached to no call.
        self.deadline: float | None = None
        # The answer budget of a subtask when the request set none (the orchestrator's setting).
        self.default_answer_max_tokens = DEFAULT_ANSWER_MAX_TOKENS
        self._suspending = False

    @classmethod
    def accept(
        cls,
        swarm_id: str,
        spec: SwarmSpec,
        *,
        provider_name: str,
        store: Store,
        on_store_failure: Callable[[StoreError], None] | None = None,
        on_lease_lost: Callable[[str, int], None] | None = None,
    ) -> Swarm:
        """A new swarm, its `accepted` event appended."""
        swarm = cls(
            EventLog(
                SwarmRecord(swarm_id), store, on_store_failure=on_store_failure, on_lease_lost=on_lease_lost
            )
        )
        swarm.log.append(
            "accepted",
            events_pb2.SwarmAccepted(
                idea=spec.idea,
                num_agents=spec.num_agents,
                model=spec.model,
                provider=provider_name,
                request_id=spec.request_id,
                max_parallel=spec.max_parallel,
            ),
        )
        if spec.answer_max_tokens:
            swarm.log.append("answer_budget", events_pb2.AnswerBudget(max_tokens=spec.answer_max_tokens))
        return swarm

    @classmethod
    def resume(
        cls,
        record: SwarmRecord,
        store: Store,
        *,
        epoch: int = FIRST_EPOCH,
        on_store_failure: Callable[[StoreError], None] | None = None,
        on_lease_lost: Callable[[str, int], None] | None = None,
    ) -> Swarm:
        """An unfinished swarm rebuilt from its stored events, with `swarm_resumed` appended and the
        attempts that the restart (or the takeover, under the new `epoch`) interrupted told as
        failed."""
        swarm = cls(
            EventLog(
                record, store, epoch=epoch, on_store_failure=on_store_failure, on_lease_lost=on_lease_lost
            )
        )
        subtasks = list(record.subtasks.values())
        swarm.log.append(
            "swarm_resumed",
            events_pb2.SwarmResumed(
                completed_subtasks=[s.subtask.id for s in subtasks if s.state == T.SUBTASK_STATE_COMPLETED],
                pending_subtasks=[
                    s.subtask.id
                    for s in subtasks
                    if s.state in (T.SUBTASK_STATE_PENDING, T.SUBTASK_STATE_RUNNING)
                ],
            ),
        )
        for subtask in subtasks:
            if subtask.state == T.SUBTASK_STATE_RUNNING:
                swarm.log.append(
                    "subtask_failed",
                    events_pb2.SubtaskFailed(
                        subtask_id=subtask.subtask.id,
                        worker_id=subtask.worker_id,
                        error=RESTARTED,
                        attempt=subtask.attempts,
                        will_retry=True,
                    ),
                )
        return swarm

    @property
    def spec(self) -> SwarmSpec:
        return SwarmSpec.of(self.record)

    @property
    def finished(self) -> bool:
        return self.log.closed

    @property
    def suspended(self) -> bool:
        """Stopped without an end, for a restart or another orchestrator to resume."""
        return self._suspending

    async def view(self) -> orchestrator_pb2.Swarm:
        """The GetSwarm view, as of an event that is durable: never ahead of what a restart keeps."""
        view = self.record.to_proto()
        await self.log.stored(through=view.last_sequence)
        return view

    def cancel(self, reason: str) -> bool:
        """Asks the run to stop; it appends swarm_cancelled once its in-flight calls are cancelled."""
        if self.finished or self._suspending or self.task is None or self.task.done():
            return False
        self.cancel_reason = self.cancel_reason or reason
        self.task.cancel()
        return True

    def suspend(self) -> bool:
        """Stops the run without an end, for a restart to resume: the orchestrator is shutting down."""
        if self.finished or self.task is None or self.task.done():
            return False
        self._suspending = True
        self.task.cancel()
        return True

    async def run(self, planner: Planner, scheduler: Scheduler) -> None:
        """Runs the swarm to its terminal event, or until suspended. Never raises: failures become
        swarm_failed."""
        try:
            await self._run(planner, scheduler)
        except asyncio.CancelledError:
            # The run is this object's own task: its cancellation is the swarm's end, told as an
            # event, or its suspension, told by the log to its readers.
            if self._suspending:
                self.log.suspend()
            else:
                self.log.append(
                    "swarm_cancelled", events_pb2.SwarmCancelled(reason=self.cancel_reason or "cancelled")
                )
        except SwarmError as error:
            self._fail(str(error))
        except Exception as error:
            error_id = new_error_id()
            log.error(
                "swarm failed unexpectedly", exc_info=error, extra={"swarm_id": self.id, "error_id": error_id}
            )
            self._fail(internal_message(error_id))

    async def _run(self, planner: Planner, scheduler: Scheduler) -> None:
        spec = self.spec
        if not self.record.planned:
            try:
                plan = await planner.plan(idea=spec.idea, num_agents=spec.num_agents, model=spec.model)
            except PlanningFailed as error:
                raise SwarmError(str(error)) from None
            self.log.append(
                "plan_created", events_pb2.PlanCreated(subtasks=plan.subtasks, usage=usage_proto(plan.usage))
            )
        await self._run_subtasks(scheduler, spec)
        result, usage = await self._synthesize(planner, spec)
        usage += usage_of(self.record.plan_usage) + usage_of(self.record.partial_usage)
        for subtask in self.record.subtasks.values():
            usage += usage_of(subtask.usage)
        self.log.append("swarm_completed", events_pb2.SwarmCompleted(result=result, usage=usage_proto(usage)))

    async def _synthesize(self, planner: Planner, spec: SwarmSpec) -> tuple[str, Usage]:
        """The synthesis and its final call's usage, asked again afresh (its attempt counting up)
        when a call fails in a way a retry can fix: a hung or failed call must not cost the
        subtasks' work, nor the partial syntheses already made."""
        first = self.record.synthesis_attempt + 1
        attempts = planner.synthesis_attempts
        for attempt in range(first, first + attempts):
            parts: list[str] = []
            usage = Usage()
            tree = SynthesisTree(planner, self.log, idea=spec.idea, model=spec.model, attempt=attempt)
            try:
                async for item in tree.final(await tree.reduce()):
                    if isinstance(item, str):
                        parts.append(item)
                        self.log.append(
                            "synthesis_delta", events_pb2.SynthesisDelta(text=item, attempt=attempt)
                        )
                    else:
                        usage += item
                        if item.cut_off:
                            log.warning(
                                f"the synthesis was cut off at its answer budget ({item.stop_reason})",
                                extra={"swarm_id": self.id},
                            )
                return "".join(parts), usage
            except CannotFit as error:
                raise SwarmError(f"synthesis failed: {error}") from None
            except ProviderError as error:
                if not error.retryable or attempt == first + attempts - 1:
                    raise SwarmError(f"synthesis failed: {error.message}") from None
                log.warning(
                    f"synthesis attempt {attempt} failed, asking again: {error.message}",
                    extra={"swarm_id": self.id},
                )
                await asyncio.sleep(planner.retry_backoff_s * (attempt - first + 1))
        raise AssertionError("unreachable: the last attempt either returns or raises")

    async def _run_subtasks(self, scheduler: Scheduler, spec: SwarmSpec) -> None:
        """Runs every planned subtask that has not completed, each from its next attempt; the
        outputs land in the record."""
        subtasks = list(self.record.subtasks.values())
        for subtask in subtasks:
            if subtask.state == T.SUBTASK_STATE_FAILED:  # only a resumed swarm meets one here
                raise SwarmError(str(SubtaskFailed(subtask.subtask.id, subtask.attempts, subtask.error)))
        try:
            async with asyncio.TaskGroup() as group:
                for subtask in subtasks:
                    if subtask.state != T.SUBTASK_STATE_COMPLETED:
                        group.create_task(
                            scheduler.run(
                                self.log,
                                subtask.subtask,
                                idea=spec.idea,
                                model=spec.model,
                                max_parallel=spec.max_parallel,
                                deadline=self.deadline,
                                first_attempt=subtask.attempts + 1,
                                max_tokens=spec.answer_max_tokens or self.default_answer_max_tokens,
                            )
                        )
        except ExceptionGroup as group:
            raise SwarmError(_summary(group)) from None

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
