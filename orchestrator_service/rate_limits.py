"""The model API's limits, kept for the whole orchestrator: requests and tokens per minute, and
requests at once. Every model call of every swarm (plans, subtasks on any worker, syntheses) takes
a permit first, so the pool as a whole stays inside what the API allows instead of each call
discovering the limit by a 429. A 429 or 529 that does arrive pauses everyone for its retry-after.

Budgets are a sliding window (`window_s`, a minute in production): in any window, the requests and
tokens started stay within the limits. Output tokens are not known before a call, so a permit
reserves the running average of past calls and is settled with the real figure afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from swarm_common import telemetry
from swarm_common.errors import Overloaded, RateLimited
from swarm_common.providers import OutlineRequest, PlanDraft, PlanRequest, Provider, StreamRequest, Usage

log = logging.getLogger("swarm.orchestrator.limits")

THROTTLED = Counter(
    "swarm_model_throttled_total",
    "The model API's 429 (rate limited) and 529 (overloaded) answers that reached the orchestrator, "
    "from its own calls and its workers', after the SDK's own retries; each pauses every call",
    ["status"],
)
LIMITER_WAIT = Histogram(
    "swarm_model_limiter_wait_seconds",
    "How long a model call waited for the shared budget (per-minute limits, concurrency, a pause after "
    "a 429 or 529); calls made with no limit set and no pause are not counted",
    buckets=telemetry.WAIT_BUCKETS,
)

DEFAULT_OUTPUT_ESTIMATE = 1024
# A 529 says "overloaded" without saying for how long.
OVERLOADED_PAUSE_S = 2.0


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """0 means no limit."""

    requests_per_minute: int = 0
    input_tokens_per_minute: int = 0
    output_tokens_per_minute: int = 0
    concurrent_requests: int = 0
    # The window the per-minute budgets are kept over; shorter only in tests.
    window_s: float = 60.0
    # Spends are kept this much longer than the window, for the trip from the grant to the API.
    margin_s: float = 0.25

    @property
    def bounded(self) -> bool:
        return bool(
            self.requests_per_minute
            or self.input_tokens_per_minute
            or self.output_tokens_per_minute
            or self.concurrent_requests
        )

    @property
    def hold_s(self) -> float:
        return self.window_s + self.margin_s

    def per_window(self, per_minute: int) -> float:
        return per_minute * self.window_s / 60.0


@dataclass(slots=True, eq=False)
class _Spend:
    at: float
    input_tokens: int
    output_tokens: int


class Permit:
    """One model call's share of the budget: `settle` it with the real usage, then `release` it."""

    def __init__(self, limiter: ModelRateLimiter, spend: _Spend, *, counted: bool) -> None:
        self._limiter = limiter
        self._spend = spend
        # In the limiter's window; a call granted with no budget to count against is not.
        self._counted = counted
        self._answered = False
        self._released = False

    def answered(self) -> None:
        """Output came back: the API counted the call when it began to answer. Counting it from
        its first output (not from the grant, nor from any later chunk) keeps the budget right
        however long the trip through a worker was."""
        if not self._answered:
            self._answered = True
            self._limiter._answered(self._spend, counted=self._counted)

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        self._spend.input_tokens = input_tokens
        self._spend.output_tokens = output_tokens
        self._limiter._settled(output_tokens)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release()


class ModelRateLimiter:
    def __init__(self, limits: ModelLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._spent: deque[_Spend] = deque()
        self._in_flight = 0
        self._paused_until = 0.0
        # Callers wait in order: one at a time computes how long it must wait.
        self._turn = asyncio.Lock()
        self._freed = asyncio.Event()
        # Budget came back early (a call settled for less than it reserved): waiters look again.
        self._refunded = asyncio.Event()
        self._recent_outputs: deque[int] = deque(maxlen=32)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def pause(self, seconds: float, reason: str) -> None:
        """The API said slow down: nobody starts a call before `seconds` from now."""
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            log.warning(f"model API calls paused for {seconds:.2f}s: {reason}")

    def note_error(self, error: Exception) -> None:
        if isinstance(error, RateLimited):
            THROTTLED.labels("429").inc()
            self.pause(error.retry_after_s if error.retry_after_s is not None else 1.0, "rate limited (429)")
        elif isinstance(error, Overloaded):
            THROTTLED.labels("529").inc()
            self.pause(OVERLOADED_PAUSE_S, "overloaded (529)")

    def _expire(self, now: float) -> None:
        while self._spent and now - self._spent[0].at >= self.limits.hold_s:
            self._spent.popleft()

    def _wait_needed(self, input_tokens: int, output_tokens: int) -> float:
        """Seconds until a call of this size fits every budget (0 = now)."""
        now = self._clock()
        self._expire(now)
        wait = max(0.0, self._paused_until - now)
        budgets = (
            (self.limits.requests_per_minute, lambda s: 1, 1),
            (self.limits.input_tokens_per_minute, lambda s: s.input_tokens, input_tokens),
            (self.limits.output_tokens_per_minute, lambda s: s.output_tokens, output_tokens),
        )
        for per_minute, cost_of, cost in budgets:
            if not per_minute:
                continue
            allowed = self.limits.per_window(per_minute)
            used = sum(cost_of(s) for s in self._spent)
            # A call larger than the whole budget may go when the window is empty, never sooner.
            excess = used + min(cost, allowed) - allowed
            for spend in self._spent:
                if excess <= 0:
                    break
                excess -= cost_of(spend)
                wait = max(wait, spend.at + self.limits.hold_s - now)
        return wait

    async def acquire(self, input_tokens: int, output_tokens: int | None = None) -> Permit:
        """Waits until the call fits the budgets (and a concurrency slot is free), then takes it."""
        output = self._output_estimate() if output_tokens is None else output_tokens
        if not self.limits.bounded and self._paused_until <= self._clock():
            # Nothing to keep count of: no budget, no cap, no pause.
            self._in_flight += 1
            return Permit(self, _Spend(self._clock(), input_tokens, output), counted=False)
        began = self._clock()
        async with self._turn:
            while self.limits.concurrent_requests and self._in_flight >= self.limits.concurrent_requests:
                self._freed.clear()
                await self._freed.wait()
            while (wait := self._wait_needed(input_tokens, output)) > 0:
                self._refunded.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._refunded.wait(), wait)
            spend = _Spend(self._clock(), input_tokens, output)
            self._spent.append(spend)
            self._in_flight += 1
        LIMITER_WAIT.observe(spend.at - began)
        return Permit(self, spend, counted=True)

    def _answered(self, spend: _Spend, *, counted: bool) -> None:
        """Stamps `spend` with now, the latest time in the window, so it moves to the window's end:
        the window stays in time order, which expiry and the wait computation rely on."""
        spend.at = self._clock()
        if counted:
            with contextlib.suppress(ValueError):  # expired already: the answer took a window
                self._spent.remove(spend)
            self._spent.append(spend)

    def _release(self) -> None:
        self._in_flight -= 1
        self._freed.set()

    def _output_estimate(self) -> int:
        """The mean of recent calls' output; a generous guess before there are any."""
        if not self._recent_outputs:
            return DEFAULT_OUTPUT_ESTIMATE
        return round(sum(self._recent_outputs) / len(self._recent_outputs))

    def _settled(self, output_tokens: int) -> None:
        self._recent_outputs.append(output_tokens)
        self._refunded.set()


def estimate_tokens(*texts: str) -> int:
    """About four characters a token: enough to budget with before the API counts for real."""
    return max(1, sum(len(text) for text in texts) // 4)


class RateLimitedProvider:
    """The orchestrator's own model calls (plans, syntheses) under the shared limits."""

    def __init__(self, provider: Provider, limiter: ModelRateLimiter) -> None:
        self._provider = provider
        self._limiter = limiter

    @property
    def name(self) -> str:
        return self._provider.name

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        permit = await self._limiter.acquire(estimate_tokens(request.system, request.prompt))
        try:
            async for item in self._provider.stream(request):
                permit.answered()
                if isinstance(item, Usage):
                    permit.settle(item.input_tokens, item.output_tokens)
                yield item
        except (RateLimited, Overloaded) as error:
            self._limiter.note_error(error)
            raise
        finally:
            permit.release()

    async def plan(self, request: PlanRequest) -> PlanDraft:
        return await self._whole(lambda: self._provider.plan(request), estimate_tokens(request.idea) + 300)

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        return await self._whole(lambda: self._provider.outline(request), estimate_tokens(request.idea) + 300)

    async def _whole(self, call: Callable[[], Awaitable[PlanDraft]], input_tokens: int) -> PlanDraft:
        """A call answered whole, made under a permit."""
        permit = await self._limiter.acquire(input_tokens)
        try:
            draft = await call()
        except (RateLimited, Overloaded) as error:
            self._limiter.note_error(error)
            raise
        finally:
            permit.release()
        permit.answered()
        permit.settle(draft.usage.input_tokens, draft.usage.output_tokens)
        return draft

    async def aclose(self) -> None:
        await self._provider.aclose()
