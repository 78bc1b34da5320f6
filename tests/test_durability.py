"""Durable swarms: restart recovery in process (a scripted scheduler, no gRPC), then real orchestrator
processes killed with SIGKILL while planning, mid-dispatch and during synthesis, restarted on the
same --db, with clients that reconnect from their last sequence."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from orchestrator_service.event_log import EventLog
from orchestrator_service.orchestrator import Orchestrator
from orchestrator_service.planner import Planner
from orchestrator_service.scheduler import SubtaskOutcome
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import FIRST_EPOCH, Entry, MemoryStore, StoreError
from orchestrator_service.swarm import RESTARTED
from stack import BIN, Stack, stack
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_checks import TERMINAL, assert_completed, kinds
from swarm_client import AsyncSwarmClient, NotFound, SwarmError, Unavailable
from swarm_common.providers import SimulatedProvider, SimulatedSettings

IDEA = "Run a seed library out of the town hall"
Event = events_pb2.SwarmEvent
T = orchestrator_pb2.SubtaskState


# ------------------------------------------------------------------------------ what must hold


def assert_resumed_and_completed(events: list[Event], agents: int, *, resumes: int = 1) -> None:
    """A completed swarm (one numbered log across the restarts, each subtask completed exactly once
    with its attempt's output, the result the last synthesis attempt's), accepted once and resumed
    `resumes` times."""
    assert_completed(events, agents)
    names = kinds(events)
    assert names.count("accepted") == 1 and names.count("swarm_resumed") == resumes


def assert_attempts_continue(events: list[Event]) -> None:
    """Every subtask's attempts count 1, 2, 3 ... across the restart, and an attempt the restart cut
    off is told as failed before the next one starts."""
    started: dict[str, list[int]] = {}
    open_attempt: dict[str, int] = {}
    for event in events:
        if event.HasField("subtask_started"):
            body = event.subtask_started
            assert body.subtask_id not in open_attempt, f"{body.subtask_id}: started while an attempt is open"
            started.setdefault(body.subtask_id, []).append(body.attempt)
            open_attempt[body.subtask_id] = body.attempt
        elif event.HasField("subtask_failed") or event.HasField("subtask_completed"):
            body_ = event.subtask_failed if event.HasField("subtask_failed") else event.subtask_completed
            assert open_attempt.pop(body_.subtask_id) == body_.attempt
    assert all(attempts == list(range(1, len(attempts) + 1)) for attempts in started.values()), started


def assert_view_matches(view: orchestrator_pb2.Swarm, events: list[Event]) -> None:
    """GetSwarm after the restart: completed, every subtask COMPLETED with the output, attempts and
    usage its events tell, the result and usage of swarm_completed, the timestamps set."""
    assert view.state == orchestrator_pb2.SWARM_STATE_COMPLETED
    assert view.last_sequence == len(events)
    completed = {
        e.subtask_completed.subtask_id: e.subtask_completed for e in events if e.HasField("subtask_completed")
    }
    attempts = Counter(e.subtask_started.subtask_id for e in events if e.HasField("subtask_started"))
    for status in view.subtasks:
        assert status.state == T.SUBTASK_STATE_COMPLETED
        assert status.output == completed[status.subtask.id].output
        assert status.attempts == attempts[status.subtask.id] == completed[status.subtask.id].attempt
        assert status.usage == completed[status.subtask.id].usage
    assert view.result == events[-1].swarm_completed.result
    assert view.usage == events[-1].swarm_completed.usage and view.usage.output_tokens > 0
    assert view.create_time == events[0].time and view.end_time == events[-1].time


# --------------------------------------------------------------------- recovery, in process


class ScriptedScheduler:
    """Runs each subtask as one attempt with one chunk, and notes which attempt it was asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    async def run(
        self,
        log: EventLog,
        subtask: events_pb2.Subtask,
        *,
        idea: str,
        model: str,
        max_parallel: int = 0,
        deadline: float | None = None,
        first_attempt: int = 1,
        max_tokens: int = 0,
        shared: object = None,
    ) -> SubtaskOutcome:
        self.asked.append((subtask.id, first_attempt))
        usage = events_pb2.Usage(input_tokens=10, output_tokens=20)
        log.append(
            "subtask_started",
            events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id="w2", attempt=first_attempt),
        )
        await asyncio.sleep(0)
        log.append(
            "subtask_delta", events_pb2.SubtaskDelta(subtask_id=subtask.id, text="new", attempt=first_attempt)
        )
        log.append(
            "subtask_completed",
            events_pb2.SubtaskCompleted(
                subtask_id=subtask.id, worker_id="w2", output="new", usage=usage, attempt=first_attempt
            ),
        )
        return SubtaskOutcome("new", usage)


def orchestrator_on(store: MemoryStore, scheduler: ScriptedScheduler) -> Orchestrator:
    planner = Planner(SimulatedProvider(SimulatedSettings(latency_ms=0)))
    return Orchestrator(planner, scheduler, store, default_model="m")  # type: ignore[arg-type]


async def history(store: MemoryStore, steps: Callable[[EventLog], None]) -> str:
    """A swarm's stored events as a crashed orchestrator left them: accepted, then `steps`."""
    log = EventLog(SwarmRecord("crashed"), store)
    log.append("accepted", events_pb2.SwarmAccepted(idea=IDEA, num_agents=4, model="m", provider="simulated"))
    steps(log)
    await log.stored()
    return log.swarm_id


def plan(log: EventLog, count: int = 4) -> None:
    subtasks = [
        events_pb2.Subtask(id=f"subtask-{i}", title=f"part {i}", instructions="x")
        for i in range(1, count + 1)
    ]
    log.append(
        "plan_created", events_pb2.PlanCreated(subtasks=subtasks, usage=events_pb2.Usage(input_tokens=7))
    )


def attempt(log: EventLog, subtask_id: str, number: int, end: str) -> None:
    """One attempt: started and a chunk, then `end`: completed, failed (will retry), or "" (cut off)."""
    log.append(
        "subtask_started", events_pb2.SubtaskStarted(subtask_id=subtask_id, worker_id="w1", attempt=number)
    )
    log.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id=subtask_id, text="old", attempt=number))
    if end == "completed":
        usage = events_pb2.Usage(input_tokens=1, output_tokens=2)
        log.append(
            "subtask_completed",
            events_pb2.SubtaskCompleted(
                subtask_id=subtask_id, worker_id="w1", output="old", usage=usage, attempt=number
            ),
        )
    elif end == "failed":
        log.append(
            "subtask_failed",
            events_pb2.SubtaskFailed(
                subtask_id=subtask_id, worker_id="w1", error="gone", attempt=number, will_retry=True
            ),
        )


async def resume_all(
    store: MemoryStore, scheduler: ScriptedScheduler
) -> tuple[list[Event], orchestrator_pb2.Swarm]:
    orchestrator = orchestrator_on(store, scheduler)
    assert await orchestrator.recover() == ["crashed"]
    events = [e.event async for batch in await orchestrator.watch("crashed") for e in batch]
    return events, await orchestrator.get("crashed")


async def test_a_swarm_resumed_mid_dispatch_runs_only_what_did_not_complete() -> None:
    store, scheduler = MemoryStore(), ScriptedScheduler()

    def crashed(log: EventLog) -> None:
        plan(log)
        attempt(log, "subtask-1", 1, "completed")
        attempt(log, "subtask-2", 1, "")  # running when the orchestrator died
        attempt(log, "subtask-3", 1, "failed")  # waiting for its retry
        # subtask-4 never started

    await history(store, crashed)
    events, view = await asyncio.wait_for(resume_all(store, scheduler), 10)
    assert_resumed_and_completed(events, 4)
    assert_attempts_continue(events)
    resumed_at = kinds(events).index("swarm_resumed")
    assert events[resumed_at].sequence == 11, "the log goes on after the 10 stored events"
    resumed = events[resumed_at].swarm_resumed
    assert list(resumed.completed_subtasks) == ["subtask-1"]
    assert list(resumed.pending_subtasks) == ["subtask-2", "subtask-3", "subtask-4"]
    cut_off = events[resumed_at + 1].subtask_failed
    assert (cut_off.subtask_id, cut_off.attempt, cut_off.will_retry, cut_off.error, cut_off.worker_id) == (
        "subtask-2",
        1,
        True,
        RESTARTED,
        "w1",
    )
    assert sorted(scheduler.asked) == [("subtask-2", 2), ("subtask-3", 2), ("subtask-4", 1)]
    assert [s.output for s in view.subtasks] == ["old", "new", "new", "new"]
    assert [s.attempts for s in view.subtasks] == [1, 2, 2, 1]
    # Planning (7 in), the kept subtask (1 in, 2 out) and three new ones (10 in, 20 out each) count.
    synthesis_usage = view.usage.input_tokens - 7 - 1 - 30
    assert synthesis_usage > 0 and view.usage.output_tokens > 2 + 60


async def test_a_swarm_resumed_before_its_plan_plans_once_and_runs_everything() -> None:
    store, scheduler = MemoryStore(), ScriptedScheduler()
    await history(store, lambda log: None)
    events, _ = await asyncio.wait_for(resume_all(store, scheduler), 10)
    assert_resumed_and_completed(events, 4)
    assert kinds(events)[:3] == ["accepted", "swarm_resumed", "plan_created"]
    assert sorted(scheduler.asked) == [(f"subtask-{i}", 1) for i in range(1, 5)]


async def test_a_swarm_resumed_during_synthesis_runs_no_subtask_and_synthesizes_afresh() -> None:
    store, scheduler = MemoryStore(), ScriptedScheduler()

    def crashed(log: EventLog) -> None:
        plan(log)
        for i in range(1, 5):
            attempt(log, f"subtask-{i}", 1, "completed")
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text="half an ans", attempt=1))

    await history(store, crashed)
    events, view = await asyncio.wait_for(resume_all(store, scheduler), 10)
    assert_resumed_and_completed(events, 4)
    assert scheduler.asked == []
    after = events[kinds(events).index("swarm_resumed") :]
    assert {e.synthesis_delta.attempt for e in after if e.HasField("synthesis_delta")} == {2}
    assert "half an ans" not in view.result and view.result.startswith("[simulated]")


async def test_a_swarm_resumed_after_a_subtask_failed_for_good_ends_failed() -> None:
    store, scheduler = MemoryStore(), ScriptedScheduler()

    def crashed(log: EventLog) -> None:
        plan(log, 2)
        attempt(log, "subtask-1", 1, "completed")
        log.append(
            "subtask_started", events_pb2.SubtaskStarted(subtask_id="subtask-2", worker_id="w1", attempt=3)
        )
        log.append(
            "subtask_failed",
            events_pb2.SubtaskFailed(subtask_id="subtask-2", worker_id="w1", error="bad key", attempt=3),
        )

    await history(store, crashed)
    events, view = await asyncio.wait_for(resume_all(store, scheduler), 10)
    assert kinds(events)[-2:] == ["swarm_resumed", "swarm_failed"]
    assert events[-1].swarm_failed.error == "subtask subtask-2 failed after 3 attempt(s): bad key"
    assert scheduler.asked == [] and view.state == orchestrator_pb2.SWARM_STATE_FAILED


async def test_finished_swarms_leave_memory_and_are_served_from_the_store() -> None:
    store, scheduler = MemoryStore(), ScriptedScheduler()
    orchestrator = orchestrator_on(store, scheduler)
    swarm_id = (await orchestrator.start(idea=IDEA, num_agents=3, request_id="once")).swarm_id
    events = [e.event async for batch in await orchestrator.watch(swarm_id) for e in batch]
    assert kinds(events)[-1] == "swarm_completed"
    for _ in range(100):
        if not orchestrator._swarms:
            break
        await asyncio.sleep(0.01)
    assert not orchestrator._swarms, "a finished swarm is not kept in memory"
    again = await orchestrator.start(idea=IDEA, num_agents=3, request_id="once")
    assert (again.swarm_id, again.new) == (swarm_id, False)
    assert [e.event async for batch in await orchestrator.watch(swarm_id, 5) for e in batch] == events[5:]
    view = await orchestrator.get(swarm_id)
    assert view == await store.get_swarm(swarm_id) and view.last_sequence == len(events)
    assert await orchestrator.recover() == []


class FillingStore(MemoryStore):
    """Takes a swarm's first write, then its disk is full."""

    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        if await self.unfinished():
            raise StoreError("cannot write to the database x.db: database or disk is full")
        await super().append(entries, epoch=epoch)


async def test_an_orchestrator_whose_store_fails_shows_nothing_unstored_and_reports_it() -> None:
    orchestrator = orchestrator_on(FillingStore(), ScriptedScheduler())
    swarm_id = (await orchestrator.start(idea=IDEA, num_agents=2)).swarm_id
    seen: list[Event] = []
    with pytest.raises(StoreError, match="disk is full"):
        async for batch in await orchestrator.watch(swarm_id):
            seen.extend(logged.event for logged in batch)
    assert kinds(seen) == ["accepted"]
    await asyncio.wait_for(orchestrator.store_failed.wait(), 5)
    assert "disk is full" in str(orchestrator.store_failure)
    with pytest.raises(StoreError):
        await orchestrator.get(swarm_id)


# ------------------------------------------------------------------------ real processes


async def follow_across_restarts(target: str, swarm_id: str, after: int, within_s: float = 60) -> list[Event]:
    """What a client that reconnects does: WatchSwarm from its last sequence until the swarm ends,
    reconnecting (with a new connection) whenever the orchestrator goes away."""
    events: list[Event] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            async with AsyncSwarmClient(target) as client:
                async for event in client.watch(swarm_id, events[-1].sequence if events else after):
                    events.append(event)
                    if event.WhichOneof("kind") in TERMINAL:
                        return events
        except SwarmError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"the swarm did not end within {within_s}s: {kinds(events)[-5:]}")


async def crash_and_restart(
    running: Stack,
    agents: int,
    kill_when: Callable[[list[Event]], bool],
    restart_args: list[str],
) -> tuple[list[Event], list[Event], list[Event], list[Event], orchestrator_pb2.Swarm]:
    """Starts a swarm with RunSwarm and a watcher beside it; SIGKILLs the orchestrator when
    `kill_when(events seen so far)`, restarts it on the same --db and port, and lets the RunSwarm
    caller reconnect from its last sequence. Returns what the caller saw before the crash and after
    it, what the watcher saw, the whole log and GetSwarm, all read after the restart."""
    async with AsyncSwarmClient(running.target) as client:
        seen: list[Event] = []
        run = client.run(IDEA, agents)
        seen.append(await asyncio.wait_for(anext(run), 10))
        swarm_id = seen[0].swarm_id
        watcher = asyncio.create_task(follow_across_restarts(running.target, swarm_id, 0))

        async def until_kill() -> None:
            while not kill_when(seen):
                event = await anext(run, None)
                assert event is not None, f"the swarm ended before the kill point: {kinds(seen)}"
                seen.append(event)
            running.orchestrator.signal(signal.SIGKILL)

        await asyncio.wait_for(until_kill(), 30)
        await run.aclose()
    await asyncio.to_thread(running.restart_orchestrator, args=restart_args)
    rest = await follow_across_restarts(running.target, swarm_id, seen[-1].sequence)
    watched = await asyncio.wait_for(watcher, 60)
    async with AsyncSwarmClient(running.target) as client:
        whole = [e async for e in client.watch(swarm_id)]
        view = await client.get(swarm_id)
    return seen, rest, watched, whole, view


def count(events: list[Event], kind: str) -> int:
    return kinds(events).count(kind)


async def test_a_swarm_killed_while_planning_plans_once_after_the_restart_and_completes() -> None:
    with stack(workers=2, sim_latency_ms=100, orchestrator_args=["--sim-latency-ms", "5000"]) as running:
        seen, rest, watched, whole, view = await crash_and_restart(
            running, 3, lambda events: True, restart_args=["--sim-latency-ms", "100"]
        )
    assert kinds(seen) == ["accepted"], "killed while the model was planning"
    assert seen + rest == whole == watched, "reconnected from the last sequence: no gap, no duplicate"
    assert_resumed_and_completed(whole, 3)
    assert kinds(whole)[:3] == ["accepted", "swarm_resumed", "plan_created"]
    assert_view_matches(view, whole)


async def test_a_swarm_killed_mid_dispatch_runs_no_completed_subtask_again() -> None:
    def mid_dispatch(events: list[Event]) -> bool:
        # Two subtasks done and the next two running (one slot per worker).
        return count(events, "subtask_completed") >= 2 and count(events, "subtask_started") >= 4

    with stack(
        workers=2,
        sim_latency_ms=1200,
        worker_args=["--max-concurrency", "1"],
        orchestrator_args=["--sim-latency-ms", "50"],
    ) as running:
        seen, rest, watched, whole, view = await crash_and_restart(running, 5, mid_dispatch, restart_args=[])
    assert seen + rest == whole == watched
    assert_resumed_and_completed(whole, 5)
    assert_attempts_continue(whole)
    assert_view_matches(view, whole)
    done_before = {e.subtask_completed.subtask_id for e in seen if e.HasField("subtask_completed")}
    resumed = next(e.swarm_resumed for e in whole if e.HasField("swarm_resumed"))
    assert set(resumed.completed_subtasks) == done_before and len(done_before) >= 2
    assert len(resumed.pending_subtasks) == 5 - len(done_before)
    after = whole[kinds(whole).index("swarm_resumed") :]
    assert not {e.subtask_started.subtask_id for e in after if e.HasField("subtask_started")} & done_before
    cut_off = [
        e.subtask_failed
        for e in after
        if e.HasField("subtask_failed") and e.subtask_failed.error == RESTARTED
    ]
    assert len(cut_off) >= 1 and all(f.will_retry for f in cut_off), "the running attempts were cut off"


async def test_a_swarm_killed_during_synthesis_keeps_its_subtasks_and_synthesizes_afresh() -> None:
    with stack(workers=2, sim_latency_ms=50, orchestrator_args=["--sim-latency-ms", "2000"]) as running:
        seen, rest, watched, whole, view = await crash_and_restart(
            running,
            4,
            lambda events: count(events, "synthesis_delta") >= 1,
            restart_args=["--sim-latency-ms", "100"],
        )
    assert seen + rest == whole == watched
    assert_resumed_and_completed(whole, 4)
    assert_view_matches(view, whole)
    after = whole[kinds(whole).index("swarm_resumed") :]
    assert count(after, "subtask_started") == 0, "no subtask runs again"
    assert {e.synthesis_delta.attempt for e in after if e.HasField("synthesis_delta")} == {2}


async def test_a_sigterm_leaves_a_running_swarm_to_the_next_start() -> None:
    with stack(
        workers=2,
        sim_latency_ms=1500,
        orchestrator_args=["--sim-latency-ms", "50", "--shutdown-grace", "0.2"],
    ) as running:
        # Resuming off: the stream's own end is what is checked here, not the client's resume.
        async with AsyncSwarmClient(running.target, resume_within_s=0) as client:
            seen: list[Event] = []
            stopping = False
            with pytest.raises(Unavailable, match="WatchSwarm it after sequence"):
                async for event in client.run(IDEA, 4):
                    seen.append(event)
                    # One SIGTERM: a second, once the service has let go of its handler, kills it.
                    if event.HasField("subtask_delta") and not stopping:
                        running.orchestrator.signal(signal.SIGTERM)
                        stopping = True
        assert running.orchestrator.popen.wait(20) == 0
        assert "1 unfinished swarm(s) left to resume" in running.orchestrator.output()
        await asyncio.to_thread(running.restart_orchestrator, kill=False)
        rest = await follow_across_restarts(running.target, seen[0].swarm_id, seen[-1].sequence)
    assert_resumed_and_completed(seen + rest, 4)
    assert_attempts_continue(seen + rest)
    assert count(seen + rest, "swarm_cancelled") == 0


async def test_a_run_swarm_with_a_seen_request_id_streams_that_swarm_across_restarts() -> None:
    with stack(workers=2, sim_latency_ms=800) as running:
        async with AsyncSwarmClient(running.target) as client:
            first = client.run(IDEA, 3, request_id="order-17", detach=True)
            accepted = await anext(first)
            again = [e async for e in client.run(IDEA, 3, request_id="order-17")]
            rest = [e async for e in first]
        assert again == [accepted, *rest], "the second call streamed the first swarm"
        assert_completed(again, 3)
        running.restart_orchestrator()
        async with AsyncSwarmClient(running.target) as client:
            replayed = [e async for e in client.run(IDEA, 3, request_id="order-17")]
            listed = await client.list(page_size=100)
        assert replayed == again
        assert [s.swarm_id for s in listed.swarms] == [accepted.swarm_id], "no second swarm was started"


async def test_swarms_outlive_a_restart_in_get_list_and_watch() -> None:
    with stack(workers=2, sim_latency_ms=20) as running:
        async with AsyncSwarmClient(running.target) as client:
            runs = [[e async for e in client.run(f"idea {i}", 2)] for i in range(3)]
            before = [await client.get(events[0].swarm_id) for events in runs]
        running.restart_orchestrator(kill=False)
        async with AsyncSwarmClient(running.target) as client:
            after = [await client.get(events[0].swarm_id) for events in runs]
            page = await client.list(page_size=2)
            rest = await client.list(page_size=2, page_token=page.next_page_token)
            completed = await client.list(state=orchestrator_pb2.SWARM_STATE_COMPLETED)
            running_now = await client.list(state=orchestrator_pb2.SWARM_STATE_RUNNING)
            watched = [[e async for e in client.watch(events[0].swarm_id)] for events in runs]
    assert after == before
    ids = [events[0].swarm_id for events in runs]
    assert [s.swarm_id for s in [*page.swarms, *rest.swarms]] == ids[::-1] and not rest.next_page_token
    assert [s.swarm_id for s in completed.swarms] == ids[::-1] and not running_now.swarms
    assert watched == runs


async def test_finished_swarms_are_deleted_once_past_the_retention() -> None:
    with stack(workers=1, sim_latency_ms=20, orchestrator_args=["--retention", "1"]) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA, 1)]
            assert (await client.get(events[0].swarm_id)).state == orchestrator_pb2.SWARM_STATE_COMPLETED
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    await client.get(events[0].swarm_id)
                except NotFound:
                    break
                await asyncio.sleep(0.25)
            else:
                pytest.fail("the finished swarm was still there 15 s after its retention of 1 s")
            assert not (await client.list()).swarms


def start_fails(db: Path) -> subprocess.CompletedProcess[str]:
    """The orchestrator on `db`, expected to refuse to start."""
    return subprocess.run(
        [
            str(BIN / "swarm-orchestrator"),
            "--listen",
            "127.0.0.1:0",
            "--provider",
            "simulated",
            "--db",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def corrupt(tmp: Path) -> tuple[Path, str]:
    db = tmp / "s.db"
    db.write_bytes(b"\x00garbage\xff" * 1000)
    return db, f"cannot use the database {db}: file is not a database"


def unwritable(tmp: Path) -> tuple[Path, str]:
    (tmp / "file").write_text("a file where a directory should be")
    db = tmp / "file" / "s.db"
    return db, f"cannot open the database {db}: Not a directory"


@pytest.mark.parametrize("prepare", [corrupt, unwritable])
def test_a_database_that_cannot_be_used_stops_the_start_with_one_clear_line(
    tmp_path: Path, prepare: Callable[[Path], tuple[Path, str]]
) -> None:
    db, message = prepare(tmp_path)
    done = start_fails(db)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"swarm-orchestrator: {message}"]


def test_a_database_in_use_by_a_running_orchestrator_is_refused() -> None:
    with stack(workers=1) as running:
        done = start_fails(running.db)
        assert running.orchestrator.popen.poll() is None
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"swarm-orchestrator: the database {running.db} is in use by another orchestrator"
    ]
