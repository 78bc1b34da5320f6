"""The contract from outside Python: buf lint, protoc, the Node.js client, and buf curl by reflection.

The buf CLI and the Node.js client's packages come from clients/node (`make test` runs `npm ci`
there). They are required, not optional: a missing tool fails these tests rather than skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from stack import Stack

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "clients" / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"
RUN_SWARM = NODE_DIR / "run-swarm.mjs"
PROTO_FILES = sorted((REPO / "protos" / "swarm" / "v1").glob("*.proto"))
INSTALL_HINT = "run `make test`, which installs it (npm ci in clients/node)"

ORCHESTRATOR_SERVICE = "swarm.v1.OrchestratorService"
WORKER_SERVICE = "swarm.v1.WorkerService"
HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def describe(self, command: Sequence[str]) -> str:
        return (
            f"$ {' '.join(map(str, command))}\n(exit {self.returncode})\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def run(command: Sequence[str | Path], *, timeout: float = 60.0, cwd: Path = REPO) -> Result:
    """Runs a command bounded by `timeout`; on expiry its whole process group is killed and the test fails.

    A process group, because `node_modules/.bin/buf` is a Node.js wrapper that starts the native binary.
    """
    args = [str(part) for part in command]
    popen = subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        stdout, stderr = popen.communicate()
        pytest.fail(f"timed out after {timeout:g}s\n" + Result(-9, stdout, stderr).describe(args))
    return Result(popen.returncode, stdout, stderr)


def require_buf() -> Path:
    if not os.access(BUF, os.X_OK):
        pytest.fail(f"the buf CLI is missing ({BUF}): {INSTALL_HINT}")
    return BUF


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (`node`) is not on PATH: install Node.js 18 or newer")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"the Node.js client's packages are missing: {INSTALL_HINT}")
    return node


def buf_curl(*args: str, timeout: float = 60.0, cwd: Path) -> Result:
    """`buf curl` over plaintext gRPC with the schema from server reflection (the default source)."""
    command = [
        require_buf(),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect",
        "--connect-timeout",
        "10",
        *args,
    ]
    result = run(command, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.describe(command)
    return result


def json_documents(text: str) -> list[Any]:
    """buf curl prints each message of a stream as its own (pretty-printed) JSON document."""
    decoder = json.JSONDecoder()
    documents, index = [], 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return documents
        document, index = decoder.raw_decode(text, index)
        documents.append(document)


# `swarm_stack` (tests/conftest.py): one orchestrator and two simulated workers for this module.

# --- the protos with stock toolchains ----------------------------------------------------------


def test_buf_lint_passes() -> None:
    command = [require_buf(), "lint"]
    result = run(command, timeout=120)
    assert result.returncode == 0, result.describe(command)
    assert result.stdout.strip() == "", result.describe(command)


def test_protoc_loads_protos_with_protos_as_the_only_import_root(tmp_path: Path) -> None:
    out = tmp_path / "swarm.binpb"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iprotos",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *(str(p.relative_to(REPO)) for p in PROTO_FILES),
    ]
    result = run(command, timeout=60)
    assert result.returncode == 0, result.describe(command)

    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    names = {f.name for f in files}
    assert {"swarm/v1/events.proto", "swarm/v1/orchestrator.proto", "swarm/v1/worker.proto"} <= names
    assert "google/protobuf/timestamp.proto" in names
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert {ORCHESTRATOR_SERVICE, WORKER_SERVICE} <= services


# --- the Node.js client ------------------------------------------------------------------------


def test_node_client_runs_a_swarm(swarm_stack: Stack) -> None:
    agents = 3
    command = [
        require_node(),
        RUN_SWARM,
        "--target",
        swarm_stack.target,
        "--agents",
        str(agents),
        "Plan a polyglot gRPC smoke test",
    ]
    result = run(command, timeout=90, cwd=NODE_DIR)
    assert result.returncode == 0, result.describe(command)

    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert events, result.describe(command)
    # longs: String, so uint64 sequence numbers arrive as strings.
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1)), result.stdout
    assert len({e["swarm_id"] for e in events}) == 1 and events[0]["swarm_id"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "accepted", kinds
    assert kinds[-1] == "swarm_completed", kinds
    assert events[0]["accepted"]["num_agents"] == agents

    plans = [e["plan_created"] for e in events if e["kind"] == "plan_created"]
    assert len(plans) == 1, kinds
    subtask_ids = [s["id"] for s in plans[0]["subtasks"]]
    assert len(subtask_ids) == agents

    completed = [e["subtask_completed"]["subtask_id"] for e in events if e["kind"] == "subtask_completed"]
    assert len(completed) == agents, kinds
    assert sorted(completed) == sorted(subtask_ids)
    assert events[-1]["swarm_completed"]["result"]


def test_node_client_reports_grpc_errors() -> None:
    command = [require_node(), RUN_SWARM, "--target", "127.0.0.1:1", "--agents", "2", "unreachable"]
    result = run(command, timeout=60, cwd=NODE_DIR)
    assert result.returncode == 1, result.describe(command)
    assert "UNAVAILABLE" in result.stderr, result.describe(command)
    assert result.stdout == ""


# --- buf curl, with server reflection as the only schema ---------------------------------------


def test_buf_curl_lists_services_by_reflection(swarm_stack: Stack, tmp_path: Path) -> None:
    # tmp_path as the working directory: no buf.yaml and no .proto files within reach.
    listed = buf_curl("--list-services", f"http://{swarm_stack.target}", cwd=tmp_path).stdout.split()
    assert ORCHESTRATOR_SERVICE in listed
    assert HEALTH_SERVICE in listed

    worker = swarm_stack.workers[0].address
    listed = buf_curl("--list-services", f"http://{worker}", cwd=tmp_path).stdout.split()
    assert WORKER_SERVICE in listed
    assert HEALTH_SERVICE in listed

    methods = buf_curl("--list-methods", f"http://{swarm_stack.target}", cwd=tmp_path).stdout.split()
    assert f"{ORCHESTRATOR_SERVICE}/RunSwarm" in methods


def test_buf_curl_runs_a_swarm_by_reflection(swarm_stack: Stack, tmp_path: Path) -> None:
    agents = 3
    request = json.dumps({"idea": "Plan a buf curl smoke test", "num_agents": agents})
    result = buf_curl(
        "-d",
        request,
        f"http://{swarm_stack.target}/{ORCHESTRATOR_SERVICE}/RunSwarm",
        timeout=90,
        cwd=tmp_path,
    )

    events = [document["event"] for document in json_documents(result.stdout)]
    assert events, result.stdout
    # Protobuf JSON: camelCase names, uint64 as strings.
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1)), result.stdout
    assert "accepted" in events[0], events[0]
    assert "swarmCompleted" in events[-1], events[-1]
    plans = [e["planCreated"] for e in events if "planCreated" in e]
    assert len(plans) == 1 and len(plans[0]["subtasks"]) == agents
    assert sum("subtaskCompleted" in e for e in events) == agents


@pytest.mark.parametrize("role", ["orchestrator", "worker"])
def test_buf_curl_health_check(swarm_stack: Stack, tmp_path: Path, role: str) -> None:
    if role == "orchestrator":
        address, service = swarm_stack.target, ORCHESTRATOR_SERVICE
    else:
        address, service = swarm_stack.workers[0].address, WORKER_SERVICE
    url = f"http://{address}/{HEALTH_SERVICE}/Check"
    for name in ("", service):
        result = buf_curl("-d", json.dumps({"service": name}), url, cwd=tmp_path)
        assert json.loads(result.stdout) == {"status": "SERVING"}, (name, result.stdout)
