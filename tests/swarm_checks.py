"""What every correct swarm stream satisfies, checked the way a user of the API would."""

from __future__ import annotations

from collections import Counter, defaultdict

from swarm.v1 import events_pb2

TERMINAL = {"swarm_completed", "swarm_failed", "swarm_cancelled"}


def kinds(events: list[events_pb2.SwarmEvent]) -> list[str]:
    return [str(event.WhichOneof("kind")) for event in events]


def assert_well_formed(events: list[events_pb2.SwarmEvent]) -> None:
    """Numbered 1..n without gaps, one swarm, accepted first, exactly one terminal event, last."""
    assert events, "no events"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len({e.swarm_id for e in events}) == 1
    assert kinds(events)[0] == "accepted"
    assert sum(kind in TERMINAL for kind in kinds(events)) == 1
    assert kinds(events)[-1] in TERMINAL


def assert_completed(events: list[events_pb2.SwarmEvent], agents: int) -> None:
    """A completed swarm: N planned subtasks, each completed exactly once with its attempt's output."""
    assert_well_formed(events)
    assert kinds(events)[-1] == "swarm_completed", events[-1]
    plans = [e.plan_created for e in events if e.HasField("plan_created")]
    assert len(plans) == 1
    ids = [s.id for s in plans[0].subtasks]
    assert len(ids) == agents == len(set(ids))
    completed = Counter(e.subtask_completed.subtask_id for e in events if e.HasField("subtask_completed"))
    assert completed == Counter(ids), "every subtask completes exactly once"
    deltas: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in events:
        if e.HasField("subtask_delta"):
            deltas[(e.subtask_delta.subtask_id, e.subtask_delta.attempt)].append(e.subtask_delta.text)
    usage_in = usage_out = 0
    for e in events:
        if e.HasField("subtask_completed"):
            done = e.subtask_completed
            assert done.output == "".join(deltas[(done.subtask_id, done.attempt)]), (
                "output is its attempt's deltas"
            )
            assert done.output and done.worker_id
            usage_in += done.usage.input_tokens
            usage_out += done.usage.output_tokens
    result = events[-1].swarm_completed
    syntheses = [e.synthesis_delta for e in events if e.HasField("synthesis_delta")]
    last = max((s.attempt for s in syntheses), default=0)  # a resumed swarm synthesizes afresh
    synthesis = "".join(s.text for s in syntheses if s.attempt == last)
    assert result.result == synthesis and result.result
    assert result.usage.input_tokens > usage_in and result.usage.output_tokens > usage_out
