"""An OTLP/gRPC trace collector for tests and benchmarks, built on opentelemetry-proto's
TraceService: the services export to it exactly as to an OpenTelemetry Collector, and the caller
reads what arrived."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int

    @classmethod
    def of(cls, service: str, span: trace_pb2.Span) -> ReceivedSpan:
        return cls(
            service=service,
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            kind=span.kind,
            attributes={item.key: _value(item.value) for item in span.attributes},
            status_code=span.status.code,
        )


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent (`spans`), or with `keep=False` only counts them (`count`): a
    benchmark's collector must cost its machine as little as it can."""

    def __init__(self, *, keep: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.count = 0
        self._keep = keep
        self._changed = threading.Condition()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        count = 0
        for resource_spans in request.resource_spans:
            attributes = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            service = str(attributes.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if self._keep:
                    received += [ReceivedSpan.of(service, span) for span in scope_spans.spans]
        with self._changed:
            self.spans += received
            self.count += count
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def otlp_collector(*, keep: bool = True) -> Iterator[tuple[Collector, str]]:
    """A collector on 127.0.0.1, and the OTEL_EXPORTER_OTLP_ENDPOINT that reaches it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collector = Collector(keep=keep)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        server.stop(0)
