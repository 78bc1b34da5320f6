"""`swarm-orchestrator`: settings (flags and environment) in, a serving OrchestratorService out.

`swarm-orchestrator add-token --auth-file FILE --tenant NAME` adds a token to the auth file instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import sys

from orchestrator_service.auth import Authentication, AuthFileError, TokenBook, add_token
from orchestrator_service.leases import LeaseKeeper
from orchestrator_service.orchestrator import Economy, Limits, Orchestrator
from orchestrator_service.planner import Planner
from orchestrator_service.rate_limits import ModelLimits, ModelRateLimiter, RateLimitedProvider
from orchestrator_service.scheduler import RetryPolicy, Scheduler
from orchestrator_service.servicer import OrchestratorServicer, add_to_server
from orchestrator_service.settings import OrchestratorSettings
from orchestrator_service.store import Store, StoreError, expire_forever, open_store, redacted
from orchestrator_service.watchdog import Bounds
from orchestrator_service.worker_pool import WorkerPool
from swarm.v1 import orchestrator_pb2
from swarm_common import logs, telemetry
from swarm_common.config import split_host_port
from swarm_common.providers import ProviderConfigError, make_provider
from swarm_common.serving import Service, tune_collector
from swarm_common.tls import ClientTls, ServerTls


class Unprotected(ValueError):
    """The orchestrator would serve the network with no authentication."""


def loopback(listen: str) -> bool:
    host, _ = split_host_port(listen, "--listen")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or empty (every interface)
        return False


def check_exposure(settings: OrchestratorSettings) -> None:
    """Secure by default: without tokens, only this machine may reach the orchestrator, unless the
    operator says otherwise in so many words."""
    if settings.auth_file or settings.allow_unauthenticated or loopback(settings.listen):
        return
    raise Unprotected(
        f"refusing to serve {settings.listen} without authentication: anyone who reaches it could spend "
        "the model API key and read every swarm; give --auth-file (swarm-orchestrator add-token creates "
        "one), listen on 127.0.0.1, or pass --allow-unauthenticated"
    )


# The store's writer thread takes the GIL back after each statement and after each commit's fsync,
# from an event loop that is rarely idle under load, and events are shown only once committed.
# With 1,000 agents streaming on a loaded 2-core VM, a commit's p99 was 72, 75 and 80 ms at
# Python's default 5 ms a wait, and 39, 43 and 164 ms at 1 ms (back-to-back pairs).
GIL_SWITCH_INTERVAL_S = 0.001


async def serve(settings: OrchestratorSettings) -> None:
    log = logs.setup("orchestrator", settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    check_exposure(settings)
    # Files that cannot be used stop the start before anything is set up.
    tls = settings.server_tls(log)
    worker_tls = (
        ClientTls(
            settings.worker_tls_ca, settings.worker_tls_cert, settings.worker_tls_key, flags="--worker-tls"
        )
        if settings.worker_tls_ca
        else None
    )
    book = TokenBook(settings.auth_file, log=log) if settings.auth_file else None
    if book is not None and tls is None and not loopback(settings.listen):
        log.warning(
            "tokens travel in plaintext: give --tls-cert and --tls-key so they cannot be read on the way"
        )
    # First: a database that cannot be used stops the start before anything else is set up.
    store = await open_store(settings.db, lease_ttl_s=settings.lease_ttl_s)
    try:
        with telemetry.exported("swarm-orchestrator", settings.metrics_listen):
            await _serve_on(store, settings, log, tls=tls, worker_tls=worker_tls, book=book)
    finally:
        await store.close()


async def _serve_on(
    store: Store,
    settings: OrchestratorSettings,
    log: logging.Logger,
    *,
    tls: ServerTls | None,
    worker_tls: ClientTls | None,
    book: TokenBook | None,
) -> None:
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
        tls=worker_tls,
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
            max_delta_rate=settings.max_delta_rate,
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
        tenants=book.tenant if book is not None else lambda name: None,
    )
    service = Service(
        name="orchestrator",
        service_names=[orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name],
        register=lambda server: add_to_server(OrchestratorServicer(orchestrator), server),
        listen=settings.listen,
        log=log,
        limits=settings.call_limits(),
        tls=tls,
        interceptors=[Authentication(book, log=log, reflection_needs_token=settings.reflection_needs_token)],
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
        # What start-up made (modules, descriptors, recovered swarms) stays: frozen, the collector
        # skips it, so a full collection mid-stream no longer stalls the event loop (it took
        # about 60 ms with 1,000 agents streaming).
        gc.collect()
        gc.freeze()
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


def add_token_command(argv: list[str]) -> None:
    """`swarm-orchestrator add-token`: prints the new token alone on standard output, once."""
    parser = argparse.ArgumentParser(
        prog="swarm-orchestrator add-token",
        description="Creates a token for a tenant and stores its hash in the auth file (created if missing). "
        "The token is printed once, alone on standard output: keep it, it cannot be shown again.",
    )
    parser.add_argument("--auth-file", required=True, help="the auth file (JSON) the orchestrator reads")
    parser.add_argument("--tenant", required=True, help="the tenant the token belongs to")
    args = parser.parse_args(argv)
    try:
        token = add_token(args.auth_file, args.tenant)
    except AuthFileError as error:
        print(f"swarm-orchestrator add-token: {error}", file=sys.stderr)
        sys.exit(1)
    print(token)
    print(f"a token for tenant {args.tenant} is stored (its hash only) in {args.auth_file}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["add-token"]:
        add_token_command(arguments[1:])
        return
    settings = OrchestratorSettings.from_command_line(arguments)
    try:
        tune_collector()
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
