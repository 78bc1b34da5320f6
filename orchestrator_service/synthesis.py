"""One synthesis of a swarm's outputs, within the model's context window: one call when they fit,
a tree of partial syntheses when they do not.

The outputs, in plan order, fit one prompt when the estimated prompt and the synthesis's answer
budget together fit the context window; then the synthesis is a single call, as for any small
swarm. When they do not, they are packed into as few contiguous groups as fit, evened out, and
each group becomes a partial synthesis: its own call, the level's calls in parallel under the
shared model limits. The partials are packed again, level by level, until what is left fits one
final synthesis. A group of one passes on as it is. RunSwarm refuses a swarm in which two outputs
could not share a prompt, so every level makes progress.

Each completed partial is an event (`partial_synthesis`), and its id names the subtasks it covers:
a retried or resumed synthesis reuses every partial it already has, so a restart costs at most the
calls that were in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from orchestrator_service.event_log import EventLog
from orchestrator_service.planner import Planner
from orchestrator_service.sizing import TokenEstimate, synthesis_max_tokens
from orchestrator_service.state import T
from swarm.v1 import events_pb2
from swarm_common import prompts
from swarm_common.errors import ProviderError
from swarm_common.model_limits import limits_of
from swarm_common.providers import Usage
from swarm_common.usage import usage_proto


class CannotFit(Exception):
    """Not even two outputs fit one synthesis prompt: the synthesis cannot be made."""


@dataclass(frozen=True, slots=True)
class Source:
    """A text a synthesis combines: a subtask's output, or a partial synthesis."""

    id: str
    title: str
    text: str
    # The tokens the model counted in `text` when it wrote it; 0 = not counted.
    tokens: int
    # The plan positions it covers, from 1.
    first: int
    last: int


def pack(costs: Sequence[int], capacity: int) -> list[range]:
    """Consecutive items with these costs in as few groups of at most `capacity` as there can be,
    evened out: the smallest cap that still needs no more groups decides where they split. An item
    over `capacity` is a group of its own."""

    def greedy(cap: int) -> list[range]:
        groups: list[range] = []
        start, total = 0, 0
        for index, cost in enumerate(costs):
            if index > start and total + cost > cap:
                groups.append(range(start, index))
                start, total = index, 0
            total += cost
        groups.append(range(start, len(costs)))
        return groups

    fewest = len(greedy(capacity))
    low, high = min(max(costs, default=0), capacity), capacity
    while low < high:
        middle = (low + high) // 2
        if len(greedy(middle)) <= fewest:
            high = middle
        else:
            low = middle + 1
    return greedy(low)


class SynthesisTree:
    """One synthesis attempt of one swarm: `reduce` to what fits one prompt, then `final`."""

    def __init__(
        self,
        planner: Planner,
        log: EventLog,
        *,
        idea: str,
        model: str,
        attempt: int,
        cache_idea: bool = False,
    ) -> None:
        """Synthesizes the subtasks that completed (all of them, unless the budget stopped the
        swarm); `cache_idea` marks the prompts' idea for the prompt cache."""
        self.planner = planner
        self.log = log
        self.idea = idea
        self.model = model
        self.attempt = attempt
        self.cache_idea = cache_idea
        limits = limits_of(model)
        self.context_window = limits.context_window
        self.max_tokens = synthesis_max_tokens(limits)
        subtasks = [s for s in log.record.subtasks.values() if s.state == T.SUBTASK_STATE_COMPLETED]
        self.sources = [
            Source(
                s.subtask.id, s.subtask.title, s.output, s.usage.output_tokens, s.position + 1, s.position + 1
            )
            for s in subtasks
        ]
        self.total = len(subtasks)
        self.estimate = TokenEstimate.calibrated((s.text, s.tokens) for s in self.sources)
        # A prompt's own text besides its sections, whichever of the two prompts it is.
        fixed = self.estimate.of(prompts.SWARM_SYSTEM + prompts.idea_block(idea)) + max(
            self.estimate.of(prompts.synthesis_prompt([])),
            self.estimate.of(prompts.partial_synthesis_prompt([], self._covers(self.total, self.total))),
        )
        # The tokens a prompt's sections may take.
        self.capacity = self.context_window - self.max_tokens - fixed

    def _covers(self, first: int, last: int) -> str:
        return f"results {first} to {last} of {self.total}"

    def _cost(self, source: Source) -> int:
        return self.estimate.of(f"### {source.title}\n\n\n") + self.estimate.of_counted(
            source.text, source.tokens
        )

    async def reduce(self) -> list[Source]:
        """Partial syntheses, level by level, until the sources fit one prompt."""
        sources = self.sources
        level = 1
        while True:
            costs = [self._cost(source) for source in sources]
            if sum(costs) <= self.capacity:
                return sources
            groups = pack(costs, self.capacity)
            if len(groups) == len(sources):
                raise CannotFit(
                    f"no two of the {len(sources)} texts to combine fit one prompt within the "
                    f"{self.context_window:,}-token context window of {self.model}"
                )
            sources = await self._level(level, [[sources[i] for i in group] for group in groups])
            level += 1

    async def _level(self, level: int, groups: list[list[Source]]) -> list[Source]:
        """The level's partials, in parallel; a group of one passes on as it is."""
        count = sum(1 for group in groups if len(group) > 1)
        index = 0
        calls: list[asyncio.Task[Source]] = []
        try:
            async with asyncio.TaskGroup() as tasks:
                for group in groups:
                    if len(group) > 1:
                        index += 1
                        calls.append(tasks.create_task(self._partial(level, index, count, group)))
        except BaseExceptionGroup as failed:
            errors = failed.exceptions
            raise next((e for e in errors if isinstance(e, ProviderError)), errors[0]) from None
        made = iter(calls)
        return [group[0] if len(group) == 1 else next(made).result() for group in groups]

    async def _partial(self, level: int, index: int, count: int, group: list[Source]) -> Source:
        first, last = group[0].first, group[-1].last
        partial_id = f"synthesis-{level}:{first}-{last}"
        done = self.log.record.partials.get(partial_id)
        if done is None:
            text: list[str] = []
            usage = Usage()
            async for item in self.planner.synthesize(
                idea=self.idea,
                results=[(source.title, source.text) for source in group],
                model=self.model,
                max_tokens=self.max_tokens,
                covers=self._covers(first, last),
                cache_idea=self.cache_idea,
            ):
                if isinstance(item, str):
                    text.append(item)
                else:
                    usage = item
            done = events_pb2.PartialSynthesis(
                id=partial_id,
                attempt=self.attempt,
                level=level,
                index=index,
                count=count,
                sources=[source.id for source in group],
                output="".join(text),
                usage=usage_proto(usage),
                stop_reason=usage.stop_reason,
            )
            self.log.append("partial_synthesis", done)
        return Source(
            partial_id,
            f"Results {first} to {last} (a partial synthesis)",
            done.output,
            done.usage.output_tokens,
            first,
            last,
        )

    def final(self, sources: list[Source]) -> AsyncIterator[str | Usage]:
        """The final synthesis of what `reduce` left, streamed."""
        return self.planner.synthesize(
            idea=self.idea,
            results=[(source.title, source.text) for source in sources],
            model=self.model,
            max_tokens=self.max_tokens,
            cache_idea=self.cache_idea,
        )
