"""The two bounds on waiting for a model's output: silence and the whole time, from the start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from orchestrator_service.watchdog import Bounds, Overtime, Silent, watched


async def paced(gaps: list[float], closed: list[bool]) -> AsyncIterator[int]:
    try:
        for index, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            yield index
    finally:
        closed.append(True)


async def test_items_pass_through_when_they_come_in_time() -> None:
    closed: list[bool] = []
    items = [i async for i in watched(paced([0.01, 0.01, 0.01], closed), Bounds(5.0, 1.0))]
    assert items == [0, 1, 2] and closed == [True]


async def test_silence_before_the_first_item_is_caught() -> None:
    closed: list[bool] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(Silent, match=r"no output for 0\.2s"):
        [i async for i in watched(paced([60.0], closed), Bounds(600.0, 0.2))]
    assert loop.time() - began < 1.0
    assert closed == [True], "the silent source is closed"


async def test_silence_after_some_items_is_caught() -> None:
    closed: list[bool] = []
    seen: list[int] = []
    with pytest.raises(Silent):
        async for item in watched(paced([0.01, 0.01, 60.0], closed), Bounds(600.0, 0.2)):
            seen.append(item)
    assert seen == [0, 1] and closed == [True]


async def test_the_whole_time_is_bounded_however_steady_the_items() -> None:
    closed: list[bool] = []
    seen: list[int] = []
    with pytest.raises(Overtime, match=r"longer than its 0\.3s"):
        async for item in watched(paced([0.05] * 100, closed), Bounds(0.3, 0.2)):
            seen.append(item)
    assert 3 <= len(seen) <= 6 and closed == [True]


async def test_time_the_caller_spends_between_items_is_not_silence() -> None:
    closed: list[bool] = []
    seen: list[int] = []
    async for item in watched(paced([0.0, 0.0], closed), Bounds(5.0, 0.1)):
        seen.append(item)
        await asyncio.sleep(0.3)  # longer than the silence bound, but the caller's own time
    assert seen == [0, 1]
