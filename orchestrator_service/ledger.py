"""Spending against a limit, in dollars and in tokens: one account, whatever it limits.

A call holds the most it can cost before it starts (`hold`), and its hold is settled with what it
did cost when it ends (`Hold.settle`). A hold is refused when it does not fit beside what is spent
and what other calls hold, so what is spent never passes the limit as long as no call costs more
than it held. A swarm's budget keeps one (`orchestrator_service.budget`); so can a tenant's daily
quota: a ledger per tenant and day, whose holds are the swarms' calls. Pure bookkeeping: no clock,
no I/O, no asyncio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Amount:
    usd: float = 0.0
    tokens: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.usd + other.usd, self.tokens + other.tokens)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.usd - other.usd, self.tokens - other.tokens)


class OverLimit(Exception):
    """A hold that does not fit what is left."""


# Dollars are floats: a sum of many small costs may pass a limit it equals by a rounding error.
_USD_SLACK = 1e-9


class Ledger:
    def __init__(self, max_usd: float = 0.0, max_tokens: int = 0) -> None:
        """0 = no limit in that unit."""
        self.max_usd = max_usd
        self.max_tokens = max_tokens
        self.spent = Amount()
        self.held = Amount()
        # Holds not yet settled (their sum in dollars is a float, never quite back to zero).
        self.open_holds = 0

    @property
    def limited(self) -> bool:
        return bool(self.max_usd or self.max_tokens)

    def room(self) -> tuple[float, float]:
        """What is left for new holds, in dollars and in tokens (infinite where unlimited)."""
        used = self.spent + self.held
        usd = self.max_usd - used.usd if self.max_usd else math.inf
        tokens = self.max_tokens - used.tokens if self.max_tokens else math.inf
        return usd, tokens

    def fits(self, amount: Amount) -> bool:
        usd, tokens = self.room()
        return amount.usd <= usd + _USD_SLACK and amount.tokens <= tokens

    def hold(self, amount: Amount) -> Hold:
        if not self.fits(amount):
            raise OverLimit(f"{amount} does not fit the {self.room()} left")
        self.held += amount
        self.open_holds += 1
        return Hold(self, amount)

    def charge(self, amount: Amount) -> None:
        """A cost already incurred, held by no call (a restart's record of its past): never refused."""
        self.spent += amount


class Hold:
    """What one call holds; settled once."""

    def __init__(self, ledger: Ledger, amount: Amount) -> None:
        self.ledger = ledger
        self.amount = amount
        self.settled = False

    def settle(self, cost: Amount) -> None:
        """The call ended having cost `cost`: the hold is let go and the cost is spent."""
        if self.settled:
            return
        self.settled = True
        self.ledger.open_holds -= 1
        self.ledger.held -= self.amount
        self.ledger.spent += cost
