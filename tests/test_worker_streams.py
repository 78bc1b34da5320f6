"""ExecuteSubtasks, the many-subtasks stream the orchestrator keeps per worker, against a real
worker process; and the batching both its ends use."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from fakes.messages_api import FakeMessagesAPI
from stack import Process, start
from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common.batches import batches
from swarm_common.status import WORKER_BUSY


def subtask(subtask_id: str, window_s: float | None = None) -> worker_pb2.ExecuteSubtaskRequest:
    request = worker_pb2.ExecuteSubtaskRequest(swarm_id="s", subtask={"id": subtask_id, "title": subtask_id})
    if window_s is not None:
        request.delta_window.FromMilliseconds(round(window_s * 1000))
    return request


def start_call(call_id: int, subtask_id: str, window_s: float | None = None) -> worker_pb2.SubtaskCall:
    return worker_pb2.SubtaskCall(call_id=call_id, start=subtask(subtask_id, window_s))


def open_stream(
    stub: worker_pb2_grpc.WorkerServiceStub,
) -> tuple[AsyncIterator[worker_pb2.ExecuteSubtasksResponse], Callable[..., None]]:
    """An ExecuteSubtasks call, and a function that sends it calls together in one message."""
    outbox: asyncio.Queue[worker_pb2.ExecuteSubtasksRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[worker_pb2.ExecuteSubtasksRequest]:
        while True:
            yield await outbox.get()

    def send(*calls: worker_pb2.SubtaskCall, **fields: Any) -> None:
        outbox.put_nowait(worker_pb2.ExecuteSubtasksRequest(calls=calls, **fields))

    return stub.ExecuteSubtasks(requests()), send


def simulated_worker(*args: str) -> Process:
    """A worker process with the simulated provider, id "w", and `args`."""
    return start("worker", "swarm-worker", ["--provider", "simulated", "--worker-id", "w", *args])


async def test_one_stream_runs_many_subtasks_cancels_one_and_refuses_beyond_capacity() -> None:
    worker = simulated_worker("--sim-latency-ms", "1500", "--max-concurrency", "3")
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            call, send = open_stream(stub)
            # Four starts in one message: three fit the worker's capacity, the fourth does not.
            send(*[start_call(i, f"t{i}") for i in (1, 2, 3, 4)])
            replies: dict[int, list[worker_pb2.SubtaskReply]] = defaultdict(list)
            cancelled: set[int] = set()
            messages = 0
            async with asyncio.timeout(20):
                async for response in call:
                    messages += 1
                    for reply in response.replies:
                        replies[reply.call_id].append(reply)
                    if replies[1] and 2 not in cancelled:
                        cancelled.add(2)
                        send(worker_pb2.SubtaskCall(call_id=2, cancel=worker_pb2.CancelSubtask()))
                    if any(r.output.HasField("result") for r in replies[1]) and any(
                        r.output.HasField("result") for r in replies[3]
                    ):
                        break
            info = await stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
            call.cancel()
    finally:
        worker.stop()
    refused = replies[4]
    assert len(refused) == 1 and refused[0].HasField("error")
    assert refused[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert refused[0].error.kind == WORKER_BUSY
    for finished in (1, 3):
        texts = [r.output.text for r in replies[finished] if r.output.text]
        assert texts and replies[finished][-1].output.HasField("result")
        assert "".join(texts).startswith("[simulated] Subtask: t")
    assert not any(r.HasField("output") and r.output.HasField("result") for r in replies[2]), "cancelled"
    assert info.in_flight == 0
    assert messages < sum(len(r) for r in replies.values()), "replies ready together share a message"


async def test_starts_name_the_plan_contexts_sent_on_the_stream_and_their_number_is_bounded() -> None:
    worker = simulated_worker("--sim-latency-ms", "0", "--max-concurrency", "1")
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            call, send = open_stream(worker_pb2_grpc.WorkerServiceStub(channel))
            named, unknown = start_call(1, "named"), start_call(2, "unknown")
            named.start.plan_context_key, unknown.start.plan_context_key = "p1", "never sent"
            send(named, plan_contexts=[worker_pb2.PlanContext(key="p1", text="The plan: 1. named")])
            send(unknown)
            replies: dict[int, list[worker_pb2.SubtaskReply]] = defaultdict(list)
            async with asyncio.timeout(20):
                async for response in call:
                    for reply in response.replies:
                        replies[reply.call_id].append(reply)
                    if replies[2] and any(r.output.HasField("result") for r in replies[1]):
                        break
            # Held at once: more than twice the worker's capacity, and a margin, is a caller gone wrong.
            too_many = [worker_pb2.PlanContext(key=f"k{i}", text="The plan") for i in range(19)]
            send(plan_contexts=too_many)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(20):
                    async for _ in call:
                        pass
    finally:
        worker.stop()
    assert replies[1][-1].output.HasField("result"), "a start that names a context sent before it runs"
    assert [r.WhichOneof("kind") for r in replies[2]] == ["error"]
    assert replies[2][0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "never sent" in replies[2][0].error.message
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "plan contexts" in (ended.value.details() or "")


async def test_batches_take_everything_ready_and_end_at_none() -> None:
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    for item in (1, 2, 3):
        queue.put_nowait(item)
    stream = batches(queue)
    assert await anext(stream) == [1, 2, 3]
    later = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.01)
    assert not later.done(), "waits for the next item"
    queue.put_nowait(4)
    queue.put_nowait(None)
    assert await later == [4]
    assert [batch async for batch in stream] == []


async def test_a_cancel_is_answered_once_the_model_stream_is_closed_and_its_slot_free() -> None:
    """The anthropic provider closes the SDK's stream when cancelled, which takes a moment; the
    worker says the subtask is over only then, and the slot is free by that reply."""
    key = "sk-ant-cancel"
    with FakeMessagesAPI(api_key=key, chunks=100, chunk_delay_s=0.1) as fake:  # 10 s answers
        worker = start(
            "worker",
            "swarm-worker",
            ["--provider", "anthropic", "--max-concurrency", "1", "--worker-id", "w"],
            env={"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": fake.base_url},
        )
        try:
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                call, send = open_stream(stub)
                send(start_call(1, "first"))
                replies: dict[int, list[worker_pb2.SubtaskReply]] = defaultdict(list)
                in_flight_when_answered = -1
                cancelled = False
                async with asyncio.timeout(20):
                    async for response in call:
                        for reply in response.replies:
                            replies[reply.call_id].append(reply)
                        # Once output has begun; under load one message may carry several replies.
                        if replies[1] and not cancelled:
                            send(worker_pb2.SubtaskCall(call_id=1, cancel=worker_pb2.CancelSubtask()))
                            cancelled = True
                        if in_flight_when_answered < 0 and replies[1][-1].HasField("cancelled"):
                            info = await stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
                            in_flight_when_answered = info.in_flight
                            send(start_call(2, "second"))  # the freed slot, at once
                        if replies[2]:
                            break
                call.cancel()
        finally:
            worker.stop()
    assert [r.WhichOneof("kind") for r in replies[1]][-1] == "cancelled"
    assert in_flight_when_answered == 0, "the slot was free when the cancel was answered"
    assert replies[2][0].HasField("output"), f"the next subtask took the slot: {replies[2][0]}"


async def test_a_delta_window_gathers_the_text_of_each_subtask_and_of_the_stream_on_both_paths() -> None:
    """Answers of 100 chunks over a second, sent with a 100 ms window: on the stream, each subtask
    sends its text in about ten pieces, the two subtasks share messages, and each text is the
    model's, whole and in order, as the same subtask gives it with no window; ExecuteSubtask
    gathers the same way."""
    worker = simulated_worker("--sim-latency-ms", "1000", "--sim-chunks", "100")
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            call, send = open_stream(stub)
            send(start_call(1, "first", 0.1), start_call(2, "second", 0.1))
            texts: dict[int, list[str]] = defaultdict(list)
            results: set[int] = set()
            messages = 0
            async with asyncio.timeout(20):
                async for response in call:
                    messages += 1
                    for reply in response.replies:
                        assert reply.call_id not in results, "nothing after the result"
                        if reply.output.HasField("result"):
                            results.add(reply.call_id)
                        elif reply.output.text:
                            texts[reply.call_id].append(reply.output.text)
                    if results == {1, 2}:
                        break
            call.cancel()

            async def unary(request: worker_pb2.ExecuteSubtaskRequest) -> list[str]:
                responses = [r async for r in stub.ExecuteSubtask(request, timeout=20)]
                assert responses[-1].HasField("result")
                return [r.text for r in responses[:-1]]

            gathered, chunked = await asyncio.gather(unary(subtask("first", 0.1)), unary(subtask("first")))
    finally:
        worker.stop()
    assert "".join(texts[1]) == "".join(gathered) == "".join(chunked)
    assert "".join(texts[1]).startswith("[simulated] Subtask: first")
    assert "".join(texts[2]).startswith("[simulated] Subtask: second")
    assert len(chunked) > 50, "no window: each chunk as it comes"
    # About ten a second; a loaded machine stretches the answer, never shortens a window.
    assert all(len(pieces) <= 30 for pieces in (texts[1], texts[2], gathered))
    assert messages < len(texts[1]) + len(texts[2]), "the two subtasks' text shares messages"
