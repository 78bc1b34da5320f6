"""The sync client and the `swarm` CLI against grpc_testing's fake channel, the test playing the
orchestrator's side of every call. It reaches in milliseconds what real servers seldom do on cue:
every status code, a BadRequest, a stream cut after N events, a Ctrl-C mid-stream, the deadline
each call carries. (grpc_testing has no fake for grpc.aio: the async client is tested against real
servers, as the services are.)

The client's calls block until the test answers, so whichever side would wait runs on a thread of
its own, and every wait is bounded by WAIT_S.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf import descriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_client import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ResumeFailed,
    SwarmClient,
    SwarmError,
    Unauthenticated,
    Unavailable,
    cli,
)
from swarm_client._resume import EVENTS_PER_MESSAGE

SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
RUN, WATCH, GET, LIST, CANCEL = (
    SERVICE.methods_by_name[name]
    for name in ("RunSwarm", "WatchSwarm", "GetSwarm", "ListSwarms", "CancelSwarm")
)
WAIT_S = 5.0
OK_DETAILS = ""
NO_METADATA: tuple[tuple[str, str], ...] = ()
# What the fake channel adds to every call's metadata, standing in for the runtime's own headers.
RUNTIME_METADATA_KEY = "grpc.metadata_added_by_runtime"

ERROR_CLASS: dict[grpc.StatusCode, type[SwarmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
FAILURES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]

T = TypeVar("T")


class Pending(Generic[T]):
    """`work()` on a daemon thread; `result()` waits for it at most WAIT_S, so a call that never
    comes (or never ends) fails the test instead of hanging it."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._box: queue.Queue[tuple[bool, Any]] = queue.Queue()
        threading.Thread(target=self._run, args=(work,), daemon=True).start()

    def _run(self, work: Callable[[], T]) -> None:
        try:
            self._box.put((True, work()))
        except BaseException as error:
            self._box.put((False, error))

    def result(self, seconds: float = WAIT_S) -> T:
        try:
            ok, value = self._box.get(timeout=seconds)
        except queue.Empty:
            raise AssertionError(f"nothing within {seconds:g} s") from None
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]


class NotedStream:
    """A response stream that tells the recorder of each response the client took."""

    def __init__(self, call: Any, recorder: Recorder) -> None:
        self._call, self._recorder = call, recorder

    def __iter__(self) -> NotedStream:
        return self

    def __next__(self) -> Any:
        if self._recorder.taken == self._recorder.ctrl_c_after:
            # Where grpc's own blocking stream raises a Ctrl-C: in the read it was waiting in.
            # (A real SIGINT here is no test: a lock wait without a timeout, such as the fake's,
            # need not wake for it while other threads run.)
            raise KeyboardInterrupt
        response = next(self._call)
        self._recorder.taken += 1
        self._recorder.delivered.put(response)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class NotedCall:
    def __init__(self, channel: Recorder, method: str, call: Any, streaming: bool) -> None:
        self._channel, self._method, self._call, self._streaming = channel, method, call, streaming

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None, **_: Any) -> Any:
        self._channel.deadlines.append((self._method.rsplit("/", 1)[1], timeout))
        call = self._call(request, timeout=timeout, metadata=metadata)
        return NotedStream(call, self._channel) if self._streaming else call


class Recorder(grpc.Channel):
    """grpc_testing's channel drops each call's timeout, and an error ending a stream overtakes the
    responses the client has not read yet: this one notes each call's timeout and each response
    the client took, so a test can cut a stream after exactly N events."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.deadlines: list[tuple[str, float | None]] = []
        self.delivered: queue.Queue[Any] = queue.Queue()  # each response the client took, for `deliver`
        self.taken = 0
        self.ctrl_c_after: int | None = None  # responses the client takes before the user presses Ctrl-C

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return NotedCall(self, method, self.channel.unary_unary(method, *args, **kwargs), streaming=False)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return NotedCall(self, method, self.channel.unary_stream(method, *args, **kwargs), streaming=True)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the orchestrator's API has no client streams")

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the orchestrator's API has no client streams")

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        raise NotImplementedError

    def unsubscribe(self, callback: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeOrchestrator:
    """The server side of the fake channel: `take` waits (at most WAIT_S) for the client's next call
    of a method and gives its metadata, request and the handle to answer it."""

    def __init__(self) -> None:
        self.fake = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
        self.channel = Recorder(self.fake)

    def take(self, method: descriptor.MethodDescriptor) -> tuple[Any, Any, Any]:
        if method.server_streaming:
            return Pending(lambda: self.fake.take_unary_stream(method)).result()
        return Pending(lambda: self.fake.take_unary_unary(method)).result()

    def deliver(self, rpc: Any, *responses: Any) -> None:
        """Sends each response and waits (at most WAIT_S) until the client has taken it."""
        for response in responses:
            rpc.send_response(response)
            try:
                self.channel.delivered.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"the client did not take {response}") from None

    def client(self, **options: Any) -> SwarmClient:
        return SwarmClient("fake:50051", channel=self.channel, **options)


@pytest.fixture
def server() -> FakeOrchestrator:
    return FakeOrchestrator()


def event(sequence: int, **kind: Any) -> orchestrator_pb2.RunSwarmResponse:
    return orchestrator_pb2.RunSwarmResponse(
        event=events_pb2.SwarmEvent(swarm_id="s-1", sequence=sequence, **kind)
    )


FIRST_EVENTS = [
    event(1, accepted=events_pb2.SwarmAccepted()),
    event(2, plan_created=events_pb2.PlanCreated(subtasks=[events_pb2.Subtask(id="subtask-1", title="one")])),
    event(
        3, subtask_started=events_pb2.SubtaskStarted(subtask_id="subtask-1", worker_id="worker-0", attempt=1)
    ),
]
COMPLETED = event(4, swarm_completed=events_pb2.SwarmCompleted(result="done"))
# A stream whose first event is its last: for tests of what a call carries, not of its events.
ENDED_AT_ONCE = event(1, swarm_completed=events_pb2.SwarmCompleted(result="done"))


def bad_request(violations: list[tuple[str, str]], message: str = "bad request") -> grpc.Status:
    """INVALID_ARGUMENT as the orchestrator sends it: a google.rpc.BadRequest in the trailers."""
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
                for field, text in violations
            ]
        )
    )
    return rpc_status.to_status(status)


def own_metadata(metadata: Any) -> list[tuple[str, str]]:
    return [(key, value) for key, value in metadata if key != RUNTIME_METADATA_KEY]


# ------------------------------------------------------------------------------------ the client


@pytest.mark.parametrize("code", FAILURES, ids=lambda code: code.name)
def test_every_status_code_is_its_error_class(server: FakeOrchestrator, code: grpc.StatusCode) -> None:
    client = server.client()
    pending = Pending(lambda: client.get("s-1"))
    _, request, rpc = server.take(GET)
    rpc.terminate(orchestrator_pb2.GetSwarmResponse(), NO_METADATA, code, f"the server says {code.name}")

    with pytest.raises(SwarmError) as raised:
        pending.result()
    assert type(raised.value) is ERROR_CLASS.get(code, SwarmError)
    assert raised.value.code == code
    assert raised.value.message == f"the server says {code.name}"
    assert request.swarm_id == "s-1"


@pytest.mark.parametrize("code", FAILURES, ids=lambda code: code.name)
def test_a_stream_that_fails_before_its_first_event_raises_the_same_class(
    server: FakeOrchestrator, code: grpc.StatusCode
) -> None:
    client = server.client()
    pending = Pending(lambda: list(client.run("an idea", 3)))
    _, _, rpc = server.take(RUN)
    rpc.terminate(NO_METADATA, code, "no")

    with pytest.raises(SwarmError) as raised:
        pending.result()
    assert type(raised.value) is ERROR_CLASS.get(code, SwarmError) and raised.value.code == code


def test_an_error_without_details_is_named_by_its_code(server: FakeOrchestrator) -> None:
    client = server.client()
    pending = Pending(lambda: client.cancel("s-1"))
    _, _, rpc = server.take(CANCEL)
    rpc.terminate(orchestrator_pb2.CancelSwarmResponse(), NO_METADATA, grpc.StatusCode.NOT_FOUND, OK_DETAILS)

    with pytest.raises(NotFound) as raised:
        pending.result()
    assert raised.value.message == "NOT_FOUND"


def test_bad_request_violations_reach_the_caller_field_by_field(server: FakeOrchestrator) -> None:
    client = server.client()
    pending = Pending(lambda: list(client.run("", 0)))
    _, _, rpc = server.take(RUN)
    status = bad_request([("idea", "must not be empty"), ("num_agents", "must be between 1 and 256")])
    rpc.terminate(status.trailing_metadata, status.code, status.details)

    with pytest.raises(InvalidArgument) as raised:
        pending.result()
    assert raised.value.violations == [
        ("idea", "must not be empty"),
        ("num_agents", "must be between 1 and 256"),
    ]
    assert raised.value.message == "bad request"


def test_invalid_argument_without_a_bad_request_has_no_violations(server: FakeOrchestrator) -> None:
    client = server.client()
    pending = Pending(lambda: client.get(""))
    _, _, rpc = server.take(GET)
    rpc.terminate(orchestrator_pb2.GetSwarmResponse(), NO_METADATA, grpc.StatusCode.INVALID_ARGUMENT, "no id")

    with pytest.raises(InvalidArgument) as raised:
        pending.result()
    assert raised.value.violations == [] and raised.value.message == "no id"


def test_a_stream_cut_mid_way_gives_its_events_then_the_error(server: FakeOrchestrator) -> None:
    client = server.client(resume_within_s=0)
    received: list[events_pb2.SwarmEvent] = []
    pending = Pending(lambda: received.extend(client.run("an idea", 1)))
    _, _, rpc = server.take(RUN)
    server.deliver(rpc, *FIRST_EVENTS)
    rpc.terminate(NO_METADATA, grpc.StatusCode.UNAVAILABLE, "Socket closed")

    with pytest.raises(ResumeFailed, match="Socket closed") as raised:
        pending.result()
    assert [e.sequence for e in received] == [1, 2, 3], "every event before the cut reached the caller"
    assert (raised.value.swarm_id, raised.value.last_sequence) == ("s-1", 3)


def test_a_stream_cut_mid_way_goes_on_from_its_last_event(server: FakeOrchestrator) -> None:
    client = server.client()
    received: list[events_pb2.SwarmEvent] = []
    pending = Pending(lambda: received.extend(client.run("an idea", 1)))
    _, _, rpc = server.take(RUN)
    server.deliver(rpc, *FIRST_EVENTS)
    rpc.terminate(NO_METADATA, grpc.StatusCode.UNAVAILABLE, "Socket closed")
    _, request, watch = server.take(WATCH)
    # The replay repeats an event the caller already has: it must reach the caller once.
    for response in (FIRST_EVENTS[2], COMPLETED):
        watch.send_response(orchestrator_pb2.WatchSwarmResponse(event=response.event))
    watch.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)

    pending.result()
    assert (request.swarm_id, request.after_sequence) == ("s-1", 3)
    assert [e.sequence for e in received] == [1, 2, 3, 4], "each event once, in order"


def test_a_stream_that_ends_early_is_checked_against_the_swarm_before_it_is_given_up(
    server: FakeOrchestrator,
) -> None:
    client = server.client(resume_within_s=0)
    received: list[events_pb2.SwarmEvent] = []
    pending = Pending(lambda: received.extend(client.watch("s-1", after_sequence=1)))
    _, request, rpc = server.take(WATCH)
    for response in FIRST_EVENTS[1:]:
        rpc.send_response(orchestrator_pb2.WatchSwarmResponse(event=response.event))
    rpc.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)
    running = orchestrator_pb2.Swarm(
        swarm_id="s-1", state=orchestrator_pb2.SWARM_STATE_RUNNING, last_sequence=5
    )
    answer_unary(server, GET, orchestrator_pb2.GetSwarmResponse(swarm=running))

    with pytest.raises(ResumeFailed) as raised:
        pending.result()
    assert [e.sequence for e in received] == [2, 3]
    assert (request.swarm_id, request.after_sequence) == ("s-1", 1)
    assert raised.value.last_sequence == 3


def test_a_watch_that_starts_at_a_finished_swarms_end_just_ends(server: FakeOrchestrator) -> None:
    client = server.client(resume_within_s=0)
    pending = Pending(lambda: list(client.watch("s-1", after_sequence=4)))
    _, _, rpc = server.take(WATCH)
    rpc.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)
    ended = orchestrator_pb2.Swarm(
        swarm_id="s-1", state=orchestrator_pb2.SWARM_STATE_COMPLETED, last_sequence=4
    )
    answer_unary(server, GET, orchestrator_pb2.GetSwarmResponse(swarm=ended))

    assert pending.result() == []


def test_leaving_the_loop_cancels_the_call(server: FakeOrchestrator) -> None:
    client = server.client()
    events = client.run("an idea", 1)
    first = Pending(lambda: next(events))
    _, _, rpc = server.take(RUN)
    server.deliver(rpc, FIRST_EVENTS[0])
    assert first.result().HasField("accepted")

    events.close()  # what a `break` out of the loop does
    Pending(rpc.cancelled).result()  # returns once the client has cancelled the call


def test_cancel_sends_the_reason_and_returns_the_swarm(server: FakeOrchestrator) -> None:
    client = server.client()
    pending = Pending(lambda: client.cancel("s-1", "changed my mind"))
    _, request, rpc = server.take(CANCEL)
    swarm = orchestrator_pb2.Swarm(swarm_id="s-1", state=orchestrator_pb2.SWARM_STATE_CANCELLED)
    rpc.terminate(
        orchestrator_pb2.CancelSwarmResponse(swarm=swarm), NO_METADATA, grpc.StatusCode.OK, OK_DETAILS
    )

    assert pending.result() == swarm
    assert (request.swarm_id, request.reason) == ("s-1", "changed my mind")


def answer_unary(server: FakeOrchestrator, method: descriptor.MethodDescriptor, response: Any) -> Any:
    metadata, request, rpc = server.take(method)
    rpc.terminate(response, NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)
    return metadata, request


def test_unary_calls_carry_the_clients_timeout_and_streams_their_own(server: FakeOrchestrator) -> None:
    client = server.client(timeout=2.5)
    for method, work, response in (
        (GET, lambda: client.get("s-1"), orchestrator_pb2.GetSwarmResponse()),
        (LIST, lambda: client.list(page_size=5), orchestrator_pb2.ListSwarmsResponse()),
        (CANCEL, lambda: client.cancel("s-1"), orchestrator_pb2.CancelSwarmResponse()),
    ):
        pending = Pending(work)
        answer_unary(server, method, response)
        pending.result()
    for method, work in (
        (RUN, lambda: list(client.run("an idea", 1, call_timeout=7.0))),
        (RUN, lambda: list(client.run("an idea", 1))),
        (WATCH, lambda: list(client.watch("s-1"))),
    ):
        pending = Pending(work)
        _, _, rpc = server.take(method)
        rpc.send_response(ENDED_AT_ONCE)
        rpc.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)
        pending.result()

    assert server.channel.deadlines == [
        ("GetSwarm", 2.5),
        ("ListSwarms", 2.5),
        ("CancelSwarm", 2.5),
        ("RunSwarm", 7.0),  # call_timeout is the swarm's deadline
        ("RunSwarm", None),  # a stream lasts as long as its swarm
        ("WatchSwarm", None),
    ]


def test_run_sends_every_option_and_no_metadata_of_its_own(server: FakeOrchestrator) -> None:
    client = server.client()
    pending = Pending(
        lambda: list(
            client.run(
                "an idea",
                4,
                model="claude-x",
                detach=True,
                request_id="r-1",
                max_parallel=2,
                answer_max_tokens=900,
            )
        )
    )
    metadata, request, rpc = server.take(RUN)
    rpc.send_response(ENDED_AT_ONCE)
    rpc.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)

    assert [e.sequence for e in pending.result()] == [1]
    assert request == orchestrator_pb2.RunSwarmRequest(
        idea="an idea",
        num_agents=4,
        model="claude-x",
        detach=True,
        request_id="r-1",
        max_parallel=2,
        answer_max_tokens=900,
        max_events_per_message=EVENTS_PER_MESSAGE,
    )
    assert own_metadata(metadata) == []


# --------------------------------------------------------------------------------------- the CLI


def swarm(server: FakeOrchestrator, *argv: str) -> int:
    """`swarm ARGV` as main() runs it, up to the exit status, on the fake channel."""
    args = cli.build_parser().parse_args(["--target", "fake:50051", *argv])
    return cli.dispatch(args.handler, args, channel=server.channel)


@pytest.fixture
def swarm_cli(server: FakeOrchestrator) -> Callable[..., Pending[int]]:
    """Runs the CLI on a thread of its own while the test answers its calls."""
    return lambda *argv: Pending(lambda: swarm(server, *argv))


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def expected_exit(code: grpc.StatusCode) -> int:
    return {grpc.StatusCode.INVALID_ARGUMENT: 2, grpc.StatusCode.UNAVAILABLE: 3}.get(code, 1)


@pytest.mark.parametrize("code", FAILURES, ids=lambda code: code.name)
def test_cli_every_status_code_is_one_line_and_its_exit_status(
    server: FakeOrchestrator,
    swarm_cli: Callable[..., Pending[int]],
    capsys: pytest.CaptureFixture[str],
    code: grpc.StatusCode,
) -> None:
    pending = swarm_cli("get", "s-1")
    _, _, rpc = server.take(GET)
    rpc.terminate(orchestrator_pb2.GetSwarmResponse(), NO_METADATA, code, "it went wrong")

    assert pending.result() == expected_exit(code)
    line = one_line(capsys.readouterr().err)
    assert line.startswith("swarm: ") and "it went wrong" in line
    if expected_exit(code) == 1:
        assert code.name in line


def test_cli_bad_request_lists_every_violation_and_exits_2(
    server: FakeOrchestrator, swarm_cli: Callable[..., Pending[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    pending = swarm_cli("run", " ", "-n", "300")
    _, _, rpc = server.take(RUN)
    status = bad_request([("idea", "must not be empty"), ("num_agents", "must be between 1 and 256")])
    rpc.terminate(status.trailing_metadata, status.code, status.details)

    assert pending.result() == 2
    assert one_line(capsys.readouterr().err) == (
        "swarm: invalid request: idea: must not be empty; num_agents: must be between 1 and 256"
    )


def test_cli_a_cut_stream_keeps_what_was_shown_and_exits_3(
    server: FakeOrchestrator, swarm_cli: Callable[..., Pending[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    pending = swarm_cli("--resume-within", "0", "run", "an idea", "-n", "1", "--json")
    _, _, rpc = server.take(RUN)
    server.deliver(rpc, *FIRST_EVENTS)
    rpc.terminate(NO_METADATA, grpc.StatusCode.UNAVAILABLE, "Socket closed")

    assert pending.result() == 3
    shown = capsys.readouterr()
    assert [line.count('"sequence"') for line in shown.out.splitlines()] == [1, 1, 1]
    assert one_line(shown.err) == (
        "swarm: the stream of swarm s-1 broke after event 3 and resuming is off (--resume-within 0); "
        "`swarm watch s-1 --after 3` goes on from there"
    )


def test_cli_a_stream_that_ends_without_an_outcome_is_a_failure(
    server: FakeOrchestrator, swarm_cli: Callable[..., Pending[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    pending = swarm_cli("--resume-within", "0", "watch", "s-1")
    _, _, rpc = server.take(WATCH)
    server.deliver(rpc, orchestrator_pb2.WatchSwarmResponse(event=FIRST_EVENTS[0].event))
    rpc.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)
    running = orchestrator_pb2.Swarm(
        swarm_id="s-1", state=orchestrator_pb2.SWARM_STATE_RUNNING, last_sequence=9
    )
    answer_unary(server, GET, orchestrator_pb2.GetSwarmResponse(swarm=running))

    assert pending.result() == 3, "no swarm_completed, no success: the stream broke off"
    assert "`swarm watch s-1 --after 1` goes on from there" in one_line(capsys.readouterr().err)


def test_cli_run_follows_the_swarm_to_its_result(
    server: FakeOrchestrator, swarm_cli: Callable[..., Pending[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    pending = swarm_cli(
        "run", "an idea", "-n", "1", "--model", "claude-x", "--request-id", "r-1", "--max-parallel", "1"
    )
    _, request, rpc = server.take(RUN)
    # The events after the first come together, in one response, as the client asks.
    first, *rest = [response.event for response in [*FIRST_EVENTS, COMPLETED]]
    rpc.send_response(orchestrator_pb2.RunSwarmResponse(event=first, more_events=rest))
    rpc.terminate(NO_METADATA, grpc.StatusCode.OK, OK_DETAILS)

    assert pending.result() == 0
    assert request == orchestrator_pb2.RunSwarmRequest(
        idea="an idea",
        num_agents=1,
        model="claude-x",
        request_id="r-1",
        max_parallel=1,
        max_events_per_message=EVENTS_PER_MESSAGE,
    )
    assert "done" in capsys.readouterr().out


def test_cli_list_sends_its_filters_and_each_call_its_deadline(
    server: FakeOrchestrator, swarm_cli: Callable[..., Pending[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    pending = swarm_cli("list", "--state", "running", "--limit", "5", "--page-token", "p-2")
    swarm = orchestrator_pb2.Swarm(swarm_id="s-9", idea="an idea", state=orchestrator_pb2.SWARM_STATE_RUNNING)
    _, request = answer_unary(
        server, LIST, orchestrator_pb2.ListSwarmsResponse(swarms=[swarm], next_page_token="p-3")
    )

    assert pending.result() == 0
    assert request == orchestrator_pb2.ListSwarmsRequest(
        page_size=5, page_token="p-2", state=orchestrator_pb2.SWARM_STATE_RUNNING
    )
    out = capsys.readouterr().out
    assert "s-9" in out and "swarm list --page-token p-3" in out
    assert server.channel.deadlines == [("ListSwarms", 30.0)]


@pytest.mark.parametrize(
    ("flags", "says"), [((), "the swarm is cancelled with it"), (("--detach",), "--detach")]
)
def test_cli_ctrl_c_mid_stream_cancels_the_call_and_exits_130(
    server: FakeOrchestrator,
    swarm_cli: Callable[..., Pending[int]],
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    says: str,
) -> None:
    server.channel.ctrl_c_after = 1
    pending = swarm_cli("run", "an idea", "-n", "1", "--json", *flags)
    _, request, rpc = server.take(RUN)
    server.deliver(rpc, FIRST_EVENTS[0])

    Pending(rpc.cancelled).result()  # the call is cancelled, whether the swarm detached or not
    assert pending.result() == 130
    assert request.detach == ("--detach" in flags)
    shown = capsys.readouterr()
    assert shown.out.count('"sequence"') == 1 and says in one_line(shown.err)
