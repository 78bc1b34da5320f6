"""The orchestrator's front: validates requests, starts and resumes swarms, and finds them again.
No gRPC here.

Swarms that are running live here, in memory; a finished swarm lives in the store alone, which is
where GetSwarm, WatchSwarm and ListSwarms find it, so memory holds only the swarms in flight.

Every swarm belongs to the tenant that started it, and only that tenant finds it: to any other,
its id is as unknown as one never given out (NOT_FOUND), and its request ids are the tenant's own.

On a store that several orchestrators share, a swarm runs where its lease is held, and any
orchestrator answers for any swarm: one running elsewhere is read and followed from the store, and
cancelled by a request that its owner picks up. A swarm whose lease another orchestrator took is
handed over: it stops here, and its watchers here go on reading it from the store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Gauge

from orchestrator_service.auth import ANONYMOUS, Tenant
from orchestrator_service.estimate import estimate_swarm
from orchestrator_service.event_log import TERMINAL_KINDS, Logged, LogHandedOver, replay, replay_pages
from orchestrator_service.planner import Planner
from orchestrator_service.quotas import QuotaKeeper, Spent
from orchestrator_service.scheduler import Scheduler
from orchestrator_service.sizing import misfits
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import Claim, Cursor, Renewal, Store, StoreError
from orchestrator_service.swarm import Swarm, SwarmSpec, state_name
from swarm.v1 import events_pb2, orchestrator_pb2
from swarm_common import logs, pricing, telemetry
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS

log = logging.getLogger("swarm.orchestrator")

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
MAX_REQUEST_ID = 128
# Sequences and creation times are stored as SQLite INTEGERs: signed 64 bits.
MAX_STORED_INT = 2**63 - 1
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Swarms read from the store at a time while a ListSwarms page is made.
LIST_READ = 100


@dataclass(frozen=True, slots=True)
class Limits:
    max_agents: int = 256
    max_idea_bytes: int = 64 * 1024
    # A subtask's answer budget when the request sets none.
    answer_max_tokens: int = DEFAULT_ANSWER_MAX_TOKENS
    # What one request may cost, whatever its size: each agent's prompt carries the idea, and
    # every unfinished swarm's agents are in flight or queued until it ends. (The floor under
    # per-tenant quotas.)
    max_swarm_input_bytes: int = 4 * 1024 * 1024
    max_agents_in_flight: int = 4096
    # Readers (RunSwarm and WatchSwarm calls) of one swarm at once.
    max_watchers_per_swarm: int = 100
    # A ListSwarms page ends at this many bytes, whatever its page_size; its ideas, results and
    # errors are cut to `list_text_bytes` each (GetSwarm has them whole).
    max_page_bytes: int = 1024 * 1024
    list_text_bytes: int = 1024


@dataclass(frozen=True, slots=True)
class Economy:
    """The orchestrator's defaults for what a swarm spends, where its request says nothing."""

    # The model subtasks run on; "" = the swarm's model.
    worker_model: str = ""
    hedging: bool = False
    hedge_max_extra: float = 0.1
    # Mark shared prompt prefixes for the model API's prompt cache.
    prompt_caching: bool = True


class InvalidRequest(ValueError):
    """Bad input: (field, description) pairs, all of them, not just the first."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {text}" for field, text in violations))
        self.violations = violations


class SwarmNotFound(LookupError):
    pass


class OverLimit(Exception):
    """A server-wide limit refuses the request; `flag` names the limit."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


class RequestIdReused(Exception):
    """A request_id already names a swarm that was asked for with other parameters."""


@dataclass(frozen=True, slots=True)
class Started:
    swarm_id: str
    # False: the request_id named a swarm started before, by this call's first try or another's.
    new: bool


class ShuttingDown(RuntimeError):
    pass


def validate(spec: SwarmSpec, limits: Limits) -> None:
    violations: list[tuple[str, str]] = []
    if not spec.idea.strip():
        violations.append(("idea", "must not be empty"))
    elif len(spec.idea.encode()) > limits.max_idea_bytes:
        violations.append(
            ("idea", f"is {len(spec.idea.encode())} bytes; the limit is {limits.max_idea_bytes} bytes")
        )
    if not 1 <= spec.num_agents <= limits.max_agents:
        violations.append(("num_agents", f"must be between 1 and {limits.max_agents}, got {spec.num_agents}"))
    if spec.model and not MODEL_NAME.fullmatch(spec.model):  # `$` would let a final newline through
        violations.append(("model", f"{spec.model[:40]!r} is not a model name"))
    if len(spec.request_id) > MAX_REQUEST_ID:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID} characters"))
    if spec.max_parallel < 0:
        violations.append(("max_parallel", f"must not be negative, got {spec.max_parallel}"))
    if spec.answer_max_tokens < 0:
        violations.append(("answer_max_tokens", f"must not be negative, got {spec.answer_max_tokens}"))
    if spec.worker_model and not MODEL_NAME.fullmatch(spec.worker_model):
        violations.append(("worker_model", f"{spec.worker_model[:40]!r} is not a model name"))
    if not 0 <= spec.hedge_max_extra <= 1:
        violations.append(
            (
                "hedge_max_extra",
                f"must be between 0 and 1 (a fraction of num_agents), got {spec.hedge_max_extra:g}",
            )
        )
    violations += _budget_violations(spec)
    if not violations:
        # Only a request that is otherwise good is sized: the checks need a model and an idea.
        violations = misfits(
            idea=spec.idea,
            model=spec.model,
            answer_max_tokens=spec.answer_max_tokens or limits.answer_max_tokens,
        )
        if spec.workers_model != spec.model:
            violations += [
                ("worker_model", text)
                for field, text in misfits(
                    idea=spec.idea,
                    model=spec.workers_model,
                    answer_max_tokens=spec.answer_max_tokens or limits.answer_max_tokens,
                )
                if field == "answer_max_tokens"
            ]
    if violations:
        raise InvalidRequest(violations)
    input_bytes = len(spec.idea.encode()) * spec.num_agents
    if input_bytes > limits.max_swarm_input_bytes:
        raise OverLimit(
            "--max-swarm-input-bytes",
            f"the idea ({len(spec.idea.encode())} bytes) goes to each of the {spec.num_agents} agents: "
            f"{input_bytes} bytes of model input, over this server's limit of {limits.max_swarm_input_bytes}",
        )


def _budget_violations(spec: SwarmSpec) -> list[tuple[str, str]]:
    budget = spec.budget
    if budget is None:
        return []
    violations: list[tuple[str, str]] = []
    if not (math.isfinite(budget.max_cost_usd) and budget.max_cost_usd >= 0):
        violations.append(
            ("budget.max_cost_usd", f"must be a positive number of dollars, got {budget.max_cost_usd:g}")
        )
    elif budget.max_cost_usd:
        for model in {spec.model, spec.workers_model}:
            if not pricing.priced(model):
                violations.append(
                    (
                        "budget.max_cost_usd",
                        f"{model} has no price in swarm_common/pricing.py: a cost budget cannot be kept",
                    )
                )
    if budget.max_tokens < 0:
        violations.append(("budget.max_tokens", f"must not be negative, got {budget.max_tokens}"))
    if not budget.max_cost_usd and not budget.max_tokens and not violations:
        violations.append(("budget", "sets neither max_cost_usd nor max_tokens"))
    return violations


def differences(asked: SwarmSpec, started: SwarmSpec) -> list[str]:
    """The parameters in which a request differs from the one that started a swarm."""
    names = (
        "idea",
        "num_agents",
        "model",
        "max_parallel",
        "answer_max_tokens",
        "budget",
        "worker_model",
        "hedging",
        "hedge_max_extra",
    )
    return [name for name in names if getattr(asked, name) != getattr(started, name)]


class Orchestrator:
    def __init__(
        self,
        planner: Planner,
        scheduler: Scheduler,
        store: Store,
        *,
        default_model: str,
        limits: Limits | None = None,
        economy: Economy | None = None,
        quotas: QuotaKeeper | None = None,
        tenants: Callable[[str], Tenant | None] = lambda name: None,
    ) -> None:
        """`tenants` gives a tenant's quotas as they stand, by name (from the auth file)."""
        self.planner = planner
        self.economy = economy or Economy()
        self.scheduler = scheduler
        # What swarms spend is counted as their events are stored, against their tenant's quotas.
        self.store = store
        self.default_model = default_model
        self.limits = limits or Limits()
        self.quotas = quotas or QuotaKeeper()
        self._tenants = tenants
        self._swarms: dict[str, Swarm] = {}
        self._by_request_id: dict[tuple[str, str], Swarm] = {}
        self._watchers: dict[str, int] = {}
        self.accepting = True
        # The first failed store write: the orchestrator can no longer keep its promise that what
        # clients see is durable, so it stops (and a restart resumes from what was stored).
        self.store_failure: StoreError | None = None
        self.store_failed = asyncio.Event()
        _ORCHESTRATORS.add(self)

    def count_swarms(self, state: int) -> int:
        """Swarms in memory in `state`; safe from the metrics thread (one copy of the list)."""
        return sum(1 for swarm in list(self._swarms.values()) if swarm.record.state == state)

    async def recover(self) -> list[str]:
        """Resumes every unfinished swarm it can claim in the store (on a store of its own, all of
        them; on a shared one, those whose lease ran out): rebuilds each from its events and runs
        it on from there. Resumed swarms are detached: the RunSwarm calls that started them are
        gone."""
        resumed: list[str] = []
        for claim in await self.store.claim():
            record = SwarmRecord(claim.swarm_id)
            try:
                async for event in replay(self.store, claim.swarm_id):
                    record.apply(event)
            except (ValueError, KeyError) as error:
                raise StoreError(
                    f"cannot resume swarm {claim.swarm_id} from its stored events: {error}"
                ) from None
            stale = self._swarms.get(claim.swarm_id)
            if stale is not None:  # its lease ran out while this orchestrator stalled
                self._hand_over(stale)
            self._resume(claim, record)
            resumed.append(claim.swarm_id)
        return resumed

    def _resume(self, claim: Claim, record: SwarmRecord) -> None:
        stored_through = record.last_sequence
        swarm = Swarm.resume(
            record,
            self.store,
            epoch=claim.epoch,
            on_store_failure=self._store_failed,
            on_lease_lost=self._lease_lost,
            on_spent=self._spent,
        )
        swarm.default_answer_max_tokens = self.limits.answer_max_tokens
        swarm.prompt_caching = self.economy.prompt_caching
        log.info(
            f"swarm resumed after its stored event {stored_through} (epoch {claim.epoch})",
            extra={"swarm_id": swarm.id, "model": swarm.spec.model},
        )
        if claim.cancel_reason:
            # A CancelSwarm reached no owner: the swarm ends here, as its owner would have ended it.
            swarm.log.append("swarm_cancelled", events_pb2.SwarmCancelled(reason=claim.cancel_reason))
            swarm.observe_end()
            return
        self._launch(swarm)

    def leases(self) -> dict[str, int]:
        """The swarms running here, with the epoch each is written under."""
        return {swarm_id: swarm.log.epoch for swarm_id, swarm in self._swarms.items() if not swarm.suspended}

    def renewed(self, renewal: Renewal) -> None:
        """Acts on a lease renewal: hands over the swarms another orchestrator took, and cancels
        those that a CancelSwarm elsewhere asked to end."""
        for swarm_id in renewal.lost:
            swarm = self._swarms.get(swarm_id)
            if swarm is not None:
                self._hand_over(swarm)
        for swarm_id, reason in renewal.cancels.items():
            swarm = self._swarms.get(swarm_id)
            if swarm is not None:
                swarm.cancel(reason)

    def hand_over_all(self) -> None:
        """Stops every swarm here without writing: their leases may be another orchestrator's now."""
        for swarm in list(self._swarms.values()):
            self._hand_over(swarm)

    def _lease_lost(self, swarm_id: str, epoch: int) -> None:
        swarm = self._swarms.get(swarm_id)
        if swarm is not None and swarm.log.epoch == epoch:
            self._hand_over(swarm)

    def _hand_over(self, swarm: Swarm) -> None:
        """The swarm stops here and writes nothing more; another orchestrator runs it on."""
        self._forget(swarm)
        swarm.log.hand_over()
        swarm.suspend()
        log.warning("swarm handed over: another orchestrator holds its lease", extra={"swarm_id": swarm.id})

    async def start(
        self,
        *,
        idea: str,
        num_agents: int,
        model: str = "",
        request_id: str = "",
        max_parallel: int = 0,
        deadline: float | None = None,
        answer_max_tokens: int = 0,
        budget: events_pb2.Budget | None = None,
        worker_model: str = "",
        hedging: bool | None = None,
        hedge_max_extra: float = 0.0,
        trace_context: Mapping[str, str] | None = None,
        tenant: Tenant = ANONYMOUS,
    ) -> Started:
        """Validates and starts a swarm of `tenant`'s; a request_id the tenant used before gives
        back that swarm instead, if it was asked for with the same parameters. `deadline` (epoch
        seconds) bounds every attempt: the attached call's own deadline. `hedging` None and
        `hedge_max_extra` 0 take the orchestrator's defaults. `trace_context`: the caller's W3C
        trace headers, whose trace the swarm's joins."""
        spec = self.spec_of(
            idea=idea,
            num_agents=num_agents,
            model=model,
            request_id=request_id,
            max_parallel=max_parallel,
            answer_max_tokens=answer_max_tokens,
            budget=budget,
            worker_model=worker_model,
            hedging=hedging,
            hedge_max_extra=hedge_max_extra,
            tenant=tenant.name,
        )
        validate(spec, self.limits)
        if not request_id:
            return Started(self._accept(spec, tenant, deadline, trace_context).id, new=True)
        # Held until the swarm's first events are stored, so that another start of the same
        # request, here or at another orchestrator on the same store, finds this swarm. (Two keys
        # that read alike only share a lock: it serializes, it never merges.)
        async with self.store.request_lock(f"{tenant.name}/{request_id}"):
            seen = await self._find_request(request_id, tenant.name)
            if seen is not None:
                differ = differences(spec, await self._requested(seen))
                if differ:
                    raise RequestIdReused(
                        f"request_id {request_id!r} already started a swarm with another {', '.join(differ)}"
                    )
                return Started(seen, new=False)
            swarm = self._accept(spec, tenant, deadline, trace_context)
            await swarm.log.stored()
        return Started(swarm.id, new=True)

    def _accept(
        self,
        spec: SwarmSpec,
        tenant: Tenant,
        deadline: float | None,
        trace_context: Mapping[str, str] | None,
    ) -> Swarm:
        num_agents = spec.num_agents
        if not self.accepting:
            raise ShuttingDown("the orchestrator is shutting down and takes no new swarms")
        self.quotas.admit(tenant, num_agents=num_agents, unfinished=self._unfinished(tenant.name))
        in_flight = sum(s.record.accepted.num_agents for s in self._swarms.values() if not s.finished)
        if in_flight + num_agents > self.limits.max_agents_in_flight:
            raise OverLimit(
                "--max-agents-in-flight",
                f"the orchestrator has {in_flight} agents in flight or queued; {num_agents} more would "
                f"pass its limit of {self.limits.max_agents_in_flight}: try again when swarms have ended",
            )
        swarm = Swarm.accept(
            uuid.uuid4().hex,
            spec,
            provider_name=self.planner.provider.name,
            store=self.store,
            on_store_failure=self._store_failed,
            on_lease_lost=self._lease_lost,
            on_spent=self._spent,
            trace_context=trace_context,
        )
        swarm.deadline = deadline
        swarm.default_answer_max_tokens = self.limits.answer_max_tokens
        swarm.prompt_caching = self.economy.prompt_caching
        self._launch(swarm)
        log.info(f"swarm accepted: {num_agents} agents", extra={"swarm_id": swarm.id, "model": spec.model})
        return swarm

    def spec_of(
        self,
        *,
        idea: str,
        num_agents: int,
        model: str = "",
        request_id: str = "",
        max_parallel: int = 0,
        answer_max_tokens: int = 0,
        budget: events_pb2.Budget | None = None,
        worker_model: str = "",
        hedging: bool | None = None,
        hedge_max_extra: float = 0.0,
        tenant: str = "",
    ) -> SwarmSpec:
        """What a request asks for, the orchestrator's defaults filled in."""
        model = model or self.default_model
        return SwarmSpec(
            idea=idea,
            num_agents=num_agents,
            model=model,
            request_id=request_id,
            max_parallel=max_parallel,
            answer_max_tokens=answer_max_tokens,
            budget=budget,
            worker_model=worker_model or self.economy.worker_model,
            hedging=self.economy.hedging if hedging is None else hedging,
            hedge_max_extra=hedge_max_extra or self.economy.hedge_max_extra,
            tenant=tenant,
        )

    def estimate(self, spec: SwarmSpec) -> orchestrator_pb2.EstimateSwarmResponse:
        """What the swarm would use and cost, as a range; nothing is started."""
        validate(spec, self.limits)
        return estimate_swarm(
            idea=spec.idea,
            num_agents=spec.num_agents,
            model=spec.model,
            worker_model=spec.workers_model,
            answer_max_tokens=spec.answer_max_tokens or self.limits.answer_max_tokens,
            budget=spec.budget,
            prompt_caching=self.economy.prompt_caching,
        )

    async def _requested(self, swarm_id: str) -> SwarmSpec:
        """What the swarm was asked for: its first events (`accepted`, and `answer_budget` when the
        request set one)."""
        running = self._swarms.get(swarm_id)
        if running is not None:
            return running.spec
        record = SwarmRecord(swarm_id)
        for event in await self.store.events(swarm_id, after_sequence=0, limit=2):  # accepted, answer_budget
            record.apply(event)
        return SwarmSpec.of(record)

    async def _find_request(self, request_id: str, tenant: str) -> str | None:
        running = self._by_request_id.get((tenant, request_id))
        if running is not None:
            return running.id
        stored = await self.store.find_request(request_id, tenant=tenant)
        # Looked up again after the wait: a start with the same request_id may have won the race.
        running = self._by_request_id.get((tenant, request_id))
        return running.id if running is not None else stored

    def _unfinished(self, tenant: str) -> int:
        return sum(1 for s in self._swarms.values() if not s.finished and s.record.accepted.tenant == tenant)

    def _spent(self, swarm_id: str, usage: events_pb2.Usage) -> None:
        """The swarm spent `usage` on the model (its events that say so are stored): it is charged
        to the swarm's tenant, and when that takes the tenant to a daily quota, its running swarms
        stop there."""
        swarm = self._swarms.get(swarm_id)
        if swarm is None:
            return
        name = swarm.record.accepted.tenant
        self.quotas.charge(name, Spent.of(usage))
        tenant = self._tenants(name)
        exceeded = self.quotas.exhausted(tenant) if tenant is not None else None
        if exceeded is None:
            return
        for running in list(self._swarms.values()):
            if running.record.accepted.tenant == name and running.fail(
                events_pb2.SwarmFailed(error=f"{exceeded}: the swarm is stopped", quota=exceeded.quota)
            ):
                log.warning(f"swarm stopped: {exceeded}", extra={"swarm_id": running.id})

    def _launch(self, swarm: Swarm) -> None:
        self._swarms[swarm.id] = swarm
        spec = swarm.spec
        if spec.request_id:
            self._by_request_id.setdefault((spec.tenant, spec.request_id), swarm)
        swarm.task = asyncio.get_running_loop().create_task(self._run(swarm), name=f"swarm-{swarm.id}")

    async def _run(self, swarm: Swarm) -> None:
        # The swarm's own task: what it logs, and the spans of its work, are the swarm's.
        logs.bind(swarm_id=swarm.id, trace_id=swarm.record.accepted.trace_id)
        with telemetry.current(swarm.span):
            await swarm.run(self.planner, self.scheduler)
        swarm.observe_end()
        if not swarm.finished:
            return  # suspended: it stays unfinished in the store for the next start
        try:
            await swarm.log.stored()
        except StoreError:
            return  # the orchestrator is stopping for it (`store_failed`)
        # Durable now, so the store answers for it from here on.
        self._forget(swarm)

    def _forget(self, swarm: Swarm) -> None:
        """The swarm leaves memory (not another one since started under its id or request id)."""
        if self._swarms.get(swarm.id) is swarm:
            del self._swarms[swarm.id]
        key = (swarm.spec.tenant, swarm.spec.request_id)
        if self._by_request_id.get(key) is swarm:
            del self._by_request_id[key]

    def _store_failed(self, error: StoreError) -> None:
        if self.store_failure is None:
            self.store_failure = error
            self.store_failed.set()

    def _running(self, swarm_id: str, tenant: str) -> Swarm | None:
        running = self._swarms.get(swarm_id)
        return running if running is not None and running.record.accepted.tenant == tenant else None

    async def _stored(
        self, swarm_id: str, tenant: str, *, with_subtasks: bool = True
    ) -> orchestrator_pb2.Swarm:
        """The stored swarm, if it is the tenant's: another tenant's is not found, as if it did not
        exist, in the same words."""
        stored = await self.store.get_swarm(swarm_id, with_subtasks=with_subtasks)
        if stored is None or stored.tenant != tenant:
            raise SwarmNotFound(f"no swarm with id {swarm_id[:64]!r}")
        return stored

    async def get(self, swarm_id: str, tenant: str = "") -> orchestrator_pb2.Swarm:
        running = self._running(swarm_id, tenant)
        if running is not None:
            return await running.view()
        return await self._stored(swarm_id, tenant)

    async def watch(
        self, swarm_id: str, after_sequence: int = 0, tenant: str = ""
    ) -> AsyncGenerator[list[Logged], None]:
        """The swarm's events after `after_sequence`, in batches of those ready together: live
        while it runs here, else from the store (a finished swarm is stored whole before it leaves
        memory). Reading them counts as one of the swarm's watchers: beyond the limit, the first
        read raises OverLimit."""
        if after_sequence > MAX_STORED_INT:
            raise InvalidRequest(
                [("after_sequence", f"must be at most {MAX_STORED_INT}, a sequence that can exist")]
            )
        running = self._running(swarm_id, tenant)
        if running is not None:
            return self._watched(swarm_id, self._follow(running, after_sequence))
        await self._stored(swarm_id, tenant, with_subtasks=False)
        return self._watched(swarm_id, self._from_store(swarm_id, after_sequence))

    async def _follow(self, running: Swarm, after_sequence: int) -> AsyncIterator[list[Logged]]:
        """The running swarm's events; should it be handed over meanwhile, on from the store."""
        index = after_sequence
        try:
            async for batch in running.log.follow(after_sequence):
                index = batch[-1].sequence
                yield batch
            return
        except LogHandedOver:
            pass
        async for batch in self._from_store(running.id, index):
            yield batch

    async def _from_store(self, swarm_id: str, after_sequence: int) -> AsyncIterator[list[Logged]]:
        """The swarm's stored events, a page at a time; then, while another orchestrator runs it,
        each one that it appends."""
        index = after_sequence
        async for page in replay_pages(self.store, swarm_id, after_sequence=index):
            index = page[-1].sequence
            yield [Logged.of(event) for event in page]
            if page[-1].WhichOneof("kind") in TERMINAL_KINDS:
                return
        async for event in self.store.follow(swarm_id, after_sequence=index):
            yield [Logged.of(event)]

    async def _watched(
        self, swarm_id: str, events: AsyncIterator[list[Logged]]
    ) -> AsyncGenerator[list[Logged], None]:
        watchers = self._watchers.get(swarm_id, 0)
        if watchers >= self.limits.max_watchers_per_swarm:
            raise OverLimit(
                "--max-watchers-per-swarm",
                f"swarm {swarm_id} has {watchers} watchers, this server's limit: try again later",
            )
        self._watchers[swarm_id] = watchers + 1
        try:
            async for batch in events:
                yield batch
        finally:
            self._watchers[swarm_id] -= 1
            if not self._watchers[swarm_id]:
                del self._watchers[swarm_id]

    def release(self, swarm_id: str, reason: str) -> None:
        """The RunSwarm call attached to the swarm is gone: an unfinished swarm is cancelled."""
        running = self._swarms.get(swarm_id)
        if running is not None:
            running.cancel(reason)

    async def cancel(
        self, swarm_id: str, reason: str = "", wait_s: float = 5.0, tenant: str = ""
    ) -> orchestrator_pb2.Swarm:
        """Cancels the tenant's swarm and waits (a bounded time) for its swarm_cancelled; a finished
        swarm is left as it is."""
        running = self._running(swarm_id, tenant)
        if running is None:
            return await self._cancel_elsewhere(
                swarm_id, reason or "cancelled by CancelSwarm", wait_s, tenant
            )
        if running.cancel(reason or "cancelled by CancelSwarm") and running.task is not None:
            await asyncio.wait([running.task], timeout=wait_s)
        return await running.view()

    async def _cancel_elsewhere(
        self, swarm_id: str, reason: str, wait_s: float, tenant: str
    ) -> orchestrator_pb2.Swarm:
        """The tenant's swarm, not running here: finished, or running at another orchestrator,
        which is asked to cancel it (or, should it die first, the one that takes it over)."""
        view = await self._stored(swarm_id, tenant, with_subtasks=False)
        if view.HasField("end_time"):
            return view
        await self.store.request_cancel(swarm_id, reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for _ in self.store.follow(swarm_id, after_sequence=view.last_sequence):
                    pass
        return await self._stored(swarm_id, tenant)

    async def list(
        self, *, page_size: int = 0, page_token: str = "", state: int = 0, tenant: str = ""
    ) -> tuple[list[orchestrator_pb2.Swarm], str]:
        """Newest first. The token names the last swarm of the previous page, so swarms started in
        between do not shift the pages. A page ends at `page_size` swarms or `max_page_bytes`,
        whichever comes first, and shows each swarm's texts cut to `list_text_bytes`."""
        size = min(MAX_PAGE_SIZE, page_size if page_size > 0 else DEFAULT_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        page: list[orchestrator_pb2.Swarm] = []
        room = self.limits.max_page_bytes
        rows = self._stored_swarms(state, after, tenant, read=min(LIST_READ, size + 1))
        try:
            async for row in rows:
                view = list_view(row, self.limits.list_text_bytes)
                cost = view.ByteSize() + 8  # and its tag and length in the page
                if len(page) == size or (page and cost > room):
                    return page, _encode_token(Cursor.of(page[-1]))
                page.append(view)
                room -= cost
        finally:
            await rows.aclose()  # type: ignore[attr-defined]
        return page, ""

    async def _stored_swarms(
        self, state: int, after: Cursor | None, tenant: str, *, read: int
    ) -> AsyncIterator[orchestrator_pb2.Swarm]:
        """Swarms past `after`, newest first, `read` at a time: memory holds one read's worth
        however large their ideas and results are."""
        while True:
            rows = await self.store.list_swarms(limit=read, state=state, after=after, tenant=tenant)
            for row in rows:
                yield row
            if len(rows) < read:
                return
            after = Cursor.of(rows[-1])

    async def drain(self, grace_s: float) -> None:
        """Takes no new swarms and lets running ones finish within the grace. The rest are stopped
        unfinished, for the next start to resume, when the store keeps them; else cancelled."""
        self.accepting = False
        running = [s.task for s in self._swarms.values() if s.task is not None and not s.task.done()]
        if not running:
            return
        log.info(f"waiting up to {grace_s:g}s for {len(running)} running swarm(s)")
        _, pending = await asyncio.wait(running, timeout=grace_s)
        if not pending:
            return
        resumable = self.store.persistent and self.store_failure is None
        for swarm in list(self._swarms.values()):
            if resumable:
                swarm.suspend()
            else:
                swarm.cancel("the orchestrator is shutting down")
        await asyncio.wait(pending, timeout=5)
        swarms = list(self._swarms.values())
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(swarm.log.stored(), 5) for swarm in swarms), return_exceptions=True
        )
        for swarm, outcome in zip(swarms, outcomes, strict=True):
            if outcome is not None:
                log.error(
                    f"the swarm's last events were not stored: {outcome!r}", extra={"swarm_id": swarm.id}
                )
        if resumable:
            # Another orchestrator on a shared store takes them over now, not when the leases end.
            try:
                await self.store.release(
                    {swarm_id: swarm.log.epoch for swarm_id, swarm in self._swarms.items()}
                )
            except StoreError as error:
                log.warning(f"the leases of the unfinished swarms were not released: {error}")
            log.info(f"{len(self._swarms)} unfinished swarm(s) left to resume at the next start")


def list_view(swarm: orchestrator_pb2.Swarm, text_bytes: int) -> orchestrator_pb2.Swarm:
    """The swarm as a list shows it: its idea, result and error cut to `text_bytes` each (at a
    character boundary), and marked `truncated` when any was."""
    for name in ("idea", "result", "error"):
        encoded = str(getattr(swarm, name)).encode()
        if len(encoded) > text_bytes:
            setattr(swarm, name, encoded[:text_bytes].decode(errors="ignore"))
            swarm.truncated = True
    return swarm


def _encode_token(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(f"{cursor.create_ns}:{cursor.swarm_id}".encode()).decode()


def _decode_token(token: str) -> Cursor:
    try:
        create_ns, swarm_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        cursor = Cursor(int(create_ns), swarm_id)
    except ValueError:  # bad base64, bad UTF-8, no colon, no number
        cursor = None
    if cursor is None or not 0 <= cursor.create_ns <= MAX_STORED_INT:
        raise InvalidRequest([("page_token", "is not a token this server gave out")])
    return cursor


# The swarms held in memory (the running ones, and ended ones until they are stored), by state,
# read when Prometheus scrapes.
_ORCHESTRATORS: telemetry.Census[Orchestrator] = telemetry.Census()
SWARMS = Gauge("swarm_swarms", "Swarms this orchestrator runs, by state", ["state"])


def _swarms_in(state: int) -> Callable[[], float]:
    return lambda: _ORCHESTRATORS.total(lambda orchestrator: orchestrator.count_swarms(state))


for _state in orchestrator_pb2.SwarmState.values():
    if _state != orchestrator_pb2.SWARM_STATE_UNSPECIFIED:
        SWARMS.labels(state_name(_state)).set_function(_swarms_in(_state))
