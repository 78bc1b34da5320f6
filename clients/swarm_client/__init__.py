"""A typed Python client for the Parallel Agent Scheduler's orchestrator.

async with AsyncSwarmClient("localhost:50051") as client:
    async for event in client.run("Plan a city bike-share", agents=5):
        print(event.sequence, event.WhichOneof("kind"))
"""

from swarm_client._client import (
    DEFAULT_TARGET,
    TERMINAL_KINDS,
    AsyncSwarmClient,
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
    SwarmError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_TARGET",
    "TERMINAL_KINDS",
    "AsyncSwarmClient",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Swarm",
    "SwarmClient",
    "SwarmError",
    "SwarmEvent",
    "SwarmState",
    "Unauthenticated",
    "Unavailable",
    "default_target",
]
