"""A swarm's delta window: the base window up to the rate's share of subtasks streaming, whole
windows wider beyond it, and the swarm's running subtasks told only when it changes."""

from __future__ import annotations

from contextlib import ExitStack

from pytest import approx

from orchestrator_service.delta_windows import DeltaWindows


def test_the_window_widens_by_whole_windows_past_the_rate_and_back() -> None:
    told: list[tuple[str, float]] = []
    windows = DeltaWindows(0.05, 2000, lambda swarm_id, window_s: told.append((swarm_id, window_s)))
    with ExitStack() as big:
        given = [big.enter_context(windows.streaming("big")) for _ in range(250)]
        with windows.streaming("small") as small:
            assert small == 0.05, "another swarm's subtasks do not count"
        assert given[:100] == [0.05] * 100
        assert given[100:200] == [0.1] * 100
        assert given[200:] == approx([0.15] * 50)
        assert told == [("big", 0.1), ("big", approx(0.15))]
        # 250 streaming at one event per 150 ms: 1,667 events a second, under the 2,000 asked.
        assert 250 / given[-1] <= 2000
    assert told == [("big", 0.1), ("big", approx(0.15)), ("big", 0.1), ("big", 0.05)], "narrowed as they end"
    with windows.streaming("big") as again:
        assert again == 0.05


def test_no_rate_or_no_window_never_widens() -> None:
    told: list[tuple[str, float]] = []
    for windows in (
        DeltaWindows(0.05, 0, lambda *a: told.append(a)),
        DeltaWindows(0, 2000, lambda *a: told.append(a)),
    ):
        with ExitStack() as many:
            given = {many.enter_context(windows.streaming("s")) for _ in range(500)}
        assert given == {windows.window_s}
    assert told == []
