"""1g. A peer: the same 256-way fan-out as Ray tasks; our dispatch throughput over Ray's.

Ray is optional (`pip install -e '.[bench]'`); without it, or when a local Ray cannot start here,
the figures say `unavailable: <reason>` instead of a number.

In a child process (`python -m bench.ray_peer --child`, so every Ray process it starts goes with
it), `ray.init(num_cpus=2, include_dashboard=False)` starts a local Ray on 127.0.0.1. Each of 256
Ray tasks runs the simulated provider's stream (latency 0, one chunk, as in 1a) for one of the
same 256 worker prompts, in its own `asyncio.run`, and returns the text.

    ray_per_s      = 256 / (wall time from the first .remote() to ray.get of all 256 results)
                     (median of 3 rounds after a warm-up round, 1 with --quick)
    ours_over_ray  = 1a subtasks_per_s / ray_per_s                       (target >= 1)

Ray's start-up (seconds) is outside the measurement, as our services' start-up is outside 1a.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import ROOT, Context, Target, median, rounded

TITLE = "1g peer: 256 Ray tasks"
AGENTS = 256
NEEDS = ("dispatch",)
TARGETS = {"ours_over_ray": Target(">=", 1.0)}
UNITS = {"ray_per_s": "subtasks/s", "ours_over_ray": "ratio", "ray_init_s": "s"}
CHILD_TIMEOUT_S = 240


def _child(rounds: int) -> dict[str, Any]:
    """Runs in the child process: starts Ray, measures, shuts Ray down."""
    import ray

    from bench.common import IDEA
    from swarm_common import prompts
    from swarm_common.providers import PlanRequest, SimulatedProvider, SimulatedSettings, StreamRequest, Usage

    async def collect(prompt: str) -> str:
        provider = SimulatedProvider(SimulatedSettings(latency_ms=0, chunks=1))
        parts: list[str] = []
        async for item in provider.stream(
            StreamRequest(model="bench", system=prompts.SWARM_SYSTEM, prompt=prompt)
        ):
            if not isinstance(item, Usage):
                parts.append(item)
        return "".join(parts)

    def subtask(prompt: str) -> str:
        return asyncio.run(collect(prompt))

    planner = SimulatedProvider(SimulatedSettings(latency_ms=0))
    # The whole plan in one answer, however long: only its subtasks are needed here.
    draft = asyncio.run(
        planner.plan(PlanRequest(model="bench", idea=IDEA, num_agents=AGENTS, max_tokens=100_000))
    )
    prompt_list = [
        prompts.idea_block(IDEA) + prompts.worker_prompt(item["title"], item["instructions"])
        for item in json.loads(draft.text)["subtasks"]
    ]
    # Ray's session files (sockets, logs) go to a directory of this run's own, removed afterwards.
    scratch = tempfile.mkdtemp(prefix="ray-bench-")
    began = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=scratch,
    )
    init_s = time.perf_counter() - began
    try:
        remote = ray.remote(subtask)
        ray.get([remote.remote(p) for p in prompt_list], timeout=120)  # warm-up: workers started
        rates = []
        for _ in range(rounds):
            began = time.perf_counter()
            texts = ray.get([remote.remote(p) for p in prompt_list], timeout=120)
            rates.append(AGENTS / (time.perf_counter() - began))
            if len(texts) != AGENTS or not all(texts):
                raise RuntimeError("a Ray task lost its answer")
        return {"rates": rates, "init_s": init_s, "version": ray.__version__}
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


def _unavailable(reason: str) -> dict[str, Any]:
    text = f"unavailable: {reason}"
    return {"ray_per_s": text, "ours_over_ray": text}


def run(ctx: Context) -> dict[str, Any]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return _unavailable("ray is not installed (pip install -e '.[bench]')")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bench.ray_peer", "--child", "--rounds", "1" if ctx.quick else "3"]
    # A session of its own, so the whole group (raylet, GCS, Ray workers) can be ended if it hangs.
    child = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        child.communicate(timeout=10)
        return _unavailable(f"Ray did not finish within {CHILD_TIMEOUT_S}s")
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
            child.wait(10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return _unavailable(f"Ray failed here (exit {child.returncode}): {last[:200]}")
    found = json.loads(lines[-1])
    rate = median(found["rates"])
    ours = ctx.results.get("dispatch", {}).get("subtasks_per_s")
    return {
        "ray_per_s": rounded(rate, 1),
        "ours_over_ray": rounded(ours / rate) if isinstance(ours, int | float) else "n/a (needs dispatch)",
        "ray_init_s": rounded(found["init_s"], 2),
        "ray_version": found["version"],
        "runs_ray_per_s": [rounded(r, 1) for r in found["rates"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_peer", description=__doc__)
    parser.add_argument("--child", action="store_true", help="run the measurement (in this process)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.rounds)), flush=True)
    else:
        print(json.dumps(run(Context())))


if __name__ == "__main__":
    main()
