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
from dataclasses import dataclass

import grpc

from orchestrator_service.event_log import EventLog, LogClosed
from orchestrator_service.rate_limits import ModelLimits, ModelRateLimiter, estimate_tokens
from orchestrator_service.watchdog import Bounds, Overtime, Silent, watched
from orchestrator_service.worker_pool import PoolWorker, WorkerPool
from orchestrator_service.worker_session import SubtaskCallFailed
from swarm.v1 import events_pb2, worker_pb2
from swarm_common import prompts
from swarm_common.errors import Overloaded, RateLimited
from swarm_common.status import CallFailure

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
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not kind:
        details = f"the worker went away: {details}"
    return AttemptError(
        message=f"{code.name}: {details}",
        retryable=code not in FINAL_CODES,
        # A worker that answered with an error kind is alive; its model API is what failed.
        worker_suspect=code == grpc.StatusCode.UNAVAILABLE and not kind,
    )


class DeltaCoalescer:
    """Gathers an attempt's chunks into at most one subtask_delta per window, so a client's event
    rate stays bounded however finely the model streams, and no text is lost: what is gathered
    goes out when the window ends, or before the attempt's next event."""

    def __init__(self, log: EventLog, subtask_id: str, attempt: int, window_s: float) -> None:
        self._log = log
        self._subtask_id = subtask_id
        self._attempt = attempt
        self._window_s = window_s
        self._parts: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        self._parts.append(text)
        if self._window_s <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window_s, self.flush)

    def close(self) -> None:
        """Sends what is gathered, unless the log no longer takes events (the swarm stopped)."""
        with contextlib.suppress(LogClosed):
            self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._parts:
            text = "".join(self._parts)
            self._parts.clear()
            self._log.append(
                "subtask_delta",
                events_pb2.SubtaskDelta(subtask_id=self._subtask_id, text=text, attempt=self._attempt),
            )


@dataclass(slots=True)
class SubtaskOutcome:
    output: str
    usage: events_pb2.Usage


class Scheduler:
    def __init__(
        self,
        pool: WorkerPool,
        policy: RetryPolicy | None = None,
        limiter: ModelRateLimiter | None = None,
        *,
        delta_window_s: float = 0.05,
    ) -> None:
        self.pool = pool
        self.policy = policy or RetryPolicy()
        self.limiter = limiter or ModelRateLimiter(ModelLimits())
        # 0 = one subtask_delta per chunk the worker sends.
        self.delta_window_s = delta_window_s

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
    ) -> SubtaskOutcome:
        """Attempts the subtask until one attempt succeeds; every step goes to `log`.

        `max_parallel` caps the swarm's subtasks holding worker slots at once (0 = no cap);
        `deadline` (epoch seconds) bounds every attempt; `first_attempt` continues a count;
        `max_tokens` is the answer's budget (0 = the worker's default)."""
        tried: set[str] = set()
        last_attempt = first_attempt + self.policy.max_attempts - 1
        for attempt in range(first_attempt, last_attempt + 1):
            worker = await self.pool.acquire(
                log.swarm_id,
                avoid=frozenset(tried),
                max_parallel=max_parallel,
                tenant=log.record.accepted.tenant,  # slots are shared between tenants first
            )
            tried.add(worker.address)
            error: AttemptError | None = None
            try:
                return await self._attempt(log, worker, subtask, idea, model, attempt, deadline, max_tokens)
            except SubtaskCallFailed as failed:
                error = classify(failed.failure, self.limiter)
            except Overtime as overtime:
                # The subtask timeout, or the swarm's deadline.
                error = AttemptError(f"the attempt {overtime}", retryable=True)
            except Silent as silent:
                error = AttemptError(f"{silent}: the worker seems hung", retryable=True, worker_suspect=True)
            except IncompleteAttempt as incomplete:
                error = AttemptError(str(incomplete), retryable=True)
            finally:
                # A suspect worker is out before its slot is given back, or the slot would go
                # straight to a waiting subtask.
                if error is not None and error.worker_suspect:
                    self.pool.mark_unreachable(worker)
                self.pool.release(worker, log.swarm_id)
            will_retry = error.retryable and attempt < last_attempt
            log.append(
                "subtask_failed",
                events_pb2.SubtaskFailed(
                    subtask_id=subtask.id,
                    worker_id=worker.worker_id,
                    error=error.message,
                    attempt=attempt,
                    will_retry=will_retry,
                ),
            )
            if not will_retry:
                raise SubtaskFailed(subtask.id, attempt, error.message)
            await asyncio.sleep(self.policy.backoff(attempt - first_attempt + 1))
        raise AssertionError("unreachable: the last attempt either returns or raises")

    def _timeout(self, deadline: float | None) -> float:
        timeout = self.policy.subtask_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.time())
        return max(0.001, timeout)

    async def _attempt(
        self,
        log: EventLog,
        worker: PoolWorker,
        subtask: events_pb2.Subtask,
        idea: str,
        model: str,
        attempt: int,
        deadline: float | None,
        max_tokens: int,
    ) -> SubtaskOutcome:
        permit = await self.limiter.acquire(
            estimate_tokens(prompts.WORKER_SYSTEM, idea, subtask.title, subtask.instructions)
        )
        try:
            log.append(
                "subtask_started",
                events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id=worker.worker_id, attempt=attempt),
            )
            timeout = self._timeout(deadline)
            request = worker_pb2.ExecuteSubtaskRequest(
                swarm_id=log.swarm_id,
                subtask=subtask,
                model=model,
                attempt=attempt,
                idea=idea,
                max_tokens=max_tokens,
            )
            request.deadline.FromNanoseconds(int((time.time() + timeout) * 1e9))
            chunks: list[str] = []
            deltas = DeltaCoalescer(log, subtask.id, attempt, self.delta_window_s)
            outputs = watched(
                worker.session.execute(request), Bounds(timeout, self.policy.no_progress_timeout_s)
            )
            response: worker_pb2.ExecuteSubtaskResponse | None = None
            try:
                async for response in outputs:
                    permit.answered()
                    if response.HasField("result"):
                        break
                    chunks.append(response.text)
                    deltas.add(response.text)
            finally:
                await outputs.aclose()  # an unfinished subtask is cancelled on the worker
                deltas.close()
            if response is None or not response.HasField("result"):
                raise IncompleteAttempt("the worker ended the subtask without a result")
            usage = response.result.usage
            permit.settle(usage.input_tokens, usage.output_tokens)
            output = "".join(chunks)
            log.append(
                "subtask_completed",
                events_pb2.SubtaskCompleted(
                    subtask_id=subtask.id,
                    worker_id=response.worker_id or worker.worker_id,
                    output=output,
                    usage=usage,
                    attempt=attempt,
                    stop_reason=response.result.stop_reason,
                ),
            )
            return SubtaskOutcome(output, usage)
        finally:
            permit.release()
