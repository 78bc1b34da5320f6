"""Which swarms this orchestrator runs, when several share one store: it keeps the leases on its
own swarms and takes over those whose lease ran out.

Every tick (a second, or a quarter of the lease's TTL if that is shorter) the keeper renews the
leases it holds, hands over any swarm whose lease another orchestrator took, cancels the swarms
that a CancelSwarm elsewhere asked to end, and claims the swarms left without a live lease, which
the orchestrator resumes as after a restart. The renewal also counts the orchestrators alive on the
store, among which every worker's capacity is shared. A request from another orchestrator (a cancellation)
wakes it before the tick ends.

So a dead orchestrator's swarms are taken over within the TTL and a tick of its last renewal. One
that could not renew for a whole TTL (cut off from the database, or stopped) stops its swarms
itself: by then another may own them. Should it be wrong, the store's fencing still refuses its
writes; stopping first only spares the workers its duplicate calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from orchestrator_service.orchestrator import Orchestrator
from orchestrator_service.store import StoreError
from orchestrator_service.worker_pool import WorkerPool

log = logging.getLogger("swarm.orchestrator.leases")
LONGEST_TICK_S = 1.0


class LeaseKeeper:
    def __init__(self, orchestrator: Orchestrator, pool: WorkerPool, ttl_s: float) -> None:
        self.orchestrator = orchestrator
        self.pool = pool
        self.ttl_s = ttl_s
        self.tick_s = min(LONGEST_TICK_S, ttl_s / 4)
        self._renewed = time.monotonic()
        self._failing = False

    async def run(self) -> None:
        store = self.orchestrator.store
        while True:
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(store.wait_for_requests(), self.tick_s)

    async def tick(self) -> None:
        orchestrator = self.orchestrator
        try:
            async with asyncio.timeout(self.ttl_s / 2):
                renewal = await orchestrator.store.renew(orchestrator.leases())
            self._renewed = time.monotonic()
            self.pool.share_with(renewal.orchestrators)
            orchestrator.renewed(renewal)
            if orchestrator.accepting:
                resumed = await orchestrator.recover()
                if resumed:
                    log.info(f"took over {len(resumed)} swarm(s) whose lease ran out")
            if self._failing:
                log.info("the leases are renewed again")
                self._failing = False
        except (StoreError, TimeoutError) as error:
            if not self._failing:
                log.warning(f"cannot renew the swarms' leases: {error or 'the database did not answer'}")
                self._failing = True
            if time.monotonic() - self._renewed >= self.ttl_s and orchestrator.leases():
                log.warning(f"no lease renewed for {self.ttl_s:g}s: stopping this orchestrator's swarms")
                orchestrator.hand_over_all()
