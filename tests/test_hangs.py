"""A hang is caught at any moment of an attempt, by the bound that covers it, with real processes:
a worker stopped before its first chunk or mid-stream, and a model call that never answers while
its worker stays healthy. The orchestrator's own model calls (plan, synthesis) are bounded too."""

from __future__ import annotations

import signal
import time

from fakes.messages_api import FakeMessagesAPI, Reply, plan_answer
from stack import stack
from swarm.v1 import events_pb2
from swarm_checks import assert_completed, assert_well_formed, kinds
from swarm_client import AsyncSwarmClient

IDEA = "Inspect the city's water mains"
# Planning and synthesis stay quick, so a swarm's time is its subtasks' time.
QUICK_ORCHESTRATOR = ["--sim-latency-ms", "50"]


def first_start_on(events: list[events_pb2.SwarmEvent], worker_id: str) -> bool:
    return any(e.HasField("subtask_started") and e.subtask_started.worker_id == worker_id for e in events)


async def run_stopping(
    target: str, agents: int, stop: object, *, when: str
) -> tuple[list[events_pb2.SwarmEvent], list[float], float]:
    """Runs a swarm and SIGSTOPs `stop` (a stack Process) at the first event that `when` names on
    its worker: "started" (before any output) or "delta" (mid-stream). Returns the events, the
    time each was received, and when the worker was stopped."""
    events: list[events_pb2.SwarmEvent] = []
    received: list[float] = []
    stopped_at = 0.0
    async with AsyncSwarmClient(target) as client:
        async for event in client.run(IDEA, agents):
            events.append(event)
            received.append(time.monotonic())
            if stopped_at:
                continue
            on_worker = first_start_on(events, "worker-1")
            if (when == "started" and on_worker) or (
                when == "delta" and on_worker and event.HasField("subtask_delta")
            ):
                stop.signal(signal.SIGSTOP)  # type: ignore[attr-defined]
                stopped_at = time.monotonic()
    return events, received, stopped_at


def retries_after(
    events: list[events_pb2.SwarmEvent], received: list[float], since: float, worker_id: str
) -> list[float]:
    """Seconds from `since` to each retry of a subtask that failed on `worker_id`."""
    failed = {
        (e.subtask_failed.subtask_id, e.subtask_failed.attempt)
        for e in events
        if e.HasField("subtask_failed") and e.subtask_failed.worker_id == worker_id
    }
    return [
        at - since
        for e, at in zip(events, received, strict=True)
        if e.HasField("subtask_started")
        and (e.subtask_started.subtask_id, e.subtask_started.attempt - 1) in failed
    ]


async def test_a_worker_stopped_before_its_first_chunk_is_caught_by_the_subtask_timeout() -> None:
    timeout_s = 5.0
    with stack(
        workers=2,
        sim_latency_ms=1500,
        worker_args=["--max-concurrency", "4"],
        orchestrator_args=[*QUICK_ORCHESTRATOR, "--subtask-timeout", str(timeout_s)],
    ) as running:
        began = time.monotonic()
        events, received, stopped_at = await run_stopping(
            running.target, 4, running.workers[1], when="started"
        )
        took = time.monotonic() - began
    assert_completed(events, 4)
    assert stopped_at, "the swarm ran on worker-1"
    retries = retries_after(events, received, stopped_at, "worker-1")
    assert retries, "the stalled subtasks were retried"
    assert all(r <= timeout_s + 1.0 for r in retries), f"retries came {retries} s after the stop"
    assert took < 10.0, f"the swarm took {took:.1f}s with a {timeout_s:g}s subtask timeout"
    failed = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert failed and all("longer than its 5s" in f.error for f in failed), failed


async def test_a_worker_stopped_before_its_first_chunk_is_caught_by_the_no_progress_timeout() -> None:
    silence_s = 2.0
    with stack(
        workers=2,
        sim_latency_ms=1500,
        worker_args=["--max-concurrency", "4"],
        orchestrator_args=[*QUICK_ORCHESTRATOR, "--no-progress-timeout", str(silence_s)],
    ) as running:
        events, received, stopped_at = await run_stopping(
            running.target, 4, running.workers[1], when="started"
        )
    assert_completed(events, 4)
    retries = retries_after(events, received, stopped_at, "worker-1")
    assert retries and all(r <= silence_s + 1.0 for r in retries), f"retries came {retries} s after the stop"
    failed = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert failed and all("no output for 2s" in f.error for f in failed), failed


async def test_a_worker_stopped_mid_stream_is_caught_by_the_no_progress_timeout() -> None:
    silence_s = 2.0
    with stack(
        workers=2,
        sim_latency_ms=3000,
        worker_args=["--max-concurrency", "4"],
        orchestrator_args=[*QUICK_ORCHESTRATOR, "--no-progress-timeout", str(silence_s)],
    ) as running:
        events, received, stopped_at = await run_stopping(running.target, 4, running.workers[1], when="delta")
    assert_completed(events, 4)
    retries = retries_after(events, received, stopped_at, "worker-1")
    assert retries and all(r <= silence_s + 1.0 for r in retries), f"retries came {retries} s after the stop"


async def test_a_model_call_that_never_answers_on_a_healthy_worker_is_retried_elsewhere() -> None:
    """The stalled worker's process answers keepalive pings and health checks: only the
    orchestrator's own bounds can end the attempt."""
    silence_s = 1.5
    with stack(
        workers=2,
        sim_latency_ms=400,
        worker_args=["--max-concurrency", "4"],
        per_worker_args=[[], ["--sim-stall-rate", "1"]],
        orchestrator_args=[*QUICK_ORCHESTRATOR, "--no-progress-timeout", str(silence_s)],
    ) as running:
        began = time.monotonic()
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 4)]
        took = time.monotonic() - began
        assert running.workers[1].popen.poll() is None, "the stalling worker's process stayed up"
    assert_completed(events, 4)
    failed = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert failed and all(f.worker_id == "worker-1" and f.will_retry for f in failed), failed
    assert all("no output for 1.5s" in f.error for f in failed), failed
    assert took < silence_s + 4.0, f"the swarm took {took:.1f}s"


async def test_a_model_that_stalls_after_its_first_tokens_is_caught_by_the_no_progress_timeout() -> None:
    silence_s = 1.5
    with stack(
        workers=2,
        sim_latency_ms=400,
        worker_args=["--max-concurrency", "4"],
        per_worker_args=[[], ["--sim-stall-rate", "1", "--sim-stall-after-chunks", "2"]],
        orchestrator_args=[*QUICK_ORCHESTRATOR, "--no-progress-timeout", str(silence_s)],
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 4)]
    assert_completed(events, 4)
    stalled = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert stalled and all(f.worker_id == "worker-1" for f in stalled), stalled
    attempts = {(f.subtask_id, f.attempt) for f in stalled}
    partial = [
        e.subtask_delta
        for e in events
        if e.HasField("subtask_delta") and (e.subtask_delta.subtask_id, e.subtask_delta.attempt) in attempts
    ]
    assert partial, "the stalled attempts had streamed their first tokens"


async def test_planning_that_never_answers_fails_the_swarm_within_its_timeouts() -> None:
    with stack(
        workers=1,
        orchestrator_args=["--sim-stall-rate", "1", "--subtask-timeout", "1", "--plan-attempts", "2"],
    ) as running:
        began = time.monotonic()
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 3)]
        took = time.monotonic() - began
    assert_well_formed(events)
    assert kinds(events)[-1] == "swarm_failed"
    assert "planning failed" in events[-1].swarm_failed.error
    assert "did not answer within 1s" in events[-1].swarm_failed.error, events[-1].swarm_failed.error
    assert took < 2 * 1.0 + 3.0, f"planning was given up on after {took:.1f}s"


async def test_a_synthesis_that_stalls_is_asked_again_and_the_swarm_completes() -> None:
    key = "sk-ant-hangs"
    with FakeMessagesAPI(api_key=key, chunks=4) as fake:
        fake.script(
            Reply(plan_answer("Idea:\nx\n\nSplit it into exactly 3 independent subtasks")),
            Reply("a synthesis that never starts", delay_s=30.0),
        )
        with stack(
            workers=1,
            orchestrator_args=["--provider", "anthropic", "--no-progress-timeout", "1.5"],
            env={"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": fake.base_url},
        ) as running:
            began = time.monotonic()
            async with AsyncSwarmClient(running.target) as client:
                events = [e async for e in client.run(IDEA, 3)]
            took = time.monotonic() - began
    assert_completed(events, 3)
    attempts = {e.synthesis_delta.attempt for e in events if e.HasField("synthesis_delta")}
    assert attempts == {2}, "the stalled first synthesis streamed nothing; the second completed"
    assert took < 1.5 + 5.0, f"the swarm took {took:.1f}s"
