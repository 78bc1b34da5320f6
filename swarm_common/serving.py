"""Serving and shutdown, the same for both services: health, reflection, bind, signals, grace."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from swarm_common.config import split_host_port

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class Service:
    """One running gRPC server with health and reflection, stopped by SIGTERM/SIGINT or `stop()`."""

    def __init__(
        self,
        *,
        name: str,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        listen: str,
        log: logging.Logger,
    ) -> None:
        self.name = name
        self.log = log
        self.health = health.aio.HealthServicer()
        self._service_names = list(service_names)
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        host, port = split_host_port(listen, "listen address")
        host = host or "0.0.0.0"  # no host: every interface
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            # grpc raises (RuntimeError) for a port in use or an address it cannot bind; older
            # releases returned 0.
            self.port = self._server.add_insecure_port(bind)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError("the port is in use, or the address is not this machine's")
        self.address = f"{host}:{self.port}"
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        # Signals are handled before `listening on` is printed: whoever waits for that line may
        # send SIGTERM at once.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._server.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.log.info(f"{self.name} listening on {self.address}", extra={"address": self.address})

    def stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self, *, drain: Callable[[], Awaitable[None]], stop_grace_s: float) -> None:
        """Serves until a signal or `stop()`. Then: NOT_SERVING, so callers route elsewhere; `drain`,
        which lets the service's own work finish within its grace; and a server stop whose short
        grace flushes the last messages and cuts long-lived streams such as health watches."""
        try:
            await self._stopping.wait()
            self.log.info(f"{self.name} shutting down")
            await self.health.enter_graceful_shutdown()
            await drain()
        finally:
            await self._server.stop(stop_grace_s)
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().remove_signal_handler(sig)
            self.log.info(f"{self.name} stopped")
