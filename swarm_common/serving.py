"""Serving and shutdown, the same for both services: health, reflection, bind, signals, grace."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from swarm_common.call_guard import CallGuard
from swarm_common.config import split_host_port
from swarm_common.tls import ServerTls

# Allocations of container objects between two collections of the youngest generation. Python's
# default (700) is reached every few events here: a swarm's events, messages and tasks are many,
# short-lived and almost never in cycles, so a collection found little and cost the dispatch
# benchmark about 5% of its throughput.
YOUNG_COLLECTION_EVERY = 50_000


def tune_collector() -> None:
    """Before serving: what the process made to start is out of every later collection's way, and
    young collections are rarer."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


@dataclass(frozen=True, slots=True)
class CallLimits:
    """What one connection and one call may hold of a server, the same for both services."""

    # HTTP/2 streams one connection may have open at once; beyond, the stream is refused (a gRPC
    # client gets UNAVAILABLE: it does not queue them).
    max_streams_per_connection: int = 1000
    # Seconds a streamed reply may wait for a caller that does not read before the call ends.
    stream_write_timeout_s: float = 30.0
    # A ping after this many seconds of quiet, and a peer that does not answer it within the
    # timeout is gone: its connection and calls end, also when it vanished without a reset.
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 20.0
    # The largest request message, and the most request metadata (headers: a token among them),
    # a call may bring; beyond, it is refused RESOURCE_EXHAUSTED before any handler sees it.
    max_message_bytes: int = 4 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    # Whether grpc may grow a connection's and a stream's receive windows past their first 64 KiB
    # (by BDP probing, which doubles them while a sender keeps them full). A server whose handler
    # stops reading a request stream to hold its sender back needs them fixed: grown, they let one
    # sender into a shut stream park 16 MB and more in the server's memory before it was held.
    grow_receive_window: bool = True

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.http2.bdp_probe", int(self.grow_receive_window)),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", self.max_metadata_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # What grpc 1.85 waits for a ping's answer is this one (its default is a minute), not
            # the keepalive timeout: measured, a silent peer was dropped after 1 s with it set to
            # 1000, and never within 8 s without.
            ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Pings go on while a stream is quiet (a watcher of a swarm that is planning).
            ("grpc.http2.max_pings_without_data", 0),
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
        limits: CallLimits | None = None,
        tls: ServerTls | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`tls`: serve TLS only (mTLS when it has a client CA). `interceptors` come before the call
        guard, the first outermost: authentication answers a call before anything reads it."""
        self.name = name
        self.log = log
        self.health = health.aio.HealthServicer()
        self._service_names = list(service_names)
        limits = limits or CallLimits()
        self._server = grpc.aio.server(
            options=limits.options(),
            interceptors=[*interceptors, CallGuard(write_timeout_s=limits.stream_write_timeout_s, log=log)],
        )
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
            if tls is None:
                self.port = self._server.add_insecure_port(bind)
            else:
                self.port = self._server.add_secure_port(bind, tls.credentials())
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError("the port is in use, or the address is not this machine's")
        self.address = f"{host}:{self.port}"
        self.security = (
            "plaintext" if tls is None else "mTLS: client certificates required" if tls.mutual else "TLS"
        )
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
        self.log.info(
            f"{self.name} listening on {self.address} ({self.security})", extra={"address": self.address}
        )

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
