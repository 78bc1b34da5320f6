"""The resume rules on their own, with no gRPC: which events reach the caller, when to try again,
when to give up. (The clients that follow them are tested against real faults in test_resume.)"""

from __future__ import annotations

import grpc
import pytest

from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_client import ResumeFailed, SwarmError
from swarm_client import _resume as resume
from swarm_client._resume import Resumption


def event(sequence: int, kind: str = "subtask_delta") -> events_pb2.SwarmEvent:
    message = events_pb2.SwarmEvent(swarm_id="s1", sequence=sequence)
    getattr(message, kind).SetInParent()
    return message


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(resume.time, "monotonic", lambda: self.now)


def test_each_event_once_in_order_and_a_gap_is_data_loss() -> None:
    place = Resumption("", 0, 60)
    assert [place.admit(event(n)) for n in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    assert (place.swarm_id, place.last_sequence, place.ended) == ("s1", 3, False)
    with pytest.raises(SwarmError, match=r"events 4\.\.5 did not arrive") as raised:
        place.admit(event(6))
    assert raised.value.code == grpc.StatusCode.DATA_LOSS and place.last_sequence == 3
    assert place.admit(event(4, "swarm_completed")) and place.ended


def test_attempts_back_off_with_jitter_up_to_5_s_and_stop_at_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(monkeypatch)
    place = Resumption("s1", 7, 60)
    delays = []
    with pytest.raises(ResumeFailed) as raised:
        for _ in range(100):
            attempt = place.broke("Socket closed")
            assert attempt.after_sequence == 7 and attempt.attempt == len(delays) + 1
            delays.append(attempt.delay_s)
            clock.now += attempt.delay_s
    assert 0.1 <= delays[0] <= 0.2 and all(0.1 <= d <= 5.0 for d in delays)
    assert delays[4] > delays[0] * 4, "the ceiling doubles"
    assert sum(delays) == pytest.approx(60), "the last wait ends at the window, not past it"
    failure = raised.value
    assert (failure.swarm_id, failure.last_sequence, failure.cause) == ("s1", 7, "Socket closed")
    assert "could not be resumed within 60s" in str(failure)


def test_an_event_gives_a_later_break_the_whole_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    place = Resumption("s1", 0, 10)
    place.broke("first break")
    clock.now += 9
    assert place.admit(event(1))
    clock.now += 5
    assert place.broke("second break").attempt == 1, "counted afresh"
    clock.now += 9.9
    place.broke("still down")
    clock.now += 0.2
    with pytest.raises(ResumeFailed):
        place.broke("gone")


def test_resuming_off_gives_up_at_the_first_break() -> None:
    with pytest.raises(ResumeFailed, match="resuming is off: WatchSwarm it after sequence 3"):
        Resumption("s1", 3, 0).broke("Socket closed")


def test_only_a_named_swarm_resumes_and_only_an_attached_resumed_unfinished_run_cancels_on_leave() -> None:
    run = Resumption("", 0, 60, attached=True)
    assert not run.can_resume() and not run.cancels_on_leave()
    run.admit(event(1, "accepted"))
    assert run.can_resume() and not run.cancels_on_leave(), "RunSwarm's own end cancels it"
    run.broke("Socket closed")
    assert run.cancels_on_leave()
    run.admit(event(2, "swarm_completed"))
    assert not run.cancels_on_leave(), "nothing left to cancel"
    assert not Resumption("s1", 0, 60).cancels_on_leave(), "a watch never cancels"


def test_a_stream_that_ended_early_left_nothing_out_only_if_the_swarm_had_ended_by_then() -> None:
    place = Resumption("s1", 10, 60)
    completed = orchestrator_pb2.SWARM_STATE_COMPLETED
    assert place.has_all_of(orchestrator_pb2.Swarm(state=completed, last_sequence=10))
    assert not place.has_all_of(orchestrator_pb2.Swarm(state=completed, last_sequence=11))
    assert not place.has_all_of(orchestrator_pb2.Swarm(state=orchestrator_pb2.SWARM_STATE_RUNNING))
