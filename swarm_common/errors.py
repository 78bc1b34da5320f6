"""Errors a model call can end in, as classes, each knowing whether a retry can help."""

from __future__ import annotations


class ProviderError(Exception):
    """A model call failed. The message is short and safe to show a user: no secrets, no traces."""

    retryable: bool = True
    code: str = "provider_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RateLimited(ProviderError):
    """The model API refused for rate (429) after the SDK's own retries."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ProviderError):
    """The model API is overloaded (529) after the SDK's own retries."""

    code = "overloaded"


class ProviderUnavailable(ProviderError):
    """The model API could not be reached or failed on its side (5xx, connection, timeout)."""

    code = "unavailable"


class AuthenticationFailed(ProviderError):
    """Missing or bad credentials (401/403): no retry can fix it."""

    retryable = False
    code = "unauthenticated"


class InvalidModelRequest(ProviderError):
    """The model API rejected the request itself (400/404/413/422): no retry can fix it."""

    retryable = False
    code = "invalid_request"
