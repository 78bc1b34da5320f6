"""Runs one subtask to an end on the worker pool: the attempts, the failover and the retry rules.

An attempt's output streams out as it arrives; a failed attempt's deltas are left behind, and the
completed output is the successful attempt's alone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from orchestrator_service.event_log import EventLog
from orchestrator_service.worker_pool import PoolWorker, WorkerPool
from swarm.v1 import events_pb2, worker_pb2
from swarm_common.status import ERROR_KIND_KEY

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
    subtask_timeout_s: float = 600.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** (attempt - 1))


@dataclass(frozen=True, slots=True)
class AttemptError:
    message: str
    retryable: bool
    worker_gone: bool


def classify(error: grpc.aio.AioRpcError) -> AttemptError:
    """The retry rules, in one place."""
    code = error.code()
    kind = dict(error.trailing_metadata() or ()).get(ERROR_KIND_KEY, "")
    details = error.details() or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = "the attempt took longer than the subtask timeout"
    elif code == grpc.StatusCode.UNAVAILABLE and not kind:
        details = f"worker unavailable: {details}"
    return AttemptError(
        message=f"{code.name}: {details}",
        retryable=code not in FINAL_CODES,
        # A worker that answered with an error kind is alive; its model API is what failed.
        worker_gone=code == grpc.StatusCode.UNAVAILABLE and not kind,
    )


@dataclass(slots=True)
class SubtaskOutcome:
    output: str
    usage: events_pb2.Usage


class Scheduler:
    def __init__(self, pool: WorkerPool, policy: RetryPolicy | None = None) -> None:
        self.pool = pool
        self.policy = policy or RetryPolicy()

    async def run(
        self, log: EventLog, subtask: events_pb2.Subtask, *, idea: str, model: str
    ) -> SubtaskOutcome:
        """Attempts the subtask until one attempt succeeds; every step goes to `log`."""
        tried: set[str] = set()
        for attempt in range(1, self.policy.max_attempts + 1):
            worker = await self.pool.acquire(avoid=frozenset(tried))
            tried.add(worker.address)
            try:
                return await self._attempt(log, worker, subtask, idea=idea, model=model, attempt=attempt)
            except grpc.aio.AioRpcError as rpc_error:
                error = classify(rpc_error)
            except IncompleteAttempt as incomplete:
                error = AttemptError(str(incomplete), retryable=True, worker_gone=False)
            finally:
                await self.pool.release(worker)
            if error.worker_gone:
                await self.pool.mark_unreachable(worker)
            will_retry = error.retryable and attempt < self.policy.max_attempts
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
            await asyncio.sleep(self.policy.backoff(attempt))
        raise AssertionError("unreachable: the last attempt either returns or raises")

    async def _attempt(
        self,
        log: EventLog,
        worker: PoolWorker,
        subtask: events_pb2.Subtask,
        *,
        idea: str,
        model: str,
        attempt: int,
    ) -> SubtaskOutcome:
        log.append(
            "subtask_started",
            events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id=worker.worker_id, attempt=attempt),
        )
        timeout = self.policy.subtask_timeout_s
        request = worker_pb2.ExecuteSubtaskRequest(
            swarm_id=log.swarm_id, subtask=subtask, model=model, attempt=attempt, idea=idea
        )
        request.deadline.FromNanoseconds(int((time.time() + timeout) * 1e9))
        chunks: list[str] = []
        call = worker.stub.ExecuteSubtask(request, timeout=timeout)
        try:
            async for response in call:
                if response.HasField("result"):
                    output = "".join(chunks)
                    log.append(
                        "subtask_completed",
                        events_pb2.SubtaskCompleted(
                            subtask_id=subtask.id,
                            worker_id=response.worker_id or worker.worker_id,
                            output=output,
                            usage=response.result.usage,
                            attempt=attempt,
                        ),
                    )
                    return SubtaskOutcome(output, response.result.usage)
                chunks.append(response.text)
                log.append(
                    "subtask_delta",
                    events_pb2.SubtaskDelta(subtask_id=subtask.id, text=response.text, attempt=attempt),
                )
        finally:
            call.cancel()
        raise IncompleteAttempt("the worker ended the stream without a result")


class IncompleteAttempt(Exception):
    """The worker's stream ended cleanly but without its final result message."""
