"""`swarm-orchestrator`'s settings: one field per flag and environment twin (see swarm_common.settings)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, PositiveFloat

from orchestrator_service.store import MEMORY
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS
from swarm_common.settings import (
    LISTEN,
    HostPort,
    NonNegativeFloat,
    PositiveInt,
    ServiceSettings,
    setting,
)

# A share of something, from none to all of it.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class OrchestratorSettings(ServiceSettings):
    """the orchestrator"""

    prog: ClassVar[str] = "swarm-orchestrator"
    description: ClassVar[str] = "Plans swarms, runs their subtasks on the worker pool, synthesizes."

    listen: HostPort = setting("0.0.0.0:50051", LISTEN)
    workers: str = setting(
        "dns:///localhost:50052",
        "the worker pool: `dns:///name:port` (every address is a worker), `dns://DNS-SERVER/name:port`, "
        "or `host:port,host:port`",
    )
    subtask_timeout_s: NonNegativeFloat = setting(
        600.0, "seconds one attempt may take before it is retried elsewhere", flag="--subtask-timeout"
    )
    max_attempts: PositiveInt = setting(3, "attempts per subtask, on different workers where possible")
    plan_attempts: PositiveInt = setting(
        3, "times the model is asked for a valid plan before the swarm fails"
    )
    max_agents: PositiveInt = setting(256, "largest `num_agents` accepted")
    max_idea_bytes: PositiveInt = setting(64 * 1024, "largest idea accepted, in UTF-8 bytes")
    max_swarm_input_bytes: PositiveInt = setting(
        4 * 1024 * 1024,
        "largest idea bytes x `num_agents` accepted (4 MiB): each agent's prompt carries the idea",
    )
    max_agents_in_flight: PositiveInt = setting(
        4096, "agents of all unfinished swarms, running or queued; a swarm that would pass it is refused"
    )
    max_watchers_per_swarm: PositiveInt = setting(
        100, "RunSwarm and WatchSwarm calls reading one swarm at once"
    )
    max_page_bytes: PositiveInt = setting(
        1024 * 1024, "a ListSwarms page ends at this size (1 MiB), whatever its `page_size`"
    )
    list_text_bytes: PositiveInt = setting(
        1024,
        "ListSwarms cuts each swarm's idea, result and error to this many bytes (GetSwarm has them whole)",
    )
    answer_max_tokens: PositiveInt = setting(
        DEFAULT_ANSWER_MAX_TOKENS,
        "most output tokens one subtask's answer may have, when the request sets none; a swarm whose "
        "model cannot give that much is refused",
    )
    no_progress_timeout_s: NonNegativeFloat = setting(
        120.0,
        "seconds an attempt may go without output before its worker counts as hung and the attempt is "
        "retried elsewhere",
        flag="--no-progress-timeout",
    )
    model_rpm: int = setting(
        0, "model API requests per minute, for the whole orchestrator and all its workers (0 = no limit)"
    )
    model_input_tpm: int = setting(0, "model API input tokens per minute (0 = no limit)")
    model_output_tpm: int = setting(0, "model API output tokens per minute (0 = no limit)")
    model_concurrency: int = setting(0, "model API requests in flight at once (0 = no limit)")
    rate_window_s: NonNegativeFloat = setting(
        60.0, "the window the per-minute budgets are kept over (tests shorten it)", flag="--rate-window"
    )
    refresh_interval_s: NonNegativeFloat = setting(
        10.0, "seconds between re-resolutions of the worker target", flag="--refresh-interval"
    )
    no_worker_timeout_s: NonNegativeFloat = setting(
        30.0,
        "seconds a subtask waits for any reachable worker before its swarm fails",
        flag="--no-worker-timeout",
    )
    db: str = setting(
        "swarms.db",
        "the SQLite file swarms are kept in (created if missing, WAL, locked while in use); "
        f"`{MEMORY}` keeps them in memory only, so nothing survives a restart; "
        "`postgresql://USER:PASSWORD@HOST:PORT/DATABASE` keeps them in PostgreSQL, which several "
        "orchestrators may share",
    )
    lease_ttl_s: PositiveFloat = setting(
        15.0,
        "on a shared (PostgreSQL) store: seconds after which a dead orchestrator's swarms are taken "
        "over by another",
        flag="--lease-ttl",
    )
    retention_s: NonNegativeFloat = setting(
        7 * 24 * 3600.0,
        "seconds a finished swarm is kept before it and its events are deleted (604800 = 7 days); "
        "0 keeps them forever",
        flag="--retention",
    )
    delta_window_ms: NonNegativeFloat = setting(
        50.0,
        "a subtask's output chunks go to clients as one `subtask_delta` per window, gathered by its "
        "worker (0 = each chunk as it comes); no text is lost",
    )
    max_delta_rate: NonNegativeFloat = setting(
        2000.0,
        "`subtask_delta` events a second one swarm sends at most: while more of its subtasks stream "
        "than this rate x the window (100 by default), each one's window widens by whole windows "
        "(0 = never widened)",
    )
    worker_model: str = setting(
        "",
        "the model subtasks run on when the request names none (`--model` plans and synthesizes); "
        "empty = the swarm's model",
    )
    hedging: bool = setting(
        False,
        "hedge straggling subtasks when the request does not say: once half have completed, one "
        "running over twice their median time gets a second attempt on another worker, and the first "
        "to finish wins",
    )
    hedge_max_extra: Fraction = setting(
        0.1, "the most extra attempts hedges may add to a swarm, as a fraction of its subtasks"
    )
    no_prompt_caching: bool = setting(
        False,
        "leave prompts unmarked for the model API's prompt cache; by default the prefix a swarm's calls "
        "share (system prompt, idea, plan) is marked where it is long enough and read again",
    )
    worker_tls_ca: str = setting(
        "",
        "PEM CA that workers' certificates are checked against; set = call workers over TLS. A worker's "
        "certificate must name the host of `--workers` (`dns:///worker:50052`: worker)",
    )
    worker_tls_cert: str = setting(
        "", "PEM client certificate presented to workers (mTLS: a worker with `--tls-client-ca` requires one)"
    )
    worker_tls_key: str = setting("", "PEM private key of `--worker-tls-cert`")
    auth_file: str = setting(
        "",
        "tenants, their token hashes and quotas (JSON; `swarm-orchestrator add-token` writes it); set = every "
        "swarm RPC needs `authorization: Bearer TOKEN`. Read again when it changes",
    )
    allow_unauthenticated: bool = setting(
        False,
        "serve a non-loopback `--listen` without `--auth-file`: anyone who reaches the port may start swarms "
        "and read them all",
    )
    reflection_needs_token: bool = setting(
        False, "server reflection needs a token too (by default it is open, like health)"
    )
