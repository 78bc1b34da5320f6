"""Each tenant's quotas, kept beside the model API's rate limits: what a tenant may start (swarms at
once, agents per swarm, RunSwarm calls per minute) and spend (model tokens and cost per UTC day).

A request over a quota is refused before any model call. What a tenant has spent is counted from
the usage its swarms' events carry, each model call's as its event is stored (`SwarmSpend`), so a
swarm that takes its tenant over a daily quota while running is stopped there. The day's spend is
kept in memory: after a restart a tenant's day starts again from what its swarms spend from then on.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator_service.auth import Quotas, Tenant
from orchestrator_service.store import Cursor, Entry, Store
from swarm.v1 import events_pb2, orchestrator_pb2

RUN_WINDOW_S = 60.0


class QuotaExceeded(Exception):
    """A tenant's quota refuses the request, or ends its running swarms. `subject` is the
    QuotaFailure's (`tenant:NAME`), `quota` the quota's name in the auth file."""

    def __init__(self, tenant: str, quota: str, message: str) -> None:
        super().__init__(message)
        self.subject = f"tenant:{tenant}"
        self.quota = quota


@dataclass(slots=True)
class Spent:
    tokens: int = 0
    cost_usd: float = 0.0


class SwarmSpend:
    """What one swarm's model calls have cost so far, from its events in order: each plan, each
    subtask's answer and each partial synthesis as it completes, and the final synthesis (what is
    left of swarm_completed's total). Per-swarm budgets can count with it too."""

    def __init__(self) -> None:
        self.total = Spent()

    def add(self, event: events_pb2.SwarmEvent) -> Spent:
        """The spend this event reports, added to the total."""
        kind = event.WhichOneof("kind")
        if kind == "swarm_completed":
            usage = event.swarm_completed.usage
            added = Spent(
                max(0, usage.input_tokens + usage.output_tokens - self.total.tokens),
                max(0.0, usage.cost_usd - self.total.cost_usd),
            )
        elif kind in ("plan_created", "subtask_completed", "partial_synthesis"):
            usage = getattr(event, kind).usage
            added = Spent(usage.input_tokens + usage.output_tokens, usage.cost_usd)
        else:
            return Spent()
        self.total.tokens += added.tokens
        self.total.cost_usd += added.cost_usd
        return added


class QuotaKeeper:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._runs: dict[str, deque[float]] = {}
        self._days: dict[str, tuple[datetime.date, Spent]] = {}

    def _today(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).date()

    def spent_today(self, tenant: str) -> Spent:
        day, spent = self._days.get(tenant, (None, None))
        return spent if spent is not None and day == self._today() else Spent()

    def admit(self, tenant: Tenant, *, num_agents: int, unfinished: int) -> None:
        """Raises QuotaExceeded when a new swarm of `num_agents` would pass one of the tenant's
        quotas; `unfinished` is how many of its swarms have not ended. Every call that gets here
        counts toward the calls per minute, refused or not: retrying in a loop does not help."""
        quotas, name = tenant.quotas, tenant.name
        now = self._clock()
        runs = self._runs.setdefault(name, deque())
        while runs and now - runs[0] >= RUN_WINDOW_S:
            runs.popleft()
        if quotas.runs_per_minute and len(runs) >= quotas.runs_per_minute:
            wait = RUN_WINDOW_S - (now - runs[0])
            raise QuotaExceeded(
                name,
                "runs_per_minute",
                f"tenant {name} has made {len(runs)} RunSwarm calls in the last minute, its quota "
                f"(runs_per_minute {quotas.runs_per_minute}): try again in {wait:.0f}s",
            )
        runs.append(now)
        if quotas.agents_per_swarm and num_agents > quotas.agents_per_swarm:
            raise QuotaExceeded(
                name,
                "agents_per_swarm",
                f"{num_agents} agents is over tenant {name}'s quota of {quotas.agents_per_swarm} per swarm "
                "(agents_per_swarm)",
            )
        if quotas.concurrent_swarms and unfinished >= quotas.concurrent_swarms:
            raise QuotaExceeded(
                name,
                "concurrent_swarms",
                f"tenant {name} has {unfinished} swarms running, its quota (concurrent_swarms "
                f"{quotas.concurrent_swarms}): try again when one has ended",
            )
        exhausted = self.exhausted(tenant)
        if exhausted is not None:
            raise exhausted

    def exhausted(self, tenant: Tenant) -> QuotaExceeded | None:
        """The tenant's daily quota that today's spend has reached, if any."""
        quotas, spent = tenant.quotas, self.spent_today(tenant.name)
        if quotas.cost_usd_per_day and spent.cost_usd >= quotas.cost_usd_per_day:
            return QuotaExceeded(
                tenant.name,
                "cost_usd_per_day",
                f"tenant {tenant.name} has spent ${spent.cost_usd:.4f} on the model today (UTC), its quota "
                f"(cost_usd_per_day {quotas.cost_usd_per_day:g})",
            )
        if quotas.tokens_per_day and spent.tokens >= quotas.tokens_per_day:
            return QuotaExceeded(
                tenant.name,
                "tokens_per_day",
                f"tenant {tenant.name} has used {spent.tokens} model tokens today (UTC), its quota "
                f"(tokens_per_day {quotas.tokens_per_day})",
            )
        return None

    def charge(self, tenant: str, spent: Spent) -> None:
        today = self._today()
        day, total = self._days.get(tenant, (today, Spent()))
        if day != today:
            total = Spent()
        total.tokens += spent.tokens
        total.cost_usd += spent.cost_usd
        self._days[tenant] = (today, total)


def quotas_proto(quotas: Quotas) -> orchestrator_pb2.TenantQuotas:
    return orchestrator_pb2.TenantQuotas(
        concurrent_swarms=quotas.concurrent_swarms,
        agents_per_swarm=quotas.agents_per_swarm,
        runs_per_minute=quotas.runs_per_minute,
        tokens_per_day=quotas.tokens_per_day,
        cost_usd_per_day=quotas.cost_usd_per_day,
    )


class MeteredStore:
    """A store that tells `on_spent(swarm_id, spent)` what each stored event reports as spent on the
    model: the spend is counted once, when its event is durable, whichever way the event came."""

    def __init__(self, store: Store, on_spent: Callable[[str, Spent], None]) -> None:
        self._store = store
        self._on_spent = on_spent
        self._swarms: dict[str, SwarmSpend] = {}

    @property
    def inner(self) -> Store:
        return self._store

    @property
    def persistent(self) -> bool:
        return self._store.persistent

    async def append(self, entries: Sequence[Entry]) -> None:
        await self._store.append(entries)
        for entry in entries:
            event = entry.event
            spend = self._swarms.setdefault(event.swarm_id, SwarmSpend())
            added = spend.add(event)
            if added.tokens or added.cost_usd:
                self._on_spent(event.swarm_id, added)
            if event.WhichOneof("kind") in ("swarm_completed", "swarm_failed", "swarm_cancelled"):
                del self._swarms[event.swarm_id]

    async def events(self, swarm_id: str, *, after_sequence: int, limit: int) -> list[events_pb2.SwarmEvent]:
        return await self._store.events(swarm_id, after_sequence=after_sequence, limit=limit)

    async def get_swarm(self, swarm_id: str, *, with_subtasks: bool = True) -> orchestrator_pb2.Swarm | None:
        return await self._store.get_swarm(swarm_id, with_subtasks=with_subtasks)

    async def list_swarms(
        self, *, limit: int, state: int = 0, after: Cursor | None = None, tenant: str = ""
    ) -> list[orchestrator_pb2.Swarm]:
        return await self._store.list_swarms(limit=limit, state=state, after=after, tenant=tenant)

    async def find_request(self, request_id: str, *, tenant: str = "") -> str | None:
        return await self._store.find_request(request_id, tenant=tenant)

    async def unfinished(self) -> list[str]:
        return await self._store.unfinished()

    async def delete_finished(self, *, ended_before_ns: int, limit: int) -> int:
        return await self._store.delete_finished(ended_before_ns=ended_before_ns, limit=limit)

    async def close(self) -> None:
        await self._store.close()
