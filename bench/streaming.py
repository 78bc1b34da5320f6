"""1d. Streaming: 100 agents each streaming 400 chunks at 50 chunks/s; lag from worker to client.

Setup: 2 workers with `--max-concurrency 100`, `--sim-chunks 400`, `--sim-latency-ms 8000` (400
chunks over 8 s = 50 chunks/s per agent, 5,000 chunks/s in all), and `--direct-slots 100` for the
reference; the orchestrator plans and synthesizes with 0 ms latency, and keeps its default delta
window (50 ms). A swarm of 100 agents, followed by this process as its client; 3 runs one after
another on one stack (1 with --quick), every figure the median over the runs, and each run's own
figures kept too. The answers are ~8,000 characters, in 396-400 chunks of ~20 (`bench/chunks.py`).

Lag is defined in `bench/chunks.py`: receive time of the delta carrying a chunk - the time the
worker emitted it by its schedule. p50 and p99 over every chunk of every agent; the target is
p99 <= 100 ms, with the orchestrator under 35% of a core while it streams (CPU seconds over the
swarm, utime + stime from /proc/PID/stat, / its wall time).

To split the lag, the same 100 streams are also run straight from the workers by this process, with
no orchestrator in the path and no delta window (`direct_lag_*`, the schedule starting when the
call is made): the worker plus one hop. And the orchestrator -> client hop is measured on its own
(`orch_to_client_*`: receive time - the event's `time`, which the orchestrator stamps when it
appends the delta, so it leaves out the time a chunk waited for its window). Also: the client's
event rate (subtask_delta events/s, mean and the busiest second), the CPU of each worker and of
this client process, and the orchestrator's CPU per delta event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.chunks import Streams, answer_words, event_rates, hop_lags, medians, ms, plan
from bench.common import (
    IDEA,
    Context,
    SwarmTrace,
    Target,
    client_channel,
    cpu_seconds,
    rounded,
    run_swarm,
    stack,
)
from bench.profiling import maybe_profile
from swarm.v1 import events_pb2, orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc

TITLE = "1d streaming (100 agents x 400 chunks at 50/s)"
AGENTS = 100
CHUNKS = 400
CHUNKS_PER_S = 50
LATENCY_S = CHUNKS / CHUNKS_PER_S
TARGETS = {"lag_p99_ms": Target("<=", 100), "orchestrator_cpu_pct": Target("<=", 35)}
UNITS = {
    "lag_p50_ms": "ms",
    "lag_p99_ms": "ms",
    "direct_lag_p50_ms": "ms",
    "direct_lag_p99_ms": "ms",
    "orch_to_client_p50_ms": "ms",
    "orch_to_client_p99_ms": "ms",
    "client_events_per_s": "events/s",
    "client_events_peak_per_s": "events/s",
    "chunks_per_agent": "chunks",
    "orchestrator_cpu_pct": "% core",
    "orchestrator_us_per_event": "CPU µs",
    "workers_cpu_pct": "% core",
    "client_cpu_pct": "% core",
}


async def _stream_once(target: str, pids: list[int]) -> tuple[SwarmTrace, dict[str, float]]:
    """One swarm of 100 agents (no warm-up swarm: one would cost 8 s; the pool's channels are
    connected before the orchestrator listens). CPU seconds of each pid and of this process over it."""
    async with client_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        cpu_before = [cpu_seconds(pid) for pid in pids]
        client_before = time.process_time()
        started = time.monotonic()
        trace = await run_swarm(stub, AGENTS, timeout_s=LATENCY_S + 60)
        wall = time.monotonic() - started
        cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        return trace, {
            "wall": wall,
            "orchestrator": cpu[0],
            "workers": sum(cpu[1:]) / max(1, len(cpu) - 1),
            "client": time.process_time() - client_before,
        }


async def _direct(workers: list[str]) -> Streams:
    """The reference: the same 100 subtasks called on the workers by this process, with no
    orchestrator. The expected schedule starts when each call is made."""
    streams = Streams(CHUNKS, LATENCY_S)
    subtasks = await plan(IDEA, AGENTS)
    channels = [client_channel(address) for address in workers]
    try:
        stubs = [worker_pb2_grpc.WorkerServiceStub(channel) for channel in channels]

        async def one(index: int, subtask: events_pb2.Subtask) -> None:
            request = worker_pb2.ExecuteSubtaskRequest(
                swarm_id="bench-direct", subtask=subtask, attempt=1, idea=IDEA
            )
            parts: list[str] = []
            streams.started[subtask.id] = time.time()
            call = stubs[index % len(stubs)].ExecuteSubtask(request, timeout=LATENCY_S + 60)
            async for response in call:
                if response.HasField("result"):
                    break
                streams.deltas.append((time.time(), subtask.id, response.text))
                parts.append(response.text)
            streams.outputs[subtask.id] = "".join(parts)

        await asyncio.gather(*(one(i, s) for i, s in enumerate(subtasks)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return streams


def _figures(trace: SwarmTrace, direct: Streams, cpu: dict[str, float]) -> dict[str, Any]:
    """One run's figures."""
    trace.require_completed()
    streams = Streams.of_swarm(trace, CHUNKS, LATENCY_S)
    lags = streams.chunk_lags()
    direct_lags = direct.chunk_lags()
    hops = hop_lags(trace)
    mean_rate, peak_rate = event_rates([t for t, e in trace.received if e.HasField("subtask_delta")])
    counts = streams.chunk_counts()
    wall = cpu["wall"]
    return {
        "lag_p50_ms": ms(lags, 50),
        "lag_p99_ms": ms(lags, 99),
        "direct_lag_p50_ms": ms(direct_lags, 50),
        "direct_lag_p99_ms": ms(direct_lags, 99),
        "orch_to_client_p50_ms": ms(hops, 50),
        "orch_to_client_p99_ms": ms(hops, 99),
        "lag_max_ms": ms(lags, 100),
        "client_events_per_s": rounded(mean_rate, 0),
        "client_events_peak_per_s": rounded(peak_rate, 0),
        "chunks_per_agent": f"{min(counts)}-{max(counts)}",
        "chunks_streamed": len(lags),
        "delta_events": trace.count("subtask_delta"),
        "swarm_wall_s": rounded(wall),
        "orchestrator_cpu_pct": rounded(100 * cpu["orchestrator"] / wall, 1),
        "orchestrator_us_per_event": rounded(1e6 * cpu["orchestrator"] / len(trace.received), 1),
        "workers_cpu_pct": rounded(100 * cpu["workers"] / wall, 1),
        "client_cpu_pct": rounded(100 * cpu["client"] / wall, 1),
    }


def run(ctx: Context) -> dict[str, Any]:
    """3 runs (1 with --quick), each a swarm and then its direct reference, on one stack; every
    number figure is the median over the runs, each run's own figures are kept too."""
    words, lengths = answer_words(AGENTS, CHUNKS)
    runs: list[dict[str, Any]] = []
    with stack(
        workers=2,
        max_concurrency=AGENTS,
        worker_latency_ms=LATENCY_S * 1000,
        worker_chunks=CHUNKS,
        # The reference calls the workers directly, past the orchestrator: it needs their direct slots.
        worker_args=["--direct-slots", str(AGENTS), "--sim-answer-words", str(words)],
    ) as services:
        pids = [services.orchestrator.pid, *(w.pid for w in services.workers)]
        for _ in range(1 if ctx.quick else 3):
            trace, cpu = asyncio.run(_stream_once(services.target, pids))
            direct = asyncio.run(_direct([w.address for w in services.workers]))
            runs.append(_figures(trace, direct, cpu))
        if ctx.profile_dir is not None:
            with maybe_profile(ctx, "streaming", services.orchestrator.pid):
                asyncio.run(_stream_once(services.target, pids))
    figures = medians(runs)
    figures["answer_chars"] = f"{min(lengths)}-{max(lengths)}"
    figures["runs"] = runs
    return figures
