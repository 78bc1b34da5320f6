"""The scheduler under real faults, with real processes: a worker killed, hung, drained, added and
removed; a client that cancels; an orchestrator told to stop; swarms competing for capacity.
Each test checks that nothing is lost and no subtask completes twice (assert_completed)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import grpc
import pytest
from fake_dns import FakeDNS

from orchestrator_service.worker_pool import WorkerPool
from stack import Process, stack, start
from swarm.v1 import events_pb2, worker_pb2, worker_pb2_grpc
from swarm_checks import assert_completed, assert_well_formed, kinds
from swarm_client import AsyncSwarmClient, Unavailable

IDEA = "Survey the city's bridges"


def started_on(events: list[events_pb2.SwarmEvent], worker_id: str) -> list[events_pb2.SubtaskStarted]:
    return [
        e.subtask_started
        for e in events
        if e.HasField("subtask_started") and e.subtask_started.worker_id == worker_id
    ]


def failures(events: list[events_pb2.SwarmEvent]) -> list[events_pb2.SubtaskFailed]:
    return [e.subtask_failed for e in events if e.HasField("subtask_failed")]


async def in_flight(worker: Process) -> int:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        info = await worker_pb2_grpc.WorkerServiceStub(channel).GetWorkerInfo(
            worker_pb2.GetWorkerInfoRequest(), timeout=5
        )
    return int(info.in_flight)


async def test_a_hung_worker_is_given_up_on_and_its_subtasks_run_elsewhere() -> None:
    with stack(workers=2, sim_latency_ms=1500, orchestrator_args=["--no-progress-timeout", "1"]) as running:
        hung = running.workers[1]
        async with AsyncSwarmClient(running.target) as client:
            events: list[events_pb2.SwarmEvent] = []
            hung_at = 0
            async for event in client.run(IDEA, 6):
                events.append(event)
                if not hung_at and event.HasField("subtask_delta") and started_on(events, "worker-1"):
                    hung.signal(signal.SIGSTOP)
                    hung_at = event.sequence
    assert_completed(events, 6)
    hung_failures = [f for f in failures(events) if f.worker_id == "worker-1"]
    assert hung_failures and all(f.will_retry and "hung" in f.error for f in hung_failures)
    late = [e for e in events if e.sequence > hung_at and e.HasField("subtask_started")]
    assert late and all(e.subtask_started.worker_id == "worker-0" for e in late), (
        "no new work for a hung worker"
    )


async def test_the_slots_of_a_hung_worker_go_to_no_waiting_subtask() -> None:
    """Subtasks wait while every slot is taken; the hung worker's slots, freed as its attempts are
    given up on, must not go to them: the worker is taken out first."""
    with stack(
        workers=2,
        per_worker_args=[
            ["--max-concurrency", "2", "--sim-latency-ms", "4000"],
            ["--max-concurrency", "1", "--sim-latency-ms", "2000"],
        ],
        orchestrator_args=["--sim-latency-ms", "50", "--no-progress-timeout", "1"],
    ) as running:
        hung = running.workers[0]
        async with AsyncSwarmClient(running.target) as client:
            events: list[events_pb2.SwarmEvent] = []
            hung_at = 0
            async for event in client.run(IDEA, 4):
                events.append(event)
                if not hung_at and len(started_on(events, "worker-0")) == 2:
                    hung.signal(signal.SIGSTOP)
                    hung_at = event.sequence
    assert_completed(events, 4)
    assert hung_at, "worker-0 took two subtasks"
    late = [e.subtask_started for e in events if e.sequence > hung_at and e.HasField("subtask_started")]
    print(
        f"attempts started on the hung worker after it hung: {len(started_on(events[hung_at:], 'worker-0'))}"
    )
    assert late and all(s.worker_id == "worker-1" for s in late), "no new work for a hung worker"
    assert [f.worker_id for f in failures(events)] == ["worker-0", "worker-0"], (
        "only the hung attempts failed"
    )


async def test_a_draining_worker_finishes_what_it_has_and_gets_nothing_new() -> None:
    with stack(
        workers=2, sim_latency_ms=1500, worker_args=["--max-concurrency", "2", "--shutdown-grace", "20"]
    ) as running:
        draining = running.workers[1]
        async with AsyncSwarmClient(running.target) as client:
            events: list[events_pb2.SwarmEvent] = []
            received: list[float] = []
            sigterm = 0.0
            async for event in client.run(IDEA, 10):
                events.append(event)
                received.append(time.monotonic())
                if not sigterm and started_on(events, "worker-1"):
                    draining.signal(signal.SIGTERM)
                    sigterm = time.monotonic()
        exit_code = draining.popen.wait(30)
    assert_completed(events, 10)
    assert not failures(events), "drained, not failed: in-flight subtasks finish"
    assert exit_code == 0
    after = [
        e
        for e, at in zip(events, received, strict=True)
        if at > sigterm + 1.0 and e.HasField("subtask_started")
    ]
    assert after and all(e.subtask_started.worker_id == "worker-0" for e in after)


def free_port_on(*hosts: str) -> int:
    """A port free on every one of the loopback addresses given (each worker binds its own)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as check:
                    check.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


async def test_workers_found_by_dns_join_and_leave_during_a_swarm() -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    worker_args = ["--provider", "simulated", "--sim-latency-ms", "800", "--max-concurrency", "2"]
    first = start(
        "worker-a", "swarm-worker", [*worker_args, "--worker-id", "worker-a", "--listen", f"127.0.0.2:{port}"]
    )
    second: Process | None = None
    orchestrator: Process | None = None
    try:
        with FakeDNS("workers.test", ["127.0.0.2"]) as dns_server:
            orchestrator = start(
                "orchestrator",
                "swarm-orchestrator",
                [
                    "--provider",
                    "simulated",
                    "--sim-latency-ms",
                    "50",
                    "--refresh-interval",
                    "0.3",
                    "--workers",
                    f"dns://127.0.0.1:{dns_server.port}/workers.test:{port}",
                ],
            )
            async with AsyncSwarmClient(orchestrator.address) as client:
                events = []
                async for event in client.run(IDEA, 16):
                    events.append(event)
                    if second is None and event.HasField("subtask_completed"):
                        second = start(
                            "worker-b",
                            "swarm-worker",
                            [*worker_args, "--worker-id", "worker-b", "--listen", f"127.0.0.3:{port}"],
                        )
                        dns_server.addresses = ["127.0.0.2", "127.0.0.3"]
                assert_completed(events, 16)
                assert started_on(events, "worker-b"), "the added worker got work"

                dns_server.addresses = ["127.0.0.3"]  # worker-a leaves the pool (still running)
                await asyncio.sleep(1.5)
                later = [e async for e in client.run(IDEA, 4)]
            assert_completed(later, 4)
            assert not started_on(later, "worker-a") and started_on(later, "worker-b")
    finally:
        for process in (orchestrator, second, first):
            if process is not None:
                process.stop()


async def test_a_busy_worker_that_leaves_dns_and_comes_back_keeps_its_slots_counted() -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    worker_args = ["--provider", "simulated", "--sim-latency-ms", "2500"]
    workers = [
        start(name, "swarm-worker", [*worker_args, *args, "--worker-id", name, "--listen", f"{host}:{port}"])
        for name, host, args in (
            ("worker-a", "127.0.0.2", ["--max-concurrency", "2"]),
            ("worker-b", "127.0.0.3", ["--max-concurrency", "1"]),
        )
    ]
    orchestrator: Process | None = None
    try:
        with FakeDNS("workers.test", ["127.0.0.2", "127.0.0.3"]) as dns_server:
            orchestrator = start(
                "orchestrator",
                "swarm-orchestrator",
                [
                    *["--provider", "simulated", "--sim-latency-ms", "50", "--refresh-interval", "0.2"],
                    *["--workers", f"dns://127.0.0.1:{dns_server.port}/workers.test:{port}"],
                ],
            )
            async with AsyncSwarmClient(orchestrator.address) as client:
                events: list[events_pb2.SwarmEvent] = []
                async for event in client.run(IDEA, 6):
                    events.append(event)
                    if len(started_on(events, "worker-a")) == 2 and dns_server.addresses[0] == "127.0.0.2":
                        # worker-a leaves the pool with both its slots busy, and comes back.
                        dns_server.addresses = ["127.0.0.3"]
                        asked = dns_server.queries
                        for _ in range(100):
                            if dns_server.queries >= asked + 2:
                                break
                            await asyncio.sleep(0.05)
                        dns_server.addresses = ["127.0.0.3", "127.0.0.2"]
    finally:
        for process in (orchestrator, *workers):
            if process is not None:
                process.stop()
    assert dns_server.addresses[0] == "127.0.0.3", "worker-a left and came back during the swarm"
    busy = [f for f in failures(events) if "running 2 subtasks" in f.error]
    print(f"attempts refused by the returning worker as busy: {len(busy)}")
    assert_completed(events, 6)
    assert not failures(events), "no subtask was sent to a worker with no free slot"


async def test_a_start_refused_by_a_full_worker_waits_for_a_slot_and_costs_no_attempt() -> None:
    """Two orchestrators that do not know of each other share a worker of one slot, as replicas do
    for a moment while one joins: the second one's start is refused as busy while the first holds
    the slot. With one attempt per subtask, that refusal must not fail its swarm."""
    one_attempt = ["--max-attempts", "1", "--sim-latency-ms", "50"]
    with stack(
        workers=1, sim_latency_ms=1500, worker_args=["--max-concurrency", "1"], orchestrator_args=one_attempt
    ) as running:
        second = start(
            "orchestrator-2", "swarm-orchestrator", [*running.orchestrator_args, "--db", ":memory:"]
        )
        try:
            async with (
                AsyncSwarmClient(running.target) as first_client,
                AsyncSwarmClient(second.address) as second_client,
            ):
                holding: list[events_pb2.SwarmEvent] = []
                first_run = first_client.run(IDEA, 2)
                async for event in first_run:  # until the first swarm holds the worker's slot
                    holding.append(event)
                    if event.HasField("subtask_started"):
                        break
                second_events = [event async for event in second_client.run(IDEA, 1)]
                holding += [event async for event in first_run]
        finally:
            second.stop()
    refused = failures(second_events)
    print(f"starts refused as busy, and waited out: {[f.error for f in refused]}")
    assert refused and all(f.will_retry and "RESOURCE_EXHAUSTED" in f.error for f in refused)
    assert_completed(second_events, 1)
    assert_completed(holding, 2)


async def test_cancelling_a_swarm_stops_its_worker_calls_and_frees_capacity_for_others() -> None:
    fast_planning = ["--sim-latency-ms", "50"]  # only the workers' answers are slow
    with stack(
        workers=2,
        sim_latency_ms=20000,
        worker_args=["--max-concurrency", "3"],
        orchestrator_args=fast_planning,
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            doomed = client.run(IDEA, 6)
            started = 0
            async for event in doomed:
                started += event.HasField("subtask_started")
                if started == 6:
                    break
            for _ in range(100):  # subtask_started is appended as the call goes out, not as it lands
                if [await in_flight(w) for w in running.workers] == [3, 3]:
                    break
                await asyncio.sleep(0.05)
            assert [await in_flight(w) for w in running.workers] == [3, 3], "every slot busy"
            waiting = asyncio.create_task(_first_start(client))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "the second swarm waits for capacity"
            cancelled_at = time.monotonic()
            await doomed.aclose()  # the client leaves RunSwarm: the swarm is cancelled
            swarm_id = await asyncio.wait_for(waiting, 10)
            freed_after = time.monotonic() - cancelled_at
            for _ in range(100):
                if sum([await in_flight(w) for w in running.workers]) == 3:
                    break
                await asyncio.sleep(0.05)
            assert sum([await in_flight(w) for w in running.workers]) == 3, (
                "only the new swarm's calls remain"
            )
            await client.cancel(swarm_id)
            doomed_id = (await client.list(page_size=2)).swarms[1].swarm_id
            events = [e async for e in client.watch(doomed_id)]
    assert_well_formed(events)
    assert kinds(events)[-1] == "swarm_cancelled" and "subtask_completed" not in kinds(events)
    assert freed_after < 3.0, f"capacity came back {freed_after:.2f}s after the cancel"


async def _first_start(client: AsyncSwarmClient) -> str:
    async for event in client.run(IDEA, 3, detach=True):
        if event.HasField("subtask_started"):
            return event.swarm_id
    raise AssertionError("the second swarm never started a subtask")


async def test_a_stopping_orchestrator_finishes_running_swarms_and_refuses_new_ones() -> None:
    with stack(workers=2, sim_latency_ms=1500) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = []
            async for event in client.run(IDEA, 4):
                events.append(event)
                if event.HasField("subtask_started") and running.orchestrator.popen.poll() is None:
                    running.orchestrator.signal(signal.SIGTERM)
                    await asyncio.sleep(0.2)
                    with pytest.raises(Unavailable):
                        [e async for e in client.run(IDEA, 2)]
        assert running.orchestrator.popen.wait(30) == 0
    assert_completed(events, 4)


async def test_a_small_swarm_is_not_stuck_behind_a_big_one() -> None:
    with stack(workers=2, sim_latency_ms=300, worker_args=["--max-concurrency", "4"]) as running:
        async with AsyncSwarmClient(running.target) as client:
            big = asyncio.create_task(_timed(client, 200))
            await asyncio.sleep(1.5)
            small_events, small_s = await _timed(client, 3)
            big_events, big_s = await asyncio.wait_for(big, 120)
    print(f"small swarm {small_s:.2f}s, big swarm {big_s:.2f}s")
    assert_completed(small_events, 3)
    assert_completed(big_events, 200)
    # The small swarm's own work: plan, one round of subtasks, synthesis (~0.3 s each). Queued
    # behind the big swarm's 190-odd subtasks it would wait for about 190/8 rounds (~7 s).
    assert small_s < 3.0, f"small swarm took {small_s:.2f}s while the big one took {big_s:.2f}s"
    assert small_s < big_s / 3


async def _timed(client: AsyncSwarmClient, agents: int) -> tuple[list[events_pb2.SwarmEvent], float]:
    began = time.monotonic()
    events = [e async for e in client.run(IDEA, agents)]
    return events, time.monotonic() - began


def pool_tasks() -> int:
    """Tasks the worker pool runs (its refreshes), not the DNS library's own or the test's."""
    return sum(task.get_coro().__qualname__.startswith("WorkerPool.") for task in asyncio.all_tasks())


async def test_waiting_subtasks_share_one_refresh_while_the_dns_server_is_silent() -> None:
    """While no worker can take work, waiting subtasks ask for the target to be resolved again;
    against a DNS server that never answers, those asks must not pile up behind one another."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        pool = WorkerPool(f"dns://127.0.0.1:{silent.getsockname()[1]}/workers.test:1", no_worker_timeout_s=60)
        waiters = [asyncio.create_task(pool.acquire(f"swarm-{i}")) for i in range(64)]
        await asyncio.sleep(3.5)
        piled = pool_tasks() - len(waiters)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        left = pool_tasks()
        await pool.close()
    print(f"refresh tasks: {piled} while 64 subtasks waited 3.5 s, {left} after they left")
    assert piled <= 1, f"{piled} refreshes in flight or queued"
    assert left <= 1
