"""Translates WorkerService calls to and from the Worker. A subtask's outputs come from one place
(`_outputs`); ExecuteSubtask streams them as a call of their own, ExecuteSubtasks as messages on a
stream shared with other subtasks."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc

from swarm.v1 import events_pb2, worker_pb2, worker_pb2_grpc
from swarm_common.batches import batches
from swarm_common.errors import ProviderError
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS
from swarm_common.status import WORKER_BUSY, CallFailure
from worker_service.worker import Assignment, Worker, WorkerBusy

# The request and response types are the method's own; the context is only passed through.
Context = grpc.aio.ServicerContext[Any, Any]


class CallFailed(Exception):
    def __init__(self, failure: CallFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _assignment(request: worker_pb2.ExecuteSubtaskRequest) -> Assignment:
    deadline = None
    if request.HasField("deadline"):
        deadline = request.deadline.seconds + request.deadline.nanos / 1e9
    return Assignment(
        swarm_id=request.swarm_id,
        subtask_id=request.subtask.id,
        title=request.subtask.title,
        instructions=request.subtask.instructions,
        idea=request.idea,
        model=request.model,
        attempt=request.attempt,
        deadline=deadline,
        max_tokens=request.max_tokens or DEFAULT_ANSWER_MAX_TOKENS,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def _outputs(
        self, request: worker_pb2.ExecuteSubtaskRequest
    ) -> AsyncIterator[worker_pb2.ExecuteSubtaskResponse]:
        """The subtask's chunks, then its result once its slot is free again; a failure raises
        CallFailed."""
        if not request.subtask.id:
            raise CallFailed(CallFailure(grpc.StatusCode.INVALID_ARGUMENT, "subtask.id is required"))
        worker_id = self._worker.worker_id
        try:
            self._worker.claim()
        except WorkerBusy as busy:
            raise CallFailed(
                CallFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(busy), WORKER_BUSY)
            ) from None
        usage: events_pb2.Usage | None = None
        stop_reason = ""
        try:
            async for item in self._worker.execute(_assignment(request)):
                if isinstance(item, str):
                    yield worker_pb2.ExecuteSubtaskResponse(worker_id=worker_id, text=item)
                else:
                    usage = events_pb2.Usage(
                        input_tokens=item.input_tokens,
                        output_tokens=item.output_tokens,
                        cost_usd=item.cost_usd,
                    )
                    stop_reason = item.stop_reason
        except ProviderError as error:
            raise CallFailed(CallFailure.of_provider_error(error)) from None
        if usage is not None:
            result = worker_pb2.SubtaskResult(
                usage=usage, model=request.model or self._worker.default_model, stop_reason=stop_reason
            )
            yield worker_pb2.ExecuteSubtaskResponse(worker_id=worker_id, result=result)

    async def ExecuteSubtask(
        self, request: worker_pb2.ExecuteSubtaskRequest, context: Context
    ) -> AsyncIterator[worker_pb2.ExecuteSubtaskResponse]:
        try:
            async for response in self._outputs(request):
                yield response
        except CallFailed as failed:
            context.set_trailing_metadata(failed.failure.trailers())
            await context.abort(failed.failure.code, failed.failure.message)

    async def ExecuteSubtasks(
        self, requests: AsyncIterator[worker_pb2.ExecuteSubtasksRequest], context: Context
    ) -> AsyncIterator[worker_pb2.ExecuteSubtasksResponse]:
        """Runs each started subtask as a task of its own; their replies share this stream, sent
        together when several are ready."""
        outbox: asyncio.Queue[worker_pb2.SubtaskReply | None] = asyncio.Queue()
        running: dict[int, asyncio.Task[None]] = {}

        async def run(call_id: int, request: worker_pb2.ExecuteSubtaskRequest) -> None:
            try:
                async for output in self._outputs(request):
                    outbox.put_nowait(worker_pb2.SubtaskReply(call_id=call_id, output=output))
            except CallFailed as failed:
                outbox.put_nowait(worker_pb2.SubtaskReply(call_id=call_id, error=failed.failure.to_proto()))

        def ended(call_id: int, task: asyncio.Task[None]) -> None:
            if running.get(call_id) is task:
                del running[call_id]
            if task.cancelled():
                # The model call's cleanup is over (or the subtask never began): only now is its
                # slot free, and the caller counts it taken until told so.
                outbox.put_nowait(
                    worker_pb2.SubtaskReply(call_id=call_id, cancelled=worker_pb2.SubtaskCancelled())
                )

        async def read() -> None:
            try:
                async for request in requests:
                    for call in request.calls:
                        if call.HasField("start"):
                            started = asyncio.create_task(run(call.call_id, call.start))
                            running[call.call_id] = started
                            started.add_done_callback(functools.partial(ended, call.call_id))
                        elif (task := running.get(call.call_id)) is not None:
                            task.cancel()
            finally:
                outbox.put_nowait(None)  # the caller closed the stream: nothing more is wanted

        reader = asyncio.create_task(read())
        try:
            async for replies in batches(outbox):
                yield worker_pb2.ExecuteSubtasksResponse(replies=replies)
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

    async def GetWorkerInfo(
        self, request: worker_pb2.GetWorkerInfoRequest, context: Context
    ) -> worker_pb2.GetWorkerInfoResponse:
        return worker_pb2.GetWorkerInfoResponse(
            worker_id=self._worker.worker_id,
            max_concurrency=self._worker.max_concurrency,
            in_flight=self._worker.in_flight,
            provider=self._worker.provider.name,
            default_model=self._worker.default_model,
        )
