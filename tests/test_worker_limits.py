"""A worker keeps its own limits, whoever calls it, tried as a hostile or broken caller would: an
error it did not expect, direct callers that would take every slot or spend on any model, a reader
that never reads, a sender that never stops, a call id used twice."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from raw_h2 import RawH2
from stack import Process, stack, start
from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_checks import assert_completed
from swarm_client import AsyncSwarmClient
from swarm_common.call_guard import CallGuard
from swarm_common.providers import PlanDraft, PlanRequest, StreamRequest, Usage
from swarm_common.status import WORKER_BUSY
from worker_service.servicer import WorkerServicer
from worker_service.worker import Worker

INTERNAL = grpc.StatusCode.INTERNAL.value[0]
SLOW = ("--provider", "simulated", "--sim-latency-ms", "20000")


def subtask(subtask_id: str, **fields: object) -> worker_pb2.ExecuteSubtaskRequest:
    return worker_pb2.ExecuteSubtaskRequest(
        swarm_id="s", subtask={"id": subtask_id, "title": subtask_id}, **fields
    )  # type: ignore[arg-type]


def start_call(call_id: int, request: worker_pb2.ExecuteSubtaskRequest) -> worker_pb2.SubtaskCall:
    return worker_pb2.SubtaskCall(call_id=call_id, start=request)


async def worker_info(address: str) -> worker_pb2.GetWorkerInfoResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await worker_pb2_grpc.WorkerServiceStub(channel).GetWorkerInfo(
            worker_pb2.GetWorkerInfoRequest(),
            timeout=2,  # the orchestrator's probe timeout
        )


async def wait_idle(address: str, within_s: float) -> float:
    """Seconds until the worker runs nothing; fails past `within_s`."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        info = await worker_info(address)
        if info.in_flight == info.direct_in_flight == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"still running after {within_s}s: {await worker_info(address)}")


def rss_mib(process: Process) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class BrokenProvider:
    """Streams one chunk, then fails with an error that is no ProviderError (a bug, say) for
    subtasks whose title starts with "boom"; answers the others."""

    name = "broken"

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        yield "a first chunk"
        if "Subtask: boom" in request.prompt:
            raise RuntimeError("cannot open /srv/keys/model.pem")
        yield Usage(1, 1, 0.0)

    async def plan(self, request: PlanRequest) -> PlanDraft:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


async def test_an_unexpected_error_ends_its_call_with_a_generic_error_on_both_paths(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker(BrokenProvider(), worker_id="w", max_concurrency=4, default_model="m")  # type: ignore[arg-type]
    server = grpc.aio.server(
        interceptors=[CallGuard(write_timeout_s=5, log=logging.getLogger("swarm.worker"))]
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(worker), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="swarm.worker"):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    [r async for r in stub.ExecuteSubtask(subtask("boom-1"), timeout=5)]
                unary = raised.value
                replies: dict[int, list[worker_pb2.SubtaskReply]] = {1: [], 2: []}
                calls = worker_pb2.ExecuteSubtasksRequest(
                    calls=[start_call(1, subtask("boom-2")), start_call(2, subtask("fine"))]
                )

                async def requests() -> AsyncIterator[worker_pb2.ExecuteSubtasksRequest]:
                    yield calls
                    await asyncio.sleep(30)  # keeps the stream open

                stream = stub.ExecuteSubtasks(requests())
                async with asyncio.timeout(5):  # no reply at all: the failure this test is about
                    async for response in stream:
                        for reply in response.replies:
                            replies[reply.call_id].append(reply)
                        if all(
                            r and (r[-1].HasField("error") or r[-1].output.HasField("result"))
                            for r in replies.values()
                        ):
                            break
                stream.cancel()
                info = await stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=2)
    finally:
        await server.stop(0)
    assert unary.code() == grpc.StatusCode.INTERNAL
    batched = replies[1][-1].error
    assert batched.code == INTERNAL
    assert replies[2][-1].output.HasField("result"), "the stream's other call went on"
    for message in (unary.details() or "", batched.message):
        assert message.startswith("internal error (error id ")
        assert "RuntimeError" not in message and "keys" not in message
        error_id = message.split("error id ")[1].split(")")[0]
        assert [r.subtask_id for r in caplog.records if getattr(r, "error_id", None) == error_id] in (
            ["boom-1"],
            ["boom-2"],
        )
    assert (info.in_flight, info.direct_in_flight) == (0, 0)


async def test_direct_callers_cannot_take_the_orchestrators_slots_nor_skip_its_limits() -> None:
    """16 direct calls against a worker of 4 slots: only its 2 direct slots are taken, and a swarm
    through the orchestrator runs on the 4 slots meanwhile, with no attempt refused."""
    worker_args = ["--max-concurrency", "4", "--direct-slots", "2", "--max-idea-bytes", "1000"]
    worker_args += ["--max-subtask-bytes", "2000"]
    quick_planning = ["--sim-latency-ms", "50"]  # the direct calls still run when the swarm's start
    with stack(
        workers=1, worker_args=worker_args, orchestrator_args=quick_planning, sim_latency_ms=3000
    ) as running:
        address = running.workers[0].address
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            direct = [stub.ExecuteSubtask(subtask(f"d{i}")) for i in range(16)]
            firsts = await asyncio.gather(*(call.read() for call in direct), return_exceptions=True)
            refused = [f for f in firsts if isinstance(f, grpc.aio.AioRpcError)]
            async with AsyncSwarmClient(running.target) as client:
                events = [e async for e in client.run("Plant the verges", 4)]
            too_big = stub.ExecuteSubtask(subtask("big", idea="i" * 1001))
            too_long = worker_pb2.ExecuteSubtaskRequest(
                subtask={"id": "long", "title": "t", "instructions": "i" * 2000}
            )
            other_model = stub.ExecuteSubtask(subtask("pricey", model="claude-opus-9-unpriced"))
            negative = worker_pb2.ExecuteSubtaskRequest(subtask={"id": "negative"}, max_tokens=-61)
            calls = (too_big, stub.ExecuteSubtask(too_long), other_model, stub.ExecuteSubtask(negative))
            bad = [await asyncio.gather(c.read(), return_exceptions=True) for c in calls]
            for call in direct:
                call.cancel()
    assert len(refused) == 14 and {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(("swarm-error-kind", WORKER_BUSY) in tuple(r.trailing_metadata() or ()) for r in refused)
    assert_completed(events, 4)
    assert not [e for e in events if e.HasField("subtask_failed")], "no attempt was refused"
    (too_big_error,), (too_long_error,), (model_error,), (negative_error,) = bad
    errors = (too_big_error, too_long_error, model_error, negative_error)
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors)
    assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert negative_error.details() == "max_tokens must not be negative"
    assert "the idea is over this worker's limit of 1000 bytes" in (too_big_error.details() or "")
    assert "title and instructions are over this worker's limit of 2000 bytes" in (
        too_long_error.details() or ""
    )
    assert "'claude-opus-9-unpriced' is not among this worker's allowed models" in (
        model_error.details() or ""
    )


async def test_a_reader_that_never_reads_frees_the_worker_slots_it_took() -> None:
    worker = start(
        "worker",
        "swarm-worker",
        [*SLOW, "--sim-chunks", "40", "--direct-slots", "4", "--stream-write-timeout", "1"],
    )
    try:
        shut = await asyncio.to_thread(RawH2, worker.address, window=0)
        try:
            for i in range(4):
                shut.open("/swarm.v1.WorkerService/ExecuteSubtask", subtask(f"d{i}").SerializeToString())
            starts = worker_pb2.ExecuteSubtasksRequest(
                calls=[start_call(i, subtask(f"s{i}")) for i in range(1, 4)]
            )
            shut.open("/swarm.v1.WorkerService/ExecuteSubtasks", starts.SerializeToString(), end=False)
            await asyncio.to_thread(shut.pump, 0.3)
            busy = await worker_info(worker.address)
            pumping = asyncio.create_task(asyncio.to_thread(shut.pump, 5.0))
            freed_after = await wait_idle(worker.address, within_s=10)
            await pumping
        finally:
            shut.close()
    finally:
        worker.stop()
    assert (busy.in_flight, busy.direct_in_flight) == (3, 4)
    print(f"a never-reading caller's 7 slots were freed {freed_after:.1f}s after they were taken")


async def test_a_sender_that_never_reads_is_held_back_and_info_stays_quick() -> None:
    """A window-0 ExecuteSubtasks stream sending starts without end (up to 1,000,000, 17 MB): the
    worker stops reading it once its reply queue is full, so the sender is held back by HTTP/2 flow
    control within a few thousand starts, memory stays bounded, and GetWorkerInfo keeps answering.

    The worker reads starts until its queue of 1,024 replies is full, and grpc takes a 64 KiB window
    more (some 3,700 starts); a receive window that grpc grew while the sender kept it full took
    300,000 to all 1,000,000 of them, depending on the machine's load."""
    worker = start(
        "worker",
        "swarm-worker",
        [*SLOW, "--max-concurrency", "2", "--stream-write-timeout", "60"],
    )
    try:
        await worker_info(worker.address)
        rss_before = rss_mib(worker)
        flood = await asyncio.to_thread(RawH2, worker.address, window=0)
        try:
            stream = flood.open("/swarm.v1.WorkerService/ExecuteSubtasks", None, end=False)
            sent = 0
            deadline = time.monotonic() + 30
            held_back = False
            while sent < 1_000_000 and time.monotonic() < deadline:
                batch = worker_pb2.ExecuteSubtasksRequest(
                    calls=[start_call(sent + i + 1, subtask("t")) for i in range(500)]
                ).SerializeToString()
                if not await asyncio.to_thread(flood.send, stream, batch, 2.0):
                    held_back = True
                    break
                sent += 500
            started = time.monotonic()
            info = await worker_info(worker.address)
            info_s = time.monotonic() - started
            rss_after = rss_mib(worker)
        finally:
            flood.close()
        idle_after = await wait_idle(worker.address, within_s=10)
    finally:
        worker.stop()
    assert held_back, f"the worker read all {sent} starts"
    assert sent <= 50_000, f"the worker took {sent} starts before the sender was held back"
    assert info.in_flight == 2
    assert rss_after - rss_before < 64, f"{rss_before:.0f} -> {rss_after:.0f} MiB"
    print(
        f"held back after {sent} starts; RSS {rss_before:.0f} -> {rss_after:.0f} MiB; "
        f"GetWorkerInfo {info_s * 1000:.0f} ms; idle {idle_after:.1f}s after the caller left"
    )


async def test_a_start_that_reuses_a_running_call_id_ends_the_stream_and_orphans_nothing() -> None:
    worker = start("worker", "swarm-worker", ["--provider", "simulated", "--sim-latency-ms", "20000"])
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)

            async def requests() -> AsyncIterator[worker_pb2.ExecuteSubtasksRequest]:
                yield worker_pb2.ExecuteSubtasksRequest(
                    calls=[start_call(1, subtask(f"t{i}")) for i in range(8)]
                )
                await asyncio.sleep(30)

            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async with asyncio.timeout(10):
                    async for _ in stub.ExecuteSubtasks(requests()):
                        pass
        idle_after = await wait_idle(worker.address, within_s=3)
    finally:
        worker.stop()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "call_id 1 is already running on this stream"
    print(f"no call ran on: the worker was idle {idle_after:.2f}s after the stream ended")
