"""A swarm as it stands, derived from its events alone (the log is the source of truth)."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from swarm.v1 import events_pb2, orchestrator_pb2

S = orchestrator_pb2.SwarmState
T = orchestrator_pb2.SubtaskState


@dataclass
class SubtaskRecord:
    subtask: events_pb2.Subtask
    state: int = T.SUBTASK_STATE_PENDING
    attempts: int = 0
    worker_id: str = ""
    output: str = ""
    error: str = ""
    usage: events_pb2.Usage = field(default_factory=events_pb2.Usage)


class SwarmRecord:
    """Applies events one by one; `to_proto` gives the GetSwarm view."""

    def __init__(self, swarm_id: str) -> None:
        self.swarm_id = swarm_id
        self.state: int = S.SWARM_STATE_UNSPECIFIED
        self.accepted = events_pb2.SwarmAccepted()
        self.subtasks: dict[str, SubtaskRecord] = {}
        self.result = ""
        self.error = ""
        self.usage = events_pb2.Usage()
        self.create_time = Timestamp()
        self.update_time = Timestamp()
        self.end_time: Timestamp | None = None
        self.last_sequence = 0

    @property
    def finished(self) -> bool:
        return self.end_time is not None

    def apply(self, event: events_pb2.SwarmEvent) -> None:
        kind = event.WhichOneof("kind")
        handler = getattr(self, f"_apply_{kind}", None) if kind else None
        if kind is None or handler is None:
            raise ValueError(f"unknown event kind {kind!r} in swarm {self.swarm_id}")
        handler(getattr(event, kind))
        self.last_sequence = event.sequence
        self.update_time = event.time
        if kind == "accepted":
            self.create_time = event.time
        if self.state in (S.SWARM_STATE_COMPLETED, S.SWARM_STATE_FAILED, S.SWARM_STATE_CANCELLED):
            self.end_time = event.time

    def _apply_accepted(self, body: events_pb2.SwarmAccepted) -> None:
        self.accepted = body
        self.state = S.SWARM_STATE_PLANNING

    def _apply_plan_created(self, body: events_pb2.PlanCreated) -> None:
        self.subtasks = {subtask.id: SubtaskRecord(subtask) for subtask in body.subtasks}
        self.state = S.SWARM_STATE_RUNNING

    def _apply_subtask_started(self, body: events_pb2.SubtaskStarted) -> None:
        record = self.subtasks[body.subtask_id]
        record.state = T.SUBTASK_STATE_RUNNING
        record.attempts = body.attempt
        record.worker_id = body.worker_id
        record.error = ""

    def _apply_subtask_delta(self, body: events_pb2.SubtaskDelta) -> None:
        pass  # the output is kept whole in subtask_completed

    def _apply_subtask_completed(self, body: events_pb2.SubtaskCompleted) -> None:
        record = self.subtasks[body.subtask_id]
        record.state = T.SUBTASK_STATE_COMPLETED
        record.worker_id = body.worker_id
        record.output = body.output
        record.usage = body.usage

    def _apply_subtask_failed(self, body: events_pb2.SubtaskFailed) -> None:
        record = self.subtasks[body.subtask_id]
        record.error = body.error
        record.state = T.SUBTASK_STATE_PENDING if body.will_retry else T.SUBTASK_STATE_FAILED

    def _apply_synthesis_delta(self, body: events_pb2.SynthesisDelta) -> None:
        self.state = S.SWARM_STATE_SYNTHESIZING

    def _apply_swarm_completed(self, body: events_pb2.SwarmCompleted) -> None:
        self.state = S.SWARM_STATE_COMPLETED
        self.result = body.result
        self.usage = body.usage

    def _apply_swarm_failed(self, body: events_pb2.SwarmFailed) -> None:
        self.state = S.SWARM_STATE_FAILED
        self.error = body.error

    def _apply_swarm_cancelled(self, body: events_pb2.SwarmCancelled) -> None:
        self.state = S.SWARM_STATE_CANCELLED
        self.error = body.reason

    def to_proto(self, *, with_subtasks: bool = True) -> orchestrator_pb2.Swarm:
        swarm = orchestrator_pb2.Swarm(
            swarm_id=self.swarm_id,
            idea=self.accepted.idea,
            num_agents=self.accepted.num_agents,
            model=self.accepted.model,
            provider=self.accepted.provider,
            request_id=self.accepted.request_id,
            state=self.state,  # type: ignore[arg-type]
            result=self.result,
            error=self.error,
            usage=self.usage,
            create_time=self.create_time,
            update_time=self.update_time,
            last_sequence=self.last_sequence,
        )
        if self.end_time is not None:
            swarm.end_time.CopyFrom(self.end_time)
        if with_subtasks:
            for record in self.subtasks.values():
                swarm.subtasks.add(
                    subtask=record.subtask,
                    state=record.state,
                    attempts=record.attempts,
                    worker_id=record.worker_id,
                    output=record.output,
                    error=record.error,
                    usage=record.usage,
                )
        return swarm
