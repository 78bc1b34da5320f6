"""A throwaway PostgreSQL server for the tests and benchmarks: the real server, from Debian's
`postgresql` package, in a temporary data directory on a free port of 127.0.0.1.

    with PostgresServer() as server:
        url = server.create_database("test_one")   # postgresql://swarm:PASSWORD@127.0.0.1:PORT/test_one
        ...
        server.restart()                           # a fast shutdown and a start on the same port

The server refuses to run as root, so as root it runs as the `postgres` user (which the package
creates), or `nobody`, owning its temporary directory. Clients log in with a password over TCP
(scram-sha-256), as a deployed orchestrator does, so a test can check that the password never
shows. A missing server is an error that says what to install: tests that need PostgreSQL fail
without it; they are never skipped.
"""

from __future__ import annotations

import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

INSTALL_HINT = "install Debian's postgresql package (apt-get install -y postgresql; `make test` does it)"
USER = "swarm"
START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
PORTS = (20000, 32000)
SETPRIV = "setpriv"  # util-linux, in every Debian


class PostgresUnavailable(RuntimeError):
    """The server's programs are missing, or it would not start; the message says why and what to do."""


def server_bin() -> Path:
    """The directory holding initdb and postgres: Debian keeps them per major version, off PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    raise PostgresUnavailable(f"the PostgreSQL server is not installed: {INSTALL_HINT}")


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768 up), which port 0 binds and outgoing
    connections draw from: while the server restarts, no other process takes its port by chance."""
    for _ in range(1000):
        port = random.randrange(*PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise PostgresUnavailable(f"no free port in {PORTS[0]}..{PORTS[1]}")


class PostgresServer:
    def __init__(self, *, fsync: bool = False) -> None:
        """`fsync` off (the tests' default) trades durability across a machine crash, which no test
        makes, for speed on a shared machine; the benchmarks turn it on."""
        self.fsync = fsync
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self._bin = server_bin()
        self._root = Path(tempfile.mkdtemp(prefix="swarm-postgres-"))
        self._data = self._root / "data"
        self._process: subprocess.Popen[str] | None = None
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self._user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self._user is None:
                raise PostgresUnavailable("running as root, and no unprivileged user to run PostgreSQL as")
            os.chown(self._root, self._user.pw_uid, self._user.pw_gid)

    def url(self, database: str = "postgres", *, host: str = "127.0.0.1", port: int | None = None) -> str:
        return f"postgresql://{USER}:{self.password}@{host}:{port or self.port}/{database}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def start(self) -> None:
        """Starts the server (made by initdb the first time) and waits until it takes connections.
        A start that fails at once is tried again: a restart can find the old server's last
        resources not yet given back."""
        if not self._data.exists():
            self._initdb()
        self.port = self.port or _free_port()
        for attempt in range(1, START_ATTEMPTS + 1):
            said_before = len(self.log_tail(lines=100_000).splitlines())
            if self._started():
                return
            if attempt == START_ATTEMPTS:
                said = "\n".join(self.log_tail(lines=100_000).splitlines()[said_before:][-20:])
                status = self._process.returncode if self._process is not None else None
                raise PostgresUnavailable(
                    f"PostgreSQL would not start on port {self.port} (exit status {status}); it said:\n{said}"
                )
            time.sleep(0.5 * attempt)

    def _started(self) -> bool:
        log = (self._root / "server.log").open("a")
        self._process = subprocess.Popen(
            self._command(
                "postgres",
                *("-D", str(self._data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self._root)),
                *("-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "max_connections=200"),
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self._root,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise PostgresUnavailable(f"PostgreSQL did not accept connections in {START_TIMEOUT_S:g} s")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open sessions are ended, as a restarted server ends them."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """A new, empty database (any of that name is dropped first); returns its URL."""
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        path = self._root / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _initdb(self) -> None:
        password_file = self._root / "password"
        password_file.write_text(self.password + "\n")
        if self._user is not None:
            os.chown(password_file, self._user.pw_uid, self._user.pw_gid)
        result = subprocess.run(
            self._command(
                "initdb",
                *("-D", str(self._data), "-U", USER, f"--pwfile={password_file}"),
                *("--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--no-sync"),
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self._root,
        )
        password_file.unlink()
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(result.stderr or result.stdout).strip()[-2000:]}")

    def _command(self, program: str, *args: str) -> list[str]:
        """The server's program, as the unprivileged user when this process is root. setpriv
        switches user and then execs, rather than Popen(user=...): that would fork this process,
        whose gRPC threads make a forked child crash now and then, where setpriv is started the
        way Popen starts any program (vfork, then exec)."""
        command = [str(self._bin / program), *args]
        if self._user is None:
            return command
        switch = ["--reuid", str(self._user.pw_uid), "--regid", str(self._user.pw_gid), "--clear-groups"]
        return [SETPRIV, *switch, "--", *command]
