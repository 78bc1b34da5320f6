"""`python -m bench` (or `make bench`): runs the benchmarks, prints a table, writes bench/results.json.

    python -m bench                   # all of them (about 2 minutes on 2 cores)
    python -m bench --quick           # fewer repetitions, shorter floor window
    python -m bench --only makespan   # one (or a comma list, or repeated); 1a..1g work too
    python -m bench --profile         # also py-spy profiles of the orchestrator (bench/profiles/)

Benchmarks are measurements, not tests: the exit status is 0 when every benchmark ran, whatever
its figures, and 1 when one of them could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import Context, Target, load_average, median
from bench.floor import measure as floor_measure
from bench.floor import start_server as floor_server
from bench.profiling import format_summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
PROFILES = HERE / "profiles"


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    module: str
    alias: str
    optional: bool = False


BENCHMARKS = [
    Benchmark("dispatch", "bench.dispatch", "1a"),
    Benchmark("in_process", "bench.in_process", "1b"),
    Benchmark("makespan", "bench.makespan", "1c"),
    Benchmark("streaming", "bench.streaming", "1d"),
    Benchmark("memory", "bench.memory", "1e"),
    Benchmark("many_swarms", "bench.many_swarms", "1f"),
    Benchmark("ray", "bench.ray_peer", "1g"),
    Benchmark("many_streams", "bench.many_streams", "1h"),
    Benchmark("watchers", "bench.watchers", "1i"),
    Benchmark("big_swarms", "bench.big_swarms", "big"),
    Benchmark("replicas", "bench.replicas", "replicas"),
    Benchmark("observability", "bench.observability", "obs"),
    Benchmark("economics", "bench.economics", "econ"),
    # Written by the store's engineer; included when present. It exposes main() -> dict.
    Benchmark("store", "bench.bench_store", "store", optional=True),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    names = ", ".join(f"{b.name} ({b.alias})" for b in BENCHMARKS)
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help=f"run only these (comma list): {names}"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a rougher figure, faster)")
    parser.add_argument("--profile", action="store_true", help="py-spy the orchestrator in 1a and 1d")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the results [{RESULTS}]")
    return parser.parse_args(argv)


def select(only: list[str]) -> list[Benchmark]:
    """The benchmarks asked for, with the ones they need (1b and 1g need 1a's figure), in order."""
    available = [b for b in BENCHMARKS if not b.optional or importlib.util.find_spec(b.module) is not None]
    if not only:
        return available
    wanted: set[str] = set()
    for item in (part.strip() for text in only for part in text.split(",")):
        match = [b for b in BENCHMARKS if item in (b.name, b.alias, b.module.rsplit(".", 1)[1])]
        if not match:
            raise SystemExit(f"python -m bench: unknown benchmark {item!r}")
        if match[0] not in available:
            raise SystemExit(f"python -m bench: {match[0].module} is not there")
        wanted.add(match[0].name)
    for benchmark in available:
        if benchmark.name in wanted:
            module = importlib.import_module(benchmark.module)
            wanted.update(getattr(module, "NEEDS", ()))
    return [b for b in available if b.name in wanted]


def _flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_one(benchmark: Benchmark, module: ModuleType, ctx: Context) -> dict[str, Any]:
    if hasattr(module, "run"):
        figures = module.run(ctx)
    else:  # bench_store: main() -> dict
        result = module.main()
        figures = asyncio.run(result) if inspect.iscoroutine(result) else result
    if not isinstance(figures, dict):
        raise TypeError(f"{benchmark.module} returned {type(figures).__name__}, not a dict")
    return figures


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be had) becomes null, so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    import google.protobuf
    import grpc

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_gb = math.nan
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    return info


def floor(seconds: float) -> float:
    """The raw grpc.aio floor now (bench/floor.py): bare calls per second between two processes."""
    server = floor_server()
    try:
        return asyncio.run(floor_measure(server.address, concurrency=64, seconds=seconds))
    finally:
        server.stop()


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return (
            f"{value:,.4g}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        )
    if isinstance(value, list):
        return ", ".join(_value_text(v) for v in value)
    return str(value)


def table(report: dict[str, Any], shown: dict[str, list[tuple[str, str]]]) -> Table:
    quick = " (--quick)" if report["quick"] else ""
    grid = Table(title=f"Parallel Agent Scheduler benchmarks{quick}", title_justify="left")
    for column, justify in (("benchmark", "left"), ("figure", "left"), ("value", "right")):
        grid.add_column(column, justify=justify)  # type: ignore[arg-type]
    grid.add_column("unit")
    grid.add_column("target")
    grid.add_column("result")
    for name, entry in report["benchmarks"].items():
        first = True
        label = name if entry["alias"] == name else f"{entry['alias']} {name}"
        if "error" in entry:
            grid.add_row(label, "-", "-", "", "", f"[red]ERROR[/red] {entry['error'][:80]}")
            continue
        for figure, unit in shown[name]:
            value = entry["figures"].get(figure, "-")
            check = entry["targets"].get(figure)
            target, result = "", ""
            if check is not None:
                target = check["target"]
                result = {
                    True: "[green]pass[/green]",
                    False: "[red]FAIL[/red]",
                    None: "[yellow]n/a[/yellow]",
                }[check["pass"]]
            grid.add_row(label if first else "", figure, _value_text(value), unit, target, result)
            first = False
        grid.add_section()
    return grid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    chosen = select(args.only)
    console = Console(width=max(120, Console().width))
    ctx = Context(quick=args.quick, profile_dir=PROFILES if args.profile else None)
    began = time.monotonic()
    report: dict[str, Any] = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]).strip(),
        "quick": args.quick,
        "machine": machine(),
        "load_average_at_start": load_average(),
        "floor_calls_per_s_at_start": round(floor(1.0 if args.quick else 2.0), 1),
        "benchmarks": {},
    }
    m = report["machine"]
    console.print(
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; raw grpc.aio floor "
        f"{report['floor_calls_per_s_at_start']:,.0f} calls/s; load {report['load_average_at_start']}"
    )
    shown: dict[str, list[tuple[str, str]]] = {}
    failed = False
    for benchmark in chosen:
        module = importlib.import_module(benchmark.module)
        title = getattr(module, "TITLE", benchmark.name)
        console.print(f"[bold]{benchmark.alias}[/bold] {title} …")
        started = time.monotonic()
        entry: dict[str, Any] = {"title": title, "alias": benchmark.alias}
        try:
            figures = run_one(benchmark, module, ctx)
        except Exception as error:
            failed = True
            entry["error"] = f"{type(error).__name__}: {error}"
            console.print(f"  [red]failed[/red]: {entry['error']}")
            traceback.print_exc(file=sys.stderr)
            figures = {}
        ctx.results[benchmark.name] = figures
        targets: dict[str, Target] = getattr(module, "TARGETS", {})
        units: dict[str, str] = getattr(module, "UNITS", {})
        flat = _flatten(figures)
        shown[benchmark.name] = [(f, units[f]) for f in units] or [
            (f, "") for f, v in flat.items() if not isinstance(v, list)
        ]
        for figure in targets:
            if figure not in units and figure in flat:
                shown[benchmark.name].append((figure, ""))
        entry["duration_s"] = round(time.monotonic() - started, 1)
        if figures:
            entry["figures"] = figures
            entry["targets"] = {
                figure: {"target": target.text(), "pass": target.check(flat.get(figure))}
                for figure, target in targets.items()
            }
            console.print(f"  done in {entry['duration_s']:g}s")
        report["benchmarks"][benchmark.name] = entry
    report["load_average_at_end"] = load_average()
    report["duration_s"] = round(time.monotonic() - began, 1)
    if "_profiles" in ctx.results:
        report["profiles"] = ctx.results["_profiles"]
    console.print()
    console.print(table(report, shown))
    checks = [c["pass"] for e in report["benchmarks"].values() for c in e.get("targets", {}).values()]
    floors = [report["floor_calls_per_s_at_start"]]
    floors += report["benchmarks"].get("dispatch", {}).get("figures", {}).get("runs_floor_calls_per_s", [])
    console.print(
        f"targets: {checks.count(True)} pass, {checks.count(False)} fail, {checks.count(None)} n/a  ·  "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}, grpcio {m['grpcio']}  ·  "
        f"floor {median(floors):,.0f} calls/s ({min(floors):,.0f}-{max(floors):,.0f} in {len(floors)} windows)  ·  "
        f"load {report['load_average_at_start']} -> {report['load_average_at_end']}  ·  {report['duration_s']:g}s"
    )
    for name, summary in report.get("profiles", {}).items():
        if "error" in summary:
            console.print(f"profile {name}: [red]{summary['error']}[/red]")
        else:
            console.print(format_summary(name, summary, top=12))
    temporary = args.out.with_name(args.out.name + ".tmp")
    temporary.write_text(json.dumps(_finite(report), indent=2, default=str, allow_nan=False) + "\n")
    temporary.replace(args.out)
    console.print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
