"""1a. Dispatch throughput: 256 zero-latency simulated subtasks through the whole path.

The path: this process (client) -> RunSwarm -> orchestrator -> ExecuteSubtask on 2 worker processes
-> events back to the client. Every service is simulated with 0 ms latency (planning, subtasks and
synthesis alike) and every worker has `--max-concurrency 256`, so no subtask ever waits for a slot:
what is measured is the cost of moving the work, not the work.

Definition:
    throughput = 256 / (client receive time of the last subtask_completed
                        - the plan_created event's own time)
plan_created's `time` is stamped by the orchestrator as it appends the event, right before it
dispatches the subtasks; the end is when the client holds the last result. (Taking plan_created's
receive time at the client instead would shrink the window whenever the client reads late and
then gets the rest in a burst.) All processes share this machine's wall clock.
Planning and synthesis are outside the window (they are one model call each, not dispatch). Each
subtask streams one chunk (`--sim-chunks 1`), so a subtask is one ExecuteSubtask call carrying one
delta and one result, the closest analogue of the floor's one-message call; the client sees
subtask_started, one subtask_delta and subtask_completed per subtask. The same figure with 8 chunks
per subtask (the default) is reported too, to show the per-event cost, and so is the orchestrator's
CPU time (utime + stime, all its threads) per 1,000 subtasks in each case.

One unmeasured warm-up swarm runs first; the figure is the median of the measured swarms (5, or 2
with --quick), run one after another on the same stack.

The floor (bench/floor.py) is measured back to back with each measured swarm of one chunk: a
window of 1 s (0.5 s with --quick) of bare grpc.aio server-streaming calls of one 32-byte message at
concurrency 64 between two processes, in calls/s, right before the swarm. On a machine shared with
other work, the load moves from one second to the next (windows of one run have ranged from 2,100
to 5,200 calls/s), so each swarm is compared with its own window:
    ratio_to_floor = median over the swarms of (throughput / its floor window)   (target >= 0.8)
and every pair's ratio is kept, to show the spread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import (
    Context,
    Target,
    client_channel,
    cpu_seconds,
    median,
    rounded,
    run_swarm,
    stack,
)
from bench.floor import measure as floor_measure
from bench.floor import start_server
from bench.profiling import maybe_profile
from swarm.v1 import orchestrator_pb2_grpc

PROFILED_SWARMS = 25
TITLE = "1a dispatch throughput (256 subtasks, 0 ms, 2 workers)"
AGENTS = 256
TARGETS = {"ratio_to_floor": Target(">=", 0.8)}
UNITS = {
    "subtasks_per_s": "subtasks/s",
    "floor_calls_per_s": "calls/s",
    "ratio_to_floor": "ratio",
    "subtasks_per_s_8_chunks": "subtasks/s",
    "end_to_end_s": "s",
    "orch_cpu_s_per_1k_subtasks": "CPU s",
    "orch_cpu_s_per_1k_subtasks_8_chunks": "CPU s",
}


async def _throughput(
    target: str, *, runs: int, orchestrator_pid: int, floor: str | None, window_s: float
) -> dict[str, Any]:
    """`runs` measured swarms; with a floor server's address, each right after a floor window."""
    async with client_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        (await run_swarm(stub, AGENTS, timeout_s=60)).require_completed()  # warm-up
        rates: list[float] = []
        floors: list[float] = []
        end_to_end: list[float] = []
        cpu: list[float] = []
        for _ in range(runs):
            if floor is not None:
                floors.append(await floor_measure(floor, concurrency=64, seconds=window_s))
            cpu_before = cpu_seconds(orchestrator_pid)
            trace = await run_swarm(stub, AGENTS, timeout_s=60)
            cpu.append(cpu_seconds(orchestrator_pid) - cpu_before)
            trace.require_completed()
            if trace.count("subtask_completed") != AGENTS:
                raise RuntimeError(
                    f"expected {AGENTS} subtask_completed, got {trace.count('subtask_completed')}"
                )
            window = trace.last("subtask_completed") - trace.stamped("plan_created")
            rates.append(AGENTS / window)
            end_to_end.append(trace.last("swarm_completed") - trace.started)
        return {
            "subtasks_per_s": median(rates),
            "runs_subtasks_per_s": [rounded(r, 1) for r in rates],
            "runs_floor_calls_per_s": [rounded(f, 1) for f in floors],
            "runs_ratio_to_floor": [rounded(r / f) for r, f in zip(rates, floors, strict=True)]
            if floors
            else [],
            "end_to_end_s": median(end_to_end),
            "orch_cpu_s_per_1k_subtasks": median(cpu) * 1000 / AGENTS,
        }


async def _profiled_swarms(target: str, swarms: int) -> None:
    async with client_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for _ in range(swarms):
            (await run_swarm(stub, AGENTS, timeout_s=60)).require_completed()


def _run_on(
    chunks: int, runs: int, ctx: Context, profile_name: str, floor: str | None = None
) -> dict[str, Any]:
    with stack(workers=2, max_concurrency=AGENTS, worker_latency_ms=0, worker_chunks=chunks) as services:
        pid = services.orchestrator.pid
        window_s = 0.5 if ctx.quick else 1.0
        figures = asyncio.run(
            _throughput(services.target, runs=runs, orchestrator_pid=pid, floor=floor, window_s=window_s)
        )
        if ctx.profile_dir is not None:
            # Profiled apart from the measured swarms, so the profiler's cost never touches the figures.
            with maybe_profile(ctx, profile_name, pid):
                asyncio.run(_profiled_swarms(services.target, PROFILED_SWARMS))
        return figures


def run(ctx: Context) -> dict[str, Any]:
    runs = 2 if ctx.quick else 5
    floor_server = start_server()
    try:
        one = _run_on(1, runs, ctx, "dispatch", floor=floor_server.address)
    finally:
        floor_server.stop()
    eight = _run_on(8, runs, ctx, "dispatch_8_chunks")
    return {
        "subtasks_per_s": rounded(one["subtasks_per_s"], 1),
        "floor_calls_per_s": rounded(median(one["runs_floor_calls_per_s"]), 1),
        "ratio_to_floor": rounded(median(one["runs_ratio_to_floor"])),
        "subtasks_per_s_8_chunks": rounded(eight["subtasks_per_s"], 1),
        "end_to_end_s": rounded(one["end_to_end_s"]),
        "orch_cpu_s_per_1k_subtasks": rounded(one["orch_cpu_s_per_1k_subtasks"]),
        "orch_cpu_s_per_1k_subtasks_8_chunks": rounded(eight["orch_cpu_s_per_1k_subtasks"]),
        "runs_ratio_to_floor": one["runs_ratio_to_floor"],
        "runs_subtasks_per_s": one["runs_subtasks_per_s"],
        "runs_floor_calls_per_s": one["runs_floor_calls_per_s"],
        "runs_subtasks_per_s_8_chunks": eight["runs_subtasks_per_s"],
    }
