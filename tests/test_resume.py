"""Clients that survive: run() and watch() of both Python clients, the `swarm` CLI and the Node.js
client go on through an orchestrator SIGKILLed and restarted on the same --db, and through a TCP
connection that is cut, and each sees every sequence number exactly once. An orchestrator that
stays down past the resume window gets a clear error naming the swarm and its last sequence."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import grpc
import pytest
from tcp_proxy import TcpProxy
from test_cli import SWARM, swarm
from test_polyglot import NODE_DIR, RUN_SWARM, require_node

from stack import Stack, stack
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_checks import assert_completed, assert_well_formed, kinds
from swarm_client import (
    AsyncSwarmClient,
    Reconnecting,
    ResumeFailed,
    SwarmClient,
    SwarmEvent,
)

IDEA = "Resume me through a restart"
AGENTS = 4
LEFT_REASON = "the client cancelled RunSwarm"


def slow_stack() -> AbstractContextManager[Stack]:
    """Two workers of one slot each, so a swarm of four runs in two rounds of 0.8 s: a fault after
    the first completion lands mid-dispatch."""
    return stack(workers=2, sim_latency_ms=800, worker_args=["--max-concurrency", "1"])


def mid_dispatch(event: SwarmEvent) -> bool:
    return event.HasField("subtask_completed")


def long_subtasks_stack() -> AbstractContextManager[Stack]:
    """Subtasks of 10 s (planning 0.2 s): a swarm that a client killed at its first start is still
    running when the client, resuming, has found the restarted orchestrator, however slow the machine."""
    return stack(workers=2, sim_latency_ms=10_000, orchestrator_args=["--sim-latency-ms", "200"])


class Crash:
    """SIGKILLs the orchestrator at once, and restarts it on the same --db and port `after_s` later,
    in a thread, while the clients try to resume."""

    def __init__(self, running: Stack, after_s: float = 0.5) -> None:
        self.error: BaseException | None = None
        running.orchestrator.signal(signal.SIGKILL)

        def restart() -> None:
            try:
                running.orchestrator.popen.wait(10)
                time.sleep(after_s)
                running.restart_orchestrator()
            except BaseException as error:  # re-raised by join() in the test's thread
                self.error = error

        self._thread = threading.Thread(target=restart, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive(), "the orchestrator did not restart within 30 s"
        if self.error is not None:
            raise self.error


class Reconnects:
    """An on_reconnect that notes each attempt with the last sequence its caller had got by then."""

    def __init__(self, seen: list[SwarmEvent]) -> None:
        self.seen = seen
        self.attempts: list[tuple[Reconnecting, int]] = []

    def __call__(self, attempt: Reconnecting) -> None:
        self.attempts.append((attempt, self.seen[-1].sequence if self.seen else 0))

    def assert_resumed_where_the_caller_was(self) -> None:
        assert self.attempts, "the stream never broke"
        assert self.attempts[0][0].attempt == 1
        for attempt, caller_had in self.attempts:
            assert attempt.after_sequence == caller_had, (attempt, caller_had)


def assert_resumed_once(events: list[SwarmEvent]) -> None:
    assert_completed(events, AGENTS)
    assert kinds(events).count("swarm_resumed") == 1


# ----------------------------------------------------------------- an orchestrator restart


async def test_the_async_client_runs_and_watches_on_across_an_orchestrator_restart() -> None:
    with slow_stack() as running:
        seen: list[SwarmEvent] = []
        reconnects = Reconnects(seen)
        crash: Crash | None = None
        async with AsyncSwarmClient(running.target) as client:

            async def watch(swarm_id: str) -> list[SwarmEvent]:
                return [e async for e in client.watch(swarm_id)]

            async def run() -> asyncio.Task[list[SwarmEvent]]:
                nonlocal crash
                watcher = None
                async for event in client.run(IDEA, AGENTS, on_reconnect=reconnects):
                    seen.append(event)
                    watcher = watcher or asyncio.create_task(watch(event.swarm_id))
                    if crash is None and mid_dispatch(event):
                        crash = Crash(running)
                assert watcher is not None
                return watcher

            watcher = await asyncio.wait_for(run(), 60)
            watched = await asyncio.wait_for(watcher, 30)
        assert crash is not None
        crash.join()
    assert_resumed_once(seen)
    assert watched == seen, "watch() resumed too, and saw the same events once each"
    reconnects.assert_resumed_where_the_caller_was()


def test_the_sync_client_runs_and_watches_on_across_an_orchestrator_restart() -> None:
    with slow_stack() as running:
        seen: list[SwarmEvent] = []
        watched: list[SwarmEvent] = []
        reconnects = Reconnects(seen)
        crash: Crash | None = None

        def watch(swarm_id: str) -> None:
            with SwarmClient(running.target) as watcher:
                watched.extend(watcher.watch(swarm_id))

        watcher: threading.Thread | None = None
        with SwarmClient(running.target) as client:
            began = time.monotonic()
            for event in client.run(IDEA, AGENTS, on_reconnect=reconnects):
                seen.append(event)
                assert time.monotonic() - began < 60, "the swarm took over 60 s"
                if watcher is None:
                    watcher = threading.Thread(target=watch, args=(event.swarm_id,), daemon=True)
                    watcher.start()
                if crash is None and mid_dispatch(event):
                    crash = Crash(running)
        assert watcher is not None and crash is not None
        watcher.join(30)
        assert not watcher.is_alive()
        crash.join()
    assert_resumed_once(seen)
    assert watched == seen
    reconnects.assert_resumed_where_the_caller_was()


class Command:
    """A command run as a user runs it, its standard output read line by line as it comes."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None):
        full_env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        full_env.update({"COLUMNS": "120", **(env or {})})
        self.popen = subprocess.Popen(
            list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._changed = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        self.stderr = self.popen.stderr.read()

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if predicate(line):
                        return line
                checked = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    raise AssertionError(f"no such line within {timeout:g}s: {self.lines[-5:]} {self.stderr}")
                self._changed.wait(min(left, 0.2))

    def finish(self, timeout: float = 90) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            raise AssertionError(f"still running after {timeout:g}s: {self.lines[-5:]}") from None
        self._stderr_reader.join(10)
        return code

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)


def json_events(lines: list[str]) -> list[SwarmEvent]:
    from google.protobuf.json_format import ParseDict

    return [ParseDict(json.loads(line), events_pb2.SwarmEvent()) for line in lines if line.startswith("{")]


def is_kind(kind: str) -> Callable[[str], bool]:
    return lambda line: line.startswith("{") and kind in json.loads(line)


def test_the_cli_live_view_reconnects_and_ends_with_the_completed_swarm() -> None:
    """The reproduction: `swarm run` on a terminal, the orchestrator SIGKILLed while the swarm runs
    and restarted on the same --db half a second later."""
    with slow_stack() as running:
        cli = Command(
            [SWARM, "--target", running.target, "run", IDEA, "--agents", str(AGENTS)],
            env={"TTY_COMPATIBLE": "1"},  # rich draws the live view as on a terminal
        )
        with SwarmClient(running.target) as client:
            deadline = time.monotonic() + 30
            while not any(
                s.state == orchestrator_pb2.SUBTASK_STATE_COMPLETED
                for swarm in client.list(state=orchestrator_pb2.SWARM_STATE_RUNNING).swarms
                for s in client.get(swarm.swarm_id).subtasks
            ):
                assert time.monotonic() < deadline, "no subtask completed within 30 s"
                time.sleep(0.05)
        crash = Crash(running)
        code = cli.finish()
        crash.join()
    assert code == 0, cli.stderr
    assert "reconnecting… attempt 1" in cli.stdout
    assert "resumed after an orchestrator restart" in cli.stdout
    assert "completed in" in cli.stdout and f"{AGENTS}/{AGENTS} subtasks" in cli.stdout
    assert "Traceback" not in cli.stderr and "unavailable" not in cli.stderr


def test_the_cli_json_lines_and_watch_go_on_across_a_restart_each_event_once() -> None:
    with slow_stack() as running:
        run = Command([SWARM, "--target", running.target, "run", IDEA, "--agents", str(AGENTS), "--json"])
        swarm_id = json.loads(run.wait_for_line(is_kind("accepted")))["swarm_id"]
        watch = Command([SWARM, "--target", running.target, "watch", swarm_id, "--json"])
        run.wait_for_line(is_kind("subtask_completed"))
        crash = Crash(running)
        codes = run.finish(), watch.finish()
        crash.join()
    ran, watched = json_events(run.lines), json_events(watch.lines)
    assert codes == (0, 0), run.stderr + watch.stderr
    assert_resumed_once(ran)
    assert watched == ran
    for command in (run, watch):
        assert command.stderr.count("reconnecting…") == 1, command.stderr
        assert "the stream broke after event" in command.stderr


def test_the_node_client_goes_on_across_a_restart_each_event_once() -> None:
    node = require_node()
    with slow_stack() as running:
        client = Command(
            [node, str(RUN_SWARM), "--target", running.target, "--agents", str(AGENTS), IDEA],
            cwd=str(NODE_DIR),
        )
        client.wait_for_line(lambda line: '"subtask_completed"' in line)
        crash = Crash(running)
        code = client.finish()
        crash.join()
    assert code == 0, client.stderr
    events = [json.loads(line) for line in client.lines]
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1)), "each event once"
    names = [e["kind"] for e in events]
    assert names[0] == "accepted" and names[-1] == "swarm_completed" and names.count("swarm_resumed") == 1
    assert names.count("subtask_completed") == AGENTS
    assert "reconnecting" in client.stderr


# -------------------------------------------------------------- a connection that is cut


async def test_a_cut_connection_is_resumed_without_a_restart() -> None:
    with slow_stack() as running, TcpProxy(running.target) as proxy:
        async with AsyncSwarmClient(proxy.address) as client:
            seen: list[SwarmEvent] = []
            reconnects = Reconnects(seen)
            async for event in client.run(IDEA, AGENTS, detach=True, on_reconnect=reconnects):
                seen.append(event)
                if proxy.cuts == 0 and mid_dispatch(event):
                    assert proxy.cut() == 1
        assert running.orchestrator.popen.poll() is None, "no restart: the same orchestrator throughout"
    assert_completed(seen, AGENTS)
    assert "swarm_resumed" not in kinds(seen)
    reconnects.assert_resumed_where_the_caller_was()
    assert proxy.accepted == 2, "one connection, then one more after the cut"


def test_the_sync_client_watches_on_through_a_cut_connection() -> None:
    with slow_stack() as running, TcpProxy(running.target) as proxy:
        with SwarmClient(running.target) as direct:
            first = direct.run(IDEA, AGENTS, detach=True)
            swarm_id = next(first).swarm_id
            first.close()
        with SwarmClient(proxy.address) as client:
            watched: list[SwarmEvent] = []
            for event in client.watch(swarm_id, on_reconnect=Reconnects(watched)):
                watched.append(event)
                if proxy.cuts == 0 and mid_dispatch(event):
                    proxy.cut()
    assert_completed(watched, AGENTS)
    assert proxy.cuts == 1 and proxy.accepted == 2


def test_the_sync_client_leaves_no_call_to_the_garbage_collector_after_resuming() -> None:
    """`swarm run --json` could hang after printing its last event when it had resumed: its calls
    were kept by reference cycles (a sync call is its own exception, and its traceback held the
    calls after it), so the collector freed them at interpreter exit, where the last call's __del__
    waited for good for a lock that grpc's channel thread held when the exit stopped it. Freed as
    they end, no call is left to the collector."""

    def calls() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, grpc.Call)}

    gc.collect()
    before = calls()
    gc.disable()  # what only the collector would free stays to be counted
    try:
        with slow_stack() as running, TcpProxy(running.target) as proxy:
            with SwarmClient(proxy.address) as client:
                seen: list[SwarmEvent] = []
                for event in client.run(IDEA, AGENTS, detach=True):
                    seen.append(event)
                    if proxy.cuts == 0 and mid_dispatch(event):
                        proxy.cut()
            left = calls() - before
    finally:
        gc.enable()
    assert_completed(seen, AGENTS)
    assert proxy.cuts == 1
    assert not left, f"{len(left)} grpc calls were left to the garbage collector"


async def test_an_attached_run_whose_connection_is_cut_reports_the_cancellation_it_caused() -> None:
    """The orchestrator cancels a swarm whose RunSwarm call ends, a broken connection included:
    run() resumes, and reports that outcome as it is instead of hiding it."""
    with slow_stack() as running, TcpProxy(running.target) as proxy:
        async with AsyncSwarmClient(proxy.address) as client:
            seen: list[SwarmEvent] = []
            async for event in client.run(IDEA, AGENTS):
                seen.append(event)
                if proxy.cuts == 0 and mid_dispatch(event):
                    proxy.cut()
            view = await client.get(seen[0].swarm_id)
    assert_well_formed(seen)
    assert seen[-1].swarm_cancelled.reason == LEFT_REASON
    assert view.state == orchestrator_pb2.SWARM_STATE_CANCELLED


def test_the_cli_through_a_cut_connection_completes_detached_and_explains_an_attached_cancel() -> None:
    with slow_stack() as running, TcpProxy(running.target) as proxy:
        outcomes = []
        for detach in (["--detach"], []):
            cli = Command(
                [SWARM, "--target", proxy.address, "run", IDEA, "-n", str(AGENTS), "--json", *detach]
            )
            cli.wait_for_line(is_kind("subtask_completed"))
            proxy.cut()
            outcomes.append((cli.finish(), json_events(cli.lines), cli.stderr))
    (detached_code, detached, _), (attached_code, attached, attached_err) = outcomes
    assert detached_code == 0 and kinds(detached)[-1] == "swarm_completed"
    assert_completed(detached, AGENTS)
    assert attached_code == 1
    assert_well_formed(attached)
    assert kinds(attached)[-1] == "swarm_cancelled"
    assert (
        "reconnecting…" in attached_err and "`--detach` lets a swarm outlive its connection" in attached_err
    )


# ------------------------------------------------------------------- leaving, giving up


async def test_leaving_a_resumed_attached_run_still_cancels_the_swarm() -> None:
    """After a restart the orchestrator runs the swarm detached; the caller that leaves cancels it."""
    with long_subtasks_stack() as running:
        async with AsyncSwarmClient(running.target) as client:
            run = client.run(IDEA, AGENTS)
            crash: Crash | None = None
            async for event in run:
                if crash is None and event.HasField("subtask_started"):
                    crash = Crash(running)
                if event.HasField("swarm_resumed"):
                    break
            await run.aclose()
            assert crash is not None
            crash.join()
            view = await client.get(event.swarm_id)
    assert view.state == orchestrator_pb2.SWARM_STATE_CANCELLED
    assert view.error == LEFT_REASON


def test_ctrl_c_after_a_resume_cancels_the_swarm_as_before() -> None:
    with long_subtasks_stack() as running:
        cli = Command([SWARM, "--target", running.target, "run", IDEA, "-n", str(AGENTS), "--json"])
        swarm_id = json.loads(cli.wait_for_line(is_kind("accepted")))["swarm_id"]
        cli.wait_for_line(is_kind("subtask_started"))
        crash = Crash(running)
        cli.wait_for_line(is_kind("swarm_resumed"))
        cli.popen.send_signal(signal.SIGINT)
        code = cli.finish()
        crash.join()
        with SwarmClient(running.target) as client:
            view = client.get(swarm_id)
    assert code == 130
    assert "interrupted: the swarm is cancelled with it" in cli.stderr
    assert view.state == orchestrator_pb2.SWARM_STATE_CANCELLED and view.error == LEFT_REASON


async def test_an_orchestrator_down_past_the_window_gives_the_swarm_id_and_last_sequence() -> None:
    with slow_stack() as running:
        async with AsyncSwarmClient(running.target, resume_within_s=2) as client:
            seen: list[SwarmEvent] = []
            down_since = 0.0
            with pytest.raises(ResumeFailed) as raised:
                async for event in client.run(IDEA, AGENTS, detach=True):
                    seen.append(event)
                    if mid_dispatch(event) and running.orchestrator.popen.poll() is None:
                        running.orchestrator.signal(signal.SIGKILL)
                        down_since = time.monotonic()
            gave_up_after = time.monotonic() - down_since
        failure = raised.value
        assert (failure.swarm_id, failure.last_sequence) == (seen[0].swarm_id, seen[-1].sequence)
        assert f"swarm {failure.swarm_id}" in str(failure) and "within 2s" in str(failure)
        assert f"WatchSwarm it after sequence {failure.last_sequence}" in str(failure)
        assert 2 <= gave_up_after < 10
        # What the error promises: the swarm goes on from there once the orchestrator is back.
        running.restart_orchestrator()
        async with AsyncSwarmClient(running.target) as client:
            rest = [e async for e in client.watch(failure.swarm_id, failure.last_sequence)]
    assert_resumed_once(seen + rest)


async def test_resuming_off_reports_the_break_at_once() -> None:
    with slow_stack() as running, TcpProxy(running.target) as proxy:
        async with AsyncSwarmClient(proxy.address, resume_within_s=0) as client:
            seen: list[SwarmEvent] = []
            with pytest.raises(ResumeFailed, match="resuming is off") as raised:
                async for event in client.run(IDEA, AGENTS, detach=True):
                    seen.append(event)
                    if mid_dispatch(event):
                        proxy.cut()
        assert raised.value.last_sequence == seen[-1].sequence and proxy.accepted == 1


def test_the_cli_past_the_window_says_how_to_go_on_and_going_on_works() -> None:
    with slow_stack() as running:
        cli = Command(
            [
                SWARM,
                "--target",
                running.target,
                "--resume-within",
                "2",
                "run",
                IDEA,
                "-n",
                str(AGENTS),
                "--json",
            ]
        )
        swarm_id = json.loads(cli.wait_for_line(is_kind("accepted")))["swarm_id"]
        cli.wait_for_line(is_kind("subtask_completed"))
        running.orchestrator.signal(signal.SIGKILL)
        code = cli.finish()
        seen = json_events(cli.lines)
        last = seen[-1].sequence
        running.restart_orchestrator()
        rest = Command([SWARM, "--target", running.target, "watch", swarm_id, "--after", str(last), "--json"])
        rest_code = rest.finish()
    assert code == 3
    message = cli.stderr.strip().splitlines()[-1]
    assert message == (
        f"swarm: the stream of swarm {swarm_id} broke after event {last} and could not be resumed within "
        f"2s (cannot reach the orchestrator at {running.target}); `swarm watch {swarm_id} --after {last}` "
        "goes on from there"
    )
    assert rest_code == 0, rest.stderr
    assert_resumed_once(seen + json_events(rest.lines))


# ------------------------------------------------------------- a watch from the end onwards


def test_a_watch_from_a_finished_swarms_last_event_reports_its_end() -> None:
    with stack(workers=1, sim_latency_ms=300) as running:
        with SwarmClient(running.target) as client:
            completed = list(client.run(IDEA, 2))
            cancelled_id = next(client.run(IDEA, 2, detach=True, max_parallel=1)).swarm_id
            client.cancel(cancelled_id, "changed my mind")
            cancelled_last = client.get(cancelled_id).last_sequence
            swarm_id, last = completed[0].swarm_id, completed[-1].sequence
            assert list(client.watch(swarm_id, last)) == [], "nothing after the end, and no error"
        target = ["--target", running.target]
        shown = swarm(*target, "watch", swarm_id, "--after", str(last))
        scripted = swarm(*target, "watch", swarm_id, "--after", str(last + 5), "--json")
        gone = swarm(*target, "watch", cancelled_id, "--after", str(cancelled_last))
    assert shown.returncode == 0, shown.stderr
    assert (
        f"swarm {swarm_id} is completed; it has no events after {last} (its last is {last})" in shown.stdout
    )
    assert "completed · 2/2 subtasks" in shown.stdout and "[simulated]" in shown.stdout
    assert scripted.returncode == 0 and scripted.stdout == ""
    assert f"swarm {swarm_id} is completed; it has no events after {last + 5}" in scripted.stderr
    assert gone.returncode == 1
    assert f"swarm {cancelled_id} is cancelled" in gone.stdout and "changed my mind" in gone.stdout
