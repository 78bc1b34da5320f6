"""What a caller can make a service do, tried as a hostile or broken client would, against real
processes: bytes that are no message, numbers past what is stored, a reader that never reads, more
streams than allowed, a peer that vanishes without a reset. Errors are documented codes with
nothing internal in them, and logs a caller can provoke are rate-limited."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import time

import grpc
import pytest

from raw_h2 import RawH2
from stack import Stack, stack
from swarm.v1 import orchestrator_pb2
from swarm_client import AsyncSwarmClient, InvalidArgument, ResourceExhausted
from swarm_common.call_guard import CallGuard

# A length-delimited field 1 that promises 5 bytes and brings 1: no message decodes from it.
MALFORMED = b"\x0a\x05a"
S = orchestrator_pb2.SwarmState

ORCHESTRATOR_METHODS = {
    "RunSwarm": "unary_stream",
    "WatchSwarm": "unary_stream",
    "GetSwarm": "unary_unary",
    "ListSwarms": "unary_unary",
    "CancelSwarm": "unary_unary",
}
WORKER_METHODS = {
    "ExecuteSubtask": "unary_stream",
    "GetWorkerInfo": "unary_unary",
    "ExecuteSubtasks": "stream_stream",
}


async def call_raw(channel: grpc.aio.Channel, path: str, kind: str, payload: bytes) -> grpc.aio.AioRpcError:
    """Sends `payload` as it is (identity serializers) and returns the error the call ends with."""
    try:
        if kind == "unary_unary":
            await channel.unary_unary(path)(payload, timeout=10)
        elif kind == "unary_stream":
            async for _ in channel.unary_stream(path)(payload, timeout=10):
                pass
        else:

            async def one() -> object:
                yield payload

            async for _ in channel.stream_stream(path)(one(), timeout=10):
                pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{path} took {payload!r}")


async def test_bytes_that_are_no_message_are_invalid_argument_on_every_method_and_log_little() -> None:
    with stack(workers=1) as running:
        services = [
            (running.orchestrator, "swarm.v1.OrchestratorService", ORCHESTRATOR_METHODS),
            (running.workers[0], "swarm.v1.WorkerService", WORKER_METHODS),
        ]
        for process, service, methods in services:
            async with grpc.aio.insecure_channel(process.address) as channel:
                for method, kind in methods.items():
                    error = await call_raw(channel, f"/{service}/{method}", kind, MALFORMED)
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
                    assert "is not a valid swarm.v1." in (error.details() or ""), error.details()
                    assert "Unexpected" not in (error.details() or "") and "class" not in (
                        error.details() or ""
                    )
                log_before = len(process.output())
                lines_before = len(process.lines)
                path = f"/{service}/{next(m for m, k in methods.items() if k == 'unary_unary')}"
                errors = await asyncio.gather(
                    *(call_raw(channel, path, "unary_unary", MALFORMED) for _ in range(300))
                )
                assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
                await asyncio.sleep(0.2)  # the last log lines reach the pipe
            logged = process.output()[log_before:]
            assert "Traceback" not in process.output()
            assert len(process.lines) - lines_before <= 10, (
                f"{len(process.lines) - lines_before} lines logged"
            )
            print(f"{service}: {len(logged)} B of log for 300 malformed requests of {len(MALFORMED)} B")


async def test_a_sequence_or_page_token_past_what_is_stored_is_invalid_argument(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        events = [e async for e in client.run("Count the lamp posts", 1)]
        with pytest.raises(InvalidArgument) as raised:
            [e async for e in client.watch(events[0].swarm_id, 2**63)]
        assert [field for field, _ in raised.value.violations] == ["after_sequence"]
        for create_ns in (2**63, 2**64 + 5, -1):
            token = base64.urlsafe_b64encode(f"{create_ns}:x".encode()).decode()
            with pytest.raises(InvalidArgument) as raised:
                await client.list(page_token=token)
            assert [field for field, _ in raised.value.violations] == ["page_token"]
        # Still serving, and the largest stored sequence is fine: there is simply nothing after it.
        assert [e async for e in client.watch(events[0].swarm_id, 2**63 - 1)] == []


async def test_an_unexpected_error_is_internal_with_an_error_id_the_log_also_has(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def unary(request: bytes, context: object) -> bytes:
        raise RuntimeError("/srv/secrets/key.pem could not be read")

    async def streaming(request: bytes, context: object):  # type: ignore[no-untyped-def]
        yield b"first"
        raise KeyError("internal-table")

    log = logging.getLogger("swarm.test-guard")
    server = grpc.aio.server(interceptors=[CallGuard(write_timeout_s=5, log=log)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Streaming": grpc.unary_stream_rpc_method_handler(streaming),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Guarded", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="swarm.test-guard"):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary_error = await call_raw(channel, "/t.Guarded/Unary", "unary_unary", b"")
                streaming_error = await call_raw(channel, "/t.Guarded/Streaming", "unary_stream", b"")
    finally:
        await server.stop(0)
    for error in (unary_error, streaming_error):
        assert error.code() == grpc.StatusCode.INTERNAL
        details = error.details() or ""
        assert details.startswith("internal error (error id ")
        assert not any(leak in details for leak in ("RuntimeError", "KeyError", "secrets", "internal-table"))
        error_id = details.split("error id ")[1].split(")")[0]
        logged = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
        assert len(logged) == 1 and logged[0].exc_info is not None


async def test_a_swarm_that_finds_no_worker_does_not_name_the_workers_addresses() -> None:
    with stack(workers=1, orchestrator_args=["--no-worker-timeout", "1"]) as running:
        worker = running.workers[0]
        worker.signal(signal.SIGKILL)
        worker.popen.wait(10)
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run("Paint the fence", 2)]
        failed = events[-1].swarm_failed.error
        assert "no worker could take work for 1s" in failed
        port = worker.address.rsplit(":", 1)[1]
        assert "127.0.0.1" not in failed and port not in failed
        assert worker.address in running.orchestrator.output(), "the log keeps the target"


async def swarm_with_request_id(client: AsyncSwarmClient, request_id: str) -> orchestrator_pb2.Swarm:
    for _ in range(100):
        found = [s for s in (await client.list(page_size=100)).swarms if s.request_id == request_id]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no swarm with request_id {request_id}")


async def wait_for_state(client: AsyncSwarmClient, swarm_id: str, within_s: float) -> orchestrator_pb2.Swarm:
    """The swarm once it has ended, or as it stands after `within_s`."""
    deadline = time.monotonic() + within_s
    swarm = await client.get(swarm_id)
    while swarm.state not in (S.SWARM_STATE_COMPLETED, S.SWARM_STATE_FAILED, S.SWARM_STATE_CANCELLED):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
        swarm = await client.get(swarm_id)
    return swarm


async def test_a_caller_that_never_reads_is_cut_off_and_what_it_held_is_freed() -> None:
    """An HTTP/2 window of 0: no reply can be sent. After the write timeout the calls end, their
    watcher places are free again, and the swarm that the RunSwarm attached is cancelled."""
    subtask_ms = 4000
    with stack(
        workers=1,
        sim_latency_ms=subtask_ms,
        orchestrator_args=[
            "--sim-latency-ms",
            "50",
            "--stream-write-timeout",
            "1",
            "--max-watchers-per-swarm",
            "2",
        ],
    ) as running:
        shut = await asyncio.to_thread(RawH2, running.target, window=0)
        try:
            request = orchestrator_pb2.RunSwarmRequest(
                idea="Sweep the yard", num_agents=2, request_id="never-reads"
            )
            shut.open("/swarm.v1.OrchestratorService/RunSwarm", request.SerializeToString())
            async with AsyncSwarmClient(running.target) as client:
                swarm = await swarm_with_request_id(client, "never-reads")
                watch = orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm.swarm_id)
                shut.open("/swarm.v1.OrchestratorService/WatchSwarm", watch.SerializeToString())
                await asyncio.to_thread(shut.pump, 0.3)
                with pytest.raises(ResourceExhausted, match="watchers"):
                    [e async for e in client.watch(swarm.swarm_id)]
                started = time.monotonic()
                pumping = asyncio.create_task(asyncio.to_thread(shut.pump, 3.0))
                ended = await wait_for_state(client, swarm.swarm_id, within_s=subtask_ms / 1000 + 3)
                took = time.monotonic() - started
                await pumping
                replay = [e async for e in client.watch(swarm.swarm_id)]
        finally:
            shut.close()
    assert ended.state == S.SWARM_STATE_CANCELLED, ended
    assert ended.error == "the client cancelled RunSwarm"
    assert took < subtask_ms / 1000, f"cut off after {took:.1f}s"
    assert replay[-1].HasField("swarm_cancelled"), "the watcher places were freed"
    print(f"a never-read RunSwarm was cut off and its swarm cancelled {took:.2f}s after the watch began")


async def test_streams_beyond_the_per_connection_limit_are_refused() -> None:
    with stack(
        workers=1, sim_latency_ms=3000, orchestrator_args=["--max-streams-per-connection", "4"]
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            first = await anext(client.run("Tidy the shed", 1, detach=True))
            greedy = await asyncio.to_thread(RawH2, running.target)
            try:
                watch = orchestrator_pb2.WatchSwarmRequest(swarm_id=first.swarm_id).SerializeToString()
                streams = [greedy.open("/swarm.v1.OrchestratorService/WatchSwarm", watch) for _ in range(7)]
                await asyncio.to_thread(greedy.pump, 1.0)
            finally:
                greedy.close()
            # Another connection is a connection of its own.
            assert (await client.get(first.swarm_id)).swarm_id == first.swarm_id
    assert greedy.max_concurrent_streams() == 4
    assert greedy.resets() == set(streams[4:]), greedy.events
    assert set(streams[:4]) <= greedy.responded()


async def test_a_peer_that_vanishes_without_a_reset_is_dropped_and_its_planning_stops() -> None:
    """The client goes silent mid-planning: no RST_STREAM, no FIN, no answer to pings. Keepalive
    finds it gone, the call ends, and the attached swarm is cancelled before its plan is made."""
    with stack(
        workers=1,
        orchestrator_args=["--sim-latency-ms", "20000", "--keepalive-time", "1", "--keepalive-timeout", "1"],
    ) as running:
        peer = await asyncio.to_thread(RawH2, running.target)
        try:
            request = orchestrator_pb2.RunSwarmRequest(
                idea="Plan the fete", num_agents=3, request_id="vanishes"
            )
            peer.open("/swarm.v1.OrchestratorService/RunSwarm", request.SerializeToString())
            await asyncio.to_thread(peer.pump, 0.3)
            peer.silent = True
            started = time.monotonic()
            async with AsyncSwarmClient(running.target) as client:
                swarm = await swarm_with_request_id(client, "vanishes")
                ended = await wait_for_state(client, swarm.swarm_id, within_s=10)
                took = time.monotonic() - started
                events = [e async for e in client.watch(swarm.swarm_id)]
        finally:
            peer.close()
    assert ended.state == S.SWARM_STATE_CANCELLED, ended
    assert [e.WhichOneof("kind") for e in events] == ["accepted", "swarm_cancelled"], "no plan was made"
    print(f"a silent peer's planning swarm was cancelled {took:.2f}s after it went silent")
