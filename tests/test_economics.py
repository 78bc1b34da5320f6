"""What swarms spend: hard budgets (never passed, also with retries and hedges), the prompt cache
through the real SDK against the fake Messages API, per-role models, the estimate, straggler
hedging, and a budget kept across an orchestrator restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.messages_api import FakeMessagesAPI, realistic_answer
from orchestrator_service.event_log import EventLog
from orchestrator_service.hedging import Hedger
from orchestrator_service.ledger import Amount, Ledger, OverLimit
from orchestrator_service.orchestrator import Orchestrator
from orchestrator_service.planner import Planner
from orchestrator_service.scheduler import SubtaskOutcome
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import MemoryStore
from stack import stack
from swarm.v1 import events_pb2
from swarm_checks import assert_completed, assert_well_formed, kinds
from swarm_client import AsyncSwarmClient, Budget, InvalidArgument, Spending
from swarm_common import pricing
from swarm_common.providers import SimulatedProvider, SimulatedSettings

KEY = "sk-ant-test-economics"
Event = events_pb2.SwarmEvent
IDEA_20K = ("Plan the rollout of a city-wide bike-share: stations, pricing, fleet, operations. " * 260)[
    :20480
]


def of(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.WhichOneof("kind") == kind]


def charged(events: list[Event]) -> Amount:
    """Everything the events say the swarm cost: every attempt however it ended, and every call of
    the orchestrator's own (call_settled) or, without a budget, its plan."""
    usd, tokens = 0.0, 0
    for event in events:
        kind = event.WhichOneof("kind")
        body = getattr(event, str(kind))
        if kind in ("subtask_completed", "subtask_failed", "attempt_superseded", "call_settled"):
            usage = body.usage
            usd += usage.cost_usd
            tokens += (
                usage.input_tokens
                + usage.output_tokens
                + usage.cache_creation_input_tokens
                + usage.cache_read_input_tokens
            )
    return Amount(usd, tokens)


def anthropic_stack(fake: FakeMessagesAPI, *, orchestrator_args: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    args = ["--provider", "anthropic"]
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.base_url}
    return stack(workers=2, worker_args=args, orchestrator_args=[*args, *orchestrator_args], env=env)


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(api_key=KEY, chunks=4, answer=realistic_answer) as api:
        yield api


# ---- the ledger and the hedger, alone --------------------------------------------------------


def test_a_ledger_refuses_a_hold_that_does_not_fit_and_settles_what_was_spent() -> None:
    ledger = Ledger(max_usd=1.0, max_tokens=1000)
    first = ledger.hold(Amount(0.6, 600))
    with pytest.raises(OverLimit):
        ledger.hold(Amount(0.5, 10))
    first.settle(Amount(0.2, 150))
    first.settle(Amount(9.0, 9))  # once only
    assert ledger.spent == Amount(0.2, 150) and ledger.held == Amount()
    ledger.hold(Amount(0.8, 850))
    assert ledger.room() == (pytest.approx(0.0), 0)


def test_the_hedger_waits_for_half_then_hedges_stragglers_when_they_are_no_more_than_its_hedges() -> None:
    now = [0.0]
    hedger = Hedger(10, max_extra=0.2, free_slots=lambda: 5, clock=lambda: now[0])
    signals = {f"s{i}": hedger.started(f"s{i}") for i in range(10)}
    for i in range(4):
        now[0] = 1.0
        hedger.completed(f"s{i}", 1.0)
    now[0] = 10.0
    assert hedger.pick() == [], "fewer than half have completed"
    hedger.completed("s4", 1.0)
    assert hedger.threshold_s() == 2.0
    assert hedger.pick() == [], "5 stragglers and 2 hedges: hedging some would not end the swarm sooner"
    for i in (5, 6, 7):
        hedger.completed(f"s{i}", 1.0)
    assert sorted(hedger.pick()) == ["s8", "s9"] and signals["s8"].is_set()
    assert hedger.pick() == [] and hedger.used == 2


# ---- budgets ---------------------------------------------------------------------------------


async def test_a_cost_budget_shortens_answers_and_is_never_passed(fake: FakeMessagesAPI) -> None:
    """Realistic answers (about 1,200 tokens) under a budget whose fair share per answer is less:
    each answer gets a max_tokens that fits, and the swarm completes within its budget."""
    budget = Budget(max_cost_usd=0.15)
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [
                e async for e in client.run("Design a seed library", 6, spending=Spending(budget=budget))
            ]
            view = await client.get(events[0].swarm_id)
    assert_completed(events, 6)
    started = of(events, "subtask_started")
    assert all(0 < e.subtask_started.max_tokens < 4096 for e in started), "answers were given less room"
    assert any(e.subtask_completed.stop_reason == "max_tokens" for e in of(events, "subtask_completed"))
    spent = charged(events)
    assert 0 < spent.usd <= budget.max_cost_usd
    assert (
        view.spent.cost_usd
        == pytest.approx(spent.usd)
        == pytest.approx(events[-1].swarm_completed.usage.cost_usd)
    )
    assert view.budget == budget
    assert of(events, "call_reserved") and len(of(events, "call_reserved")) == len(of(events, "call_settled"))


async def test_a_budget_that_runs_out_fails_the_swarm_and_synthesizes_what_completed() -> None:
    """Most model calls fail (seeded draws: each worker answers its first call, then mostly fails,
    so something completes however the plan is spread): each failed attempt is charged what it
    held, until the budget cannot cover the next answer. The swarm fails, saying so, with the
    synthesis of the subtasks that did complete; a budget too small for the plan stops at once."""
    budget = Budget(max_tokens=30_000, synthesize_partial=True)
    failing = [["--sim-failure-rate", "0.6", "--sim-seed", str(seed)] for seed in (93, 54)]
    args = ("--max-attempts", "5")
    with stack(workers=2, per_worker_args=failing, orchestrator_args=args) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [
                e async for e in client.run("Design a seed library", 8, spending=Spending(budget=budget))
            ]
            view = await client.get(events[0].swarm_id)
            tight = Spending(budget=Budget(max_tokens=2_000))
            refused = [e async for e in client.run("Design a seed library", 8, spending=tight)]
    assert_well_formed(events)
    failed = events[-1].swarm_failed
    assert "the budget of 30,000 tokens" in failed.error and "cannot cover subtask" in failed.error
    assert of(events, "subtask_failed"), "attempts failed, and were charged"
    completed = of(events, "subtask_completed")
    assert 0 < len(completed) < 8
    assert failed.partial_result and view.result == failed.partial_result
    assert charged(events).tokens <= budget.max_tokens
    assert view.spent.input_tokens + view.spent.output_tokens == charged(events).tokens
    assert kinds(refused)[-1] == "swarm_failed" and "cannot cover the plan" in refused[-1].swarm_failed.error
    assert not of(refused, "subtask_started")


async def test_a_token_budget_holds_under_failing_attempts_and_hedges() -> None:
    """Attempts that fail (a tenth of the calls), stragglers hedged (lognormal latencies), and a
    token budget that cannot cover everything: what the swarm is charged never passes it, attempts
    lost without a usage included."""
    budget = Budget(max_tokens=60_000)
    worker = ["--sim-failure-rate", "0.1", "--sim-latency-sigma", "1.0", "--sim-answer-words", "300"]
    with stack(workers=2, worker_args=worker, sim_latency_ms=150) as running:
        async with AsyncSwarmClient(running.target) as client:
            spending = Spending(budget=budget, hedging=True, hedge_max_extra=0.5)
            events = [e async for e in client.run("Design a seed library", 16, spending=spending)]
            view = await client.get(events[0].swarm_id)
    assert_well_formed(events)
    assert charged(events).tokens <= budget.max_tokens
    assert view.spent.input_tokens + view.spent.output_tokens == charged(events).tokens
    assert any(e.subtask_started.max_tokens < 4096 for e in of(events, "subtask_started")), events[-1]


async def test_straggling_subtasks_are_hedged_and_both_attempts_are_charged() -> None:
    worker = ["--sim-latency-sigma", "1.2", "--sim-seed", "7"]
    with stack(workers=2, worker_args=worker, sim_latency_ms=200) as running:
        async with AsyncSwarmClient(running.target) as client:
            spending = Spending(hedging=True, hedge_max_extra=0.25)
            events = [e async for e in client.run("Design a seed library", 16, spending=spending)]
            view = await client.get(events[0].swarm_id)
    assert_completed(events, 16)
    hedges = [e.subtask_started for e in of(events, "subtask_started") if e.subtask_started.hedge]
    assert 1 <= len(hedges) <= 4 == view.hedges + 4 - len(hedges)
    superseded = [e.attempt_superseded for e in of(events, "attempt_superseded")]
    hedged = {h.subtask_id for h in hedges}
    assert {s.subtask_id for s in superseded} <= hedged
    for loser in superseded:
        assert loser.winner_attempt != loser.attempt and loser.usage.output_tokens > 0, "the loser is charged"
    winners = [
        e.subtask_completed
        for e in of(events, "subtask_completed")
        if e.subtask_completed.subtask_id in hedged
    ]
    assert all(w.hedged for w in winners)


# ---- the prompt cache ------------------------------------------------------------------------


async def test_workers_share_a_cached_prefix_and_usage_counts_cache_tokens_apart(
    fake: FakeMessagesAPI,
) -> None:
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            events = [e async for e in client.run(IDEA_20K, 5)]
            view = await client.get(events[0].swarm_id)
            short = [e async for e in client.run("A short idea for a seed library", 5)]
    assert_completed(events, 5)
    workers = [r for r in fake.requests if r.streaming and r.prompt_tail.startswith("Subtask:")]
    long_calls, short_calls = workers[:5], workers[5:]
    assert all(r.cache_marks == 2 for r in long_calls), "the idea and the plan carry the marks"
    assert all(r.cache_marks == 0 for r in short_calls), "a short prefix gets no marks"
    usages = [e.subtask_completed.usage for e in of(events, "subtask_completed")]
    assert sum(u.cache_creation_input_tokens > 0 for u in usages) == 1, "one worker wrote the prefix"
    assert sum(u.cache_read_input_tokens > 0 for u in usages) == 4, "the others read it"
    synthesis = events[-1].swarm_completed.usage
    assert synthesis.cache_read_input_tokens > sum(u.cache_read_input_tokens for u in usages), (
        "so did the synthesis"
    )
    assert view.spent.cache_read_input_tokens == synthesis.cache_read_input_tokens
    prices = pricing.prices_of("claude-sonnet-5-5")
    assert prices is not None
    reader = next(u for u in usages if u.cache_read_input_tokens)
    assert reader.cost_usd == pytest.approx(
        (
            reader.input_tokens * prices.input
            + reader.cache_read_input_tokens * prices.cache_read
            + reader.output_tokens * prices.output
        )
        / 1e6
    )
    assert_completed(short, 5)
    assert all(e.subtask_completed.usage.cache_read_input_tokens == 0 for e in of(short, "subtask_completed"))


# ---- per-role models and the estimate --------------------------------------------------------


async def test_workers_run_on_their_own_model_and_costs_show_per_model(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            spending = Spending(worker_model="claude-haiku-5-5")
            events = [
                e
                async for e in client.run(
                    "Design a seed library", 3, model="claude-opus-5-5", spending=spending
                )
            ]
            view = await client.get(events[0].swarm_id)
    assert_completed(events, 3)
    models = {("plan" if r.is_plan else r.prompt_tail.split(":")[0]): r.body["model"] for r in fake.requests}
    assert models == {
        "plan": "claude-opus-5-5",
        "Subtask": "claude-haiku-5-5",
        "Synthesis of 3 results": "claude-opus-5-5",
    }
    by_model = {m.model: m for m in view.usage_by_model}
    assert (
        by_model["claude-haiku-5-5"].role == "workers"
        and by_model["claude-opus-5-5"].role == "plan and synthesis"
    )
    assert sum(m.usage.cost_usd for m in view.usage_by_model) == pytest.approx(view.spent.cost_usd)
    assert view.worker_model == "claude-haiku-5-5"


async def test_an_estimate_gives_a_range_and_starts_nothing(fake: FakeMessagesAPI) -> None:
    with anthropic_stack(fake) as running:
        async with AsyncSwarmClient(running.target) as client:
            spending = Spending(worker_model="claude-haiku-5-5", budget=Budget(max_cost_usd=0.15))
            estimate = await client.estimate(IDEA_20K, 10, spending=spending)
            with pytest.raises(InvalidArgument) as bad:
                await client.estimate("idea", 10, spending=Spending(budget=Budget(max_cost_usd=-1)))
            listed = await client.list()
        cli = subprocess.run(  # noqa: ASYNC221 - the CLI is a process of its own
            [
                str(Path(sys.executable).parent / "swarm"),
                "--target",
                running.target,
                "run",
                IDEA_20K,
                "-n",
                "10",
                "--estimate",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert not fake.requests and not listed.swarms, "no model was called and no swarm started"
    total = estimate.total
    assert 0 < total.low_tokens < total.high_tokens and 0 < total.low_cost_usd < total.high_cost_usd
    assert [m.role for m in estimate.models] == ["plan and synthesis", "workers"]
    assert estimate.budget_covers_low is True and estimate.budget_covers_high is False
    assert ("budget.max_cost_usd", "must be a positive number of dollars, got -1") in bad.value.violations
    assert cli.returncode == 0 and "nothing was started" in cli.stdout and "claude-sonnet-5-5" in cli.stdout


async def test_a_cost_budget_on_a_model_without_a_price_is_refused() -> None:
    with stack(workers=1) as running:
        async with AsyncSwarmClient(running.target) as client:
            with pytest.raises(InvalidArgument) as refused:
                spending = Spending(budget=Budget(max_cost_usd=1.0), worker_model="claude-unpriced-1")
                [e async for e in client.run("idea", 2, spending=spending)]
    assert any(
        field == "budget.max_cost_usd" and "no price" in text for field, text in refused.value.violations
    )


# ---- a restart keeps the budget and its accounting -------------------------------------------


class OneShotScheduler:
    """Completes each subtask at once with a known usage."""

    async def run(self, log: EventLog, subtask: events_pb2.Subtask, **_: object) -> SubtaskOutcome:
        usage = events_pb2.Usage(input_tokens=10, output_tokens=20)
        log.append(
            "subtask_started", events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id="w2", attempt=2)
        )
        log.append(
            "subtask_completed",
            events_pb2.SubtaskCompleted(
                subtask_id=subtask.id, worker_id="w2", output="new", usage=usage, attempt=2
            ),
        )
        return SubtaskOutcome("new", usage)


async def test_a_resumed_swarm_charges_what_its_interrupted_calls_held_and_keeps_its_budget() -> None:
    store = MemoryStore()
    log = EventLog(SwarmRecord("crashed"), store)
    budget = events_pb2.Budget(max_tokens=50_000)
    log.append(
        "accepted",
        events_pb2.SwarmAccepted(idea="idea", num_agents=1, model="m", provider="simulated", budget=budget),
    )
    log.append(
        "call_reserved",
        events_pb2.CallReserved(call_id="plan@2", reserved=events_pb2.Usage(input_tokens=900)),
    )
    log.append(
        "call_settled", events_pb2.CallSettled(call_id="plan@2", usage=events_pb2.Usage(input_tokens=300))
    )
    log.append(
        "plan_created",
        events_pb2.PlanCreated(subtasks=[events_pb2.Subtask(id="subtask-1", title="t", instructions="i")]),
    )
    held = events_pb2.Usage(input_tokens=700, output_tokens=4096)
    log.append(
        "subtask_started",
        events_pb2.SubtaskStarted(
            subtask_id="subtask-1", worker_id="w1", attempt=1, max_tokens=4096, reserved=held
        ),
    )
    await log.stored()
    planner = Planner(SimulatedProvider(SimulatedSettings(latency_ms=0)))
    orchestrator = Orchestrator(planner, OneShotScheduler(), store, default_model="m")  # type: ignore[arg-type]
    assert await orchestrator.recover() == ["crashed"]
    events = [e.event async for batch in await orchestrator.watch("crashed") for e in batch]
    view = await orchestrator.get("crashed")
    restarted = of(events, "subtask_failed")[0].subtask_failed
    assert restarted.usage == held, "the interrupted attempt is charged what it held"
    assert view.state == 5 and view.budget == budget
    tokens = view.spent.input_tokens + view.spent.output_tokens
    assert tokens == charged(events).tokens and 300 + 700 + 4096 + 30 < tokens <= budget.max_tokens
    synthesis = [
        e.call_reserved
        for e in of(events, "call_reserved")
        if e.call_reserved.call_id.startswith("synthesis")
    ]
    assert synthesis and synthesis[0].max_tokens <= budget.max_tokens - (300 + 700 + 4096 + 30)
    await asyncio.sleep(0)
