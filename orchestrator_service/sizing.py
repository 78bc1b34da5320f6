"""Whether a swarm's model calls fit its model: token estimates, and what RunSwarm refuses because
no call could hold it.

Prompt sizes are estimated here rather than counted by the API (`messages.count_tokens` would be a
call of its own for every check, and the orchestrator checks before it makes any call). An
estimate is calibrated on text the model has counted itself: the subtasks' outputs, whose output
tokens the API reported. Text the model has not counted (the idea, titles, prompts) is taken at the
bytes a token held in those outputs, and every figure gets a margin on top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from swarm_common import prompts
from swarm_common.model_limits import TokenLimits, limits_of

# Before anything is counted: English runs about 4 UTF-8 bytes a token, and the tokenizer of the
# Claude 4.7 and later models makes about 30% more tokens of the same text (about 3.1 bytes a
# token). 3 errs towards more tokens.
DEFAULT_BYTES_PER_TOKEN = 3.0
# Calibration never trusts a figure outside these (a handful of odd outputs must not decide it).
BYTES_PER_TOKEN_RANGE = (1.0, 6.0)
MARGIN = 0.10
# A synthesis answer's budget, partial or final: a model's answer of a few thousand words.
SYNTHESIS_MAX_TOKENS = 8192
# What a prompt's own words and headings take besides the idea and the outputs it holds, at most.
PROMPT_ALLOWANCE = 1024


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN
    margin: float = MARGIN

    @classmethod
    def calibrated(cls, counted: Iterable[tuple[str, int]]) -> TokenEstimate:
        """From texts and the tokens the model counted in each (0 = not counted, left out)."""
        size = tokens = 0
        for text, count in counted:
            if count > 0:
                size += len(text.encode())
                tokens += count
        if not tokens:
            return cls()
        low, high = BYTES_PER_TOKEN_RANGE
        return cls(min(high, max(low, size / tokens)))

    def of(self, text: str) -> int:
        """The tokens of `text`, margin included."""
        return math.ceil(len(text.encode()) / self.bytes_per_token * (1 + self.margin))

    def of_counted(self, text: str, counted: int) -> int:
        """The tokens of text the model counted as `counted` when it wrote it (0 = not counted), as a
        prompt will take them, margin included."""
        return math.ceil(counted * (1 + self.margin)) if counted > 0 else self.of(text)


def synthesis_max_tokens(limits: TokenLimits) -> int:
    return min(SYNTHESIS_MAX_TOKENS, limits.max_output_tokens)


def misfits(*, idea: str, model: str, answer_max_tokens: int) -> list[tuple[str, str]]:
    """Why the swarm's calls could not fit the model, as (field, description) pairs; none = they fit.

    The largest call a swarm must be able to make is a synthesis of two outputs: partial syntheses
    combine at least two at a time, so that a tree of them always ends. It holds the idea, the two
    outputs (an answer, or a partial synthesis, at their budgets) and its own answer. A worker's
    call, the idea with one subtask and one answer, is smaller."""
    limits = limits_of(model)
    violations: list[tuple[str, str]] = []
    if answer_max_tokens > limits.max_output_tokens:
        violations.append(
            (
                "answer_max_tokens",
                f"is {answer_max_tokens:,}; {model} writes at most {limits.max_output_tokens:,} tokens an answer",
            )
        )
        return violations
    estimate = TokenEstimate()
    synthesis = synthesis_max_tokens(limits)
    idea_tokens = estimate.of(idea)
    fixed = estimate.of(prompts.SWARM_SYSTEM) + PROMPT_ALLOWANCE
    two_outputs = math.ceil(2 * max(answer_max_tokens, synthesis) * (1 + estimate.margin))
    if idea_tokens + fixed + two_outputs + synthesis > limits.context_window:
        violations.append(
            (
                "idea",
                f"is about {idea_tokens:,} tokens: too long for the {limits.context_window:,}-token context "
                f"window of {model}, which must hold the idea with two answers of up to "
                f"{max(answer_max_tokens, synthesis):,} tokens to synthesize them",
            )
        )
    return violations
