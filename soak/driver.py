"""The chaos soak: a real stack under continuous load while a driver injects faults at random
moments, then a check of every swarm against the invariants.

The stack: an orchestrator on SQLite and four workers, two on the simulated provider with lognormal
latencies and two on the anthropic provider against the fake Messages API, which answers a share
of requests with 429 or 529. Clients start swarms continuously and record every event of every
stream they read; when a stream breaks they reconnect with WatchSwarm(after_sequence), as any
client should. The faults: a worker SIGKILLed (and started again), SIGSTOPped then SIGCONTed,
restarted; the orchestrator SIGKILLed and started again on the same database; client streams
dropped; swarms cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fakes.messages_api import FakeMessagesAPI
from soak.invariants import TERMINAL, Connection, check_connections, check_replay, kind
from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client.stack import Process, start

FAULT_KINDS = (
    "kill_worker",
    "stop_worker",
    "restart_worker",
    "kill_orchestrator",
    "drop_stream",
    "cancel_swarm",
)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]
API_KEY = "sk-ant-soak-not-a-real-key"
IDEAS = (
    "Plan a neighbourhood tool library",
    "Design an offline-first field survey app",
    "Organise a regional robotics contest",
    "Reduce food waste in a school canteen",
)


@dataclass(frozen=True, slots=True)
class SoakConfig:
    duration_s: float = 600.0
    clients: int = 6
    max_agents: int = 6
    # Seconds between faults, drawn evenly from this range.
    fault_every_s: tuple[float, float] = (1.5, 5.0)
    # Each kind at least this often (the rest are drawn at random).
    min_each_fault: int = 2
    # Time the stack gets, after the faults stop, for every swarm to finish.
    settle_s: float = 90.0
    # The orchestrator's RSS at the end may exceed its idle RSS by at most this much.
    rss_margin_mb: float = 64.0
    seed: int | None = None


@dataclass
class SwarmTrace:
    request_id: str
    # The request is the same on every try: a request_id names one request, whatever the idea.
    idea: str
    agents: int
    detached: bool
    began: float
    swarm_id: str = ""
    connections: list[Connection] = field(default_factory=list)
    ended: float | None = None
    outcome: str = ""
    dropped: int = 0

    @property
    def last_seen(self) -> int:
        for connection in reversed(self.connections):
            if connection.events:
                return connection.events[-1].sequence
        return 0


@dataclass
class SoakReport:
    swarms: dict[str, int]
    faults: dict[str, int]
    violations: list[str]
    swarm_seconds_p50: float
    swarm_seconds_p99: float
    rss_idle_mb: float
    rss_end_mb: float
    duration_s: float
    events_seen: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "swarms": self.swarms,
            "faults": self.faults,
            "violations": self.violations,
            "swarm_seconds": {"p50": self.swarm_seconds_p50, "p99": self.swarm_seconds_p99},
            "orchestrator_rss_mb": {"idle": self.rss_idle_mb, "end": self.rss_end_mb},
            "duration_s": self.duration_s,
            "events_seen": self.events_seen,
        }

    def table(self) -> str:
        lines = [
            "swarms   " + "  ".join(f"{name} {count}" for name, count in self.swarms.items()),
            "faults   " + "  ".join(f"{name} {count}" for name, count in self.faults.items()),
            f"swarm time  p50 {self.swarm_seconds_p50:.2f} s  p99 {self.swarm_seconds_p99:.2f} s",
            f"orchestrator RSS  idle {self.rss_idle_mb:.1f} MB  end {self.rss_end_mb:.1f} MB",
            f"events seen by clients {self.events_seen:,} in {self.duration_s:.0f} s",
            f"invariant violations {len(self.violations)}",
            *(f"  - {violation}" for violation in self.violations[:40]),
        ]
        return "\n".join(lines)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Soak:
    def __init__(self, config: SoakConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.random = random.Random(config.seed)
        self.scratch = Path(tempfile.mkdtemp(prefix="swarm-soak-"))
        self.db = self.scratch / "swarms.db"
        self.fake = FakeMessagesAPI(
            api_key=API_KEY, chunks=6, chunk_delay_s=0.05, fault_rate=0.15, seed=config.seed
        )
        self.workers: list[Process] = []
        self.worker_args: list[list[str]] = []
        self.orchestrator: Process | None = None
        self.orchestrator_args: list[str] = []
        self.traces: list[SwarmTrace] = []
        self.faults: Counter[str] = Counter()
        self.calls: dict[int, tuple[SwarmTrace, Any]] = {}
        self.starting = True
        self.rss_idle = 0.0
        # Processes a fault is still working on (worker indexes, "orchestrator"), and that work.
        self.busy: set[int | str] = set()
        self.background: set[asyncio.Task[None]] = set()

    # ---- the stack ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": self.fake.base_url}

    def start_stack(self) -> None:
        self.fake.start()
        simulated = ["--provider", "simulated", "--sim-latency-ms", "600", "--sim-latency-sigma", "0.6"]
        anthropic = ["--provider", "anthropic"]
        for index, provider in enumerate([simulated, simulated, anthropic, anthropic]):
            args = [
                *provider,
                "--worker-id",
                f"worker-{index}",
                "--max-concurrency",
                "6",
                "--shutdown-grace",
                "2",
            ]
            worker = start(f"worker-{index}", "swarm-worker", args, self._env())
            self.workers.append(worker)
            self.worker_args.append([*args, "--listen", worker.address])
        self.orchestrator_args = [
            "--provider",
            "simulated",
            "--sim-latency-ms",
            "200",
            "--workers",
            ",".join(w.address for w in self.workers),
            "--db",
            str(self.db),
            "--subtask-timeout",
            "20",
            "--no-progress-timeout",
            "3",
            "--no-worker-timeout",
            "60",
            "--shutdown-grace",
            "2",
        ]
        self.orchestrator = start("orchestrator", "swarm-orchestrator", self.orchestrator_args, self._env())
        self.orchestrator_args += ["--listen", self.orchestrator.address]
        time.sleep(1.0)  # the pool's first probes
        self.rss_idle = rss_mb(self.orchestrator.pid)

    def stop_stack(self) -> None:
        for process in [self.orchestrator, *self.workers]:
            if process is not None:
                process.signal(signal.SIGCONT)
                process.stop()
        self.fake.stop()

    @property
    def target(self) -> str:
        assert self.orchestrator is not None
        return self.orchestrator.address

    # ---- clients -----------------------------------------------------------------------------

    async def client(self, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub) -> None:
        while self.starting:
            trace = SwarmTrace(
                request_id=uuid.uuid4().hex,
                idea=self.random.choice(IDEAS),
                agents=self.random.randint(1, self.config.max_agents),
                detached=self.random.random() < 0.5,
                began=time.monotonic(),
            )
            self.traces.append(trace)
            await self.follow(stub, trace)

    async def follow(
        self, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub, trace: SwarmTrace
    ) -> None:
        """Reads the swarm to its terminal event, reconnecting after every break: RunSwarm again
        with the same request_id until the swarm's id is known, WatchSwarm after the last
        sequence seen from then on."""
        give_up = time.monotonic() + self.config.duration_s + self.config.settle_s
        backoff = 0.1
        while trace.ended is None and time.monotonic() < give_up:
            connection = Connection(after=trace.last_seen)
            # Both streams carry a SwarmEvent in `event`; only that is read.
            call: grpc.aio.UnaryStreamCall[Any, Any]
            if trace.swarm_id:
                call = stub.WatchSwarm(
                    orchestrator_pb2.WatchSwarmRequest(
                        swarm_id=trace.swarm_id, after_sequence=connection.after
                    )
                )
            else:
                connection.after = 0
                call = stub.RunSwarm(
                    orchestrator_pb2.RunSwarmRequest(
                        idea=trace.idea,
                        num_agents=trace.agents,
                        detach=trace.detached,
                        request_id=trace.request_id,
                    )
                )
            trace.connections.append(connection)
            key = id(call)
            self.calls[key] = (trace, call)
            try:
                async for response in call:
                    event = response.event
                    connection.events.append(event)
                    trace.swarm_id = event.swarm_id
                    backoff = 0.1
                    if kind(event) in TERMINAL:
                        trace.ended = time.monotonic()
                        trace.outcome = kind(event)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The driver dropped this stream (grpc.aio ends a cancelled call this way).
            except grpc.aio.AioRpcError as error:
                if error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN,
                ):
                    trace.outcome = f"error {error.code().name}: {error.details()}"
                    return
            finally:
                del self.calls[key]
            if trace.ended is None:
                await asyncio.sleep(backoff * (1 + self.random.random()))
                backoff = min(2.0, backoff * 2)

    # ---- faults ------------------------------------------------------------------------------

    def fault_plan(self) -> list[str]:
        """Every kind `min_each_fault` times, shuffled; faults drawn at random follow."""
        plan = [name for name in FAULT_KINDS for _ in range(self.config.min_each_fault)]
        self.random.shuffle(plan)
        return plan

    async def inject(self, name: str, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub) -> bool:
        """Starts the fault; what it leaves to do later (a SIGCONT, a restart) runs on in the
        background. False when it has no target now (every worker busy with another fault)."""
        if name in ("kill_worker", "stop_worker", "restart_worker"):
            idle = [i for i in range(len(self.workers)) if i not in self.busy]
            if not idle:
                return False
            index = self.random.choice(idle)
            self.busy.add(index)
            self.later(self.worker_fault(name, index))
        elif name == "kill_orchestrator":
            if "orchestrator" in self.busy:
                return False
            self.busy.add("orchestrator")
            self.later(self.kill_orchestrator())
        elif name == "drop_stream":
            if not self.calls:
                return False
            trace, call = self.calls[self.random.choice(list(self.calls))]
            trace.dropped += 1
            call.cancel()
        elif name == "cancel_swarm":
            running = [t for t in self.traces if t.swarm_id and t.ended is None]
            if not running:
                return False
            trace = self.random.choice(running)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CancelSwarm(
                    orchestrator_pb2.CancelSwarmRequest(swarm_id=trace.swarm_id, reason="soak"), timeout=10
                )
        self.faults[name] += 1
        return True

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def worker_fault(self, name: str, index: int) -> None:
        worker = self.workers[index]
        try:
            if name == "stop_worker":
                worker.signal(signal.SIGSTOP)
                await asyncio.sleep(self.random.uniform(1.0, 6.0))
                worker.signal(signal.SIGCONT)
                return
            if name == "kill_worker":
                worker.signal(signal.SIGKILL)
                await asyncio.to_thread(worker.popen.wait, 10)
                await asyncio.sleep(self.random.uniform(0.5, 3.0))
            else:
                await asyncio.to_thread(worker.stop)  # SIGTERM: it drains, then exits
            self.workers[index] = await asyncio.to_thread(
                start, f"worker-{index}", "swarm-worker", self.worker_args[index], self._env()
            )
        finally:
            self.busy.discard(index)

    async def kill_orchestrator(self) -> None:
        assert self.orchestrator is not None
        try:
            self.orchestrator.signal(signal.SIGKILL)
            await asyncio.to_thread(self.orchestrator.popen.wait, 10)
            await asyncio.sleep(self.random.uniform(0.3, 2.0))
            self.orchestrator = await asyncio.to_thread(
                start, "orchestrator", "swarm-orchestrator", self.orchestrator_args, self._env()
            )
        finally:
            self.busy.discard("orchestrator")

    async def faults_until(
        self, deadline: float, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub
    ) -> None:
        plan = self.fault_plan()
        low, high = self.config.fault_every_s
        while time.monotonic() < deadline:
            await asyncio.sleep(self.random.uniform(low, high))
            if time.monotonic() >= deadline:
                break
            name = plan[-1] if plan else self.random.choice(FAULT_KINDS)
            if await self.inject(name, stub):
                self.log(f"{time.monotonic() - self.began:6.1f}s  fault {name}")
                if plan:
                    plan.pop()
        await asyncio.gather(*self.background)  # every stopped process runs again

    # ---- the run -----------------------------------------------------------------------------

    async def run(self) -> SoakReport:
        self.began = time.monotonic()
        deadline = self.began + self.config.duration_s
        async with grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
            stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub = (
                orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            )
            clients = [asyncio.create_task(self.client(stub)) for _ in range(self.config.clients)]
            await self.faults_until(deadline, stub)
            self.starting = False
            self.log(f"{time.monotonic() - self.began:6.1f}s  faults stop; waiting for every swarm to end")
            _, pending = await asyncio.wait(clients, timeout=self.config.settle_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return await self.check(stub)

    async def replay(
        self, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub, swarm_id: str
    ) -> list[events_pb2.SwarmEvent]:
        call = stub.WatchSwarm(orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id), timeout=30)
        return [response.event async for response in call]

    async def check(self, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub) -> SoakReport:
        violations: list[str] = []
        outcomes: Counter[str] = Counter()
        seconds: list[float] = []
        seen = 0
        for trace in self.traces:
            if not trace.swarm_id:
                if trace.outcome.startswith("error"):
                    violations.append(f"a RunSwarm was refused: {trace.outcome}")
                continue  # never accepted: the client was stopped before the orchestrator answered
            name = trace.swarm_id[:8]
            seen += sum(len(c.events) for c in trace.connections)
            replay = await self.replay(stub, trace.swarm_id)
            final = kind(replay[-1]) if replay else ""
            if final not in TERMINAL:
                violations.append(f"swarm {name} is unfinished after the faults stopped")
                outcomes["unfinished"] += 1
                continue
            outcomes[final.removeprefix("swarm_")] += 1
            if trace.ended is not None:
                seconds.append(trace.ended - trace.began)
            violations += [f"swarm {name}: {p}" for p in check_replay(replay)]
            violations += [f"swarm {name}: {p}" for p in check_connections(trace.connections, replay)]
        await asyncio.sleep(2.0)  # finished swarms leave memory once stored
        assert self.orchestrator is not None
        rss_end = rss_mb(self.orchestrator.pid)
        if rss_end > self.rss_idle + self.config.rss_margin_mb:
            violations.append(
                f"the orchestrator's RSS ended at {rss_end:.0f} MB, over its idle {self.rss_idle:.0f} MB "
                f"+ {self.config.rss_margin_mb:.0f} MB"
            )
        started = sum(1 for t in self.traces if t.swarm_id)
        return SoakReport(
            swarms={"started": started, **dict(outcomes)},
            faults={name: self.faults[name] for name in FAULT_KINDS},
            violations=violations,
            swarm_seconds_p50=statistics.median(seconds) if seconds else float("nan"),
            swarm_seconds_p99=percentile(seconds, 0.99),
            rss_idle_mb=self.rss_idle,
            rss_end_mb=rss_end,
            duration_s=time.monotonic() - self.began,
            events_seen=seen,
        )


def run_soak(
    config: SoakConfig, *, log: Callable[[str], None] = print, json_path: Path | None = None
) -> SoakReport:
    soak = Soak(config, log)
    try:
        soak.start_stack()
        report = asyncio.run(soak.run())
    finally:
        soak.stop_stack()
    if json_path is not None:
        json_path.write_text(
            json.dumps({"config": _config_dict(config), **report.as_dict()}, indent=2) + "\n"
        )
    return report


def _config_dict(config: SoakConfig) -> dict[str, Any]:
    return {
        "duration_s": config.duration_s,
        "clients": config.clients,
        "max_agents": config.max_agents,
        "fault_every_s": list(config.fault_every_s),
        "seed": config.seed,
        "cpus": os.cpu_count(),
    }
