"""`swarm-worker`'s settings: one field per flag and environment twin (see swarm_common.settings)."""

from __future__ import annotations

from typing import ClassVar

from swarm_common.settings import LISTEN, HostPort, PositiveInt, ServiceSettings, setting


class WorkerSettings(ServiceSettings):
    """the worker"""

    prog: ClassVar[str] = "swarm-worker"
    description: ClassVar[str] = "Executes subtasks of swarms with the model."

    listen: HostPort = setting("0.0.0.0:50052", LISTEN)
    worker_id: str = setting("", "shown in events as worker_id; none = host name + port")
    max_concurrency: PositiveInt = setting(
        16, "subtasks one worker runs at once; the orchestrator learns it from the worker"
    )
