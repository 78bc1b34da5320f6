"""How much a model can take and give: its context window and its largest answer, in tokens.

Planning, synthesis and RunSwarm's checks all size their calls from this table. The figures are
Anthropic's published ones: the models overview and each model's overview page on
platform.claude.com/docs (models/overview, models/<model>/overview), read on 2026-11-27. A model
missing from the table gets `UNKNOWN`: the smallest context window and, bar the long-retired
Claude 3 family, the smallest maximum output of any Claude model, so an unknown model is asked
for less than it can do rather than more.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "platform.claude.com/docs models overview and model pages"
AS_OF = "2026-11-27"


@dataclass(frozen=True, slots=True)
class TokenLimits:
    # Input and output together, in tokens.
    context_window: int
    # The largest max_tokens a call may ask for.
    max_output_tokens: int


_1M_128K = TokenLimits(1_000_000, 128_000)
_200K_64K = TokenLimits(200_000, 64_000)

LIMITS: dict[str, TokenLimits] = {
    "claude-fable-5-2": _1M_128K,
    "claude-fable-5-1": _1M_128K,
    "claude-opus-5-5": _1M_128K,
    "claude-sonnet-5-5": _1M_128K,
    "claude-haiku-5-5": _1M_128K,
    "claude-opus-5": _1M_128K,
    "claude-sonnet-5": _1M_128K,
    "claude-opus-4-8": _1M_128K,
    "claude-opus-4-6": _1M_128K,
    "claude-sonnet-4-6": _1M_128K,
    "claude-opus-4-5": _200K_64K,
    "claude-sonnet-4-5": _200K_64K,
    "claude-haiku-4-5": _200K_64K,
}

UNKNOWN = TokenLimits(200_000, 8_192)

# The shortest prompt prefix the API caches, in tokens: a shorter one marked for caching is
# processed uncached. From the prompt-caching page's table and its echoes (read on 2026-11-27);
# the 5.5 models' figures were not found, so they, and any model missing here, take the largest
# minimum of any current model: a prefix is then left unmarked rather than marked for nothing.
MIN_CACHE_TOKENS: dict[str, int] = {
    "claude-opus-5": 512,
    "claude-sonnet-5": 1024,
    "claude-opus-4-8": 1024,
    "claude-opus-4-7": 2048,
    "claude-opus-4-6": 4096,
    "claude-opus-4-5": 4096,
    "claude-sonnet-4-6": 2048,
    "claude-sonnet-4-5": 1024,
    "claude-haiku-4-5": 4096,
}
UNKNOWN_MIN_CACHE_TOKENS = 4096


def base_model(model: str) -> str:
    """A dated snapshot, `claude-haiku-4-5-20251001`, is the model `claude-haiku-4-5`."""
    head, _, tail = model.rpartition("-")
    return head if tail.isdigit() and len(tail) == 8 else model


def limits_of(model: str) -> TokenLimits:
    return LIMITS.get(base_model(model), UNKNOWN)


def min_cache_tokens(model: str) -> int:
    return MIN_CACHE_TOKENS.get(base_model(model), UNKNOWN_MIN_CACHE_TOKENS)
