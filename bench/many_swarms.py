"""1f. Many swarms: 50 concurrent clients with 10 agents each; all complete; time to first event.

Setup: 2 workers with `--max-concurrency 64` and the default simulated latency (300 ms, 8 chunks);
the orchestrator also plans and synthesizes at 300 ms, as it would by default. This process opens
50 clients, each on its own channel (its own connection), waits until all are connected, then
starts the 50 RunSwarm calls at once (10 agents each, 500 subtasks on 128 slots).

    ttfe = client receive time of a call's first event (`accepted`) - the time the call was started
    ttfe_p50_ms, ttfe_p99_ms over the 50 calls                            (target p99 <= 200 ms)
    completed = calls that ended in swarm_completed                     (target: all 50)

Also reported: the makespan of the whole batch (first call start to last swarm_completed). Three
batches run one after another on the same stack (one with --quick).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import (
    Context,
    SwarmTrace,
    Target,
    client_channel,
    median,
    percentile,
    rounded,
    run_swarm,
    stack,
)
from swarm.v1 import orchestrator_pb2_grpc

TITLE = "1f many swarms (50 clients x 10 agents)"
CLIENTS = 50
AGENTS = 10
TARGETS = {"ttfe_p99_ms": Target("<=", 200), "completed": Target(">=", CLIENTS)}
UNITS = {"ttfe_p50_ms": "ms", "ttfe_p99_ms": "ms", "completed": "swarms", "batch_s": "s"}


async def _measure(target: str) -> dict[str, Any]:
    channels = [client_channel(target) for _ in range(CLIENTS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 20)
        stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(c) for c in channels]
        begun = time.time()
        traces: list[SwarmTrace] = await asyncio.wait_for(
            asyncio.gather(*(run_swarm(stub, AGENTS, timeout_s=120) for stub in stubs)), 150
        )
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    ttfe = [(t.received[0][0] - t.started) * 1000 for t in traces if t.received]
    completed = [t for t in traces if t.terminal == "swarm_completed"]
    ends = [t.received[-1][0] for t in completed]
    failures = [t.describe() for t in traces if t.terminal != "swarm_completed"]
    return {
        "ttfe_p50_ms": rounded(percentile(ttfe, 50), 1),
        "ttfe_p99_ms": rounded(percentile(ttfe, 99), 1),
        "ttfe_max_ms": rounded(max(ttfe), 1) if ttfe else "n/a",
        "completed": len(completed),
        "batch_s": rounded(max(ends) - begun) if ends else "n/a",
        "failures": failures[:5],
    }


def run(ctx: Context) -> dict[str, Any]:
    """3 batches (1 with --quick) on one stack: the TTFE figures are the medians of the batches'
    percentiles, `completed` the fewest completed in any batch."""
    with stack(workers=2, max_concurrency=64, worker_latency_ms=300, orchestrator_latency_ms=300) as services:
        runs = [asyncio.run(_measure(services.target)) for _ in range(1 if ctx.quick else 3)]
    figures: dict[str, Any] = {
        name: rounded(median([run[name] for run in runs]), 1)
        for name in ("ttfe_p50_ms", "ttfe_p99_ms", "ttfe_max_ms", "batch_s")
        if all(isinstance(run[name], int | float) for run in runs)
    }
    figures["completed"] = min(run["completed"] for run in runs)
    figures["failures"] = [failure for run in runs for failure in run["failures"]][:5]
    figures["runs"] = runs
    return figures
