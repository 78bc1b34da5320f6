"""Which of a swarm's prompts are marked for the model API's prompt cache.

Every worker's prompt starts alike: the system prompt, the idea, then what the plan says about the
whole (the subtasks' titles); only its own subtask comes last. Marked, that prefix is written to
the cache by the first call (at 1.25 times the input price) and read by the others (at a tenth),
so N workers pay for the idea about 1.25 + 0.1 (N - 1) times instead of N times. The synthesis
shares the system prompt and the idea, and reads them from the cache when it runs on the workers'
model. A plan is structured output, whose schema the API puts ahead of the prompt, so it shares
no prefix with the other calls and is not marked.

Marks only where they pay: the prefix must reach the model's minimum for caching
(`model_limits.min_cache_tokens`; a shorter one is not cached at all), and some later call must
read it (one call alone would pay the write and never the read).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator_service.sizing import TokenEstimate
from swarm_common import prompts
from swarm_common.model_limits import base_model, min_cache_tokens


@dataclass(frozen=True, slots=True)
class PromptCachePlan:
    # What the workers' prompts carry after the idea.
    plan_context: str
    # Mark the workers' shared prefix.
    workers: bool
    # Mark the synthesis's idea: the workers wrote it on the same model.
    synthesis: bool

    @classmethod
    def of(
        cls,
        *,
        enabled: bool,
        idea: str,
        plan_context: str,
        worker_model: str,
        synthesis_model: str,
        calls: int,
    ) -> PromptCachePlan:
        """`calls`: the worker calls that will send the prefix."""
        same_model = base_model(worker_model) == base_model(synthesis_model)
        readers = calls - 1 + (1 if same_model else 0)
        prefix = prompts.SWARM_SYSTEM + prompts.idea_block(idea) + plan_context
        workers = enabled and readers >= 1 and long_enough(worker_model, prefix)
        synthesis = (
            workers
            and same_model
            and long_enough(worker_model, prompts.SWARM_SYSTEM + prompts.idea_block(idea))
        )
        return cls(plan_context, workers, synthesis)


def long_enough(model: str, prefix: str) -> bool:
    return TokenEstimate().of(prefix) >= min_cache_tokens(model)
