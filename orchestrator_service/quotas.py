"""Each tenant's quotas, kept beside the model API's rate limits: what a tenant may start (swarms at
once, agents per swarm, RunSwarm calls per minute) and spend (model tokens and cost per UTC day).

A request over a quota is refused before any model call. What a tenant has spent is what its
swarms' records count as spent (the accounting that budgets and GetSwarm use: every call that ended,
failed and superseded attempts included), charged as each event that spends is stored, so a swarm
that takes its tenant over a daily quota while running is stopped there. The day's spend is
kept in memory: after a restart a tenant's day starts again from what its swarms spend from then on.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator_service.auth import Quotas, Tenant
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

    @classmethod
    def of(cls, usage: events_pb2.Usage) -> Spent:
        """Every token a call used counts toward a tenant's tokens, cached or not."""
        tokens = (
            usage.input_tokens
            + usage.output_tokens
            + usage.cache_creation_input_tokens
            + usage.cache_read_input_tokens
        )
        return cls(tokens, usage.cost_usd)


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
