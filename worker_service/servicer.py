"""Translates WorkerService calls to and from the Worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from swarm.v1 import events_pb2, worker_pb2, worker_pb2_grpc
from swarm_common.errors import ProviderError
from swarm_common.status import ERROR_KIND_KEY, WORKER_BUSY, status_for, trailers_for
from worker_service.worker import Assignment, Worker, WorkerBusy

# The request and response types are the method's own; the context is only passed through.
Context = grpc.aio.ServicerContext[Any, Any]


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
    )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def ExecuteSubtask(
        self, request: worker_pb2.ExecuteSubtaskRequest, context: Context
    ) -> AsyncIterator[worker_pb2.ExecuteSubtaskResponse]:
        if not request.subtask.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subtask.id is required")
        worker_id = self._worker.worker_id
        try:
            self._worker.claim()
        except WorkerBusy as busy:
            context.set_trailing_metadata(((ERROR_KIND_KEY, WORKER_BUSY),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(busy))
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
                    result = worker_pb2.SubtaskResult(
                        usage=usage, model=request.model or self._worker.default_model
                    )
                    yield worker_pb2.ExecuteSubtaskResponse(worker_id=worker_id, result=result)
        except ProviderError as error:
            context.set_trailing_metadata(trailers_for(error))
            await context.abort(status_for(error), error.message)

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
