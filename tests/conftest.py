from __future__ import annotations

import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import secrets_watch

from fakes.postgres import PostgresServer
from stack import OUTPUT_WATCHERS, Stack, stack

# The tests press Ctrl-C (SIGINT) on the CLIs they start. A suite started in the background by a
# shell without job control (`make test &`) inherits SIGINT ignored, and so would every child,
# which would then never see that Ctrl-C: a handler of this process's own becomes the default again
# in each child it starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every service's output is read for secrets once it has ended.
OUTPUT_WATCHERS.append(
    lambda process: secrets_watch.note(f"{process.name} (pid {process.pid})", process.lines)
)

# Modules whose tests hold a system to a time bound (fault detection, fairness, rate, a watchdog's
# pace). `make test` runs them after the rest and one at a time, so no other test's load skews them.
SERIAL_MODULES = {
    "test_faults.py",
    "test_hangs.py",
    "test_rate_limits.py",
    "test_scheduling.py",
    "test_watchdog.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="module")
def swarm_stack() -> Iterator[Stack]:
    """One orchestrator and two simulated workers, shared by a module's tests."""
    with stack(workers=2) as running:
        yield running


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """What a test's in-process code said (clients, servers, fakes): read for secrets too."""
    for title, text in report.sections:
        secrets_watch.note(f"{report.nodeid} ({title})", text.splitlines())


@pytest.fixture(scope="session", autouse=True)
def no_secret_is_ever_shown() -> Iterator[None]:
    """Fails the session when any process or test output showed a secret (see secrets_watch)."""
    yield
    found = secrets_watch.found()
    assert not found, "secrets were shown:\n" + "\n".join(found[:20])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (per xdist worker); each test that needs one gets
    a database of its own from `postgres_url`. Its password is a secret: shown, it fails the
    session."""
    with PostgresServer() as server:
        secrets_watch.watch_secret(server.password)
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")
