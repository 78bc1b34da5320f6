"""What must hold of every swarm after any faults, checked from what its clients recorded and from a
final replay. Each check returns the violations it found, as sentences; none means it held."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from swarm.v1 import events_pb2

TERMINAL = frozenset({"swarm_completed", "swarm_failed", "swarm_cancelled"})


@dataclass
class Connection:
    """One stream a client read: RunSwarm (after 0) or WatchSwarm after `after`."""

    after: int
    events: list[events_pb2.SwarmEvent] = field(default_factory=list)


def kind(event: events_pb2.SwarmEvent) -> str:
    return str(event.WhichOneof("kind"))


def check_replay(events: list[events_pb2.SwarmEvent]) -> list[str]:
    """The stored log: numbered 1..n, one terminal event and it last; a completed swarm has exactly
    one subtask_completed per planned subtask, with its attempt's output."""
    problems: list[str] = []
    if not events:
        return ["no events"]
    sequences = [e.sequence for e in events]
    if sequences != list(range(1, len(events) + 1)):
        problems.append(f"sequences are not 1..{len(events)} without gaps")
    terminal = [kind(e) for e in events if kind(e) in TERMINAL]
    if len(terminal) != 1:
        problems.append(f"{len(terminal)} terminal events")
    elif kind(events[-1]) not in TERMINAL:
        problems.append("the terminal event is not the last")
    if kind(events[0]) != "accepted":
        problems.append("the first event is not accepted")
    completed = Counter(e.subtask_completed.subtask_id for e in events if e.HasField("subtask_completed"))
    twice = [subtask for subtask, count in completed.items() if count > 1]
    if twice:
        problems.append(f"subtasks completed twice: {sorted(twice)}")
    if kind(events[-1]) == "swarm_completed":
        plans = [e.plan_created for e in events if e.HasField("plan_created")]
        planned = Counter(s.id for plan in plans for s in plan.subtasks)
        if len(plans) != 1 or completed != planned:
            problems.append("a completed swarm without exactly one subtask_completed per planned subtask")
        deltas: dict[tuple[str, int], list[str]] = {}
        for e in events:
            if e.HasField("subtask_delta"):
                key = (e.subtask_delta.subtask_id, e.subtask_delta.attempt)
                deltas.setdefault(key, []).append(e.subtask_delta.text)
        for e in events:
            if e.HasField("subtask_completed"):
                done = e.subtask_completed
                if done.output != "".join(deltas.get((done.subtask_id, done.attempt), [])):
                    problems.append(f"{done.subtask_id}'s output is not its attempt's deltas")
    return problems


def check_connections(connections: list[Connection], replay: list[events_pb2.SwarmEvent]) -> list[str]:
    """What clients saw: each stream contiguous from where it asked to start, so no duplicate and no
    gap across reconnects, and every event seen is still there, identical, in the replay."""
    problems: list[str] = []
    stored = {e.sequence: e.SerializeToString(deterministic=True) for e in replay}
    for number, connection in enumerate(connections, start=1):
        expected = connection.after + 1
        for event in connection.events:
            if event.sequence != expected:
                problems.append(
                    f"connection {number} (after {connection.after}) got sequence {event.sequence} "
                    f"where {expected} was due"
                )
                break
            expected += 1
        for event in connection.events:
            if stored.get(event.sequence) != event.SerializeToString(deterministic=True):
                problems.append(f"event {event.sequence} seen by a client differs in the replay")
                break
    return problems
