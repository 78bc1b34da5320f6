"""Starts the services as child processes and waits until each has bound its port: one way, shared
by the tests, the benchmarks, soaks and `swarm up`.

A service is ready when it prints a line containing `listening on HOST:PORT` (the contract's
readiness line). The services are run as programs, their console scripts, and never imported, so
this module needs the standard library alone and a client-only install can carry it.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BIN",
    "LISTENING",
    "OUTPUT_WATCHERS",
    "Process",
    "Stack",
    "StackError",
    "program",
    "stack",
    "start",
]

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
# What a process said is kept for failure messages and assertions, up to this many lines, so that
# a long soak does not grow without bound.
KEPT_LINES = 20_000
# Called with each process once its output has ended, all of it in `lines` (up to KEPT_LINES): the
# tests read every service's output for secrets this way.
OUTPUT_WATCHERS: list[Callable[[Process], None]] = []


class StackError(RuntimeError):
    """A service could not be started."""


def program(name: str) -> str:
    """A console script: beside this Python (its venv), else on PATH. A path is taken as it is."""
    if os.sep in name:
        return name
    beside = BIN / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} is not installed (run `make install`)")
    return found


@dataclass
class Process:
    """A running child. Its standard output and error, merged, are kept in `lines` and, when it was
    started with a log file, written there as they come."""

    name: str
    popen: subprocess.Popen[str]
    address: str = ""
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=KEPT_LINES))
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (after SIGCONT, should it be stopped), up to `timeout` to exit, then SIGKILL.
        Returns the exit status once the process's last words are in `lines` (and its log)."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.reader is not None:
            self.reader.join(5)
        return self.popen.returncode


def start(
    name: str,
    command: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    *,
    listen: str | None = "127.0.0.1:0",
    inherit: bool = False,
    log: Path | None = None,
    new_session: bool = False,
    cwd: Path | None = None,
) -> Process:
    """Starts `command` (a console script, or a path) with `--listen LISTEN` and then `args`, so a
    `--listen` in `args` wins, and returns once it printed `listening on HOST:PORT`.

    The child's environment is this process's with `env` on top. Without `inherit` it lacks
    ANTHROPIC_API_KEY and every SWARM_ setting, so only `args` and `env` configure it and no test or
    benchmark reaches the real model API; `swarm up` inherits both. `log` also receives the
    output; `new_session` keeps a Ctrl-C on the terminal from reaching the child.
    """
    full_env = {
        key: value
        for key, value in os.environ.items()
        if inherit or not (key == "ANTHROPIC_API_KEY" or key.startswith("SWARM_"))
    }
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    popen = subprocess.Popen(
        [program(command), *(["--listen", listen] if listen is not None else []), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        env=full_env,
        cwd=cwd,
        start_new_session=new_session,
    )
    process = Process(name, popen)
    found = threading.Event()

    def read() -> None:
        # Drained to the end, so a chatty child never blocks on a full pipe.
        assert popen.stdout is not None
        with log.open("w") if log is not None else open(os.devnull, "w") as copy:
            for line in popen.stdout:
                copy.write(line)
                copy.flush()
                process.lines.append(line.rstrip("\n"))
                match = LISTENING.search(line)
                if match and not found.is_set():
                    host = match.group(1)
                    process.address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{match.group(2)}"
                    found.set()
        found.set()
        for watcher in OUTPUT_WATCHERS:
            watcher(process)

    process.reader = threading.Thread(target=read, name=f"output-{name}", daemon=True)
    process.reader.start()
    if not found.wait(timeout) or not process.address:
        process.stop()
        tail = "\n".join(list(process.lines)[-15:])
        where = f" (its log: {log})" if log is not None else ""
        raise StackError(f"{name} did not start listening within {timeout:g} s{where}; it said:\n{tail}")
    return process


@dataclass
class Stack:
    orchestrator: Process
    workers: list[Process]
    db: Path
    # The orchestrator's command line and environment, for a restart on the same --db.
    orchestrator_args: list[str] = field(default_factory=list)
    env: Mapping[str, str] | None = None

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
    env: Mapping[str, str] | None = None,
    sim_latency_ms: float = 50,
    db: Path | None = None,
) -> Iterator[Stack]:
    """An orchestrator and `workers` workers on 127.0.0.1, all simulated unless `env` or the args
    say otherwise; worker i also gets `per_worker_args[i]`, where given. The orchestrator keeps its
    swarms in `db`, by default a new file that is deleted afterwards. Everything started is stopped
    on the way out, the orchestrator first; if the body failed, what each service said last goes
    to standard error."""
    started: list[Process] = []
    running: Stack | None = None
    scratch = Path(tempfile.mkdtemp(prefix="swarm-stack-"))
    simulated = ["--provider", "simulated", "--sim-latency-ms", f"{sim_latency_ms:g}"]
    try:
        for index in range(workers):
            started.append(
                start(
                    f"worker-{index}",
                    "swarm-worker",
                    [
                        *simulated,
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
            *simulated,
            "--workers",
            ",".join(w.address for w in started),
            "--db",
            str(db),
            *orchestrator_args,
        ]
        running = Stack(start("orchestrator", "swarm-orchestrator", args, env), started, db, args, env)
        yield running
    except BaseException:
        for process in ([running.orchestrator] if running else []) + started:
            state = "running" if process.popen.poll() is None else f"exited {process.popen.returncode}"
            tail = "\n    ".join(list(process.lines)[-15:])
            print(f"--- {process.name} ({state}), last lines:\n    {tail}", file=sys.stderr)
        raise
    finally:
        # The orchestrator first (it may have been restarted), then the workers.
        for process in ([running.orchestrator] if running else []) + started[::-1]:
            process.stop()
        shutil.rmtree(scratch, ignore_errors=True)
