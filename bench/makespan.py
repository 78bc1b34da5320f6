"""1c. Makespan efficiency: 128 subtasks on 4 workers of capacity 8 at 500 ms simulated latency.

The scheduler's figure. 4 worker processes with `--max-concurrency 8` and `--sim-latency-ms 500`
(8 chunks per answer); the orchestrator plans and synthesizes with 0 ms latency.

    ideal      = ceil(128 / (4 * 8)) * 0.5 s = 2.0 s   (4 full waves of 32 slots)
    measured   = client receive time of the last subtask_completed - plan_created's own time
                 (stamped by the orchestrator as it appends it, right before dispatching)
    efficiency = ideal / measured                       (target >= 0.95)

A small warm-up swarm runs first; the figure is the median of 3 swarms (1 with --quick). Also
reported: how the 128 subtasks spread over the 4 workers (32 each is perfect).
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any

from bench.common import Context, Target, client_channel, median, rounded, run_swarm, stack
from swarm.v1 import orchestrator_pb2_grpc

TITLE = "1c makespan (128 subtasks, 4 workers x 8, 500 ms)"
AGENTS = 128
WORKERS = 4
CAPACITY = 8
LATENCY_S = 0.5
IDEAL_S = math.ceil(AGENTS / (WORKERS * CAPACITY)) * LATENCY_S
TARGETS = {"efficiency": Target(">=", 0.95)}
UNITS = {"efficiency": "ratio", "measured_s": "s", "ideal_s": "s", "per_worker": "subtasks"}


async def _measure(target: str, runs: int) -> dict[str, Any]:
    async with client_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        (await run_swarm(stub, WORKERS * CAPACITY, timeout_s=60)).require_completed()  # warm-up
        measured: list[float] = []
        spreads: list[list[int]] = []
        for _ in range(runs):
            trace = await run_swarm(stub, AGENTS, timeout_s=120)
            trace.require_completed()
            measured.append(trace.last("subtask_completed") - trace.stamped("plan_created"))
            per_worker = collections.Counter(
                e.subtask_started.worker_id for _, e in trace.kinds("subtask_started")
            )
            spreads.append(sorted(per_worker.values()))
        return {"measured": measured, "spreads": spreads}


def run(ctx: Context) -> dict[str, Any]:
    runs = 1 if ctx.quick else 3
    with stack(
        workers=WORKERS, max_concurrency=CAPACITY, worker_latency_ms=LATENCY_S * 1000, worker_chunks=8
    ) as services:
        found = asyncio.run(_measure(services.target, runs))
    measured = median(found["measured"])
    return {
        "efficiency": rounded(IDEAL_S / measured),
        "measured_s": rounded(measured),
        "ideal_s": IDEAL_S,
        "per_worker": "/".join(str(n) for n in found["spreads"][len(found["spreads"]) // 2]),
        "runs_measured_s": [rounded(m) for m in found["measured"]],
    }
