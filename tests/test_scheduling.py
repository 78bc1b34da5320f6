"""What a caller can ask of the scheduler, through real processes: a cap on a swarm's parallel
subtasks, a RunSwarm deadline, and output coalesced into few events without losing any text (and
into fewer while many subtasks of a swarm stream at once)."""

from __future__ import annotations

import asyncio
import time

import pytest

from fakes.messages_api import FakeMessagesAPI
from stack import stack
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_checks import assert_completed
from swarm_client import AsyncSwarmClient, DeadlineExceeded, InvalidArgument

IDEA = "Map the city's cycle lanes"


def most_at_once(events: list[events_pb2.SwarmEvent]) -> int:
    running = peak = 0
    for event in events:
        if event.HasField("subtask_started"):
            running += 1
            peak = max(peak, running)
        elif event.HasField("subtask_completed") or event.HasField("subtask_failed"):
            running -= 1
    return peak


async def test_max_parallel_caps_a_swarm_but_not_its_neighbours() -> None:
    with stack(workers=2, sim_latency_ms=200, worker_args=["--max-concurrency", "8"]) as running:
        async with AsyncSwarmClient(running.target) as client:
            capped = [e async for e in client.run(IDEA, 8, max_parallel=2)]
            free = [e async for e in client.run(IDEA, 8)]
            with pytest.raises(InvalidArgument) as raised:
                [e async for e in client.run(IDEA, 2, max_parallel=-1)]
            swarm = await client.get(capped[0].swarm_id)
    assert_completed(capped, 8)
    assert_completed(free, 8)
    assert most_at_once(capped) == 2
    assert most_at_once(free) == 8
    assert capped[0].accepted.max_parallel == 2 and swarm.state == orchestrator_pb2.SWARM_STATE_COMPLETED
    assert [field for field, _ in raised.value.violations] == ["max_parallel"]


async def test_a_run_swarm_deadline_ends_the_swarm_and_bounds_its_model_calls() -> None:
    key = "sk-ant-deadline"
    with FakeMessagesAPI(api_key=key, chunks=100, chunk_delay_s=0.1) as fake:  # 10 s answers
        args = ["--provider", "anthropic"]
        env = {"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": fake.base_url}
        with stack(workers=1, worker_args=args, orchestrator_args=args, env=env) as running:
            async with AsyncSwarmClient(running.target) as client:
                began = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    [e async for e in client.run(IDEA, 2, call_timeout=3.0)]
                ended_after = time.monotonic() - began
                swarm_id = (await client.list(page_size=1)).swarms[0].swarm_id
                for _ in range(100):  # the server cancels as the client sees the deadline pass
                    swarm = await client.get(swarm_id)
                    if swarm.state == orchestrator_pb2.SWARM_STATE_CANCELLED:
                        break
                    await asyncio.sleep(0.05)
                assert await fake.async_wait_for(lambda: fake.open_streams == 0, 10)
    assert swarm.state == orchestrator_pb2.SWARM_STATE_CANCELLED
    assert ended_after < 6.0
    subtask_calls = [r for r in fake.requests if r.streaming and r.prompt_tail.startswith("Subtask:")]
    assert subtask_calls, "the subtasks had started"
    for request in subtask_calls:
        assert float(request.headers["x-stainless-timeout"]) <= 3.0, (
            "each attempt keeps to the call's deadline"
        )


@pytest.mark.parametrize(("window_ms", "most_deltas"), [("100", 8), ("0", 1000)])
async def test_deltas_are_coalesced_per_window_without_losing_text(window_ms: str, most_deltas: int) -> None:
    # An answer in up to 200 chunks over 600 ms: one every 3 ms or more.
    worker_args = ["--sim-chunks", "200", "--sim-latency-ms", "600"]
    with stack(
        workers=1, worker_args=worker_args, orchestrator_args=["--delta-window-ms", window_ms]
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 3)]
    assert_completed(events, 3)  # every attempt's deltas join to its output: nothing lost
    per_subtask: dict[str, int] = {}
    for event in events:
        if event.HasField("subtask_delta"):
            per_subtask[event.subtask_delta.subtask_id] = (
                per_subtask.get(event.subtask_delta.subtask_id, 0) + 1
            )
    assert len(per_subtask) == 3
    assert max(per_subtask.values()) <= most_deltas
    if window_ms == "0":
        assert min(per_subtask.values()) > 100, "no window: one event per chunk"


def deltas_per_subtask(events: list[events_pb2.SwarmEvent]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        if event.HasField("subtask_delta"):
            counts[event.subtask_delta.subtask_id] = counts.get(event.subtask_delta.subtask_id, 0) + 1
    return counts


async def test_many_subtasks_of_a_swarm_streaming_at_once_get_wider_windows_and_lose_no_text() -> None:
    # Answers of 200 chunks over 1.5 s. The rate allows one subtask per 100 ms window, so four
    # streaming at once send every 400 ms: about 4 deltas each, against 15 at the base window.
    worker_args = ["--sim-chunks", "200", "--sim-latency-ms", "1500"]
    orchestrator_args = ["--delta-window-ms", "100", "--max-delta-rate", "10"]
    with stack(workers=1, worker_args=worker_args, orchestrator_args=orchestrator_args) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 4)]
    assert_completed(events, 4)  # every attempt's deltas join to its output: nothing lost
    counts = deltas_per_subtask(events)
    assert len(counts) == 4 and max(counts.values()) <= 8, counts


async def test_an_attempt_past_the_subtask_timeout_is_retried_then_fails_the_swarm() -> None:
    # Output keeps coming (no hang), but each answer takes 3 s against a 1 s subtask timeout.
    with stack(
        workers=2,
        sim_latency_ms=3000,
        orchestrator_args=["--sim-latency-ms", "50", "--subtask-timeout", "1", "--max-attempts", "2"],
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 1)]
    failed = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert [(f.attempt, f.will_retry) for f in failed] == [(1, True), (2, False)]
    assert all("took longer than its 1s" in f.error for f in failed)
    assert {f.worker_id for f in failed} == {"worker-0", "worker-1"}, "the retry went to the other worker"
    assert events[-1].HasField("swarm_failed") and "subtask-1" in events[-1].swarm_failed.error
