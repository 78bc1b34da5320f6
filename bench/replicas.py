"""Replicas: swarm throughput on PostgreSQL against SQLite in one run, and takeover after a SIGKILL.

Throughput: two orchestrators side by side, each with two simulated workers at 0 ms latency, one on
a SQLite file, one on a real PostgreSQL server (Debian's, started here, fsync on, as SQLite commits
with synchronous=FULL). Rounds of CONCURRENT swarms of AGENTS subtasks, in pairs alternating
which store goes first, exactly as the store benchmark measures SQLite against memory.

    ratio = median over the pairs of (PostgreSQL swarms/s / SQLite swarms/s)

Takeover: two replicas, A and B, on one database (`--lease-ttl` LEASE_TTL_S) and two workers whose answers
take a while. A swarm starts at replica A, a client watches it through replica B, and once a
subtask has completed A is SIGKILLed. Takeover time = from the SIGKILL to B's watcher receiving
`swarm_resumed`, the first event that B writes (target <= lease TTL + 2 s). A is started again
between rounds, so each round kills a live owner. Run alone: `python -m bench.replicas`.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.bench_store import AGENTS, CONCURRENT, Round, _pairs
from bench.common import Target, median, rounded, stack
from fakes.postgres import PostgresServer
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client.stack import Process, start

TITLE = "replicas: PostgreSQL against SQLite (swarm throughput), takeover after SIGKILL"
LEASE_TTL_S = 5.0
TARGETS = {"ratio": Target(">=", 0.5), "takeover_s_max": Target("<=", LEASE_TTL_S + 2)}
UNITS = {
    "postgres_swarms_per_s": "swarms/s",
    "sqlite_swarms_per_s": "swarms/s",
    "ratio": "ratio",
    "postgres_cpu_ms_per_swarm": "CPU ms",
    "sqlite_cpu_ms_per_swarm": "CPU ms",
    "lease_ttl_s": "s",
    "takeover_s_median": "s",
    "takeover_s_max": "s",
}
PAIRS = 6
TAKEOVERS = 3
SWARM_TIMEOUT_S = 120.0


def _throughput(server: PostgresServer, pairs: int) -> dict[str, Any]:
    url = server.create_database("bench_throughput")
    with (
        tempfile.TemporaryDirectory(prefix="bench-replicas-") as scratch,
        stack(workers=2, max_concurrency=256, orchestrator_args=["--db", url]) as postgres,
        stack(
            workers=2, max_concurrency=256, orchestrator_args=["--db", str(Path(scratch) / "b.db")]
        ) as sqlite,
    ):
        measured = asyncio.run(_pairs({"postgres": postgres, "sqlite": sqlite}, pairs))

    def per_s(runs: list[Round]) -> float:
        return median([CONCURRENT / r.seconds for r in runs])

    def cpu_ms(runs: list[Round]) -> float:
        return 1000 * sum(r.cpu_s for r in runs) / (CONCURRENT * len(runs))

    postgres_runs, sqlite_runs = measured["postgres"], measured["sqlite"]
    return {
        "postgres_swarms_per_s": rounded(per_s(postgres_runs), 2),
        "sqlite_swarms_per_s": rounded(per_s(sqlite_runs), 2),
        "ratio": rounded(
            median([s.seconds / p.seconds for p, s in zip(postgres_runs, sqlite_runs, strict=True)])
        ),
        "postgres_cpu_ms_per_swarm": rounded(cpu_ms(postgres_runs), 1),
        "sqlite_cpu_ms_per_swarm": rounded(cpu_ms(sqlite_runs), 1),
        "runs_pair_ratio": [
            rounded(s.seconds / p.seconds) for p, s in zip(postgres_runs, sqlite_runs, strict=True)
        ],
        "runs_postgres_s": [rounded(r.seconds, 2) for r in postgres_runs],
        "runs_sqlite_s": [rounded(r.seconds, 2) for r in sqlite_runs],
    }


async def _takeover(owner: Process, watcher_target: str) -> float:
    """Starts a swarm at `owner`, SIGKILLs it mid-swarm, and returns the seconds until the replica
    at `watcher_target` is seen to resume it. Returns once the swarm has ended there, so that the
    next round's swarm finds the workers free: the replica that took over counts itself alone
    until it sees the next owner, and the two would share the workers' slots."""
    async with (
        grpc.aio.insecure_channel(owner.address) as to_owner,
        grpc.aio.insecure_channel(watcher_target) as to_watcher,
    ):
        call = orchestrator_pb2_grpc.OrchestratorServiceStub(to_owner).RunSwarm(
            orchestrator_pb2.RunSwarmRequest(idea="Open a repair café", num_agents=AGENTS // 2, detach=True)
        )
        first = await call.read()
        swarm_id = first.event.swarm_id  # type: ignore[union-attr]
        call.cancel()
        watch = orchestrator_pb2_grpc.OrchestratorServiceStub(to_watcher).WatchSwarm(
            orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id), timeout=SWARM_TIMEOUT_S
        )
        killed = 0.0
        took: float | None = None
        async for response in watch:
            kind = response.event.WhichOneof("kind")
            if kind == "subtask_completed" and not killed:
                owner.signal(signal.SIGKILL)
                killed = time.monotonic()
            elif kind == "swarm_resumed" and killed and took is None:
                took = time.monotonic() - killed
            elif kind in ("swarm_completed", "swarm_failed", "swarm_cancelled"):
                if took is None:
                    raise RuntimeError(f"swarm {swarm_id} ended ({kind}) without a takeover")
                if kind != "swarm_completed":
                    raise RuntimeError(f"swarm {swarm_id} was taken over but ended {kind}")
                return took
        raise RuntimeError(f"the watch of swarm {swarm_id} ended before the swarm did")


def _takeovers(server: PostgresServer, rounds: int) -> dict[str, Any]:
    url = server.create_database("bench_takeover")
    replica_args = ["--db", url, "--lease-ttl", f"{LEASE_TTL_S:g}"]
    with stack(
        workers=2, max_concurrency=2, worker_latency_ms=1000, orchestrator_args=replica_args
    ) as running:
        seconds: list[float] = []
        for _ in range(rounds):
            owner = start("orchestrator-a", "swarm-orchestrator", running.orchestrator_args)
            try:
                seconds.append(asyncio.run(_takeover(owner, running.target)))
            finally:
                owner.stop()
    return {
        "lease_ttl_s": LEASE_TTL_S,
        "takeover_s_median": rounded(median(seconds), 2),
        "takeover_s_max": rounded(max(seconds), 2),
        "runs_takeover_s": [rounded(s, 2) for s in seconds],
    }


def main(pairs: int = PAIRS, takeovers: int = TAKEOVERS) -> dict[str, Any]:
    with PostgresServer(fsync=True) as server:
        figures = {**_throughput(server, pairs), **_takeovers(server, takeovers)}
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}  {UNITS.get(name, '')}")
    for name, target in TARGETS.items():
        verdict = "meets" if target.check(figures[name]) else "MISSES"
        print(f"{name} {figures[name]} {verdict} the target {target.text()}")
    return figures


if __name__ == "__main__":
    main()
