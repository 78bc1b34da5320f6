"""What a swarm would use and cost, as a range, before anything runs (EstimateSwarm, `swarm run
--estimate`): from the idea's size, N, the answer budget and the models, with no model call.

- **Plan.** One structured call (or an outline and its parts past what one answer holds): the idea
  and the prompt in, about `LOW_PLAN_TOKENS_PER_SUBTASK` a subtask out at the low end, the plan's
  whole answer budget at the high end.
- **Workers.** N calls, each the system prompt, the idea, the plan's titles and its own subtask in;
  an answer of a quarter of its budget at the low end, all of it at the high end. The low end
  reads the shared prefix from the prompt cache where the swarm would mark it (one write, N - 1
  reads); the high end gets no cache hit.
- **Synthesis.** The idea and the N answers in, `LOW_SYNTHESIS_TOKENS` to `SYNTHESIS_MAX_TOKENS`
  out; at the high end, a tree of partial syntheses when the answers do not fit one prompt.

Text is counted as sizing counts it (3 bytes a token, 10% on top). Retries and hedges are not in
the range: a budget covers them from the same room (see `orchestrator_service.budget`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator_service.planner import plan_max_tokens, subtasks_per_answer
from orchestrator_service.prompt_cache import PromptCachePlan
from orchestrator_service.sizing import SYNTHESIS_MAX_TOKENS, TokenEstimate, synthesis_max_tokens
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_common import pricing, prompts
from swarm_common.model_limits import base_model, limits_of
from swarm_common.providers import Usage

LOW_PLAN_TOKENS_PER_SUBTASK = 120
LOW_SYNTHESIS_TOKENS = 1024
# A planned subtask's title and instructions, as the plan prompt asks for them.
SUBTASK_TOKENS = 150
TITLE_TOKENS = 12
ASSUMPTIONS = (
    "low: answers of a quarter of their budget and every prompt-cache hit the swarm can have; "
    "high: every answer at its budget, no cache hit; retries and hedges not included"
)


@dataclass(frozen=True, slots=True)
class Range:
    low: Usage
    high: Usage

    def __add__(self, other: Range) -> Range:
        return Range(self.low + other.low, self.high + other.high)


def _priced(model: str, usage: Usage) -> Usage:
    cost = pricing.cost_usd(
        model,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_read_input_tokens,
    )
    return Usage(
        usage.input_tokens,
        usage.output_tokens,
        cost,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
    )


def _plan(idea: str, num_agents: int, model: str) -> Range:
    estimate = TokenEstimate()
    prompt = estimate.of(prompts.PLAN_SYSTEM + idea) + estimate.of(str(prompts.PLAN_SCHEMA)) + 300
    per_answer = subtasks_per_answer(limits_of(model))
    calls = 1 if num_agents <= per_answer else 1 + math.ceil(num_agents / per_answer)
    high_out = plan_max_tokens(num_agents) + (calls - 1) * 1024
    return Range(
        _priced(model, Usage(calls * prompt, num_agents * LOW_PLAN_TOKENS_PER_SUBTASK)),
        _priced(model, Usage(calls * prompt, high_out)),
    )


def _workers(idea: str, num_agents: int, model: str, answer: int, cached: bool) -> Range:
    estimate = TokenEstimate()
    prefix = estimate.of(prompts.SWARM_SYSTEM + prompts.idea_block(idea)) + num_agents * TITLE_TOKENS
    own = SUBTASK_TOKENS + estimate.of(prompts.worker_prompt("", ""))
    low_answer = max(1, answer // 4)
    if cached:
        low = Usage(
            num_agents * own,
            num_agents * low_answer,
            cache_creation_input_tokens=prefix,
            cache_read_input_tokens=(num_agents - 1) * prefix,
        )
        high = Usage(num_agents * own, num_agents * answer, cache_creation_input_tokens=num_agents * prefix)
    else:
        low = Usage(num_agents * (prefix + own), num_agents * low_answer)
        high = Usage(num_agents * (prefix + own), num_agents * answer)
    # Each call is priced alone: a long-prompt price applies per call, not to their sum.
    return Range(_per_call(model, low, num_agents), _per_call(model, high, num_agents))


def _per_call(model: str, usage: Usage, calls: int) -> Usage:
    one = Usage(
        usage.input_tokens // calls,
        usage.output_tokens // calls,
        cache_creation_input_tokens=usage.cache_creation_input_tokens // calls,
        cache_read_input_tokens=usage.cache_read_input_tokens // calls,
    )
    priced = _priced(model, one)
    return Usage(
        usage.input_tokens,
        usage.output_tokens,
        priced.cost_usd * calls,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
    )


def _synthesis(idea: str, num_agents: int, model: str, answer: int) -> Range:
    estimate = TokenEstimate()
    limits = limits_of(model)
    fixed = estimate.of(prompts.SWARM_SYSTEM + prompts.idea_block(idea) + prompts.synthesis_prompt([]))
    budget = synthesis_max_tokens(limits)

    def one(answer_tokens: int, out: int, tree: bool) -> Usage:
        outputs = math.ceil(num_agents * (answer_tokens + TITLE_TOKENS) * (1 + estimate.margin))
        capacity = max(1, limits.context_window - budget - fixed)
        partials = math.ceil(outputs / capacity) if tree and outputs > capacity else 0
        return Usage(
            fixed * (1 + partials) + outputs + partials * budget,
            out + partials * budget,
        )

    return Range(
        _priced(model, one(max(1, answer // 4), LOW_SYNTHESIS_TOKENS, tree=False)),
        _priced(model, one(answer, SYNTHESIS_MAX_TOKENS, tree=True)),
    )


def _cost_range(usage: Range) -> orchestrator_pb2.CostRange:
    return orchestrator_pb2.CostRange(
        low_tokens=usage.low.tokens,
        high_tokens=usage.high.tokens,
        low_cost_usd=usage.low.cost_usd,
        high_cost_usd=usage.high.cost_usd,
    )


def estimate_swarm(
    *,
    idea: str,
    num_agents: int,
    model: str,
    worker_model: str,
    answer_max_tokens: int,
    budget: events_pb2.Budget | None,
    prompt_caching: bool,
) -> orchestrator_pb2.EstimateSwarmResponse:
    cache = PromptCachePlan.of(
        enabled=prompt_caching,
        idea=idea,
        plan_context=" " * (num_agents * TITLE_TOKENS * 3),
        worker_model=worker_model,
        synthesis_model=model,
        calls=num_agents,
    )
    plan_side = _plan(idea, num_agents, model) + _synthesis(idea, num_agents, model, answer_max_tokens)
    workers = _workers(idea, num_agents, worker_model, answer_max_tokens, cache.workers)
    total = plan_side + workers
    if base_model(model) == base_model(worker_model):
        models = [
            orchestrator_pb2.ModelEstimate(
                model=model, role="plan and synthesis and workers", range=_cost_range(total)
            )
        ]
    else:
        models = [
            orchestrator_pb2.ModelEstimate(
                model=model, role="plan and synthesis", range=_cost_range(plan_side)
            ),
            orchestrator_pb2.ModelEstimate(model=worker_model, role="workers", range=_cost_range(workers)),
        ]
    response = orchestrator_pb2.EstimateSwarmResponse(
        total=_cost_range(total), models=models, assumptions=ASSUMPTIONS
    )
    if budget is not None:
        response.budget_covers_low = _covers(budget, total.low)
        response.budget_covers_high = _covers(budget, total.high)
    return response


def _covers(budget: events_pb2.Budget, usage: Usage) -> bool:
    return (not budget.max_cost_usd or usage.cost_usd <= budget.max_cost_usd) and (
        not budget.max_tokens or usage.tokens <= budget.max_tokens
    )
