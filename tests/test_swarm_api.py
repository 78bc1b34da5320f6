"""The OrchestratorService through the client library, against a real orchestrator and two real
worker processes on 127.0.0.1 (simulated provider)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from stack import BIN, Stack, stack
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc
from swarm_checks import assert_completed, assert_well_formed, kinds
from swarm_client import AsyncSwarmClient, InvalidArgument, NotFound, SwarmClient, Unavailable
from swarm_client._resume import events_in

IDEA = "Open a neighbourhood tool library"


async def run_all(client: AsyncSwarmClient, idea: str = IDEA, agents: int = 5, **kwargs: object) -> list:
    return [event async for event in client.run(idea, agents, **kwargs)]  # type: ignore[arg-type]


async def test_a_swarm_completes_with_every_subtask_once_spread_over_both_workers(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        events = await run_all(client, agents=8)
    assert_completed(events, 8)
    accepted = events[0].accepted
    assert (accepted.idea, accepted.num_agents, accepted.provider) == (IDEA, 8, "simulated")
    assert "[simulated]" in events[-1].swarm_completed.result
    workers = Counter(e.subtask_started.worker_id for e in events if e.HasField("subtask_started"))
    assert set(workers) == {"worker-0", "worker-1"}, workers
    assert min(workers.values()) >= 3, f"work is spread over the workers: {workers}"


def test_the_sync_client_runs_and_gets_a_swarm(swarm_stack: Stack) -> None:
    with SwarmClient(swarm_stack.target) as client:
        events = list(client.run(IDEA, 3))
        assert_completed(events, 3)
        swarm = client.get(events[0].swarm_id)
    assert swarm.state == orchestrator_pb2.SWARM_STATE_COMPLETED
    assert swarm.result == events[-1].swarm_completed.result
    assert [s.state for s in swarm.subtasks] == [orchestrator_pb2.SUBTASK_STATE_COMPLETED] * 3
    assert all(s.output and s.attempts == 1 and s.worker_id for s in swarm.subtasks)
    assert swarm.last_sequence == len(events)
    assert swarm.end_time.ToNanoseconds() >= swarm.create_time.ToNanoseconds() > 0


@pytest.mark.parametrize(
    ("idea", "agents", "fields"),
    [
        ("", 3, ["idea"]),
        ("   \n", 3, ["idea"]),
        (IDEA, 0, ["num_agents"]),
        (IDEA, -1, ["num_agents"]),
        (IDEA, 257, ["num_agents"]),
        ("x" * (64 * 1024 + 1), 3, ["idea"]),
        ("", 0, ["idea", "num_agents"]),
    ],
)
async def test_bad_input_is_invalid_argument_with_field_violations(
    swarm_stack: Stack, idea: str, agents: int, fields: list[str]
) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        before = len((await client.list(page_size=1000)).swarms)
        with pytest.raises(InvalidArgument) as raised:
            await run_all(client, idea=idea, agents=agents)
        assert [field for field, _ in raised.value.violations] == fields
        assert all(text for _, text in raised.value.violations)
        assert len((await client.list(page_size=1000)).swarms) == before, "no swarm was started"


@pytest.mark.parametrize("model", ["claude-sonnet-5-5\n", "claude sonnet", "-flag", "m" * 129])
async def test_a_model_name_with_anything_around_it_is_refused(swarm_stack: Stack, model: str) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        with pytest.raises(InvalidArgument) as raised:
            await run_all(client, agents=1, model=model)
        assert [field for field, _ in raised.value.violations] == ["model"]
        page = await client.list(page_size=1000)
    assert not [s for s in page.swarms if s.model == model], "nothing was stored under that name"


async def test_an_idea_at_the_size_limit_is_accepted(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        events = await run_all(client, idea="y" * (64 * 1024), agents=1)
    assert_completed(events, 1)


async def test_unknown_swarms_are_not_found(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        with pytest.raises(NotFound):
            await client.get("no-such-swarm")
        with pytest.raises(NotFound):
            await client.cancel("no-such-swarm")
        with pytest.raises(NotFound):
            [event async for event in client.watch("no-such-swarm")]


async def test_watchers_replay_after_a_sequence_and_see_the_same_events(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        run = client.run(IDEA, 4)
        first = await anext(run)
        watchers = [asyncio.create_task(_collect(client.watch(first.swarm_id, after))) for after in (0, 0, 2)]
        rest = [event async for event in run]
        watched = await asyncio.wait_for(asyncio.gather(*watchers), 30)
    events = [first, *rest]
    assert_completed(events, 4)
    assert watched[0] == events and watched[1] == events
    assert watched[2] == events[2:]
    async with AsyncSwarmClient(swarm_stack.target) as client:
        replay = await _collect(client.watch(first.swarm_id, len(events) - 1))
    assert replay == events[-1:], "a finished swarm replays and ends"


async def test_a_watcher_that_asks_for_batches_gets_the_same_events_in_fewer_messages(
    swarm_stack: Stack,
) -> None:
    """What is ready together comes in one response (`event`, then `more_events`) to a caller that
    asks for it; a caller that does not, as every client before the field, gets one a response."""
    async with grpc.aio.insecure_channel(swarm_stack.target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.RunSwarmRequest(idea=IDEA, num_agents=6, max_events_per_message=4)
        run = [response async for response in stub.RunSwarm(request, timeout=60)]
        swarm_id = run[0].event.swarm_id
        single = [
            response
            async for response in stub.WatchSwarm(
                orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id), timeout=60
            )
        ]
        batched = [
            response
            async for response in stub.WatchSwarm(
                orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id, max_events_per_message=1000), timeout=60
            )
        ]
    events = [event for response in run for event in events_in(response)]
    assert_completed(events, 6)
    assert max(len(events_in(response)) for response in run) <= 4 and len(run) < len(events)
    assert [r.event for r in single] == events and not any(r.more_events for r in single)
    assert [event for response in batched for event in events_in(response)] == events
    assert len(batched) < len(events), "a finished swarm's stored events come a page to a response"


async def _collect(events) -> list:  # type: ignore[no-untyped-def]
    return [event async for event in events]


async def test_cancel_swarm_ends_it_with_swarm_cancelled(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        run = client.run(IDEA, 30, detach=True)
        first = await anext(run)
        async for event in run:
            if event.HasField("subtask_started"):
                break
        cancelled = await client.cancel(first.swarm_id, "enough")
        assert cancelled.state == orchestrator_pb2.SWARM_STATE_CANCELLED
        events = await _collect(client.watch(first.swarm_id))
    assert_well_formed(events)
    assert kinds(events)[-1] == "swarm_cancelled"
    assert events[-1].swarm_cancelled.reason == "enough"
    assert "swarm_completed" not in kinds(events)


async def test_leaving_run_swarm_cancels_the_swarm_unless_detached(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        attached = client.run(IDEA, 20)
        detached = client.run(IDEA, 3, detach=True)
        attached_id = (await anext(attached)).swarm_id
        detached_id = (await anext(detached)).swarm_id
        await attached.aclose()
        await detached.aclose()
        for _ in range(100):
            if (await client.get(attached_id)).state == orchestrator_pb2.SWARM_STATE_CANCELLED:
                break
            await asyncio.sleep(0.05)
        assert (await client.get(attached_id)).state == orchestrator_pb2.SWARM_STATE_CANCELLED
        detached_events = await _collect(client.watch(detached_id))
    assert_completed(detached_events, 3)


async def test_list_swarms_pages_newest_first_with_a_state_filter(swarm_stack: Stack) -> None:
    async with AsyncSwarmClient(swarm_stack.target) as client:
        ids = []
        for i in range(3):
            events = await run_all(client, idea=f"listing {i}", agents=1)
            ids.append(events[0].swarm_id)
        first = await client.list(page_size=2)
        second = await client.list(page_size=2, page_token=first.next_page_token)
        assert [s.swarm_id for s in first.swarms] == ids[::-1][:2]
        assert second.swarms[0].swarm_id == ids[0]
        assert first.next_page_token
        assert not first.swarms[0].subtasks, "lists leave the plans out"
        completed = await client.list(page_size=1000, state=orchestrator_pb2.SWARM_STATE_COMPLETED)
        assert set(ids) <= {s.swarm_id for s in completed.swarms}
        assert all(s.state == orchestrator_pb2.SWARM_STATE_COMPLETED for s in completed.swarms)
        failed = await client.list(page_size=1000, state=orchestrator_pb2.SWARM_STATE_FAILED)
        assert not set(ids) & {s.swarm_id for s in failed.swarms}
        with pytest.raises(InvalidArgument):
            await client.list(page_token="not-a-token")


async def test_both_services_serve_health_and_reflection(swarm_stack: Stack) -> None:
    expected = {
        swarm_stack.target: "swarm.v1.OrchestratorService",
        swarm_stack.workers[0].address: "swarm.v1.WorkerService",
    }
    for address, service in expected.items():
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


async def test_a_worker_refuses_direct_calls_beyond_its_direct_slots() -> None:
    worker_args = ["--max-concurrency", "4", "--direct-slots", "2"]
    with stack(workers=1, worker_args=worker_args, sim_latency_ms=2000) as running:
        async with grpc.aio.insecure_channel(running.workers[0].address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            info = await stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
            assert (info.worker_id, info.max_concurrency, info.direct_slots) == ("worker-0", 4, 2)
            request = worker_pb2.ExecuteSubtaskRequest(swarm_id="s", subtask={"id": "a", "title": "t"})
            calls = [stub.ExecuteSubtask(request) for _ in range(3)]
            firsts = await asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
            refused = [f for f in firsts if isinstance(f, grpc.aio.AioRpcError)]
            assert len(refused) == 1
            assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()


async def test_a_plan_the_model_gets_wrong_is_asked_again_or_fails_the_swarm_clearly() -> None:
    with stack(workers=1, orchestrator_args=["--sim-bad-plans", "1"]) as running:
        async with AsyncSwarmClient(running.target) as client:
            assert_completed(await run_all(client, agents=3), 3)
    with stack(workers=1, orchestrator_args=["--sim-bad-plans", "9", "--plan-attempts", "2"]) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = await run_all(client, agents=3)
    assert_well_formed(events)
    assert kinds(events) == ["accepted", "swarm_failed"]
    assert "no valid plan of 3 subtasks in 2 attempts" in events[-1].swarm_failed.error


async def test_a_killed_worker_loses_no_subtask() -> None:
    with stack(workers=2, sim_latency_ms=1500) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = []
            async for event in client.run(IDEA, 6):
                events.append(event)
                if event.HasField("subtask_delta") and event.subtask_delta.subtask_id and len(events) < 40:
                    victim = next(w for w in running.workers if w.name.endswith("1"))
                    if victim.popen.poll() is None:
                        victim.signal(signal.SIGKILL)
    assert_completed(events, 6)
    failed = [e.subtask_failed for e in events if e.HasField("subtask_failed")]
    assert failed and all(f.will_retry and f.worker_id == "worker-1" for f in failed)
    assert all(
        e.subtask_started.worker_id == "worker-0"
        for e in events
        if e.HasField("subtask_started") and e.subtask_started.attempt > 1
    )


def test_services_stop_cleanly_on_sigterm() -> None:
    with stack(workers=1) as running:
        processes = [running.orchestrator, *running.workers]
        codes = [process.stop() for process in processes]
    assert codes == [0, 0]
    assert all("stopped" in process.output() for process in processes)


async def test_wait_ready_knows_a_live_orchestrator_from_none() -> None:
    with stack(workers=1) as running:
        async with AsyncSwarmClient(running.target) as client:
            await client.wait_ready(within_s=5)
        with SwarmClient(running.target) as sync_client:
            sync_client.wait_ready(within_s=5)
        gone = f"127.0.0.1:{running.orchestrator.address.rsplit(':', 1)[1]}"
    async with AsyncSwarmClient(gone) as client:
        with pytest.raises(Unavailable, match="cannot reach the orchestrator"):
            await client.wait_ready(within_s=0.5)
    with SwarmClient(gone) as sync_client, pytest.raises(Unavailable):
        sync_client.wait_ready(within_s=0.5)


@pytest.mark.parametrize("command", ["swarm-worker", "swarm-orchestrator"])
def test_a_taken_port_or_a_bad_address_is_one_clear_line(command: str) -> None:
    with stack(workers=1) as running:
        taken = running.workers[0].address
        for listen, expected in ((taken, f"cannot serve on {taken}"), ("nonsense", "is not HOST:PORT")):
            extra = ["--db", ":memory:", "--workers", taken] if command == "swarm-orchestrator" else []
            done = subprocess.run(
                [str(BIN / command), "--listen", listen, "--provider", "simulated", *extra],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode != 0
            assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
