"""The orchestrator's client: AsyncSwarmClient (grpc.aio) and its sync twin SwarmClient.

Both take a target (`host:port`), are context managers, return the protobuf messages of the API
(typed through the generated .pyi) and raise `SwarmError` subclasses instead of grpc errors.
`run()` and `watch()` resume a broken stream by themselves (see `_resume`).

A TLS orchestrator is reached with `tls=ClientTls(ca, cert, key)`, and a token is sent with every
call as `authorization: Bearer TOKEN`; both default to the environment, as the target does
(SWARM_CLIENT_TLS_CA ..., SWARM_TOKEN: see `_tls`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import grpc

from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client._errors import SwarmError, Unavailable, from_rpc_error
from swarm_client._resume import (
    DEFAULT_RESUME_WITHIN_S,
    ENDED_EARLY,
    EVENTS_PER_MESSAGE,
    MAX_DELAY_S,
    Reconnecting,
    Resumption,
    events_in,
)
from swarm_client._tls import ClientTls, token_from_environment

DEFAULT_TARGET = "localhost:50051"
SwarmEvent = events_pb2.SwarmEvent
Swarm = orchestrator_pb2.Swarm
SwarmState = orchestrator_pb2.SwarmState
Budget = events_pb2.Budget
Estimate = orchestrator_pb2.EstimateSwarmResponse
OnReconnect = Callable[[Reconnecting], None]
# The words the orchestrator uses when an attached RunSwarm call ends: a run() whose caller leaves
# after its stream was resumed cancels the swarm itself, since the call that would have is gone.
LEFT_REASON = "the client cancelled RunSwarm"
# grpc's own reconnection backoff grows to 120 s by default; a resume attempt made while the
# channel waits out its backoff fails at once, so the channel's wait is kept to the resume schedule's.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", int(MAX_DELAY_S * 1000)),
]
log = logging.getLogger("swarm_client")


def default_target() -> str:
    return os.environ.get("SWARM_TARGET") or DEFAULT_TARGET


def _run_request(
    idea: str,
    agents: int,
    model: str,
    detach: bool,
    request_id: str,
    max_parallel: int,
    answer_max_tokens: int,
    spending: Spending | None = None,
) -> orchestrator_pb2.RunSwarmRequest:
    spending = spending or Spending()
    hedging = {None: "HEDGING_UNSPECIFIED", True: "HEDGING_ON", False: "HEDGING_OFF"}[spending.hedging]
    return orchestrator_pb2.RunSwarmRequest(
        idea=idea,
        num_agents=agents,
        model=model,
        detach=detach,
        request_id=request_id,
        max_parallel=max_parallel,
        answer_max_tokens=answer_max_tokens,
        budget=spending.budget,
        worker_model=spending.worker_model,
        hedging=hedging,  # type: ignore[arg-type]
        hedge_max_extra=spending.hedge_max_extra,
        max_events_per_message=EVENTS_PER_MESSAGE,
    )


@dataclass(frozen=True, slots=True)
class Spending:
    """What a swarm may spend and on what: a hard `budget` (None = none), the model its subtasks run
    on (`worker_model`, "" = the server's), and straggler hedging (None = the server's default;
    `hedge_max_extra` 0 = the server's cap)."""

    budget: Budget | None = None
    worker_model: str = ""
    hedging: bool | None = None
    hedge_max_extra: float = 0.0


def _time_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _not_cancelled(swarm_id: str, error: SwarmError) -> None:
    log.warning(f"swarm {swarm_id} could not be cancelled when its caller left: {error.message}")


class _Connection:
    """What every call of a client carries: the channel's TLS and the token's metadata."""

    def __init__(self, tls: ClientTls | None, token: str | None) -> None:
        self.tls = tls if tls is not None else ClientTls.from_environment()
        token = token if token is not None else token_from_environment()
        self.metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if token else None
        )
        self.errors = functools.partial(from_rpc_error, tls=self.tls, knows_tls=True)

    def options(self) -> list[tuple[str, Any]]:
        return [*CHANNEL_OPTIONS, *(self.tls.options() if self.tls is not None else [])]


class AsyncSwarmClient:
    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = 30.0,
        resume_within_s: float = DEFAULT_RESUME_WITHIN_S,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        """`timeout` bounds unary calls; streams last as long as their swarm. A broken stream of
        run() or watch() is resumed for up to `resume_within_s` (0: not at all). `tls` (None: from
        the environment, else plaintext) and `token` (None: SWARM_TOKEN, else none) are how the
        orchestrator is reached."""
        self.target = target or default_target()
        self.timeout = timeout
        self.resume_within_s = resume_within_s
        self._connection = _Connection(tls, token)
        self._metadata = self._connection.metadata
        if self._connection.tls is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._connection.options())
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, self._connection.tls.credentials(), options=self._connection.options()
            )
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, within_s: float = 10.0) -> None:
        """Waits until the orchestrator accepts connections, or raises Unavailable."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), within_s)
        except TimeoutError:
            raise Unavailable(f"cannot reach the orchestrator at {self.target}") from None

    def run(
        self,
        idea: str,
        agents: int,
        *,
        model: str = "",
        detach: bool = False,
        request_id: str = "",
        max_parallel: int = 0,
        call_timeout: float | None = None,
        answer_max_tokens: int = 0,
        on_reconnect: OnReconnect | None = None,
        spending: Spending | None = None,
    ) -> AsyncGenerator[SwarmEvent, None]:
        """Starts a swarm and yields its events, each once and in order, until the terminal one,
        resuming a broken stream (`on_reconnect` hears of each attempt). Leaving the loop early
        cancels the swarm unless `detach`. `max_parallel` caps the swarm's subtasks running at once;
        `call_timeout` is the call's deadline, which every attempt keeps to; `answer_max_tokens` is
        each subtask's answer budget (0 = the server's); `spending` sets a hard budget, the workers'
        model and hedging.

        The orchestrator cancels an attached swarm whose RunSwarm call breaks, unless it restarted
        (then it goes on detached): a resumed run() reports what happened, often swarm_cancelled.
        `detach=True` lets a swarm outlive a dropped connection."""
        request = _run_request(
            idea, agents, model, detach, request_id, max_parallel, answer_max_tokens, spending
        )
        return self._follow(
            lambda timeout: self._stub.RunSwarm(request, timeout=timeout, metadata=self._metadata),
            Resumption("", 0, self.resume_within_s, attached=not detach, errors=self._connection.errors),
            call_timeout=call_timeout,
            on_reconnect=on_reconnect,
        )

    def watch(
        self, swarm_id: str, after_sequence: int = 0, *, on_reconnect: OnReconnect | None = None
    ) -> AsyncGenerator[SwarmEvent, None]:
        """The swarm's events after `after_sequence`, then live ones until the terminal one (none
        when the swarm had ended by `after_sequence`), resuming a broken stream as run() does."""
        place = Resumption(swarm_id, after_sequence, self.resume_within_s, errors=self._connection.errors)
        return self._follow(
            lambda timeout: self._stub.WatchSwarm(
                place.watch_request(), timeout=timeout, metadata=self._metadata
            ),
            place,
            call_timeout=None,
            on_reconnect=on_reconnect,
        )

    async def _follow(
        self,
        open_call: Callable[[float | None], grpc.aio.UnaryStreamCall[Any, Any]],
        place: Resumption,
        *,
        call_timeout: float | None,
        on_reconnect: OnReconnect | None,
    ) -> AsyncGenerator[SwarmEvent, None]:
        """The events of `open_call`'s stream, then of each WatchSwarm that resumes it, as `place`
        decides; the caller's leaving is caught to cancel what it must."""
        deadline = None if call_timeout is None else time.monotonic() + call_timeout
        call = open_call(call_timeout)
        try:
            while True:
                try:
                    async for response in call:
                        for event in events_in(response):
                            if place.admit(event):
                                yield event
                                if place.ended:
                                    return
                    if not place.can_resume() or place.has_all_of(await self.get(place.swarm_id)):
                        return
                    cause = ENDED_EARLY
                except grpc.aio.AioRpcError as error:
                    cause = place.cause_of(error)
                except Unavailable as error:  # the GetSwarm above
                    cause = error.message
                finally:
                    call.cancel()
                attempt = place.broke(cause)
                if on_reconnect is not None:
                    on_reconnect(attempt)
                await asyncio.sleep(attempt.delay_s)
                call = self._stub.WatchSwarm(
                    place.watch_request(), timeout=_time_left(deadline), metadata=self._metadata
                )
        except (GeneratorExit, asyncio.CancelledError):
            if place.cancels_on_leave():
                try:
                    await self.cancel(place.swarm_id, LEFT_REASON)
                except SwarmError as error:
                    _not_cancelled(place.swarm_id, error)
            raise

    async def get(self, swarm_id: str) -> Swarm:
        try:
            response = await self._stub.GetSwarm(
                orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise self._connection.errors(error) from None
        return response.swarm

    async def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0
    ) -> orchestrator_pb2.ListSwarmsResponse:
        try:
            return await self._stub.ListSwarms(
                orchestrator_pb2.ListSwarmsRequest(page_size=page_size, page_token=page_token, state=state),  # type: ignore[arg-type]
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise self._connection.errors(error) from None

    async def cancel(self, swarm_id: str, reason: str = "") -> Swarm:
        try:
            response = await self._stub.CancelSwarm(
                orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id, reason=reason),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise self._connection.errors(error) from None
        return response.swarm

    async def estimate(
        self,
        idea: str,
        agents: int,
        *,
        model: str = "",
        answer_max_tokens: int = 0,
        spending: Spending | None = None,
    ) -> Estimate:
        """What the swarm would use and cost, as a range, without starting it (EstimateSwarm)."""
        run = _run_request(idea, agents, model, False, "", 0, answer_max_tokens, spending)
        try:
            return await self._stub.EstimateSwarm(
                orchestrator_pb2.EstimateSwarmRequest(request=run),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def info(self) -> orchestrator_pb2.GetOrchestratorInfoResponse:
        """What the orchestrator accepts (its largest num_agents, say) and its default model."""
        try:
            return await self._stub.GetOrchestratorInfo(
                orchestrator_pb2.GetOrchestratorInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise self._connection.errors(error) from None


class SwarmClient:
    """The blocking twin of AsyncSwarmClient, for scripts and notebooks."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = 30.0,
        resume_within_s: float = DEFAULT_RESUME_WITHIN_S,
        channel: grpc.Channel | None = None,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        """`channel` replaces the one made for `target` (tests pass grpc_testing's fake one); the
        client closes it as it would its own. `tls` and `token` as for AsyncSwarmClient."""
        self.target = target or default_target()
        self.timeout = timeout
        self.resume_within_s = resume_within_s
        self._connection = _Connection(tls, token)
        self._metadata = self._connection.metadata
        if channel is not None:
            self._channel = channel
        elif self._connection.tls is None:
            self._channel = grpc.insecure_channel(self.target, options=self._connection.options())
        else:
            self._channel = grpc.secure_channel(
                self.target, self._connection.tls.credentials(), options=self._connection.options()
            )
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, within_s: float = 10.0) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=within_s)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"cannot reach the orchestrator at {self.target}") from None

    def run(
        self,
        idea: str,
        agents: int,
        *,
        model: str = "",
        detach: bool = False,
        request_id: str = "",
        max_parallel: int = 0,
        call_timeout: float | None = None,
        answer_max_tokens: int = 0,
        on_reconnect: OnReconnect | None = None,
        spending: Spending | None = None,
    ) -> Generator[SwarmEvent, None, None]:
        """As AsyncSwarmClient.run(); Ctrl-C (KeyboardInterrupt) counts as the caller leaving."""
        request = _run_request(
            idea, agents, model, detach, request_id, max_parallel, answer_max_tokens, spending
        )
        return self._follow(
            lambda timeout: self._stub.RunSwarm(request, timeout=timeout, metadata=self._metadata),
            Resumption("", 0, self.resume_within_s, attached=not detach, errors=self._connection.errors),
            call_timeout=call_timeout,
            on_reconnect=on_reconnect,
        )

    def watch(
        self, swarm_id: str, after_sequence: int = 0, *, on_reconnect: OnReconnect | None = None
    ) -> Generator[SwarmEvent, None, None]:
        place = Resumption(swarm_id, after_sequence, self.resume_within_s, errors=self._connection.errors)
        return self._follow(
            lambda timeout: self._stub.WatchSwarm(
                place.watch_request(), timeout=timeout, metadata=self._metadata
            ),
            place,
            call_timeout=None,
            on_reconnect=on_reconnect,
        )

    def _follow(
        self,
        open_call: Callable[[float | None], Any],
        place: Resumption,
        *,
        call_timeout: float | None,
        on_reconnect: OnReconnect | None,
    ) -> Generator[SwarmEvent, None, None]:
        """The sync twin of AsyncSwarmClient._follow, line for line."""
        deadline = None if call_timeout is None else time.monotonic() + call_timeout
        call = open_call(call_timeout)
        try:
            while True:
                try:
                    for response in call:
                        for event in events_in(response):
                            if place.admit(event):
                                yield event
                                if place.ended:
                                    return
                    if not place.can_resume() or place.has_all_of(self.get(place.swarm_id)):
                        return
                    cause = ENDED_EARLY
                except grpc.RpcError as error:
                    # A sync call is its own exception, and its traceback holds this frame, whose
                    # locals hold the calls after it: they were freed only by the garbage collector.
                    # At interpreter exit that could hang for good: the collector, in the last
                    # call's __del__, waited for the call's lock, which grpc's channel thread held
                    # when the exit stopped it.
                    error.__traceback__ = None
                    cause = place.cause_of(error)
                except Unavailable as error:  # the GetSwarm above
                    cause = error.message
                finally:
                    call.cancel()
                attempt = place.broke(cause)
                if on_reconnect is not None:
                    on_reconnect(attempt)
                time.sleep(attempt.delay_s)
                call = self._stub.WatchSwarm(
                    place.watch_request(), timeout=_time_left(deadline), metadata=self._metadata
                )
        except (GeneratorExit, KeyboardInterrupt):
            if place.cancels_on_leave():
                try:
                    self.cancel(place.swarm_id, LEFT_REASON)
                except SwarmError as error:
                    _not_cancelled(place.swarm_id, error)
            raise

    def get(self, swarm_id: str) -> Swarm:
        try:
            return self._stub.GetSwarm(
                orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id),
                timeout=self.timeout,
                metadata=self._metadata,
            ).swarm
        except grpc.RpcError as error:
            raise self._connection.errors(error) from None

    def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0
    ) -> orchestrator_pb2.ListSwarmsResponse:
        try:
            return self._stub.ListSwarms(
                orchestrator_pb2.ListSwarmsRequest(page_size=page_size, page_token=page_token, state=state),  # type: ignore[arg-type]
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise self._connection.errors(error) from None

    def cancel(self, swarm_id: str, reason: str = "") -> Swarm:
        try:
            return self._stub.CancelSwarm(
                orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id, reason=reason),
                timeout=self.timeout,
                metadata=self._metadata,
            ).swarm
        except grpc.RpcError as error:
            raise self._connection.errors(error) from None

    def estimate(
        self,
        idea: str,
        agents: int,
        *,
        model: str = "",
        answer_max_tokens: int = 0,
        spending: Spending | None = None,
    ) -> Estimate:
        """As AsyncSwarmClient.estimate()."""
        run = _run_request(idea, agents, model, False, "", 0, answer_max_tokens, spending)
        try:
            return self._stub.EstimateSwarm(
                orchestrator_pb2.EstimateSwarmRequest(request=run),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def info(self) -> orchestrator_pb2.GetOrchestratorInfoResponse:
        try:
            return self._stub.GetOrchestratorInfo(
                orchestrator_pb2.GetOrchestratorInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._connection.errors(error) from None
