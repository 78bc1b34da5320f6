"""`swarm-worker`'s settings: one field per flag and environment twin (see swarm_common.settings)."""

from __future__ import annotations

from typing import ClassVar

from swarm_common.pricing import PRICES
from swarm_common.settings import LISTEN, HostPort, NonNegativeInt, PositiveInt, ServiceSettings, setting


class WorkerSettings(ServiceSettings):
    """the worker"""

    prog: ClassVar[str] = "swarm-worker"
    description: ClassVar[str] = "Executes subtasks of swarms with the model."

    listen: HostPort = setting("0.0.0.0:50052", LISTEN)
    worker_id: str = setting("", "shown in events as worker_id; none = host name + port")
    max_concurrency: PositiveInt = setting(
        16,
        "subtasks one worker runs at once for orchestrators (`ExecuteSubtasks`); the orchestrator learns "
        "it from the worker",
    )
    direct_slots: NonNegativeInt = setting(
        2,
        "subtasks it runs at once for direct `ExecuteSubtask` callers, apart from `--max-concurrency`; "
        "0 refuses them",
    )
    max_idea_bytes: PositiveInt = setting(64 * 1024, "largest idea accepted, in UTF-8 bytes")
    max_subtask_bytes: PositiveInt = setting(
        128 * 1024, "largest subtask title and instructions accepted together (a plan may quote the idea)"
    )
    allowed_models: str = setting(
        ",".join(PRICES),
        "comma list of the models the worker calls (its `--model` always among them; by default those "
        "priced in `swarm_common/pricing.py`); any other is `INVALID_ARGUMENT`",
    )
    stream_queue: PositiveInt = setting(
        1024, "replies an `ExecuteSubtasks` stream holds for a slow reader before it stops reading the caller"
    )
