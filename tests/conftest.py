from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from stack import Stack, stack

# Modules whose tests hold a system to a time bound (fault detection, fairness, rate, a watchdog's
# pace). `make test` runs them after the rest and one at a time, so no other test's load skews them.
SERIAL_MODULES = {
    "test_faults.py",
    "test_hangs.py",
    "test_rate_limits.py",
    "test_scheduling.py",
    "test_soak.py",
    "test_watchdog.py",
    "test_web_console.py",  # a 100-agent swarm must not freeze the page: a bound on its long tasks
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
