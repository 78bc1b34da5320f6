"""The soak's invariant checks catch what they are for: a gap, a duplicate across reconnects, an
event changed after a client saw it, two terminal events, a subtask completed twice."""

from __future__ import annotations

from soak.invariants import Connection, check_connections, check_replay
from swarm.v1 import events_pb2


def event(sequence: int, kind: str, **fields: object) -> events_pb2.SwarmEvent:
    message = events_pb2.SwarmEvent(swarm_id="s", sequence=sequence)
    getattr(message, kind).SetInParent()
    for name, value in fields.items():
        setattr(getattr(message, kind), name, value)
    return message


def completed_swarm() -> list[events_pb2.SwarmEvent]:
    plan = events_pb2.PlanCreated(subtasks=[events_pb2.Subtask(id="subtask-1", title="t", instructions="i")])
    events = [event(1, "accepted"), events_pb2.SwarmEvent(swarm_id="s", sequence=2, plan_created=plan)]
    events += [
        event(3, "subtask_started", subtask_id="subtask-1", attempt=1),
        event(4, "subtask_delta", subtask_id="subtask-1", attempt=1, text="out"),
        event(5, "subtask_completed", subtask_id="subtask-1", attempt=1, output="out"),
        event(6, "swarm_completed", result="r"),
    ]
    return events


def test_a_well_formed_swarm_and_its_clean_reconnects_pass() -> None:
    replay = completed_swarm()
    assert check_replay(replay) == []
    connections = [Connection(0, replay[:3]), Connection(3, replay[3:])]
    assert check_connections(connections, replay) == []


def test_a_duplicate_or_a_gap_across_reconnects_is_caught() -> None:
    replay = completed_swarm()
    duplicate = [Connection(0, replay[:3]), Connection(3, replay[2:])]
    assert check_connections(duplicate, replay)
    gap = [Connection(0, replay[:3]), Connection(3, replay[4:])]
    assert check_connections(gap, replay)


def test_an_event_that_changed_after_a_client_saw_it_is_caught() -> None:
    replay = completed_swarm()
    seen = [events_pb2.SwarmEvent() for _ in replay]
    for copy, original in zip(seen, replay, strict=True):
        copy.CopyFrom(original)
    seen[3].subtask_delta.text = "other"
    assert check_connections([Connection(0, seen)], replay)


def test_two_terminal_events_or_a_subtask_completed_twice_are_caught() -> None:
    two_ends = [*completed_swarm(), event(7, "swarm_failed", error="late")]
    assert check_replay(two_ends)
    twice = completed_swarm()
    twice.insert(5, event(6, "subtask_completed", subtask_id="subtask-1", attempt=1, output="out"))
    twice[-1].sequence = 7
    assert any("completed twice" in problem for problem in check_replay(twice))


def test_a_completed_swarm_missing_a_planned_subtask_is_caught() -> None:
    missing = [e for e in completed_swarm() if not e.HasField("subtask_completed")]
    for sequence, e in enumerate(missing, start=1):
        e.sequence = sequence
    assert check_replay(missing)
