"""Executes one subtask: prompt -> provider stream -> chunks. Knows nothing of gRPC.

The worker keeps its own limits, whoever calls it: an orchestrator, a buggy one, or anyone who can
reach its port. mTLS between orchestrator and worker is the door; these are the wall behind it.

- **Requests.** An idea over `max_idea_bytes`, a subtask whose title and instructions pass
  `max_subtask_bytes`, or a model outside `allowed_models`, is refused before any model call: a
  direct caller cannot skip the orchestrator's idea limit, or spend on a model the operator did
  not mean to pay for.
- **Capacity.** `max_concurrency` slots serve the ExecuteSubtasks streams, which are the
  orchestrators' path; direct ExecuteSubtask callers get `direct_slots` of their own, apart from
  those (0 refuses them). A direct caller can never take a slot an orchestrator counts on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from swarm_common import logs, prompts, telemetry
from swarm_common.errors import ProviderError, ProviderUnavailable
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS, PromptBlock, Provider, StreamRequest, Usage

log = logging.getLogger("swarm.worker")


class WorkerBusy(Exception):
    """Every slot is taken: the caller should try another worker."""


class RefusedAssignment(ValueError):
    """The assignment is over this worker's limits: no retry here or elsewhere can help."""


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    max_idea_bytes: int = 64 * 1024
    # A plan's instructions may quote the idea: room for that, and for a model's longest plan.
    max_subtask_bytes: int = 128 * 1024
    # Models this worker calls; the default model is always among them.
    allowed_models: frozenset[str] = frozenset()
    direct_slots: int = 2


@dataclass(frozen=True, slots=True)
class Assignment:
    swarm_id: str
    subtask_id: str
    title: str
    instructions: str
    idea: str
    model: str
    attempt: int
    # Wall-clock time (epoch seconds) the attempt must end by; None = no deadline.
    deadline: float | None = None
    # The answer's budget of output tokens.
    max_tokens: int = DEFAULT_ANSWER_MAX_TOKENS
    # The caller's W3C trace headers: the execution's span continues its trace.
    trace_context: Mapping[str, str] = field(default_factory=dict)
    # What the plan says about the whole, shared by the swarm's subtasks; and whether the shared
    # prefix (system prompt, idea, plan) is marked for the model API's prompt cache.
    plan_context: str = ""
    cache_shared_prefix: bool = False

    def stream_request(self, default_model: str, timeout_s: float | None) -> StreamRequest:
        """The model call: the idea and the plan first, marked for the cache as the orchestrator
        asked, so the swarm's N calls share their prefix; the subtask's own part last."""
        shared = [PromptBlock(prompts.idea_block(self.idea), cache=self.cache_shared_prefix)]
        if self.plan_context:
            shared.append(PromptBlock(self.plan_context, cache=self.cache_shared_prefix))
        return StreamRequest(
            model=self.model or default_model,
            system=prompts.SWARM_SYSTEM,
            prompt=prompts.worker_prompt(self.title, self.instructions),
            max_tokens=self.max_tokens,
            timeout_s=timeout_s,
            shared=tuple(shared),
            call_key=f"{self.subtask_id}/{self.attempt}",
        )


def executing(assignment: Assignment) -> AbstractContextManager[object]:
    """The assignment's span, continued from its caller's trace and current inside the `with` (its
    model call's span is its child); and its ids on every line the task logs from here on. For a
    subtask in a task of its own: an ExecuteSubtasks call's task, or an ExecuteSubtask call's, whose
    handler grpc closes in that same task (see telemetry.span; a test cancels one mid-answer)."""
    logs.bind(
        swarm_id=assignment.swarm_id,
        subtask_id=assignment.subtask_id,
        attempt=assignment.attempt,
        trace_id=telemetry.trace_id_in(assignment.trace_context),
    )
    return telemetry.span(
        "execute subtask",
        kind=telemetry.SpanKind.SERVER,
        parent=telemetry.parent_from(assignment.trace_context),
        attributes={"swarm.subtask.id": assignment.subtask_id, "swarm.attempt": assignment.attempt},
    )


class Slot:
    """A slot taken by `claim`: given back once, by whichever comes first of the end of `execute`
    and `release` (for a subtask that never began)."""

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back: Callable[[], None] | None = give_back

    def release(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


class Worker:
    def __init__(
        self,
        provider: Provider,
        *,
        worker_id: str,
        max_concurrency: int,
        default_model: str,
        limits: WorkerLimits | None = None,
    ) -> None:
        self.provider = provider
        self.worker_id = worker_id
        self.max_concurrency = max_concurrency
        self.default_model = default_model
        self.limits = limits or WorkerLimits()
        self.allowed_models = self.limits.allowed_models | {default_model}
        self.in_flight = 0  # of the orchestrators' slots
        self.direct_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Failed model calls are logged, but a flood of them (an outage) is counted, not written.
        self._failures = logs.Throttle()
        _WORKERS.add(self)

    def claim(self, assignment: Assignment, *, direct: bool) -> Slot:
        """Checks the assignment against the limits (RefusedAssignment), then takes a slot of its
        pool or raises WorkerBusy; `execute` gives it back."""
        try:
            return self._claim(assignment, direct=direct)
        except RefusedAssignment:
            ERRORS.labels("refused").inc()
            raise
        except WorkerBusy:
            ERRORS.labels("worker_busy").inc()
            raise

    def _claim(self, assignment: Assignment, *, direct: bool) -> Slot:
        self._check(assignment)
        if direct:
            if not self.limits.direct_slots:
                raise WorkerBusy(
                    f"worker {self.worker_id} takes no direct calls: ExecuteSubtasks is for orchestrators"
                )
            if self.direct_in_flight >= self.limits.direct_slots:
                raise WorkerBusy(
                    f"worker {self.worker_id} is running {self.direct_in_flight} direct subtasks, its maximum"
                )
            self.direct_in_flight += 1
        else:
            if self.in_flight >= self.max_concurrency:
                raise WorkerBusy(f"worker {self.worker_id} is running {self.in_flight} subtasks, its maximum")
            self.in_flight += 1
        self._idle.clear()
        return Slot(lambda: self._give_back(direct=direct))

    def _give_back(self, *, direct: bool) -> None:
        if direct:
            self.direct_in_flight -= 1
        else:
            self.in_flight -= 1
        if self.in_flight == self.direct_in_flight == 0:
            self._idle.set()

    def _check(self, assignment: Assignment) -> None:
        limits = self.limits
        if len(assignment.idea.encode()) > limits.max_idea_bytes:
            raise RefusedAssignment(f"the idea is over this worker's limit of {limits.max_idea_bytes} bytes")
        if len(assignment.plan_context.encode()) > limits.max_subtask_bytes:
            raise RefusedAssignment(
                f"the plan context is over this worker's limit of {limits.max_subtask_bytes} bytes"
            )
        if len(assignment.title.encode()) + len(assignment.instructions.encode()) > limits.max_subtask_bytes:
            raise RefusedAssignment(
                f"the subtask's title and instructions are over this worker's limit of {limits.max_subtask_bytes} bytes"
            )
        model = assignment.model or self.default_model
        if model not in self.allowed_models:
            raise RefusedAssignment(f"model {model[:80]!r} is not among this worker's allowed models")

    async def execute(self, assignment: Assignment, slot: Slot) -> AsyncIterator[str | Usage]:
        """Runs a claimed assignment: yields the output's chunks as they arrive, then one Usage."""
        try:
            timeout_s = None
            if assignment.deadline is not None:
                timeout_s = assignment.deadline - time.time()
                if timeout_s <= 0:
                    raise ProviderUnavailable("the attempt's deadline passed before it started")
            request = assignment.stream_request(self.default_model, timeout_s)
            async for item in self.provider.stream(request):
                yield item
        except ProviderError as error:
            ERRORS.labels(error.code).inc()
            left_out = self._failures.take()
            if left_out is not None:
                log.warning(
                    f"the model call failed: {error.message}",
                    extra={"error": error.code, "left_out": left_out or None},
                )
            raise
        except Exception:
            ERRORS.labels("internal").inc()
            raise
        finally:
            slot.release()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is in flight; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def log_unfinished(self) -> None:
        unfinished = self.in_flight + self.direct_in_flight
        log.warning(f"shutdown grace over with {unfinished} subtask(s) unfinished: they are cancelled")


_WORKERS: telemetry.Census[Worker] = telemetry.Census()
IN_FLIGHT = Gauge(
    "swarm_worker_subtasks_in_flight",
    "Subtasks this worker is running, by whose slots they hold: orchestrator (ExecuteSubtasks) or direct",
    ["path"],
)
IN_FLIGHT.labels("orchestrator").set_function(lambda: _WORKERS.total(lambda w: w.in_flight))
IN_FLIGHT.labels("direct").set_function(lambda: _WORKERS.total(lambda w: w.direct_in_flight))
CAPACITY = Gauge("swarm_worker_max_concurrency", "Subtasks this worker runs at once for orchestrators")
CAPACITY.set_function(lambda: _WORKERS.total(lambda w: w.max_concurrency))
ERRORS = Counter(
    "swarm_worker_subtask_errors_total",
    "Subtasks this worker ended with an error, by kind: worker_busy, refused (over its limits), the "
    "model API's kinds (rate_limited, overloaded, unavailable, unauthenticated, invalid_request, "
    "provider_error), internal",
    ["kind"],
)
