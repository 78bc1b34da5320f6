"""1h. A thousand agents streaming at once: 20 swarms x 50 agents, 5 chunks/s each, on 8 workers.

Setup: 8 workers with `--max-concurrency 125` (1,000 slots), `--sim-chunks 50` and
`--sim-latency-ms 10000` (5 chunks/s per agent, 5,000 chunks/s in all); the orchestrator plans and
synthesizes with 0 ms latency and keeps its default delta window (50 ms: a chunk every 200 ms
needs no gathering, so this is 5,000 subtask_delta events a second). The answers are ~1,000
characters, in 50 chunks of ~20 (`bench/chunks.py`). This process starts the 20 RunSwarm calls at
once, each on a channel of its own (its own connection), and follows them all. Two runs one after
another on one stack (one with --quick); every figure is the median over the runs, each run's own
figures are kept too.

    lag_p99_ms        lag as 1d defines it (`bench/chunks.py`), over every chunk of every agent
                                                                      (target p99 <= 250 ms)
    delivered_pct     subtasks whose deltas join to exactly their output, of the 1,000, with every
                      swarm completed: no text lost, doubled or reordered    (target 100%)
    rss_per_subtask_kb  the orchestrator's peak RSS over the run (/proc VmRSS every 0.1 s) above
                      its idle (before the first run), per subtask: at most 1e's budget, 50 MB
                      for 1,000 subtasks in flight                  (target <= 51.2 KB)

Also: the orchestrator's CPU (% of a core over the run, and per delta event), the events/s the
clients got, and the CPU of the workers and of this client process. All 1,000 subtasks stream at
once: `streaming_at_once` is the most that had started and not completed at any moment.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.chunks import Streams, answer_words, event_rates, hop_lags, medians, ms
from bench.common import (
    Context,
    SwarmTrace,
    Target,
    client_channel,
    cpu_seconds,
    rounded,
    rss_bytes,
    run_swarm,
    stack,
)
from bench.profiling import maybe_profile
from swarm.v1 import orchestrator_pb2_grpc

TITLE = "1h 1,000 agents streaming (20 swarms x 50, 5 chunks/s, 8 workers)"
SWARMS = 20
AGENTS = 50
WORKERS = 8
CHUNKS = 50
CHUNKS_PER_S = 5
LATENCY_S = CHUNKS / CHUNKS_PER_S
SUBTASKS = SWARMS * AGENTS
# 1e's budget: 50 MB above idle with 1,000 subtasks in flight.
BUDGET_KB_PER_SUBTASK = 50 * 1024 / 1000
TARGETS = {
    "lag_p99_ms": Target("<=", 250),
    "delivered_pct": Target(">=", 100),
    "rss_per_subtask_kb": Target("<=", BUDGET_KB_PER_SUBTASK),
}
UNITS = {
    "lag_p50_ms": "ms",
    "lag_p99_ms": "ms",
    "orch_to_client_p50_ms": "ms",
    "orch_to_client_p99_ms": "ms",
    "delivered_pct": "%",
    "streaming_at_once": "subtasks",
    "rss_above_idle_mb": "MB",
    "rss_per_subtask_kb": "KB",
    "client_events_per_s": "events/s",
    "orchestrator_cpu_pct": "% core",
    "orchestrator_us_per_event": "CPU µs",
    "workers_cpu_pct": "% core",
    "client_cpu_pct": "% core",
}
MB = 1024 * 1024


async def _peak_rss(pid: int, stop: asyncio.Event) -> int:
    peak = rss_bytes(pid)
    while not stop.is_set():
        peak = max(peak, rss_bytes(pid))
        await asyncio.sleep(0.1)
    return peak


def _at_once(traces: list[SwarmTrace]) -> int:
    """The most subtasks that had started and not completed at one moment, by the orchestrator's
    own stamps."""
    steps = sorted(
        (event.time.ToNanoseconds(), +1 if event.HasField("subtask_started") else -1)
        for trace in traces
        for _, event in trace.received
        if event.HasField("subtask_started") or event.HasField("subtask_completed")
    )
    running = peak = 0
    for _, step in steps:
        running += step
        peak = max(peak, running)
    return peak


async def _stream_once(target: str, pids: list[int], idle: int) -> dict[str, Any]:
    channels = [client_channel(target) for _ in range(SWARMS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 20)
        stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(c) for c in channels]
        stop = asyncio.Event()
        peak = asyncio.create_task(_peak_rss(pids[0], stop))
        cpu_before = [cpu_seconds(pid) for pid in pids]
        client_before = time.process_time()
        started = time.monotonic()
        traces = await asyncio.gather(*(run_swarm(stub, AGENTS, timeout_s=LATENCY_S + 120) for stub in stubs))
        wall = time.monotonic() - started
        cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        client = time.process_time() - client_before
        stop.set()
        peak_rss = await peak
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    failed = [trace.describe() for trace in traces if trace.terminal != "swarm_completed"]
    streams = [Streams.of_swarm(trace, CHUNKS, LATENCY_S) for trace in traces]
    lags = [lag for s in streams for lag in s.chunk_lags()]
    hops = [hop for trace in traces for hop in hop_lags(trace)]
    delivered = sum(s.delivered() for s in streams) if not failed else 0
    delta_times = [t for trace in traces for t, e in trace.received if e.HasField("subtask_delta")]
    events = sum(len(trace.received) for trace in traces)
    return {
        "lag_p50_ms": ms(lags, 50),
        "lag_p99_ms": ms(lags, 99),
        "lag_max_ms": ms(lags, 100),
        "orch_to_client_p50_ms": ms(hops, 50),
        "orch_to_client_p99_ms": ms(hops, 99),
        "delivered_pct": rounded(100 * delivered / SUBTASKS, 2),
        "swarms_failed": failed[:3],
        "streaming_at_once": _at_once(traces),
        "rss_above_idle_mb": rounded((peak_rss - idle) / MB, 1),
        "rss_per_subtask_kb": rounded((peak_rss - idle) / SUBTASKS / 1024, 1),
        "client_events_per_s": rounded(event_rates(delta_times)[0], 0),
        "delta_events": len(delta_times),
        "wall_s": rounded(wall),
        "orchestrator_cpu_pct": rounded(100 * cpu[0] / wall, 1),
        "orchestrator_us_per_event": rounded(1e6 * cpu[0] / events, 1),
        "workers_cpu_pct": rounded(100 * sum(cpu[1:]) / len(cpu[1:]) / wall, 1),
        "client_cpu_pct": rounded(100 * client / wall, 1),
    }


async def _idle_rss(pid: int) -> int:
    await asyncio.sleep(1.0)
    readings = []
    for _ in range(5):
        readings.append(rss_bytes(pid))
        await asyncio.sleep(0.2)
    return min(readings)


def run(ctx: Context) -> dict[str, Any]:
    words, lengths = answer_words(AGENTS, CHUNKS)
    runs: list[dict[str, Any]] = []
    with stack(
        workers=WORKERS,
        max_concurrency=SUBTASKS // WORKERS,
        worker_latency_ms=LATENCY_S * 1000,
        worker_chunks=CHUNKS,
        worker_args=["--sim-answer-words", str(words)],
    ) as services:
        pids = [services.orchestrator.pid, *(w.pid for w in services.workers)]
        idle = asyncio.run(_idle_rss(pids[0]))
        for _ in range(1 if ctx.quick else 2):
            runs.append(asyncio.run(_stream_once(services.target, pids, idle)))
        if ctx.profile_dir is not None:
            with maybe_profile(ctx, "many_streams", services.orchestrator.pid):
                asyncio.run(_stream_once(services.target, pids, idle))
    figures = medians(runs)
    figures["idle_mb"] = rounded(idle / MB, 1)
    figures["answer_chars"] = f"{min(lengths)}-{max(lengths)}"
    figures["runs"] = runs
    return figures
