"""1e. Memory: the orchestrator's RSS above idle with 1,000 subtasks in flight across 10 swarms.

Setup: 2 workers with `--max-concurrency 500` and `--sim-latency-ms 20000` (8 chunks, the first
after 2.5 s), so every subtask is running at once and stays running; the orchestrator plans with
0 ms latency.

    idle     = VmRSS (/proc/PID/status) of the orchestrator after it started and settled for 1 s,
               before any swarm (the lowest of 5 readings 0.2 s apart)
    loaded   = its VmRSS once the clients received subtask_started for all 10 x 100 subtasks
               (then 0.5 s to settle)
    above_idle_mb = (loaded - idle) / 2^20                 (target <= 50 MB)

The 10 swarms are started at once by this process, each on a channel of its own, and cancelled
(by cancelling their RunSwarm calls) after the reading. Also reported: the same figure per
subtask, and the workers' RSS above their idle.
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
    rounded,
    rss_bytes,
    run_swarm,
    stack,
    wait_until,
)
from swarm.v1 import orchestrator_pb2_grpc

TITLE = "1e memory (1,000 subtasks in flight, 10 swarms)"
SWARMS = 10
AGENTS = 100
TARGETS = {"above_idle_mb": Target("<=", 50)}
UNITS = {
    "above_idle_mb": "MB",
    "idle_mb": "MB",
    "loaded_mb": "MB",
    "per_subtask_kb": "KB",
    "workers_above_idle_mb": "MB/worker",
}
MB = 1024 * 1024


async def _settled_rss(pid: int) -> int:
    readings = []
    for _ in range(5):
        readings.append(rss_bytes(pid))
        await asyncio.sleep(0.2)
    return min(readings)


async def _measure(target: str, orchestrator: int, workers: list[int]) -> dict[str, Any]:
    await asyncio.sleep(1.0)
    idle = await _settled_rss(orchestrator)
    workers_idle = [rss_bytes(pid) for pid in workers]
    channels = [client_channel(target) for _ in range(SWARMS)]
    traces = [SwarmTrace(started=time.time()) for _ in range(SWARMS)]
    calls = [
        asyncio.create_task(
            run_swarm(
                orchestrator_pb2_grpc.OrchestratorServiceStub(channel), AGENTS, timeout_s=120, trace=trace
            )
        )
        for channel, trace in zip(channels, traces, strict=True)
    ]

    def started() -> int:
        return sum(trace.count("subtask_started") for trace in traces)

    try:
        if not await wait_until(lambda: started() >= SWARMS * AGENTS, timeout_s=60, interval_s=0.1):
            failed = [trace.describe() for trace in traces if trace.terminal or trace.error]
            raise RuntimeError(f"only {started()} of {SWARMS * AGENTS} subtasks started: {failed[:3]}")
        await asyncio.sleep(0.5)
        loaded = rss_bytes(orchestrator)
        workers_loaded = [rss_bytes(pid) for pid in workers]
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in channels))
    return {
        "above_idle_mb": rounded((loaded - idle) / MB, 1),
        "idle_mb": rounded(idle / MB, 1),
        "loaded_mb": rounded(loaded / MB, 1),
        "per_subtask_kb": rounded((loaded - idle) / (SWARMS * AGENTS) / 1024, 1),
        "workers_above_idle_mb": rounded(
            sum(b - a for a, b in zip(workers_idle, workers_loaded, strict=True)) / len(workers) / MB, 1
        ),
        "subtasks_in_flight": started(),
    }


def run(ctx: Context) -> dict[str, Any]:
    with stack(
        workers=2, max_concurrency=SWARMS * AGENTS // 2, worker_latency_ms=20_000, worker_chunks=8
    ) as services:
        return asyncio.run(
            _measure(services.target, services.orchestrator.pid, [w.pid for w in services.workers])
        )
