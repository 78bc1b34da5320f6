"""The simulated provider: labelled, deterministic, streamed in chunks, and failing on request."""

from __future__ import annotations

import json

import pytest

from swarm_common import prompts
from swarm_common.errors import InvalidModelRequest, ProviderUnavailable, RateLimited
from swarm_common.providers import (
    OutlineRequest,
    PlanArea,
    PlanRequest,
    SimulatedProvider,
    SimulatedSettings,
    StreamRequest,
    Usage,
)


def request(title: str = "Market research") -> StreamRequest:
    return StreamRequest(model="m", system=prompts.SWARM_SYSTEM, prompt=prompts.worker_prompt(title, "do it"))


async def collect(provider: SimulatedProvider, req: StreamRequest) -> tuple[list[str], Usage]:
    items = [item async for item in provider.stream(req)]
    usage = items.pop()
    assert isinstance(usage, Usage)
    assert all(isinstance(item, str) for item in items)
    return [str(item) for item in items], usage


async def test_streams_labelled_deterministic_text_in_chunks_then_usage() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, chunks=6))
    chunks, usage = await collect(provider, request())
    assert len(chunks) == 6
    text = "".join(chunks)
    assert text.startswith("[simulated] Subtask: Market research")
    again, _ = await collect(provider, request())
    assert "".join(again) == text
    other, _ = await collect(provider, request("Pricing"))
    assert "".join(other) != text
    assert usage.output_tokens > 0 and usage.input_tokens > 0 and usage.cost_usd == 0.0


async def test_synthesis_names_every_result() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0))
    prompt = prompts.synthesis_prompt([("Alpha", "a"), ("Beta", "b")])
    chunks, _ = await collect(provider, StreamRequest(model="m", system="", prompt=prompt))
    assert "- Alpha" in "".join(chunks) and "- Beta" in "".join(chunks)


async def test_plans_exactly_n_unless_told_to_get_it_wrong() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, bad_plans=1))
    first = json.loads((await provider.plan(PlanRequest(model="m", idea="idea", num_agents=7))).text)
    second = json.loads((await provider.plan(PlanRequest(model="m", idea="idea", num_agents=7))).text)
    assert len(first["subtasks"]) == 8
    assert len(second["subtasks"]) == 7


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (SimulatedSettings(latency_ms=0, failure_rate=1.0), ProviderUnavailable),
        (SimulatedSettings(latency_ms=0, rate_limit_rate=1.0), RateLimited),
    ],
)
async def test_fails_on_request(settings: SimulatedSettings, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"\[simulated\]"):
        await collect(SimulatedProvider(settings), request())


async def test_a_stalled_call_is_silent_until_its_timeout_then_fails_as_a_timeout_would() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, stall_rate=1.0))
    stalled = StreamRequest(model="m", system="s", prompt=prompts.worker_prompt("t", "i"), timeout_s=0.2)
    with pytest.raises(ProviderUnavailable, match="did not answer in time"):
        [item async for item in provider.stream(stalled)]


async def test_a_call_can_stall_after_its_first_chunks() -> None:
    provider = SimulatedProvider(
        SimulatedSettings(latency_ms=0, chunks=6, stall_rate=1.0, stall_after_chunks=2)
    )
    req = StreamRequest(model="m", system="s", prompt=prompts.worker_prompt("t", "i"), timeout_s=0.2)
    seen: list[str | Usage] = []
    with pytest.raises(ProviderUnavailable):
        async for item in provider.stream(req):
            seen.append(item)
    assert len(seen) == 2 and all(isinstance(item, str) for item in seen)


async def test_latencies_spread_lognormally_around_the_median() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=1000, latency_sigma=1.0, seed=7))
    samples = sorted(provider._latency_s() for _ in range(2001))
    median = samples[1000]
    assert 0.85 < median < 1.15, median
    assert samples[-20] > 5 * median, "a long tail of stragglers"
    fixed = SimulatedProvider(SimulatedSettings(latency_ms=1000))
    assert {fixed._latency_s() for _ in range(10)} == {1.0}


async def test_answers_at_a_real_length_are_cut_off_at_max_tokens_like_a_model() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, answer_words=700))
    whole, usage = await collect(provider, request())
    assert 690 <= len("".join(whole).split()) <= 720 and usage.stop_reason == "end_turn"
    cut, usage = await collect(provider, StreamRequest(model="m", system="", prompt="p", max_tokens=100))
    assert usage.stop_reason == "max_tokens" and usage.output_tokens == 100 and len("".join(cut)) == 400


async def test_a_prompt_over_the_models_context_window_is_refused() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0))
    too_long = StreamRequest(model="claude-haiku-4-5", system="", prompt="x" * 4 * 200_000)
    with pytest.raises(InvalidModelRequest, match=r"exceed context limit: 200000 \+ 4096 > 200000"):
        await collect(provider, too_long)


async def test_outlines_and_plans_an_area_with_exactly_what_is_asked() -> None:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, subtask_words=90))
    outline = json.loads((await provider.outline(OutlineRequest(model="m", idea="idea", areas=4))).text)
    assert len(outline["areas"]) == 4
    area = PlanArea(2, outline["areas"][1]["title"], outline["areas"][1]["scope"], ("a", "b", "c", "d"))
    plan = json.loads(
        (await provider.plan(PlanRequest(model="m", idea="idea", num_agents=5, area=area))).text
    )
    assert len(plan["subtasks"]) == 5 and all(s["title"].startswith(area.title) for s in plan["subtasks"])
    assert all(90 <= len(s["instructions"].split()) <= 110 for s in plan["subtasks"])
    cut = await provider.plan(PlanRequest(model="m", idea="idea", num_agents=50, max_tokens=200))
    assert cut.usage.stop_reason == "max_tokens"
