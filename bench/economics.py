"""What swarms spend, measured: the prompt cache, straggler hedging, and the overhead against the
bare SDK. Each compares two figures taken in the same run.

- **cache**: the workers' input cost of a 10-agent swarm on a 20 KiB idea, with caching and
  without, through real services on the anthropic provider (the real SDK) against the fake Messages
  API (`fakes.messages_api`, which caches as the real API does). Two orchestrators share the
  workers and the fake; one runs with `--no-prompt-caching`. Target: at least 70% less.
- **hedge**: 64 subtasks whose answers take lognormal times (median 1 s, sigma 1.0), on workers with
  room for all of them and their hedges, with hedging and without. The simulated provider's seed
  gives each subtask's first attempt the same time in both swarms. Target: a makespan at least
  1.5 times shorter, with at most 15% extra model calls.
- **overhead**: time to the first token, through the whole system (RunSwarm to the first worker
  token at the client, less the planning call) and by calling the SDK directly, against the same
  fake Messages API, one agent at a time. Target: p50 overhead at most 5 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic

from bench.common import Context, Target, client_channel, median, percentile, rounded, run_swarm
from fakes.messages_api import FakeMessagesAPI, realistic_answer
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client.stack import stack, start

TITLE = "economics: prompt cache, hedging, overhead against the bare SDK"
KEY = "sk-ant-bench"
MODEL = "claude-sonnet-5-5"
IDEA_20K = ("Plan the rollout of a city-wide bike-share: stations, pricing, fleet, operations. " * 260)[
    :20480
]
TARGETS = {
    "cache.saving": Target(">=", 0.70),
    "hedge.speedup": Target(">=", 1.5),
    "hedge.extra_calls": Target("<=", 0.15),
    "overhead.p50_ms": Target("<=", 5.0),
}
UNITS = {
    "cache.saving": "ratio",
    "cache.cached_usd": "$",
    "cache.uncached_usd": "$",
    "hedge.speedup": "ratio",
    "hedge.extra_calls": "ratio",
    "hedge.hedged_s": "s",
    "hedge.plain_s": "s",
    "overhead.p50_ms": "ms",
    "overhead.p90_ms": "ms",
    "overhead.system_p50_ms": "ms",
    "overhead.sdk_p50_ms": "ms",
}


def _stub(channel: Any) -> orchestrator_pb2_grpc.OrchestratorServiceAsyncStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


# ---- cache -----------------------------------------------------------------------------------


async def _workers_input_usd(target: str) -> float:
    async with client_channel(target) as channel:
        trace = await run_swarm(_stub(channel), 10, timeout_s=120, idea=IDEA_20K)
    trace.require_completed()
    return sum(
        event.subtask_completed.usage.cost_usd
        - event.subtask_completed.usage.output_tokens * 10.0 / 1e6  # the output, at Sonnet 5.5's price
        for _, event in trace.kinds("subtask_completed")
    )


def cache() -> dict[str, Any]:
    provider = ["--provider", "anthropic", "--model", MODEL]
    with FakeMessagesAPI(api_key=KEY, answer=realistic_answer) as fake:
        env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.base_url}
        with stack(2, worker_args=provider, orchestrator_args=provider, env=env) as running:
            workers = ",".join(w.address for w in running.workers)
            uncached_args = [*provider, "--workers", workers, "--db", ":memory:", "--no-prompt-caching"]
            uncached = start("orchestrator-uncached", "swarm-orchestrator", uncached_args, env)
            try:
                without = asyncio.run(_workers_input_usd(uncached.address))
            finally:
                uncached.stop()
            with_cache = asyncio.run(_workers_input_usd(running.target))
    return {
        "saving": rounded(1 - with_cache / without),
        "cached_usd": rounded(with_cache, 5),
        "uncached_usd": rounded(without, 5),
    }


# ---- hedge -----------------------------------------------------------------------------------


async def _makespan(target: str, hedging: int) -> tuple[float, int]:
    async with client_channel(target) as channel:
        stub = _stub(channel)
        request = orchestrator_pb2.RunSwarmRequest(idea="hedging", num_agents=64, hedging=hedging)  # type: ignore[arg-type]
        received: list[tuple[float, Any]] = []
        async for response in stub.RunSwarm(request, timeout=120):
            received.append((time.time(), response.event))
    kinds = [e.WhichOneof("kind") for _, e in received]
    if kinds[-1] != "swarm_completed":
        raise RuntimeError(f"the swarm did not complete: {received[-1][1]}")
    planned = next(e.time.ToNanoseconds() / 1e9 for _, e in received if e.HasField("plan_created"))
    last = max(t for t, e in received if e.HasField("subtask_completed"))
    return last - planned, kinds.count("subtask_started")


def hedge() -> dict[str, Any]:
    worker = [
        "--max-concurrency",
        "80",
        "--sim-latency-sigma",
        "1.0",
        "--sim-seed",
        "11",
        "--sim-chunks",
        "4",
    ]
    with stack(
        2, worker_args=worker, sim_latency_ms=1000, orchestrator_args=["--sim-latency-ms", "0"]
    ) as running:
        plain_s, plain_calls = asyncio.run(_makespan(running.target, orchestrator_pb2.HEDGING_OFF))
        hedged_s, hedged_calls = asyncio.run(_makespan(running.target, orchestrator_pb2.HEDGING_ON))
    return {
        "speedup": rounded(plain_s / hedged_s),
        "extra_calls": rounded(hedged_calls / plain_calls - 1),
        "hedged_s": rounded(hedged_s),
        "plain_s": rounded(plain_s),
    }


# ---- overhead --------------------------------------------------------------------------------


async def _system_ttft(target: str, runs: int) -> list[float]:
    times: list[float] = []
    async with client_channel(target) as channel:
        stub = _stub(channel)
        for _ in range(runs + 2):
            trace = await run_swarm(stub, 1, timeout_s=60)
            trace.require_completed()
            planning = trace.stamped("plan_created") - trace.stamped("accepted")
            times.append(trace.first("subtask_delta") - trace.started - planning)
    return times[2:]  # the first ones open connections


async def _sdk_ttft(base_url: str, runs: int) -> list[float]:
    times: list[float] = []
    async with anthropic.AsyncAnthropic(api_key=KEY, base_url=base_url) as client:
        for _ in range(runs + 2):
            began = time.time()
            async with client.messages.stream(
                model=MODEL,
                max_tokens=1024,
                system="s",
                messages=[{"role": "user", "content": "Subtask: one"}],
            ) as stream:
                async for _text in stream.text_stream:
                    times.append(time.time() - began)
                    break
    return times[2:]


def overhead(runs: int) -> dict[str, Any]:
    provider = ["--provider", "anthropic", "--model", MODEL]
    with FakeMessagesAPI(api_key=KEY) as fake:
        env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.base_url}
        orchestrator = [*provider, "--delta-window-ms", "0", "--db", ":memory:"]
        with stack(1, worker_args=provider, orchestrator_args=orchestrator, env=env) as running:
            system = asyncio.run(_system_ttft(running.target, runs))
        sdk = asyncio.run(_sdk_ttft(fake.base_url, runs))
    return {
        "p50_ms": rounded((median(system) - median(sdk)) * 1000, 2),
        "p90_ms": rounded((percentile(system, 90) - percentile(sdk, 90)) * 1000, 2),
        "system_p50_ms": rounded(median(system) * 1000, 2),
        "sdk_p50_ms": rounded(median(sdk) * 1000, 2),
    }


def run(ctx: Context) -> dict[str, Any]:
    parts = {"cache": cache(), "hedge": hedge(), "overhead": overhead(10 if ctx.quick else 30)}
    return {f"{part}.{name}": value for part, figures in parts.items() for name, value in figures.items()}
