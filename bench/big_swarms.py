"""Big swarms: planning and synthesis time and token cost for 16, 64 and 256 agents at real sizes.

The orchestrator's own code (Orchestrator, Swarm, Planner, the synthesis tree, the event log on an
in-memory store) runs in this process against the simulated provider at a real model's sizes:
about 90 words a planned subtask, about 700 words an answer, answers cut off at max_tokens, and
prompts over the model's context window refused. The model is claude-haiku-4-5 (a 200k-token
context window), so 256 answers of about 960 tokens do not fit one synthesis prompt.

The simulated model writes 2,000 output tokens a second (real models write 50 to 100), so the
times are those of the output tokens on each step's longest path of calls, plus the
orchestrator's own work: they show what planning in parts and synthesizing as a tree save, at
about 1/25 of real time. The subtasks are answered at once, in process: they are not measured here.

    plan_s        = plan_created's time - accepted's time
    plan_one_answer_s = the plan's output tokens / 2,000: what writing it as one answer would take
    synthesis_s   = swarm_completed's time - the last subtask_completed's time
    *_calls       = model calls (an outline and its parts; partial syntheses and the final one)
    *_tokens_*    = the tokens those calls took and gave, as the simulated model counts them
    *_cost_usd    = what those tokens cost at claude-haiku-4-5's list price
    synthesis_levels = levels of partial syntheses (0 = one call)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from bench.common import IDEA, Context, rounded
from orchestrator_service.event_log import EventLog
from orchestrator_service.orchestrator import Orchestrator
from orchestrator_service.planner import Planner
from orchestrator_service.scheduler import SubtaskOutcome
from orchestrator_service.store import MemoryStore
from swarm.v1 import events_pb2
from swarm_common import pricing, prompts
from swarm_common.providers import (
    OutlineRequest,
    PlanDraft,
    PlanRequest,
    SimulatedProvider,
    SimulatedSettings,
    StreamRequest,
    Usage,
)

TITLE = "big swarms: planning and synthesis at real sizes (16, 64, 256 agents)"
MODEL = "claude-haiku-4-5"
AGENTS = (16, 64, 256)
TOKENS_PER_S = 2000.0
TARGETS: dict[str, Any] = {}
UNITS = {
    f"agents_{n}.{figure}": unit
    for n in AGENTS
    for figure, unit in (
        ("plan_s", "s"),
        ("plan_one_answer_s", "s"),
        ("plan_calls", "calls"),
        ("plan_cost_usd", "USD"),
        ("synthesis_s", "s"),
        ("synthesis_calls", "calls"),
        ("synthesis_levels", "levels"),
        ("synthesis_tokens_in", "tokens"),
        ("synthesis_cost_usd", "USD"),
    )
}


class CountedProvider:
    """A provider whose calls are counted by what they were for."""

    def __init__(self, provider: SimulatedProvider) -> None:
        self._provider = provider
        self.calls: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return self._provider.name

    async def plan(self, request: PlanRequest) -> PlanDraft:
        self.calls["plan"] += 1
        return await self._provider.plan(request)

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        self.calls["plan"] += 1
        return await self._provider.outline(request)

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        self.calls["synthesis"] += 1
        async for item in self._provider.stream(request):
            yield item

    async def aclose(self) -> None:
        await self._provider.aclose()


class AnsweringScheduler:
    """Completes each subtask at once with the simulated model's answer to its worker prompt."""

    def __init__(self, provider: SimulatedProvider) -> None:
        self._provider = provider

    async def run(
        self, log: EventLog, subtask: events_pb2.Subtask, *, idea: str, model: str, max_tokens: int, **_: Any
    ) -> SubtaskOutcome:
        request = StreamRequest(
            model=model,
            system=prompts.SWARM_SYSTEM,
            prompt=prompts.idea_block(idea) + prompts.worker_prompt(subtask.title, subtask.instructions),
            max_tokens=max_tokens,
        )
        parts: list[str] = []
        usage = Usage()
        async for item in self._provider.stream(request):
            if isinstance(item, str):
                parts.append(item)
            else:
                usage = item
        output = "".join(parts)
        counted = events_pb2.Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
        log.append(
            "subtask_started", events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id="bench", attempt=1)
        )
        log.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id=subtask.id, text=output, attempt=1))
        log.append(
            "subtask_completed",
            events_pb2.SubtaskCompleted(
                subtask_id=subtask.id,
                worker_id="bench",
                output=output,
                usage=counted,
                attempt=1,
                stop_reason=usage.stop_reason,
            ),
        )
        return SubtaskOutcome(output, counted)


def _at(event: events_pb2.SwarmEvent) -> float:
    return event.time.ToNanoseconds() / 1e9


async def _swarm(agents: int) -> dict[str, Any]:
    real_sizes = SimulatedSettings(latency_ms=0, chunks=8, answer_words=700, subtask_words=90)
    model = CountedProvider(
        SimulatedProvider(
            SimulatedSettings(
                latency_ms=0, chunks=8, answer_words=700, subtask_words=90, tokens_per_s=TOKENS_PER_S
            )
        )
    )
    orchestrator = Orchestrator(
        Planner(model),
        AnsweringScheduler(SimulatedProvider(real_sizes)),  # type: ignore[arg-type]
        MemoryStore(),
        default_model=MODEL,
    )
    swarm_id = (await orchestrator.start(idea=IDEA, num_agents=agents)).swarm_id
    events = [logged.event async for batch in await orchestrator.watch(swarm_id) for logged in batch]
    last = events[-1]
    if not last.HasField("swarm_completed"):
        raise RuntimeError(f"the {agents}-agent swarm did not complete: {last}")
    by_kind: dict[str, list[events_pb2.SwarmEvent]] = {}
    for event in events:
        by_kind.setdefault(str(event.WhichOneof("kind")), []).append(event)
    accepted, planned = by_kind["accepted"][0], by_kind["plan_created"][0]
    plan = planned.plan_created.usage
    subtasks_in = sum(e.subtask_completed.usage.input_tokens for e in by_kind["subtask_completed"])
    subtasks_out = sum(e.subtask_completed.usage.output_tokens for e in by_kind["subtask_completed"])
    total = last.swarm_completed.usage
    synthesis_in = total.input_tokens - plan.input_tokens - subtasks_in
    synthesis_out = total.output_tokens - plan.output_tokens - subtasks_out
    partials = [e.partial_synthesis for e in by_kind.get("partial_synthesis", [])]
    return {
        "plan_s": rounded(_at(planned) - _at(accepted)),
        "plan_one_answer_s": rounded(plan.output_tokens / TOKENS_PER_S),
        "plan_calls": model.calls["plan"],
        "plan_tokens_in": plan.input_tokens,
        "plan_tokens_out": plan.output_tokens,
        "plan_cost_usd": rounded(pricing.cost_usd(MODEL, plan.input_tokens, plan.output_tokens), 4),
        "synthesis_s": rounded(_at(last) - _at(by_kind["subtask_completed"][-1])),
        "synthesis_calls": model.calls["synthesis"],
        "synthesis_levels": max((p.level for p in partials), default=0),
        "synthesis_tokens_in": synthesis_in,
        "synthesis_tokens_out": synthesis_out,
        "synthesis_cost_usd": rounded(pricing.cost_usd(MODEL, synthesis_in, synthesis_out), 4),
        "subtask_tokens_out": subtasks_out,
    }


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for agents in AGENTS:
        figures.update(
            {f"agents_{agents}.{name}": value for name, value in asyncio.run(_swarm(agents)).items()}
        )
    return figures
