"""The whole stack on the anthropic provider: real orchestrator and worker processes whose SDK
clients reach the local fake Messages API through ANTHROPIC_BASE_URL (the proxy pattern)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fakes.messages_api import FakeMessagesAPI, Fault, Reply
from stack import stack
from swarm_checks import assert_completed, assert_well_formed, kinds
from swarm_client import AsyncSwarmClient

KEY = "sk-ant-test-0123456789"


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(api_key=KEY, chunks=4) as api:
        yield api


def anthropic_env(fake: FakeMessagesAPI, key: str = KEY) -> dict[str, str]:
    return {"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": fake.base_url}


def anthropic_stack(fake: FakeMessagesAPI, key: str = KEY):  # type: ignore[no-untyped-def]
    args = ["--provider", "anthropic"]
    return stack(workers=2, worker_args=args, orchestrator_args=args, env=anthropic_env(fake, key))


async def test_a_swarm_runs_on_the_messages_api_with_streaming_and_structured_plans(
    fake: FakeMessagesAPI,
) -> None:
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run("Design a seed library", 3)]
    assert_completed(events, 3)
    assert events[0].accepted.provider == "anthropic"
    plans = [r for r in fake.requests if r.is_plan]
    streams = [r for r in fake.requests if r.streaming]
    assert len(plans) == 1 and len(streams) == 4, "one plan, three subtasks and the synthesis"
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    completed = [e.subtask_completed for e in events if e.HasField("subtask_completed")]
    assert all(c.output.startswith("fake answer to: Subtask:") for c in completed)
    assert all(c.usage.output_tokens > 0 and c.usage.cost_usd > 0 for c in completed)
    assert events[-1].swarm_completed.usage.cost_usd > sum(c.usage.cost_usd for c in completed)


async def test_429_and_529_are_retried_and_the_swarm_completes(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        fake.script(Fault.rate_limited(retry_after_ms=50), Fault.overloaded(retry_after_ms=50))
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run("Design a seed library", 2)]
    assert_completed(events, 2)
    assert [r.status for r in fake.requests[:2]] == [429, 529]


async def test_a_bad_key_fails_the_swarm_clearly_without_leaking_it(fake: FakeMessagesAPI) -> None:
    wrong = "sk-ant-wrong-key-987654321"
    with anthropic_stack(fake, key=wrong) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run("Design a seed library", 2)]
        logs = running.orchestrator.output() + "".join(w.output() for w in running.workers)
    assert_well_formed(events)
    assert kinds(events) == ["accepted", "swarm_failed"]
    error = events[-1].swarm_failed.error
    assert "401" in error and "ANTHROPIC_API_KEY" in error
    assert wrong not in error and wrong not in logs and "Traceback" not in error


async def test_an_unauthenticated_worker_fails_its_subtask_at_once(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        fake.script(Reply('{"subtasks": [{"title": "A", "instructions": "a"}]}'), Fault.unauthorized())
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run("Design a seed library", 1)]
    assert_well_formed(events)
    failed = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert len(failed) == 1 and not failed[0].will_retry and "UNAUTHENTICATED" in failed[0].error
    assert kinds(events)[-1] == "swarm_failed" and "subtask-1" in events[-1].swarm_failed.error


async def test_cancelling_a_swarm_ends_the_model_streams_on_every_worker() -> None:
    slow = FakeMessagesAPI(api_key=KEY, chunks=100, chunk_delay_s=0.2)  # 20 s answers
    with slow, anthropic_stack(slow) as running:
        async with AsyncSwarmClient(running.target) as client:
            run = client.run("Design a seed library", 4)
            swarm_id = (await anext(run)).swarm_id
            assert await slow.async_wait_for(lambda: slow.open_streams == 4, 10)
            cancelled_at = time.monotonic()
            await client.cancel(swarm_id, "enough")
            closed = await slow.async_wait_for(lambda: slow.streams_disconnected == 4, 10)
            closed_after = time.monotonic() - cancelled_at
            await run.aclose()
    assert closed, "every worker closed its HTTP stream to the model API"
    assert slow.open_streams == 0
    print(f"model streams closed {closed_after:.2f}s after CancelSwarm")


async def test_each_attempt_passes_its_remaining_time_to_the_model_call(fake: FakeMessagesAPI) -> None:
    args = ["--provider", "anthropic"]
    with stack(
        workers=1,
        worker_args=args,
        orchestrator_args=[*args, "--subtask-timeout", "7"],
        env=anthropic_env(fake),
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            assert_completed([e async for e in client.run("Design a seed library", 2)], 2)
    subtask_calls = [r for r in fake.requests if r.streaming and r.prompt_tail.startswith("Subtask:")]
    assert len(subtask_calls) == 2
    for request in subtask_calls:
        # The SDK tells the API the timeout it was given: the attempt's remaining time, under 7 s.
        assert 5.0 < float(request.headers["x-stainless-timeout"]) <= 7.0
