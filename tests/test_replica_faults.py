"""Orchestrator replicas on one PostgreSQL database under real faults: the owner of a running swarm
is SIGKILLed, SIGSTOPped, or cut off from the database, or the database restarts, while clients
watch through another replica. Each time the swarm completes (at another replica when its owner is
gone), and the soak's invariants hold of what every client saw and of the stored log: one
terminal event, no gap, no duplicate, no subtask done twice, and the plan made once.
"""

from __future__ import annotations

import signal
import time

from tcp_proxy import TcpProxy

from fakes.postgres import PostgresServer
from replica_stack import (
    SWARM_TIMEOUT_S,
    S,
    Watcher,
    assert_invariants,
    replicas,
    said,
    start_detached,
    stored_events,
    stub,
    taken_over_by,
)
from swarm.v1 import orchestrator_pb2
from swarm_checks import kinds


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


async def test_an_owner_stopped_with_sigterm_hands_its_swarm_over_at_once(postgres_url: str) -> None:
    # A lease this long would hold the swarm for half a minute: only its release lets B go on sooner.
    lease_ttl_s = 30.0
    # No grace: A stops its running swarm at once, unfinished, for another replica to resume.
    with replicas(postgres_url, lease_ttl_s=lease_ttl_s, args=["--shutdown-grace", "0"]) as running:
        swarm_id = await start_detached(running.a.address)
        watcher = Watcher(running.b.address, swarm_id)
        await watcher.wait_for("subtask_started")
        stopped = time.monotonic()
        running.a.signal(signal.SIGTERM)
        await watcher.wait_for("swarm_resumed")
        assert time.monotonic() - stopped < lease_ttl_s / 2
        assert running.a.popen.wait(10) == 0
        await watcher.finished()
        assert taken_over_by(running.b, swarm_id)
        assert_invariants([watcher], await stored_events(running.b.address, swarm_id))
