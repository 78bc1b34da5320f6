"""1i. Fan-out: the orchestrator's CPU for a streaming swarm watched by ten clients, against the
same swarm watched by one.

Setup: 2 workers with `--max-concurrency 100`, answers of 200 chunks at 50 chunks/s (4 s, ~4,000
characters, `bench/chunks.py`); the orchestrator plans and synthesizes with 0 ms latency and keeps
its default delta window. A swarm of 100 agents, started by this process with RunSwarm: that call
is the one watcher. With ten, nine more clients, each on a channel of its own (its own
connection), call WatchSwarm from the start as soon as the swarm is accepted, and read every event
to the end, asking for up to 64 events a message as the Python client does
(`max_events_per_message`).

    cpu_one, cpu_ten  the orchestrator's CPU seconds (utime + stime, /proc/PID/stat) from the
                      RunSwarm call to the end of the last watcher's stream
    ratio             cpu_ten / cpu_one                                  (target <= 1.5)
    us_per_watcher_event  (cpu_ten - cpu_one) / (9 x the swarm's events): what one more watcher
                      costs per event it is sent

Runs alternate, one watcher then ten, back to back on one stack: 3 pairs (1 with --quick); the
ratio is that of the medians, and every pair's own ratio is kept too. Every watcher must get every
event of the swarm.

What a watcher costs at the least, in the same run: a bare grpc.aio server (`bench/floor.py`)
streaming 100-byte events to ten clients at once, one event to a message and then ten
(`raw_us_per_event_1`, `raw_us_per_event_10`: its CPU µs per event per watcher).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.chunks import answer_words
from bench.common import (
    Context,
    SwarmTrace,
    Target,
    client_channel,
    cpu_seconds,
    median,
    rounded,
    run_swarm,
    stack,
    wait_until,
)
from bench.floor import events_cost, start_server
from bench.profiling import maybe_profile
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client._resume import EVENTS_PER_MESSAGE, events_in

TITLE = "1i watchers (one swarm of 100 streaming agents, 10 watchers vs 1)"
AGENTS = 100
CHUNKS = 200
CHUNKS_PER_S = 50
LATENCY_S = CHUNKS / CHUNKS_PER_S
WATCHERS = 10
TARGETS = {"ratio": Target("<=", 1.5)}
UNITS = {
    "cpu_one_s": "CPU s",
    "cpu_ten_s": "CPU s",
    "ratio": "ratio",
    "us_per_event_one": "CPU µs",
    "us_per_watcher_event": "CPU µs",
    "events_per_swarm": "events",
    "raw_us_per_event_1": "CPU µs",
    "raw_us_per_event_10": "CPU µs",
}
RAW_EVENTS = 20_000


async def _watch(target: str, swarm_id: str) -> int:
    """Every event of the swarm from the first, as the Python client asks for them; how many."""
    async with client_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.WatchSwarmRequest(
            swarm_id=swarm_id, max_events_per_message=EVENTS_PER_MESSAGE
        )
        return sum([len(events_in(response)) async for response in stub.WatchSwarm(request, timeout=120)])


async def _swarm(target: str, pid: int, watchers: int) -> tuple[float, int]:
    """One swarm followed by `watchers` clients: the orchestrator's CPU seconds, and its events."""
    async with client_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        trace = SwarmTrace(started=time.time())
        before = cpu_seconds(pid)
        run = asyncio.create_task(run_swarm(stub, AGENTS, timeout_s=LATENCY_S + 60, trace=trace))
        others: list[asyncio.Task[int]] = []
        if watchers > 1:
            if not await wait_until(
                lambda: bool(trace.received) or run.done(), timeout_s=30, interval_s=0.002
            ):
                raise RuntimeError("the swarm sent no event within 30 s")
            swarm_id = trace.received[0][1].swarm_id
            others = [asyncio.create_task(_watch(target, swarm_id)) for _ in range(watchers - 1)]
        await run
        counts = await asyncio.gather(*others)
        cpu = cpu_seconds(pid) - before
    trace.require_completed()
    events = len(trace.received)
    if any(count != events for count in counts):
        raise RuntimeError(f"a watcher missed events: it got {counts}, of {events}")
    return cpu, events


def run(ctx: Context) -> dict[str, Any]:
    words, _ = answer_words(AGENTS, CHUNKS)
    one: list[float] = []
    ten: list[float] = []
    events: list[int] = []
    with stack(
        workers=2,
        max_concurrency=AGENTS,
        worker_latency_ms=LATENCY_S * 1000,
        worker_chunks=CHUNKS,
        worker_args=["--sim-answer-words", str(words)],
    ) as services:
        pid = services.orchestrator.pid
        for _ in range(1 if ctx.quick else 3):
            for watchers, cpus in ((1, one), (WATCHERS, ten)):
                cpu, count = asyncio.run(_swarm(services.target, pid, watchers))
                cpus.append(cpu)
                events.append(count)
        if ctx.profile_dir is not None:
            with maybe_profile(ctx, "watchers", pid):
                asyncio.run(_swarm(services.target, pid, WATCHERS))
    raw = start_server()
    try:
        per_message = {
            count: asyncio.run(
                events_cost(raw.address, raw.pid, watchers=WATCHERS, events=RAW_EVENTS, per_message=count)
            )
            for count in (1, 10)
        }
    finally:
        raw.stop()
    cpu_one, cpu_ten, per_swarm = median(one), median(ten), median(events)
    return {
        "cpu_one_s": rounded(cpu_one),
        "cpu_ten_s": rounded(cpu_ten),
        "ratio": rounded(cpu_ten / cpu_one),
        "us_per_event_one": rounded(1e6 * cpu_one / per_swarm, 1),
        "us_per_watcher_event": rounded(1e6 * (cpu_ten - cpu_one) / ((WATCHERS - 1) * per_swarm), 1),
        "events_per_swarm": per_swarm,
        "raw_us_per_event_1": rounded(per_message[1], 1),
        "raw_us_per_event_10": rounded(per_message[10], 1),
        "runs_ratio": [rounded(b / a) for a, b in zip(one, ten, strict=True)],
        "runs_cpu_one_s": [rounded(c) for c in one],
        "runs_cpu_ten_s": [rounded(c) for c in ten],
    }
