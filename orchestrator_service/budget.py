"""A swarm's hard budget: what each model call may spend, so the swarm never costs more than it
was given (RunSwarmRequest.budget).

Every call, a plan, a subtask's attempt, a hedge or a synthesis, holds the most it can cost on the
swarm's `Ledger` before it starts, and gets a max_tokens that fits what is left; when it ends, its
hold is settled with what it cost. What the swarm is measured to cost therefore never passes its
budget. The most a call can cost:

- **Input.** Text nobody has counted (the idea, prompts, titles) counts at one token a byte of
  UTF-8, since no token holds less than a byte, plus `CALL_OVERHEAD_TOKENS` for the message's
  framing (and `STRUCTURED_OVERHEAD_TOKENS` and the schema for a plan's structured output). A
  synthesis combines text the model wrote: it counts at the tokens the model reported writing it,
  plus the sizing margin (`sizing.TokenEstimate`). Every input token is priced at the dearer of the
  base and cache-write prices (`pricing.worst_cost_usd`).
- **Output.** max_tokens, at the output price.

An attempt ended in a way that says nothing of its usage (its worker vanished, it was superseded,
the orchestrator restarted) is charged what it held. The simulated provider's calls cost $0, so
only a token budget binds them.

**Fair shares.** An attempt's max_tokens is at most the request's answer budget, and at most an
even share of what is left for the subtasks not yet running, after a reserve for the synthesis
(its prompt reads every answer; its own answer is `SYNTHESIS_MAX_TOKENS`). Retries and hedges are
paid from the same room, so they shorten later answers rather than the synthesis's. A hedge is
started only if it gets the max_tokens of the attempt it hedges.

**When the budget cannot cover the next step** (an answer of `MIN_ANSWER_TOKENS`, a plan at its
size, a synthesis of `MIN_SYNTHESIS_TOKENS`), and no call in flight will give anything back, the
step raises `BudgetExhausted`; the swarm then ends in swarm_failed (see `orchestrator_service.swarm`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator_service.event_log import EventLog
from orchestrator_service.ledger import Amount, Hold, Ledger, OverLimit
from orchestrator_service.sizing import SYNTHESIS_MAX_TOKENS, TokenEstimate
from orchestrator_service.state import SwarmRecord
from swarm.v1 import events_pb2
from swarm_common import pricing, prompts
from swarm_common.errors import AuthenticationFailed, InvalidModelRequest, Overloaded, RateLimited
from swarm_common.providers import OutlineRequest, PlanDraft, PlanRequest, Provider, StreamRequest, Usage
from swarm_common.usage import usage_proto

R = TypeVar("R", PlanRequest, OutlineRequest)

MIN_ANSWER_TOKENS = 256
MIN_SYNTHESIS_TOKENS = 1024
CALL_OVERHEAD_TOKENS = 256
NOTHING = Amount()
# The API adds a system prompt of its own for structured output.
STRUCTURED_OVERHEAD_TOKENS = 1024


class BudgetExhausted(Exception):
    """The swarm's budget cannot cover the next step."""


def input_bound(text: str, extra: int = 0) -> int:
    """The most tokens `text` can take as a prompt: a token holds at least a byte."""
    return len(text.encode()) + CALL_OVERHEAD_TOKENS + extra


def amount_of(usage: Usage) -> Amount:
    return Amount(usage.cost_usd, usage.tokens)


@dataclass(slots=True)
class Grant:
    """A call's place in the budget: its max_tokens, what it holds, and the hold to settle."""

    max_tokens: int
    reserved: Usage
    hold: Hold

    def settle(self, usage: Usage | None) -> None:
        """The call ended, having used `usage`; None = unknown: it is charged what it held."""
        self.hold.settle(amount_of(self.reserved if usage is None else usage))

    @property
    def reserved_proto(self) -> events_pb2.Usage:
        return events_pb2.Usage(
            input_tokens=self.reserved.input_tokens,
            output_tokens=self.reserved.output_tokens,
            cost_usd=self.reserved.cost_usd,
        )


class SwarmBudget:
    def __init__(
        self,
        budget: events_pb2.Budget,
        record: SwarmRecord,
        *,
        plan_model: str,
        worker_model: str,
        answer_max_tokens: int,
    ) -> None:
        self.budget = budget
        self.record = record
        self.plan_model = plan_model
        self.worker_model = worker_model
        self.answer_max_tokens = answer_max_tokens
        self.ledger = Ledger(budget.max_cost_usd, budget.max_tokens)
        # A resumed swarm has spent what its events say (its interrupted calls were settled at
        # their holds when it resumed).
        self.ledger.charge(Amount(record.spent.cost_usd, _tokens(record.spent)))
        self._settled = asyncio.Event()
        self._settles = 0
        self._prefix: tuple[str, int] | None = None  # a plan context, and its attempts' prefix bytes

    @property
    def limited(self) -> bool:
        return self.ledger.limited

    def describe(self) -> str:
        parts = []
        if self.budget.max_cost_usd:
            parts.append(f"${self.budget.max_cost_usd:g}")
        if self.budget.max_tokens:
            parts.append(f"{self.budget.max_tokens:,} tokens")
        spent = self.ledger.spent
        return f"the budget of {' and '.join(parts)} (${spent.usd:.4f} and {spent.tokens:,} tokens spent)"

    # ---- one call -------------------------------------------------------------------------

    def grant(
        self,
        model: str,
        input_tokens: int,
        *,
        wanted: int,
        minimum: int,
        keep: Amount = NOTHING,
        share: int = 1,
        per_output: Amount | None = None,
        what: str,
    ) -> Grant:
        """Holds a call of `input_tokens` with the largest max_tokens up to `wanted` that fits 1/share
        of the room left after `keep`; at least `minimum`, else BudgetExhausted. `per_output` is what
        each output token costs besides itself (the synthesis that will read it)."""
        # A request that wants answers shorter than the usual minimum gets what it asked for.
        minimum = min(minimum, wanted)
        max_tokens = wanted
        if self.limited:
            max_tokens = min(wanted, self._fitting(model, input_tokens, keep, share, per_output))
        if max_tokens < minimum:
            raise BudgetExhausted(f"{self.describe()} cannot cover {what}")
        reserved = Usage(input_tokens, max_tokens, pricing.worst_cost_usd(model, input_tokens, max_tokens))
        try:
            hold = self.ledger.hold(amount_of(reserved))
        except OverLimit:
            raise BudgetExhausted(f"{self.describe()} cannot cover {what}") from None
        return Grant(max_tokens, reserved, hold)

    def _fitting(
        self, model: str, input_tokens: int, keep: Amount, share: int, per_output: Amount | None
    ) -> int:
        room_usd, room_tokens = self.ledger.room()
        extra = per_output or Amount()
        fits = math.inf
        if not math.isinf(room_tokens):
            fits = ((room_tokens - keep.tokens) / share - input_tokens) / (1 + extra.tokens)
        prices = pricing.prices_of(model)
        if not math.isinf(room_usd) and prices is not None:
            price = prices.for_prompt(input_tokens)
            usd = ((room_usd - keep.usd) / share - input_tokens * price.worst_input / 1e6) / (
                price.output / 1e6 + extra.usd
            )
            fits = min(fits, usd)
        return max(0, math.floor(fits)) if not math.isinf(fits) else 2**31 - 1

    def settled(self) -> None:
        """A hold was let go: a step waiting for room may look again."""
        self._settles += 1
        self._settled.set()

    async def _room_changed(self, since: int) -> None:
        """Waits for a hold to be let go after the `since`-th."""
        while self._settles == since:
            self._settled.clear()
            await self._settled.wait()

    # ---- the swarm's steps ----------------------------------------------------------------

    def _synthesis_reads(self) -> Amount:
        """What one more output token costs the synthesis that reads it."""
        prices = pricing.prices_of(self.plan_model)
        usd = prices.worst_input / 1e6 if prices is not None else 0.0
        return Amount(usd * 1.1, 1)

    def synthesis_reserve(self) -> Amount:
        """The most the synthesis is expected to cost with the outputs it will have so far: those
        completed, and those running at their max_tokens."""
        estimate = TokenEstimate()
        idea = self.record.accepted.idea
        tokens = estimate.of(prompts.SWARM_SYSTEM + prompts.idea_block(idea) + prompts.synthesis_prompt([]))
        for subtask in self.record.subtasks.values():
            counted = subtask.usage.output_tokens or sum(self.record.running_max_tokens(subtask.subtask.id))
            tokens += math.ceil(counted * (1 + estimate.margin)) + estimate.of(subtask.subtask.title) + 8
        usd = pricing.worst_cost_usd(self.plan_model, tokens, SYNTHESIS_MAX_TOKENS)
        return Amount(usd, tokens + SYNTHESIS_MAX_TOKENS)

    def attempt_input(self, subtask: events_pb2.Subtask, context: str) -> int:
        return self._prefix_bytes(context) + input_bound(
            prompts.worker_prompt(subtask.title, subtask.instructions)
        )

    def _prefix_bytes(self, context: str) -> int:
        """The bytes of what every attempt's prompt starts with: the same for all of a swarm's
        subtasks, and with the whole plan in it, long; so measured once."""
        if self._prefix is None or self._prefix[0] is not context:
            prefix = prompts.SWARM_SYSTEM + prompts.idea_block(self.record.accepted.idea) + context
            self._prefix = (context, len(prefix.encode()))
        return self._prefix[1]

    async def grant_attempt(self, subtask: events_pb2.Subtask, context: str) -> Grant:
        """An attempt's grant: its fair share of what is left. When that is too little while calls
        are in flight, waits for them to give back what they held but did not spend."""
        while True:
            since = self._settles
            try:
                return self._grant_attempt(
                    subtask, context, share=self._unstarted(), minimum=MIN_ANSWER_TOKENS
                )
            except BudgetExhausted:
                if not self.ledger.open_holds:
                    raise
            await self._room_changed(since)

    def grant_hedge(self, subtask: events_pb2.Subtask, context: str, max_tokens: int) -> Grant | None:
        """A hedge's grant, with the max_tokens of the attempt it hedges, from what the subtasks not
        yet running leave over; None when there is not that much."""
        try:
            return self._grant_attempt(
                subtask, context, share=self._unstarted() + 1, minimum=max_tokens, wanted=max_tokens
            )
        except BudgetExhausted:
            return None

    def _grant_attempt(
        self, subtask: events_pb2.Subtask, context: str, *, share: int, minimum: int, wanted: int = 0
    ) -> Grant:
        return self.grant(
            self.worker_model,
            self.attempt_input(subtask, context),
            wanted=wanted or self.answer_max_tokens,
            minimum=minimum,
            keep=self.synthesis_reserve() if self.limited else Amount(),
            share=max(1, share),
            per_output=self._synthesis_reads(),
            what=f"subtask {subtask.id} (an answer of at least {minimum} tokens)",
        )

    def _unstarted(self) -> int:
        """Subtasks neither completed nor running: the ones an attempt's share is split among."""
        return len(self.record.unstarted)

    def plan_keep(self, num_agents: int, subtask_input: int) -> Amount:
        """What a plan must leave: every subtask's shortest answer and the synthesis of them."""
        worker = pricing.worst_cost_usd(self.worker_model, subtask_input, MIN_ANSWER_TOKENS)
        synthesis_in = num_agents * math.ceil(MIN_ANSWER_TOKENS * 1.1)
        synthesis = pricing.worst_cost_usd(self.plan_model, synthesis_in, MIN_SYNTHESIS_TOKENS)
        return Amount(
            num_agents * worker + synthesis,
            num_agents * (subtask_input + MIN_ANSWER_TOKENS) + synthesis_in + MIN_SYNTHESIS_TOKENS,
        )


def _tokens(usage: events_pb2.Usage) -> int:
    return (
        usage.input_tokens
        + usage.output_tokens
        + usage.cache_creation_input_tokens
        + usage.cache_read_input_tokens
    )


# Errors the model API gives before it has written anything: such a call costs nothing.
UNBILLED = (RateLimited, Overloaded, InvalidModelRequest, AuthenticationFailed)


class BudgetedProvider:
    """A swarm's own model calls (plans, outlines, syntheses) under its budget: each gets a grant,
    told as call_reserved, and is settled, told as call_settled, whatever ends it."""

    def __init__(self, provider: Provider, budget: SwarmBudget, log: EventLog) -> None:
        self._provider = provider
        self._budget = budget
        self._log = log

    @property
    def name(self) -> str:
        return self._provider.name

    def _reserve(
        self, role: str, model: str, input_tokens: int, wanted: int, minimum: int, keep: Amount
    ) -> tuple[str, Grant]:
        grant = self._budget.grant(
            model,
            input_tokens,
            wanted=wanted,
            minimum=minimum,
            keep=keep,
            what=f"the {role} ({minimum:,} tokens)",
        )
        # Named after its own event's sequence: unique in the swarm, across restarts too.
        call_id = f"{role}@{self._log.record.last_sequence + 1}"
        self._log.append(
            "call_reserved",
            events_pb2.CallReserved(
                call_id=call_id, model=model, max_tokens=grant.max_tokens, reserved=grant.reserved_proto
            ),
        )
        return call_id, grant

    def _settle(self, call_id: str, grant: Grant, usage: Usage | None) -> None:
        grant.settle(usage)
        charged = grant.reserved if usage is None else usage
        self._log.append("call_settled", events_pb2.CallSettled(call_id=call_id, usage=usage_proto(charged)))
        self._budget.settled()

    async def _whole(
        self,
        role: str,
        request: R,
        prompt: str,
        schema: dict[str, Any],
        call: Callable[[R], Awaitable[PlanDraft]],
    ) -> PlanDraft:
        record = self._budget.record
        subtask = input_bound(prompts.SWARM_SYSTEM + prompts.idea_block(request.idea) + " " * 1024)
        call_id, grant = self._reserve(
            role,
            request.model,
            input_bound(prompt, STRUCTURED_OVERHEAD_TOKENS + len(json.dumps(schema))),
            request.max_tokens,
            request.max_tokens,
            self._budget.plan_keep(record.accepted.num_agents, subtask),
        )
        usage: Usage | None = None
        try:
            draft = await call(request)
            usage = draft.usage
            return draft
        except UNBILLED:
            usage = Usage()
            raise
        finally:
            self._settle(call_id, grant, usage)

    async def plan(self, request: PlanRequest) -> PlanDraft:
        prompt = prompts.PLAN_SYSTEM + prompts.plan_prompt(request)
        return await self._whole("plan", request, prompt, prompts.PLAN_SCHEMA, self._provider.plan)

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        prompt = prompts.OUTLINE_SYSTEM + prompts.outline_prompt(request)
        return await self._whole("outline", request, prompt, prompts.OUTLINE_SCHEMA, self._provider.outline)

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        """A synthesis: its prompt holds the outputs, counted at the tokens the model wrote them in."""
        estimate = TokenEstimate.calibrated(
            (s.output, s.usage.output_tokens) for s in self._budget.record.subtasks.values()
        )
        call_id, grant = self._reserve(
            "synthesis",
            request.model,
            estimate.of(request.text) + CALL_OVERHEAD_TOKENS,
            request.max_tokens,
            min(MIN_SYNTHESIS_TOKENS, request.max_tokens),
            NOTHING,
        )
        usage: Usage | None = None
        try:
            async for item in self._provider.stream(
                dataclasses.replace(request, max_tokens=grant.max_tokens)
            ):
                if isinstance(item, Usage):
                    usage = item
                yield item
        except UNBILLED:
            usage = Usage()
            raise
        finally:
            self._settle(call_id, grant, usage)

    async def aclose(self) -> None:
        await self._provider.aclose()
