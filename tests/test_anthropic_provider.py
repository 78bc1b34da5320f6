"""AnthropicProvider through the real anthropic SDK, against the local fake Messages API (no internet)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import typing
from collections.abc import AsyncIterator, Iterator

import pytest
from anthropic._data import DEPRECATED_MODELS
from anthropic.types.model_param import ModelParam

from fakes.messages_api import FakeMessagesAPI, Fault, RateLimits, Reply, StreamFault
from swarm_common import pricing, prompts
from swarm_common.errors import (
    AuthenticationFailed,
    InvalidModelRequest,
    Overloaded,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from swarm_common.providers import (
    DEFAULT_MODEL,
    PlanRequest,
    ProviderConfigError,
    StreamRequest,
    Usage,
    make_provider,
    resolve_provider_name,
)
from swarm_common.providers.anthropic import AnthropicProvider

KEY = "test-key"
MODEL = "claude-sonnet-5-5"
SYSTEM = "You are a careful test agent."
PROMPT = "Write a haiku about parallel agents that share nothing but a deadline and a queue."
# Every wait in this file is bounded; this one is for a single model call against the local fake.
CALL_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's environment may send these tests to the real API or a proxy."""
    for name in (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CUSTOM_HEADERS",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI(api_key=KEY, chunks=5) as api:
        yield api


@pytest.fixture
async def provider(fake: FakeMessagesAPI) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(api_key=KEY, base_url=fake.base_url)
    yield p
    await p.aclose()


def stream_request(**changes: typing.Any) -> StreamRequest:
    return StreamRequest(**{"model": MODEL, "system": SYSTEM, "prompt": PROMPT, "max_tokens": 512, **changes})


async def collect(provider: AnthropicProvider, request: StreamRequest) -> list[str | Usage]:
    async def run() -> list[str | Usage]:
        return [item async for item in provider.stream(request)]

    return await asyncio.wait_for(run(), CALL_TIMEOUT_S)


async def plan(provider: AnthropicProvider, request: PlanRequest) -> typing.Any:
    return await asyncio.wait_for(provider.plan(request), CALL_TIMEOUT_S)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 1. streaming --------------------------------------------------------------------------------


async def test_stream_yields_chunks_in_order_then_one_usage(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    text = "Agents in parallel / each one holds a slice of sky / the queue keeps the time."
    fake.script(Reply(text, input_tokens=1234, output_tokens=567))

    items = await collect(provider, stream_request())

    *chunks, last = items
    assert len(chunks) == 5
    assert all(isinstance(chunk, str) and chunk for chunk in chunks)
    assert "".join(typing.cast(list[str], chunks)) == text
    assert last == Usage(1234, 567, pricing.cost_usd(MODEL, 1234, 567), stop_reason="end_turn")
    assert last.cost_usd > 0

    request = fake.last_request
    assert request.body["stream"] is True
    assert request.body["model"] == MODEL
    assert request.body["system"] == SYSTEM
    assert request.body["max_tokens"] == 512
    assert request.body["messages"] == [{"role": "user", "content": PROMPT}]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.stream_outcome == "completed"


async def test_stream_default_answer_reports_the_fakes_token_counts(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    items = await collect(provider, stream_request())

    assert [i for i, item in enumerate(items) if isinstance(item, Usage)] == [len(items) - 1]
    assert "".join(item for item in items if isinstance(item, str)) == f"fake answer to: {PROMPT[:60]}"
    usage = items[-1]
    assert isinstance(usage, Usage)
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.cost_usd == pricing.cost_usd(MODEL, usage.input_tokens, usage.output_tokens)
    assert (fake.streams_opened, fake.streams_completed, fake.open_streams) == (1, 1, 0)


# --- 2. planning ---------------------------------------------------------------------------------


async def test_plan_asks_for_json_schema_and_gets_the_requested_count(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    draft = await plan(provider, PlanRequest(MODEL, "Launch a bakery", num_agents=4))

    subtasks = json.loads(draft.text)["subtasks"]
    assert len(subtasks) == 4
    assert all(item["title"] and item["instructions"] for item in subtasks)
    assert draft.usage.input_tokens > 0 and draft.usage.output_tokens > 0
    usage = draft.usage
    assert usage.cost_usd == pricing.cost_usd(MODEL, usage.input_tokens, usage.output_tokens)

    body = fake.last_request.body
    assert body.get("stream", False) is False
    assert body["model"] == MODEL
    assert body["system"] == prompts.PLAN_SYSTEM
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": prompts.PLAN_SCHEMA}}
    assert "Launch a bakery" in fake.last_request.last_user_text
    assert "exactly 4 independent subtasks" in fake.last_request.last_user_text


async def test_plan_sends_the_feedback_and_returns_the_text_unvalidated(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(Reply('{"subtasks": [{"title": "only one"'))

    draft = await plan(
        provider,
        PlanRequest(MODEL, "Launch a bakery", num_agents=3, feedback="it had 2 subtasks instead of 3"),
    )

    assert draft.text == '{"subtasks": [{"title": "only one"'  # the planner validates, not the provider
    assert "it had 2 subtasks instead of 3" in fake.last_request.last_user_text


# --- 3. the SDK's retries ------------------------------------------------------------------------

TRANSIENT = [
    pytest.param(Fault.rate_limited(retry_after_ms=20), id="429"),
    pytest.param(Fault.overloaded(retry_after_ms=20), id="529"),
]


@pytest.mark.parametrize("fault", TRANSIENT)
async def test_stream_succeeds_after_a_transient_error(
    fake: FakeMessagesAPI, provider: AnthropicProvider, fault: Fault
) -> None:
    fake.script(fault, Reply("made it"))

    items = await collect(provider, stream_request())

    assert "".join(typing.cast(list[str], items[:-1])) == "made it"
    assert isinstance(items[-1], Usage)
    assert [r.status for r in fake.requests] == [fault.status, 200]
    assert fake.requests[1].headers["x-stainless-retry-count"] == "1"


@pytest.mark.parametrize("fault", TRANSIENT)
async def test_plan_succeeds_after_a_transient_error(
    fake: FakeMessagesAPI, provider: AnthropicProvider, fault: Fault
) -> None:
    fake.script(fault)

    draft = await plan(provider, PlanRequest(MODEL, "Launch a bakery", num_agents=2))

    assert len(json.loads(draft.text)["subtasks"]) == 2
    assert [r.status for r in fake.requests] == [fault.status, 200]


async def test_rate_limits_of_the_fake_are_waited_out_by_the_sdk() -> None:
    window = 0.4
    with FakeMessagesAPI(rate_limits=RateLimits(requests=2, window_s=window)) as api:
        provider = AnthropicProvider(api_key=KEY, base_url=api.base_url, max_retries=4)
        try:
            results = await asyncio.gather(*(collect(provider, stream_request()) for _ in range(4)))
        finally:
            await provider.aclose()

    assert all(isinstance(items[-1], Usage) for items in results)
    assert api.rate_limited >= 1
    assert len(api.accepted) == 4
    assert api.peak_requests(window) <= 2


# --- 4. what is left after the retries -------------------------------------------------------------


async def test_persistent_rate_limit_raises_rate_limited(fake: FakeMessagesAPI) -> None:
    fake.script(Fault.rate_limited(retry_after_ms=20, message="rate limit " + "x" * 5000), times=4)
    provider = AnthropicProvider(api_key=KEY, base_url=fake.base_url, max_retries=1)
    try:
        with pytest.raises(RateLimited) as stream_error:
            await collect(provider, stream_request())
        with pytest.raises(RateLimited) as plan_error:
            await plan(provider, PlanRequest(MODEL, "idea", num_agents=2))
    finally:
        await provider.aclose()

    for error in (stream_error.value, plan_error.value):
        assert error.retryable is True
        assert error.code == "rate_limited"
        assert "429" in error.message
        assert len(error.message) < 400  # the API's long message is cut short
        assert error.retry_after_s == 0.02  # retry-after-ms wins over the whole-second retry-after
    assert len(fake.requests) == 4  # max_retries=1: two tries per call


async def test_persistent_overload_raises_overloaded(fake: FakeMessagesAPI) -> None:
    fake.script(Fault.overloaded(retry_after_ms=10), times=2)
    provider = AnthropicProvider(api_key=KEY, base_url=fake.base_url, max_retries=1)
    try:
        with pytest.raises(Overloaded) as error:
            await collect(provider, stream_request())
    finally:
        await provider.aclose()

    assert error.value.retryable is True
    assert "529" in error.value.message
    assert len(fake.requests) == 2


# --- 5. credentials --------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["stream", "plan"])
async def test_bad_key_raises_authentication_failed_without_the_key(fake: FakeMessagesAPI, call: str) -> None:
    secret = "sk-ant-api03-wrong-secret-0123456789"
    provider = AnthropicProvider(api_key=secret, base_url=fake.base_url)
    try:
        with pytest.raises(AuthenticationFailed) as error:
            if call == "stream":
                await collect(provider, stream_request())
            else:
                await plan(provider, PlanRequest(MODEL, "idea", num_agents=2))
    finally:
        await provider.aclose()

    assert error.value.retryable is False
    assert "ANTHROPIC_API_KEY" in error.value.message
    assert "invalid x-api-key" in error.value.message
    assert secret not in str(error.value) and secret not in repr(error.value)
    assert [r.status for r in fake.requests] == [401]  # no retry can fix a key


# --- 6. bad requests and unreachable APIs ----------------------------------------------------------


async def test_bad_request_raises_invalid_model_request(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(Fault.bad_request("max_tokens: 999999 > 64000, the maximum for this model"), times=2)

    with pytest.raises(InvalidModelRequest) as stream_error:
        await collect(provider, stream_request())
    with pytest.raises(InvalidModelRequest) as plan_error:
        await plan(provider, PlanRequest(MODEL, "idea", num_agents=2))

    for error in (stream_error.value, plan_error.value):
        assert error.retryable is False
        assert "400" in error.message and "max_tokens: 999999" in error.message
    assert len(fake.requests) == 2  # not retried


async def test_unknown_model_raises_invalid_model_request() -> None:
    with FakeMessagesAPI(known_models={MODEL}) as api:
        provider = AnthropicProvider(api_key=KEY, base_url=api.base_url)
        try:
            with pytest.raises(InvalidModelRequest) as error:
                await collect(provider, stream_request(model="claude-nonexistent-9"))
        finally:
            await provider.aclose()
    assert "404" in error.value.message and "claude-nonexistent-9" in error.value.message


async def test_closed_port_raises_provider_unavailable() -> None:
    provider = AnthropicProvider(api_key=KEY, base_url=f"http://127.0.0.1:{closed_port()}", max_retries=0)
    try:
        with pytest.raises(ProviderUnavailable) as stream_error:
            await collect(provider, stream_request())
        with pytest.raises(ProviderUnavailable) as plan_error:
            await plan(provider, PlanRequest(MODEL, "idea", num_agents=2))
    finally:
        await provider.aclose()
    for error in (stream_error.value, plan_error.value):
        assert error.retryable is True
        assert "could not be reached" in error.message


async def test_slow_api_raises_provider_unavailable_after_the_timeout(fake: FakeMessagesAPI) -> None:
    fake.script(Reply("too late", delay_s=3.0))
    provider = AnthropicProvider(api_key=KEY, base_url=fake.base_url, max_retries=0)
    try:
        with pytest.raises(ProviderUnavailable) as error:
            await collect(provider, stream_request(timeout_s=0.3))
    finally:
        await provider.aclose()
    assert "in time" in error.value.message


# Bugs these tests found in the provider, kept as regressions.


async def test_mid_stream_overload_raises_overloaded(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(StreamFault(after_chunks=2, error_type="overloaded_error"))
    with pytest.raises(Overloaded):
        await collect(provider, stream_request())


async def test_connection_dropped_mid_stream_raises_provider_unavailable(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(StreamFault(after_chunks=2, error_type=None))
    with pytest.raises(ProviderError):
        await collect(provider, stream_request())


async def test_a_request_without_timeout_keeps_the_sdk_default(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    await collect(provider, stream_request(timeout_s=None))
    assert fake.last_request.headers.get("x-stainless-read-timeout") == "600"


async def test_an_answer_over_max_tokens_is_cut_off_with_that_stop_reason(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(Reply("word " * 400), Reply("word " * 4000))

    items = await collect(provider, stream_request(max_tokens=100))
    draft = await plan(provider, PlanRequest(MODEL, "Launch a bakery", num_agents=40, max_tokens=300))

    usage = items[-1]
    assert isinstance(usage, Usage) and usage.stop_reason == "max_tokens" and usage.cut_off
    assert usage.output_tokens == 100 and len("".join(str(i) for i in items[:-1])) == 400
    assert draft.usage.stop_reason == "max_tokens" and len(draft.text) == 1200
    assert fake.last_request.body["max_tokens"] == 300


async def test_a_prompt_over_the_context_window_is_refused_with_the_apis_message() -> None:
    with FakeMessagesAPI(api_key=KEY, context_window=1000) as small:
        narrow = AnthropicProvider(api_key=KEY, base_url=small.base_url)
        try:
            with pytest.raises(InvalidModelRequest, match=r"400.*exceed context limit: .* > 1000"):
                await collect(narrow, stream_request(prompt="x" * 3000))
        finally:
            await narrow.aclose()
    assert [r.status for r in small.requests] == [400], "no retry can fix it"


# --- 7. choosing the provider from the environment -------------------------------------------------


async def test_make_provider_uses_the_environment_key_and_base_url(
    fake: FakeMessagesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)  # the proxy pattern

    provider = make_provider("anthropic")
    try:
        assert provider.name == "anthropic"
        items = await asyncio.wait_for(_drain(provider.stream(stream_request())), CALL_TIMEOUT_S)
    finally:
        await provider.aclose()

    assert isinstance(items[-1], Usage)
    assert fake.last_request.headers["authorization"] == f"Bearer {KEY}"


async def _drain(stream: AsyncIterator[str | Usage]) -> list[str | Usage]:
    return [item async for item in stream]


def test_make_provider_anthropic_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ProviderConfigError, match="ANTHROPIC_API_KEY"):
        make_provider("anthropic")


def test_auto_follows_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_provider_name("auto") == "simulated"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "placeholder")
    assert resolve_provider_name("auto") == "anthropic"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "")
    assert resolve_provider_name("auto") == "simulated"


# --- 8. the default model ----------------------------------------------------------------------------


def test_default_model_is_current_in_the_installed_sdk() -> None:
    literal_models = {
        value
        for arm in typing.get_args(ModelParam)
        if typing.get_origin(arm) is typing.Literal
        for value in typing.get_args(arm)
    }
    assert literal_models, "the SDK's ModelParam lists no models: has its shape changed?"
    assert DEFAULT_MODEL in literal_models
    assert DEFAULT_MODEL not in DEPRECATED_MODELS
    assert pricing.cost_usd(DEFAULT_MODEL, 1_000_000, 0) > 0


# --- 9. cancelling closes the HTTP stream --------------------------------------------------------------


async def test_closing_the_stream_early_disconnects_from_the_api(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(Reply("word " * 40, chunks=40, chunk_delay_s=0.05))  # about 2 s if read to the end

    async with contextlib.aclosing(provider.stream(stream_request())) as stream:
        async for item in stream:
            assert isinstance(item, str)
            break

    assert await fake.async_wait_for(lambda: fake.streams_disconnected == 1, timeout_s=5.0)
    assert fake.streams_completed == 0
    assert fake.last_request.stream_outcome == "disconnected"
    assert fake.open_streams == 0


async def test_cancelling_the_consumer_task_disconnects_from_the_api(
    fake: FakeMessagesAPI, provider: AnthropicProvider
) -> None:
    fake.script(Reply("word " * 40, chunks=40, chunk_delay_s=0.05))
    first_chunk = asyncio.Event()
    received: list[str | Usage] = []

    async def consume() -> None:
        async for item in provider.stream(stream_request()):
            received.append(item)
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), CALL_TIMEOUT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, CALL_TIMEOUT_S)

    assert await fake.async_wait_for(lambda: fake.streams_disconnected == 1, timeout_s=5.0)
    assert fake.streams_completed == 0
    assert not any(isinstance(item, Usage) for item in received)
