"""The orchestrator's client: AsyncSwarmClient (grpc.aio) and its sync twin SwarmClient.

Both take a target (`host:port`), are context managers, return the protobuf messages of the API
(typed through the generated .pyi) and raise `SwarmError` subclasses instead of grpc errors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import Self

import grpc

from swarm.v1 import events_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from swarm_client._errors import Unavailable, from_rpc_error

DEFAULT_TARGET = "localhost:50051"
SwarmEvent = events_pb2.SwarmEvent
Swarm = orchestrator_pb2.Swarm
SwarmState = orchestrator_pb2.SwarmState
TERMINAL_KINDS = frozenset({"swarm_completed", "swarm_failed", "swarm_cancelled"})


def default_target() -> str:
    return os.environ.get("SWARM_TARGET") or DEFAULT_TARGET


def _run_request(
    idea: str, agents: int, model: str, detach: bool, request_id: str, max_parallel: int
) -> orchestrator_pb2.RunSwarmRequest:
    return orchestrator_pb2.RunSwarmRequest(
        idea=idea,
        num_agents=agents,
        model=model,
        detach=detach,
        request_id=request_id,
        max_parallel=max_parallel,
    )


class AsyncSwarmClient:
    def __init__(self, target: str | None = None, *, timeout: float | None = 30.0) -> None:
        """`timeout` bounds unary calls; streams last as long as their swarm."""
        self.target = target or default_target()
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.target)
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

    async def run(
        self,
        idea: str,
        agents: int,
        *,
        model: str = "",
        detach: bool = False,
        request_id: str = "",
        max_parallel: int = 0,
        call_timeout: float | None = None,
    ) -> AsyncIterator[SwarmEvent]:
        """Starts a swarm and yields its events until the terminal one. Leaving the loop early
        cancels the call, and with it the swarm unless `detach`. `max_parallel` caps the swarm's
        subtasks running at once; `call_timeout` is the call's deadline, which every attempt keeps to."""
        request = _run_request(idea, agents, model, detach, request_id, max_parallel)
        call = self._stub.RunSwarm(request, timeout=call_timeout)
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def watch(self, swarm_id: str, after_sequence: int = 0) -> AsyncIterator[SwarmEvent]:
        """The swarm's events after `after_sequence`, then live ones until the terminal one."""
        call = self._stub.WatchSwarm(
            orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id, after_sequence=after_sequence)
        )
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def get(self, swarm_id: str) -> Swarm:
        try:
            response = await self._stub.GetSwarm(
                orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return response.swarm

    async def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0
    ) -> orchestrator_pb2.ListSwarmsResponse:
        try:
            return await self._stub.ListSwarms(
                orchestrator_pb2.ListSwarmsRequest(page_size=page_size, page_token=page_token, state=state),  # type: ignore[arg-type]
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def cancel(self, swarm_id: str, reason: str = "") -> Swarm:
        try:
            response = await self._stub.CancelSwarm(
                orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id, reason=reason), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return response.swarm


class SwarmClient:
    """The blocking twin of AsyncSwarmClient, for scripts and notebooks."""

    def __init__(
        self, target: str | None = None, *, timeout: float | None = 30.0, channel: grpc.Channel | None = None
    ) -> None:
        """`channel` replaces the one made for `target` (tests pass grpc_testing's fake one); the
        client closes it as it would its own."""
        self.target = target or default_target()
        self.timeout = timeout
        self._channel = channel if channel is not None else grpc.insecure_channel(self.target)
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
    ) -> Generator[SwarmEvent, None, None]:
        request = _run_request(idea, agents, model, detach, request_id, max_parallel)
        call = self._stub.RunSwarm(request, timeout=call_timeout)
        try:
            for response in call:
                yield response.event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def watch(self, swarm_id: str, after_sequence: int = 0) -> Generator[SwarmEvent, None, None]:
        call = self._stub.WatchSwarm(
            orchestrator_pb2.WatchSwarmRequest(swarm_id=swarm_id, after_sequence=after_sequence)
        )
        try:
            for response in call:
                yield response.event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def get(self, swarm_id: str) -> Swarm:
        try:
            return self._stub.GetSwarm(
                orchestrator_pb2.GetSwarmRequest(swarm_id=swarm_id), timeout=self.timeout
            ).swarm
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0
    ) -> orchestrator_pb2.ListSwarmsResponse:
        try:
            return self._stub.ListSwarms(
                orchestrator_pb2.ListSwarmsRequest(page_size=page_size, page_token=page_token, state=state),  # type: ignore[arg-type]
                timeout=self.timeout,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def cancel(self, swarm_id: str, reason: str = "") -> Swarm:
        try:
            return self._stub.CancelSwarm(
                orchestrator_pb2.CancelSwarmRequest(swarm_id=swarm_id, reason=reason), timeout=self.timeout
            ).swarm
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
