from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from stack import Stack, stack


@pytest.fixture(scope="module")
def swarm_stack() -> Iterator[Stack]:
    """One orchestrator and two simulated workers, shared by a module's tests."""
    with stack(workers=2) as running:
        yield running
