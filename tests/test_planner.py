"""The uber-agent's plan validation and re-asking, with a scripted provider (no gRPC)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from orchestrator_service.planner import InvalidPlan, Planner, PlanningFailed, parse_plan
from swarm_common.errors import AuthenticationFailed, ProviderUnavailable
from swarm_common.providers import PlanDraft, PlanRequest, StreamRequest, Usage


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
