"""1d. Streaming: 100 agents each streaming 400 chunks at 50 chunks/s; lag from worker to client.

Setup: 2 workers with `--max-concurrency 100`, `--sim-chunks 400`, `--sim-latency-ms 8000` (400
chunks over 8 s = 50 chunks/s per agent, 5,000 chunks/s in all), and `--direct-slots 100` for the
reference; the orchestrator plans and synthesizes with 0 ms latency. A swarm of 100 agents, followed by this process as its client; 3
runs one after another on one stack (1 with --quick), every figure the median over the runs.

The simulated answer is normally ~250 characters, too short for 400 chunks (the provider splits the
text into at most one chunk per character). So the idea carries `### ` lines, which the simulated
provider lists in every answer: their length is chosen here (with the provider itself, before the
run) so that every answer is ~8,000 characters and splits into 396-400 chunks of ~20 characters.
The chunk counts and rates actually streamed are measured and reported.

Lag. The worker stamps nothing, so each chunk's lag is taken from its known schedule: the
simulated provider emits chunk j of an answer at start + j * pause (pause = 8 s / chunks), and

    lag(chunk j) = client receive time of the subtask_delta that carries chunk j
                   - (time of the subtask's subtask_started event + j * pause)

p50 and p99 over every chunk of every agent; the target is p99 <= 100 ms. A coalesced delta that
carries several chunks counts each of them, so the figure stays comparable once deltas are
coalesced. subtask_started is stamped by the orchestrator just before it calls the worker, so the
lag also holds the call's set-up: it is an upper bound of the transport lag.

The simulated provider paces each chunk to its own deadline (start + j * pause), so the schedule
is what a worker really emits, give or take the worker's own event-loop delay. (Had it paced by
one relative sleep per chunk, as it once did, every delay would push all later chunks back and the
lag would measure the simulation: hundreds of ms over 400 chunks on this machine.) To split the
lag, the same 100 streams are also run straight from the workers by this process, with no
orchestrator in the path (`direct_lag_*`, the schedule starting when the call is made): the
worker plus one hop. And the orchestrator -> client hop is measured on its own (`orch_to_client_*`:
receive time - the event's `time`, which the orchestrator stamps when it appends the delta, so it
leaves out any time a chunk waited to be coalesced). A worker that stamped each chunk's emit time
would make the lag a direct measurement rather than one against the schedule. All clocks are this
machine's wall clock.

Also: the client's event rate (subtask_delta events/s, mean and the busiest second), and CPU of
the orchestrator and of each worker over the swarm (utime + stime from /proc/PID/stat, as % of one
core), and of this client process.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    IDEA,
    Context,
    SwarmTrace,
    Target,
    client_channel,
    cpu_seconds,
    median,
    percentile,
    rounded,
    run_swarm,
    stack,
)
from bench.profiling import maybe_profile
from swarm.v1 import events_pb2, orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc
from swarm_common import prompts
from swarm_common.providers import PlanRequest, SimulatedProvider, SimulatedSettings, StreamRequest, Usage

TITLE = "1d streaming (100 agents x 400 chunks at 50/s)"
AGENTS = 100
CHUNKS = 400
CHUNKS_PER_S = 50
LATENCY_S = CHUNKS / CHUNKS_PER_S
TARGET_TEXT = 20 * CHUNKS  # characters per answer: chunks of ~20 characters, like model deltas
TARGETS = {"lag_p99_ms": Target("<=", 100)}
UNITS = {
    "lag_p50_ms": "ms",
    "lag_p99_ms": "ms",
    "direct_lag_p50_ms": "ms",
    "direct_lag_p99_ms": "ms",
    "orch_to_client_p50_ms": "ms",
    "orch_to_client_p99_ms": "ms",
    "client_events_per_s": "events/s",
    "client_events_peak_per_s": "events/s",
    "chunks_per_agent": "chunks",
    "orchestrator_cpu_pct": "% core",
    "workers_cpu_pct": "% core",
    "client_cpu_pct": "% core",
}


# ------------------------------------------------------------------------------------ the workload


async def _plan(idea: str) -> list[events_pb2.Subtask]:
    """The subtasks the orchestrator's simulated planner makes for `idea` (it is deterministic)."""
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0))
    draft = await provider.plan(PlanRequest(model="bench", idea=idea, num_agents=AGENTS))
    return [
        events_pb2.Subtask(
            id=f"subtask-{i}", title=item["title"].strip(), instructions=item["instructions"].strip()
        )
        for i, item in enumerate(json.loads(draft.text)["subtasks"], start=1)
    ]


async def _answer_lengths(idea: str) -> list[int]:
    """The length of each of the 100 answers the workers will give for `idea` (the simulated
    provider is deterministic; one chunk, so it is quick)."""
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, chunks=1))
    lengths = []
    for subtask in await _plan(idea):
        prompt = prompts.idea_block(idea) + prompts.worker_prompt(subtask.title, subtask.instructions)
        text = ""
        async for piece in provider.stream(StreamRequest(model="bench", system="", prompt=prompt)):
            if not isinstance(piece, Usage):
                text += piece
        lengths.append(len(text))
    return lengths


def _pieces(length: int) -> int:
    size = max(1, math.ceil(length / CHUNKS))
    return math.ceil(length / size)


def padded_idea() -> tuple[str, list[int]]:
    """An idea whose answers split into as close to 400 chunks as the provider allows: `### ` lines
    bring each answer to just under 8,000 characters. A bounded search over the last line's length."""
    line = "### Streaming benchmark context: keep every chunk in order and on time, " + "x" * 20
    base = _sync(_answer_lengths(IDEA))
    per_line = len(line) - 4 + 3  # the answer lists each heading as "- heading\n"
    count = max(0, (TARGET_TEXT - 60 - max(base)) // per_line)
    best: tuple[int, str, list[int]] | None = None
    for extra in range(0, per_line + 60, 3):
        idea = IDEA + "\n\n" + "\n".join([line] * count + ["### " + "y" * extra])
        lengths = _sync(_answer_lengths(idea))
        if max(lengths) > TARGET_TEXT:
            break
        score = min(_pieces(n) for n in lengths)
        if best is None or score > best[0]:
            best = (score, idea, lengths)
    if best is None:
        raise RuntimeError("no idea length gives answers of at most 8,000 characters")
    return best[1], best[2]


def _sync(work: Any) -> Any:
    return asyncio.run(work)


# --------------------------------------------------------------------------------------- the figures


@dataclass
class Streams:
    """What a client saw of the 100 streams: per subtask the (nominal) start, the deltas with their
    receive times, and the whole output."""

    started: dict[str, float] = field(default_factory=dict)
    deltas: list[tuple[float, str, str]] = field(default_factory=list)  # (received, subtask id, text)
    outputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_swarm(cls, trace: SwarmTrace) -> Streams:
        streams = cls()
        for received, event in trace.received:
            if event.HasField("subtask_started") and event.subtask_started.attempt == 1:
                streams.started[event.subtask_started.subtask_id] = event.time.ToNanoseconds() / 1e9
            elif event.HasField("subtask_delta") and event.subtask_delta.attempt == 1:
                streams.deltas.append((received, event.subtask_delta.subtask_id, event.subtask_delta.text))
            elif event.HasField("subtask_completed"):
                streams.outputs[event.subtask_completed.subtask_id] = event.subtask_completed.output
        return streams

    def chunk_lags(self) -> list[float]:
        """Per chunk: receive time of the delta that carries it - its expected emit time (s)."""
        done: dict[str, int] = collections.defaultdict(int)  # characters received so far
        found: list[float] = []
        for received, subtask_id, text in self.deltas:
            length = len(self.outputs[subtask_id])
            size = max(1, math.ceil(length / CHUNKS))
            pieces = math.ceil(length / size)
            pause = LATENCY_S / pieces
            before = done[subtask_id]
            after = before + len(text)
            done[subtask_id] = after
            last_chunk = pieces if after >= length else after // size
            for chunk in range(before // size + 1, last_chunk + 1):
                found.append(received - (self.started[subtask_id] + chunk * pause))
        return found

    def chunk_counts(self) -> list[int]:
        return [_pieces(len(text)) for text in self.outputs.values()]


def hop_lags(trace: SwarmTrace) -> list[float]:
    """Per delta: client receive time - the event's time (when the orchestrator appended it) (s)."""
    return [t - e.time.ToNanoseconds() / 1e9 for t, e in trace.received if e.HasField("subtask_delta")]


def event_rates(trace: SwarmTrace) -> tuple[float, float]:
    """subtask_delta events per second at the client: the mean over the streaming window, the busiest second."""
    times = [t for t, e in trace.received if e.HasField("subtask_delta")]
    if len(times) < 2:
        return math.nan, math.nan
    per_second = collections.Counter(int(t - times[0]) for t in times)
    return len(times) / (times[-1] - times[0]), float(max(per_second.values()))


async def _stream_once(target: str, idea: str, pids: list[int]) -> tuple[SwarmTrace, dict[str, float]]:
    """One swarm of 100 agents (no warm-up swarm: one would cost 8 s; the pool's channels are
    connected before the orchestrator listens). CPU seconds of each pid and of this process over it."""
    async with client_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        cpu_before = [cpu_seconds(pid) for pid in pids]
        client_before = time.process_time()
        started = time.monotonic()
        trace = await run_swarm(stub, AGENTS, timeout_s=LATENCY_S + 60, idea=idea)
        wall = time.monotonic() - started
        cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        return trace, {
            "wall": wall,
            "orchestrator": cpu[0],
            "workers": sum(cpu[1:]) / max(1, len(cpu) - 1),
            "client": time.process_time() - client_before,
        }


async def _direct(workers: list[str], idea: str) -> Streams:
    """The reference: the same 100 subtasks called on the workers by this process, with no
    orchestrator. The expected schedule starts when each call is made."""
    streams = Streams()
    subtasks = await _plan(idea)
    channels = [client_channel(address) for address in workers]
    try:
        stubs = [worker_pb2_grpc.WorkerServiceStub(channel) for channel in channels]

        async def one(index: int, subtask: events_pb2.Subtask) -> None:
            request = worker_pb2.ExecuteSubtaskRequest(
                swarm_id="bench-direct", subtask=subtask, attempt=1, idea=idea
            )
            parts: list[str] = []
            streams.started[subtask.id] = time.time()
            call = stubs[index % len(stubs)].ExecuteSubtask(request, timeout=LATENCY_S + 60)
            async for response in call:
                if response.HasField("result"):
                    break
                streams.deltas.append((time.time(), subtask.id, response.text))
                parts.append(response.text)
            streams.outputs[subtask.id] = "".join(parts)

        await asyncio.gather(*(one(i, s) for i, s in enumerate(subtasks)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return streams


def _ms(values: list[float], q: float) -> float:
    return rounded(percentile(values, q) * 1000, 1)


def _figures(trace: SwarmTrace, direct: Streams, cpu: dict[str, float]) -> dict[str, Any]:
    """One run's figures."""
    trace.require_completed()
    streams = Streams.of_swarm(trace)
    lags = streams.chunk_lags()
    direct_lags = direct.chunk_lags()
    hops = hop_lags(trace)
    mean_rate, peak_rate = event_rates(trace)
    counts = streams.chunk_counts()
    wall = cpu["wall"]
    return {
        "lag_p50_ms": _ms(lags, 50),
        "lag_p99_ms": _ms(lags, 99),
        "direct_lag_p50_ms": _ms(direct_lags, 50),
        "direct_lag_p99_ms": _ms(direct_lags, 99),
        "orch_to_client_p50_ms": _ms(hops, 50),
        "orch_to_client_p99_ms": _ms(hops, 99),
        "lag_max_ms": _ms(lags, 100),
        "client_events_per_s": rounded(mean_rate, 0),
        "client_events_peak_per_s": rounded(peak_rate, 0),
        "chunks_per_agent": f"{min(counts)}-{max(counts)}",
        "chunks_streamed": len(lags),
        "delta_events": trace.count("subtask_delta"),
        "swarm_wall_s": rounded(wall),
        "orchestrator_cpu_pct": rounded(100 * cpu["orchestrator"] / wall, 1),
        "workers_cpu_pct": rounded(100 * cpu["workers"] / wall, 1),
        "client_cpu_pct": rounded(100 * cpu["client"] / wall, 1),
    }


def run(ctx: Context) -> dict[str, Any]:
    """3 runs (1 with --quick), each a swarm and then its direct reference, on one stack; every
    number figure is the median over the runs, each run's own figures are kept too."""
    idea, lengths = padded_idea()
    runs: list[dict[str, Any]] = []
    with stack(
        workers=2,
        max_concurrency=AGENTS,
        worker_latency_ms=LATENCY_S * 1000,
        worker_chunks=CHUNKS,
        # The reference calls the workers directly, past the orchestrator: it needs their direct slots.
        worker_args=["--direct-slots", str(AGENTS)],
    ) as services:
        pids = [services.orchestrator.pid, *(w.pid for w in services.workers)]
        for _ in range(1 if ctx.quick else 3):
            trace, cpu = asyncio.run(_stream_once(services.target, idea, pids))
            direct = asyncio.run(_direct([w.address for w in services.workers], idea))
            runs.append(_figures(trace, direct, cpu))
        if ctx.profile_dir is not None:
            with maybe_profile(ctx, "streaming", services.orchestrator.pid):
                asyncio.run(_stream_once(services.target, idea, pids))
    figures: dict[str, Any] = {}
    for name, value in runs[0].items():
        if isinstance(value, int | float):
            figures[name] = rounded(median([run[name] for run in runs]), 1)
        else:
            figures[name] = value
    figures["answer_chars"] = f"{min(lengths)}-{max(lengths)}"
    figures["runs"] = runs
    return figures
