"""Optional sampling profiles of the orchestrator while a benchmark measures (`--profile`).

py-spy (pip install py-spy; it is in the `bench` extra) attaches to the running orchestrator by pid,
samples it at 200 Hz while a benchmark runs an extra, unmeasured workload, and writes collapsed
stacks to bench/profiles/NAME.txt. It samples the thread that holds the GIL, native frames
included (`--gil --native`, which need ptrace): so the samples are the process's own CPU work, and
time in grpc's C core or in a system call shows as such (`sendmsg (libc.so.6)`; grpc's frames,
which have no symbols, as `[native] (cygrpc)`). Where ptrace is not allowed it falls back to
Python stacks of every thread, without pausing the process (`--nonblocking`): time in C is then
charged to the Python frame that called it, and waiting threads count too. A summary (the functions
with the most samples, self and inclusive, as % of all samples, and which mode made them) goes next
to it as NAME.summary.txt and into results.json.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context

RATE_HZ = 200
# A raw py-spy frame: "function (file:line)"; the file is shortened to what follows site-packages.
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# The first that samples: the GIL holder's stacks with native frames; else every thread's Python.
MODES = {"gil+native": ["--gil", "--native"], "python": ["--nonblocking"]}


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


@contextmanager
def maybe_profile(ctx: Context, name: str | None, pid: int) -> Iterator[None]:
    """Profiles `pid` for the duration of the block when the run asked for profiles; the block starts
    once py-spy samples. A profiler that cannot attach is recorded as an error, not raised."""
    if ctx.profile_dir is None or name is None:
        yield
        return
    tool = py_spy()
    if tool is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy (or the bench extra)")
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    output = ctx.profile_dir / f"{name}.txt"
    output.unlink(missing_ok=True)
    for mode in MODES:
        recorder, lines = _record(tool, pid, output, MODES[mode])
        if recorder.poll() is None:
            break  # sampling
    try:
        yield
    finally:
        if recorder.poll() is None:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            recorder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(timeout=5)
    profiles = ctx.results.setdefault("_profiles", {})
    if output.exists():
        summary = summarize(output) | {"mode": mode}
        profiles[name] = summary
        (ctx.profile_dir / f"{name}.summary.txt").write_text(format_summary(name, summary))
    else:
        errors = [line for line in lines if line.startswith("Error")] or lines[-3:]
        profiles[name] = {"error": " ".join(errors)[:500] or "py-spy wrote nothing"}


def _record(
    tool: str, pid: int, output: Path, mode_args: list[str]
) -> tuple[subprocess.Popen[str], list[str]]:
    """py-spy recording `pid`, once it samples (or has given up), and the lines it said."""
    command = [tool, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw"]
    command += [*mode_args, "--function", "--output", str(output)]
    recorder = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    sampling = threading.Event()

    def read() -> None:
        assert recorder.stdout is not None
        for line in recorder.stdout:
            lines.append(line.rstrip())
            if "Sampling process" in line:
                sampling.set()
        sampling.set()

    threading.Thread(target=read, name="py-spy-output", daemon=True).start()
    sampling.wait(15)
    return recorder, lines


def _short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    if match["func"].startswith("0x"):  # a native frame without a symbol: its library
        return f"[native] ({Path(path).name.split('.')[0]})"
    for marker in ("site-packages/", "lib/python3.11/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {"samples": samples, "self_pct": share(self_counts), "inclusive_pct": share(total_counts)}


def format_summary(name: str, summary: dict[str, Any], top: int = 25) -> str:
    lines = [
        f"{name}: {summary['samples']} samples at {RATE_HZ} Hz ({summary.get('mode', 'python')})",
        "",
        "self %:",
    ]
    lines += [f"  {pct:5.1f}  {func}" for func, pct in summary["self_pct"][:top]]
    lines += ["", "inclusive %:"]
    lines += [f"  {pct:5.1f}  {func}" for func, pct in summary["inclusive_pct"][:top]]
    return "\n".join(lines) + "\n"
