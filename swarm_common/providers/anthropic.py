"""The Anthropic Messages API through the official SDK's async client.

The SDK's own retries (429, 529, 5xx, connection errors, honouring retry-after) stay on; what is
left after them becomes a `ProviderError` with a short message that is safe to show a user.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
from anthropic.types import MessageParam, TextBlockParam

from swarm_common import pricing, prompts
from swarm_common.errors import (
    AuthenticationFailed,
    InvalidModelRequest,
    Overloaded,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from swarm_common.providers.base import OutlineRequest, PlanDraft, PlanRequest, StreamRequest, Usage


def _api_message(error: anthropic.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:300]
    return f"HTTP {error.status_code}"


def _retry_after(error: anthropic.APIStatusError) -> float | None:
    """retry-after-ms first (more precise), as the SDK itself reads them."""
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                continue
    return None


# An error event inside a 200 stream carries only its type: the status it stands for.
_STATUS_OF_ERROR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _status(error: anthropic.APIStatusError) -> int:
    if error.status_code >= 400:
        return error.status_code
    body = error.body
    inner = body.get("error") if isinstance(body, dict) else None
    error_type = inner.get("type") if isinstance(inner, dict) else None
    return _STATUS_OF_ERROR_TYPE.get(str(error_type), 500)


def translate_error(error: anthropic.AnthropicError) -> ProviderError:
    """The SDK's error classes, mapped onto ours by what a caller can do about them."""
    if isinstance(error, anthropic.APIStatusError):
        detail = _api_message(error)
        status = _status(error)
        if status in (401, 403):
            return AuthenticationFailed(
                f"the model API rejected the credentials ({status}): check ANTHROPIC_API_KEY ({detail})"
            )
        if status == 429:
            return RateLimited(f"the model API is rate limiting (429): {detail}", _retry_after(error))
        if status == 529:
            return Overloaded(f"the model API is overloaded (529): {detail}")
        if status >= 500:
            return ProviderUnavailable(f"the model API failed ({status}): {detail}")
        return InvalidModelRequest(f"the model API rejected the request ({status}): {detail}")
    if isinstance(error, anthropic.APITimeoutError):
        return ProviderUnavailable("the model API did not answer in time")
    if isinstance(error, anthropic.APIConnectionError):
        return ProviderUnavailable("the model API could not be reached")
    return ProviderUnavailable(f"the model call failed: {type(error).__name__}")


def _timeout(timeout_s: float | None) -> float | anthropic.NotGiven:
    """No deadline means the SDK's own default timeout, not none at all: a stalled API must not
    hang a worker forever."""
    return anthropic.NOT_GIVEN if timeout_s is None else timeout_s


def _usage(model: str, message: Any) -> Usage:
    usage = message.usage
    counts = [
        int(getattr(usage, name, 0) or 0)
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
    ]
    return Usage(
        counts[0],
        counts[1],
        pricing.cost_usd(model, *counts),
        str(message.stop_reason or ""),
        cache_creation_input_tokens=counts[2],
        cache_read_input_tokens=counts[3],
    )


def _message(request: StreamRequest) -> MessageParam:
    """The user message: the prompt alone, or the shared blocks first, each marked for the prompt
    cache as asked, then the prompt."""
    if not request.shared:
        return {"role": "user", "content": request.prompt}
    blocks: list[TextBlockParam] = []
    for block in request.shared:
        text: TextBlockParam = {"type": "text", "text": block.text}
        if block.cache:
            text["cache_control"] = {"type": "ephemeral"}
        blocks.append(text)
    blocks.append({"type": "text", "text": request.prompt})
    return {"role": "user", "content": blocks}


class AnthropicProvider:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_retries: int = 2,
    ) -> None:
        # api_key and base_url fall back to ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL inside the SDK.
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=max_retries)

    @property
    def name(self) -> str:
        return "anthropic"

    async def stream(self, request: StreamRequest) -> AsyncIterator[str | Usage]:
        try:
            async with self._client.messages.stream(
                model=request.model,
                max_tokens=request.max_tokens,
                system=request.system,
                messages=[_message(request)],
                timeout=_timeout(request.timeout_s),
            ) as stream:
                async for text in stream.text_stream:
                    yield text
                message = await stream.get_final_message()
        except anthropic.AnthropicError as error:
            raise translate_error(error) from None
        except httpx2.TransportError:
            # The SDK lets a connection that breaks mid-stream through as the transport's error.
            raise ProviderUnavailable("the model API connection broke off mid-answer") from None
        yield _usage(request.model, message)

    async def plan(self, request: PlanRequest) -> PlanDraft:
        return await self._structured(
            request.model,
            prompts.PLAN_SYSTEM,
            prompts.plan_prompt(request),
            prompts.PLAN_SCHEMA,
            request.max_tokens,
            request.timeout_s,
        )

    async def outline(self, request: OutlineRequest) -> PlanDraft:
        return await self._structured(
            request.model,
            prompts.OUTLINE_SYSTEM,
            prompts.outline_prompt(request),
            prompts.OUTLINE_SCHEMA,
            request.max_tokens,
            request.timeout_s,
        )

    async def _structured(
        self,
        model: str,
        system: str,
        prompt: str,
        schema: dict[str, Any],
        max_tokens: int,
        timeout_s: float | None,
    ) -> PlanDraft:
        """One answer as JSON matching `schema` (structured output), whole."""
        try:
            message = await self._client.messages.create(
                model=model,
                max_tokens=max_tokens,
                system=system,
                messages=[{"role": "user", "content": prompt}],
                output_config={"format": {"type": "json_schema", "schema": schema}},
                timeout=_timeout(timeout_s),
            )
        except anthropic.AnthropicError as error:
            raise translate_error(error) from None
        text = "".join(block.text for block in message.content if block.type == "text")
        return PlanDraft(text, _usage(model, message))

    async def aclose(self) -> None:
        await self._client.close()
