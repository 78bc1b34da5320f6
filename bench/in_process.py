"""1b. In-process baseline: the same 256 subtasks as one asyncio.gather in one process.

This is how the origin design ran a swarm: no services, no network, no events. The same simulated
provider (latency 0, one chunk per answer, as in 1a) streams the same 256 worker prompts (built by
`swarm_common.prompts.worker_prompt` from the simulated planner's titles and instructions), all at
once under `asyncio.gather`, each call collecting its text.

    in_process_per_s   = 256 / wall time of the gather (median of 5 runs after a warm-up, 3 with --quick)
    distributed_ratio  = 1a subtasks_per_s / in_process_per_s

The ratio is the share of the in-process speed the distributed path keeps: the cost of going
distributed (the network hops, serialization and the event log) for work that costs nothing. Real
subtasks take seconds of model time, which hides this cost; the ratio has no target.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.common import IDEA, Context, median, rounded
from swarm_common import prompts
from swarm_common.providers import PlanRequest, SimulatedProvider, SimulatedSettings, StreamRequest, Usage

TITLE = "1b in-process baseline (asyncio.gather, 256 subtasks)"
AGENTS = 256
# Room for the whole plan in one answer, however long: only its subtasks are needed here.
WHOLE_PLAN_TOKENS = 100_000
NEEDS = ("dispatch",)
TARGETS: dict[str, Any] = {}
UNITS = {"in_process_per_s": "subtasks/s", "distributed_ratio": "ratio"}


async def _one(provider: SimulatedProvider, request: StreamRequest) -> str:
    parts: list[str] = []
    async for item in provider.stream(request):
        if not isinstance(item, Usage):
            parts.append(item)
    return "".join(parts)


async def _gather_rate(runs: int) -> list[float]:
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, chunks=1))
    draft = await provider.plan(
        PlanRequest(model="bench", idea=IDEA, num_agents=AGENTS, max_tokens=WHOLE_PLAN_TOKENS)
    )
    requests = [
        StreamRequest(
            model="bench",
            system=prompts.SWARM_SYSTEM,
            prompt=prompts.idea_block(IDEA) + prompts.worker_prompt(item["title"], item["instructions"]),
        )
        for item in json.loads(draft.text)["subtasks"]
    ]
    await asyncio.gather(*(_one(provider, r) for r in requests))  # warm-up
    rates: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        texts = await asyncio.gather(*(_one(provider, r) for r in requests))
        rates.append(AGENTS / (time.perf_counter() - started))
        if len(texts) != AGENTS or not all(texts):
            raise RuntimeError("the in-process gather lost an answer")
    return rates


def run(ctx: Context) -> dict[str, Any]:
    rates = asyncio.run(_gather_rate(3 if ctx.quick else 5))
    rate = median(rates)
    ours = ctx.results.get("dispatch", {}).get("subtasks_per_s")
    return {
        "in_process_per_s": rounded(rate, 1),
        "distributed_ratio": rounded(ours / rate, 4) if isinstance(ours, int | float) else "n/a",
        "runs_in_process_per_s": [rounded(r, 1) for r in rates],
    }
