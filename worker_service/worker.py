"""Executes one subtask: prompt -> provider stream -> chunks. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from swarm_common import prompts
from swarm_common.errors import ProviderUnavailable
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS, Provider, StreamRequest, Usage

log = logging.getLogger("swarm.worker")


class WorkerBusy(Exception):
    """Every slot is taken: the caller should try another worker."""


@dataclass(frozen=True, slots=True)
class Assignment:
    swarm_id: str
    subtask_id: str
    title: str
    instructions: str
    idea: str
    model: str
    attempt: int
    # Wall-clock time (epoch seconds) the attempt must end by; None = no deadline.
    deadline: float | None = None
    # The answer's budget of output tokens.
    max_tokens: int = DEFAULT_ANSWER_MAX_TOKENS


class Worker:
    def __init__(
        self, provider: Provider, *, worker_id: str, max_concurrency: int, default_model: str
    ) -> None:
        self.provider = provider
        self.worker_id = worker_id
        self.max_concurrency = max_concurrency
        self.default_model = default_model
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def claim(self) -> None:
        """Takes a slot or raises WorkerBusy; `execute` gives it back."""
        if self.in_flight >= self.max_concurrency:
            raise WorkerBusy(f"worker {self.worker_id} is running {self.in_flight} subtasks, its maximum")
        self.in_flight += 1
        self._idle.clear()

    async def execute(self, assignment: Assignment) -> AsyncIterator[str | Usage]:
        """Runs a claimed assignment: yields the output's chunks as they arrive, then one Usage."""
        try:
            timeout_s = None
            if assignment.deadline is not None:
                timeout_s = assignment.deadline - time.time()
                if timeout_s <= 0:
                    raise ProviderUnavailable("the attempt's deadline passed before it started")
            request = StreamRequest(
                model=assignment.model or self.default_model,
                system=prompts.WORKER_SYSTEM,
                prompt=prompts.worker_prompt(assignment.idea, assignment.title, assignment.instructions),
                max_tokens=assignment.max_tokens,
                timeout_s=timeout_s,
            )
            async for item in self.provider.stream(request):
                yield item
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is in flight; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def log_unfinished(self) -> None:
        log.warning(f"shutdown grace over with {self.in_flight} subtask(s) unfinished: they are cancelled")
