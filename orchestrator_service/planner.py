"""The uber-agent: asks the model for a plan of exactly N subtasks, and for the synthesis.

A plan's answer budget is sized from N: about `PLAN_TOKENS_PER_SUBTASK` a subtask, whose prompt
asks for concise instructions. One answer holds at most `PLAN_ANSWER_MAX_TOKENS` (and never more
than the model's maximum output). Past what one answer holds, the plan is made in parts: first an
outline of areas, then each area's share of the N subtasks, by parallel calls; the parts together
are exactly N subtasks, numbered subtask-1 .. subtask-N in the outline's order. An answer cut off at
its max_tokens is named as such, and asked again with a bigger budget and shorter instructions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pydantic

from orchestrator_service.sizing import SYNTHESIS_MAX_TOKENS
from orchestrator_service.watchdog import Bounds, Overtime, Silent, watched
from swarm.v1 import events_pb2
from swarm_common import prompts
from swarm_common.errors import ProviderError, ProviderUnavailable
from swarm_common.model_limits import TokenLimits, limits_of
from swarm_common.providers import (
    OutlineRequest,
    PlanArea,
    PlanDraft,
    PlanRequest,
    PromptBlock,
    Provider,
    StreamRequest,
    Usage,
)

# A planned subtask at INSTRUCTION_WORDS is about 150 tokens with its title and its JSON (at about
# 1.4 tokens a word); the rest is the margin.
PLAN_TOKENS_PER_SUBTASK = 256
PLAN_BASE_TOKENS = 1024
# One plan answer's budget at most. A plan is structured output, answered whole: at the 60 to 100
# tokens a second models write, 16k tokens take 3 to 5 minutes, well inside a call's default
# 600 s bound, and parts in parallel arrive sooner than one long answer.
PLAN_ANSWER_MAX_TOKENS = 16_384
OUTLINE_TOKENS_PER_AREA = 200
INSTRUCTION_WORDS = 80
MIN_INSTRUCTION_WORDS = 20

R = TypeVar("R", PlanRequest, OutlineRequest)
T = TypeVar("T")


def subtasks_per_answer(limits: TokenLimits) -> int:
    """How many planned subtasks one answer holds."""
    budget = min(PLAN_ANSWER_MAX_TOKENS, limits.max_output_tokens)
    return max(1, (budget - PLAN_BASE_TOKENS) // PLAN_TOKENS_PER_SUBTASK)


def plan_max_tokens(count: int) -> int:
    return PLAN_BASE_TOKENS + count * PLAN_TOKENS_PER_SUBTASK


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` in `parts` counts that differ by at most one, the larger first."""
    size, extra = divmod(total, parts)
    return [size + (1 if index < extra else 0) for index in range(parts)]


class PlannedSubtask(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    title: str = pydantic.Field(min_length=1, max_length=500)
    instructions: str = pydantic.Field(min_length=1)


class Plan(pydantic.BaseModel):
    subtasks: list[PlannedSubtask]


class OutlinedArea(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    title: str = pydantic.Field(min_length=1, max_length=500)
    scope: str = pydantic.Field(min_length=1)


class Outline(pydantic.BaseModel):
    areas: list[OutlinedArea]


class InvalidPlan(ValueError):
    """The model's answer is not a usable plan; the message is fed back when asking again."""


class CutOff(InvalidPlan):
    """The answer stopped at its max_tokens: asking the same again would be cut off again."""


class PlanningFailed(Exception):
    def __init__(self, message: str, usage: Usage) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class PlanResult:
    subtasks: list[events_pb2.Subtask]
    usage: Usage
    attempts: int


M = TypeVar("M", bound=pydantic.BaseModel)


def _validated(text: str, schema: type[M]) -> M:
    try:
        return schema.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise InvalidPlan(f"the answer is not valid JSON ({error.msg} at position {error.pos})") from None
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise InvalidPlan(f"the JSON does not match the schema at {where}: {first['msg']}") from None


def parse_plan(text: str, num_agents: int) -> list[events_pb2.Subtask]:
    """Validates the model's JSON: exactly `num_agents` distinct subtasks, with ids of our own,
    unique by construction."""
    plan = _validated(text, Plan)
    if len(plan.subtasks) != num_agents:
        raise InvalidPlan(f"expected exactly {num_agents} subtasks, got {len(plan.subtasks)}")
    subtasks = [
        events_pb2.Subtask(
            id=f"subtask-{index}", title=item.title.strip(), instructions=item.instructions.strip()
        )
        for index, item in enumerate(plan.subtasks, start=1)
    ]
    seen: dict[tuple[str, str], int] = {}
    for index, subtask in enumerate(subtasks, start=1):
        earlier = seen.setdefault((subtask.title, subtask.instructions), index)
        if earlier != index:
            raise InvalidPlan(f"subtasks {earlier} and {index} are the same; each must be distinct")
    return subtasks


def parse_outline(text: str, areas: int) -> list[OutlinedArea]:
    outline = _validated(text, Outline)
    if len(outline.areas) != areas:
        raise InvalidPlan(f"expected exactly {areas} areas, got {len(outline.areas)}")
    titles = [area.title.strip() for area in outline.areas]
    if len(set(titles)) != len(titles):
        raise InvalidPlan("two areas have the same title; each must be distinct")
    return outline.areas


def _whole(draft: PlanDraft, max_tokens: int) -> str:
    """The draft's text, if the model ended it itself."""
    if draft.usage.cut_off:
        raise CutOff(
            f"the answer was cut off at its max_tokens limit of {max_tokens:,} output tokens "
            f"(stop_reason {draft.usage.stop_reason}) before the JSON ended"
        )
    return draft.text


def _reask(request: R, problem: InvalidPlan, limits: TokenLimits) -> R:
    """The next ask after `problem`: told what was wrong, and, after a cut-off answer, asked for less
    (shorter instructions) within more (a bigger budget), since the same ask would be cut off again."""
    if not isinstance(problem, CutOff):
        return dataclasses.replace(request, feedback=str(problem))
    max_tokens = min(2 * request.max_tokens, PLAN_ANSWER_MAX_TOKENS, limits.max_output_tokens)
    if isinstance(request, OutlineRequest):
        return dataclasses.replace(request, feedback=str(problem), max_tokens=max_tokens)
    words = max(MIN_INSTRUCTION_WORDS, request.instruction_words * 2 // 3)
    return dataclasses.replace(
        request,
        feedback=f"{problem}; keep each subtask's instructions within {words} words",
        max_tokens=max_tokens,
        instruction_words=words,
    )


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

    def using(self, provider: Provider) -> Planner:
        """The same planner, calling the model through `provider` (a swarm's budget)."""
        return Planner(
            provider,
            attempts=self.attempts,
            synthesis_attempts=self.synthesis_attempts,
            retry_backoff_s=self.retry_backoff_s,
            bounds=self.bounds,
        )

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A whole answer within the subtask timeout, as a subtask's attempt is bounded."""
        try:
            async with asyncio.timeout(self.bounds.timeout_s):
                return await call
        except TimeoutError:
            raise ProviderUnavailable(f"the model did not answer within {self.bounds.timeout_s:g}s") from None

    async def _ask(
        self,
        what: str,
        request: R,
        ask: Callable[[R], Awaitable[PlanDraft]],
        parse: Callable[[str], T],
        limits: TokenLimits,
    ) -> tuple[T, Usage, int]:
        """Asks up to `attempts` times for a valid answer, telling the model what was wrong with
        its last one: the parsed answer, what all the asks cost, and how many there were."""
        usage = Usage()
        problem = ""
        for attempt in range(1, self.attempts + 1):
            try:
                draft = await self._bounded(ask(request))
            except ProviderError as error:
                if not error.retryable or attempt == self.attempts:
                    raise PlanningFailed(f"planning failed: {error.message}", usage) from None
                request = dataclasses.replace(request, feedback="")
                await asyncio.sleep(self.retry_backoff_s * attempt)
                continue
            usage += draft.usage
            try:
                return parse(_whole(draft, request.max_tokens)), usage, attempt
            except InvalidPlan as invalid:
                problem = str(invalid)
                request = _reask(request, invalid, limits)
        raise PlanningFailed(
            f"planning failed: the model gave no valid {what} in {self.attempts} attempts "
            f"(last problem: {problem})",
            usage,
        )

    async def plan(self, *, idea: str, num_agents: int, model: str) -> PlanResult:
        """Exactly `num_agents` subtasks: in one answer when it holds them, else in parts."""
        limits = limits_of(model)
        per_answer = subtasks_per_answer(limits)
        if num_agents <= per_answer:
            return await self._plan_part(idea, model, num_agents, None, limits)
        count = math.ceil(num_agents / per_answer)
        request = OutlineRequest(
            model=model,
            idea=idea,
            areas=count,
            timeout_s=self.bounds.timeout_s,
            max_tokens=min(
                PLAN_BASE_TOKENS + count * OUTLINE_TOKENS_PER_AREA,
                PLAN_ANSWER_MAX_TOKENS,
                limits.max_output_tokens,
            ),
        )
        areas, usage, attempts = await self._ask(
            f"outline of {count} areas",
            request,
            self.provider.outline,
            lambda text: parse_outline(text, count),
            limits,
        )
        titles = tuple(area.title.strip() for area in areas)
        parts = await asyncio.gather(
            *(
                self._plan_part(
                    idea, model, size, PlanArea(index, titles[index - 1], area.scope.strip(), titles), limits
                )
                for index, (area, size) in enumerate(
                    zip(areas, split_evenly(num_agents, count), strict=True), start=1
                )
            ),
            return_exceptions=True,
        )
        subtasks: list[events_pb2.Subtask] = []
        failures: list[PlanningFailed] = []
        for part in parts:
            if isinstance(part, PlanningFailed):
                failures.append(part)
                usage += part.usage
            elif isinstance(part, BaseException):
                raise part
            else:
                subtasks += part.subtasks
                usage += part.usage
                attempts = max(attempts, part.attempts)
        if failures:
            raise PlanningFailed(str(failures[0]), usage)
        numbered = [
            events_pb2.Subtask(id=f"subtask-{index}", title=item.title, instructions=item.instructions)
            for index, item in enumerate(subtasks, start=1)
        ]
        return PlanResult(numbered, usage, attempts)

    async def _plan_part(
        self, idea: str, model: str, count: int, area: PlanArea | None, limits: TokenLimits
    ) -> PlanResult:
        request = PlanRequest(
            model=model,
            idea=idea,
            num_agents=count,
            timeout_s=self.bounds.timeout_s,
            max_tokens=min(plan_max_tokens(count), limits.max_output_tokens),
            instruction_words=INSTRUCTION_WORDS,
            area=area,
        )
        where = f" for area {area.index} of {len(area.titles)}" if area is not None else ""
        subtasks, usage, attempts = await self._ask(
            f"plan of {count} subtasks{where}",
            request,
            self.provider.plan,
            lambda text: parse_plan(text, count),
            limits,
        )
        return PlanResult(subtasks, usage, attempts)

    async def synthesize(
        self,
        *,
        idea: str,
        results: list[tuple[str, str]],
        model: str,
        max_tokens: int = SYNTHESIS_MAX_TOKENS,
        covers: str = "",
        cache_idea: bool = False,
    ) -> AsyncIterator[str | Usage]:
        """Streams a synthesis of `results`: text chunks, then one Usage. With `covers` (which of the
        swarm's results they are) it is a partial synthesis, for a later one to combine. Its prompt
        starts as the workers' do, with the idea (marked for the prompt cache with `cache_idea`).
        A hang ends it as a retryable ProviderError."""
        if covers:
            prompt = prompts.partial_synthesis_prompt(results, covers)
        else:
            prompt = prompts.synthesis_prompt(results)
        request = StreamRequest(
            model=model,
            system=prompts.SWARM_SYSTEM,
            prompt=prompt,
            max_tokens=max_tokens,
            timeout_s=self.bounds.timeout_s,
            shared=(PromptBlock(prompts.idea_block(idea), cache=cache_idea),),
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
