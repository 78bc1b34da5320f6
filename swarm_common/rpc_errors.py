"""The statuses a caller gets when a request is not served, made one way for both services: bad
input is INVALID_ARGUMENT with a google.rpc.BadRequest, a server limit is RESOURCE_EXHAUSTED with a
google.rpc.QuotaFailure, and an error the server did not expect is INTERNAL with a short message and
an error id that the server's log line carries too, so that nothing internal reaches the caller."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


def bad_request(message: str, violations: Sequence[tuple[str, str]]) -> grpc.Status:
    """INVALID_ARGUMENT listing every (field, description) at fault."""
    details = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
            for field, text in violations
        ]
    )
    return _status(code_pb2.INVALID_ARGUMENT, message, details)


def over_limit(subject: str, message: str) -> grpc.Status:
    """RESOURCE_EXHAUSTED for a server-wide limit: `subject` names the limit (its flag)."""
    details = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
    )
    return _status(code_pb2.RESOURCE_EXHAUSTED, message, details)


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def internal_message(error_id: str) -> str:
    """What a caller is told of an error the server did not expect: its id, for the server's log."""
    return f"internal error (error id {error_id}): the server's log has the details"


def _status(
    code: int, message: str, details: error_details_pb2.BadRequest | error_details_pb2.QuotaFailure
) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted
