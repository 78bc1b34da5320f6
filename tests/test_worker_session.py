"""The orchestrator's side of the per-worker ExecuteSubtasks stream (`WorkerSession`), against a real
grpc.aio worker server in this process that records every call it is sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from orchestrator_service.watchdog import Bounds, watched
from orchestrator_service.worker_session import SubtaskCallFailed, WorkerSession
from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common.providers.simulated import SimulatedProvider, SimulatedSettings
from worker_service.servicer import WorkerServicer
from worker_service.worker import Worker


class RecordingServicer(WorkerServicer):
    """The worker's own servicer, keeping every SubtaskCall that reaches it."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.calls: list[worker_pb2.SubtaskCall] = []

    @property
    def cancels(self) -> list[int]:
        return [call.call_id for call in self.calls if call.HasField("cancel")]

    async def ExecuteSubtasks(
        self, requests: AsyncIterator[worker_pb2.ExecuteSubtasksRequest], context: Any
    ) -> AsyncIterator[worker_pb2.ExecuteSubtasksResponse]:
        async def recorded() -> AsyncIterator[worker_pb2.ExecuteSubtasksRequest]:
            async for request in requests:
                self.calls.extend(request.calls)
                yield request

        async for response in super().ExecuteSubtasks(recorded(), context):
            yield response


@asynccontextmanager
async def worker_session(latency_ms: float) -> AsyncIterator[tuple[WorkerSession, RecordingServicer]]:
    """A session to a simulated worker served on 127.0.0.1, and that worker's servicer."""
    provider = SimulatedProvider(SimulatedSettings(latency_ms=latency_ms, chunks=4))
    servicer = RecordingServicer(Worker(provider, worker_id="w", max_concurrency=4, default_model="m"))
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            session = WorkerSession(worker_pb2_grpc.WorkerServiceStub(channel))
            try:
                yield session, servicer
            finally:
                await session.close()
    finally:
        await server.stop(0)


def request(subtask_id: str) -> worker_pb2.ExecuteSubtaskRequest:
    return worker_pb2.ExecuteSubtaskRequest(swarm_id="s", subtask={"id": subtask_id, "title": subtask_id})


async def test_a_subtask_read_to_its_result_is_not_cancelled_on_the_worker() -> None:
    async with worker_session(latency_ms=20) as (session, servicer):
        # As the scheduler reads an attempt: through the watchdog, leaving at the result.
        for index in range(5):
            outputs = watched(session.execute(request(f"t{index}")), Bounds(10, 10))
            async for response in outputs:
                if response.HasField("result"):
                    break
            await outputs.aclose()
        # One left before its result: its cancel, sent after the others', shows they all arrived.
        early = watched(session.execute(request("early")), Bounds(10, 10))
        await anext(early)
        await early.aclose()
        for _ in range(200):
            if servicer.cancels:
                break
            await asyncio.sleep(0.01)
    print(f"cancels the worker received: {len(servicer.cancels)} for 5 completed subtasks and 1 left early")
    assert servicer.cancels == [6], "only the subtask left before its result is cancelled"


async def test_a_stream_reopened_while_the_old_one_closes_is_the_sessions_own() -> None:
    async with worker_session(latency_ms=200) as (session, _):
        first = session.execute(request("first"))
        await anext(first)
        closing = asyncio.create_task(session.close())
        await asyncio.sleep(0)  # the close is under way: the old stream is ending
        async with asyncio.timeout(10):
            second = [response async for response in session.execute(request("second"))]
            await closing
            with pytest.raises(SubtaskCallFailed):
                await anext(first)
        assert second[-1].HasField("result"), "the call on the new stream is not failed with the old one"

        # The session still holds the new stream: closing it ends the calls on it.
        third = session.execute(request("third"))
        await anext(third)
        await session.close()
        async with asyncio.timeout(2):
            with pytest.raises(SubtaskCallFailed):
                [response async for response in third]
