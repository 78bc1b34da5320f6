"""The model API's limits, kept for the whole pool: a 40-agent swarm through a fake Messages API
that allows only a few requests and tokens per window, and answers 429 with retry-after beyond."""

from __future__ import annotations

import math

from fakes.messages_api import FakeMessagesAPI, RateLimits
from stack import stack
from swarm_checks import assert_completed
from swarm_client import AsyncSwarmClient

KEY = "sk-ant-test-rate"
WINDOW_S = 2.0
REQUESTS = 8  # per window: 240 requests per minute
OUTPUT_TOKENS = 4000  # per window


async def test_a_big_swarm_stays_inside_the_limits_at_nearly_the_allowed_rate() -> None:
    limits = RateLimits(requests=REQUESTS, output_tokens=OUTPUT_TOKENS, window_s=WINDOW_S)
    with FakeMessagesAPI(api_key=KEY, rate_limits=limits) as fake:
        env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.base_url}
        per_minute = 60 / WINDOW_S
        orchestrator_args = [
            "--provider",
            "anthropic",
            "--rate-window",
            str(WINDOW_S),
            "--model-rpm",
            str(int(REQUESTS * per_minute)),
            "--model-output-tpm",
            str(int(OUTPUT_TOKENS * per_minute)),
        ]
        with stack(
            workers=2, env=env, worker_args=["--provider", "anthropic"], orchestrator_args=orchestrator_args
        ) as running:
            async with AsyncSwarmClient(running.target) as client:
                events = [e async for e in client.run("Index the city archive", 40)]
        accepted = sorted(call.at for call in fake.accepted)
    assert_completed(events, 40)
    assert not [e for e in events if e.HasField("subtask_failed")], "zero failed subtasks"
    assert len(accepted) == 42, "a plan, 40 subtasks and a synthesis"
    # The fastest the fake allows: REQUESTS at once, then REQUESTS more each window.
    ideal_s = (math.ceil(len(accepted) / REQUESTS) - 1) * WINDOW_S
    measured_s = accepted[-1] - accepted[0]
    print(
        f"rate: {len(accepted)} requests in {measured_s:.2f}s (ideal {ideal_s:.2f}s), "
        f"{fake.rate_limited} answered 429"
    )
    assert ideal_s / measured_s >= 0.8, f"{ideal_s / measured_s:.2f} of the allowed rate"
