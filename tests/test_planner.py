"""The uber-agent's plan validation and re-asking, with a scripted provider (no gRPC)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from orchestrator_service.planner import (
    PLAN_ANSWER_MAX_TOKENS,
    PLAN_BASE_TOKENS,
    PLAN_TOKENS_PER_SUBTASK,
    InvalidPlan,
    Planner,
    PlanningFailed,
    parse_plan,
    subtasks_per_answer,
)
from swarm_common import prompts
from swarm_common.errors import AuthenticationFailed, ProviderUnavailable
from swarm_common.model_limits import limits_of
from swarm_common.providers import OutlineRequest, PlanDraft, PlanRequest, StreamRequest, Usage


def plan_json(count: int) -> str:
    return json.dumps({"subtasks": [{"title": f"T{i}", "instructions": f"do {i}"} for i in range(count)]})


class ScriptedProvider:
    """Answers plan requests from a list: a str is the model's text, an exception is raised."""

    name = "scripted"

    def __init__(self, answers: list[str | Exception]) -> None:
        self.answers = answers
        self.requests: list[PlanRequest] = []

    async def plan(self, request: PlanRequest) -> PlanDraft:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return PlanDraft(answer, Usage(10, 5, 0.001))

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        yield "unused"

    async def aclose(self) -> None:
        pass


def test_parse_plan_gives_unique_ids_in_order() -> None:
    subtasks = parse_plan(plan_json(4), 4)
    assert [s.id for s in subtasks] == ["subtask-1", "subtask-2", "subtask-3", "subtask-4"]
    assert [s.title for s in subtasks] == ["T0", "T1", "T2", "T3"]
    assert subtasks[2].instructions == "do 2"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "not valid JSON"),
        (plan_json(3), "expected exactly 4 subtasks, got 3"),
        (plan_json(5), "expected exactly 4 subtasks, got 5"),
        ('{"tasks": []}', "does not match the schema at subtasks"),
        ('{"subtasks": [{"title": "", "instructions": "x"}]}', "does not match the schema"),
        ('{"subtasks": "four"}', "does not match the schema at subtasks"),
    ],
)
def test_parse_plan_rejects_what_is_not_a_plan_of_n(text: str, problem: str) -> None:
    with pytest.raises(InvalidPlan, match=problem):
        parse_plan(text, 4)


async def test_a_wrong_plan_is_asked_again_with_the_reason() -> None:
    provider = ScriptedProvider(["{oops", plan_json(2), plan_json(3)])
    result = await Planner(provider, attempts=3).plan(idea="an idea", num_agents=3, model="m")
    assert len(result.subtasks) == 3
    assert result.attempts == 3
    assert result.usage == Usage(30, 15, pytest.approx(0.003))
    assert provider.requests[0].feedback == ""
    assert "not valid JSON" in provider.requests[1].feedback
    assert "expected exactly 3 subtasks, got 2" in provider.requests[2].feedback


async def test_planning_fails_clearly_after_the_bounded_attempts() -> None:
    provider = ScriptedProvider([plan_json(1), plan_json(1)])
    with pytest.raises(PlanningFailed, match=r"no valid plan of 2 subtasks in 2 attempts .*got 1") as failure:
        await Planner(provider, attempts=2).plan(idea="an idea", num_agents=2, model="m")
    assert failure.value.usage.input_tokens == 20
    assert provider.answers == []


async def test_an_error_no_retry_can_fix_fails_at_once() -> None:
    provider = ScriptedProvider([AuthenticationFailed("bad key"), plan_json(2)])
    with pytest.raises(PlanningFailed, match="bad key"):
        await Planner(provider, attempts=3).plan(idea="an idea", num_agents=2, model="m")
    assert len(provider.requests) == 1


async def test_a_passing_provider_error_is_retried() -> None:
    provider = ScriptedProvider([ProviderUnavailable("blip"), plan_json(2)])
    result = await Planner(provider, attempts=3, retry_backoff_s=0).plan(
        idea="an idea", num_agents=2, model="m"
    )
    assert len(result.subtasks) == 2


# --- plans sized from N, in parts past what one answer holds ------------------------------------


class SizingProvider:
    """Answers every outline and plan request with exactly what it asks for, and records them; a
    plan request whose area is in `cut_off_areas` (0 = a plan in one answer) is cut off at its
    max_tokens the first time."""

    name = "sizing"

    def __init__(self, cut_off_areas: frozenset[int] = frozenset()) -> None:
        self.cut_off_areas = set(cut_off_areas)
        self.plans: list[PlanRequest] = []
        self.outlines: list[OutlineRequest] = []

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        self.outlines.append(request)
        areas = [{"title": f"Area {i}", "scope": f"scope {i}"} for i in range(1, request.areas + 1)]
        return PlanDraft(json.dumps({"areas": areas}), Usage(100, 50, 0.0, "end_turn"))

    async def plan(self, request: PlanRequest) -> PlanDraft:
        self.plans.append(request)
        area = request.area.index if request.area is not None else 0
        if area in self.cut_off_areas:
            self.cut_off_areas.discard(area)
            return PlanDraft(
                '{"subtasks": [{"title": "A", "instr', Usage(100, request.max_tokens, 0.0, "max_tokens")
            )
        subtasks = [
            {"title": f"{area}.{i}", "instructions": f"do {area}.{i}"} for i in range(request.num_agents)
        ]
        return PlanDraft(json.dumps({"subtasks": subtasks}), Usage(100, 50, 0.0, "end_turn"))

    def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        raise AssertionError("not asked")

    async def aclose(self) -> None:
        pass


async def test_a_small_plan_is_one_answer_sized_from_n() -> None:
    provider = SizingProvider()
    result = await Planner(provider).plan(idea="an idea", num_agents=16, model="claude-haiku-4-5")
    assert len(result.subtasks) == 16 and provider.outlines == []
    (request,) = provider.plans
    assert request.max_tokens == PLAN_BASE_TOKENS + 16 * PLAN_TOKENS_PER_SUBTASK
    assert request.area is None
    assert f"at most {request.instruction_words} words" in prompts.plan_prompt(request)


@pytest.mark.parametrize("model", ["claude-sonnet-5-5", "claude-haiku-4-5", "a-model-not-in-the-table"])
async def test_a_big_plan_is_outlined_then_planned_in_parallel_parts_of_exactly_n(model: str) -> None:
    provider = SizingProvider()
    result = await Planner(provider).plan(idea="an idea", num_agents=256, model=model)
    per_answer = subtasks_per_answer(limits_of(model))
    (outline,) = provider.outlines
    assert outline.areas == -(-256 // per_answer) > 1
    sizes = [request.num_agents for request in provider.plans]
    assert sum(sizes) == 256 and max(sizes) - min(sizes) <= 1 and max(sizes) <= per_answer
    assert [request.area.index for request in provider.plans if request.area] == list(
        range(1, outline.areas + 1)
    )
    assert all(request.max_tokens <= PLAN_ANSWER_MAX_TOKENS for request in provider.plans)
    ids = [subtask.id for subtask in result.subtasks]
    assert ids == [f"subtask-{i}" for i in range(1, 257)], "exactly N, numbered in the outline's order"
    assert len({(s.title, s.instructions) for s in result.subtasks}) == 256, "distinct"
    assert result.usage.input_tokens == 100 * (1 + outline.areas)


@pytest.mark.parametrize(("agents", "area"), [(16, 0), (256, 2)])
async def test_a_plan_cut_off_at_max_tokens_is_named_and_asked_for_less_within_more(
    agents: int, area: int
) -> None:
    provider = SizingProvider(cut_off_areas=frozenset({area}))
    result = await Planner(provider).plan(idea="an idea", num_agents=agents, model="claude-haiku-4-5")
    assert len(result.subtasks) == agents and result.attempts == 2
    cut, again = [r for r in provider.plans if (r.area.index if r.area else 0) == area]
    assert cut.feedback == "" and "cut off at its max_tokens limit" in again.feedback
    assert "not valid JSON" not in again.feedback, "the limit is named, not the JSON it broke"
    assert again.instruction_words < cut.instruction_words
    assert again.max_tokens > cut.max_tokens or cut.max_tokens == PLAN_ANSWER_MAX_TOKENS
    assert f"at most {again.instruction_words} words" in prompts.plan_prompt(again)


async def test_a_plan_cut_off_every_time_fails_naming_the_limit() -> None:
    class AlwaysCutOff(SizingProvider):
        async def plan(self, request: PlanRequest) -> PlanDraft:
            self.plans.append(request)
            return PlanDraft('{"subtasks": [', Usage(10, request.max_tokens, 0.0, "max_tokens"))

    provider = AlwaysCutOff()
    with pytest.raises(PlanningFailed, match="cut off at its max_tokens limit"):
        await Planner(provider, attempts=3).plan(idea="an idea", num_agents=8, model="claude-haiku-4-5")
    asked = [(r.max_tokens, r.instruction_words) for r in provider.plans]
    assert len(set(asked)) == 3, f"each ask differs from the last: {asked}"


def test_a_plan_with_the_same_subtask_twice_is_not_valid() -> None:
    text = json.dumps(
        {"subtasks": [{"title": "A", "instructions": "a"}, {"title": "A", "instructions": "a"}]}
    )
    with pytest.raises(InvalidPlan, match="subtasks 1 and 2 are the same"):
        parse_plan(text, 2)
