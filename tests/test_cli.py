"""The `swarm` CLI as a user runs it: a subprocess against real services."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from google.protobuf.json_format import ParseDict

from stack import Stack
from swarm.v1 import events_pb2
from swarm_checks import assert_completed

SWARM = str(Path(sys.executable).parent / "swarm")


def swarm(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    full_env.update({"COLUMNS": "120", **(env or {})})
    return subprocess.run([SWARM, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_json_prints_one_event_per_line(swarm_stack: Stack) -> None:
    done = swarm(
        "--target", swarm_stack.target, "run", "Write a field guide to city birds", "--agents", "4", "--json"
    )
    assert done.returncode == 0, done.stderr
    events = [ParseDict(json.loads(line), events_pb2.SwarmEvent()) for line in done.stdout.splitlines()]
    assert_completed(events, 4)


def test_run_shows_progress_and_the_result(swarm_stack: Stack) -> None:
    done = swarm("--target", swarm_stack.target, "run", "Write a field guide to city birds", "-n", "3")
    assert done.returncode == 0, done.stderr
    assert "provider: simulated" in done.stdout
    assert "3/3 subtasks" in done.stdout
    assert "completed in" in done.stdout and "[simulated]" in done.stdout
    for worker in ("worker-0", "worker-1"):
        assert worker in done.stdout


def test_get_list_watch_and_cancel(swarm_stack: Stack) -> None:
    ran = swarm("--target", swarm_stack.target, "run", "Catalogue the city's trees", "-n", "2", "--json")
    swarm_id = json.loads(ran.stdout.splitlines()[0])["swarm_id"]

    got = swarm("--target", swarm_stack.target, "get", swarm_id, "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["state"] == "SWARM_STATE_COMPLETED"
    shown = swarm("--target", swarm_stack.target, "get", swarm_id)
    assert "completed" in shown.stdout and "subtask-2" in shown.stdout

    listed = swarm("--target", swarm_stack.target, "list", "--state", "completed", "--json")
    assert swarm_id in {s["swarm_id"] for s in json.loads(listed.stdout)["swarms"]}

    watched = swarm("--target", swarm_stack.target, "watch", swarm_id, "--after", "2", "--json")
    sequences = [json.loads(line)["sequence"] for line in watched.stdout.splitlines()]
    assert watched.returncode == 0 and sequences[0] == "3"

    cancelled = swarm("--target", swarm_stack.target, "cancel", swarm_id)
    assert cancelled.returncode == 0 and "is completed" in cancelled.stdout, (
        "a finished swarm stays as it was"
    )


def test_unknown_swarm_and_bad_input_give_one_clear_line(swarm_stack: Stack) -> None:
    missing = swarm("--target", swarm_stack.target, "get", "nope")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr
    empty = swarm("--target", swarm_stack.target, "run", "", "-n", "2")
    assert empty.returncode == 2
    assert "idea: must not be empty" in empty.stderr and "Traceback" not in empty.stderr
    too_many = swarm("--target", swarm_stack.target, "run", "x", "-n", "9999")
    assert too_many.returncode == 2 and "num_agents" in too_many.stderr


def test_an_unreachable_orchestrator_is_one_line_and_a_non_zero_exit() -> None:
    done = swarm("--target", f"127.0.0.1:{free_port()}", "run", "anything", "-n", "2", timeout=30)
    assert done.returncode == 3
    assert "cannot reach the orchestrator" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2


def test_up_demo_runs_a_local_stack_and_stops_it(tmp_path: Path) -> None:
    done = swarm(
        "up",
        "--workers",
        "3",
        "--demo",
        "--agents",
        "5",
        "--log-dir",
        str(tmp_path),
        env={"SWARM_SIM_LATENCY_MS": "100"},
        timeout=90,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "local stack up" in done.stderr and "5/5 subtasks" in done.stdout
    assert re.search(r"web console: http://127\.0\.0\.1:\d+/", done.stderr), done.stderr
    logs = {path.name: path.read_text() for path in tmp_path.glob("*.log")}
    assert sorted(logs) == ["orchestrator.log", "web.log", "worker-1.log", "worker-2.log", "worker-3.log"]
    assert all('"msg": "worker stopped"' in logs[f"worker-{i}.log"] for i in (1, 2, 3)), "every child stopped"
    assert '"msg": "orchestrator stopped"' in logs["orchestrator.log"]


# Twelve subtasks one at a time: the swarm is still running when Ctrl-C comes.
ONE_AT_A_TIME = ["-n", "12", "--max-parallel", "1"]


def test_ctrl_c_during_run_cancels_the_swarm(swarm_stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    command = subprocess.Popen(
        [SWARM, "--target", swarm_stack.target, "run", "Survey the bridges", "--json", *ONE_AT_A_TIME],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert command.stdout is not None
        ready, _, _ = select.select([command.stdout], [], [], 30)
        assert ready, "no first event within 30 s"
        swarm_id = json.loads(command.stdout.readline())["swarm_id"]
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=30)
    finally:
        command.kill()
    assert command.returncode == 130
    assert "interrupted: the swarm is cancelled with it" in err and "Traceback" not in err
    assert "swarm_completed" not in out
    state = ""
    for _ in range(50):  # the orchestrator hears of the cancelled call within moments
        state = json.loads(swarm("--target", swarm_stack.target, "get", swarm_id, "--json").stdout)["state"]
        if state == "SWARM_STATE_CANCELLED":
            break
        time.sleep(0.1)
    assert state == "SWARM_STATE_CANCELLED"
