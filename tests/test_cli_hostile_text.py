"""The CLI shows what others wrote (ideas, plan titles, outputs, errors, worker ids) as text: never
as rich markup, never as commands to the terminal. The model is the local fake Messages API,
answering with text a hostile idea or model could produce; rich draws as on a terminal."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from test_cli import swarm
from test_polyglot import NODE_DIR, RUN_SWARM, require_node

from fakes.messages_api import FakeMessagesAPI, Fault, default_answer
from stack import Stack, stack
from swarm_client import SwarmClient

KEY = "sk-ant-test-0123456789"
MARKUP = "[/] [link=https://evil.example]click me[/link] [bold red]loud :warning:"
# Each would act on the terminal if printed raw: clear the screen, retitle the window, a link whose
# address is hidden (OSC 8), an 8-bit CSI, a carriage return that overwrites the line, and a bidi
# override that shows the rest backwards.
COMMANDS = (
    "\x1b[2J\x1b]0;pwned\x07\x1b]8;;https://evil.example\x07hidden\x1b]8;;\x07\x9b2J\rspoof\u202eevil\u202c"
)
HOSTILE = f"{MARKUP} {COMMANDS}"
# None of these may reach the terminal; rich's own drawing uses none of them.
FORBIDDEN = ["\x1b[2J", "\x1b]", "\x9b", "\r", "\u202e", "pwned", "⚠"]
WORKER_ID = "w[/]\x1b[2J"
# rich writes colour, live frames and links as to a terminal; wide enough that no line wraps
TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "300"}


def hostile_answer(body: dict[str, Any]) -> str:
    """Plans whose titles carry the hostile text; answers and syntheses that carry it too, with a
    Markdown link whose address must stay visible."""
    answer = default_answer(body)
    try:
        plan = json.loads(answer)
    except ValueError:
        return f"{HOSTILE}\n\nsee [the docs](https://evil.example/docs)\n\n{answer}"
    for subtask in plan["subtasks"]:
        subtask["title"] = f"{HOSTILE} {subtask['title']}"
    return json.dumps(plan)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(api_key=KEY, chunks=3, answer=hostile_answer) as api:
        yield api


@pytest.fixture(scope="module")
def hostile_stack(fake: FakeMessagesAPI) -> Iterator[Stack]:
    args = ["--provider", "anthropic"]
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.base_url}
    with stack(
        workers=1,
        worker_args=args,
        per_worker_args=[["--worker-id", WORKER_ID]],
        orchestrator_args=args,
        env=env,
    ) as running:
        yield running


def visible(output: str) -> str:
    """What the terminal shows: the output without rich's own colours and cursor moves."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)


def assert_shown_as_text(output: str) -> None:
    assert "Traceback" not in output and "MarkupError" not in output, output
    for sequence in FORBIDDEN:
        assert sequence not in output, f"{sequence!r} reached the terminal"
    assert MARKUP in visible(output), "markup is shown as written"


def test_the_live_view_of_run_shows_hostile_text_as_text(hostile_stack: Stack) -> None:
    ran = swarm("--target", hostile_stack.target, "run", HOSTILE, "-n", "2", env=TERMINAL)
    assert ran.returncode == 0, ran.stderr
    assert_shown_as_text(ran.stdout + ran.stderr)
    assert "w[/]" in visible(ran.stdout), "the worker id, without its escape sequence"
    assert "the docs (https://evil.example/docs)" in visible(ran.stdout), "a link shows its address"


def test_list_get_and_watch_show_a_hostile_swarm_as_text(hostile_stack: Stack) -> None:
    with SwarmClient(hostile_stack.target) as client:
        swarm_id = next(client.run(HOSTILE, 2, detach=True)).swarm_id
        assert list(client.watch(swarm_id))[-1].HasField("swarm_completed")
    target = ["--target", hostile_stack.target]
    listed = swarm(*target, "list", env=TERMINAL)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert "[/] [link=https://evil.example]click me[/link]" in visible(listed.stdout)
    for command in (("get", swarm_id), ("watch", swarm_id)):
        shown = swarm(*target, *command, env=TERMINAL)
        assert shown.returncode == 0, shown.stderr
        assert_shown_as_text(shown.stdout + shown.stderr)
    assert "w[/]" in visible(shown.stdout)


def test_json_lines_escape_what_json_leaves_raw_and_keep_the_text_intact(hostile_stack: Stack) -> None:
    ran = swarm("--target", hostile_stack.target, "run", HOSTILE, "-n", "1", "--json")
    assert ran.returncode == 0, ran.stderr
    for sequence in FORBIDDEN[:-2]:  # the literal words are data here, escaped or not
        assert sequence not in ran.stdout
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    assert events[0]["accepted"]["idea"] == HOSTILE, "the same text, only escaped"


def test_a_hostile_error_is_one_line_of_text(hostile_stack: Stack, fake: FakeMessagesAPI) -> None:
    fake.script(Fault.bad_request(message=HOSTILE))  # the plan call fails for good
    ran = swarm("--target", hostile_stack.target, "run", "anything", "-n", "1", env=TERMINAL)
    assert ran.returncode == 1
    assert_shown_as_text(ran.stdout + ran.stderr)
    assert "swarm failed" in ran.stdout
    swarm_id = json.loads(swarm("--target", hostile_stack.target, "list", "--json").stdout)["swarms"][0][
        "swarm_id"
    ]
    got = swarm("--target", hostile_stack.target, "get", swarm_id, env=TERMINAL)
    assert got.returncode == 0 and "error:" in got.stdout
    assert_shown_as_text(got.stdout + got.stderr)


def test_the_node_client_escapes_what_json_leaves_raw(hostile_stack: Stack) -> None:
    command = [require_node(), str(RUN_SWARM), "--target", hostile_stack.target, "--agents", "1", HOSTILE]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=NODE_DIR)
    assert ran.returncode == 0, ran.stderr
    for sequence in FORBIDDEN[:-2]:
        assert sequence not in ran.stdout
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    assert events[0]["accepted"]["idea"] == HOSTILE
