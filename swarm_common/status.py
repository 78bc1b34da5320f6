"""How a failed model call crosses gRPC: a status code for the caller, and the error's kind in trailing
metadata so the orchestrator can tell "worker full" from "model API rate limiting" (both are
RESOURCE_EXHAUSTED) and knows when a retry can help."""

from __future__ import annotations

import grpc

from swarm_common.errors import (
    AuthenticationFailed,
    InvalidModelRequest,
    ProviderError,
    RateLimited,
)

ERROR_KIND_KEY = "swarm-error-kind"
RETRY_AFTER_KEY = "swarm-retry-after-s"
WORKER_BUSY = "worker_busy"


def status_for(error: ProviderError) -> grpc.StatusCode:
    if isinstance(error, AuthenticationFailed):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, InvalidModelRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, RateLimited):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE


def trailers_for(error: ProviderError) -> tuple[tuple[str, str], ...]:
    trailers: tuple[tuple[str, str], ...] = ((ERROR_KIND_KEY, error.code),)
    if isinstance(error, RateLimited) and error.retry_after_s is not None:
        trailers += ((RETRY_AFTER_KEY, f"{error.retry_after_s:g}"),)
    return trailers
