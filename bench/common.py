"""What every benchmark shares: real service processes, a timed RunSwarm client, /proc readings, stats.

Services are started by `swarm_client.stack`, the starter the tests share: the venv's console scripts
on 127.0.0.1 port 0 with `--provider simulated`, ready once they print `listening on HOST:PORT`, and
stopped on the way out (SIGTERM, then SIGKILL). Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc

from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client._resume import EVENTS_PER_MESSAGE, events_in
from swarm_client.stack import Stack
from swarm_client.stack import stack as service_stack

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Each client channel gets its own connection (grpc would otherwise share one between channels).
CLIENT_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
IDEA = "Plan a community bike-share for a mid-sized town"


# ----------------------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    """A figure's target: `op` is `>=` or `<=`."""

    op: Literal[">=", "<="]
    value: float

    def check(self, figure: Any) -> bool | None:
        """True/False for a number, None when the figure is not a number (unavailable, error)."""
        if isinstance(figure, bool) or not isinstance(figure, int | float) or math.isnan(figure):
            return None
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def text(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(slots=True)
class Context:
    """What a benchmark gets: the mode and the figures of the benchmarks that ran before it."""

    quick: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_dir: Path | None = None


# --------------------------------------------------------------------------------------- processes


@contextmanager
def stack(
    *,
    workers: int = 2,
    max_concurrency: int = 16,
    worker_latency_ms: float = 0,
    worker_chunks: int = 8,
    orchestrator_latency_ms: float = 0,
    orchestrator_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """One orchestrator and `workers` workers, all simulated, on 127.0.0.1 with port 0; all stopped
    on exit. The orchestrator's own latency is its planning and synthesis time."""
    quick_stop = ["--shutdown-grace", "1"]
    with service_stack(
        workers,
        worker_args=[
            "--max-concurrency",
            str(max_concurrency),
            "--sim-chunks",
            str(worker_chunks),
            *quick_stop,
            *worker_args,
        ],
        orchestrator_args=[
            "--sim-latency-ms",
            f"{orchestrator_latency_ms:g}",
            *quick_stop,
            *orchestrator_args,
        ],
        sim_latency_ms=worker_latency_ms,
        env=env,
    ) as running:
        yield running


# ------------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat utime + stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size now (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# ----------------------------------------------------------------------------------------- clients


def client_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)


@dataclass
class SwarmTrace:
    """Every event of one RunSwarm call with the client's wall-clock receive time (time.time())."""

    started: float
    received: list[tuple[float, events_pb2.SwarmEvent]] = field(default_factory=list)
    error: str = ""

    def kinds(self, kind: str) -> list[tuple[float, events_pb2.SwarmEvent]]:
        return [(t, e) for t, e in self.received if e.WhichOneof("kind") == kind]

    def first(self, kind: str) -> float:
        for t, event in self.received:
            if event.WhichOneof("kind") == kind:
                return t
        raise LookupError(f"no {kind} event ({self.describe()})")

    def stamped(self, kind: str) -> float:
        """The orchestrator's own time (the event's `time`, epoch seconds) of the first event of `kind`."""
        for _, event in self.received:
            if event.WhichOneof("kind") == kind:
                return event.time.ToNanoseconds() / 1e9
        raise LookupError(f"no {kind} event ({self.describe()})")

    def last(self, kind: str) -> float:
        for t, event in reversed(self.received):
            if event.WhichOneof("kind") == kind:
                return t
        raise LookupError(f"no {kind} event ({self.describe()})")

    def count(self, kind: str) -> int:
        return sum(1 for _, e in self.received if e.WhichOneof("kind") == kind)

    @property
    def terminal(self) -> str:
        if self.received:
            kind = self.received[-1][1].WhichOneof("kind") or ""
            if kind in ("swarm_completed", "swarm_failed", "swarm_cancelled"):
                return kind
        return ""

    def describe(self) -> str:
        if self.error:
            return f"error {self.error}"
        if not self.received:
            return "no events"
        last = self.received[-1][1]
        detail = last.swarm_failed.error if last.HasField("swarm_failed") else ""
        return f"{len(self.received)} events, last {last.WhichOneof('kind')} {detail}".strip()

    def require_completed(self) -> None:
        if self.terminal != "swarm_completed":
            raise RuntimeError(f"the swarm did not complete: {self.describe()}")


async def run_swarm(
    stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub,
    agents: int,
    *,
    timeout_s: float,
    idea: str = IDEA,
    trace: SwarmTrace | None = None,
) -> SwarmTrace:
    """Runs one swarm to its end (bounded by `timeout_s` as the call's deadline) and records every
    event with its receive time. Cancelling the task cancels the call, and with it the swarm."""
    trace = trace or SwarmTrace(started=time.time())
    trace.started = time.time()
    request = orchestrator_pb2.RunSwarmRequest(
        idea=idea, num_agents=agents, max_events_per_message=EVENTS_PER_MESSAGE
    )
    call = stub.RunSwarm(request, timeout=timeout_s)
    received = trace.received
    now = time.time
    try:
        async for response in call:
            at = now()
            received.extend((at, event) for event in events_in(response))
    except grpc.aio.AioRpcError as error:
        trace.error = f"{error.code().name}: {error.details()}"
    finally:
        call.cancel()
    return trace


async def wait_until(predicate: Any, *, timeout_s: float, interval_s: float = 0.02) -> bool:
    """Polls `predicate()` until it is true or `timeout_s` passed; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return bool(predicate())


def rounded(value: float, digits: int = 3) -> float:
    return round(value, digits) if not math.isnan(value) else value
