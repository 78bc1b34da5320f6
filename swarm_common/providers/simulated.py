"""A real provider for offline work: deterministic, clearly labelled text, streamed over a set latency.

It serves demos, tests and benchmarks with no network and no key. Knobs make it fail or rate-limit
for fault tests. Everything it writes starts with `[simulated]`, so nobody mistakes it for a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from swarm_common import prompts
from swarm_common.errors import InvalidModelRequest, ProviderUnavailable, RateLimited
from swarm_common.model_limits import limits_of
from swarm_common.providers.base import OutlineRequest, PlanDraft, PlanRequest, StreamRequest, Usage

LABEL = "[simulated]"
# How long a stalled call without a timeout waits: longer than any test or demo runs.
_STALL_FOREVER_S = 24 * 3600.0

_ASPECTS = (
    "goals and scope",
    "prior art and alternatives",
    "architecture",
    "data and interfaces",
    "risks and mitigations",
    "costs and resources",
    "testing and validation",
    "rollout plan",
    "operations and monitoring",
    "open questions",
)
_WORDS = [
    "concrete",
    "approach",
    "measure",
    "baseline",
    "interface",
    "latency",
    "budget",
    "owner",
    "milestone",
    "risk",
    "evidence",
    "users",
    "constraint",
    "prototype",
    "review",
    "metric",
    "fallback",
    "capacity",
    "schedule",
    "dependency",
    "outcome",
]


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    latency_ms: float = 300.0
    # Each answer's time is lognormal with `latency_ms` as its median and this sigma (0 = fixed),
    # as real model latencies are: mostly near the median, with a long tail of stragglers.
    latency_sigma: float = 0.0
    # Output chunks per answer; the latency is spread evenly over them.
    chunks: int = 8
    # Probability that a streamed call fails (retryable) or is rate-limited, before any output.
    failure_rate: float = 0.0
    rate_limit_rate: float = 0.0
    # The first this many plans are wrong (the wrong number of subtasks), to exercise re-asking.
    bad_plans: int = 0
    # Probability that a call is taken and then never answered: it stalls after `stall_after_chunks`
    # chunks (0 = before the first token) until its timeout, as a model API that hangs would.
    stall_rate: float = 0.0
    stall_after_chunks: int = 0
    seed: int | None = None
    # Sizes as a real model writes them (0 = short answers): an answer is padded to about this many
    # words, and a planned subtask's instructions too.
    answer_words: int = 0
    subtask_words: int = 0
    # Set: an answer takes as long as writing its tokens at this rate, on top of the latency.
    tokens_per_s: float = 0.0


# What a token is to the simulated model: four characters, about as many as a real one's.
CHARS_PER_TOKEN = 4


def _tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def _filler(seed: str, words: int) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    while len(digest) < words:
        digest += hashlib.sha256(digest).digest()
    return " ".join(_WORDS[b % len(_WORDS)] for b in digest[:words])


def _answer(prompt: str, words: int = 0) -> str:
    """Deterministic text derived from the prompt: its first line, the headings it lists, filler
    (`words` of it, or a short line)."""
    lines = prompt.splitlines()
    subject = lines[0] if lines else ""
    parts = [f"{LABEL} {subject}", "", f"Simulated notes: {_filler(prompt, words or 24)}."]
    headings = [line[4:] for line in lines if line.startswith("### ")]
    if headings:
        parts += ["", "Combines:"] + [f"- {heading}" for heading in headings]
    return "\n".join(parts)


def _topic(idea: str) -> str:
    """What a plan calls the idea: its first words, as a model would sum it up, never all of it."""
    return " ".join(idea.split()[:12])[:100]


def _within(text: str, max_tokens: int) -> tuple[str, str]:
    """The text as a model with this max_tokens gives it, and its stop reason."""
    if _tokens(text) <= max_tokens:
        return text, "end_turn"
    return text[: max_tokens * CHARS_PER_TOKEN], "max_tokens"


def _split(text: str, pieces: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, pieces)))
    return [text[i : i + size] for i in range(0, len(text), size)]


class SimulatedProvider:
    def __init__(self, settings: SimulatedSettings | None = None) -> None:
        self.settings = settings or SimulatedSettings()
        self._random = random.Random(self.settings.seed)
        self._plans_made = 0

    @property
    def name(self) -> str:
        return "simulated"

    def _maybe_fail(self) -> None:
        roll = self._random.random()
        if roll < self.settings.rate_limit_rate:
            raise RateLimited(f"{LABEL} rate limited (429)", retry_after_s=1.0)
        if roll < self.settings.rate_limit_rate + self.settings.failure_rate:
            raise ProviderUnavailable(f"{LABEL} model call failed")

    def _latency_s(self, call_key: str = "") -> float:
        """The answer's time. With a seed, a named call draws from a generator of its own, so the
        same call takes the same time in every run, however calls interleave."""
        median = self.settings.latency_ms / 1000
        if self.settings.latency_sigma <= 0:
            return median
        draws = self._random
        if call_key and self.settings.seed is not None:
            draws = random.Random(f"{self.settings.seed}:{call_key}")
        return draws.lognormvariate(math.log(median), self.settings.latency_sigma) if median > 0 else 0.0

    def _stalls(self) -> bool:
        return self.settings.stall_rate > 0 and self._random.random() < self.settings.stall_rate

    @staticmethod
    async def _stall(timeout_s: float | None) -> None:
        """Hangs as a model API that took the call and went silent, until the call's timeout, which
        ends it as the SDK's timeout would."""
        await asyncio.sleep(_STALL_FOREVER_S if timeout_s is None else max(0.0, timeout_s))
        raise ProviderUnavailable(f"{LABEL} the model API did not answer in time")

    @staticmethod
    def _check_fits(model: str, prompt: str, max_tokens: int) -> int:
        """The prompt's tokens, or the refusal the model API gives a call over the context window."""
        tokens = _tokens(prompt)
        context = limits_of(model).context_window
        if tokens + max_tokens > context:
            raise InvalidModelRequest(
                f"{LABEL} the model API rejected the request (400): input length and max_tokens "
                f"exceed context limit: {tokens} + {max_tokens} > {context}"
            )
        return tokens

    def _writing_s(self, text: str, call_key: str = "") -> float:
        """How long writing `text` takes: the latency, and its tokens at `tokens_per_s` if set."""
        rate = self.settings.tokens_per_s
        return self._latency_s(call_key) + (_tokens(text) / rate if rate > 0 else 0.0)

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        self._maybe_fail()
        input_tokens = self._check_fits(request.model, request.text, request.max_tokens)
        stall_at = self.settings.stall_after_chunks if self._stalls() else -1
        text, stop_reason = _within(_answer(request.prompt, self.settings.answer_words), request.max_tokens)
        pieces = _split(text, self.settings.chunks)
        pause = self._writing_s(text, request.call_key) / len(pieces)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for index, piece in enumerate(pieces, start=1):
            if index - 1 == stall_at:
                await self._stall(request.timeout_s)
            # Each chunk at its own time from the start, so timer overhead does not pile up over
            # hundreds of chunks and the answer takes the latency it was given.
            await asyncio.sleep(max(0.0, began + index * pause - loop.time()))
            yield piece
        yield Usage(input_tokens, _tokens(text), 0.0, stop_reason)

    async def _answer_whole(self, model: str, prompt: str, text: str, max_tokens: int) -> PlanDraft:
        """A structured answer, given whole after the time it takes to write."""
        input_tokens = self._check_fits(model, prompt, max_tokens)
        text, stop_reason = _within(text, max_tokens)
        await asyncio.sleep(self._writing_s(text))
        return PlanDraft(text, Usage(input_tokens, _tokens(text), 0.0, stop_reason))

    async def plan(self, request: PlanRequest) -> PlanDraft:
        if self._stalls():
            await self._stall(request.timeout_s)
        self._plans_made += 1
        count = request.num_agents
        if self._plans_made <= self.settings.bad_plans:
            count += 1
        topic = _topic(request.idea)
        area = f"{request.area.title}: " if request.area is not None else ""
        subtasks = []
        for i in range(count):
            aspect = _ASPECTS[i % len(_ASPECTS)]
            instructions = f"Work out the {aspect} of: {topic}"
            if self.settings.subtask_words:
                instructions += ". " + _filler(f"{area}{i}{topic}", self.settings.subtask_words)
            subtasks.append(
                {
                    "title": f"{area}{aspect.capitalize()} ({i + 1} of {request.num_agents})",
                    "instructions": instructions,
                }
            )
        text = json.dumps({"subtasks": subtasks})
        prompt = prompts.PLAN_SYSTEM + prompts.plan_prompt(request)
        return await self._answer_whole(request.model, prompt, text, request.max_tokens)

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        topic = _topic(request.idea)
        areas = [
            {"title": f"Area {i} of {request.areas}", "scope": f"Part {i} of {request.areas} of: {topic}"}
            for i in range(1, request.areas + 1)
        ]
        text = json.dumps({"areas": areas})
        prompt = prompts.OUTLINE_SYSTEM + prompts.outline_prompt(request)
        return await self._answer_whole(request.model, prompt, text, request.max_tokens)

    async def aclose(self) -> None:
        return None
