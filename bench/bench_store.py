"""Store: swarm throughput with the SQLite store against the in-memory store, in one run.

Two orchestrators run side by side, each with two simulated workers at 0 ms latency: one keeps its
swarms in a new SQLite file (`--db`, WAL, synchronous=FULL, group commit), the other in memory
(`--db :memory:`). A round starts CONCURRENT swarms of AGENTS subtasks at once through RunSwarm
(8 chunks a subtask, about 170 events a swarm) and ends when the last of them has sent its terminal
event. Rounds come in pairs, one on each orchestrator, back to back and in alternating order, so
that the load of a shared machine weighs on both halves of a pair alike.

    swarms_per_s (each store) = swarms in a round / the round's wall time, median of the rounds
    ratio = median over the pairs of (SQLite swarms/s / in-memory swarms/s)   (target >= 0.8)
    cpu_ratio = in-memory / SQLite orchestrator CPU seconds per swarm (/proc), a check on the
                ratio that the machine's load hardly moves

Also measured, in this process and without gRPC: the stores' own append rates, events/s through
the EventLogs of 64 swarms appending at once, and the SQLite group-commit factor (events per
commit). Run alone: `python -m bench.bench_store`; `python -m bench` includes it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Stack, Target, client_channel, cpu_seconds, median, rounded, run_swarm, stack
from orchestrator_service.event_log import EventLog
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import MEMORY, MemoryStore, SqliteStore, Store
from swarm.v1 import events_pb2, orchestrator_pb2_grpc

TITLE = "store: SQLite against in-memory (swarm throughput)"
TARGETS = {"ratio": Target(">=", 0.8)}
UNITS = {
    "sqlite_swarms_per_s": "swarms/s",
    "memory_swarms_per_s": "swarms/s",
    "ratio": "ratio",
    "sqlite_cpu_ms_per_swarm": "CPU ms",
    "memory_cpu_ms_per_swarm": "CPU ms",
    "cpu_ratio": "ratio",
    "sqlite_events_per_s": "events/s",
    "sqlite_append_events_per_s": "events/s",
    "memory_append_events_per_s": "events/s",
    "events_per_commit": "events",
    "db_bytes_per_event": "bytes",
}
AGENTS = 16
CONCURRENT = 16
PAIRS = 8
APPEND_SWARMS = 64
APPEND_EVENTS = 200


@dataclass(frozen=True, slots=True)
class Round:
    seconds: float
    events: int
    cpu_s: float  # the orchestrator's


async def _round(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, pid: int) -> Round:
    """CONCURRENT swarms at once, to the last terminal event."""
    cpu = cpu_seconds(pid)
    began = time.perf_counter()
    traces = await asyncio.gather(*(run_swarm(stub, AGENTS, timeout_s=120) for _ in range(CONCURRENT)))
    elapsed = time.perf_counter() - began
    for trace in traces:
        trace.require_completed()
    return Round(elapsed, sum(len(trace.received) for trace in traces), cpu_seconds(pid) - cpu)


async def _pairs(services: dict[str, Stack], pairs: int) -> dict[str, list[Round]]:
    channels = {name: client_channel(running.target) for name, running in services.items()}
    try:
        stubs = {name: orchestrator_pb2_grpc.OrchestratorServiceStub(c) for name, c in channels.items()}
        for channel in channels.values():
            await asyncio.wait_for(channel.channel_ready(), 10)
        pids = {name: running.orchestrator.pid for name, running in services.items()}
        for name, stub in stubs.items():  # warm-up, not measured
            await _round(stub, pids[name])
        measured: dict[str, list[Round]] = {name: [] for name in services}
        names = list(services)
        for pair in range(pairs):
            for name in names if pair % 2 == 0 else names[::-1]:
                measured[name].append(await _round(stubs[name], pids[name]))
        return measured
    finally:
        for channel in channels.values():
            await channel.close()


def _swarm_throughput(pairs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        db = Path(scratch) / "bench.db"
        with (
            stack(workers=2, max_concurrency=256, orchestrator_args=["--db", str(db)]) as sqlite,
            stack(workers=2, max_concurrency=256, orchestrator_args=["--db", MEMORY]) as memory,
        ):
            measured = asyncio.run(_pairs({"sqlite": sqlite, "memory": memory}, pairs))
        # The orchestrator has stopped: its WAL is checkpointed into the file and removed.
        stored_bytes = sum(path.stat().st_size for path in Path(scratch).glob("bench.db*"))
    sqlite_runs, memory_runs = measured["sqlite"], measured["memory"]
    cpu_ms = {
        name: 1000 * sum(r.cpu_s for r in runs) / (CONCURRENT * len(runs)) for name, runs in measured.items()
    }
    return {
        "sqlite_swarms_per_s": rounded(median([CONCURRENT / r.seconds for r in sqlite_runs]), 2),
        "memory_swarms_per_s": rounded(median([CONCURRENT / r.seconds for r in memory_runs]), 2),
        "ratio": rounded(
            median([m.seconds / s.seconds for s, m in zip(sqlite_runs, memory_runs, strict=True)])
        ),
        "sqlite_cpu_ms_per_swarm": rounded(cpu_ms["sqlite"], 1),
        "memory_cpu_ms_per_swarm": rounded(cpu_ms["memory"], 1),
        "cpu_ratio": rounded(cpu_ms["memory"] / cpu_ms["sqlite"]),
        "sqlite_events_per_s": rounded(median([r.events / r.seconds for r in sqlite_runs]), 0),
        # Every stored event counts, the warm-up round's too.
        "db_bytes_per_event": rounded(
            stored_bytes / (sum(r.events for r in sqlite_runs) * (pairs + 1) / pairs), 0
        ),
        "runs_pair_ratio": [
            rounded(m.seconds / s.seconds) for s, m in zip(sqlite_runs, memory_runs, strict=True)
        ],
        "runs_sqlite_swarms_per_s": [rounded(CONCURRENT / r.seconds, 2) for r in sqlite_runs],
        "runs_memory_swarms_per_s": [rounded(CONCURRENT / r.seconds, 2) for r in memory_runs],
    }


async def _append_rate(store: Store) -> float:
    """Events/s into `store` through the EventLogs of APPEND_SWARMS swarms appending at once, until
    every event is durable."""
    logs = [EventLog(SwarmRecord(f"swarm-{i}"), store) for i in range(APPEND_SWARMS)]
    for log in logs:
        log.append("accepted", events_pb2.SwarmAccepted(idea="bench", num_agents=1))
    await asyncio.gather(*(log.stored() for log in logs))
    began = time.perf_counter()
    for index in range(APPEND_EVENTS):
        for log in logs:
            log.append("synthesis_delta", events_pb2.SynthesisDelta(text=f"chunk {index} " * 4, attempt=1))
        await asyncio.sleep(0)  # as swarms do between chunks: the stores' writes overlap the appends
    await asyncio.gather(*(log.stored() for log in logs))
    return APPEND_SWARMS * APPEND_EVENTS / (time.perf_counter() - began)


async def _append_rates() -> dict[str, Any]:
    memory_rate = await _append_rate(MemoryStore())
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        sqlite = await SqliteStore.open(str(Path(scratch) / "append.db"))
        try:
            sqlite_rate = await _append_rate(sqlite)
            events = APPEND_SWARMS * (APPEND_EVENTS + 1)
            per_commit = events / sqlite.stats.commits
        finally:
            await sqlite.close()
    return {
        "sqlite_append_events_per_s": rounded(sqlite_rate, 0),
        "memory_append_events_per_s": rounded(memory_rate, 0),
        "events_per_commit": rounded(per_commit, 1),
    }


def main(pairs: int = PAIRS) -> dict[str, Any]:
    figures = {**_swarm_throughput(pairs), **asyncio.run(_append_rates())}
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}  {UNITS.get(name, '')}")
    verdict = "meets" if figures["ratio"] >= TARGETS["ratio"].value else "MISSES"
    print(f"ratio {figures['ratio']} {verdict} the target {TARGETS['ratio'].text()}")
    return figures


if __name__ == "__main__":
    main()
