"""A swarm as it stands, derived from its events alone (the log is the source of truth).

The same reducer serves the live swarm, GetSwarm, the store's view rows and restart recovery,
which rebuilds a swarm by replaying its stored events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_common.usage import add, subtract

S = orchestrator_pb2.SwarmState
T = orchestrator_pb2.SubtaskState
ENDED = frozenset({S.SWARM_STATE_COMPLETED, S.SWARM_STATE_FAILED, S.SWARM_STATE_CANCELLED})


@dataclass(frozen=True, slots=True)
class Change:
    """What one event changed besides the swarm's last sequence and update time: its summary (the
    GetSwarm view without subtasks) and which subtasks. The store rewrites only those."""

    summary: bool = False
    subtask_ids: tuple[str, ...] = ()


@dataclass
class SubtaskRecord:
    subtask: events_pb2.Subtask
    position: int
    state: int = T.SUBTASK_STATE_PENDING
    attempts: int = 0
    worker_id: str = ""
    output: str = ""
    error: str = ""
    usage: events_pb2.Usage = field(default_factory=events_pb2.Usage)
    stop_reason: str = ""

    def to_proto(self) -> orchestrator_pb2.SubtaskStatus:
        return orchestrator_pb2.SubtaskStatus(
            subtask=self.subtask,
            state=self.state,  # type: ignore[arg-type]
            attempts=self.attempts,
            worker_id=self.worker_id,
            output=self.output,
            error=self.error,
            usage=self.usage,
            stop_reason=self.stop_reason,
        )


class SwarmRecord:
    """Applies events one by one; `to_proto` gives the GetSwarm view."""

    def __init__(self, swarm_id: str) -> None:
        self.swarm_id = swarm_id
        self.state: int = S.SWARM_STATE_UNSPECIFIED
        self.accepted = events_pb2.SwarmAccepted()
        # The request's own answer budget per subtask; 0 = the orchestrator's default.
        self.answer_max_tokens = 0
        self.planned = False
        self.plan_usage = events_pb2.Usage()
        self.subtasks: dict[str, SubtaskRecord] = {}
        self.synthesis_attempt = 0
        # Partial syntheses by id, and what all of them cost.
        self.partials: dict[str, events_pb2.PartialSynthesis] = {}
        self.partial_usage = events_pb2.Usage()
        self.result = ""
        self.error = ""
        self.usage = events_pb2.Usage()
        self.create_time = Timestamp()
        self.update_time = Timestamp()
        self.end_time: Timestamp | None = None
        self.last_sequence = 0
        # What the swarm has spent, settled, on each side: plans and syntheses (the orchestrator's
        # own calls), and the subtasks' attempts (every one: completed, failed or superseded).
        self.plan_spent = events_pb2.Usage()
        self.worker_spent = events_pb2.Usage()
        # Attempts running now, by subtask and attempt, and the orchestrator's calls in flight:
        # what each holds at most.
        self.running: dict[str, dict[int, events_pb2.SubtaskStarted]] = {}
        self.calls: dict[str, events_pb2.CallReserved] = {}
        # What those hold, kept as they start and end: every summary tells it, and summing the
        # running attempts each time made a swarm's events cost the square of its subtasks.
        self.workers_held = events_pb2.Usage()
        self.calls_held = events_pb2.Usage()
        self.attempts_running = 0
        # Subtasks with no output and no attempt running: a new attempt's budget is shared among
        # them, and counting them afresh for each attempt cost the square of the subtasks.
        self.unstarted: set[str] = set()
        self.hedges = 0

    @property
    def finished(self) -> bool:
        return self.end_time is not None

    @property
    def tracked(self) -> bool:
        """The orchestrator's own calls are told as call_reserved and call_settled: the swarm has a
        budget. Without one, their cost is in plan_created, partial_synthesis and the end."""
        return self.accepted.HasField("budget")

    @property
    def worker_model(self) -> str:
        return self.accepted.worker_model or self.accepted.model

    @property
    def spent(self) -> events_pb2.Usage:
        """Settled spending: every call that has ended."""
        total = events_pb2.Usage()
        add(total, self.plan_spent)
        add(total, self.worker_spent)
        return total

    @property
    def held(self) -> events_pb2.Usage:
        """What the calls in flight hold at most."""
        total = events_pb2.Usage()
        add(total, self.workers_held)
        add(total, self.calls_held)
        return total

    def running_max_tokens(self, subtask_id: str) -> list[int]:
        return [started.max_tokens for started in self.running.get(subtask_id, {}).values()]

    def _ended(self, subtask_id: str, attempt: int, usage: events_pb2.Usage) -> None:
        started = self.running.get(subtask_id, {}).pop(attempt, None)
        if started is not None:
            self.attempts_running -= 1
            subtract(self.workers_held, started.reserved)
            if not self.attempts_running:  # exactly nothing, not what the floats' rounding leaves
                self.workers_held = events_pb2.Usage()
        add(self.worker_spent, usage)
        self._recount(subtask_id)

    def _recount(self, subtask_id: str) -> None:
        record = self.subtasks.get(subtask_id)
        if record is None:
            return
        if record.usage.output_tokens == 0 and not record.output and not self.running.get(subtask_id):
            self.unstarted.add(subtask_id)
        else:
            self.unstarted.discard(subtask_id)

    def apply(self, event: events_pb2.SwarmEvent) -> Change:
        kind = event.WhichOneof("kind")
        handler = getattr(self, f"_apply_{kind}", None) if kind else None
        if kind is None or handler is None:
            raise ValueError(f"unknown event kind {kind!r} in swarm {self.swarm_id}")
        change: Change = handler(getattr(event, kind))
        self.last_sequence = event.sequence
        self.update_time = event.time
        if kind == "accepted":
            self.create_time = event.time
        if self.state in ENDED:
            self.end_time = event.time
        return change

    def _apply_accepted(self, body: events_pb2.SwarmAccepted) -> Change:
        self.accepted = body
        self.state = S.SWARM_STATE_PLANNING
        return Change(summary=True)

    def _apply_plan_created(self, body: events_pb2.PlanCreated) -> Change:
        self.planned = True
        self.plan_usage = body.usage
        if not self.tracked:
            add(self.plan_spent, body.usage)
        self.subtasks = {
            subtask.id: SubtaskRecord(subtask, position) for position, subtask in enumerate(body.subtasks)
        }
        self.unstarted = set(self.subtasks)
        self.state = S.SWARM_STATE_RUNNING
        return Change(summary=True, subtask_ids=tuple(self.subtasks))

    def _apply_subtask_started(self, body: events_pb2.SubtaskStarted) -> Change:
        record = self.subtasks[body.subtask_id]
        record.state = T.SUBTASK_STATE_RUNNING
        record.attempts = max(record.attempts, body.attempt)
        record.worker_id = body.worker_id
        record.error = ""
        replaced = self.running.setdefault(body.subtask_id, {}).get(body.attempt)
        if replaced is None:
            self.attempts_running += 1
        else:
            subtract(self.workers_held, replaced.reserved)
        self.running[body.subtask_id][body.attempt] = body
        add(self.workers_held, body.reserved)
        self.unstarted.discard(body.subtask_id)
        self.hedges += body.hedge
        return Change(summary=True, subtask_ids=(body.subtask_id,))  # what is held changed

    def _apply_subtask_delta(self, body: events_pb2.SubtaskDelta) -> Change:
        return Change()  # the output is kept whole in subtask_completed

    def _apply_subtask_completed(self, body: events_pb2.SubtaskCompleted) -> Change:
        record = self.subtasks[body.subtask_id]
        record.state = T.SUBTASK_STATE_COMPLETED
        record.worker_id = body.worker_id
        record.output = body.output
        record.usage = body.usage
        record.stop_reason = body.stop_reason
        self._ended(body.subtask_id, body.attempt, body.usage)
        return Change(summary=True, subtask_ids=(body.subtask_id,))  # what is spent changed

    def _apply_subtask_failed(self, body: events_pb2.SubtaskFailed) -> Change:
        record = self.subtasks[body.subtask_id]
        record.error = body.error
        self._ended(body.subtask_id, body.attempt, body.usage)
        if not body.will_retry:
            record.state = T.SUBTASK_STATE_FAILED
        elif not self.running.get(body.subtask_id):
            record.state = T.SUBTASK_STATE_PENDING  # else its other attempt still runs
        return Change(summary=True, subtask_ids=(body.subtask_id,))

    def _apply_attempt_superseded(self, body: events_pb2.AttemptSuperseded) -> Change:
        self._ended(body.subtask_id, body.attempt, body.usage)
        return Change(summary=True)

    def _apply_call_reserved(self, body: events_pb2.CallReserved) -> Change:
        replaced = self.calls.get(body.call_id)
        if replaced is not None:
            subtract(self.calls_held, replaced.reserved)
        self.calls[body.call_id] = body
        add(self.calls_held, body.reserved)
        return Change(summary=True)

    def _apply_call_settled(self, body: events_pb2.CallSettled) -> Change:
        reserved = self.calls.pop(body.call_id, None)
        if reserved is not None:
            subtract(self.calls_held, reserved.reserved)
            if not self.calls:
                self.calls_held = events_pb2.Usage()
        add(self.plan_spent, body.usage)
        return Change(summary=True)

    def _apply_synthesis_delta(self, body: events_pb2.SynthesisDelta) -> Change:
        return self._synthesizing(body.attempt)

    def _apply_partial_synthesis(self, body: events_pb2.PartialSynthesis) -> Change:
        self.partials[body.id] = body
        add(self.partial_usage, body.usage)
        self._synthesizing(body.attempt)
        if not self.tracked:
            add(self.plan_spent, body.usage)
        return Change(summary=True)  # what is spent changed

    def _synthesizing(self, attempt: int) -> Change:
        self.synthesis_attempt = max(self.synthesis_attempt, attempt)
        if self.state == S.SWARM_STATE_SYNTHESIZING:
            return Change()
        self.state = S.SWARM_STATE_SYNTHESIZING
        return Change(summary=True)

    def _apply_answer_budget(self, body: events_pb2.AnswerBudget) -> Change:
        self.answer_max_tokens = body.max_tokens
        return Change()

    def _apply_swarm_completed(self, body: events_pb2.SwarmCompleted) -> Change:
        self.state = S.SWARM_STATE_COMPLETED
        self.result = body.result
        self.usage = body.usage
        if not self.tracked:
            # The final synthesis is told in the total alone: all that is not the workers'.
            self.plan_spent = events_pb2.Usage()
            add(self.plan_spent, body.usage)
            subtract(self.plan_spent, self.worker_spent)
        return Change(summary=True)

    def _apply_swarm_failed(self, body: events_pb2.SwarmFailed) -> Change:
        self.state = S.SWARM_STATE_FAILED
        self.error = body.error
        self.result = body.partial_result
        if body.HasField("usage"):
            self.usage = body.usage
        return Change(summary=True)

    def _apply_swarm_cancelled(self, body: events_pb2.SwarmCancelled) -> Change:
        self.state = S.SWARM_STATE_CANCELLED
        self.error = body.reason
        return Change(summary=True)

    def _apply_swarm_resumed(self, body: events_pb2.SwarmResumed) -> Change:
        return Change()  # what changes on a resume is told by the events that follow it

    def usage_by_model(self) -> list[events_pb2.ModelUsage]:
        """Spending per model, settled and held, with what each model did."""
        plan, workers = events_pb2.Usage(), events_pb2.Usage()
        add(plan, self.plan_spent)
        add(workers, self.worker_spent)
        add(plan, self.calls_held)
        add(workers, self.workers_held)
        if self.accepted.model == self.worker_model:
            add(plan, workers)
            return [
                events_pb2.ModelUsage(
                    model=self.worker_model, role="plan and synthesis and workers", usage=plan
                )
            ]
        return [
            events_pb2.ModelUsage(model=self.accepted.model, role="plan and synthesis", usage=plan),
            events_pb2.ModelUsage(model=self.worker_model, role="workers", usage=workers),
        ]

    def to_proto(self, *, with_subtasks: bool = True) -> orchestrator_pb2.Swarm:
        swarm = orchestrator_pb2.Swarm(
            swarm_id=self.swarm_id,
            idea=self.accepted.idea,
            num_agents=self.accepted.num_agents,
            model=self.accepted.model,
            provider=self.accepted.provider,
            request_id=self.accepted.request_id,
            trace_id=self.accepted.trace_id,
            tenant=self.accepted.tenant,
            state=self.state,  # type: ignore[arg-type]
            result=self.result,
            error=self.error,
            usage=self.usage,
            create_time=self.create_time,
            update_time=self.update_time,
            last_sequence=self.last_sequence,
            worker_model=self.worker_model,
            hedges=self.hedges,
            hedging=self.accepted.hedging,
        )
        if self.accepted.HasField("budget"):
            swarm.budget.CopyFrom(self.accepted.budget)
        spent = self.spent
        add(spent, self.held)
        swarm.spent.CopyFrom(spent)
        swarm.usage_by_model.extend(self.usage_by_model())
        if self.end_time is not None:
            swarm.end_time.CopyFrom(self.end_time)
        if with_subtasks:
            swarm.subtasks.extend(record.to_proto() for record in self.subtasks.values())
        return swarm
