"""ExecuteSubtasks, the many-subtasks stream the orchestrator keeps per worker, against a real
worker process; and the batching both its ends use."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc

from stack import start
from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common.batches import batches
from swarm_common.status import WORKER_BUSY


def start_call(call_id: int, subtask_id: str) -> worker_pb2.SubtaskCall:
    request = worker_pb2.ExecuteSubtaskRequest(swarm_id="s", subtask={"id": subtask_id, "title": subtask_id})
    return worker_pb2.SubtaskCall(call_id=call_id, start=request)


async def test_one_stream_runs_many_subtasks_cancels_one_and_refuses_beyond_capacity() -> None:
    worker = start(
        "worker",
        "swarm-worker",
        ["--provider", "simulated", "--sim-latency-ms", "1500", "--max-concurrency", "3", "--worker-id", "w"],
    )
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            outbox: asyncio.Queue[worker_pb2.ExecuteSubtasksRequest | None] = asyncio.Queue()

            async def requests():  # type: ignore[no-untyped-def]
                while (request := await outbox.get()) is not None:
                    yield request

            call = stub.ExecuteSubtasks(requests())
            # Four starts in one message: three fit the worker's capacity, the fourth does not.
            outbox.put_nowait(
                worker_pb2.ExecuteSubtasksRequest(calls=[start_call(i, f"t{i}") for i in (1, 2, 3, 4)])
            )
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
                        outbox.put_nowait(
                            worker_pb2.ExecuteSubtasksRequest(
                                calls=[worker_pb2.SubtaskCall(call_id=2, cancel=worker_pb2.CancelSubtask())]
                            )
                        )
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
