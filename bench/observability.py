"""obs. The cost of watching: 1a's dispatch throughput with metrics and full tracing on, against off.

Three stacks of 1a's shape run side by side (256 zero-latency simulated subtasks a swarm, one chunk
each, 2 workers with room for all of them), the same services in three configurations:

- off: no `--metrics-listen`, no OTEL_* variables. (The instruments count all the same: metrics
  are not switched off, only not served; the gauges read at scrape time cost nothing unscraped.)
- metrics: `--metrics-listen` on all three services, each scraped every second while the stack
  works (a Prometheus at 15 times its usual rate).
- traced: metrics as above, and OTEL_EXPORTER_OTLP_ENDPOINT at an OTLP/gRPC collector in this
  process with OTEL_TRACES_SAMPLER=always_on: every span is exported (the swarm, planning and its
  model calls, synthesis, and per subtask its attempt, its execution on a worker and its model
  call: 778 spans a 256-subtask swarm, whose plan is made in 6 calls), with a queue large enough
  that none is dropped (`spans_per_swarm` shows it).

The work alternates between the stacks in blocks of 2 swarms (off, metrics, traced, off, ...; 8
rounds, 4 with --quick), so the machine's drift touches all three alike. A block's throughput is its
subtasks over its time: from the first swarm's RunSwarm to the last swarm's swarm_completed, and for
the traced stack on until the collector holds every span of the block: the export is part of the
cost, so the traced services export every 10 ms (OTEL_BSP_SCHEDULE_DELAY) rather than every 5 s,
and the wait is for their work, not their timer. A configuration's figure is the median of its
blocks, after one warm-up block each.

    metrics_cost = 1 - metrics / off   (target <= 0.05)
    tracing_cost = 1 - traced / off    (target <= 0.15)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.common import Context, Target, client_channel, median, rounded, run_swarm, stack
from fakes.otlp_collector import Collector, otlp_collector
from swarm.v1 import orchestrator_pb2_grpc
from swarm_client.stack import Process, Stack

TITLE = "obs the cost of watching (1a with metrics and tracing on / off)"
AGENTS = 256
SWARMS_PER_BLOCK = 2
SCRAPE_EVERY_S = 1.0
TARGETS = {"metrics_cost": Target("<=", 0.05), "tracing_cost": Target("<=", 0.15)}
UNITS = {
    "off_subtasks_per_s": "subtasks/s",
    "metrics_subtasks_per_s": "subtasks/s",
    "traced_subtasks_per_s": "subtasks/s",
    "metrics_cost": "ratio",
    "tracing_cost": "ratio",
    "spans_per_swarm": "spans",
}
METRICS_LINE = re.compile(r"metrics served on http://([^/\s\"]+)/metrics")
METRICS = ["--metrics-listen", "127.0.0.1:0"]
CONFIGS = ("off", "metrics", "traced")


class Scraper:
    """Scrapes the processes' /metrics every second, while `active` is set."""

    def __init__(self, processes: list[Process]) -> None:
        self.urls = [_metrics_url(process) for process in processes]
        self.active = threading.Event()
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scrape, name="scraper", daemon=True)
        self._thread.start()

    def _scrape(self) -> None:
        while not self._stop.is_set():
            if not self.active.wait(0.1):
                continue
            for url in self.urls:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
            self.scrapes += 1
            self._stop.wait(SCRAPE_EVERY_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _metrics_url(process: Process) -> str:
    for line in process.lines:
        match = METRICS_LINE.search(line)
        if match:
            return f"http://{match.group(1)}/metrics"
    raise RuntimeError(f"{process.name} serves no metrics")


@dataclass
class Config:
    name: str
    stack: Stack
    scraper: Scraper | None = None
    collector: Collector | None = None
    spans_per_swarm: float = 0.0
    rates: list[float] = field(default_factory=list)


async def _block(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, config: Config) -> float:
    """One block of swarms on the config's stack: its throughput, in subtasks/s."""
    if config.scraper is not None:
        config.scraper.active.set()
    spans_before = config.collector.count if config.collector is not None else 0
    started = time.time()
    try:
        for _ in range(SWARMS_PER_BLOCK):
            trace = await run_swarm(stub, AGENTS, timeout_s=60)
            trace.require_completed()
        ended = trace.last("swarm_completed")
        if config.collector is not None and config.spans_per_swarm:
            expected = spans_before + SWARMS_PER_BLOCK * config.spans_per_swarm
            ended = await _until(lambda: config.collector is not None and config.collector.count >= expected)
    finally:
        if config.scraper is not None:
            config.scraper.active.clear()
    return SWARMS_PER_BLOCK * AGENTS / (ended - started)


async def _until(done: Callable[[], bool], timeout_s: float = 30.0) -> float:
    """The time `done` came true (polled every millisecond)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("the collector did not get every span in time")
        await asyncio.sleep(0.001)
    return time.time()


async def _settled(collector: Collector) -> int:
    """The collector's count once it has not changed for half a second: every span is in."""
    count = -1
    while count != collector.count:
        count = collector.count
        await asyncio.sleep(0.5)
    return count


async def _measure(configs: list[Config], rounds: int) -> None:
    async with contextlib.AsyncExitStack() as channels:
        stubs = []
        for config in configs:
            channel = await channels.enter_async_context(client_channel(config.stack.target))
            await asyncio.wait_for(channel.channel_ready(), 10)
            stubs.append(orchestrator_pb2_grpc.OrchestratorServiceStub(channel))
        for config, stub in zip(configs, stubs, strict=True):
            await _block(stub, config)  # warm-up
            if config.collector is not None:
                config.spans_per_swarm = await _settled(config.collector) / SWARMS_PER_BLOCK
        for _ in range(rounds):
            for config, stub in zip(configs, stubs, strict=True):
                config.rates.append(await _block(stub, config))


@contextmanager
def _stacks(collector: Collector, endpoint: str) -> Iterator[list[Config]]:
    traced_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100000",
        "OTEL_BSP_SCHEDULE_DELAY": "10",
    }
    with ExitStack() as exits:
        configs = []
        for name in CONFIGS:
            flags = [] if name == "off" else METRICS
            services = exits.enter_context(
                stack(
                    workers=2,
                    max_concurrency=AGENTS,
                    worker_latency_ms=0,
                    worker_chunks=1,
                    orchestrator_args=flags,
                    worker_args=flags,
                    env=traced_env if name == "traced" else None,
                )
            )
            config = Config(name, services, collector=collector if name == "traced" else None)
            if flags:
                config.scraper = Scraper([services.orchestrator, *services.workers])
                exits.callback(config.scraper.close)
            configs.append(config)
        yield configs


def run(ctx: Context) -> dict[str, Any]:
    rounds = 4 if ctx.quick else 8
    with otlp_collector(keep=False) as (collector, endpoint), _stacks(collector, endpoint) as configs:
        asyncio.run(_measure(configs, rounds))
        scrapes = [config.scraper.scrapes for config in configs if config.scraper is not None]
    if not all(scrapes):
        raise RuntimeError("a stack with metrics on was never scraped")
    off, with_metrics, traced = (median(config.rates) for config in configs)
    return {
        "off_subtasks_per_s": rounded(off, 1),
        "metrics_subtasks_per_s": rounded(with_metrics, 1),
        "traced_subtasks_per_s": rounded(traced, 1),
        "metrics_cost": rounded(1 - with_metrics / off),
        "tracing_cost": rounded(1 - traced / off),
        "spans_per_swarm": rounded(configs[2].spans_per_swarm, 1),
        **{f"runs_{config.name}": [rounded(rate, 1) for rate in config.rates] for config in configs},
    }
