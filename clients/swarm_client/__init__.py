"""A typed Python client for the Parallel Agent Scheduler's orchestrator.

async with AsyncSwarmClient("localhost:50051") as client:
    async for event in client.run("Plan a city bike-share", agents=5):
        print(event.sequence, event.WhichOneof("kind"))

A stream that breaks (an orchestrator restart, a dropped connection) is resumed where it stopped.
"""

import os

# grpc's C core writes lines of its own to standard error (a failed TLS handshake, at INFO). A
# client tells what failed itself, in one line (its errors), so grpc's are errors only unless
# GRPC_VERBOSITY says otherwise: set before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from swarm_client._client import (
    DEFAULT_TARGET,
    AsyncSwarmClient,
    Budget,
    Estimate,
    Spending,
    Swarm,
    SwarmClient,
    SwarmEvent,
    SwarmState,
    default_target,
)
from swarm_client._errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ResumeFailed,
    SwarmError,
    TlsFailed,
    Unauthenticated,
    Unavailable,
)
from swarm_client._resume import DEFAULT_RESUME_WITHIN_S, TERMINAL_KINDS, Reconnecting
from swarm_client._tls import ClientTls, TlsOptionError

__all__ = [
    "DEFAULT_RESUME_WITHIN_S",
    "DEFAULT_TARGET",
    "TERMINAL_KINDS",
    "AsyncSwarmClient",
    "Budget",
    "ClientTls",
    "DeadlineExceeded",
    "Estimate",
    "InvalidArgument",
    "NotFound",
    "Reconnecting",
    "ResourceExhausted",
    "ResumeFailed",
    "Spending",
    "Swarm",
    "SwarmClient",
    "SwarmError",
    "SwarmEvent",
    "SwarmState",
    "TlsFailed",
    "TlsOptionError",
    "Unauthenticated",
    "Unavailable",
    "default_target",
]
