"""Two orchestrator replicas on one PostgreSQL database with two shared workers, and a client's
view of them: a watcher that reconnects as a client should, and the soak's invariants over what
every watcher saw. The replica tests share it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import grpc

from soak.invariants import Connection, check_connections, check_replay
from stack import Process, Stack, stack, start
from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from swarm_checks import TERMINAL, assert_completed, kinds

S = orchestrator_pb2.SwarmState
LEASE_TTL_S = 3.0
AGENTS = 6
# Long enough answers that a swarm is mid-way when the fault comes, short enough for a quick test.
SIM_LATENCY_MS = 700
# Each worker takes two subtasks at once, so the subtasks run in waves.
WORKER_ARGS = ["--max-concurrency", "2"]
SWARM_TIMEOUT_S = 60.0
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Replicas:
    stack: Stack
    b: Process

    @property
    def a(self) -> Process:
        return self.stack.orchestrator


@contextmanager
def replicas(
    url: str, *, a_url: str | None = None, lease_ttl_s: float = LEASE_TTL_S, args: Sequence[str] = ()
) -> Iterator[Replicas]:
    """Two orchestrators on the database at `url` (A on `a_url`, when given: a proxy to it), both
    also given `args`, and two simulated workers that they share."""
    args = ["--db", url, "--lease-ttl", f"{lease_ttl_s:g}", *args]
    with stack(
        workers=2,
        worker_args=WORKER_ARGS,
        orchestrator_args=[*args, *(["--db", a_url] if a_url else [])],
        sim_latency_ms=SIM_LATENCY_MS,
    ) as running:
        b = start("orchestrator-b", "swarm-orchestrator", [*running.orchestrator_args, "--db", url])
        try:
            yield Replicas(running, b)
        finally:
            b.stop()


@asynccontextmanager
async def stub(target: str) -> AsyncIterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


async def start_detached(target: str, *, request_id: str = "", metadata: Metadata = ()) -> str:
    async with stub(target) as orchestrator:
        call = orchestrator.RunSwarm(
            orchestrator_pb2.RunSwarmRequest(
                idea="Open a repair café", num_agents=AGENTS, detach=True, request_id=request_id
            ),
            metadata=metadata,
        )
        first = await call.read()
        call.cancel()
        assert not isinstance(first, type(grpc.aio.EOF))
        return str(first.event.swarm_id)


class Watcher:
    """Reads a swarm through one orchestrator, from the start, as a client that reconnects after a
    broken stream with WatchSwarm(after_sequence) would; every stream is kept for the invariants."""

    def __init__(self, target: str, swarm_id: str) -> None:
        self.target = target
        self.swarm_id = swarm_id
        self.connections: list[Connection] = []
        self.seen = asyncio.Event()  # set at each event
        self.task = asyncio.create_task(self._read())

    @property
    def events(self) -> list[events_pb2.SwarmEvent]:
        return [event for connection in self.connections for event in connection.events]

    async def _read(self) -> None:
        deadline = time.monotonic() + SWARM_TIMEOUT_S
        async with stub(self.target) as orchestrator:
            while time.monotonic() < deadline:
                after = self.events[-1].sequence if self.events else 0
                connection = Connection(after)
                self.connections.append(connection)
                try:
                    request = orchestrator_pb2.WatchSwarmRequest(swarm_id=self.swarm_id, after_sequence=after)
                    async for response in orchestrator.WatchSwarm(request, timeout=SWARM_TIMEOUT_S):
                        connection.events.append(response.event)
                        self.seen.set()
                        if kinds([response.event])[0] in TERMINAL:
                            return
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    await asyncio.sleep(0.2)

    async def wait_for(self, kind: str, count: int = 1) -> None:
        async with asyncio.timeout(SWARM_TIMEOUT_S):
            while kinds(self.events).count(kind) < count:
                self.seen.clear()
                await self.seen.wait()

    async def finished(self) -> list[events_pb2.SwarmEvent]:
        await asyncio.wait_for(self.task, SWARM_TIMEOUT_S)
        return self.events


async def stored_events(target: str, swarm_id: str) -> list[events_pb2.SwarmEvent]:
    async with stub(target) as orchestrator:
        request = orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id)
        return [response.event async for response in orchestrator.WatchSwarm(request, timeout=10)]


def assert_invariants(watchers: list[Watcher], replay: list[events_pb2.SwarmEvent]) -> None:
    """The soak's invariants, and that a resumed swarm ran no completed subtask again."""
    problems = check_replay(replay) + check_connections(
        [connection for watcher in watchers for connection in watcher.connections], replay
    )
    assert not problems, problems
    assert_completed(replay, AGENTS)
    done: set[str] = set()
    for event in replay:
        if event.HasField("subtask_completed"):
            done.add(event.subtask_completed.subtask_id)
        elif event.HasField("subtask_started"):
            assert event.subtask_started.subtask_id not in done, "a completed subtask ran again"
        elif event.HasField("swarm_resumed"):
            assert set(event.swarm_resumed.completed_subtasks) == done


async def said(process: Process, *words: str, within_s: float = 10.0) -> None:
    """Waits until the process has logged a line holding all of `words`."""
    deadline = time.monotonic() + within_s
    while not any(all(word in line for word in words) for line in process.lines):
        assert time.monotonic() < deadline, f"{process.name} never said {words}"
        await asyncio.sleep(0.1)


def taken_over_by(process: Process, swarm_id: str) -> bool:
    return any(swarm_id in line and "swarm resumed" in line for line in process.lines)
