"""`swarm-worker`: flags and environment in, a serving WorkerService out."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common import logs
from swarm_common.config import (
    add_call_limit_flags,
    add_simulated_flags,
    env_flag,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from swarm_common.pricing import PRICES_PER_MTOK
from swarm_common.providers import (
    DEFAULT_MODEL,
    PROVIDER_CHOICES,
    SimulatedSettings,
    make_provider,
)
from swarm_common.serving import CallLimits, Service
from worker_service.servicer import WorkerServicer
from worker_service.worker import Worker, WorkerLimits

DRAIN_NOTICE_S = 1.0


async def drain(worker: Worker, grace_s: float) -> None:
    """After NOT_SERVING: a moment in which calls are still taken while every orchestrator watching
    this worker's health stops routing to it, then the in-flight subtasks' time to finish."""
    await asyncio.sleep(min(DRAIN_NOTICE_S, grace_s))
    if not await worker.wait_idle(max(0.0, grace_s - DRAIN_NOTICE_S)):
        worker.log_unfinished()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="swarm-worker", description="Executes subtasks of swarms with the model."
    )
    env_flag(
        parser,
        "--listen",
        "SWARM_LISTEN",
        default="0.0.0.0:50052",
        help="address to serve on (port 0 = pick a free one)",
    )
    env_flag(
        parser,
        "--worker-id",
        "SWARM_WORKER_ID",
        default="",
        help="shown in events (default: host name + port)",
    )
    env_flag(
        parser,
        "--max-concurrency",
        "SWARM_MAX_CONCURRENCY",
        default=16,
        type=positive_int,
        help="subtasks this worker runs at once",
    )
    env_flag(
        parser,
        "--provider",
        "SWARM_PROVIDER",
        default="auto",
        choices=PROVIDER_CHOICES,
        help="model provider",
    )
    env_flag(parser, "--model", "CLAUDE_MODEL", default=DEFAULT_MODEL, help="default model")
    env_flag(
        parser,
        "--direct-slots",
        "SWARM_DIRECT_SLOTS",
        default=2,
        type=non_negative_int,
        help="subtasks run at once for direct ExecuteSubtask callers, apart from --max-concurrency (0 = refuse them)",
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
        "--max-subtask-bytes",
        "SWARM_MAX_SUBTASK_BYTES",
        default=128 * 1024,
        type=positive_int,
        help="largest subtask title and instructions accepted together, in UTF-8 bytes",
    )
    env_flag(
        parser,
        "--allowed-models",
        "SWARM_ALLOWED_MODELS",
        default=",".join(PRICES_PER_MTOK),
        help="comma list of the models this worker calls (its --model always among them)",
    )
    env_flag(
        parser,
        "--stream-queue",
        "SWARM_STREAM_QUEUE",
        default=1024,
        type=positive_int,
        help="replies an ExecuteSubtasks stream holds for a slow reader before it stops reading requests",
    )
    env_flag(
        parser,
        "--shutdown-grace",
        "SWARM_SHUTDOWN_GRACE_S",
        default=30.0,
        type=non_negative_float,
        help="seconds in-flight subtasks may take to finish after SIGTERM",
    )
    env_flag(parser, "--log-level", "SWARM_LOG_LEVEL", default="INFO", help="log level")
    add_call_limit_flags(parser)
    add_simulated_flags(parser)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    log = logs.setup("worker", args.log_level)
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
    worker = Worker(
        provider,
        worker_id=args.worker_id,
        max_concurrency=args.max_concurrency,
        default_model=args.model,
        limits=WorkerLimits(
            max_idea_bytes=args.max_idea_bytes,
            max_subtask_bytes=args.max_subtask_bytes,
            allowed_models=frozenset(m.strip() for m in args.allowed_models.split(",") if m.strip()),
            direct_slots=args.direct_slots,
        ),
    )
    service = Service(
        name="worker",
        service_names=[worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name],
        register=lambda server: worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(worker, stream_queue=args.stream_queue), server
        ),
        listen=args.listen,
        log=log,
        limits=CallLimits.from_args(args),
    )
    worker.worker_id = args.worker_id or f"{socket.gethostname()}:{service.port}"
    log.info(
        f"provider {provider.name}"
        + (" (simulated output, no model is called)" if provider.name == "simulated" else ""),
        extra={"provider": provider.name, "model": args.model, "worker_id": worker.worker_id},
    )
    await service.start()
    try:
        await service.run_until_stopped(drain=lambda: drain(worker, args.shutdown_grace), stop_grace_s=1.0)
    finally:
        await provider.aclose()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except ValueError as error:  # ProviderConfigError too: a setting that cannot work
        print(f"swarm-worker: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"swarm-worker: cannot serve on {args.listen}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
