"""The worker pool: which workers exist, which may take work, and who gets the next free slot.

grpc Python cannot host a custom balancing policy, and round_robin spreads calls, not load, so the
pool keeps one channel per worker address and decides itself:

- **Discovery.** `dns:///name:port` is re-resolved every `refresh_interval_s` (every address is a
  worker); `dns://SERVER/name:port` asks that DNS server; `host:port,host:port` is a fixed list.
  A worker whose address vanishes gets no new work, but stays until its running subtasks end, so
  if the address comes back meanwhile their slots are still counted.
- **Eligibility.** Each worker is watched over grpc.health.v1 `Watch`: NOT_SERVING (draining) or a
  broken watch (gone) takes it out at once. A worker whose call hung or failed as if gone is out
  until a probe (`GetWorkerInfo`) answers again.
- **Capacity.** A worker's capacity is its own `--max-concurrency`, learned from `GetWorkerInfo`.
  Orchestrator replicas that share the workers (and a database) each take an even share of it, at
  least one slot (`share_with`). No worker is given more than that; the pick is the eligible worker with the most free slots. A
  cancelled subtask's slot is free once the worker says so, not when the cancel is sent.
- **Fairness.** Waiting subtasks queue per swarm, and swarms per tenant. Each free slot goes to
  the next tenant in round-robin order, and within it to that tenant's next swarm, so one tenant's
  big swarms cannot starve another's, and a small swarm is not stuck behind a big one. A swarm may
  cap how many of its subtasks hold slots at once.
- **TLS.** With TLS files, every worker is called over TLS (mTLS when they hold a client
  certificate), its certificate checked for the host the target names, whatever address it has. A
  worker that cannot be reached after the files were renewed gets a new channel, with the renewed
  certificate: an expired one no longer fails every reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from orchestrator_service.worker_session import CANCEL_TIMEOUT_S, WorkerSession
from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common import telemetry
from swarm_common.config import split_host_port
from swarm_common.tls import ClientTls, explain_tls_failure

log = logging.getLogger("swarm.orchestrator.pool")

WORKER_SERVICE = "swarm.v1.WorkerService"
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]
MAX_WATCH_BACKOFF_S = 5.0


class NoWorkersAvailable(Exception):
    """No worker could take work for a while: the swarm cannot make progress."""


def _host_port(text: str, what: str) -> tuple[str, int]:
    """A worker's address needs a host: there is no "every interface" to call."""
    host, port = split_host_port(text, what)
    if not host:
        raise ValueError(f"{what} {text!r} has no host")
    return host, port


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """Where the workers are: a DNS name whose every address is a worker, or a fixed list."""

    addresses: tuple[str, ...] = ()
    dns_host: str = ""
    dns_port: int = 0
    # host:port of the DNS server to ask; empty = the system resolver.
    dns_server: str = ""

    @classmethod
    def parse(cls, target: str) -> PoolTarget:
        target = target.strip()
        if target.startswith("dns:"):
            rest = target.removeprefix("dns:")
            server = ""
            if rest.startswith("//"):
                server, _, rest = rest[2:].partition("/")
            host, port = _host_port(rest, "worker target")
            if server:
                server_host, _, server_port = server.partition(":")
                server = f"{server_host}:{server_port or 53}"
            return cls(dns_host=host, dns_port=port, dns_server=server)
        addresses = tuple(part.strip() for part in target.split(",") if part.strip())
        if not addresses:
            raise ValueError("the worker target is empty")
        for address in addresses:
            _host_port(address, "worker address")
        return cls(addresses=addresses)

    @property
    def server_name(self) -> str:
        """The name a worker's certificate must carry: the target's DNS name. The addresses it
        resolves to change with every pod; the name does not."""
        return self.dns_host

    async def resolve(self) -> list[str]:
        if not self.dns_host:
            return list(self.addresses)
        if self.dns_server:
            return await self._resolve_with_server()
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.dns_host, self.dns_port, type=socket.SOCK_STREAM
        )
        found: dict[str, None] = {}
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            found[f"[{ip}]:{self.dns_port}" if family == socket.AF_INET6 else f"{ip}:{self.dns_port}"] = None
        return list(found)

    async def _resolve_with_server(self) -> list[str]:
        server, _, port = self.dns_server.partition(":")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server]
        resolver.port = int(port)
        try:
            answer = await resolver.resolve(self.dns_host, "A", lifetime=5.0)
        except dns.exception.DNSException as error:
            raise OSError(f"DNS lookup of {self.dns_host} at {self.dns_server} failed: {error}") from None
        return sorted({f"{record.address}:{self.dns_port}" for record in answer})


@dataclass(eq=False)
class PoolWorker:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceAsyncStub
    session: WorkerSession
    worker_id: str = ""
    capacity: int = 0
    # Orchestrators sending work to this worker, this one included: each uses its share of capacity.
    orchestrators: int = 1
    in_flight: int = 0
    # From the health watch: False while the worker drains.
    serving: bool = False
    # False after a failed probe, a broken watch, or a call that failed as if the worker were gone.
    reachable: bool = False
    removed: bool = False
    last_pick: int = 0
    provider: str = ""
    # It takes a swarm's plan once per stream; one that predates that is sent each start's plan.
    plan_contexts: bool = False
    watcher: asyncio.Task[None] | None = None
    # The reading of the TLS files its channel was made with.
    tls_version: int = 0

    @property
    def eligible(self) -> bool:
        return self.serving and self.reachable and not self.removed and self.capacity > 0

    @property
    def free(self) -> int:
        """Slots neither held by an attempt nor still held on the worker by a cancelled subtask."""
        share = max(1, self.capacity // self.orchestrators)
        return share - self.in_flight - self.session.stopping if self.eligible else 0


@dataclass(eq=False)
class _Waiter:
    swarm_id: str
    avoid: frozenset[str]
    granted: asyncio.Future[PoolWorker]


@dataclass
class _SwarmShare:
    """A swarm's place in the dispatcher: its tenant, its queue, its slots in use and its cap (0 =
    none)."""

    tenant: str
    queue: deque[_Waiter] = field(default_factory=deque)
    running: int = 0
    max_parallel: int = 0


class WorkerPool:
    def __init__(
        self,
        target: str,
        *,
        refresh_interval_s: float = 10.0,
        probe_timeout_s: float = 2.0,
        no_worker_timeout_s: float = 30.0,
        cancel_timeout_s: float = CANCEL_TIMEOUT_S,
        tls: ClientTls | None = None,
    ) -> None:
        """`tls`: call the workers over TLS with these files (None = plaintext)."""
        self.target = PoolTarget.parse(target)
        self.tls = tls
        self.target_text = target
        self.refresh_interval_s = refresh_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.no_worker_timeout_s = no_worker_timeout_s
        # Longest a cancelled subtask's slot is held for the worker to say the subtask is over.
        self.cancel_timeout_s = cancel_timeout_s
        self._workers: dict[str, PoolWorker] = {}
        self._orchestrators = 1
        self._shares: dict[str, _SwarmShare] = {}
        # The round-robin order, tenants first, then each tenant's swarms (insertion order: one
        # that was just served moves to the end).
        self._rounds: dict[str, dict[str, None]] = {}
        self._picks = itertools.count(1)
        self._refresher: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._none_eligible_since: float | None = time.monotonic()
        self._some_eligible = asyncio.Event()
        # Subtasks waiting for a slot (cancelled waiters left in a queue are not counted).
        self.queued = 0
        _POOLS.add(self)

    @property
    def workers(self) -> list[PoolWorker]:
        return list(self._workers.values())

    def tally(self, figure: Callable[[PoolWorker], float]) -> float:
        """`figure` summed over the workers; safe from the metrics thread (one copy of the list)."""
        return float(sum(figure(worker) for worker in list(self._workers.values())))

    # ---- discovery and health -------------------------------------------------------------

    async def start(self) -> None:
        """Resolves the target and waits (up to a probe timeout) for a first worker to be ready."""
        await self.refresh()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._some_eligible.wait(), self.probe_timeout_s)
        self._refresher = asyncio.create_task(self._refresh_forever(), name="worker-pool-refresh")

    async def close(self) -> None:
        tasks = [
            self._refresher,
            self._refreshing,
            *self._background,
            *(w.watcher for w in self._workers.values()),
        ]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        await asyncio.gather(*(worker.session.close() for worker in self._workers.values()))
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
        """Re-resolves the target: new addresses join the pool, vanished ones leave it."""
        await asyncio.shield(self._refresh_in_flight())

    def _refresh_in_flight(self) -> asyncio.Task[None]:
        """The refresh under way, started if there is none. Everyone who wants one shares it, so
        while a DNS server is slow to answer, lookups do not queue up behind it."""
        if self._refreshing is None or self._refreshing.done():
            # A context of its own: the subtask that asked for it is not what its logs are about.
            self._refreshing = asyncio.create_task(
                self._resolve(), name="worker-pool-resolve", context=contextvars.Context()
            )
        return self._refreshing

    async def _resolve(self) -> None:
        try:
            addresses = await self.target.resolve()
        except OSError as error:
            log.warning(f"cannot resolve {self.target_text}: {error}")
            return
        for address in addresses:
            worker = self._workers.get(address)
            if worker is None:
                self._add(address)
            elif worker.removed:
                self._rejoin(worker)
        for worker in [w for w in self._workers.values() if w.address not in addresses and not w.removed]:
            self._remove(worker)
        self._changed()

    def _connect(
        self, address: str
    ) -> tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerServiceAsyncStub, WorkerSession, int]:
        """A channel to the worker, with the TLS files as they are now, and what is made on it."""
        if self.tls is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            version = 0
        else:
            name = self.target.server_name
            options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", name)] if name else [])]
            channel = grpc.aio.secure_channel(address, self.tls.credentials(), options=options)
            version = self.tls.version
        stub: worker_pb2_grpc.WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channel)
        session = WorkerSession(stub, on_slot_freed=self._dispatch, cancel_timeout_s=self.cancel_timeout_s)
        return channel, stub, session, version

    def _add(self, address: str) -> None:
        channel, stub, session, version = self._connect(address)
        worker = PoolWorker(
            address, channel, stub, session, tls_version=version, orchestrators=self._orchestrators
        )
        worker.watcher = asyncio.create_task(self._watch(worker), name=f"watch-{address}")
        self._workers[address] = worker
        log.info("worker joined the pool", extra={"address": address})

    async def _renew_channel(self, worker: PoolWorker) -> None:
        """A new channel with the renewed TLS files, for a worker that holds no subtask."""
        old_channel, old_session = worker.channel, worker.session
        worker.channel, worker.stub, worker.session, worker.tls_version = self._connect(worker.address)
        log.info("a new channel to the worker, with the renewed TLS files", extra={"address": worker.address})
        await old_session.close()
        await old_channel.close()

    def _remove(self, worker: PoolWorker) -> None:
        """No new work for the worker. It stays in the pool, holding its slots, until its running
        subtasks are done, so that if its address comes back they are still counted."""
        worker.removed = True
        if worker.watcher is not None:
            worker.watcher.cancel()
        log.info("worker left the pool", extra={"address": worker.address, "worker_id": worker.worker_id})
        if worker.in_flight == 0:
            self._retire(worker)

    def _rejoin(self, worker: PoolWorker) -> None:
        """The address came back while the worker still ran subtasks: the same worker, slots and
        all, eligible again once a probe answers."""
        worker.removed = False
        worker.serving = worker.reachable = False
        worker.watcher = asyncio.create_task(self._watch(worker), name=f"watch-{worker.address}")
        log.info("worker rejoined the pool", extra={"address": worker.address, "worker_id": worker.worker_id})

    def _retire(self, worker: PoolWorker) -> None:
        del self._workers[worker.address]
        self._spawn(self._close(worker))

    async def _watch(self, worker: PoolWorker) -> None:
        """Probe, then follow the worker's health until the watch breaks; then again, with backoff."""
        backoff = 0.25
        while not worker.removed:
            health = health_pb2_grpc.HealthStub(worker.channel)
            try:
                info = await worker.stub.GetWorkerInfo(
                    worker_pb2.GetWorkerInfoRequest(), timeout=self.probe_timeout_s
                )
                self._learn(worker, info)
                backoff = 0.25
                async for status in health.Watch(health_pb2.HealthCheckRequest(service=WORKER_SERVICE)):
                    serving = status.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != worker.serving:
                        worker.serving = serving
                        log.info(
                            "worker serving" if serving else "worker draining: no new work",
                            extra={"address": worker.address, "worker_id": worker.worker_id},
                        )
                        self._changed()
            except grpc.aio.AioRpcError as error:
                tls = (
                    explain_tls_failure(error.details() or "", client_certificate=self.tls.client_certificate)
                    if self.tls is not None
                    else None
                )
                if worker.reachable or (tls and not worker.capacity and backoff == 0.25):
                    log.warning(
                        f"worker unreachable: {error.code().name}" + (f": TLS: {tls}" if tls else ""),
                        extra={"address": worker.address, "worker_id": worker.worker_id},
                    )
            worker.serving = worker.reachable = False
            self._changed()
            await asyncio.sleep(backoff)
            backoff = min(MAX_WATCH_BACKOFF_S, backoff * 2)
            if self.tls is not None and worker.in_flight == 0 and not worker.session.stopping:
                self.tls.credentials()  # looks at the files
                if self.tls.version != worker.tls_version:
                    await self._renew_channel(worker)

    def share_with(self, orchestrators: int) -> None:
        """`orchestrators` (this one included) send work to these workers: each takes an even share
        of every worker's capacity, so that together they do not pass it. A worker refuses what
        would (`worker_busy`); the subtask tries again, and the refusal costs it no attempt."""
        orchestrators = max(1, orchestrators)
        if orchestrators == self._orchestrators:
            return
        log.info(f"each worker's capacity is shared by {orchestrators} orchestrator(s)")
        self._orchestrators = orchestrators
        for worker in self._workers.values():
            worker.orchestrators = orchestrators
        self._changed()

    def _learn(self, worker: PoolWorker, info: worker_pb2.GetWorkerInfoResponse) -> None:
        first = not worker.capacity
        worker.worker_id = info.worker_id or worker.address
        worker.capacity = max(1, info.max_concurrency)
        worker.provider = info.provider
        worker.plan_contexts = info.plan_contexts
        worker.reachable = True
        if first:
            log.info(
                f"worker ready: capacity {worker.capacity}, provider {info.provider}",
                extra={"address": worker.address, "worker_id": worker.worker_id},
            )
        self._changed()

    def mark_unreachable(self, worker: PoolWorker) -> None:
        """The worker failed a call as if gone, or hung: no new work until a probe answers again."""
        if worker.removed or not worker.reachable:
            return
        worker.reachable = False
        log.warning(
            "worker taken out until it answers a probe",
            extra={"address": worker.address, "worker_id": worker.worker_id},
        )
        if worker.watcher is not None:
            worker.watcher.cancel()  # its health stream may look fine while the process hangs
        worker.watcher = asyncio.create_task(
            self._watch(worker), name=f"watch-{worker.address}", context=contextvars.Context()
        )
        # Its subtasks stream is as stuck as the worker: end it, so they fail over now, not each
        # after its own silence.
        self._spawn(worker.session.close())
        self._changed()

    @staticmethod
    async def _close(worker: PoolWorker) -> None:
        await worker.session.close()
        await worker.channel.close()

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- the fair dispatcher --------------------------------------------------------------

    def _changed(self) -> None:
        """Capacity or eligibility changed: hand out what is free, and note when nothing is."""
        if any(w.eligible for w in self._workers.values()):
            self._none_eligible_since = None
            self._some_eligible.set()
        else:
            self._some_eligible.clear()
            if self._none_eligible_since is None:
                self._none_eligible_since = time.monotonic()
        self._dispatch()

    def _pick(self, avoid: frozenset[str]) -> PoolWorker | None:
        """The eligible worker with the most free slots, preferring ones not in `avoid` (where the
        subtask already failed), then the least recently picked, so equal workers take turns."""
        best: PoolWorker | None = None
        best_key: tuple[bool, int, int] | None = None
        for worker in self._workers.values():
            if worker.free <= 0:
                continue
            key = (worker.address not in avoid, worker.free, -worker.last_pick)
            if best_key is None or key > best_key:
                best, best_key = worker, key
        return best

    def _dispatch(self) -> None:
        """Each pass gives at most one slot to each waiting tenant, in round-robin order, and
        within a tenant to its swarms in round-robin order."""
        while True:
            granted = False
            for tenant in list(self._rounds):
                served = self._serve_one(tenant)
                if served is None:
                    return  # no worker has a free slot
                granted = granted or served
            if not granted:
                return

    def _serve_one(self, tenant: str) -> bool | None:
        """Gives one slot to the tenant's next swarm that waits and may take one: True when it did,
        False when none could, None when a swarm waits but no worker has room."""
        swarms = self._rounds[tenant]
        try:
            for swarm_id in list(swarms):
                share = self._shares[swarm_id]
                while share.queue and share.queue[0].granted.done():  # cancelled while waiting
                    share.queue.popleft()
                if not share.queue:
                    if share.running == 0:
                        del self._shares[swarm_id], swarms[swarm_id]
                    continue
                if share.max_parallel and share.running >= share.max_parallel:
                    continue
                worker = self._pick(share.queue[0].avoid)
                if worker is None:
                    return None
                waiter = share.queue.popleft()
                self.queued -= 1
                worker.in_flight += 1
                worker.last_pick = next(self._picks)
                share.running += 1
                waiter.granted.set_result(worker)
                swarms[swarm_id] = swarms.pop(swarm_id)  # to the back of the tenant's round
                self._rounds[tenant] = self._rounds.pop(tenant)  # the tenant to the back of its round
                return True
            return False
        finally:
            if not swarms:
                self._rounds.pop(tenant, None)

    async def acquire(
        self, swarm_id: str, *, avoid: frozenset[str] = frozenset(), max_parallel: int = 0, tenant: str = ""
    ) -> PoolWorker:
        """Waits for a slot on a worker and takes it for the tenant's swarm; `release` gives it back.
        Raises NoWorkersAvailable when no worker has been able to take work for
        `no_worker_timeout_s`."""
        share = self._shares.get(swarm_id)
        if share is None:
            share = self._shares[swarm_id] = _SwarmShare(tenant)
            self._rounds.setdefault(tenant, {})[swarm_id] = None
        share.max_parallel = max_parallel
        waiter = _Waiter(swarm_id, avoid, asyncio.get_running_loop().create_future())
        share.queue.append(waiter)
        self.queued += 1
        self._dispatch()
        if waiter.granted.done():  # a slot was free: no waiting at all
            return waiter.granted.result()
        try:
            while True:
                done, _ = await asyncio.wait({waiter.granted}, timeout=1.0)
                if done:
                    return waiter.granted.result()
                since = self._none_eligible_since
                if since is not None and time.monotonic() - since >= self.no_worker_timeout_s:
                    waiter.granted.cancel()
                    self.queued -= 1
                    # The target (addresses inside the cluster) goes to the log, not into the swarm's
                    # events, which anyone who may read the swarm sees.
                    log.warning(
                        f"no worker could take work at {self.target_text}", extra={"swarm_id": swarm_id}
                    )
                    raise NoWorkersAvailable(f"no worker could take work for {self.no_worker_timeout_s:g}s")
                if since is not None:
                    self._refresh_in_flight()
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(waiter.granted.result(), swarm_id)
            else:
                waiter.granted.cancel()
                self.queued -= 1
            raise

    def release(self, worker: PoolWorker, swarm_id: str) -> None:
        worker.in_flight -= 1
        if worker.removed and worker.in_flight == 0:
            self._retire(worker)
        share = self._shares.get(swarm_id)
        if share is not None:
            share.running -= 1
        self._dispatch()


# The pools' figures, read when Prometheus scrapes (see telemetry.Census).
_POOLS: telemetry.Census[WorkerPool] = telemetry.Census()
QUEUED = Gauge(
    "swarm_subtasks_queued",
    "Subtasks waiting for a worker slot: the backlog, and the autoscaling signal",
)
QUEUED.set_function(lambda: _POOLS.total(lambda pool: pool.queued))
RUNNING = Gauge("swarm_subtasks_running", "Subtasks holding a worker slot")
RUNNING.set_function(lambda: _POOLS.total(lambda pool: pool.tally(lambda w: w.in_flight)))
SLOTS = Gauge(
    "swarm_worker_slots",
    "Worker slots as the orchestrator sees them: busy (held by a subtask, or by a cancelled one "
    "until its worker frees it) and free (on workers that may take work)",
    ["state"],
)
SLOTS.labels("busy").set_function(
    lambda: _POOLS.total(lambda pool: pool.tally(lambda w: w.in_flight + w.session.stopping))
)
SLOTS.labels("free").set_function(lambda: _POOLS.total(lambda pool: pool.tally(lambda w: w.free)))
WORKERS = Gauge(
    "swarm_workers",
    "Workers in the pool by state: ready (takes work), draining (NOT_SERVING), unreachable (not "
    "answering, or not yet probed), leaving (its address is gone; its subtasks run on)",
    ["state"],
)


def _worker_state(worker: PoolWorker) -> str:
    if worker.removed:
        return "leaving"
    if worker.eligible:
        return "ready"
    return "draining" if worker.reachable else "unreachable"


def _workers_in(state: str) -> Callable[[], float]:
    return lambda: _POOLS.total(lambda pool: pool.tally(lambda worker: _worker_state(worker) == state))


for _state in ("ready", "draining", "unreachable", "leaving"):
    WORKERS.labels(_state).set_function(_workers_in(_state))
