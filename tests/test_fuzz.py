"""Property-based fuzzing (hypothesis) of a live orchestrator (with tokens) and a live worker.

Inputs: every field of every RPC's request, drawn from its protobuf descriptor: huge, unicode and
control-character strings, negative and extreme numbers, unknown enum values, another tenant's
swarm ids, garbage page tokens; bytes that are no message; oversized metadata; streams opened and
abandoned by the hundred. Invariants: every answer is a documented status code (never UNKNOWN,
never INTERNAL), its message is short and holds no traceback, another tenant's swarm is never
served, and afterwards both services still run a normal swarm with their memory within bounds.

The profile is fixed (derandomized, no example database), so a run is the same run every time and
stays within seconds.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security import add_token

from stack import Stack, stack
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)
# The codes README documents for these services; INTERNAL would be a bug the guard caught.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,  # the test's own cancel of a stream it has read enough of
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # The model API cannot be reached, or an attempt's deadline had passed (a worker's answer that
    # the orchestrator retries elsewhere); a service that is stopping.
    grpc.StatusCode.UNAVAILABLE,
}
MAX_MESSAGE = 1024
WORKER_DOCUMENTED_CODES = {code.value[0] for code in DOCUMENTED}
MIB = 1024 * 1024


class Target:
    """The services under test. Its repr (which hypothesis prints with a failing example) shows
    no token."""

    def __init__(self, running: Stack, tokens: dict[str, str], theirs: list[str]) -> None:
        self.stack = running
        self.tokens = tokens
        # Swarms of tenant "b": tenant "a" must never be served them.
        self.theirs = theirs
        # Each service's memory before any fuzzing.
        self.rss_before = rss(running.orchestrator.pid), rss(running.workers[0].pid)

    def __repr__(self) -> str:
        return f"Target(orchestrator {self.stack.target}, worker {self.stack.workers[0].address})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    @property
    def orchestrator(self) -> grpc.Channel:
        return grpc.insecure_channel(self.stack.target)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    auth_file = tmp_path_factory.mktemp("fuzz") / "auth.json"
    tokens = {tenant: add_token(auth_file, tenant) for tenant in ("a", "b")}
    with stack(1, sim_latency_ms=5, orchestrator_args=["--auth-file", str(auth_file)]) as running:
        client = orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(running.target))
        theirs = []
        for detach in (False, True):
            request = orchestrator_pb2.RunSwarmRequest(idea="b's swarm", num_agents=2, detach=detach)
            events = client.RunSwarm(
                request, metadata=(("authorization", f"Bearer {tokens['b']}"),), timeout=30
            )
            theirs.append(next(iter(events)).event.swarm_id)
            if detach:
                events.cancel()
            else:
                list(events)
        yield Target(running, tokens, theirs)


def texts(target: Target) -> st.SearchStrategy[str]:
    garbage_token = st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw).decode())
    return st.one_of(
        st.text(max_size=40),
        st.text(st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Co"]), max_size=40),
        st.sampled_from([70_000, 300_000, 3_000_000]).map(lambda n: "é" * n),
        st.sampled_from(target.theirs),
        st.sampled_from(["", " ", "claude-sonnet-5-5", "subtask-1", "../../etc/passwd", "${jndi:x}"]),
        garbage_token,
    )


def value_of(field: FieldDescriptor, target: Target, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return texts(target)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(
            st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 256, 257, 4096, 2**31 - 1])
        )
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 2**63 - 1, 2**63, 2**64 - 1]))
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # proto3 enums are open: unknown values travel
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message_of(field.message_type, target, depth + 1)
    raise AssertionError(f"no strategy for {field.full_name}")


def message_of(descriptor: Descriptor, target: Target, depth: int = 0) -> st.SearchStrategy[Message]:
    """A message of the type, each field set or not, with values of its type from the above."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                keys = value_of(entry.fields_by_name["key"], target, depth)
                items = value_of(entry.fields_by_name["value"], target, depth)
                mapping = getattr(message, field.name)
                for key, item in draw(st.dictionaries(keys, items, max_size=3)).items():
                    if entry.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                        mapping[key].CopyFrom(item)
                    else:
                        mapping[key] = item
                continue
            values = value_of(field, target, depth)
            if field.is_repeated:
                for value in draw(st.lists(values, max_size=3)):
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        getattr(message, field.name).add().CopyFrom(value)
                    else:
                        getattr(message, field.name).append(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(values))
            else:
                setattr(message, field.name, draw(values))
        return message

    return build()


def check(code: grpc.StatusCode, details: str, what: str) -> None:
    assert code in DOCUMENTED, f"{what}: {code.name} {details[:300]!r}"
    assert len(details) <= MAX_MESSAGE, f"{what}: a {len(details)}-character message"
    assert "Traceback" not in details and 'File "' not in details, f"{what}: {details[:300]!r}"


def outcome(call: Any, *, stream: bool, read: int = 3) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Makes the call; a stream is read for `read` messages at most, then cancelled."""
    got: list[Any] = []
    try:
        if not stream:
            return grpc.StatusCode.OK, "", [call()]
        responses = call()
        for response in responses:
            got.append(response)
            if len(got) >= read:
                responses.cancel()
                break
    except grpc.RpcError as error:
        return error.code(), str(error.details() or ""), got
    return grpc.StatusCode.OK, "", got


header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(
        lambda t: f"Bearer {t}".strip()
    ),
    st.sampled_from(["Bearer", "Basic x", "bearer swt_", "Bearer " + "A" * 8000, "swt_x"]),
)

ORCHESTRATOR_RPCS = {
    name: (method.input_type, method.server_streaming)
    for name, method in orchestrator_pb2.DESCRIPTOR.services_by_name[
        "OrchestratorService"
    ].methods_by_name.items()
}
WORKER_RPCS = {
    name: (method.input_type, method.client_streaming or method.server_streaming)
    for name, method in worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].methods_by_name.items()
}


@FUZZ
@given(data=st.data())
def test_every_orchestrator_rpc_answers_any_request_with_a_documented_status(
    target: Target, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(ORCHESTRATOR_RPCS)), label="rpc")
    descriptor, streaming = ORCHESTRATOR_RPCS[name]
    request = data.draw(message_of(descriptor, target), label="request")
    caller = data.draw(st.sampled_from(["a", "b", "none", "unknown"]), label="caller")
    metadata = {
        "a": (("authorization", f"Bearer {target.tokens['a']}"),),
        "b": (("authorization", f"Bearer {target.tokens['b']}"),),
        "none": (),
        # Header values are printable ASCII (grpc sends no other): garbage, long, or a scheme alone.
        "unknown": (("authorization", data.draw(header_values, label="authorization")),),
    }[caller]
    with target.orchestrator as channel:
        method = getattr(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), name)
        code, details, responses = outcome(
            lambda: method(request, metadata=metadata, timeout=10), stream=streaming
        )
    check(code, details, f"{name} by {caller}")
    if caller in ("none", "unknown"):
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), (name, code)
    if caller == "a" and getattr(request, "swarm_id", "") in target.theirs:
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (name, code)
    for response in responses:
        swarms = [response.swarm] if hasattr(response, "swarm") else list(getattr(response, "swarms", []))
        assert all(swarm.swarm_id not in target.theirs for swarm in swarms if caller == "a")


@FUZZ
@given(data=st.data())
def test_every_worker_rpc_answers_any_request_with_a_documented_status(
    target: Target, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(WORKER_RPCS)), label="rpc")
    descriptor, _ = WORKER_RPCS[name]
    with grpc.insecure_channel(target.stack.workers[0].address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        if name == "ExecuteSubtasks":
            requests = data.draw(
                st.lists(message_of(descriptor, target), min_size=1, max_size=3), label="requests"
            )
            code, details, responses = outcome(
                lambda: worker.ExecuteSubtasks(iter(requests), timeout=5), stream=True, read=4
            )
            for response in responses:
                for reply in response.replies:
                    if reply.HasField("error"):
                        assert reply.error.code in WORKER_DOCUMENTED_CODES, reply.error
                        assert len(reply.error.message) <= MAX_MESSAGE
        else:
            request = data.draw(message_of(descriptor, target), label="request")
            method = getattr(worker, name)
            code, details, _ = outcome(lambda: method(request, timeout=5), stream=name == "ExecuteSubtask")
    check(code, details, name)


ALL_METHODS = [
    (f"/swarm.v1.OrchestratorService/{name}", streaming, False)
    for name, (_, streaming) in ORCHESTRATOR_RPCS.items()
] + [
    (f"/swarm.v1.WorkerService/{name}", streaming, name == "ExecuteSubtasks")
    for name, (_, streaming) in WORKER_RPCS.items()
]


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_bytes_that_are_no_message_get_a_documented_status(target: Target, data: st.DataObject) -> None:
    path, streaming, both_ways = data.draw(st.sampled_from(ALL_METHODS), label="method")
    payload = data.draw(st.binary(max_size=256), label="bytes")
    address = target.stack.target if "Orchestrator" in path else target.stack.workers[0].address
    metadata = (("authorization", f"Bearer {target.tokens['a']}"),)
    with grpc.insecure_channel(address) as channel:
        if both_ways:
            call = lambda: channel.stream_stream(path)(iter([payload]), metadata=metadata, timeout=5)  # noqa: E731
        elif streaming:
            call = lambda: channel.unary_stream(path)(payload, metadata=metadata, timeout=5)  # noqa: E731
        else:
            call = lambda: channel.unary_unary(path)(payload, metadata=metadata, timeout=5)  # noqa: E731
        code, details, _ = outcome(call, stream=streaming or both_ways)
    check(code, details, path)


@settings(FUZZ, max_examples=20)
@given(size=st.integers(1, 200_000), count=st.integers(1, 300))
def test_oversized_metadata_is_refused_with_a_documented_status(
    target: Target, size: int, count: int
) -> None:
    metadata = (
        ("authorization", f"Bearer {target.tokens['a']}"),
        *((f"x-fuzz-{i}", "v" * (size // count)) for i in range(count)),
    )
    with target.orchestrator as channel:
        client = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        code, details, _ = outcome(
            lambda: client.ListSwarms(orchestrator_pb2.ListSwarmsRequest(), metadata=metadata, timeout=5),
            stream=False,
        )
    check(code, details, f"{count} headers of {size // count} bytes")
    if size > 16 * 1024:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_streams_opened_and_abandoned_free_what_they_held_and_service_goes_on(target: Target) -> None:
    """Runs after the properties above (this module's order): memory is compared with the start."""
    b = (("authorization", f"Bearer {target.tokens['b']}"),)
    running = target.theirs[1]
    for _ in range(3):
        channel = grpc.insecure_channel(target.stack.target)
        client = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        opened = [
            client.WatchSwarm(orchestrator_pb2.WatchSwarmRequest(swarm_id=running), metadata=b)
            for _ in range(90)
        ]
        opened += [
            client.RunSwarm(orchestrator_pb2.RunSwarmRequest(idea="abandoned", num_agents=2), metadata=b)
            for _ in range(30)
        ]
        worker_channel = grpc.insecure_channel(target.stack.workers[0].address)
        streams = [
            worker_pb2_grpc.WorkerServiceStub(worker_channel).ExecuteSubtasks(iter(())) for _ in range(50)
        ]
        time.sleep(0.3)
        channel.close()  # every call abandoned at once, unread
        worker_channel.close()
        del opened, streams
    # The watcher places the abandoned streams held are free again: a full set can watch.
    with target.orchestrator as channel:
        client = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        deadline = time.monotonic() + 20
        while True:
            watching = [
                client.WatchSwarm(
                    orchestrator_pb2.WatchSwarmRequest(swarm_id=running), metadata=b, timeout=10
                )
                for _ in range(100)
            ]
            first = [outcome(lambda w=w: w, stream=True, read=1)[0] for w in watching[-1:]]
            for w in watching:
                w.cancel()
            if first == [grpc.StatusCode.OK] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert first == [grpc.StatusCode.OK], first
        # A normal swarm, start to end.
        events = [
            r.event
            for r in client.RunSwarm(
                orchestrator_pb2.RunSwarmRequest(idea="after the fuzzing", num_agents=3),
                metadata=(("authorization", f"Bearer {target.tokens['a']}"),),
                timeout=60,
            )
        ]
        assert events[-1].WhichOneof("kind") == "swarm_completed", events[-1]
    with grpc.insecure_channel(target.stack.workers[0].address) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).GetWorkerInfo(
            worker_pb2.GetWorkerInfoRequest(), timeout=10
        )
        assert info.max_concurrency == 16
    after = rss(target.stack.orchestrator.pid), rss(target.stack.workers[0].pid)
    grown = [(now - then) / MIB for now, then in zip(after, target.rss_before, strict=True)]
    assert all(growth < 100 for growth in grown), f"grew {grown} MiB"
    print(
        json.dumps(
            {"orchestrator_rss_mib": after[0] / MIB, "worker_rss_mib": after[1] / MIB, "grown_mib": grown}
        )
    )
