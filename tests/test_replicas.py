"""Several orchestrators on one PostgreSQL database: real processes, a real server, real faults.

The owner of a running swarm is SIGKILLed, SIGSTOPped, cut off from the database, or the database
restarts, while clients watch through another replica. Each time the swarm completes (at another
replica when its owner is gone), and the soak's invariants hold of what every client saw and of
the stored log: one terminal event, no gap, no duplicate, no subtask done twice, and the plan made
once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import grpc
import pytest
from tcp_proxy import TcpProxy

from fakes.postgres import PostgresServer
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


@dataclass
class Replicas:
    stack: Stack
    b: Process

    @property
    def a(self) -> Process:
        return self.stack.orchestrator


@contextmanager
def replicas(url: str, *, a_url: str | None = None) -> Iterator[Replicas]:
    """Two orchestrators on the database at `url` (A on `a_url`, when given: a proxy to it) and two
    simulated workers that they share."""
    args = ["--db", url, "--lease-ttl", f"{LEASE_TTL_S:g}"]
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


async def start_detached(target: str, *, request_id: str = "") -> str:
    async with stub(target) as orchestrator:
        call = orchestrator.RunSwarm(
            orchestrator_pb2.RunSwarmRequest(
                idea="Open a repair café", num_agents=AGENTS, detach=True, request_id=request_id
            )
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


async def test_a_swarm_whose_owner_is_killed_completes_at_another_replica(postgres_url: str) -> None:
    with replicas(postgres_url) as running:
        swarm_id = await start_detached(running.a.address)
        watchers = [Watcher(running.b.address, swarm_id), Watcher(running.b.address, swarm_id)]
        await watchers[0].wait_for("subtask_completed")
        running.a.signal(signal.SIGKILL)
        killed = time.monotonic()
        replay_seen = await watchers[0].finished()
        await watchers[1].finished()
        assert kinds(replay_seen)[-1] == "swarm_completed"
        resumed = [e for e in replay_seen if e.HasField("swarm_resumed")]
        assert len(resumed) == 1 and resumed[0].swarm_resumed.completed_subtasks
        assert taken_over_by(running.b, swarm_id)
        assert time.monotonic() - killed < SWARM_TIMEOUT_S
        assert_invariants(watchers, await stored_events(running.b.address, swarm_id))


async def test_an_owner_stopped_and_continued_writes_nothing_after_its_lease_is_taken(
    postgres_url: str,
) -> None:
    with replicas(postgres_url) as running:
        swarm_id = await start_detached(running.a.address)
        watcher = Watcher(running.b.address, swarm_id)
        await watcher.wait_for("subtask_started")
        running.a.signal(signal.SIGSTOP)
        try:
            await watcher.wait_for("swarm_resumed")
        finally:
            running.a.signal(signal.SIGCONT)
        await watcher.finished()
        # The old owner comes back with its swarm half run: its writes are refused, it stops the
        # swarm, and it goes on serving, now from the database.
        await said(running.a, "handed over", swarm_id)
        async with stub(running.a.address) as orchestrator:
            view = (await orchestrator.GetSwarm(orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id))).swarm
        assert view.state == S.SWARM_STATE_COMPLETED
        assert running.a.popen.poll() is None
        replay = await stored_events(running.a.address, swarm_id)
        assert_invariants([watcher], replay)
        assert kinds(replay).count("swarm_resumed") == 1


async def test_an_owner_cut_off_from_the_database_loses_its_swarm_to_another(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    with (
        TcpProxy(f"127.0.0.1:{postgres_server.port}") as proxy,
        replicas(
            postgres_url, a_url=postgres_server.url(database, port=int(proxy.address.split(":")[1]))
        ) as running,
    ):
        swarm_id = await start_detached(running.a.address)
        watchers = [Watcher(running.a.address, swarm_id), Watcher(running.b.address, swarm_id)]
        await watchers[1].wait_for("subtask_completed")
        proxy.cut(refuse=True)
        try:
            await watchers[1].wait_for("swarm_resumed")
        finally:
            proxy.heal()
        await watchers[1].finished()
        replay = await stored_events(running.b.address, swarm_id)
        assert taken_over_by(running.b, swarm_id)
        assert running.a.popen.poll() is None, "the replica cut off stopped its swarm, not itself"
        await watchers[0].finished()
        assert_invariants(watchers, replay)


async def test_a_database_restart_mid_swarm_loses_and_repeats_nothing(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    with replicas(postgres_url) as running:
        swarm_id = await start_detached(running.a.address)
        watchers = [Watcher(running.a.address, swarm_id), Watcher(running.b.address, swarm_id)]
        await watchers[1].wait_for("subtask_started", 2)
        postgres_server.restart()
        for watcher in watchers:
            await watcher.finished()
        assert running.a.popen.poll() is None and running.b.popen.poll() is None
        assert_invariants(watchers, await stored_events(running.b.address, swarm_id))


async def test_any_replica_serves_a_swarm_running_at_another(postgres_url: str) -> None:
    with replicas(postgres_url) as running:
        swarm_id = await start_detached(running.a.address)
        async with stub(running.b.address) as b:
            view = (await b.GetSwarm(orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id))).swarm
            assert view.swarm_id == swarm_id and not view.HasField("end_time")
            listed = (await b.ListSwarms(orchestrator_pb2.ListSwarmsRequest())).swarms
            assert [s.swarm_id for s in listed] == [swarm_id]
            watcher = Watcher(running.a.address, swarm_id)
            await watcher.wait_for("plan_created")
            cancelled = await b.CancelSwarm(
                orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id, reason="enough")
            )
            assert cancelled.swarm.state == S.SWARM_STATE_CANCELLED
            assert cancelled.swarm.error == "enough"
        events = await watcher.finished()
        assert kinds(events)[-1] == "swarm_cancelled" and events[-1].swarm_cancelled.reason == "enough"
        assert not taken_over_by(running.b, swarm_id), "the owner cancelled it, not a takeover"


async def test_replicas_sharing_workers_keep_together_within_each_workers_capacity(postgres_url: str) -> None:
    with replicas(postgres_url) as running:
        for process in (running.a, running.b):
            await said(process, "shared by 2 orchestrator(s)")
        swarms = [await start_detached(target) for target in [running.a.address, running.b.address] * 2]
        watchers = [Watcher(running.b.address, swarm_id) for swarm_id in swarms]
        for watcher in watchers:
            events = await watcher.finished()
            assert_completed(events, AGENTS)
            # No worker was asked for more than it has, so none refused (worker_busy) an attempt.
            assert "subtask_failed" not in kinds(events)


async def test_two_replicas_given_one_request_at_once_start_one_swarm(postgres_url: str) -> None:
    with replicas(postgres_url) as running:
        for attempt in range(3):
            request_id = f"same-request-{attempt}"
            started = await asyncio.gather(
                *(
                    start_detached(target, request_id=request_id)
                    for target in [running.a.address, running.b.address] * 2
                )
            )
            assert len(set(started)) == 1, started
        async with stub(running.a.address) as orchestrator:
            listed = (await orchestrator.ListSwarms(orchestrator_pb2.ListSwarmsRequest())).swarms
        assert len(listed) == 3


def test_the_database_password_is_never_shown(postgres_server: PostgresServer, postgres_url: str) -> None:
    wrong = postgres_url.replace(postgres_server.password, "not-the-password-at-all")
    with pytest.raises(Exception, match="did not start listening") as refused:
        start("orchestrator", "swarm-orchestrator", ["--db", wrong], timeout=20)
    said = str(refused.value)
    assert "password authentication failed" in said and "not-the-password-at-all" not in said
    assert "postgresql://swarm:***@127.0.0.1" in said
    with replicas(postgres_url) as running:
        asyncio.run(start_detached(running.a.address))
        for process in (running.a, running.b):
            assert postgres_server.password not in process.output()
