"""`swarm-worker`: settings (flags and environment) in, a serving WorkerService out."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from dataclasses import replace

from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common import logs, telemetry
from swarm_common.providers import make_provider
from swarm_common.serving import Service, tune_collector
from worker_service.servicer import WorkerServicer
from worker_service.settings import WorkerSettings
from worker_service.worker import Worker, WorkerLimits

DRAIN_NOTICE_S = 1.0


async def drain(worker: Worker, grace_s: float) -> None:
    """After NOT_SERVING: a moment in which calls are still taken while every orchestrator watching
    this worker's health stops routing to it, then the in-flight subtasks' time to finish."""
    await asyncio.sleep(min(DRAIN_NOTICE_S, grace_s))
    if not await worker.wait_idle(max(0.0, grace_s - DRAIN_NOTICE_S)):
        worker.log_unfinished()


async def serve(settings: WorkerSettings) -> None:
    log = logs.setup("worker", settings.log_level)
    with telemetry.exported("swarm-worker", settings.metrics_listen):
        await _serve(settings, log)


async def _serve(settings: WorkerSettings, log: logging.Logger) -> None:
    tls = settings.server_tls(log)  # files that cannot be used stop the start
    provider = make_provider(settings.provider, settings.simulated())
    worker = Worker(
        provider,
        worker_id=settings.worker_id,
        max_concurrency=settings.max_concurrency,
        default_model=settings.model,
        limits=WorkerLimits(
            max_idea_bytes=settings.max_idea_bytes,
            max_subtask_bytes=settings.max_subtask_bytes,
            allowed_models=frozenset(m.strip() for m in settings.allowed_models.split(",") if m.strip()),
            direct_slots=settings.direct_slots,
        ),
    )
    service = Service(
        name="worker",
        service_names=[worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name],
        register=lambda server: worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(worker, stream_queue=settings.stream_queue), server
        ),
        listen=settings.listen,
        log=log,
        # The worker holds back an ExecuteSubtasks sender by no longer reading its stream.
        limits=replace(settings.call_limits(), grow_receive_window=False),
        tls=tls,
    )
    worker.worker_id = settings.worker_id or f"{socket.gethostname()}:{service.port}"
    log.info(
        f"provider {provider.name}"
        + (" (simulated output, no model is called)" if provider.name == "simulated" else ""),
        extra={"provider": provider.name, "model": settings.model, "worker_id": worker.worker_id},
    )
    await service.start()
    try:
        await service.run_until_stopped(
            drain=lambda: drain(worker, settings.shutdown_grace_s), stop_grace_s=1.0
        )
    finally:
        await provider.aclose()


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings.from_command_line(argv)
    try:
        tune_collector()
        asyncio.run(serve(settings))
    except ValueError as error:  # ProviderConfigError too: a setting that cannot work
        print(f"swarm-worker: {error}", file=sys.stderr)
        sys.exit(2)
    except telemetry.MetricsUnavailable as error:
        print(f"swarm-worker: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        print(f"swarm-worker: cannot serve on {settings.listen}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
