"""The event log (sequence, replay, live follow, terminal) and the state derived from it."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator_service.event_log import EventLog, LogClosed, Logged
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import MemoryStore
from swarm.v1 import events_pb2, orchestrator_pb2


def new_log(swarm_id: str = "s1", store: MemoryStore | None = None) -> EventLog:
    return EventLog(SwarmRecord(swarm_id), store or MemoryStore())


async def test_sequence_numbers_start_at_one_without_gaps() -> None:
    store = MemoryStore()
    log = new_log(store=store)
    for i in range(5):
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text=str(i)))
    await log.stored()
    events = await store.events("s1", after_sequence=0, limit=10)
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert all(e.swarm_id == "s1" and e.time.seconds > 0 for e in events)


async def test_nothing_is_appended_after_the_terminal_event() -> None:
    log = new_log()
    log.append("swarm_failed", events_pb2.SwarmFailed(error="x"))
    assert log.closed
    with pytest.raises(LogClosed):
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text="late"))


async def test_follow_replays_after_a_sequence_then_goes_live_to_the_end() -> None:
    log = new_log()
    for i in range(3):
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text=str(i)))
    seen: list[int] = []

    async def watch() -> None:
        async for batch in log.follow(after_sequence=1):
            seen.extend(event.sequence for event in batch)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.01)
    assert seen == [2, 3]
    log.append("synthesis_delta", events_pb2.SynthesisDelta(text="live"))
    log.append("swarm_completed", events_pb2.SwarmCompleted(result="done"))
    await asyncio.wait_for(watcher, 2)
    assert seen == [2, 3, 4, 5]


async def test_many_followers_see_the_same_events() -> None:
    log = new_log()

    async def collect() -> list[int]:
        return [event.sequence async for batch in log.follow() for event in batch]

    followers = [asyncio.create_task(collect()) for _ in range(5)]
    for i in range(50):
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text=str(i)))
        if i % 7 == 0:
            await asyncio.sleep(0)
    log.append("swarm_cancelled", events_pb2.SwarmCancelled(reason="test"))
    results = await asyncio.wait_for(asyncio.gather(*followers), 2)
    assert all(r == list(range(1, 52)) for r in results)


async def test_every_reader_shares_one_serialization_of_each_event_a_whole_response() -> None:
    """Followers get the same bytes object for each event, not copies; the bytes are exactly a
    RunSwarmResponse and a WatchSwarmResponse holding the event; the store keeps the same event."""
    store = MemoryStore()
    log = new_log(store=store)

    async def collect() -> list[Logged]:
        return [logged async for batch in log.follow() for logged in batch]

    followers = [asyncio.create_task(collect()) for _ in range(3)]
    log.append("accepted", events_pb2.SwarmAccepted(idea="i" * 300, num_agents=1))  # a 2-byte length
    log.append("synthesis_delta", events_pb2.SynthesisDelta(text="x" * 20_000))  # a 3-byte one
    log.append("swarm_completed", events_pb2.SwarmCompleted(result="r"))
    first, *others = await asyncio.wait_for(asyncio.gather(*followers), 2)
    stored = await store.events("s1", after_sequence=0, limit=10)
    assert [logged.sequence for logged in first] == [1, 2, 3]
    for index, (logged, event) in enumerate(zip(first, stored, strict=True)):
        assert all(other[index].frame is logged.frame for other in others), "one object, shared"
        assert logged.frame == orchestrator_pb2.RunSwarmResponse(event=event).SerializeToString()
        assert logged.frame == orchestrator_pb2.WatchSwarmResponse(event=event).SerializeToString()
        assert logged.event == event


async def test_record_follows_a_swarm_with_a_retry() -> None:
    record = SwarmRecord("s1")
    log = EventLog(record, MemoryStore())
    log.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1, model="m", provider="simulated"))
    assert record.state == orchestrator_pb2.SWARM_STATE_PLANNING
    subtask = events_pb2.Subtask(id="subtask-1", title="t", instructions="x")
    log.append("plan_created", events_pb2.PlanCreated(subtasks=[subtask]))
    log.append(
        "subtask_started", events_pb2.SubtaskStarted(subtask_id="subtask-1", worker_id="w1", attempt=1)
    )
    log.append(
        "subtask_failed",
        events_pb2.SubtaskFailed(
            subtask_id="subtask-1", worker_id="w1", error="gone", attempt=1, will_retry=True
        ),
    )
    assert record.subtasks["subtask-1"].state == orchestrator_pb2.SUBTASK_STATE_PENDING
    log.append(
        "subtask_started", events_pb2.SubtaskStarted(subtask_id="subtask-1", worker_id="w2", attempt=2)
    )
    log.append(
        "subtask_completed",
        events_pb2.SubtaskCompleted(
            subtask_id="subtask-1",
            worker_id="w2",
            output="out",
            usage=events_pb2.Usage(output_tokens=3),
            attempt=2,
        ),
    )
    log.append(
        "swarm_completed", events_pb2.SwarmCompleted(result="r", usage=events_pb2.Usage(output_tokens=9))
    )
    view = record.to_proto()
    assert view.state == orchestrator_pb2.SWARM_STATE_COMPLETED
    assert view.subtasks[0].state == orchestrator_pb2.SUBTASK_STATE_COMPLETED
    assert (view.subtasks[0].attempts, view.subtasks[0].worker_id, view.subtasks[0].output) == (
        2,
        "w2",
        "out",
    )
    assert view.result == "r" and view.usage.output_tokens == 9
    assert view.last_sequence == 7 and view.HasField("end_time")


async def test_what_a_swarm_spends_is_told_once_durable_failed_attempts_and_the_final_synthesis_included() -> (
    None
):
    """The tenants' daily quotas hear of spending from here: it must be what the swarm's record
    counts as spent, everything included, each call once."""
    told: list[tuple[str, events_pb2.Usage]] = []
    log = EventLog(
        SwarmRecord("s1"), MemoryStore(), on_spent=lambda swarm, usage: told.append((swarm, usage))
    )
    plan = [events_pb2.Subtask(id="subtask-1", title="one", instructions="do")]
    log.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1, model="m"))
    log.append(
        "plan_created",
        events_pb2.PlanCreated(subtasks=plan, usage=events_pb2.Usage(input_tokens=10, cost_usd=0.1)),
    )
    log.append("subtask_started", events_pb2.SubtaskStarted(subtask_id="subtask-1", worker_id="w", attempt=1))
    failed = events_pb2.Usage(input_tokens=5, output_tokens=5, cost_usd=0.2)
    log.append(
        "subtask_failed",
        events_pb2.SubtaskFailed(subtask_id="subtask-1", attempt=1, will_retry=True, usage=failed),
    )
    log.append("subtask_started", events_pb2.SubtaskStarted(subtask_id="subtask-1", worker_id="w", attempt=2))
    answer = events_pb2.Usage(input_tokens=5, output_tokens=20, cost_usd=0.3)
    log.append(
        "subtask_completed",
        events_pb2.SubtaskCompleted(subtask_id="subtask-1", attempt=2, output="o", usage=answer),
    )
    await log.stored()
    # The final synthesis is told in the total alone (a swarm without a budget).
    total = events_pb2.Usage(input_tokens=60, output_tokens=55, cost_usd=1.0)
    log.append("swarm_completed", events_pb2.SwarmCompleted(result="r", usage=total))
    await log.stored()
    assert {swarm for swarm, _ in told} == {"s1"}
    assert sum(usage.cost_usd for _, usage in told) == pytest.approx(0.1 + 0.2 + 0.3 + 0.4)
    # swarm_completed's usage is the whole swarm's: told in all, each call once.
    assert sum(usage.input_tokens + usage.output_tokens for _, usage in told) == 60 + 55
    assert told[-1][1].cost_usd == pytest.approx(0.4), "the final synthesis: what the total adds"
