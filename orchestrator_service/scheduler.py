"""Runs one subtask to an end on the worker pool: the attempts, the failover and the retry rules.

An attempt fails over to another worker when its worker dies (UNAVAILABLE), hangs (no output for
`no_progress_timeout_s`, or past `subtask_timeout_s`), drains under it, or its model call fails in
a way a retry can fix. Errors no retry can fix (bad request, bad credentials) fail the subtask at
once. An attempt's output streams out as it arrives; a failed attempt's deltas are left behind,
and the completed output is the successful attempt's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from orchestrator_service.budget import Grant, SwarmBudget
from orchestrator_service.delta_windows import DeltaWindows
from orchestrator_service.event_log import EventLog
from orchestrator_service.hedging import Hedger
from orchestrator_service.rate_limits import ModelLimits, ModelRateLimiter, estimate_tokens
from orchestrator_service.watchdog import Bounds, Overtime, Silent, watched
from orchestrator_service.worker_pool import PoolWorker, WorkerPool
from orchestrator_service.worker_session import SubtaskCallFailed
from swarm.v1 import events_pb2, worker_pb2
from swarm_common import logs, prompts, telemetry
from swarm_common.errors import (
    AuthenticationFailed,
    InvalidModelRequest,
    Overloaded,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from swarm_common.providers import Usage
from swarm_common.status import WORKER_BUSY, CallFailure
from swarm_common.usage import usage_of, usage_proto

SCHEDULE_TO_START = Histogram(
    "swarm_subtask_schedule_to_start_seconds",
    "From an attempt's entry in the queue to the worker slot it is given",
    buckets=telemetry.WAIT_BUCKETS,
)
FIRST_TOKEN = Histogram(
    "swarm_subtask_first_token_seconds",
    "From an attempt's start to its first output reaching the orchestrator",
    buckets=telemetry.DURATION_BUCKETS,
)
DURATION = Histogram(
    "swarm_subtask_duration_seconds",
    "A completed subtask's time, from its first queueing to its completion, every attempt included",
    buckets=telemetry.DURATION_BUCKETS,
)
ATTEMPTS = Counter("swarm_subtask_attempts_total", "Subtask attempts given a worker slot")
RETRIES = Counter(
    "swarm_subtask_retries_total",
    "Failed attempts that will be tried again (elsewhere), by reason",
    ["reason"],
)
FAILOVERS = Counter(
    "swarm_subtask_failovers_total",
    "Failed attempts lost to their worker (it went away or hung, and is taken out), by reason",
    ["reason"],
)
FAILED = Counter(
    "swarm_subtasks_failed_total",
    "Subtasks that failed for good, by the reason of their last attempt",
    ["reason"],
)
# A worker's error kinds that name a reason of their own; any other is "other", so a misbehaving
# worker cannot add series.
KNOWN_KINDS = frozenset(
    error.code
    for error in (
        ProviderError,
        RateLimited,
        Overloaded,
        ProviderUnavailable,
        AuthenticationFailed,
        InvalidModelRequest,
    )
) | {WORKER_BUSY}

# Codes a retry on another worker cannot fix: the request itself, or the credentials, are wrong.
FINAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


# Error kinds a model call ends in before the API has written anything.
UNBILLED_KINDS = frozenset({RateLimited.code, Overloaded.code, WORKER_BUSY})


class SubtaskFailed(Exception):
    """The subtask ran out of attempts or hit an error no retry can fix."""

    def __init__(self, subtask_id: str, attempts: int, error: str) -> None:
        super().__init__(f"subtask {subtask_id} failed after {attempts} attempt(s): {error}")
        self.subtask_id = subtask_id
        self.error = error


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    # One attempt's whole time, and the longest silence within it, before it is given up on.
    subtask_timeout_s: float = 600.0
    no_progress_timeout_s: float = 120.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** (attempt - 1))


@dataclass(frozen=True, slots=True)
class AttemptError:
    message: str
    retryable: bool
    # Take the worker out until it answers a probe: it died, or hung.
    worker_suspect: bool = False
    # The worker answered with an error the model API gave before any token (a refusal, a rate
    # limit), or never called it: the attempt cost nothing. Otherwise what it cost is unknown.
    unbilled: bool = False
    # The failure's kind, for metrics: one of a bounded set.
    reason: str = "other"


class IncompleteAttempt(Exception):
    """The worker's stream ended cleanly but without its final result message."""


def classify(failure: CallFailure, limiter: ModelRateLimiter) -> AttemptError:
    """The retry rules for a failed attempt, in one place. A model API that rate-limits or is
    overloaded slows every call through `limiter`, not just this one."""
    code, kind, details = failure.code, failure.kind, failure.message
    if kind == RateLimited.code:
        limiter.note_error(RateLimited(details, failure.retry_after_s))
    elif kind == Overloaded.code:
        limiter.note_error(Overloaded(details))
    gone = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not kind
    if gone:
        details = f"the worker went away: {details}"
    return AttemptError(
        message=f"{code.name}: {details}",
        retryable=code not in FINAL_CODES,
        # A worker that answered with an error kind is alive; its model API is what failed.
        worker_suspect=code == grpc.StatusCode.UNAVAILABLE and not kind,
        unbilled=kind in UNBILLED_KINDS or code in FINAL_CODES,
        reason=_reason(failure, gone),
    )


def _reason(failure: CallFailure, gone: bool) -> str:
    if gone:
        return "worker_gone"
    if failure.kind:
        return failure.kind if failure.kind in KNOWN_KINDS else "other"
    return failure.code.name.lower()


@dataclass(slots=True)
class SubtaskOutcome:
    output: str
    usage: events_pb2.Usage


@dataclass(slots=True)
class SharedContext:
    """What the attempts of a swarm's subtasks share besides the idea."""

    # What the plan says about the whole, which every prompt carries after the idea.
    plan_context: str = ""
    # Mark the shared prefix for the prompt cache.
    cache: bool = False
    budget: SwarmBudget | None = None
    hedger: Hedger | None = None
    # Set when the swarm's first attempt has output (the cache entry it wrote is readable).
    warmed: asyncio.Event | None = None


@dataclass(slots=True)
class Attempt:
    """One attempt of a subtask: its number, where it runs and what the budget granted it."""

    number: int
    worker: PoolWorker
    grant: Grant | None
    hedge: bool = False
    started: float = field(default_factory=time.monotonic)
    # Its subtask_started is in the log (a hedge cancelled before that never ran).
    began: bool = False
    # The worker sent output: the model API was writing.
    answered: bool = False


@dataclass(slots=True)
class Failed:
    attempt: Attempt
    error: AttemptError


class Scheduler:
    def __init__(
        self,
        pool: WorkerPool,
        policy: RetryPolicy | None = None,
        limiter: ModelRateLimiter | None = None,
        *,
        delta_window_s: float = 0.05,
        max_delta_rate: float = 2000.0,
    ) -> None:
        self.pool = pool
        self.policy = policy or RetryPolicy()
        self.limiter = limiter or ModelRateLimiter(ModelLimits())
        # The worker sends an attempt's text once per window, and each text is one subtask_delta.
        self.delta_windows = DeltaWindows(delta_window_s, max_delta_rate, self._set_window)

    def _set_window(self, swarm_id: str, window_s: float) -> None:
        for worker in self.pool.workers:
            worker.session.set_window(swarm_id, window_s)

    async def run(
        self,
        log: EventLog,
        subtask: events_pb2.Subtask,
        *,
        idea: str,
        model: str,
        max_parallel: int = 0,
        deadline: float | None = None,
        first_attempt: int = 1,
        max_tokens: int = 0,
        shared: SharedContext | None = None,
    ) -> SubtaskOutcome:
        """Attempts the subtask until one attempt succeeds; every step goes to `log`.

        `max_parallel` caps the swarm's subtasks holding worker slots at once (0 = no cap);
        `deadline` (epoch seconds) bounds every attempt; `first_attempt` continues a count;
        `max_tokens` is the answer's budget (0 = the worker's default); `shared` is what the
        swarm's subtasks share (its budget, hedging, the plan and the prompt cache)."""
        shared = shared or SharedContext()
        job = _Job(log, subtask, idea, model, max_parallel, deadline, max_tokens, shared)
        tried: set[str] = set()
        number = first_attempt
        began = time.monotonic()
        logs.bind(subtask_id=subtask.id)  # this runs as a task of its own (the swarm's TaskGroup)
        failures = refusals = 0
        while True:
            grant = await shared.budget.grant_attempt(subtask, shared.plan_context) if shared.budget else None
            queued_at = time.monotonic()
            try:
                worker = await self.pool.acquire(
                    log.swarm_id,
                    avoid=frozenset(tried),
                    max_parallel=max_parallel,
                    tenant=log.record.accepted.tenant,  # slots are shared between tenants first
                )
            except BaseException:
                if grant is not None:
                    self._settle(shared, grant, Usage())
                raise
            SCHEDULE_TO_START.observe(time.monotonic() - queued_at)
            ATTEMPTS.inc()
            logs.bind(attempt=number)
            tried.add(worker.address)
            outcome = await self._race(job, Attempt(number, worker, grant), tried)
            if isinstance(outcome, SubtaskOutcome):
                DURATION.observe(time.monotonic() - began)
                return outcome
            number = max(number, outcome.attempt.number) + 1
            error = outcome.error
            # A worker that refused the start as full (another orchestrator took the slot this one
            # counted free, as while a replica joins) never called the model: the subtask waits
            # for a slot instead, for as long as an attempt may take, and loses no attempt.
            refused = error.reason == WORKER_BUSY and time.monotonic() - began < self.policy.subtask_timeout_s
            if refused:
                refusals += 1
            else:
                failures += 1
            will_retry = error.retryable and (refused or failures < self.policy.max_attempts)
            self._failed(job, outcome, will_retry)
            if not will_retry:
                raise SubtaskFailed(subtask.id, outcome.attempt.number, error.message)
            await asyncio.sleep(self.policy.backoff(refusals if refused else failures))

    def _failed(self, job: _Job, failed: Failed, will_retry: bool) -> None:
        attempt = failed.attempt
        (RETRIES if will_retry else FAILED).labels(failed.error.reason).inc()
        if failed.error.worker_suspect:
            FAILOVERS.labels(failed.error.reason).inc()
        job.log.append(
            "subtask_failed",
            events_pb2.SubtaskFailed(
                subtask_id=job.subtask.id,
                worker_id=attempt.worker.worker_id,
                error=failed.error.message,
                attempt=attempt.number,
                will_retry=will_retry,
                usage=_charged(attempt, Usage() if failed.error.unbilled and not attempt.answered else None),
            ),
        )

    async def _race(self, job: _Job, primary: Attempt, tried: set[str]) -> SubtaskOutcome | Failed:
        """The attempt, and a hedge of it if the swarm's hedger asks for one while it runs: the
        first to complete wins and the other is cancelled (attempt_superseded). A failure of one
        while the other runs is told at once (will_retry: the subtask goes on)."""
        hedger = job.shared.hedger
        if hedger is None:
            return await self._try(job, primary)  # nothing to race: no task of its own to pay for
        tasks: dict[asyncio.Task[SubtaskOutcome | Failed], Attempt] = {
            asyncio.create_task(self._try(job, primary)): primary
        }
        hedging: asyncio.Task[Attempt | None] | None = None
        waiting: asyncio.Task[bool] | None = asyncio.create_task(hedger.started(job.subtask.id).wait())
        try:
            while True:
                pending: set[asyncio.Task[Any]] = {*tasks, *(t for t in (waiting, hedging) if t is not None)}
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    waiting = None
                    hedging = asyncio.create_task(self._hedge(job, primary, tried))
                if hedging in done:
                    hedge = hedging.result()
                    hedging = None
                    if hedge is not None:
                        tasks[asyncio.create_task(self._try(job, hedge))] = hedge
                for task in [t for t in tasks if t in done]:
                    attempt = tasks.pop(task)
                    outcome = task.result()
                    if isinstance(outcome, SubtaskOutcome):
                        hedger.completed(job.subtask.id, time.monotonic() - attempt.started)
                        await self._supersede(job, tasks, winner=attempt)
                        return outcome
                    if not tasks:
                        return outcome  # the retry rules decide; a hedge still on its way is dropped
                    self._failed(job, outcome, will_retry=True)  # the other attempt runs on
        finally:
            for leftover in (waiting, hedging):
                if leftover is not None:
                    leftover.cancel()
            if hedging is not None and hedger is not None:
                hedger.declined()
            for task in tasks:
                task.cancel()
            if hedger is not None:
                hedger.ended(job.subtask.id)

    async def _hedge(self, job: _Job, primary: Attempt, tried: set[str]) -> Attempt | None:
        """A hedge of `primary` on another worker, if the budget gives it as much room."""
        shared = job.shared
        hedger = shared.hedger
        grant = None
        if shared.budget is not None and primary.grant is not None:
            grant = shared.budget.grant_hedge(job.subtask, shared.plan_context, primary.grant.max_tokens)
            if grant is None:
                if hedger is not None:
                    hedger.declined()
                return None
        try:
            worker = await self.pool.acquire(
                job.log.swarm_id,
                avoid=frozenset(tried),
                max_parallel=job.max_parallel,
                tenant=job.log.record.accepted.tenant,
            )
        except BaseException:
            if grant is not None:
                self._settle(shared, grant, Usage())
            raise
        tried.add(worker.address)
        ATTEMPTS.inc()
        number = job.log.record.subtasks[job.subtask.id].attempts + 1
        return Attempt(number, worker, grant, hedge=True)

    async def _supersede(
        self, job: _Job, losers: dict[asyncio.Task[SubtaskOutcome | Failed], Attempt], *, winner: Attempt
    ) -> None:
        """Cancels the attempts that lost the race, and tells what each is charged."""
        for task, attempt in losers.items():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not attempt.began:
                continue
            job.log.append(
                "attempt_superseded",
                events_pb2.AttemptSuperseded(
                    subtask_id=job.subtask.id,
                    worker_id=attempt.worker.worker_id,
                    attempt=attempt.number,
                    winner_attempt=winner.number,
                    usage=_charged(attempt, None),
                ),
            )
        losers.clear()

    async def _try(self, job: _Job, attempt: Attempt) -> SubtaskOutcome | Failed:
        """One attempt on its worker, whose slot it gives back at the end, as its grant: the outcome,
        or why it failed (which the caller tells)."""
        error: AttemptError | None = None
        usage: Usage | None = None
        worker = attempt.worker
        try:
            outcome = await telemetry.traced(
                self._attempt(job, attempt),
                "subtask attempt",
                kind=telemetry.SpanKind.CLIENT,
                attributes={
                    "swarm.subtask.id": job.subtask.id,
                    "swarm.attempt": attempt.number,
                    "swarm.worker.id": worker.worker_id,
                    "swarm.hedge": attempt.hedge,
                },
            )
            usage = usage_of(outcome.usage)
            return outcome
        except SubtaskCallFailed as failed:
            error = classify(failed.failure, self.limiter)
        except Overtime as overtime:
            # The subtask timeout, or the swarm's deadline.
            error = AttemptError(f"the attempt {overtime}", retryable=True, reason="timeout")
        except Silent as silent:
            error = AttemptError(
                f"{silent}: the worker seems hung", retryable=True, worker_suspect=True, reason="hung"
            )
        except IncompleteAttempt as incomplete:
            error = AttemptError(str(incomplete), retryable=True, reason="incomplete")
        finally:
            # A suspect worker is out before its slot is given back, or the slot would go
            # straight to a waiting subtask.
            if error is not None and error.worker_suspect:
                self.pool.mark_unreachable(worker)
            self.pool.release(worker, job.log.swarm_id)
            if attempt.grant is not None:
                unbilled = not attempt.began or (
                    error is not None and error.unbilled and not attempt.answered
                )
                self._settle(job.shared, attempt.grant, Usage() if unbilled else usage)
        return Failed(attempt, error)

    @staticmethod
    def _settle(shared: SharedContext, grant: Grant, usage: Usage | None) -> None:
        grant.settle(usage)
        if shared.budget is not None:
            shared.budget.settled()

    def _timeout(self, deadline: float | None) -> float:
        timeout = self.policy.subtask_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.time())
        return max(0.001, timeout)

    async def _attempt(self, job: _Job, attempt: Attempt) -> SubtaskOutcome:
        log, subtask, worker = job.log, job.subtask, attempt.worker
        permit = await self.limiter.acquire(
            estimate_tokens(
                prompts.SWARM_SYSTEM, job.idea, job.shared.plan_context, subtask.title, subtask.instructions
            )
        )
        max_tokens = attempt.grant.max_tokens if attempt.grant is not None else job.max_tokens
        try:
            log.append(
                "subtask_started",
                events_pb2.SubtaskStarted(
                    subtask_id=subtask.id,
                    worker_id=worker.worker_id,
                    attempt=attempt.number,
                    hedge=attempt.hedge,
                    max_tokens=max_tokens,
                    reserved=attempt.grant.reserved_proto if attempt.grant is not None else None,
                ),
            )
            attempt.began = True
            timeout = self._timeout(job.deadline)
            request = worker_pb2.ExecuteSubtaskRequest(
                swarm_id=log.swarm_id,
                subtask=subtask,
                model=job.model,
                attempt=attempt.number,
                idea=job.idea,
                max_tokens=max_tokens,
                cache_shared_prefix=job.shared.cache,
                trace_context=telemetry.carrier(),  # the worker's span continues this attempt's
            )
            request.deadline.FromNanoseconds(int((time.time() + timeout) * 1e9))
            plan_context = job.shared.plan_context
            if not worker.plan_contexts:  # a worker that predates plans sent once gets each start's
                request.plan_context, plan_context = plan_context, ""
            chunks: list[str] = []
            response: worker_pb2.ExecuteSubtaskResponse | None = None
            with self.delta_windows.streaming(log.swarm_id) as window_s:
                request.delta_window.FromNanoseconds(round(window_s * 1e9))
                outputs = watched(
                    worker.session.execute(request, plan_context=plan_context),
                    Bounds(timeout, self.policy.no_progress_timeout_s),
                )
                try:
                    async for response in outputs:
                        permit.answered()
                        if not attempt.answered:
                            FIRST_TOKEN.observe(time.monotonic() - attempt.started)
                        attempt.answered = True
                        if job.shared.warmed is not None:
                            job.shared.warmed.set()
                        if response.HasField("result"):
                            break
                        chunks.append(response.text)
                        log.append(
                            "subtask_delta",
                            events_pb2.SubtaskDelta(
                                subtask_id=subtask.id, text=response.text, attempt=attempt.number
                            ),
                        )
                finally:
                    await outputs.aclose()  # an unfinished subtask is cancelled on the worker
            if response is None or not response.HasField("result"):
                raise IncompleteAttempt("the worker ended the subtask without a result")
            usage = response.result.usage
            permit.settle(
                usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens,
                usage.output_tokens,
            )
            output = "".join(chunks)
            log.append(
                "subtask_completed",
                events_pb2.SubtaskCompleted(
                    subtask_id=subtask.id,
                    worker_id=response.worker_id or worker.worker_id,
                    output=output,
                    usage=usage,
                    attempt=attempt.number,
                    stop_reason=response.result.stop_reason,
                    hedged=attempt.hedge or len(log.record.running.get(subtask.id, {})) > 1,
                ),
            )
            return SubtaskOutcome(output, usage)
        finally:
            permit.release()


@dataclass(frozen=True, slots=True)
class _Job:
    """One subtask's run: what every attempt of it is made of."""

    log: EventLog
    subtask: events_pb2.Subtask
    idea: str
    model: str
    max_parallel: int
    deadline: float | None
    max_tokens: int
    shared: SharedContext


def _charged(attempt: Attempt, usage: Usage | None) -> events_pb2.Usage | None:
    """What an attempt ended without a result is charged: `usage`, or None = what it held."""
    if attempt.grant is None:
        return None
    return attempt.grant.reserved_proto if usage is None else usage_proto(usage)
