"""How a swarm's stream of events goes on after its connection breaks.

A stream that fails UNAVAILABLE, or ends before the swarm's terminal event, is picked up again
with WatchSwarm(after_sequence = the last event the caller got). The orchestrator keeps every event,
so nothing is lost: a resumed stream replays what the caller missed, then follows live.

- Exactly once, in order: an event at or below the last sequence is a duplicate and is dropped; one
  beyond the next sequence means events went missing, which the orchestrator never does: that
  raises (DATA_LOSS) rather than show a swarm with holes in it.
- The schedule: attempts after 0.1-0.2 s, then doubling up to 5 s, each with jitter (a restarted
  orchestrator is not met by all its clients at the same instant), for `within_s` from the break
  (60 s by default; 0 turns resuming off). Each event that arrives starts a later break afresh.
- Giving up raises ResumeFailed with the swarm id and the last sequence, so the caller can go on
  later with WatchSwarm.

`Resumption` decides and keeps count; it does no I/O, so the async and the sync client drive the
same rules with their own calls and sleeps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_client._errors import ResumeFailed, SwarmError, from_rpc_error

DEFAULT_RESUME_WITHIN_S = 60.0
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
TERMINAL_KINDS = frozenset({"swarm_completed", "swarm_failed", "swarm_cancelled"})
# The most events a RunSwarm or WatchSwarm response may carry for this client: what is ready at
# once comes in one message, which costs the orchestrator far less than a message each.
EVENTS_PER_MESSAGE = 64
FINISHED_STATES = frozenset(
    {
        orchestrator_pb2.SWARM_STATE_COMPLETED,
        orchestrator_pb2.SWARM_STATE_FAILED,
        orchestrator_pb2.SWARM_STATE_CANCELLED,
    }
)
ENDED_EARLY = "the stream ended before the swarm did"


def events_in(
    response: orchestrator_pb2.RunSwarmResponse | orchestrator_pb2.WatchSwarmResponse,
) -> list[events_pb2.SwarmEvent]:
    """A response's events, in order: `event`, then `more_events`."""
    return [response.event, *response.more_events]


@dataclass(frozen=True)
class Reconnecting:
    """What `on_reconnect` is told before each attempt to resume a broken stream."""

    swarm_id: str
    after_sequence: int
    attempt: int  # 1 for the first attempt after a break
    cause: str  # why the stream broke, or why the previous attempt failed
    delay_s: float  # the wait before this attempt
    remaining_s: float  # time left, from the end of the wait, before resuming gives up


class Resumption:
    """One stream's place (swarm id, last sequence) and its reconnection schedule."""

    def __init__(
        self,
        swarm_id: str,
        after_sequence: int,
        within_s: float,
        *,
        attached: bool = False,
        errors: Callable[[grpc.RpcError], SwarmError] = from_rpc_error,
    ) -> None:
        """`errors` turns a grpc error that resuming cannot mend into the SwarmError to raise."""
        self._errors = errors
        self.swarm_id = swarm_id  # "" until a RunSwarm stream's first event names it
        self.attached = attached  # a run() without detach: the caller's leaving cancels the swarm
        self.last_sequence = after_sequence
        self.within_s = within_s
        self.resumed = False  # a WatchSwarm has replaced the first call
        self.ended = False  # the terminal event was delivered
        self._broke_at: float | None = None
        self._attempts = 0
        self._random = random.Random()

    def admit(self, event: events_pb2.SwarmEvent) -> bool:
        """True for the next event, which the caller is to get; False for one already delivered."""
        if not self.swarm_id:
            self.swarm_id = event.swarm_id
        if event.sequence <= self.last_sequence:
            return False
        if event.sequence > self.last_sequence + 1:
            raise SwarmError(
                f"swarm {self.swarm_id}: events {self.last_sequence + 1}..{event.sequence - 1} did not "
                f"arrive; WatchSwarm it after sequence {self.last_sequence} to try again",
                code=grpc.StatusCode.DATA_LOSS,
            )
        self.last_sequence = event.sequence
        self.ended = event.WhichOneof("kind") in TERMINAL_KINDS
        self._broke_at, self._attempts = None, 0  # progress: a later break gets a whole window
        return True

    def has_all_of(self, swarm: orchestrator_pb2.Swarm) -> bool:
        """A stream that ended without a terminal event left nothing out if the swarm had ended by
        then with no event after ours (a watch that starts at or past a finished swarm's end)."""
        return swarm.state in FINISHED_STATES and swarm.last_sequence <= self.last_sequence

    def can_resume(self) -> bool:
        """Only a named swarm can be watched: a RunSwarm that breaks before its first event
        reports the break (a `request_id` makes calling run() again safe)."""
        return bool(self.swarm_id)

    def cause_of(self, error: grpc.RpcError) -> str:
        """Why the stream broke, when resuming can mend it; else the error as a SwarmError."""
        code: grpc.StatusCode = error.code()
        if code != grpc.StatusCode.UNAVAILABLE or not self.can_resume():
            raise self._errors(error) from None
        return str(error.details() or code.name)

    def cancels_on_leave(self) -> bool:
        """A caller leaving an attached run() cancels the swarm: the client must do it once a
        WatchSwarm has replaced the RunSwarm call whose end would have."""
        return self.attached and self.resumed and not self.ended

    def broke(self, cause: str) -> Reconnecting:
        """The stream (or the last attempt) broke: the next attempt, or ResumeFailed."""
        now = time.monotonic()
        if self._broke_at is None:
            self._broke_at = now
        remaining = self._broke_at + self.within_s - now
        if remaining <= 0:
            raise ResumeFailed(
                self._give_up(cause), swarm_id=self.swarm_id, last_sequence=self.last_sequence, cause=cause
            )
        self._attempts += 1
        ceiling = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (self._attempts - 1))
        delay = min(remaining, ceiling * self._random.uniform(0.5, 1.0))
        self.resumed = True
        return Reconnecting(
            swarm_id=self.swarm_id,
            after_sequence=self.last_sequence,
            attempt=self._attempts,
            cause=cause,
            delay_s=delay,
            remaining_s=remaining - delay,
        )

    def watch_request(self) -> orchestrator_pb2.WatchSwarmRequest:
        return orchestrator_pb2.WatchSwarmRequest(
            swarm_id=self.swarm_id,
            after_sequence=self.last_sequence,
            max_events_per_message=EVENTS_PER_MESSAGE,
        )

    def _give_up(self, cause: str) -> str:
        how = (
            "resuming is off"
            if self.within_s <= 0
            else f"it could not be resumed within {self.within_s:g}s ({self._attempts} attempt(s))"
        )
        return (
            f"the stream of swarm {self.swarm_id} broke after sequence {self.last_sequence} ({cause}) "
            f"and {how}: WatchSwarm it after sequence {self.last_sequence}"
        )
