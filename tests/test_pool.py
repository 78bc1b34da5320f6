"""The worker pool's policy without the network: parsing targets, the pick, fairness, caps; and the
rate limiter's budget arithmetic on a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from orchestrator_service.rate_limits import ModelLimits, ModelRateLimiter, RateLimitedProvider
from orchestrator_service.worker_pool import PoolTarget, PoolWorker, WorkerPool
from orchestrator_service.worker_session import WorkerSession
from swarm_common.errors import RateLimited
from swarm_common.providers import StreamRequest, Usage


def test_targets_parse() -> None:
    assert PoolTarget.parse("dns:///worker:50052") == PoolTarget(dns_host="worker", dns_port=50052)
    assert PoolTarget.parse("dns://10.0.0.2/workers.svc:7") == PoolTarget(
        dns_host="workers.svc", dns_port=7, dns_server="10.0.0.2:53"
    )
    assert PoolTarget.parse("a:1, b:2").addresses == ("a:1", "b:2")
    for bad in ("", "dns:///noport", "a:1,b", "dns:///:5"):
        with pytest.raises(ValueError):
            PoolTarget.parse(bad)


def pool_of(capacities: dict[str, int]) -> WorkerPool:
    """A pool whose workers are ready-made (no channels: nothing here calls them)."""
    pool = WorkerPool(",".join(capacities))
    for address, capacity in capacities.items():
        worker = PoolWorker(
            address,
            channel=None,  # type: ignore[arg-type]
            stub=None,  # type: ignore[arg-type]
            session=WorkerSession(None),  # type: ignore[arg-type]
            worker_id=address,
            capacity=capacity,
        )
        worker.serving = worker.reachable = True
        pool._workers[address] = worker
    pool._changed()
    return pool


async def test_the_pick_prefers_free_capacity_and_never_exceeds_it() -> None:
    pool = pool_of({"a:1": 2, "b:1": 4})
    picks = [await pool.acquire("s") for _ in range(6)]
    assert [w.address for w in picks].count("b:1") == 4 and [w.address for w in picks].count("a:1") == 2
    assert [w.address for w in picks[:2]] == ["b:1", "b:1"], "most free capacity first"
    blocked = asyncio.create_task(pool.acquire("s"))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "all full: the seventh waits"
    pool.release(picks[0], "s")
    assert (await asyncio.wait_for(blocked, 1)).address == picks[0].address


async def test_a_retry_avoids_the_worker_that_failed_when_another_has_room() -> None:
    pool = pool_of({"a:1": 4, "b:1": 1})
    assert (await pool.acquire("s", avoid=frozenset({"a:1"}))).address == "b:1"
    assert (await pool.acquire("s", avoid=frozenset({"a:1"}))).address == "a:1", "a preference, not a ban"


async def test_swarms_take_turns_for_free_slots() -> None:
    pool = pool_of({"a:1": 1})
    holder = await pool.acquire("big")
    order: list[str] = []

    async def want(swarm: str) -> None:
        worker = await pool.acquire(swarm)
        order.append(swarm)
        pool.release(worker, swarm)

    waiting = [asyncio.create_task(want("big")) for _ in range(5)]
    await asyncio.sleep(0.01)
    waiting += [asyncio.create_task(want("small")) for _ in range(2)]
    await asyncio.sleep(0.01)
    pool.release(holder, "big")
    await asyncio.wait_for(asyncio.gather(*waiting), 2)
    assert order[:4] == ["big", "small", "big", "small"], order


async def test_tenants_take_turns_first_then_each_tenants_swarms() -> None:
    """Three swarms of tenant A wait for slots, then one of tenant B: B gets every other slot, not
    one in four, and A's slots go round its three swarms."""
    pool = pool_of({"a:1": 1})
    holder = await pool.acquire("a-1", tenant="A")
    order: list[str] = []

    async def want(swarm: str, tenant: str) -> None:
        worker = await pool.acquire(swarm, tenant=tenant)
        order.append(swarm)
        pool.release(worker, swarm)

    waiting = [asyncio.create_task(want(f"a-{i}", "A")) for i in (1, 2, 3) for _ in range(4)]
    await asyncio.sleep(0.01)
    waiting += [asyncio.create_task(want("b-1", "B")) for _ in range(4)]
    await asyncio.sleep(0.01)
    pool.release(holder, "a-1")
    await asyncio.wait_for(asyncio.gather(*waiting), 2)
    assert [swarm[0] for swarm in order[:8]] == ["a", "b"] * 4, order
    assert sorted(swarm for swarm in order[:6] if swarm.startswith("a")) == ["a-1", "a-2", "a-3"], order


async def test_a_swarm_cap_limits_its_slots_but_not_others() -> None:
    pool = pool_of({"a:1": 10})
    capped = [await pool.acquire("capped", max_parallel=2) for _ in range(2)]
    third = asyncio.create_task(pool.acquire("capped", max_parallel=2))
    other = await asyncio.wait_for(pool.acquire("other"), 1)
    await asyncio.sleep(0.02)
    assert not third.done() and other.address == "a:1"
    pool.release(capped[0], "capped")
    await asyncio.wait_for(third, 1)


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    pool = pool_of({"a:1": 1})
    holder = await pool.acquire("s")
    waiter = asyncio.create_task(pool.acquire("s"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    pool.release(holder, "s")
    await asyncio.sleep(0.01)
    assert pool._workers["a:1"].in_flight == 0
    assert (await asyncio.wait_for(pool.acquire("s"), 1)).address == "a:1"


async def test_an_unserving_worker_gets_no_work() -> None:
    pool = pool_of({"a:1": 4, "b:1": 4})
    pool._workers["b:1"].serving = False  # draining
    pool._changed()
    assert {(await pool.acquire("s")).address for _ in range(4)} == {"a:1"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_limiter_keeps_every_window_inside_the_budgets() -> None:
    clock = Clock()
    limits = ModelLimits(requests_per_minute=3, output_tokens_per_minute=100, margin_s=0.5)
    limiter = ModelRateLimiter(limits, clock)
    for _ in range(3):
        (await limiter.acquire(10, 20)).release()
        clock.now += 1
    assert limiter._wait_needed(10, 20) == pytest.approx(57.5), "the 4th waits for the 1st to expire"
    clock.now += 57.5
    assert limiter._wait_needed(10, 20) == 0
    permit = await limiter.acquire(10, 20)
    permit.settle(10, 90)  # it turned out long: the output budget now binds
    assert limiter._wait_needed(10, 20) == pytest.approx(60.5)


async def test_a_429_pauses_every_caller() -> None:
    clock = Clock()
    limiter = ModelRateLimiter(ModelLimits(), clock)
    limiter.note_error(RateLimited("slow down", retry_after_s=4.0))
    assert limiter._wait_needed(1, 1) == pytest.approx(4.0)
    clock.now += 4
    assert limiter._wait_needed(1, 1) == 0


class Streaming:
    """A provider that answers at once, then takes a second per further chunk, on `clock`."""

    name = "fake"

    def __init__(self, clock: Clock, chunks: int) -> None:
        self._clock = clock
        self._chunks = chunks

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        for index in range(self._chunks):
            if index:
                self._clock.now += 1
            yield "chunk"
        yield Usage(10, 20)


async def test_a_request_is_counted_from_its_first_answer_not_its_last_chunk() -> None:
    clock = Clock()
    limiter = ModelRateLimiter(ModelLimits(requests_per_minute=120, window_s=1.0, margin_s=0.05), clock)
    request = StreamRequest(model="m", system="s", prompt="p")
    began = clock.now
    # Two requests a second. A three-second stream and a short call start together; a third
    # request comes a second later, while the stream still runs.
    stream = RateLimitedProvider(Streaming(clock, 3), limiter).stream(request)
    await anext(stream)
    [_ async for _ in RateLimitedProvider(Streaming(clock, 1), limiter).stream(request)]
    await anext(stream)
    granted_at = clock.now - began + limiter._wait_needed(10, 20)
    assert granted_at == pytest.approx(1.05), "both went out at 0 s: the third fits once they leave"
    [_ async for _ in stream]
    stamps = [spend.at - began for spend in limiter._spent]
    assert stamps == [0, 0], "each request keeps the time of its first answer"
