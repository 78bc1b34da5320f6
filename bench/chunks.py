"""Streaming workloads (1d, 1h, 1i): answers of a chosen number of chunks, and each chunk's lag.

The simulated answer is normally ~250 characters, too short for hundreds of chunks (the provider
splits the text into at most one chunk per character). So the workers pad every answer to a number
of words (`--sim-answer-words`), chosen here with the provider itself, before the run, so that every
answer splits into (nearly) the chunks asked for, of ~20 characters each, like a model's deltas.
The chunk counts actually streamed are measured and reported.

Lag. The worker stamps nothing, so each chunk's lag is taken from its known schedule: the
simulated provider emits chunk j of an answer at start + j * pause (pause = latency / chunks), and

    lag(chunk j) = client receive time of the subtask_delta that carries chunk j
                   - (time of the subtask's subtask_started event + j * pause)

A delta that carries several chunks counts each of them, so the figure holds the time a chunk
waited for its delta window. subtask_started is stamped by the orchestrator just before it calls
the worker, so the lag also holds the call's set-up: it is an upper bound of the transport lag.
The simulated provider paces each chunk to its own deadline (start + j * pause), so the schedule
is what a worker really emits, give or take the worker's own event-loop delay. All clocks are this
machine's wall clock.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
from dataclasses import dataclass, field
from typing import Any

from bench.common import IDEA, SwarmTrace, median, percentile, rounded
from swarm.v1 import events_pb2
from swarm_common import prompts
from swarm_common.providers import PlanRequest, SimulatedProvider, SimulatedSettings, StreamRequest, Usage

CHUNK_CHARS = 20  # characters per chunk, like a model's deltas


async def plan(idea: str, agents: int) -> list[events_pb2.Subtask]:
    """The subtasks the orchestrator's simulated planner makes for `idea` (it is deterministic)."""
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0))
    draft = await provider.plan(PlanRequest(model="bench", idea=idea, num_agents=agents))
    return [
        events_pb2.Subtask(
            id=f"subtask-{i}", title=item["title"].strip(), instructions=item["instructions"].strip()
        )
        for i, item in enumerate(json.loads(draft.text)["subtasks"], start=1)
    ]


async def _answer_lengths(words: int, agents: int) -> list[int]:
    """The length of each answer the workers give for the benchmark's idea, padded to `words`
    (the simulated provider is deterministic; one chunk, so it is quick). The worker's prompt is
    the subtask's alone: the idea and the plan go before it, as the prefix its swarm shares."""
    provider = SimulatedProvider(SimulatedSettings(latency_ms=0, chunks=1, answer_words=words))
    lengths = []
    for subtask in await plan(IDEA, agents):
        prompt = prompts.worker_prompt(subtask.title, subtask.instructions)
        text = ""
        async for piece in provider.stream(StreamRequest(model="bench", system="", prompt=prompt)):
            if not isinstance(piece, Usage):
                text += piece
        lengths.append(len(text))
    return lengths


def pieces(length: int, chunks: int) -> int:
    """How many chunks the simulated provider splits an answer of `length` characters into."""
    size = max(1, math.ceil(length / chunks))
    return math.ceil(length / size)


def answer_words(agents: int, chunks: int) -> tuple[int, list[int]]:
    """The words (`--sim-answer-words`) that bring the longest answer to just under `chunks` x 20
    characters, so every answer splits into as close to `chunks` chunks as the provider allows: a
    bisection, bounded by the words' range. Also the answers' lengths."""
    target = CHUNK_CHARS * chunks
    low, high = 1, target  # a word and its space take at least two characters
    while low < high:
        middle = (low + high + 1) // 2
        if max(asyncio.run(_answer_lengths(middle, agents))) <= target:
            low = middle
        else:
            high = middle - 1
    return low, asyncio.run(_answer_lengths(low, agents))


@dataclass
class Streams:
    """What a client saw of a swarm's streams: per subtask the (nominal) start, the deltas with their
    receive times, and the whole output. Answers of `chunks` chunks over `latency_s`."""

    chunks: int
    latency_s: float
    started: dict[str, float] = field(default_factory=dict)
    deltas: list[tuple[float, str, str]] = field(default_factory=list)  # (received, subtask id, text)
    outputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_swarm(cls, trace: SwarmTrace, chunks: int, latency_s: float) -> Streams:
        streams = cls(chunks, latency_s)
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
            size = max(1, math.ceil(length / self.chunks))
            count = math.ceil(length / size)
            pause = self.latency_s / count
            before = done[subtask_id]
            after = before + len(text)
            done[subtask_id] = after
            last_chunk = count if after >= length else after // size
            for chunk in range(before // size + 1, last_chunk + 1):
                found.append(received - (self.started[subtask_id] + chunk * pause))
        return found

    def chunk_counts(self) -> list[int]:
        return [pieces(len(text), self.chunks) for text in self.outputs.values()]

    def delivered(self) -> int:
        """Subtasks whose deltas join to exactly their output: no text lost, doubled or reordered."""
        joined: dict[str, list[str]] = collections.defaultdict(list)
        for _, subtask_id, text in self.deltas:
            joined[subtask_id].append(text)
        return sum(1 for subtask_id, output in self.outputs.items() if "".join(joined[subtask_id]) == output)


def hop_lags(trace: SwarmTrace) -> list[float]:
    """Per delta: client receive time - the event's time (when the orchestrator appended it) (s)."""
    return [t - e.time.ToNanoseconds() / 1e9 for t, e in trace.received if e.HasField("subtask_delta")]


def event_rates(times: list[float]) -> tuple[float, float]:
    """Events per second at the client, from their receive times: the mean over the window they
    span, and the busiest second."""
    if len(times) < 2:
        return math.nan, math.nan
    times = sorted(times)
    per_second = collections.Counter(int(t - times[0]) for t in times)
    return len(times) / (times[-1] - times[0]), float(max(per_second.values()))


def ms(values: list[float], q: float) -> float:
    return rounded(percentile(values, q) * 1000, 1)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number figure as the median over the runs (others as the first run has them)."""
    figures: dict[str, Any] = {}
    for name, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            figures[name] = rounded(median([run[name] for run in runs]), 1)
        else:
            figures[name] = value
    return figures
