"""Errors as classes, one per status a caller handles differently, all rooted in SwarmError."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from swarm_client._tls import ClientTls, explain_tls_failure


class SwarmError(Exception):
    """Any failed call to the orchestrator. `code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(SwarmError):
    """Bad input; `violations` lists (field, description) for every field at fault."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.violations = violations


class NotFound(SwarmError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(SwarmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(SwarmError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(SwarmError):
    """The orchestrator cannot be reached (or is shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class TlsFailed(Unavailable):
    """The connection's TLS failed: the message says why, in one line."""


class ResumeFailed(Unavailable):
    """A swarm's stream broke and could not be resumed in time (or resuming is off). The swarm may
    well go on: WatchSwarm(swarm_id, after_sequence=last_sequence) picks it up where it stopped."""

    def __init__(self, message: str, *, swarm_id: str, last_sequence: int, cause: str) -> None:
        super().__init__(message)
        self.swarm_id = swarm_id
        self.last_sequence = last_sequence
        self.cause = cause  # why the stream broke, or why the last attempt failed


class DeadlineExceeded(SwarmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[SwarmError]] = {
    cls.code: cls for cls in (NotFound, ResourceExhausted, Unauthenticated, Unavailable, DeadlineExceeded)
}


def from_rpc_error(
    error: grpc.RpcError, *, tls: ClientTls | None = None, knows_tls: bool = False
) -> SwarmError:
    """Turns a grpc error (sync or aio) into the matching SwarmError subclass. `knows_tls`: the
    caller made the channel with `tls` (None: plaintext), so a failed handshake can be told."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    if knows_tls and code == grpc.StatusCode.UNAVAILABLE:
        meaning = explain_tls_failure(details, tls)
        if meaning is not None:
            return TlsFailed(meaning)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations: list[tuple[str, str]] = []
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [(v.field, v.description) for v in bad_request.field_violations]
        return InvalidArgument(details, violations)
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(details)
    return SwarmError(details, code=code)
