"""What the services tell an operator, and where it goes.

- **Metrics.** Instruments are `prometheus_client` metrics in its default registry, each defined in
  the module that does what it measures. This module serves that registry over HTTP at
  `--metrics-listen` (`/metrics`), and holds what the instruments share: histogram buckets, and
  `Census`, for gauges that are read when Prometheus scrapes rather than kept up to date on every
  change (the hot path then pays a plain integer, not a metric's lock). Labels are bounded sets
  (states, kinds, reasons, priced models): never a swarm's or a subtask's id.
- **Traces.** OpenTelemetry, on when the standard environment asks for it
  (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
  `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep it off).
  Spans go over OTLP/gRPC in batches; the SDK reads the rest of its `OTEL_*` settings itself
  (sampler, batch sizes, headers, resource). Off, every helper here returns at once: no span
  object, no context, no SDK loaded.
- **Trace context across hops** is W3C `traceparent` (and `tracestate`): in RunSwarm's call
  metadata from a client, and in each subtask's start to a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import prometheus_client
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from swarm_common.config import split_host_port

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "DURATION_BUCKETS",
    "LATENCY_BUCKETS",
    "TRACE_HEADERS",
    "WAIT_BUCKETS",
    "Census",
    "MetricsServer",
    "MetricsUnavailable",
    "Span",
    "SpanKind",
    "Tracing",
    "carrier",
    "current",
    "end_span",
    "exported",
    "parent_from",
    "remote_parent",
    "serve_metrics",
    "span",
    "span_ids",
    "start_span",
    "start_tracing",
    "trace_id_in",
    "traced",
    "tracing_wanted",
]

log = logging.getLogger("swarm.telemetry")

# Steps inside the process (a store commit, an event's way to a client): a millisecond to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Waits for capacity (a worker slot, the model API's budget): none to many minutes.
WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# Model calls, subtasks and swarms: a tenth of a second to half an hour.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# The W3C trace context headers a caller may send with a call (gRPC metadata).
TRACE_HEADERS = ("traceparent", "tracestate")

T = TypeVar("T")

# A `_created` series per counter and histogram doubles what is scraped and says little here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------- metrics


class Census(Generic[T]):
    """The live objects of one kind, for gauges computed at scrape time: `total` runs on the
    metrics server's thread, so `figure` may only read plain attributes (ints, the lengths of
    containers), which the GIL keeps whole. An object leaves the census when it is collected."""

    def __init__(self) -> None:
        self._members: dict[int, weakref.ref[T]] = {}

    def add(self, member: T) -> None:
        key = id(member)
        self._members[key] = weakref.ref(member, lambda _: self._members.pop(key, None))

    def total(self, figure: Callable[[T], float]) -> float:
        # list() copies the values in one step, safe against the event loop's thread adding one.
        members = [ref() for ref in list(self._members.values())]
        return float(sum(figure(member) for member in members if member is not None))


class MetricsUnavailable(OSError):
    """The metrics address cannot be served."""


@dataclass
class MetricsServer:
    """`/metrics` over HTTP on a thread of its own, so a scrape never waits on the event loop."""

    address: str
    _close: Callable[[], None]

    def close(self) -> None:
        self._close()


def serve_metrics(listen: str) -> MetricsServer:
    """Serves the default registry at http://LISTEN/metrics; port 0 picks a free port."""
    host, port = split_host_port(listen, "metrics address")
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host or "0.0.0.0")
    except OSError as error:
        raise MetricsUnavailable(f"cannot serve metrics on {listen}: {error.strerror or error}") from None
    bound = f"[{host}]:{server.server_port}" if ":" in host else f"{host or '0.0.0.0'}:{server.server_port}"
    log.info(f"metrics served on http://{bound}/metrics", extra={"address": bound})

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return MetricsServer(bound, close)


@contextlib.contextmanager
def exported(service: str, metrics_listen: str) -> Iterator[None]:
    """A service's telemetry for as long as it runs: traces when the environment asks for them,
    metrics when `metrics_listen` is set. The spans still batched are sent on the way out."""
    tracing = start_tracing(service)
    try:
        metrics = serve_metrics(metrics_listen) if metrics_listen else None
        try:
            yield
        finally:
            if metrics is not None:
                metrics.close()
    finally:
        tracing.shutdown()


# ---------------------------------------------------------------- traces

_tracer: Tracer | None = None
# The trace context crosses each hop as W3C `traceparent` and `tracestate`, whatever else
# OTEL_PROPAGATORS names: the hops are this project's own, and that is their contract.
_W3C = TraceContextTextMapPropagator()
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
_OTLP = "otlp"


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* environment asks for traces. A setting this process cannot honour
    raises ValueError, so the service stops with one line rather than trace nothing in silence."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter not in ("", _OTLP):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: this service exports traces over otlp only")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip().lower()
        if protocol:
            if protocol != "grpc":
                raise ValueError(
                    f"{name}={protocol!r}: this service exports traces over OTLP/gRPC (grpc) only"
                )
            break
    endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    return exporter == _OTLP or any(environ.get(name, "").strip() for name in endpoints)


@dataclass
class Tracing:
    """Tracing as started for this process: `shutdown` sends the spans still batched."""

    provider: TracerProvider | None

    def shutdown(self) -> None:
        global _tracer
        _tracer = None
        if self.provider is not None:
            self.provider.shutdown()


def start_tracing(service: str, environ: Mapping[str, str] | None = None) -> Tracing:
    """Turns tracing on when the environment asks for it; `service` names the process unless
    OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) does."""
    global _tracer
    environ = os.environ if environ is None else environ
    if not tracing_wanted(environ):
        return Tracing(None)
    # The SDK and the exporter load only here: a service that does not trace never imports them.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("swarm")
    log.info(
        f"tracing on: spans go over OTLP/gRPC as {resource.attributes.get(SERVICE_NAME)}",
        extra={
            "address": environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        },
    )
    return Tracing(provider)


Attributes = Mapping[str, AttributeValue]


class _Scope:
    """A span made current for a `with` block, and ended on leaving it when `end`; an exception
    ends it as an error named by the exception's class. A plain class, not a generator: it is on
    every subtask's path."""

    __slots__ = ("_end", "_span", "_token")

    def __init__(self, target: Span, *, end: bool) -> None:
        self._span = target
        self._end = end
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        context_api.detach(self._token)  # type: ignore[arg-type]
        if self._end:
            if kind is not None:
                name = (
                    "cancelled" if issubclass(kind, asyncio.CancelledError | GeneratorExit) else kind.__name__
                )
                self._span.set_attribute("error.type", name)
                self._span.set_status(Status(StatusCode.ERROR, name))
            self._span.end()


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    parent: Context | None = None,
) -> AbstractContextManager[Span | None]:
    """A span that is the current one inside the `with` (its children's parent), ended on leaving
    it. Only in coroutines: an async generator may be left at a `yield` and closed later in another
    context, where the current span could not be reset."""
    if _tracer is None:
        return _NO_SPAN
    return _Scope(_tracer.start_span(name, context=parent, kind=kind, attributes=attributes), end=True)


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    parent: Context | None = None,
) -> Span | None:
    """A span that is not made current (for async generators, and spans that outlive a block): its
    parent is `parent`, else the current span. End it with `end_span`."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def end_span(target: Span | None, *, error: str = "", attributes: Attributes | None = None) -> None:
    if target is None:
        return
    if attributes:
        target.set_attributes(attributes)
    if error:
        target.set_attribute("error.type", error)
        target.set_status(Status(StatusCode.ERROR, error))
    target.end()


def current(target: Span | None) -> AbstractContextManager[object]:
    """Makes `target` the current span inside the `with` (it is not ended on leaving)."""
    if target is None:
        return _NO_SPAN
    return _Scope(target, end=False)


def traced(
    work: Awaitable[T], name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes | None = None
) -> Awaitable[T]:
    """`work`, to be awaited inside a span of its own, which is current while it runs; `work` itself
    when tracing is off."""
    if _tracer is None:
        return work
    return _awaited(work, _Scope(_tracer.start_span(name, kind=kind, attributes=attributes), end=True))


async def _awaited(work: Awaitable[T], scope: _Scope) -> T:
    with scope:
        return await work


def carrier() -> dict[str, str]:
    """The current span's W3C trace context, as headers for the next hop ({} when tracing is off)."""
    if _tracer is None:
        return {}
    headers: dict[str, str] = {}
    _W3C.inject(headers)
    return headers


def parent_from(headers: Mapping[str, str]) -> Context | None:
    """The caller's span as a parent, from the W3C headers it sent (None: no trace to continue)."""
    if _tracer is None or not headers:
        return None
    parent = _W3C.extract(headers)
    return parent if trace.get_current_span(parent).get_span_context().is_valid else None


def remote_parent(trace_id: str, span_id: str) -> Context | None:
    """A span recorded earlier (by hex ids) as a parent: a resumed swarm goes on in its trace."""
    if _tracer is None or not trace_id or not span_id:
        return None
    try:
        context = trace.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(context)) if context.is_valid else None


def span_ids(target: Span | None) -> tuple[str, str]:
    """The span's trace id and span id in hex, or empty strings when there is no span."""
    if target is None:
        return "", ""
    context = target.get_span_context()
    if not context.is_valid:
        return "", ""
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def trace_id_in(headers: Mapping[str, str]) -> str:
    """The trace id a W3C `traceparent` names (`00-TRACE-SPAN-FLAGS`), for log lines, whether or not
    this process traces; "" for none."""
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""
