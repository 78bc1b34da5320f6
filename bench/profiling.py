"""Optional sampling profiles of the orchestrator while a benchmark measures (`--profile`).

py-spy (pip install py-spy; it is in the `bench` extra) attaches to the running orchestrator by pid,
without pausing it (`--nonblocking`), samples its Python stacks at 200 Hz while a benchmark runs an
extra, unmeasured workload, and writes collapsed stacks to bench/profiles/NAME.txt. Only Python
frames are seen: time inside grpc's Cython/C core is charged to the Python frame that called it (an
event-loop callback shows as `Handle._run`, grpc's poller thread as `Thread.run`). On this machine
`--native` and `--gil` (which need ptrace) do not work, and `perf` gets no samples. A summary (the functions with the most samples, self and inclusive, as
% of all samples) goes next to it as NAME.summary.txt and into results.json.
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

from bench.common import Context

RATE_HZ = 200
# A raw py-spy frame: "function (file:line)"; the file is shortened to what follows site-packages.
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


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
    command = [tool, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw"]
    command += ["--nonblocking", "--function", "--output", str(output)]
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
        summary = summarize(output)
        profiles[name] = summary
        (ctx.profile_dir / f"{name}.summary.txt").write_text(format_summary(name, summary))
    else:
        errors = [line for line in lines if line.startswith("Error")] or lines[-3:]
        profiles[name] = {"error": " ".join(errors)[:500] or "py-spy wrote nothing"}


def _short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
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
    lines = [f"{name}: {summary['samples']} samples at {RATE_HZ} Hz", "", "self %:"]
    lines += [f"  {pct:5.1f}  {func}" for func, pct in summary["self_pct"][:top]]
    lines += ["", "inclusive %:"]
    lines += [f"  {pct:5.1f}  {func}" for func, pct in summary["inclusive_pct"][:top]]
    return "\n".join(lines) + "\n"
