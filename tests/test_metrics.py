"""Metrics as an operator sees them: a real Prometheus server scrapes a real orchestrator and two
real workers while a swarm runs, and its HTTP API is asked for the queue, the running subtasks and
the tokens, which must match what the swarm did. The Grafana dashboard's queries and the
autoscaler's prometheus-adapter rule run against the same Prometheus, and Prometheus's own graph page
draws the swarm in Debian's headless Chromium (set SWARM_PROMETHEUS_SCREENSHOT=docs/prometheus-graph.png
to have it write README's picture)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from prometheus_server import NAMESPACE, Prometheus, metrics_address, prometheus
from ruamel.yaml import YAML

from stack import Stack, stack
from swarm.v1 import events_pb2
from swarm_checks import assert_completed
from swarm_client import SwarmClient
from swarm_common.providers import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "swarm-dashboard.json"
ADAPTER = ROOT / "deploy" / "k8s" / "prometheus-adapter.yaml"
SLOTS_PER_WORKER = 2
WORKERS = 2
AGENTS = 12
# Three waves of four subtasks: the first wave's 8 waiting subtasks stay queued for a whole answer,
# several scrapes long.
ANSWER_MS = 1200


@dataclass
class Scraped:
    stack: Stack
    prometheus: Prometheus
    events: list[events_pb2.SwarmEvent]
    # When the swarm ran (epoch seconds), for range queries.
    start: float
    end: float


@pytest.fixture(scope="module")
def scraped() -> Iterator[Scraped]:
    metrics = ["--metrics-listen", "127.0.0.1:0"]
    with stack(
        workers=WORKERS,
        worker_args=[*metrics, "--max-concurrency", str(SLOTS_PER_WORKER)],
        orchestrator_args=metrics,
        sim_latency_ms=ANSWER_MS,
    ) as running:
        jobs = {
            "orchestrator": [metrics_address(running.orchestrator)],
            "worker": [metrics_address(worker) for worker in running.workers],
        }
        with prometheus(jobs) as api:
            assert api.wait_for("count(up == 1)", 3) == 3, "prometheus scrapes all three services"
            start = time.time()
            with SwarmClient(running.target) as client:
                events = list(client.run("Plan a community seed library", agents=AGENTS))
            end = time.time()
            yield Scraped(running, api, events, start, end)


def series(api: Prometheus, expression: str, scraped: Scraped) -> list[float]:
    return api.range_values(expression, scraped.start - 1, scraped.end + 1, 0.25)


def test_prometheus_sees_the_queue_and_the_running_subtasks_as_the_swarm_had_them(scraped: Scraped) -> None:
    assert_completed(scraped.events, AGENTS)
    slots = WORKERS * SLOTS_PER_WORKER
    queued = series(scraped.prometheus, "sum(swarm_subtasks_queued)", scraped)
    running = series(scraped.prometheus, "sum(swarm_subtasks_running)", scraped)
    # 12 subtasks on 4 slots: 8 wait while the first 4 run, then 4 while the next 4 run.
    assert max(queued) == AGENTS - slots, queued
    assert max(running) == slots, running
    assert 0 < min(v for v in queued if v) <= slots, "the backlog shrinks wave by wave"
    in_flight = series(
        scraped.prometheus, 'max(swarm_worker_subtasks_in_flight{path="orchestrator"})', scraped
    )
    assert max(in_flight) == SLOTS_PER_WORKER, "no worker ran more than its slots"
    # Afterwards: nothing waits or runs, every slot is free, both workers ready.
    api = scraped.prometheus
    assert api.wait_for("sum(swarm_subtasks_queued) + sum(swarm_subtasks_running)", 0) == 0
    assert api.wait_for('sum(swarm_worker_slots{state="free"})', slots) == slots
    assert api.value('sum(swarm_worker_slots{state="busy"})') == 0
    assert api.value('sum(swarm_workers{state="ready"})') == WORKERS


def test_token_and_attempt_counters_add_up_to_what_the_swarm_reported(scraped: Scraped) -> None:
    api = scraped.prometheus
    total = scraped.events[-1].swarm_completed.usage
    completed = [e.subtask_completed for e in scraped.events if e.HasField("subtask_completed")]
    subtask_input = sum(c.usage.input_tokens for c in completed)
    subtask_output = sum(c.usage.output_tokens for c in completed)
    # Tokens are counted where the model is called: subtasks on the workers, the plan and the
    # synthesis on the orchestrator. Together they are the swarm's usage.
    query = 'sum(swarm_model_tokens_total{type="%s"})'
    assert api.wait_for(query % "input", total.input_tokens) == total.input_tokens
    assert api.wait_for(query % "output", total.output_tokens) == total.output_tokens
    worker = 'sum(swarm_model_tokens_total{job="worker",type="%s"})'
    assert api.value(worker % "input") == subtask_input
    assert api.value(worker % "output") == subtask_output
    assert api.value('sum(swarm_model_tokens_total{type="cache_read"})') == 0
    models = api.query("sum by (model) (swarm_model_tokens_total)")
    assert [dict(labels)["model"] for labels in models] == [DEFAULT_MODEL], "the swarm's one model"
    # One attempt each, and each one measured from queue to slot, to first output, to the end.
    assert api.wait_for("sum(swarm_subtask_attempts_total)", AGENTS) == AGENTS
    for histogram in ("schedule_to_start", "first_token", "duration"):
        assert api.value(f"sum(swarm_subtask_{histogram}_seconds_count)") == AGENTS, histogram
    assert api.value('sum(swarm_swarm_duration_seconds_count{state="completed"})') == 1
    assert api.value("sum(swarm_subtask_retries_total)") in (None, 0)
    # The waves: the last four waited two answers for their slots.
    slow = api.value("histogram_quantile(1, sum by (le) (swarm_subtask_schedule_to_start_seconds_bucket))")
    assert slow is not None and slow >= 2 * ANSWER_MS / 1000


def test_the_autoscaler_rule_gives_the_backlog_per_ready_worker(scraped: Scraped) -> None:
    """The prometheus-adapter rule's query, filled in as the adapter fills it for an HPA in the
    namespace, answers queued subtasks / ready workers."""
    (config_map,) = YAML(typ="safe", pure=True).load_all(ADAPTER.read_text())
    (rule,) = YAML(typ="safe", pure=True).load(config_map["data"]["config.yaml"])["externalRules"]
    assert rule["name"]["as"] == "swarm_subtasks_queued_per_ready_worker"
    query = (
        rule["metricsQuery"]
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}"')
        .replace("<<.GroupBy>>", "namespace")
    )
    assert "<<" not in query
    per_worker = series(scraped.prometheus, query, scraped)
    assert max(per_worker) == (AGENTS - WORKERS * SLOTS_PER_WORKER) / WORKERS
    assert scraped.prometheus.query(rule["seriesQuery"]), "the rule's series query finds the metric"


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def test_every_dashboard_query_runs_on_prometheus_and_names_real_metrics(scraped: Scraped) -> None:
    exposed: set[str] = set()
    for process in [scraped.stack.orchestrator, *scraped.stack.workers]:
        with urllib.request.urlopen(f"http://{metrics_address(process)}/metrics", timeout=10) as response:
            text = response.read().decode()
        # Every metric has its HELP line, also a labelled one with no series yet.
        names = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
        exposed |= names | {f"{name}{suffix}" for name in names for suffix in ("_bucket", "_count", "_sum")}
    queries = dashboard_queries()
    assert len(queries) >= 20
    with_data: set[str] = set()
    for title, expression in queries:
        for name in re.findall(r"\b(swarm_[a-z_]+)\b", expression):
            assert name in exposed, f"{title}: {name} is not a metric the services expose"
        # Grafana's own interval variable filled in as Grafana would; Prometheus must accept each.
        window = expression.replace("$__rate_interval", "1m")
        if scraped.prometheus.query(f"max_over_time(({window})[1m:1s])"):
            with_data.add(title)
    # What this swarm did shows; retries, failures and 429s it did not have may be empty.
    assert with_data >= {
        "Queue depth and running subtasks",
        "Workers' slots",
        "Throughput",
        "Subtask latency",
        "Schedule-to-start and first token",
        "Event path",
        "Tokens by model",
        "Cost by model",
    }, with_data


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
# The queue filling and draining, the slots it waits for, and the tokens by where they were spent.
GRAPHS = [
    "sum by (job) (swarm_subtasks_queued)",
    "sum by (state) (swarm_worker_slots)",
    "sum by (job, type) (swarm_model_tokens_total)",
]


def test_prometheus_draws_the_swarm_in_a_browser(scraped: Scraped, tmp_path: Path) -> None:
    """Prometheus's graph page, in Chromium, over the swarm's run: the queue filling and draining,
    the slots, and the tokens. Each graph draws its series."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail("the screenshot needs Debian's Chromium: `apt-get install -y chromium` (make test does)")
    # The page's end time is now (its end field keeps whole minutes): the range reaches back to
    # just before the swarm began.
    since = f"{int(time.time() - scraped.start) + 3}s"
    query: dict[str, str] = {}
    for index, expression in enumerate(GRAPHS):
        query |= {f"g{index}.expr": expression, f"g{index}.tab": "0", f"g{index}.range_input": since}
    screenshot = Path(os.environ.get("SWARM_PROMETHEUS_SCREENSHOT") or tmp_path / "prometheus-graph.png")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Tall enough for all three graphs: a full-page shot would paint the fixed bar mid-page.
            page = browser.new_page(viewport={"width": 1000, "height": 2300})
            page.goto(f"{scraped.prometheus.url}/graph?{urllib.parse.urlencode(query)}")
            page.wait_for_function(f"document.querySelectorAll('.graph svg path').length >= {len(GRAPHS)}")
            legends = page.locator(".legend").all_inner_texts()
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    shown = " ".join(legends)
    for series in ("orchestrator", 'state="free"', 'type="input"', 'job="worker"'):
        assert series in shown, f"{series} is not drawn: {shown}"
