"""Every model call, seen: its tokens, cost, latency and errors as metrics, and its OpenTelemetry
GenAI span (`chat {model}`, with the semantic conventions' gen_ai.* attributes). One wrapper around
any provider, so both services, and both providers, are measured the same way.

A call's span is not made current: a stream is an async generator, which may be closed in another
context than it began in. Its parent is whatever span is current when the call begins (a subtask's
execution on a worker; planning or the synthesis on the orchestrator).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from opentelemetry.util.types import AttributeValue
from prometheus_client import Counter, Histogram

from swarm_common import telemetry
from swarm_common.errors import ProviderError
from swarm_common.model_limits import base_model
from swarm_common.pricing import priced
from swarm_common.providers.base import OutlineRequest, PlanDraft, PlanRequest, Provider, StreamRequest, Usage

TOKENS = Counter(
    "swarm_model_tokens_total",
    "Model API tokens, by model and type: input, output, cache_read, cache_creation",
    ["model", "type"],
)
COST = Counter(
    "swarm_model_cost_usd_total", "What the model calls cost at list prices, in US dollars", ["model"]
)
CALL_SECONDS = Histogram(
    "swarm_model_call_seconds",
    "A model call's whole time, from the request to its last token",
    ["model"],
    buckets=telemetry.DURATION_BUCKETS,
)
ERRORS = Counter(
    "swarm_model_errors_total",
    "Model calls that failed, by kind: rate_limited (429), overloaded (529), unavailable, "
    "unauthenticated, invalid_request, provider_error",
    ["kind"],
)
# A model outside the price table is counted as this, so a request's model name cannot add series.
OTHER_MODEL = "other"


def model_label(model: str) -> str:
    base = base_model(model)
    return base if priced(base) else OTHER_MODEL


@dataclass(frozen=True, slots=True)
class _ModelSeries:
    """One model's series, bound once: a label lookup per call would cost more than the count."""

    input: Counter
    output: Counter
    cache_read: Counter
    cache_creation: Counter
    cost: Counter
    seconds: Histogram

    @classmethod
    @functools.cache
    def of(cls, label: str) -> _ModelSeries:
        return cls(
            input=TOKENS.labels(label, "input"),
            output=TOKENS.labels(label, "output"),
            cache_read=TOKENS.labels(label, "cache_read"),
            cache_creation=TOKENS.labels(label, "cache_creation"),
            cost=COST.labels(label),
            seconds=CALL_SECONDS.labels(label),
        )


def _cache_tokens(usage: Usage) -> tuple[int, int]:
    """Prompt-cache reads and writes, as the API reports them."""
    return usage.cache_read_input_tokens, usage.cache_creation_input_tokens


class ObservedProvider:
    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    @property
    def name(self) -> str:
        return self._provider.name

    def _begin(self, model: str) -> telemetry.Span | None:
        return telemetry.start_span(
            f"chat {model}",
            kind=telemetry.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": self._provider.name,
                "gen_ai.request.model": model,
            },
        )

    def _ended(self, model: str, began: float, span: telemetry.Span | None, usage: Usage) -> None:
        series = _ModelSeries.of(model_label(model))
        cache_read, cache_creation = _cache_tokens(usage)
        series.input.inc(usage.input_tokens)
        series.output.inc(usage.output_tokens)
        if cache_read:
            series.cache_read.inc(cache_read)
        if cache_creation:
            series.cache_creation.inc(cache_creation)
        series.cost.inc(usage.cost_usd)
        series.seconds.observe(time.monotonic() - began)
        if span is not None:
            attributes: dict[str, AttributeValue] = {
                "gen_ai.usage.input_tokens": usage.input_tokens,
                "gen_ai.usage.output_tokens": usage.output_tokens,
                "gen_ai.usage.cache_read.input_tokens": cache_read,
                "gen_ai.response.finish_reasons": [usage.stop_reason] if usage.stop_reason else [],
            }
            if cache_creation:
                attributes["gen_ai.usage.cache_creation.input_tokens"] = cache_creation
            telemetry.end_span(span, attributes=attributes)

    @staticmethod
    def _failed(span: telemetry.Span | None, error: Exception) -> None:
        if isinstance(error, ProviderError):
            ERRORS.labels(error.code).inc()
            telemetry.end_span(span, error=error.code)
        else:  # a bug: the span still ends, and names it
            telemetry.end_span(span, error=type(error).__name__)

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        span = self._begin(request.model)
        began = time.monotonic()
        try:
            async for item in self._provider.stream(request):
                if isinstance(item, Usage):
                    self._ended(request.model, began, span, item)
                    span = None
                yield item
        except Exception as error:
            self._failed(span, error)
            span = None
            raise
        finally:
            # Still open: the caller stopped reading, or was cancelled, before the usage came.
            telemetry.end_span(span, error="cancelled")

    async def plan(self, request: PlanRequest) -> PlanDraft:
        return await self._whole(request.model, lambda: self._provider.plan(request))

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        return await self._whole(request.model, lambda: self._provider.outline(request))

    async def _whole(self, model: str, call: Callable[[], Awaitable[PlanDraft]]) -> PlanDraft:
        span = self._begin(model)
        began = time.monotonic()
        try:
            draft = await call()
        except Exception as error:
            self._failed(span, error)
            raise
        except BaseException:
            telemetry.end_span(span, error="cancelled")
            raise
        self._ended(model, began, span, draft.usage)
        return draft

    async def aclose(self) -> None:
        await self._provider.aclose()
