"""Orchestrator replicas on one PostgreSQL database, all well: any replica answers for any swarm,
one request given to both at once starts one swarm, the workers they share are never asked for more
than they have, each tenant finds only its own swarms at every replica, and the database's password
shows nowhere. The replicas and their database are shared by the module's tests (but for those of
tenants, which need tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_security import add_token, bearer

from fakes.postgres import PostgresServer
from replica_stack import (
    AGENTS,
    Replicas,
    S,
    Watcher,
    replicas,
    said,
    start_detached,
    stub,
    taken_over_by,
)
from stack import start
from swarm.v1 import orchestrator_pb2
from swarm_checks import assert_completed, kinds


@pytest.fixture(scope="module")
def running(postgres_server: PostgresServer) -> Iterator[Replicas]:
    # No grace at the end: the swarms the tests leave running are suspended, not waited for.
    with replicas(postgres_server.create_database("test_replicas"), args=["--shutdown-grace", "0"]) as both:
        yield both


async def test_any_replica_serves_a_swarm_running_at_another(
    running: Replicas, postgres_server: PostgresServer
) -> None:
    swarm_id = await start_detached(running.a.address)
    async with stub(running.b.address) as b:
        view = (await b.GetSwarm(orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id))).swarm
        assert view.swarm_id == swarm_id and not view.HasField("end_time")
        listed = (await b.ListSwarms(orchestrator_pb2.ListSwarmsRequest())).swarms
        assert listed[0].swarm_id == swarm_id, "newest first, whichever replica runs it"
        watcher = Watcher(running.a.address, swarm_id)
        await watcher.wait_for("plan_created")
        request = orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id, reason="enough")
        cancelled = await b.CancelSwarm(request)
        assert cancelled.swarm.state == S.SWARM_STATE_CANCELLED
        assert cancelled.swarm.error == "enough"
    events = await watcher.finished()
    assert kinds(events)[-1] == "swarm_cancelled" and events[-1].swarm_cancelled.reason == "enough"
    assert not taken_over_by(running.b, swarm_id), "the owner cancelled it, not a takeover"
    for process in (running.a, running.b):
        assert postgres_server.password not in process.output()


async def test_replicas_sharing_workers_keep_together_within_each_workers_capacity(running: Replicas) -> None:
    for process in (running.a, running.b):
        await said(process, "shared by 2 orchestrator(s)")
    swarms = [await start_detached(target) for target in [running.a.address, running.b.address] * 2]
    watchers = [Watcher(running.b.address, swarm_id) for swarm_id in swarms]
    for watcher in watchers:
        events = await watcher.finished()
        assert_completed(events, AGENTS)
        # No worker was asked for more than it has, so none refused (worker_busy) an attempt.
        assert "subtask_failed" not in kinds(events)


async def test_two_replicas_given_one_request_at_once_start_one_swarm(running: Replicas) -> None:
    started: set[str] = set()
    for attempt in range(3):
        targets = [running.a.address, running.b.address] * 2
        ids = await asyncio.gather(
            *(start_detached(t, request_id=f"same-request-{attempt}") for t in targets)
        )
        assert len(set(ids)) == 1, ids
        started |= set(ids)
    async with stub(running.a.address) as orchestrator:
        listed = (await orchestrator.ListSwarms(orchestrator_pb2.ListSwarmsRequest(page_size=100))).swarms
    by_request = [s.swarm_id for s in listed if s.request_id.startswith("same-request-")]
    assert sorted(by_request) == sorted(started) and len(started) == 3


def test_a_wrong_database_password_is_one_line_that_does_not_show_it(postgres_server: PostgresServer) -> None:
    wrong = postgres_server.url("postgres").replace(postgres_server.password, "not-the-password-at-all")
    with pytest.raises(Exception, match="did not start listening") as refused:
        start("orchestrator", "swarm-orchestrator", ["--db", wrong], timeout=20)
    said_ = str(refused.value)
    assert "password authentication failed" in said_ and "not-the-password-at-all" not in said_
    assert "postgresql://swarm:***@127.0.0.1" in said_


async def test_each_tenant_finds_only_its_own_swarms_at_every_replica(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth.json"
    acme, globex = bearer(add_token(auth_file, "acme")), bearer(add_token(auth_file, "globex"))
    url = postgres_server.create_database("test_replicas_tenants")
    with replicas(url, args=["--auth-file", str(auth_file), "--shutdown-grace", "0"]) as running:
        swarm_id = await start_detached(running.a.address, request_id="order-1", metadata=acme)
        async with stub(running.b.address) as b:
            found = await b.GetSwarm(orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id), metadata=acme)
            assert found.swarm.swarm_id == swarm_id
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await b.GetSwarm(orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id), metadata=globex)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            listed = await b.ListSwarms(orchestrator_pb2.ListSwarmsRequest(), metadata=globex)
            assert not listed.swarms
            request = orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await b.CancelSwarm(request, metadata=globex)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        # A request id is each tenant's own, at any replica.
        same = await start_detached(running.b.address, request_id="order-1", metadata=acme)
        other = await start_detached(running.b.address, request_id="order-1", metadata=globex)
        assert same == swarm_id and other != swarm_id
