"""Starts real service processes on 127.0.0.1 with port 0 and waits for their `listening on` line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class Process:
    """A running service; its standard error is kept for failure messages and assertions."""

    name: str
    popen: subprocess.Popen[str]
    address: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def start(
    name: str, command: str, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 20.0
) -> Process:
    """Starts BIN/command with args and returns once it printed `listening on HOST:PORT`."""
    # Tests never reach the real model API: a key in the developer's environment is not passed on.
    full_env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    popen = subprocess.Popen(
        [str(BIN / command), "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    process = Process(name, popen)
    found = threading.Event()

    def read() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            process.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not found.is_set():
                host = match.group(1)
                process.address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{match.group(2)}"
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout) or not process.address:
        process.stop()
        raise RuntimeError(f"{name} did not start listening:\n{process.output()}")
    return process


@dataclass
class Stack:
    orchestrator: Process
    workers: list[Process]
    db: Path
    # The orchestrator's command line and environment, for a restart on the same --db.
    orchestrator_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None

    @property
    def target(self) -> str:
        return self.orchestrator.address

    def restart_orchestrator(self, *, kill: bool = True, args: Sequence[str] = ()) -> Process:
        """Stops the orchestrator, with SIGKILL (a crash) or else SIGTERM, and starts a new one on the
        same --db and port, with `args` after its first flags (a later flag wins)."""
        if kill:
            self.orchestrator.signal(signal.SIGKILL)
            self.orchestrator.popen.wait(10)
        else:
            self.orchestrator.stop()
        port = self.orchestrator.address.rsplit(":", 1)[1]
        self.orchestrator = start(
            "orchestrator",
            "swarm-orchestrator",
            [*self.orchestrator_args, "--listen", f"127.0.0.1:{port}", *args],
            self.env,
        )
        return self.orchestrator


@contextmanager
def stack(
    workers: int = 2,
    *,
    worker_args: Sequence[str] = (),
    per_worker_args: Sequence[Sequence[str]] = (),
    orchestrator_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    sim_latency_ms: int = 50,
    db: Path | None = None,
) -> Iterator[Stack]:
    """An orchestrator and `workers` workers, all simulated unless `env`/args say otherwise; worker i
    also gets `per_worker_args[i]`, where given. The orchestrator keeps its swarms in `db`, by
    default a new file that is deleted afterwards."""
    started: list[Process] = []
    running: Stack | None = None
    scratch = Path(tempfile.mkdtemp(prefix="swarm-stack-"))
    try:
        for index in range(workers):
            started.append(
                start(
                    f"worker-{index}",
                    "swarm-worker",
                    [
                        "--provider",
                        "simulated",
                        "--sim-latency-ms",
                        str(sim_latency_ms),
                        "--worker-id",
                        f"worker-{index}",
                        *worker_args,
                        *(per_worker_args[index] if index < len(per_worker_args) else ()),
                    ],
                    env,
                )
            )
        db = db or scratch / "swarms.db"
        args = [
            "--provider",
            "simulated",
            "--sim-latency-ms",
            str(sim_latency_ms),
            "--workers",
            ",".join(w.address for w in started),
            "--db",
            str(db),
            *orchestrator_args,
        ]
        running = Stack(start("orchestrator", "swarm-orchestrator", args, env), started, db, args, env)
        yield running
    finally:
        # The orchestrator first (it may have been restarted), then the workers.
        for process in ([running.orchestrator] if running else []) + started[::-1]:
            process.stop()
        shutil.rmtree(scratch, ignore_errors=True)
