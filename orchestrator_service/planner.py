"""The uber-agent: asks the model for a plan of exactly N subtasks, and for the synthesis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pydantic

from orchestrator_service.watchdog import Bounds, Overtime, Silent, watched
from swarm.v1 import events_pb2
from swarm_common import prompts
from swarm_common.errors import ProviderError, ProviderUnavailable
from swarm_common.providers import PlanDraft, PlanRequest, Provider, StreamRequest, Usage


class PlannedSubtask(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    title: str = pydantic.Field(min_length=1, max_length=500)
    instructions: str = pydantic.Field(min_length=1)


class Plan(pydantic.BaseModel):
    subtasks: list[PlannedSubtask]


class InvalidPlan(ValueError):
    """The model's answer is not a usable plan; the message is fed back when asking again."""


class PlanningFailed(Exception):
    def __init__(self, message: str, usage: Usage) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class PlanResult:
    subtasks: list[events_pb2.Subtask]
    usage: Usage
    attempts: int


def parse_plan(text: str, num_agents: int) -> list[events_pb2.Subtask]:
    """Validates the model's JSON and gives the subtasks ids of our own, unique by construction."""
    try:
        plan = Plan.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise InvalidPlan(f"the answer is not valid JSON ({error.msg} at position {error.pos})") from None
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise InvalidPlan(f"the JSON does not match the schema at {where}: {first['msg']}") from None
    if len(plan.subtasks) != num_agents:
        raise InvalidPlan(f"expected exactly {num_agents} subtasks, got {len(plan.subtasks)}")
    return [
        events_pb2.Subtask(
            id=f"subtask-{index}", title=item.title.strip(), instructions=item.instructions.strip()
        )
        for index, item in enumerate(plan.subtasks, start=1)
    ]


DEFAULT_BOUNDS = Bounds(timeout_s=600.0, silence_s=120.0)


class Planner:
    def __init__(
        self,
        provider: Provider,
        *,
        attempts: int = 3,
        synthesis_attempts: int = 3,
        retry_backoff_s: float = 0.5,
        bounds: Bounds = DEFAULT_BOUNDS,
    ) -> None:
        """`bounds` are the subtask attempts' own: a model call's whole time, and its longest
        silence (a plan arrives whole, so only its whole time applies)."""
        self.provider = provider
        self.attempts = attempts
        self.synthesis_attempts = synthesis_attempts
        self.retry_backoff_s = retry_backoff_s
        self.bounds = bounds

    async def _ask_for_plan(self, request: PlanRequest) -> PlanDraft:
        try:
            async with asyncio.timeout(self.bounds.timeout_s):
                return await self.provider.plan(request)
        except TimeoutError:
            raise ProviderUnavailable(f"the model did not answer within {self.bounds.timeout_s:g}s") from None

    async def plan(self, *, idea: str, num_agents: int, model: str) -> PlanResult:
        """Asks up to `attempts` times, telling the model what was wrong with its last answer."""
        usage = Usage()
        feedback = ""
        for attempt in range(1, self.attempts + 1):
            try:
                draft = await self._ask_for_plan(
                    PlanRequest(
                        model=model,
                        idea=idea,
                        num_agents=num_agents,
                        feedback=feedback,
                        timeout_s=self.bounds.timeout_s,
                    )
                )
            except ProviderError as error:
                if not error.retryable or attempt == self.attempts:
                    raise PlanningFailed(f"planning failed: {error.message}", usage) from None
                feedback = ""
                await asyncio.sleep(self.retry_backoff_s * attempt)
                continue
            usage += draft.usage
            try:
                return PlanResult(parse_plan(draft.text, num_agents), usage, attempt)
            except InvalidPlan as invalid:
                feedback = str(invalid)
        raise PlanningFailed(
            f"planning failed: the model gave no valid plan of {num_agents} subtasks in {self.attempts} "
            f"attempts (last problem: {feedback})",
            usage,
        )

    async def synthesize(
        self, *, idea: str, results: list[tuple[str, str]], model: str
    ) -> AsyncIterator[str | Usage]:
        """Streams the combined answer: text chunks, then one Usage. A hang ends it as a
        retryable ProviderError."""
        request = StreamRequest(
            model=model,
            system=prompts.SYNTHESIS_SYSTEM,
            prompt=prompts.synthesis_prompt(idea, results),
            max_tokens=8192,
            timeout_s=self.bounds.timeout_s,
        )
        try:
            async for item in watched(self.provider.stream(request), self.bounds):
                yield item
        except Silent as silent:
            raise ProviderUnavailable(f"the model sent nothing for {silent.silence_s:g}s") from None
        except Overtime as overtime:
            raise ProviderUnavailable(
                f"the model's answer took longer than {overtime.timeout_s:g}s"
            ) from None
