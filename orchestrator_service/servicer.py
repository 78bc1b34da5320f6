"""Translates OrchestratorService calls to and from the Orchestrator; domain errors become status codes.
Each call is its tenant's (`current_tenant()`, set by the authentication in front of it).

RunSwarm and WatchSwarm send each event as the bytes the event log made of it, once, for every
reader (`event_log.Logged`): grpc is given no serializer for them (`add_to_server`), so it sends
the bytes as they are."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory

from orchestrator_service.auth import current_tenant
from orchestrator_service.event_log import LogSuspended, responses
from orchestrator_service.orchestrator import (
    InvalidRequest,
    Orchestrator,
    OverLimit,
    RequestIdReused,
    ShuttingDown,
    SwarmNotFound,
)
from orchestrator_service.quotas import QuotaExceeded, quotas_proto
from orchestrator_service.store import StoreError
from swarm.v1 import orchestrator_pb2
from swarm_common.rpc_errors import bad_request, over_limit
from swarm_common.telemetry import TRACE_HEADERS

# The request and response types are the method's own; the context is only passed through.
Context = grpc.aio.ServicerContext[Any, Any]


async def abort_invalid(context: Context, error: InvalidRequest) -> NoReturn:
    """INVALID_ARGUMENT with a google.rpc.BadRequest listing every field violation."""
    await context.abort_with_status(bad_request(str(error), error.violations))
    raise AssertionError("abort_with_status returns only by raising")


async def abort_over_limit(context: Context, error: OverLimit | QuotaExceeded) -> NoReturn:
    """RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure naming the limit's flag, or the tenant
    whose quota it is."""
    subject = error.flag if isinstance(error, OverLimit) else error.subject
    await context.abort_with_status(over_limit(subject, str(error)))
    raise AssertionError("abort_with_status returns only by raising")


# A stream that cannot go on here (the orchestrator is stopping, or its store failed) ends
# UNAVAILABLE, and its client WatchSwarms on from its last sequence, after a restart too.
CUT_OFF = (LogSuspended, StoreError)


def _trace_context(context: Context) -> dict[str, str]:
    """The W3C trace headers the caller sent as metadata: its span is the swarm's parent."""
    return {key: str(value) for key, value in context.invocation_metadata() or () if key in TRACE_HEADERS}


def _hedging(request: orchestrator_pb2.RunSwarmRequest) -> bool | None:
    """The request's hedging switch; None = the orchestrator's default."""
    if request.hedging == orchestrator_pb2.HEDGING_UNSPECIFIED:
        return None
    return request.hedging == orchestrator_pb2.HEDGING_ON


def _economics(request: orchestrator_pb2.RunSwarmRequest) -> dict[str, Any]:
    """What the request asks of the swarm's spending, as Orchestrator.start and spec_of take it."""
    return {
        "budget": request.budget if request.HasField("budget") else None,
        "worker_model": request.worker_model,
        "hedging": _hedging(request),
        "hedge_max_extra": request.hedge_max_extra,
    }


def _deadline(context: Context) -> float | None:
    """The call's deadline as a wall-clock time; grpc Python does not pass deadlines on by itself."""
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
# Methods whose handlers yield a response's bytes, not a message.
SERIALIZED = frozenset({"RunSwarm", "WatchSwarm"})


def add_to_server(servicer: OrchestratorServicer, server: grpc.aio.Server) -> None:
    """Registers every method of the service, as generated code would, except that RunSwarm and
    WatchSwarm get no response serializer: their handlers yield the bytes of each response."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        assert not method.client_streaming, "every method takes one request"
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = handler(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=None if method.name in SERIALIZED else response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class OrchestratorServicer:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    async def RunSwarm(
        self, request: orchestrator_pb2.RunSwarmRequest, context: Context
    ) -> AsyncIterator[bytes]:
        tenant = current_tenant()
        try:
            started = await self._orchestrator.start(
                idea=request.idea,
                num_agents=request.num_agents,
                model=request.model,
                request_id=request.request_id,
                max_parallel=request.max_parallel,
                deadline=_deadline(context) if not request.detach else None,
                answer_max_tokens=request.answer_max_tokens,
                trace_context=_trace_context(context),
                **_economics(request),
                tenant=tenant,
            )
            events = await self._orchestrator.watch(started.swarm_id, tenant=tenant.name)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        except (OverLimit, QuotaExceeded) as error:
            await abort_over_limit(context, error)
        except RequestIdReused as error:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(error))
        except (ShuttingDown, StoreError) as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        try:
            # Closed here, whatever ends the call, so the swarm's watcher place is free at once.
            async with contextlib.aclosing(events):
                async for batch in events:
                    for response in responses(batch, request.max_events_per_message):
                        yield response  # a RunSwarmResponse
        except OverLimit as error:
            await abort_over_limit(context, error)
        except CUT_OFF as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        finally:
            # Reached on completion, on the client's cancellation (CancelledError or GeneratorExit)
            # and on a broken connection alike. Only an unfinished swarm that this call started,
            # attached, is cancelled: a call that found it by its request_id only watches it.
            if started.new and not request.detach:
                self._orchestrator.release(started.swarm_id, "the client cancelled RunSwarm")

    async def WatchSwarm(
        self, request: orchestrator_pb2.WatchSwarmRequest, context: Context
    ) -> AsyncIterator[bytes]:
        try:
            events = await self._orchestrator.watch(
                request.swarm_id, request.after_sequence, tenant=current_tenant().name
            )
        except InvalidRequest as error:
            await abort_invalid(context, error)
        except SwarmNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except StoreError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        try:
            async with contextlib.aclosing(events):
                async for batch in events:
                    for response in responses(batch, request.max_events_per_message):
                        yield response  # a WatchSwarmResponse
        except OverLimit as error:
            await abort_over_limit(context, error)
        except CUT_OFF as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    async def GetSwarm(
        self, request: orchestrator_pb2.GetSwarmRequest, context: Context
    ) -> orchestrator_pb2.GetSwarmResponse:
        try:
            swarm = await self._orchestrator.get(request.swarm_id, tenant=current_tenant().name)
        except SwarmNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except StoreError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return orchestrator_pb2.GetSwarmResponse(swarm=swarm)

    async def ListSwarms(
        self, request: orchestrator_pb2.ListSwarmsRequest, context: Context
    ) -> orchestrator_pb2.ListSwarmsResponse:
        if request.page_size < 0:
            await abort_invalid(context, InvalidRequest([("page_size", "must not be negative")]))
        try:
            swarms, token = await self._orchestrator.list(
                page_size=request.page_size,
                page_token=request.page_token,
                state=request.state,
                tenant=current_tenant().name,
            )
        except InvalidRequest as error:
            await abort_invalid(context, error)
        except StoreError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return orchestrator_pb2.ListSwarmsResponse(swarms=swarms, next_page_token=token)

    async def CancelSwarm(
        self, request: orchestrator_pb2.CancelSwarmRequest, context: Context
    ) -> orchestrator_pb2.CancelSwarmResponse:
        try:
            swarm = await self._orchestrator.cancel(
                request.swarm_id, request.reason, tenant=current_tenant().name
            )
        except SwarmNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except StoreError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return orchestrator_pb2.CancelSwarmResponse(swarm=swarm)

    async def GetOrchestratorInfo(
        self, request: orchestrator_pb2.GetOrchestratorInfoRequest, context: Context
    ) -> orchestrator_pb2.GetOrchestratorInfoResponse:
        orchestrator = self._orchestrator
        tenant = current_tenant()
        return orchestrator_pb2.GetOrchestratorInfoResponse(
            max_agents=orchestrator.limits.max_agents,
            max_idea_bytes=orchestrator.limits.max_idea_bytes,
            default_model=orchestrator.default_model,
            provider=orchestrator.planner.provider.name,
            tenant=tenant.name,
            quotas=quotas_proto(tenant.quotas),
        )

    async def EstimateSwarm(
        self, request: orchestrator_pb2.EstimateSwarmRequest, context: Context
    ) -> orchestrator_pb2.EstimateSwarmResponse:
        run = request.request
        spec = self._orchestrator.spec_of(
            idea=run.idea,
            num_agents=run.num_agents,
            model=run.model,
            max_parallel=run.max_parallel,
            answer_max_tokens=run.answer_max_tokens,
            **_economics(run),
        )
        try:
            return self._orchestrator.estimate(spec)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        except OverLimit as error:
            await abort_over_limit(context, error)
