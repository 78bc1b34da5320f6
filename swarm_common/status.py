"""How a failed subtask crosses gRPC: a status code, and the error's kind, so the orchestrator can
tell "worker full" from "model API rate limiting" (both RESOURCE_EXHAUSTED) and knows when a retry
can help. ExecuteSubtask carries the kind in trailing metadata, ExecuteSubtasks in a SubtaskError
message; both are made from one CallFailure."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from swarm.v1 import worker_pb2
from swarm_common.errors import (
    AuthenticationFailed,
    InvalidModelRequest,
    ProviderError,
    RateLimited,
)

ERROR_KIND_KEY = "swarm-error-kind"
RETRY_AFTER_KEY = "swarm-retry-after-s"
WORKER_BUSY = "worker_busy"

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class CallFailure:
    code: grpc.StatusCode
    message: str
    # ProviderError.code, or WORKER_BUSY; empty when the worker itself did not answer.
    kind: str = ""
    retry_after_s: float | None = None

    @classmethod
    def of_provider_error(cls, error: ProviderError) -> CallFailure:
        if isinstance(error, AuthenticationFailed):
            code = grpc.StatusCode.UNAUTHENTICATED
        elif isinstance(error, InvalidModelRequest):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(error, RateLimited):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            code = grpc.StatusCode.UNAVAILABLE
        retry_after = error.retry_after_s if isinstance(error, RateLimited) else None
        return cls(code, error.message, error.code, retry_after)

    @classmethod
    def of_proto(cls, error: worker_pb2.SubtaskError) -> CallFailure:
        return cls(
            _CODES.get(error.code, grpc.StatusCode.UNKNOWN),
            error.message,
            error.kind,
            error.retry_after_s or None,
        )

    def trailers(self) -> tuple[tuple[str, str], ...]:
        trailers: tuple[tuple[str, str], ...] = ((ERROR_KIND_KEY, self.kind),) if self.kind else ()
        if self.retry_after_s is not None:
            trailers += ((RETRY_AFTER_KEY, f"{self.retry_after_s:g}"),)
        return trailers

    def to_proto(self) -> worker_pb2.SubtaskError:
        return worker_pb2.SubtaskError(
            code=self.code.value[0],
            message=self.message,
            kind=self.kind,
            retry_after_s=self.retry_after_s or 0.0,
        )
