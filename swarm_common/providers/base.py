"""The one small interface every model provider implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

# The answer budget of a subtask when nobody says otherwise.
DEFAULT_ANSWER_MAX_TOKENS = 4096
# Stop reasons that mean the answer did not end where the model would have ended it.
CUT_OFF = frozenset({"max_tokens", "model_context_window_exceeded"})


@dataclass(frozen=True, slots=True)
class Usage:
    """What one model call used, and how it ended; a sum of calls has no stop reason. Input tokens
    are counted apart as the API bills them: at the base price, written to the prompt cache, read
    from it."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # The API's stop_reason: "end_turn", "max_tokens" (cut off at max_tokens) ...; "" = not said.
    stop_reason: str = ""
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
            cache_creation_input_tokens=self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
        )

    @property
    def tokens(self) -> int:
        """Every token the call used, however billed."""
        return (
            self.input_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
            + self.output_tokens
        )

    @property
    def cut_off(self) -> bool:
        return self.stop_reason in CUT_OFF


@dataclass(frozen=True, slots=True)
class PromptBlock:
    """A block of text the prompt starts with, shared with other calls of the swarm."""

    text: str
    # True: the prompt's prefix up to and including this block is marked for the prompt cache.
    cache: bool = False


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One streamed model call: a subtask's execution or the swarm's synthesis. The user message
    is `shared`, then `prompt`: what several calls share comes first, so they share a prefix."""

    model: str
    system: str
    prompt: str
    max_tokens: int = DEFAULT_ANSWER_MAX_TOKENS
    timeout_s: float | None = None
    shared: tuple[PromptBlock, ...] = ()
    # Names the call (a subtask's id and attempt) for providers whose draws depend on it: the
    # simulated provider with a seed draws the same latency for the same call in every run.
    call_key: str = ""

    @property
    def text(self) -> str:
        """All of the prompt's text: the system prompt and the user message."""
        return self.system + "".join(block.text for block in self.shared) + self.prompt


@dataclass(frozen=True, slots=True)
class PlanArea:
    """One area of an outlined idea: a plan request that covers it splits this area alone."""

    # 1-based, in the outline's order.
    index: int
    title: str
    scope: str
    # Every area's title in order, so each request knows what the others cover.
    titles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """Ask for a plan of exactly num_agents subtasks, as JSON matching prompts.PLAN_SCHEMA."""

    model: str
    idea: str
    num_agents: int
    # Why the previous answer was rejected, so the model can correct it; empty on the first ask.
    feedback: str = ""
    timeout_s: float | None = None
    max_tokens: int = 8192
    # The most words the model is asked to give one subtask's instructions.
    instruction_words: int = 80
    # Set: the subtasks split this area of the idea alone (a plan in parts).
    area: PlanArea | None = None


@dataclass(frozen=True, slots=True)
class OutlineRequest:
    """Ask for exactly `areas` areas of the idea, as JSON matching prompts.OUTLINE_SCHEMA: the first
    step of a plan too big for one answer."""

    model: str
    idea: str
    areas: int
    feedback: str = ""
    timeout_s: float | None = None
    max_tokens: int = 4096


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
        """Yields the output in text chunks as they arrive, then exactly one Usage, which carries
        the stop reason."""
        ...

    async def plan(self, request: PlanRequest) -> PlanDraft: ...

    async def outline(self, request: OutlineRequest) -> PlanDraft: ...

    async def aclose(self) -> None: ...
