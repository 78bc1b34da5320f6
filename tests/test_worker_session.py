"""The orchestrator's side of the per-worker ExecuteSubtasks stream (`WorkerSession`, and the pool's
count of a worker's slots), against a real grpc.aio worker server in this process that records
every call it is sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator_service.watchdog import Bounds, watched
from orchestrator_service.worker_pool import WORKER_SERVICE, PoolWorker, WorkerPool
from orchestrator_service.worker_session import SubtaskCallFailed, WorkerSession
from stack import start
from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_checks import assert_completed
from swarm_client import AsyncSwarmClient
from swarm_common.providers import Provider, StreamRequest, Usage
from swarm_common.providers.simulated import SimulatedProvider, SimulatedSettings
from swarm_common.status import WORKER_BUSY
from worker_service.servicer import WorkerServicer
from worker_service.worker import Worker


class RecordingServicer(WorkerServicer):
    """The worker's own servicer, keeping every SubtaskCall that reaches it."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.requests: list[worker_pb2.ExecuteSubtasksRequest] = []

    @property
    def calls(self) -> list[worker_pb2.SubtaskCall]:
        return [call for request in self.requests for call in request.calls]

    @property
    def cancels(self) -> list[int]:
        return [call.call_id for call in self.calls if call.HasField("cancel")]

    async def ExecuteSubtasks(
        self, requests: AsyncIterator[worker_pb2.ExecuteSubtasksRequest], context: Any
    ) -> AsyncIterator[worker_pb2.ExecuteSubtasksResponse]:
        async def recorded() -> AsyncIterator[worker_pb2.ExecuteSubtasksRequest]:
            async for request in requests:
                self.requests.append(request)
                yield request

        async for response in super().ExecuteSubtasks(recorded(), context):
            yield response


class SlowToClose(SimulatedProvider):
    """A model call whose stream, once cancelled, takes `close_s` to close (None: never), as an
    SDK's stream may while it shuts its connection."""

    def __init__(self, settings: SimulatedSettings, close_s: float | None) -> None:
        super().__init__(settings)
        self.close_s = close_s

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        finished = False
        try:
            async for item in super().stream(request):
                yield item
            finished = True
        finally:
            if not finished:
                await (asyncio.sleep(self.close_s) if self.close_s is not None else asyncio.Event().wait())


class RecordingPrompts(SimulatedProvider):
    """The simulated model, keeping the whole prompt of every call it is given."""

    def __init__(self, settings: SimulatedSettings) -> None:
        super().__init__(settings)
        self.prompts: list[str] = []

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        self.prompts.append(request.text)
        async for item in super().stream(request):
            yield item


@asynccontextmanager
async def worker_server(
    provider: Provider,
    capacity: int = 4,
    *,
    servicer_type: type[RecordingServicer] = RecordingServicer,
    default_model: str = "m",
) -> AsyncIterator[tuple[str, RecordingServicer]]:
    """A worker served on 127.0.0.1, with its health, and its servicer (of `servicer_type`)."""
    servicer = servicer_type(
        Worker(provider, worker_id="w", max_concurrency=capacity, default_model=default_model)
    )
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


@asynccontextmanager
async def worker_session(latency_ms: float) -> AsyncIterator[tuple[WorkerSession, RecordingServicer]]:
    """A session to a simulated worker served on 127.0.0.1, and that worker's servicer."""
    provider = SimulatedProvider(SimulatedSettings(latency_ms=latency_ms, chunks=4))
    async with worker_server(provider) as (address, servicer), grpc.aio.insecure_channel(address) as channel:
        session = WorkerSession(worker_pb2_grpc.WorkerServiceStub(channel))
        try:
            yield session, servicer
        finally:
            await session.close()


@asynccontextmanager
async def worker_pool(address: str, **options: float) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(address, **options)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


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


async def run_to_result(session: WorkerSession, subtask_id: str, plan: str) -> str:
    text = ""
    async for response in session.execute(request(subtask_id), plan_context=plan):
        text += response.text
    return text


async def test_a_plan_goes_to_the_worker_once_for_the_calls_that_share_it_and_is_in_every_prompt() -> None:
    plan = "The plan: " + " ".join(f"{i}. subtask {i}" for i in range(2_000))  # a big swarm's, ~25 KB
    other = "The plan: 1. another swarm's only subtask"
    provider = RecordingPrompts(SimulatedSettings(latency_ms=50, chunks=4))
    async with (
        worker_server(provider, capacity=8) as (address, servicer),
        grpc.aio.insecure_channel(address) as channel,
    ):
        session = WorkerSession(worker_pb2_grpc.WorkerServiceStub(channel))
        try:
            together = [run_to_result(session, f"t{i}", plan) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*together, run_to_result(session, "o", other)), 20)
            await asyncio.wait_for(run_to_result(session, "later", plan), 20)
        finally:
            await session.close()
    sent = [held for r in servicer.requests for held in r.plan_contexts]
    forgotten = [key for r in servicer.requests for key in r.forget_plan_contexts]
    starts = [call.start for call in servicer.calls if call.HasField("start")]
    print(f"plan contexts sent: {[(held.key, len(held.text)) for held in sent]}; forgotten: {forgotten}")
    assert [held.text for held in sent] == [plan, other, plan], "once for the six, again after all ended"
    assert len({held.key for held in sent}) == 3, "a key is never given to another context"
    assert sorted(forgotten[:2]) == sorted(held.key for held in sent[:2]), "let go once no call used it"
    assert all(not start.plan_context and start.plan_context_key for start in starts)
    assert sum(len(r.SerializeToString()) for r in servicer.requests) < 3 * len(plan) + 20_000
    assert len(provider.prompts) == 8
    assert sum(plan in prompt for prompt in provider.prompts) == 7, "every call still has its plan"
    assert sum(other in prompt for prompt in provider.prompts) == 1


class PredatingPlanContexts(RecordingServicer):
    """A worker from before plans went once per stream: it does not say it takes them."""

    async def GetWorkerInfo(
        self, request: worker_pb2.GetWorkerInfoRequest, context: Any
    ) -> worker_pb2.GetWorkerInfoResponse:
        info = await super().GetWorkerInfo(request, context)
        info.ClearField("plan_contexts")
        return info


async def test_a_worker_that_predates_plans_sent_once_gets_each_starts_plan_whole() -> None:
    provider = RecordingPrompts(SimulatedSettings(latency_ms=20, chunks=2))
    # The orchestrator's own default model, which a worker refuses unless it is its default too.
    async with worker_server(
        provider, servicer_type=PredatingPlanContexts, default_model="claude-sonnet-5-5"
    ) as (address, servicer):
        simulated = ["--provider", "simulated", "--sim-latency-ms", "0", "--db", ":memory:"]
        orchestrator = start("orchestrator", "swarm-orchestrator", [*simulated, "--workers", address])
        try:
            async with AsyncSwarmClient(orchestrator.address) as client:
                events = [event async for event in client.run("Plan a street party", 3)]
        finally:
            orchestrator.stop()
    assert_completed(events, 3)
    starts = [call.start for call in servicer.calls if call.HasField("start")]
    assert len(starts) == 3
    assert all(start.plan_context.startswith("The plan: 3 subtasks") for start in starts)
    assert not any(start.plan_context_key for start in starts), "no key it would not understand"
    assert not any(request.plan_contexts for request in servicer.requests)
    assert all("The plan: 3 subtasks" in prompt for prompt in provider.prompts)


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


async def cancel_and_acquire_again(pool: WorkerPool) -> tuple[PoolWorker, float]:
    """Takes a slot, starts a subtask and leaves at its first output, as the scheduler leaves a
    timed-out attempt, and gives the slot back; then takes a slot again. Returns the worker and
    how long that took."""
    worker = await pool.acquire("s")
    outputs = watched(worker.session.execute(request("cancelled")), Bounds(10, 10))
    await anext(outputs)
    await outputs.aclose()
    pool.release(worker, "s")
    began = time.monotonic()
    worker = await asyncio.wait_for(pool.acquire("s"), 10)
    return worker, time.monotonic() - began


async def test_a_cancelled_subtasks_slot_is_taken_until_the_worker_has_freed_it() -> None:
    close_s = 0.5
    provider = SlowToClose(SimulatedSettings(latency_ms=1000, chunks=10), close_s=close_s)
    async with worker_server(provider, capacity=1) as (address, _), worker_pool(address) as pool:
        worker, waited = await cancel_and_acquire_again(pool)
        try:
            async with asyncio.timeout(10):
                replies = [reply async for reply in worker.session.execute(request("next"))]
        except SubtaskCallFailed as failed:
            pytest.fail(f"the next subtask was refused: {failed.failure.kind} {failed}")
        pool.release(worker, "s")
    print(f"the next subtask waited {waited:.2f}s for a slot that took {close_s}s to free")
    assert replies[-1].HasField("result")
    assert waited >= close_s * 0.9, "the slot was given on before the worker said it was free"


async def test_a_worker_that_never_confirms_a_cancel_has_its_slot_counted_free_after_the_bound() -> None:
    cancel_timeout_s = 0.5
    provider = SlowToClose(SimulatedSettings(latency_ms=1000, chunks=10), close_s=None)
    async with (
        worker_server(provider, capacity=1) as (address, _),
        worker_pool(address, cancel_timeout_s=cancel_timeout_s) as pool,
    ):
        worker, waited = await cancel_and_acquire_again(pool)
        # The worker is still stuck closing the first call, and says so.
        with pytest.raises(SubtaskCallFailed) as refused:
            async with asyncio.timeout(10):
                [reply async for reply in worker.session.execute(request("next"))]
        pool.release(worker, "s")
    assert waited >= cancel_timeout_s * 0.9
    assert refused.value.failure.kind == WORKER_BUSY
