"""The console's HTTP face: one page, a small JSON API, and each swarm's events as Server-Sent Events.

The browser gets the same swarm.v1 events as every other client: each SSE message's `data` is the
event in proto3 JSON and its `id` is the event's sequence. When a connection breaks, the browser's
own reconnect sends that id back as `Last-Event-ID`, and the stream goes on through
WatchSwarm(after_sequence): no gap and no duplicate, with no state kept here. Every other route
is one orchestrator RPC, its request and response in proto3 JSON too.

    GET  /, /swarms/{id}             the page (it reads the swarm id from its own address)
    GET  /api/info                   GetOrchestratorInfo
    GET  /api/swarms                 ListSwarms (?state=running&page_size=20&page_token=...)
    POST /api/swarms                 RunSwarm, detached; answers {"swarmId": ...} once accepted
    GET  /api/swarms/{id}            GetSwarm
    GET  /api/swarms/{id}/events     WatchSwarm as SSE (Last-Event-ID, or ?after=N on a first connect)
    POST /api/swarms/{id}/cancel     CancelSwarm
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from swarm.v1 import orchestrator_pb2
from swarm_client import AsyncSwarmClient, InvalidArgument, SwarmError

log = logging.getLogger("swarm.web")

STATIC = Path(__file__).parent / "static"
FINISHED = frozenset(
    {
        orchestrator_pb2.SWARM_STATE_COMPLETED,
        orchestrator_pb2.SWARM_STATE_FAILED,
        orchestrator_pb2.SWARM_STATE_CANCELLED,
    }
)
# How long the browser waits before it reconnects a broken event stream.
RECONNECT_MS = 1000
# A comment line this often keeps idle streams open through proxies that close silent connections.
PING_S = 15
CANCEL_REASON = "cancelled from the web console"
# Model output and ideas are untrusted: the page renders them as text or sanitized Markdown, and
# this policy stops any script or markup that slipped through from running or loading anything.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BadRequest(ValueError):
    """Input the console rejects before any RPC: (field, description) pairs, as INVALID_ARGUMENT has."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.violations = [(field, description)]


def proto_json(message: Message) -> dict[str, Any]:
    """proto3 JSON: lowerCamelCase names, 64-bit integers as strings, as grpcurl and buf curl print."""
    return json_format.MessageToDict(message)


def error_response(message: str, violations: list[tuple[str, str]], status: int) -> JSONResponse:
    body = {"error": message, "violations": [{"field": f, "description": d} for f, d in violations]}
    return JSONResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _client(request: Request) -> AsyncSwarmClient:
    client: AsyncSwarmClient = request.app.state.client
    return client


def _json(message: Message, status: int = 200) -> JSONResponse:
    return JSONResponse(proto_json(message), status_code=status, headers=SECURITY_HEADERS)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


async def info(request: Request) -> Response:
    return _json(await _client(request).info())


async def list_swarms(request: Request) -> Response:
    query = request.query_params
    state_name = query.get("state", "")
    try:
        state = orchestrator_pb2.SwarmState.Value(f"SWARM_STATE_{state_name.upper()}") if state_name else 0
    except ValueError:
        raise BadRequest("state", f"{state_name[:40]!r} is not a swarm state") from None
    page_size = _int_param(query.get("page_size", "0"), "page_size")
    response = await _client(request).list(
        page_size=page_size, page_token=query.get("page_token", ""), state=state
    )
    return _json(response)


async def start_swarm(request: Request) -> Response:
    """RunSwarm, detached: the swarm is the orchestrator's, not this request's, so a closed tab or a
    reload leaves it running. The page then follows it through its events."""
    run = orchestrator_pb2.RunSwarmRequest()
    try:
        json_format.Parse(await request.body(), run)
    except json_format.ParseError as error:
        raise BadRequest("body", f"not a RunSwarmRequest in JSON: {error}") from None
    # The client's run() is an async generator: closing it after the first event cancels the call.
    run_events = _client(request).run(
        run.idea,
        run.num_agents,
        model=run.model,
        detach=True,
        request_id=run.request_id,
        max_parallel=run.max_parallel,
        answer_max_tokens=run.answer_max_tokens,
    )
    async with aclosing(run_events) as events:
        accepted = await anext(events)
    return JSONResponse({"swarmId": accepted.swarm_id}, status_code=201, headers=SECURITY_HEADERS)


async def get_swarm(request: Request) -> Response:
    return _json(await _client(request).get(request.path_params["swarm_id"]))


async def cancel_swarm(request: Request) -> Response:
    return _json(await _client(request).cancel(request.path_params["swarm_id"], CANCEL_REASON))


async def swarm_events(request: Request) -> Response:
    swarm_id = request.path_params["swarm_id"]
    # The browser's reconnect carries Last-Event-ID; a page's first connect says where it stands.
    resume = request.headers.get("last-event-id") or request.query_params.get("after", "0")
    after = _int_param(resume, "after")
    client = _client(request)
    swarm = await client.get(swarm_id)
    if swarm.state in FINISHED and after >= swarm.last_sequence:
        # Nothing will follow; 204 is what makes a browser stop reconnecting.
        return Response(status_code=204, headers=SECURITY_HEADERS)
    return EventSourceResponse(
        _sse(client, swarm_id, after), ping=PING_S, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"}
    )


async def _sse(client: AsyncSwarmClient, swarm_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(retry=RECONNECT_MS)
    try:
        async for event in client.watch(swarm_id, after):
            data = json.dumps(proto_json(event), ensure_ascii=False, separators=(",", ":"))
            yield ServerSentEvent(data=data, id=str(event.sequence))
    except SwarmError as error:
        # The stream ends here and the browser reconnects from its last id (to a restarted
        # orchestrator, say); an error it cannot get past shows on that reconnect.
        log.warning(f"the events of swarm {swarm_id} broke off: {error.code.name}: {error.message}")


def _int_param(text: str, field: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(field, f"{text[:40]!r} is not a whole number") from None
    if value < 0:
        raise BadRequest(field, f"must not be negative, got {value}")
    return value


async def _swarm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SwarmError)
    violations = exc.violations if isinstance(exc, InvalidArgument) else []
    return error_response(exc.message, violations, HTTP_STATUS.get(exc.code, 502))


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return error_response(str(exc), exc.violations, 400)


def create_app(connect: Callable[[], AsyncSwarmClient]) -> Starlette:
    """The ASGI app; `connect` makes its one client of the orchestrator, inside the server's loop."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with connect() as client:
            app.state.client = client
            yield

    routes = [
        Route("/", page),
        Route("/swarms/{swarm_id}", page),
        Route("/api/info", info),
        Route("/api/swarms", list_swarms, methods=["GET"]),
        Route("/api/swarms", start_swarm, methods=["POST"]),
        Route("/api/swarms/{swarm_id}", get_swarm),
        Route("/api/swarms/{swarm_id}/events", swarm_events),
        Route("/api/swarms/{swarm_id}/cancel", cancel_swarm, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={SwarmError: _swarm_error, BadRequest: _bad_request},
    )
