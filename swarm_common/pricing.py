"""What model tokens cost, in US dollars per million tokens, and what a call's usage costs.

The list prices of the Messages API, from Anthropic's model pages (platform.claude.com/docs,
models/<model>/overview, "Pricing") and its pricing page (about-claude/pricing), read on
2026-11-27: base input, 5-minute cache writes (the only cache this project writes), cache reads
(hits and refreshes) and output. Batch and 1-hour cache prices are not modelled.

- Claude Haiku 5.5 is priced by prompt length: a request whose prompt (input, cache reads and
  cache writes together) passes 100,000 tokens pays the long-prompt prices on all its tokens,
  output included.
- Claude Sonnet 5.5's model page gives $0.20 a million cache reads; some third-party price lists
  say it was cut to $0.10 on 2026-10-07. The page's figure is kept: a budget errs towards more.

An unknown model costs 0.0 (and is reported as such) rather than a guess; a swarm with a cost
budget must run on a priced model (`priced`).
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm_common.model_limits import base_model

SOURCE = "platform.claude.com/docs model pages and about-claude/pricing"
AS_OF = "2026-11-27"


@dataclass(frozen=True, slots=True)
class Prices:
    """US dollars per million tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float
    # Set: a prompt over `long_prompt_tokens` pays `long_prompt` on every token of the request.
    long_prompt_tokens: int = 0
    long_prompt: Prices | None = None

    def for_prompt(self, prompt_tokens: int) -> Prices:
        if self.long_prompt is not None and prompt_tokens > self.long_prompt_tokens:
            return self.long_prompt
        return self

    @property
    def worst_input(self) -> float:
        """The most one input token can cost: written to the cache, or not."""
        return max(self.input, self.cache_write)


_OPUS_5 = Prices(input=5.0, output=25.0, cache_write=6.25, cache_read=0.50)
_SONNET_5 = Prices(input=2.0, output=10.0, cache_write=2.50, cache_read=0.20)
_SONNET_4 = Prices(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)

PRICES: dict[str, Prices] = {
    "claude-opus-5-5": Prices(input=4.0, output=20.0, cache_write=5.0, cache_read=0.20),
    "claude-opus-5": _OPUS_5,
    "claude-opus-4-8": _OPUS_5,
    "claude-opus-4-7": _OPUS_5,
    "claude-opus-4-6": _OPUS_5,
    "claude-opus-4-5": _OPUS_5,
    "claude-sonnet-5-5": _SONNET_5,
    "claude-sonnet-5": _SONNET_5,
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-haiku-5-5": Prices(
        input=0.10,
        output=0.50,
        cache_write=0.125,
        cache_read=0.01,
        long_prompt_tokens=100_000,
        long_prompt=Prices(input=0.50, output=2.50, cache_write=0.625, cache_read=0.05),
    ),
    "claude-haiku-4-5": Prices(input=1.0, output=5.0, cache_write=1.25, cache_read=0.10),
}


def prices_of(model: str) -> Prices | None:
    return PRICES.get(base_model(model))


def priced(model: str) -> bool:
    return prices_of(model) is not None


def cost_usd(
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
) -> float:
    """What one call's usage costs, at the prices its prompt's length puts it in."""
    table = prices_of(model)
    if table is None:
        return 0.0
    price = table.for_prompt(input_tokens + cache_creation_input_tokens + cache_read_input_tokens)
    return (
        input_tokens * price.input
        + output_tokens * price.output
        + cache_creation_input_tokens * price.cache_write
        + cache_read_input_tokens * price.cache_read
    ) / 1_000_000


def worst_cost_usd(model: str, input_tokens: int, output_tokens: int) -> float:
    """The most a call with at most these tokens can cost: every input token at the dearer of the
    base and cache-write prices, at the prices its prompt's length puts it in."""
    table = prices_of(model)
    if table is None:
        return 0.0
    price = table.for_prompt(input_tokens)
    return (input_tokens * price.worst_input + output_tokens * price.output) / 1_000_000
