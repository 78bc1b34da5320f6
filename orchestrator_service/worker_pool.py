"""The worker pool: one channel per worker address, capacity learned from each worker, and the pick.

grpc Python cannot host a custom balancing policy, and round_robin spreads calls, not load, so the
pool keeps its own channel per address, re-resolves `dns:///` targets, and gives each subtask to the
reachable worker with the most free capacity. No worker is given more than its capacity; when every
worker is full, `acquire` waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field

import grpc

from swarm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("swarm.orchestrator.pool")

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class NoWorkersAvailable(Exception):
    """No worker could be reached for a while: the swarm cannot make progress."""


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """Where the workers are: a DNS name whose every address is a worker, or a fixed list."""

    addresses: tuple[str, ...] = ()
    dns_host: str = ""
    dns_port: int = 0

    @classmethod
    def parse(cls, target: str) -> PoolTarget:
        target = target.strip()
        if target.startswith("dns:"):
            rest = target.removeprefix("dns:").lstrip("/")
            if "/" in rest:  # dns://authority/host:port: the authority (DNS server) is not supported
                rest = rest.split("/", 1)[1]
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"worker target {target!r} is not dns:///HOST:PORT")
            return cls(dns_host=host.strip("[]"), dns_port=int(port))
        addresses = tuple(part.strip() for part in target.split(",") if part.strip())
        for address in addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"worker address {address!r} is not HOST:PORT")
        if not addresses:
            raise ValueError("the worker target is empty")
        return cls(addresses=addresses)

    async def resolve(self) -> list[str]:
        if not self.dns_host:
            return list(self.addresses)
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.dns_host, self.dns_port, type=socket.SOCK_STREAM
        )
        found: dict[str, None] = {}
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            found[f"[{ip}]:{self.dns_port}" if family == socket.AF_INET6 else f"{ip}:{self.dns_port}"] = None
        return list(found)


@dataclass(eq=False)
class PoolWorker:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceAsyncStub
    worker_id: str = ""
    capacity: int = 0
    in_flight: int = 0
    reachable: bool = False
    removed: bool = False
    last_pick: int = 0
    provider: str = ""
    subtasks_started: int = field(default=0)

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight if self.reachable and not self.removed else 0


class WorkerPool:
    def __init__(
        self,
        target: str,
        *,
        refresh_interval_s: float = 10.0,
        probe_timeout_s: float = 2.0,
        no_worker_timeout_s: float = 30.0,
    ) -> None:
        self.target = PoolTarget.parse(target)
        self.target_text = target
        self.refresh_interval_s = refresh_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.no_worker_timeout_s = no_worker_timeout_s
        self._workers: dict[str, PoolWorker] = {}
        self._changed = asyncio.Condition()
        self._picks = itertools.count(1)
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def workers(self) -> list[PoolWorker]:
        return list(self._workers.values())

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="worker-pool-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(worker.channel.close() for worker in self._workers.values()))
        self._workers.clear()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # a failed refresh must not stop the next one
                log.exception("worker pool refresh failed")

    async def refresh(self) -> None:
        """Re-resolves the target, adds new workers, retires gone ones, re-probes unreachable ones."""
        async with self._refresh_lock:
            try:
                addresses = await self.target.resolve()
            except OSError as error:
                log.warning(f"cannot resolve {self.target_text}: {error}")
                return
            for address in addresses:
                if address not in self._workers:
                    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                    self._workers[address] = PoolWorker(
                        address, channel, worker_pb2_grpc.WorkerServiceStub(channel)
                    )
            for address, worker in list(self._workers.items()):
                if address not in addresses:
                    worker.removed = True
                    del self._workers[address]
                    log.info(
                        "worker left the pool", extra={"address": address, "worker_id": worker.worker_id}
                    )
                    self._spawn(self._close_when_idle(worker))
            await asyncio.gather(*(self._probe(w) for w in self._workers.values() if not w.reachable))
        async with self._changed:
            self._changed.notify_all()

    async def _probe(self, worker: PoolWorker) -> None:
        try:
            info = await worker.stub.GetWorkerInfo(
                worker_pb2.GetWorkerInfoRequest(), timeout=self.probe_timeout_s
            )
        except grpc.aio.AioRpcError as error:
            log.warning(f"worker unreachable: {error.code().name}", extra={"address": worker.address})
            return
        worker.worker_id = info.worker_id or worker.address
        worker.capacity = max(1, info.max_concurrency)
        worker.provider = info.provider
        worker.reachable = True
        log.info(
            f"worker ready: capacity {worker.capacity}, provider {info.provider}",
            extra={"address": worker.address, "worker_id": worker.worker_id},
        )

    async def _close_when_idle(self, worker: PoolWorker) -> None:
        for _ in range(3600):
            if worker.in_flight == 0:
                break
            await asyncio.sleep(1)
        await worker.channel.close()

    def _pick(self, avoid: frozenset[str]) -> PoolWorker | None:
        """The worker with the most free capacity, preferring ones not in `avoid`, then the least
        recently picked, so equal workers take turns."""
        best: PoolWorker | None = None
        best_key: tuple[bool, int, int] | None = None
        for worker in self._workers.values():
            if worker.free <= 0:
                continue
            key = (worker.address not in avoid, worker.free, -worker.last_pick)
            if best_key is None or key > best_key:
                best, best_key = worker, key
        return best

    async def acquire(self, avoid: frozenset[str] = frozenset()) -> PoolWorker:
        """Takes one slot on the best worker, waiting while all are full; `release` gives it back.
        Raises NoWorkersAvailable when no worker has been reachable for `no_worker_timeout_s`."""
        unreachable_since: float | None = None
        async with self._changed:
            while True:
                worker = self._pick(avoid)
                if worker is not None:
                    worker.in_flight += 1
                    worker.subtasks_started += 1
                    worker.last_pick = next(self._picks)
                    return worker
                if any(w.reachable for w in self._workers.values()):
                    unreachable_since = None
                    await self._changed.wait()
                    continue
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.no_worker_timeout_s:
                    raise NoWorkersAvailable(
                        f"no worker reachable at {self.target_text} for {self.no_worker_timeout_s:g}s"
                    )
                self._spawn(self.refresh())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, self.no_worker_timeout_s))

    async def release(self, worker: PoolWorker) -> None:
        worker.in_flight -= 1
        async with self._changed:
            self._changed.notify()

    async def mark_unreachable(self, worker: PoolWorker) -> None:
        """The worker failed a call as if gone: no new work until a probe finds it again."""
        if worker.reachable:
            worker.reachable = False
            log.warning(
                "worker marked unreachable", extra={"address": worker.address, "worker_id": worker.worker_id}
            )
            self._spawn(self.refresh())

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
