"""Traces as an operator sees them: a real orchestrator and real workers export their spans over
OTLP/gRPC to a collector in the test (opentelemetry-proto's TraceService), while their model calls
go through the anthropic SDK to the fake Messages API, which counts the tokens. One swarm is one
trace, from the client's own span through the orchestrator and every worker to each model call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from fakes.messages_api import FakeMessagesAPI, Fault, Reply
from fakes.otlp_collector import ReceivedSpan, otlp_collector
from stack import BIN, Stack, stack, start
from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc
from swarm_checks import assert_completed, kinds
from swarm_client import SwarmClient
from swarm_common.providers import DEFAULT_MODEL

KEY = "sk-ant-test-0123456789"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SERVER = 2  # OTLP SpanKind
CLIENT = 3
ERROR = 2  # OTLP status code


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(api_key=KEY, chunks=3) as api:
        yield api


def traced_env(fake: FakeMessagesAPI, endpoint: str) -> dict[str, str]:
    return {
        "ANTHROPIC_API_KEY": KEY,
        "ANTHROPIC_BASE_URL": fake.base_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def run_swarm(
    target: str, agents: int, metadata: tuple[tuple[str, str], ...] = ()
) -> list[events_pb2.SwarmEvent]:
    with grpc.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.RunSwarmRequest(idea="Plan a tool library", num_agents=agents)
        return [response.event for response in stub.RunSwarm(request, metadata=metadata, timeout=60)]


def get_swarm(target: str, swarm_id: str) -> orchestrator_pb2.Swarm:
    with SwarmClient(target) as client:
        return client.get(swarm_id)


def only(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, key) == value for key, value in match.items())]
    assert len(found) == 1, f"expected one span with {match}, found {len(found)}: {found}"
    return found[0]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan, name: str | None = None) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id and (name is None or s.name == name)]


def json_lines(output: str) -> list[dict[str, Any]]:
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_one_trace_follows_a_swarm_from_the_client_through_every_worker_to_each_model_call(
    fake: FakeMessagesAPI,
) -> None:
    """One subtask whose first attempt the model API rate-limits (429 through the SDK's retries)
    and whose second runs on the other worker: both attempts, both workers' executions and every
    model call are in the client's trace, each span under its parent, with the real token counts."""
    plan = Reply('{"subtasks": [{"title": "Inventory", "instructions": "List the tools."}]}')
    fake.script(plan, *[Fault.rate_limited(retry_after_ms=20)] * 3)
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    args = ["--provider", "anthropic"]
    with otlp_collector() as (collector, endpoint):
        with stack(
            workers=2, worker_args=args, orchestrator_args=args, env=traced_env(fake, endpoint)
        ) as running:
            events = run_swarm(running.target, 1, (("traceparent", traceparent),))
            swarm = get_swarm(running.target, events[0].swarm_id)
            outputs = {p.name: p.output() for p in [running.orchestrator, *running.workers]}
        # The services have stopped: what they had batched was sent on the way out.
        spans = [s for s in collector.spans if s.trace_id == CLIENT_TRACE]

    assert_completed(events, 1)
    assert kinds(events).count("subtask_failed") == 1
    accepted = events[0].accepted
    assert accepted.trace_id == swarm.trace_id == CLIENT_TRACE, "the swarm joins the client's trace"
    assert {s.service for s in spans} == {"swarm-orchestrator", "swarm-worker"}

    root = only(spans, name="swarm")
    assert (root.parent_span_id, root.span_id, root.kind) == (CLIENT_SPAN, accepted.span_id, SERVER)
    assert root.attributes["swarm.id"] == swarm.swarm_id
    plan_span = only(children(spans, root), name="plan")
    synthesis = only(children(spans, root), name="synthesis")
    attempts = sorted(children(spans, root, "subtask attempt"), key=lambda s: s.attributes["swarm.attempt"])
    assert [a.attributes["swarm.attempt"] for a in attempts] == [1, 2]
    assert [a.status_code == ERROR for a in attempts] == [True, False]
    assert all(a.kind == CLIENT and a.attributes["swarm.subtask.id"] == "subtask-1" for a in attempts)

    # Each attempt's execution on its worker continues the attempt's span, on two workers.
    executions = [only(children(spans, a), name="execute subtask") for a in attempts]
    assert all(e.service == "swarm-worker" and e.kind == SERVER for e in executions)
    workers = {e.subtask_started.worker_id for e in events if e.HasField("subtask_started")}
    assert len(workers) == 2

    model = f"chat {DEFAULT_MODEL}"
    (refused,) = children(spans, executions[0])
    assert (refused.name, refused.status_code, refused.attributes["error.type"]) == (
        model,
        ERROR,
        "rate_limited",
    )
    completed = next(e.subtask_completed for e in events if e.HasField("subtask_completed"))
    (answered,) = children(spans, executions[1])
    (planned,) = children(spans, plan_span)
    (synthesized,) = children(spans, synthesis)
    total = events[-1].swarm_completed.usage
    calls = [
        (planned, events[1].plan_created.usage),
        (answered, completed.usage),
        (
            synthesized,
            events_pb2.Usage(
                input_tokens=total.input_tokens
                - completed.usage.input_tokens
                - events[1].plan_created.usage.input_tokens,
                output_tokens=total.output_tokens
                - completed.usage.output_tokens
                - events[1].plan_created.usage.output_tokens,
            ),
        ),
    ]
    for span, usage in calls:
        assert span.name == model and span.kind == CLIENT
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.provider.name"] == "anthropic"
        assert span.attributes["gen_ai.request.model"] == DEFAULT_MODEL
        assert span.attributes["gen_ai.usage.input_tokens"] == usage.input_tokens > 0
        assert span.attributes["gen_ai.usage.output_tokens"] == usage.output_tokens > 0
        assert span.attributes["gen_ai.usage.cache_read.input_tokens"] == 0
        assert span.attributes["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert {s.service for s in (planned, synthesized)} == {"swarm-orchestrator"}
    assert answered.service == "swarm-worker"

    # Log lines of the swarm's work carry its ids: the orchestrator's pause for the 429, and the
    # worker's line for the failed model call.
    paused = [
        line
        for line in json_lines(outputs["orchestrator"])
        if line["msg"].startswith("model API calls paused")
    ]
    failed = [
        line
        for name in ("worker-0", "worker-1")
        for line in json_lines(outputs[name])
        if line["msg"].startswith("the model call failed")
    ]
    for line in [*paused, *failed]:
        assert (line["swarm_id"], line["subtask_id"], line["attempt"]) == (swarm.swarm_id, "subtask-1", 1), (
            line
        )
        assert line["trace_id"] == CLIENT_TRACE
    assert paused and failed
    assert not [line for out in outputs.values() for line in json_lines(out) if line["level"] == "error"]


def test_a_swarm_resumed_after_a_crash_goes_on_in_its_trace() -> None:
    """The orchestrator is SIGKILLed mid-swarm: its spans of that run are lost with it, but the
    restarted one carries on under the swarm's recorded span, in the same trace."""
    with otlp_collector() as (collector, endpoint):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with stack(workers=2, env=env, sim_latency_ms=800) as running:
            with SwarmClient(running.target) as client:
                for event in client.run("Plan a tool library", agents=2, detach=True):
                    if event.HasField("subtask_started"):
                        break
            running.restart_orchestrator(kill=True)
            with SwarmClient(running.target) as client:
                events = list(client.watch(event.swarm_id))
            shown = subprocess.run(
                [str(BIN / "swarm"), "--target", running.target, "get", event.swarm_id],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        accepted = events[0].accepted
        spans = [s for s in collector.spans if s.trace_id == accepted.trace_id]
    assert kinds(events)[-1] == "swarm_completed"
    assert len(accepted.trace_id) == 32 and len(accepted.span_id) == 16
    assert f"trace: {accepted.trace_id}" in shown, "swarm get shows where to find the swarm's trace"
    resumed = only(spans, name="swarm resumed")
    assert resumed.parent_span_id == accepted.span_id, "under the swarm's first span"
    attempts = children(spans, resumed, "subtask attempt")
    assert len(attempts) == 2, "both subtasks ran again after the restart"
    assert all(len(children(spans, a, "execute subtask")) == 1 for a in attempts)
    assert only(children(spans, resumed), name="synthesis")


def test_a_direct_caller_s_traceparent_in_call_metadata_is_continued_by_the_worker() -> None:
    """ExecuteSubtask (one subtask, one call) takes the W3C headers as call metadata; a call the
    caller cancels mid-answer still ends its spans cleanly."""
    traceparent = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
    request = worker_pb2.ExecuteSubtaskRequest(
        swarm_id="direct", subtask=events_pb2.Subtask(id="s-1", title="T", instructions="I"), attempt=1
    )
    with otlp_collector() as (collector, endpoint):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        worker = start("worker", "swarm-worker", ["--provider", "simulated", "--sim-latency-ms", "400"], env)
        try:
            with grpc.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                responses = list(stub.ExecuteSubtask(request, metadata=traceparent, timeout=30))
                cancelled = stub.ExecuteSubtask(request, metadata=traceparent, timeout=30)
                next(cancelled)
                cancelled.cancel()
        finally:
            worker.stop()
        spans = [s for s in collector.spans if s.trace_id == CLIENT_TRACE]
    assert responses[-1].HasField("result")
    executions = [s for s in spans if s.name == "execute subtask"]
    assert len(executions) == 2 and all(e.parent_span_id == CLIENT_SPAN for e in executions)
    calls = [only(children(spans, e)) for e in executions]
    assert sorted(c.status_code for c in calls) == [0, ERROR], "the finished call and the cancelled one"
    assert not [line for line in json_lines(worker.output()) if line["level"] == "error"]


def test_without_otel_settings_nothing_is_traced_and_the_sdk_is_never_loaded() -> None:
    probe = (
        "import sys; import orchestrator_service.main, worker_service.main; "
        "from swarm_common import telemetry; "
        "tracing = telemetry.start_tracing('probe'); "
        "assert tracing.provider is None; "
        "assert telemetry.start_span('x') is None and telemetry.carrier() == {}; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_swarm_without_tracing_has_no_trace_id(swarm_stack: Stack) -> None:
    events = run_swarm(swarm_stack.target, 2, (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),))
    assert_completed(events, 2)
    assert events[0].accepted.trace_id == ""
    assert get_swarm(swarm_stack.target, events[0].swarm_id).trace_id == ""


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "swarm-worker: OTEL_EXPORTER_OTLP_PROTOCOL='http/protobuf': this service exports traces over OTLP/gRPC (grpc) only",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "swarm-worker: OTEL_TRACES_EXPORTER='zipkin': this service exports traces over otlp only",
        ),
    ],
)
def test_otel_settings_it_cannot_honour_stop_the_start_with_one_line(env: dict[str, str], line: str) -> None:
    done = subprocess.run(
        [str(BIN / "swarm-worker"), "--listen", "127.0.0.1:0", "--provider", "simulated"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]
