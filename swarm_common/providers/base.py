"""The one small interface every model provider implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
        )


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One streamed model call: a subtask's execution or the swarm's synthesis."""

    model: str
    system: str
    prompt: str
    max_tokens: int = 4096
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """Ask for a plan of exactly num_agents subtasks, as JSON matching prompts.PLAN_SCHEMA."""

    model: str
    idea: str
    num_agents: int
    # Why the previous answer was rejected, so the model can correct it; empty on the first ask.
    feedback: str = ""
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class PlanDraft:
    """The model's raw answer: the planner validates it, the provider does not."""

    text: str
    usage: Usage


class Provider(Protocol):
    """A way to a model. Errors are `swarm_common.errors.ProviderError` subclasses."""

    @property
    def name(self) -> str:
        """`anthropic` or `simulated`."""
        ...

    def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        """Yields the output in text chunks as they arrive, then exactly one Usage."""
        ...

    async def plan(self, request: PlanRequest) -> PlanDraft: ...

    async def aclose(self) -> None: ...
