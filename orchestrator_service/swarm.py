"""One swarm's life: accepted -> planned -> subtasks on the pool -> synthesis -> one terminal event.

Everything the swarm does is an event appended to its log; a failure or a cancellation becomes the
terminal event, never an exception that escapes. The run reads where it stands from its record
(the events so far), so a swarm resumed after a restart runs the same code as a new one: a plan
already made is not made again, and a subtask already completed is not run again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Histogram

from orchestrator_service.budget import BudgetedProvider, BudgetExhausted, SwarmBudget
from orchestrator_service.event_log import EventLog
from orchestrator_service.hedging import Hedger
from orchestrator_service.planner import Planner, PlanningFailed
from orchestrator_service.prompt_cache import PromptCachePlan
from orchestrator_service.scheduler import Scheduler, SharedContext, SubtaskFailed
from orchestrator_service.state import SubtaskRecord, SwarmRecord, T
from orchestrator_service.store import FIRST_EPOCH, Store, StoreError
from orchestrator_service.synthesis import CannotFit, SynthesisTree
from orchestrator_service.worker_pool import NoWorkersAvailable
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_common import prompts, telemetry
from swarm_common.errors import ProviderError
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS, Usage
from swarm_common.rpc_errors import internal_message, new_error_id
from swarm_common.usage import usage_of, usage_proto

log = logging.getLogger("swarm.orchestrator.swarm")

RESTARTED = "orchestrator restarted"
# The longest the swarm's other subtasks wait for the first one's answer to begin, so that they read
# the prompt prefix it writes to the cache rather than all writing it.
WARM_UP_WAIT_S = 30.0

DURATION = Histogram(
    "swarm_swarm_duration_seconds",
    "From a swarm's acceptance to its end, by how it ended: completed, failed or cancelled",
    ["state"],
    buckets=telemetry.DURATION_BUCKETS,
)


def state_name(state: int) -> str:
    """A SwarmState as a metric label or span attribute: `running`, `completed` ..."""
    return orchestrator_pb2.SwarmState.Name(state).removeprefix("SWARM_STATE_").lower()  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class SwarmSpec:
    idea: str
    num_agents: int
    model: str
    request_id: str = ""
    max_parallel: int = 0
    # The request's own answer budget per subtask; 0 = the orchestrator's default.
    answer_max_tokens: int = 0
    # The hard budget; None = none.
    budget: events_pb2.Budget | None = None
    # The model the subtasks run on; "" = `model`, which plans and synthesizes.
    worker_model: str = ""
    hedging: bool = False
    hedge_max_extra: float = 0.0
    # Whose swarm it is: the tenant of the token that started it ("" without tokens).
    tenant: str = ""

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
            accepted.budget if accepted.HasField("budget") else None,
            accepted.worker_model,
            accepted.hedging,
            accepted.hedge_max_extra,
            accepted.tenant,
        )

    @property
    def workers_model(self) -> str:
        return self.worker_model or self.model


class Swarm:
    def __init__(self, log: EventLog) -> None:
        """Use `accept` or `resume`."""
        self.log = log
        self.record = log.record
        self.id = log.swarm_id
        self.cancel_reason = ""
        # Set by `fail`: the run stops and the swarm ends in swarm_failed with this, not cancelled.
        self._failure: events_pb2.SwarmFailed | None = None
        self.task: asyncio.Task[None] | None = None
        # When the RunSwarm call that is attached to the swarm runs out (epoch seconds): every
        # attempt ends by then. Not stored: a resumed swarm is attached to no call.
        self.deadline: float | None = None
        # The answer budget of a subtask when the request set none (the orchestrator's setting).
        self.default_answer_max_tokens = DEFAULT_ANSWER_MAX_TOKENS
        # Whether prompts may be marked for the model API's prompt cache (--prompt-caching).
        self.prompt_caching = True
        self._suspending = False
        # The swarm's span while it runs here (None when tracing is off): every span of its work is
        # in its trace.
        self.span: telemetry.Span | None = None

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
        on_spent: Callable[[str, events_pb2.Usage], None] | None = None,
        trace_context: Mapping[str, str] | None = None,
    ) -> Swarm:
        """A new swarm, its `accepted` event appended. Its span continues the caller's trace when
        `trace_context` (the W3C headers the client sent) names one."""
        swarm = cls(
            EventLog(
                SwarmRecord(swarm_id),
                store,
                on_store_failure=on_store_failure,
                on_lease_lost=on_lease_lost,
                on_spent=on_spent,
            )
        )
        swarm.span = telemetry.start_span(
            "swarm",
            kind=telemetry.SpanKind.SERVER,
            parent=telemetry.parent_from(trace_context or {}),
            attributes=swarm._attributes(spec),
        )
        trace_id, span_id = telemetry.span_ids(swarm.span)
        swarm.log.append(
            "accepted",
            events_pb2.SwarmAccepted(
                idea=spec.idea,
                num_agents=spec.num_agents,
                model=spec.model,
                provider=provider_name,
                request_id=spec.request_id,
                max_parallel=spec.max_parallel,
                trace_id=trace_id,
                span_id=span_id,
                budget=spec.budget,
                worker_model=spec.worker_model,
                hedging=spec.hedging,
                hedge_max_extra=spec.hedge_max_extra,
                tenant=spec.tenant,
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
        on_spent: Callable[[str, events_pb2.Usage], None] | None = None,
    ) -> Swarm:
        """An unfinished swarm rebuilt from its stored events, with `swarm_resumed` appended and the
        attempts that the restart (or the takeover, under the new `epoch`) interrupted told as
        failed."""
        swarm = cls(
            EventLog(
                record,
                store,
                epoch=epoch,
                on_store_failure=on_store_failure,
                on_lease_lost=on_lease_lost,
                on_spent=on_spent,
            )
        )
        swarm.span = telemetry.start_span(
            "swarm resumed",
            kind=telemetry.SpanKind.INTERNAL,
            parent=telemetry.remote_parent(record.accepted.trace_id, record.accepted.span_id),
            attributes=swarm._attributes(swarm.spec),
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
        # What the interrupted calls cost is unknown: each is charged what it held.
        for subtask_id, attempts in list(record.running.items()):
            for started in list(attempts.values()):
                swarm.log.append(
                    "subtask_failed",
                    events_pb2.SubtaskFailed(
                        subtask_id=subtask_id,
                        worker_id=started.worker_id,
                        error=RESTARTED,
                        attempt=started.attempt,
                        will_retry=True,
                        usage=started.reserved,
                    ),
                )
        for call in list(record.calls.values()):
            swarm.log.append(
                "call_settled", events_pb2.CallSettled(call_id=call.call_id, usage=call.reserved)
            )
        return swarm

    @property
    def spec(self) -> SwarmSpec:
        return SwarmSpec.of(self.record)

    def _attributes(self, spec: SwarmSpec) -> dict[str, str | int]:
        return {"swarm.id": self.id, "swarm.num_agents": spec.num_agents, "gen_ai.request.model": spec.model}

    def observe_end(self) -> None:
        """After a run: the swarm's span ends, and a swarm that ended has its duration measured (a
        suspended one ends neither: the next start resumes it)."""
        state = state_name(self.record.state)
        if self.finished:
            created = self.record.create_time.seconds + self.record.create_time.nanos * 1e-9
            DURATION.labels(state).observe(time.time() - created)
        telemetry.end_span(
            self.span,
            error=state if state in ("failed", "cancelled") else "",
            attributes={"swarm.state": state},
        )
        self.span = None

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

    def fail(self, failure: events_pb2.SwarmFailed) -> bool:
        """Stops the run from outside (a quota of its tenant ran out): it ends in `failure`."""
        if self.finished or self._suspending or self.task is None or self.task.done():
            return False
        self._failure = self._failure or failure
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
            elif self._failure is not None:
                self.log.append("swarm_failed", self._failure)
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

    def _budget(self, spec: SwarmSpec) -> SwarmBudget:
        return SwarmBudget(
            spec.budget or events_pb2.Budget(),
            self.record,
            plan_model=spec.model,
            worker_model=spec.workers_model,
            answer_max_tokens=spec.answer_max_tokens or self.default_answer_max_tokens,
        )

    async def _run(self, planner: Planner, scheduler: Scheduler) -> None:
        spec = self.spec
        budget = self._budget(spec)
        if self.record.tracked:
            planner = planner.using(BudgetedProvider(planner.provider, budget, self.log))
        if not self.record.planned:
            try:
                with telemetry.span("plan", attributes={"swarm.num_agents": spec.num_agents}):
                    plan = await planner.plan(idea=spec.idea, num_agents=spec.num_agents, model=spec.model)
            except PlanningFailed as error:
                raise SwarmError(str(error)) from None
            except BudgetExhausted as error:
                raise SwarmError(f"planning stopped: {error}") from None
            self.log.append(
                "plan_created", events_pb2.PlanCreated(subtasks=plan.subtasks, usage=usage_proto(plan.usage))
            )
        cache = self._cache_plan(spec)
        stopped = await self._run_subtasks(scheduler, spec, budget, cache)
        if stopped is not None:
            await self._stop_on_budget(planner, spec, stopped, cache)
            return
        try:
            with telemetry.span("synthesis"):
                result, usage = await self._synthesize(planner, spec, cache)
        except BudgetExhausted as error:
            raise SwarmError(f"synthesis stopped: {error}") from None
        self.log.append(
            "swarm_completed", events_pb2.SwarmCompleted(result=result, usage=usage_proto(self._total(usage)))
        )

    def _total(self, final_synthesis: Usage) -> Usage:
        """Everything the swarm cost: what its events settled, and a final synthesis that, in a swarm
        without a budget, is told in its end alone."""
        total = usage_of(self.record.spent)
        return total if self.record.tracked else total + final_synthesis

    def _cache_plan(self, spec: SwarmSpec) -> PromptCachePlan:
        subtasks = list(self.record.subtasks.values())
        return PromptCachePlan.of(
            enabled=self.prompt_caching,
            idea=spec.idea,
            plan_context=prompts.plan_context([s.subtask.title for s in subtasks]),
            worker_model=spec.workers_model,
            synthesis_model=spec.model,
            calls=sum(1 for s in subtasks if s.state != T.SUBTASK_STATE_COMPLETED),
        )

    async def _stop_on_budget(
        self, planner: Planner, spec: SwarmSpec, stopped: BudgetExhausted, cache: PromptCachePlan
    ) -> None:
        """The budget cannot cover the next subtask: swarm_failed, with a synthesis of the subtasks
        that completed when the request asked for one and there are any."""
        error = f"the swarm stopped: {stopped}"
        partial = ""
        completed = any(s.state == T.SUBTASK_STATE_COMPLETED for s in self.record.subtasks.values())
        final = Usage()
        if spec.budget is not None and spec.budget.synthesize_partial and completed:
            try:
                partial, final = await self._synthesize(planner, spec, cache)
            except BudgetExhausted as again:
                error += f"; the synthesis of what completed stopped too: {again}"
        self.log.append(
            "swarm_failed",
            events_pb2.SwarmFailed(
                error=error, partial_result=partial, usage=usage_proto(self._total(final))
            ),
        )

    async def _synthesize(
        self, planner: Planner, spec: SwarmSpec, cache: PromptCachePlan
    ) -> tuple[str, Usage]:
        """The synthesis and its final call's usage, asked again afresh (its attempt counting up)
        when a call fails in a way a retry can fix: a hung or failed call must not cost the
        subtasks' work, nor the partial syntheses already made."""
        first = self.record.synthesis_attempt + 1
        attempts = planner.synthesis_attempts
        for attempt in range(first, first + attempts):
            parts: list[str] = []
            usage = Usage()
            tree = SynthesisTree(
                planner,
                self.log,
                idea=spec.idea,
                model=spec.model,
                attempt=attempt,
                cache_idea=cache.synthesis,
            )
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

    async def _run_subtasks(
        self, scheduler: Scheduler, spec: SwarmSpec, budget: SwarmBudget, cache: PromptCachePlan
    ) -> BudgetExhausted | None:
        """Runs every planned subtask that has not completed, each from its next attempt; the
        outputs land in the record. Returns why the budget stopped a subtask, if it did: the others
        run on to their end, and what they held goes back to the budget."""
        subtasks = list(self.record.subtasks.values())
        for subtask in subtasks:
            if subtask.state == T.SUBTASK_STATE_FAILED:  # only a resumed swarm meets one here
                raise SwarmError(str(SubtaskFailed(subtask.subtask.id, subtask.attempts, subtask.error)))
        to_run = [s for s in subtasks if s.state != T.SUBTASK_STATE_COMPLETED]
        shared = SharedContext(
            plan_context=cache.plan_context,
            cache=cache.workers,
            budget=budget,
            warmed=asyncio.Event() if cache.workers else None,
        )
        if spec.hedging and to_run:
            shared.hedger = Hedger(
                len(to_run),
                max_extra=spec.hedge_max_extra,
                free_slots=lambda: sum(worker.free for worker in scheduler.pool.workers),
            )
        stopped: list[BudgetExhausted] = []

        async def run(subtask: SubtaskRecord) -> None:
            try:
                await scheduler.run(
                    self.log,
                    subtask.subtask,
                    idea=spec.idea,
                    model=spec.workers_model,
                    max_parallel=spec.max_parallel,
                    deadline=self.deadline,
                    first_attempt=subtask.attempts + 1,
                    max_tokens=spec.answer_max_tokens or self.default_answer_max_tokens,
                    shared=shared,
                )
            except BudgetExhausted as exhausted:
                stopped.append(exhausted)

        try:
            async with asyncio.TaskGroup() as group:
                if shared.hedger is not None:
                    watcher = group.create_task(shared.hedger.watch())
                tasks = [group.create_task(run(subtask)) for subtask in to_run[:1]]
                if shared.warmed is not None and tasks:
                    # The first call writes the shared prefix to the cache; the others read it once
                    # its answer has begun (calls sent before then would all write it).
                    warmed = group.create_task(shared.warmed.wait())
                    await asyncio.wait(
                        [warmed, *tasks], timeout=WARM_UP_WAIT_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    warmed.cancel()
                tasks += [group.create_task(run(subtask)) for subtask in to_run[1:]]
                await asyncio.gather(*tasks)
                if shared.hedger is not None:
                    watcher.cancel()
        except ExceptionGroup as group:
            raise SwarmError(_summary(group)) from None
        return stopped[0] if stopped else None

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
