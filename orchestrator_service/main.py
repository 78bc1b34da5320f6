"""`swarm-orchestrator`: flags and environment in, a serving OrchestratorService out."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from orchestrator_service.orchestrator import Limits, Orchestrator
from orchestrator_service.planner import Planner
from orchestrator_service.rate_limits import ModelLimits, ModelRateLimiter, RateLimitedProvider
from orchestrator_service.scheduler import RetryPolicy, Scheduler
from orchestrator_service.servicer import OrchestratorServicer
from orchestrator_service.store import MEMORY, Store, StoreError, expire_forever, open_store
from orchestrator_service.watchdog import Bounds
from orchestrator_service.worker_pool import WorkerPool
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_common import logs
from swarm_common.config import (
    add_call_limit_flags,
    add_simulated_flags,
    env_flag,
    non_negative_float,
    positive_int,
)
from swarm_common.providers import (
    DEFAULT_MODEL,
    PROVIDER_CHOICES,
    ProviderConfigError,
    SimulatedSettings,
    make_provider,
)
from swarm_common.serving import CallLimits, Service


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="swarm-orchestrator",
        description="Plans swarms, runs their subtasks on the worker pool, synthesizes.",
    )
    env_flag(
        parser,
        "--listen",
        "SWARM_LISTEN",
        default="0.0.0.0:50051",
        help="address to serve on (port 0 = pick a free one)",
    )
    env_flag(
        parser,
        "--workers",
        "SWARM_WORKERS",
        default="dns:///localhost:50052",
        help="worker pool: dns:///HOST:PORT (every address is a worker) or HOST:PORT,HOST:PORT",
    )
    env_flag(
        parser,
        "--provider",
        "SWARM_PROVIDER",
        default="auto",
        choices=PROVIDER_CHOICES,
        help="model provider for planning and synthesis",
    )
    env_flag(parser, "--model", "CLAUDE_MODEL", default=DEFAULT_MODEL, help="default model")
    env_flag(
        parser,
        "--max-agents",
        "SWARM_MAX_AGENTS",
        default=256,
        type=positive_int,
        help="largest num_agents accepted",
    )
    env_flag(
        parser,
        "--max-idea-bytes",
        "SWARM_MAX_IDEA_BYTES",
        default=64 * 1024,
        type=positive_int,
        help="largest idea accepted, in UTF-8 bytes",
    )
    env_flag(
        parser,
        "--max-swarm-input-bytes",
        "SWARM_MAX_SWARM_INPUT_BYTES",
        default=4 * 1024 * 1024,
        type=positive_int,
        help="largest idea bytes x num_agents accepted: each agent's prompt carries the idea",
    )
    env_flag(
        parser,
        "--max-agents-in-flight",
        "SWARM_MAX_AGENTS_IN_FLIGHT",
        default=4096,
        type=positive_int,
        help="agents of unfinished swarms (running or queued) at once; a swarm beyond is refused",
    )
    env_flag(
        parser,
        "--max-watchers-per-swarm",
        "SWARM_MAX_WATCHERS_PER_SWARM",
        default=100,
        type=positive_int,
        help="RunSwarm and WatchSwarm calls reading one swarm at once",
    )
    env_flag(
        parser,
        "--max-page-bytes",
        "SWARM_MAX_PAGE_BYTES",
        default=1024 * 1024,
        type=positive_int,
        help="a ListSwarms page ends at this many bytes, whatever its page_size",
    )
    env_flag(
        parser,
        "--list-text-bytes",
        "SWARM_LIST_TEXT_BYTES",
        default=1024,
        type=positive_int,
        help="ListSwarms cuts each swarm's idea, result and error to this many bytes (GetSwarm has them whole)",
    )
    env_flag(
        parser,
        "--subtask-timeout",
        "SWARM_SUBTASK_TIMEOUT_S",
        default=600.0,
        type=non_negative_float,
        help="seconds one attempt of a subtask may take before it is retried elsewhere",
    )
    env_flag(
        parser,
        "--max-attempts",
        "SWARM_MAX_ATTEMPTS",
        default=3,
        type=positive_int,
        help="attempts per subtask, on different workers where possible",
    )
    env_flag(
        parser,
        "--delta-window-ms",
        "SWARM_DELTA_WINDOW_MS",
        default=50.0,
        type=non_negative_float,
        help="a subtask's output chunks are sent as one event per window of this many ms (0 = each chunk)",
    )
    env_flag(
        parser,
        "--no-progress-timeout",
        "SWARM_NO_PROGRESS_TIMEOUT_S",
        default=120.0,
        type=non_negative_float,
        help="seconds an attempt may go without output before its worker counts as hung and it is retried",
    )
    env_flag(
        parser,
        "--model-rpm",
        "SWARM_MODEL_RPM",
        default=0,
        type=int,
        help="model API requests per minute for the whole orchestrator (0 = no limit)",
    )
    env_flag(
        parser,
        "--model-input-tpm",
        "SWARM_MODEL_INPUT_TPM",
        default=0,
        type=int,
        help="model API input tokens per minute (0 = no limit)",
    )
    env_flag(
        parser,
        "--model-output-tpm",
        "SWARM_MODEL_OUTPUT_TPM",
        default=0,
        type=int,
        help="model API output tokens per minute (0 = no limit)",
    )
    env_flag(
        parser,
        "--model-concurrency",
        "SWARM_MODEL_CONCURRENCY",
        default=0,
        type=int,
        help="model API requests in flight at once (0 = no limit)",
    )
    env_flag(
        parser,
        "--rate-window",
        "SWARM_RATE_WINDOW_S",
        default=60.0,
        type=non_negative_float,
        help="seconds the per-minute budgets are kept over (tests shorten it)",
    )
    env_flag(
        parser,
        "--plan-attempts",
        "SWARM_PLAN_ATTEMPTS",
        default=3,
        type=positive_int,
        help="times the model is asked for a valid plan before the swarm fails",
    )
    env_flag(
        parser,
        "--refresh-interval",
        "SWARM_REFRESH_INTERVAL_S",
        default=10.0,
        type=non_negative_float,
        help="seconds between re-resolutions of the worker target",
    )
    env_flag(
        parser,
        "--no-worker-timeout",
        "SWARM_NO_WORKER_TIMEOUT_S",
        default=30.0,
        type=non_negative_float,
        help="seconds a subtask waits for any reachable worker before the swarm fails",
    )
    env_flag(
        parser,
        "--db",
        "SWARM_DB",
        default="swarms.db",
        help=f"the SQLite file that swarms are kept in (created if missing; {MEMORY} = in memory only, "
        "nothing survives a restart)",
    )
    env_flag(
        parser,
        "--retention",
        "SWARM_RETENTION_S",
        default=7 * 24 * 3600.0,
        type=non_negative_float,
        help="seconds a finished swarm is kept before it is deleted (0 = forever)",
    )
    env_flag(
        parser,
        "--shutdown-grace",
        "SWARM_SHUTDOWN_GRACE_S",
        default=30.0,
        type=non_negative_float,
        help="seconds running swarms may take to finish after SIGTERM",
    )
    env_flag(parser, "--log-level", "SWARM_LOG_LEVEL", default="INFO", help="log level")
    add_call_limit_flags(parser)
    add_simulated_flags(parser)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    log = logs.setup("orchestrator", args.log_level)
    # First: a database that cannot be used stops the start before anything else is set up.
    store = await open_store(args.db)
    try:
        await _serve_on(store, args, log)
    finally:
        await store.close()


async def _serve_on(store: Store, args: argparse.Namespace, log: logging.Logger) -> None:
    settings = SimulatedSettings(
        latency_ms=args.sim_latency_ms,
        latency_sigma=args.sim_latency_sigma,
        chunks=args.sim_chunks,
        failure_rate=args.sim_failure_rate,
        rate_limit_rate=args.sim_rate_limit_rate,
        bad_plans=args.sim_bad_plans,
        stall_rate=args.sim_stall_rate,
        stall_after_chunks=args.sim_stall_after_chunks,
    )
    provider = make_provider(args.provider, settings)
    if provider.name == "simulated":
        log.warning(
            "provider simulated: no model is called and every answer is labelled [simulated]"
            + (" (set ANTHROPIC_API_KEY to use Claude)" if args.provider == "auto" else ""),
            extra={"provider": provider.name},
        )
    else:
        log.info(f"provider anthropic, default model {args.model}", extra={"provider": provider.name})
    limiter = ModelRateLimiter(
        ModelLimits(
            requests_per_minute=args.model_rpm,
            input_tokens_per_minute=args.model_input_tpm,
            output_tokens_per_minute=args.model_output_tpm,
            concurrent_requests=args.model_concurrency,
            window_s=args.rate_window,
        )
    )
    pool = WorkerPool(
        args.workers, refresh_interval_s=args.refresh_interval, no_worker_timeout_s=args.no_worker_timeout
    )
    orchestrator = Orchestrator(
        Planner(
            RateLimitedProvider(provider, limiter),
            attempts=args.plan_attempts,
            synthesis_attempts=args.max_attempts,
            bounds=Bounds(timeout_s=args.subtask_timeout, silence_s=args.no_progress_timeout),
        ),
        Scheduler(
            pool,
            RetryPolicy(
                max_attempts=args.max_attempts,
                subtask_timeout_s=args.subtask_timeout,
                no_progress_timeout_s=args.no_progress_timeout,
            ),
            limiter,
            delta_window_s=args.delta_window_ms / 1000,
        ),
        store,
        default_model=args.model,
        limits=Limits(
            max_agents=args.max_agents,
            max_idea_bytes=args.max_idea_bytes,
            max_swarm_input_bytes=args.max_swarm_input_bytes,
            max_agents_in_flight=args.max_agents_in_flight,
            max_watchers_per_swarm=args.max_watchers_per_swarm,
            max_page_bytes=args.max_page_bytes,
            list_text_bytes=args.list_text_bytes,
        ),
    )
    service = Service(
        name="orchestrator",
        service_names=[orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name],
        register=lambda server: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(
            OrchestratorServicer(orchestrator), server
        ),
        listen=args.listen,
        log=log,
        limits=CallLimits.from_args(args),
    )
    await pool.start()
    background: list[asyncio.Task[None]] = []
    try:
        # Before serving: a client that reconnects finds its resumed swarm running.
        resumed = await orchestrator.recover()
        if resumed:
            log.info(f"resumed {len(resumed)} unfinished swarm(s) from {args.db}")
        if args.retention > 0:
            background.append(asyncio.create_task(expire_forever(store, args.retention)))
        background.append(asyncio.create_task(_stop_on_store_failure(orchestrator, service, log)))
        await service.start()
        # 5 s after the drain for the last events to reach their watchers.
        await service.run_until_stopped(
            drain=lambda: orchestrator.drain(args.shutdown_grace), stop_grace_s=5.0
        )
    finally:
        for task in background:
            task.cancel()
        await pool.close()
        await provider.aclose()
    if orchestrator.store_failure is not None:
        raise orchestrator.store_failure


async def _stop_on_store_failure(orchestrator: Orchestrator, service: Service, log: logging.Logger) -> None:
    """An orchestrator that cannot store events stops (exit 1) rather than show unstored ones; a
    restart resumes its swarms from what was stored."""
    await orchestrator.store_failed.wait()
    log.critical(f"stopping: {orchestrator.store_failure}")
    service.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except StoreError as error:
        print(f"swarm-orchestrator: {error}", file=sys.stderr)
        sys.exit(1)
    except (ProviderConfigError, ValueError) as error:
        print(f"swarm-orchestrator: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"swarm-orchestrator: cannot serve on {args.listen}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
