"""A real Prometheus server for the tests (Debian's `prometheus` package), scraping the services'
`/metrics` on 127.0.0.1, and its HTTP API. `make test` installs the package where it can; where it
is missing the tests fail and say what to install."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stack import Process

METRICS_LINE = re.compile(r"metrics served on http://([^/\s\"]+)/metrics")
SCRAPE_INTERVAL = "250ms"
# Every target gets this label, as Kubernetes service discovery would give it a namespace.
NAMESPACE = "swarm-test"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail(
            "the prometheus server is not installed: `apt-get install prometheus` (Debian's package; "
            "`make test` installs it when run as root)"
        )
    return found


def metrics_address(process: Process) -> str:
    """Where a service started with `--metrics-listen 127.0.0.1:0` serves /metrics."""
    for line in process.lines:
        match = METRICS_LINE.search(line)
        if match:
            return match.group(1)
    raise AssertionError(f"{process.name} did not say where it serves metrics:\n{process.output()[-2000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, address: str) -> None:
        self.url = f"http://{address}"

    def _get(self, path: str, params: Mapping[str, str | float]) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: each series' value, keyed by its labels."""
        data = self._get("/api/v1/query", {"query": expression})
        return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in data["result"]}

    def value(self, expression: str) -> float | None:
        """The value of a query that gives one series, or None when it gives none."""
        results = self.query(expression)
        assert len(results) <= 1, f"{expression} gave {len(results)} series: {results}"
        return next(iter(results.values()), None)

    def range_values(self, expression: str, start: float, end: float, step: float) -> list[float]:
        """A range query of a single-series expression: its values, oldest first."""
        data = self._get(
            "/api/v1/query_range", {"query": expression, "start": start, "end": end, "step": step}
        )
        assert len(data["result"]) <= 1, data["result"]
        return [float(value) for _, value in data["result"][0]["values"]] if data["result"] else []

    def wait_for(self, expression: str, expected: float, timeout: float = 15.0) -> float | None:
        """Queries until the expression has the expected value (a scrape may be on its way), or
        the time is up; returns the last value seen."""
        deadline = time.monotonic() + timeout
        seen = self.value(expression)
        while seen != expected and time.monotonic() < deadline:
            time.sleep(0.1)
            seen = self.value(expression)
        return seen


def _config(jobs: Mapping[str, Sequence[str]]) -> str:
    lines = ["global:", f"  scrape_interval: {SCRAPE_INTERVAL}", f"  scrape_timeout: {SCRAPE_INTERVAL}", ""]
    lines.append("scrape_configs:")
    for job, targets in jobs.items():
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: [{', '.join(repr(t) for t in targets)}]",
            f"        labels: {{namespace: {NAMESPACE}}}",
        ]
    return "\n".join(lines) + "\n"


@contextmanager
def prometheus(jobs: Mapping[str, Sequence[str]], timeout: float = 30.0) -> Iterator[Prometheus]:
    """A Prometheus scraping each job's targets (HOST:PORT of /metrics) every 250 ms, ready to query."""
    binary = prometheus_binary()
    scratch = Path(tempfile.mkdtemp(prefix="swarm-prometheus-"))
    (scratch / "prometheus.yml").write_text(_config(jobs))
    address = f"127.0.0.1:{_free_port()}"
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={scratch / 'prometheus.yml'}",
            f"--storage.tsdb.path={scratch / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(scratch / "prometheus.log").open("w"),
    )
    try:
        api = Prometheus(address)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log = (scratch / "prometheus.log").read_text()[-3000:]
                raise AssertionError(f"prometheus did not become ready at {address}:\n{log}")
            time.sleep(0.1)
        yield api
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        shutil.rmtree(scratch, ignore_errors=True)
