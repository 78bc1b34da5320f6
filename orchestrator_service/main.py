"""`swarm-orchestrator`: settings (flags and environment) in, a serving OrchestratorService out."""

from __future__ import annotations

import asyncio
import logging
import sys

from orchestrator_service.leases import LeaseKeeper
from orchestrator_service.orchestrator import Economy, Limits, Orchestrator
from orchestrator_service.planner import Planner
from orchestrator_service.rate_limits import ModelLimits, ModelRateLimiter, RateLimitedProvider
from orchestrator_service.scheduler import RetryPolicy, Scheduler
from orchestrator_service.servicer import OrchestratorServicer
from orchestrator_service.settings import OrchestratorSettings
from orchestrator_service.store import Store, StoreError, expire_forever, open_store, redacted
from orchestrator_service.watchdog import Bounds
from orchestrator_service.worker_pool import WorkerPool
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_common import logs, telemetry
from swarm_common.providers import ProviderConfigError, make_provider
from swarm_common.serving import Service


async def serve(settings: OrchestratorSettings) -> None:
    log = logs.setup("orchestrator", settings.log_level)
    # First: a database that cannot be used stops the start before anything else is set up.
    store = await open_store(settings.db, lease_ttl_s=settings.lease_ttl_s)
    try:
        with telemetry.exported("swarm-orchestrator", settings.metrics_listen):
            await _serve_on(store, settings, log)
    finally:
        await store.close()


async def _serve_on(store: Store, settings: OrchestratorSettings, log: logging.Logger) -> None:
    provider = make_provider(settings.provider, settings.simulated())
    if provider.name == "simulated":
        log.warning(
            "provider simulated: no model is called and every answer is labelled [simulated]"
            + (" (set ANTHROPIC_API_KEY to use Claude)" if settings.provider == "auto" else ""),
            extra={"provider": provider.name},
        )
    else:
        log.info(f"provider anthropic, default model {settings.model}", extra={"provider": provider.name})
    limiter = ModelRateLimiter(
        ModelLimits(
            requests_per_minute=settings.model_rpm,
            input_tokens_per_minute=settings.model_input_tpm,
            output_tokens_per_minute=settings.model_output_tpm,
            concurrent_requests=settings.model_concurrency,
            window_s=settings.rate_window_s,
        )
    )
    pool = WorkerPool(
        settings.workers,
        refresh_interval_s=settings.refresh_interval_s,
        no_worker_timeout_s=settings.no_worker_timeout_s,
    )
    orchestrator = Orchestrator(
        Planner(
            RateLimitedProvider(provider, limiter),
            attempts=settings.plan_attempts,
            synthesis_attempts=settings.max_attempts,
            bounds=Bounds(timeout_s=settings.subtask_timeout_s, silence_s=settings.no_progress_timeout_s),
        ),
        Scheduler(
            pool,
            RetryPolicy(
                max_attempts=settings.max_attempts,
                subtask_timeout_s=settings.subtask_timeout_s,
                no_progress_timeout_s=settings.no_progress_timeout_s,
            ),
            limiter,
            delta_window_s=settings.delta_window_ms / 1000,
        ),
        store,
        default_model=settings.model,
        limits=Limits(
            max_agents=settings.max_agents,
            max_idea_bytes=settings.max_idea_bytes,
            answer_max_tokens=settings.answer_max_tokens,
            max_swarm_input_bytes=settings.max_swarm_input_bytes,
            max_agents_in_flight=settings.max_agents_in_flight,
            max_watchers_per_swarm=settings.max_watchers_per_swarm,
            max_page_bytes=settings.max_page_bytes,
            list_text_bytes=settings.list_text_bytes,
        ),
        economy=Economy(
            worker_model=settings.worker_model,
            hedging=settings.hedging,
            hedge_max_extra=settings.hedge_max_extra,
            prompt_caching=not settings.no_prompt_caching,
        ),
    )
    service = Service(
        name="orchestrator",
        service_names=[orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name],
        register=lambda server: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(
            OrchestratorServicer(orchestrator), server
        ),
        listen=settings.listen,
        log=log,
        limits=settings.call_limits(),
    )
    await pool.start()
    background: list[asyncio.Task[None]] = []
    try:
        # Before serving: a client that reconnects finds its resumed swarm running.
        resumed = await orchestrator.recover()
        if resumed:
            log.info(f"resumed {len(resumed)} unfinished swarm(s) from {redacted(settings.db)}")
        if store.shared:
            background.append(
                asyncio.create_task(LeaseKeeper(orchestrator, pool, settings.lease_ttl_s).run())
            )
        if settings.retention_s > 0:
            background.append(asyncio.create_task(expire_forever(store, settings.retention_s)))
        background.append(asyncio.create_task(_stop_on_store_failure(orchestrator, service, log)))
        await service.start()
        # 5 s after the drain for the last events to reach their watchers.
        await service.run_until_stopped(
            drain=lambda: orchestrator.drain(settings.shutdown_grace_s), stop_grace_s=5.0
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
    settings = OrchestratorSettings.from_command_line(argv)
    try:
        asyncio.run(serve(settings))
    except (StoreError, telemetry.MetricsUnavailable) as error:
        print(f"swarm-orchestrator: {error}", file=sys.stderr)
        sys.exit(1)
    except (ProviderConfigError, ValueError) as error:
        print(f"swarm-orchestrator: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"swarm-orchestrator: cannot serve on {settings.listen}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
