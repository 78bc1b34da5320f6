"""Big swarms at real model sizes: plans and syntheses that fit the model's limits, truncation
reported, and prompts too big for the model refused before any model call.

The model calls go through the real anthropic SDK to the fake Messages API, which answers at a real
model's length (about 90 words a planned subtask, about 700 words an answer), cuts answers off at
max_tokens, and refuses a prompt over its context window with a 400, as the API does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.messages_api import FakeMessagesAPI, RecordedRequest, estimate_tokens, realistic_answer
from orchestrator_service.event_log import replay
from orchestrator_service.orchestrator import Orchestrator
from orchestrator_service.planner import PLAN_ANSWER_MAX_TOKENS, Planner
from orchestrator_service.scheduler import SubtaskOutcome
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import MemoryStore, Store, open_store
from orchestrator_service.synthesis import pack
from stack import stack
from swarm.v1 import events_pb2
from swarm_checks import assert_completed, kinds
from swarm_client import AsyncSwarmClient, InvalidArgument
from swarm_client._view import SwarmView
from swarm_common.model_limits import LIMITS, UNKNOWN, limits_of
from swarm_common.providers.anthropic import AnthropicProvider

KEY = "sk-ant-test-0123456789"
IDEA = "Plan a community bike-share for a mid-sized town"
# A model whose context window is the fake's default, 200k tokens: 256 answers of about 700 words
# (about 960 tokens each) do not fit it.
MODEL = "claude-haiku-4-5"
Event = events_pb2.SwarmEvent


def like(model: str) -> FakeMessagesAPI:
    """The fake Messages API at a real model's sizes, within `model`'s limits."""
    limits = limits_of(model)
    return FakeMessagesAPI(
        api_key=KEY,
        answer=realistic_answer,
        context_window=limits.context_window,
        max_output_tokens=limits.max_output_tokens,
    )


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with like(MODEL) as api:
        yield api


def anthropic_stack(fake: FakeMessagesAPI, *orchestrator_args: str):  # type: ignore[no-untyped-def]
    args = ["--provider", "anthropic"]
    return stack(
        workers=2,
        worker_args=[*args, "--max-concurrency", "64"],
        orchestrator_args=[*args, "--model", MODEL, *orchestrator_args],
        env={"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.base_url},
    )


def of(events: list[Event], kind: str) -> list[Event]:
    return [event for event in events if event.WhichOneof("kind") == kind]


FINAL, PARTIAL = "final", "partial"


def synthesis_of(request: RecordedRequest) -> str:
    """ "final" or "partial" for a synthesis call, else ""."""
    tail = request.prompt_tail
    return (
        FINAL
        if tail.startswith("Synthesis of")
        else PARTIAL
        if tail.startswith("Partial synthesis of")
        else ""
    )


def words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- the model limits


def test_every_model_has_limits_and_an_unknown_one_gets_the_smallest() -> None:
    assert (
        limits_of("claude-haiku-4-5-20251001") == limits_of("claude-haiku-4-5") == LIMITS["claude-haiku-4-5"]
    )
    assert limits_of("claude-next-9") == UNKNOWN
    assert all(UNKNOWN.context_window <= limits.context_window for limits in LIMITS.values())
    assert all(UNKNOWN.max_output_tokens <= limits.max_output_tokens for limits in LIMITS.values())


def test_outputs_are_packed_into_the_fewest_even_groups_that_fit() -> None:
    groups = pack([10] * 9, 40)
    assert [len(group) for group in groups] == [3, 3, 3], "3 groups, as greedy needs, but even"
    assert [list(group) for group in pack([50, 10, 10], 40)] == [[0], [1, 2]], "too big: alone"
    assert [list(group) for group in pack([5, 5], 40)] == [[0, 1]]


# --------------------------------------------------------------- whole swarms, real processes


async def test_256_agents_at_real_sizes_plan_in_parts_and_synthesize_as_a_tree(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        started = time.monotonic()
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 256, call_timeout=240)]
        took = time.monotonic() - started
    assert_completed(events, 256)
    assert {request.status for request in fake.requests} == {200}, "no request was refused"

    outlines = [r for r in fake.requests if r.is_outline]
    plans = [r for r in fake.requests if r.is_plan and not r.is_outline]
    assert len(outlines) == 1 and len(plans) > 1, "an outline, then the areas' plans"
    assert all(r.body["max_tokens"] <= PLAN_ANSWER_MAX_TOKENS for r in plans)
    planned = of(events, "plan_created")[0].plan_created.subtasks
    assert len({(s.title, s.instructions) for s in planned}) == 256, "distinct subtasks"
    assert 70 <= words(planned[0].instructions) <= 110, "about 90 words a planned subtask"

    completed = [e.subtask_completed for e in of(events, "subtask_completed")]
    assert all(c.stop_reason == "end_turn" for c in completed)
    assert all(600 <= words(c.output) <= 800 for c in completed), "about 700 words an answer"

    partials = [e.partial_synthesis for e in of(events, "partial_synthesis")]
    assert len(partials) >= 2 and {p.level for p in partials} == {1}
    covered = [source for p in sorted(partials, key=lambda p: p.index) for source in p.sources]
    assert covered == [s.id for s in planned], "the partials cover every output once, in plan order"
    assert all(p.count == len(partials) and p.output and p.usage.output_tokens for p in partials)
    (final,) = [r for r in fake.requests if synthesis_of(r) == FINAL]
    for partial in partials:
        assert partial.output in final.last_user_text, "the final synthesis combines the partials"
    body = final.body
    assert estimate_tokens(str(body["system"]) + final.last_user_text) + body["max_tokens"] <= 200_000

    usage = events[-1].swarm_completed.usage
    assert usage.input_tokens >= sum(p.usage.input_tokens for p in partials) + sum(
        c.usage.input_tokens for c in completed
    )
    print(
        f"256 agents at real sizes: {took:.1f}s, {len(fake.requests)} model requests, {len(partials)} partials"
    )


async def test_16_agents_plan_and_synthesize_in_one_call_each(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 16)]
    assert_completed(events, 16)
    assert [r.is_outline for r in fake.requests if r.is_plan] == [False], "one plan, no outline"
    syntheses = [r for r in fake.requests if synthesis_of(r)]
    assert [synthesis_of(r) for r in syntheses] == [FINAL], "one synthesis, no tree"
    assert of(events, "partial_synthesis") == []


async def test_256_simulated_agents_still_stream_as_before() -> None:
    with stack(workers=2) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 256)]
    assert_completed(events, 256)
    streamed = {e.subtask_delta.subtask_id for e in of(events, "subtask_delta")}
    assert len(streamed) == 256, "every subtask streamed its output"
    assert of(events, "partial_synthesis") == [] and of(events, "synthesis_delta")


# --------------------------------------------------------------------------- truncation


async def test_an_answer_cut_off_at_its_budget_is_reported_as_such(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 3, answer_max_tokens=300)]
            view = await client.get(events[0].swarm_id)
        shown = await asyncio.to_thread(
            subprocess.run,
            [
                str(Path(sys.executable).parent / "swarm"),
                "--target",
                running.target,
                "get",
                events[0].swarm_id,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**{k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}, "COLUMNS": "160"},
        )
    assert_completed(events, 3)
    assert kinds(events)[:2] == ["accepted", "answer_budget"] and events[1].answer_budget.max_tokens == 300
    subtask_calls = [r for r in fake.requests if r.streaming and r.prompt_tail.startswith("Subtask:")]
    assert [r.body["max_tokens"] for r in subtask_calls] == [300] * 3
    completed = [e.subtask_completed for e in of(events, "subtask_completed")]
    assert all(c.stop_reason == "max_tokens" and c.usage.output_tokens == 300 for c in completed)
    assert [s.stop_reason for s in view.subtasks] == ["max_tokens"] * 3
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("(cut off)") == 3 and "3 answer(s) cut off" in shown.stdout


def test_the_live_view_marks_cut_off_answers_and_shows_partial_syntheses() -> None:
    view = SwarmView()
    plan = events_pb2.PlanCreated(
        subtasks=[events_pb2.Subtask(id=f"subtask-{i}", title=f"part {i}") for i in (1, 2)]
    )
    for kind, body in [
        ("plan_created", plan),
        ("subtask_completed", events_pb2.SubtaskCompleted(subtask_id="subtask-1", stop_reason="max_tokens")),
        ("subtask_completed", events_pb2.SubtaskCompleted(subtask_id="subtask-2", stop_reason="end_turn")),
        ("partial_synthesis", events_pb2.PartialSynthesis(id="synthesis-1:1-1", level=1, index=1, count=2)),
    ]:
        event = Event(swarm_id="s")
        getattr(event, kind).CopyFrom(body)
        view.apply(event)
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(view.render())
    text = console.export_text()
    assert "cut off" in text and "done" in text and "2/2 subtasks" in text
    assert "level 1: 1/2" in text


# ------------------------------------------------------------- what cannot fit is refused


async def test_a_swarm_too_big_for_the_model_is_refused_before_any_model_call(fake: FakeMessagesAPI) -> None:
    # About 230k tokens of idea, as the fake counts them: over the 200k-token window of MODEL.
    long_idea = "A town's bike-share, in every detail it could ever need. " * 16_000
    with anthropic_stack(fake, "--max-idea-bytes", str(2 * len(long_idea))) as running:
        async with AsyncSwarmClient(running.target) as client:
            with pytest.raises(InvalidArgument) as too_long:
                await anext(client.run(long_idea, 4))
            with pytest.raises(InvalidArgument) as too_much:
                await anext(client.run(IDEA, 4, answer_max_tokens=100_000))
            fitting = [e async for e in client.run(IDEA, 2, answer_max_tokens=64_000)]
    assert [field for field, _ in too_long.value.violations] == ["idea"]
    assert "200,000-token context window of claude-haiku-4-5" in too_long.value.violations[0][1]
    assert too_much.value.violations == [
        ("answer_max_tokens", "is 100,000; claude-haiku-4-5 writes at most 64,000 tokens an answer")
    ]
    assert kinds(fitting)[-1] == "swarm_completed", "the model's own maximum is accepted"
    assert all(long_idea[:200] not in r.last_user_text for r in fake.requests), "never sent"
    assert {r.status for r in fake.requests} == {200}


# ------------------------------------------------ the synthesis tree, in process, real SDK


class DoneScheduler:
    """The subtasks completed before the orchestrator started: nothing is asked of it."""

    async def run(self, *args: object, **kwargs: object) -> SubtaskOutcome:
        raise AssertionError("every subtask had completed")


async def completed_swarm(store: Store, agents: int, output_tokens: int, model: str) -> str:
    """A swarm's stored events, all its subtasks completed with answers of `output_tokens` each."""
    from orchestrator_service.event_log import EventLog

    log = EventLog(SwarmRecord("big"), store)
    log.append(
        "accepted", events_pb2.SwarmAccepted(idea=IDEA, num_agents=agents, model=model, provider="anthropic")
    )
    subtasks = [
        events_pb2.Subtask(id=f"subtask-{i}", title=f"Part {i}", instructions="x")
        for i in range(1, agents + 1)
    ]
    log.append("plan_created", events_pb2.PlanCreated(subtasks=subtasks))
    for subtask in subtasks:
        output = f"answer {subtask.id} " + "word " * (output_tokens * 4 // 5)
        log.append(
            "subtask_started", events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id="w", attempt=1)
        )
        log.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id=subtask.id, text=output, attempt=1))
        log.append(
            "subtask_completed",
            events_pb2.SubtaskCompleted(
                subtask_id=subtask.id,
                worker_id="w",
                output=output,
                attempt=1,
                usage=events_pb2.Usage(input_tokens=100, output_tokens=estimate_tokens(output)),
                stop_reason="max_tokens",
            ),
        )
    await log.stored()
    return log.swarm_id


async def finish(orchestrator: Orchestrator, swarm_id: str, within_s: float = 60) -> list[Event]:
    async def run() -> list[Event]:
        return [e.event async for batch in await orchestrator.watch(swarm_id) for e in batch]

    return await asyncio.wait_for(run(), within_s)


@pytest.mark.parametrize("model", ["claude-sonnet-5-5", "claude-haiku-4-5"])
async def test_256_answers_of_4096_tokens_synthesize_within_the_context_window(model: str) -> None:
    limits = limits_of(model)
    store = MemoryStore()
    swarm_id = await completed_swarm(store, 256, 4096, model)
    with like(model) as api:
        provider = AnthropicProvider(api_key=KEY, base_url=api.base_url)
        orchestrator = Orchestrator(Planner(provider), DoneScheduler(), store, default_model=model)  # type: ignore[arg-type]
        try:
            assert await orchestrator.recover() == [swarm_id]
            events = await finish(orchestrator, swarm_id)
        finally:
            await provider.aclose()
    assert kinds(events)[-1] == "swarm_completed", events[-1]
    assert {r.status for r in api.requests} == {200}, "no prompt went over the context window"
    partials = [e.partial_synthesis for e in of(events, "partial_synthesis")]
    level_1 = sorted((p for p in partials if p.level == 1), key=lambda p: p.index)
    assert len(level_1) >= 2
    assert [s for p in level_1 for s in p.sources] == [f"subtask-{i}" for i in range(1, 257)]
    sizes = [
        r.body["max_tokens"] + estimate_tokens(str(r.body["system"]) + r.last_user_text) for r in api.requests
    ]
    assert 0.5 * limits.context_window < max(sizes) <= limits.context_window, "groups fill the window"
    view = await orchestrator.get(swarm_id)
    assert view.result == "".join(e.synthesis_delta.text for e in of(events, "synthesis_delta"))
    assert view.usage.input_tokens >= sum(p.usage.input_tokens for p in partials)


async def test_a_synthesis_resumed_after_its_partials_reuses_them(tmp_path: Path) -> None:
    """An orchestrator stopped during the final synthesis: the next one, on the same database,
    synthesizes afresh (attempt 2) from the partials it has, asking the model for the final
    synthesis alone."""
    store = await open_store(str(tmp_path / "swarms.db"))
    swarm_id = await completed_swarm(store, 64, 4096, MODEL)  # 64 x 4096 tokens > 200k: a tree
    try:
        with FakeMessagesAPI(api_key=KEY, answer=realistic_answer, chunks=20, chunk_delay_s=0.05) as api:
            provider = AnthropicProvider(api_key=KEY, base_url=api.base_url)
            try:
                first = Orchestrator(Planner(provider), DoneScheduler(), store, default_model=MODEL)  # type: ignore[arg-type]
                await first.recover()
                asked = await api.async_wait_for(
                    lambda: any(synthesis_of(r) == FINAL for r in api.requests), 30
                )
                assert asked, "the partials were made and the final synthesis began"
                await first.drain(0)  # stops the swarm unfinished, as a restart finds it
                asked_before = len(api.requests)
                second = Orchestrator(Planner(provider), DoneScheduler(), store, default_model=MODEL)  # type: ignore[arg-type]
                assert await second.recover() == [swarm_id]
                await finish(second, swarm_id)
            finally:
                await provider.aclose()
        events = [e async for e in replay(store, swarm_id)]
    finally:
        await store.close()
    assert_completed(events, 64)
    partials = of(events, "partial_synthesis")
    assert len(partials) >= 2
    assert len({e.partial_synthesis.id for e in partials}) == len(partials), "each partial made once"
    restarted_at = of(events, "swarm_resumed")[-1].sequence  # the first run resumed the stored swarm too
    assert all(e.sequence < restarted_at for e in partials), "none made after the restart"
    after = [synthesis_of(r) for r in api.requests[asked_before:]]
    assert after == [FINAL], "only the final synthesis is asked again"
    assert of(events, "synthesis_delta")[-1].synthesis_delta.attempt == 2
