"""The client-only install: `pip install clients/python` into a fresh venv gives an application the
Python client and its generated stubs, with grpcio and protobuf and none of the services' code or
dependencies, and with it the application runs a swarm.

The venv is new for the test, and pip fetches what it needs from the machine's package registry.
The distribution is built from a copy of just protos/, clients/swarm_client and clients/python,
which shows that it needs nothing else of the repository (and keeps the checkout clean).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stack import Stack

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "gen" / "swarm" / "v1"
# What the client needs, and what pip brings along for them; nothing else may be installed.
ALLOWED = {
    "swarm-client", "grpcio", "grpcio-status", "protobuf", "googleapis-common-protos",
    "typing-extensions", "pip", "setuptools",
}  # fmt: skip
# The services' code and dependencies, none of which an application of the client should get.
ABSENT = [
    "anthropic",
    "pydantic",
    "rich",
    "starlette",
    "orchestrator_service",
    "worker_service",
    "swarm_common",
]

APPLICATION = """
import asyncio, importlib.util, json, sys
from swarm_client import AsyncSwarmClient, SwarmClient

target, absent = sys.argv[1], sys.argv[2].split(",")
with SwarmClient(target) as client:
    events = list(client.run("An application of the client alone", agents=2))

async def watch(swarm_id):
    async with AsyncSwarmClient(target) as client:
        return [event async for event in client.watch(swarm_id)], await client.info()

watched, info = asyncio.run(watch(events[-1].swarm_id))
print(json.dumps({
    "kinds": [event.WhichOneof("kind") for event in events],
    "watched": len(watched),
    "max_agents": info.max_agents,
    "present": [name for name in absent if importlib.util.find_spec(name) is not None],
}))
"""


def run(command: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    assert result.returncode == 0, f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("client-only")
    source = scratch / "repo"
    for part in ("protos", "clients/swarm_client", "clients/python"):
        shutil.copytree(
            REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "src", "build")
        )
    venv = scratch / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    # The one command README gives, from a fresh venv.
    run([str(venv / "bin" / "pip"), "install", "--quiet", str(source / "clients" / "python")], timeout=600)
    return venv


def test_the_client_alone_installs_with_grpcio_and_protobuf_only(client_venv: Path) -> None:
    listed = run([str(client_venv / "bin" / "pip"), "list", "--format", "json"], timeout=60).stdout
    installed = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed)}
    assert {"swarm-client", "grpcio", "protobuf"} <= installed
    assert installed <= ALLOWED, f"more than the client needs: {sorted(installed - ALLOWED)}"


def test_its_stubs_are_the_ones_make_protos_generates(client_venv: Path) -> None:
    (site,) = client_venv.glob("lib/python*/site-packages")
    installed = site / "swarm" / "v1"
    names = sorted(path.name for path in GENERATED.glob("*_pb2*.py*"))
    assert names and names == sorted(path.name for path in installed.glob("*_pb2*.py*"))
    for name in names:
        assert (installed / name).read_bytes() == (GENERATED / name).read_bytes(), name
    assert (site / "swarm_client" / "py.typed").exists()


def test_an_application_runs_a_swarm_with_the_client_alone(client_venv: Path, swarm_stack: Stack) -> None:
    python = str(client_venv / "bin" / "python")
    # Run from the venv, not from the checkout, whose packages would be importable from its root.
    command = [python, "-c", APPLICATION, swarm_stack.target, ",".join(ABSENT)]
    output = run(command, timeout=120, cwd=client_venv).stdout
    report = json.loads(output)
    assert report["kinds"][0] == "accepted" and report["kinds"][-1] == "swarm_completed", report
    assert report["kinds"].count("subtask_completed") == 2
    assert report["watched"] == len(report["kinds"]), "WatchSwarm replays every event"
    assert report["max_agents"] > 0
    assert report["present"] == [], "the services' code or dependencies came along"
