"""Model providers behind one interface, and the choice between them."""

from __future__ import annotations

import os
from typing import Literal, get_args

from swarm_common.providers.base import (
    DEFAULT_ANSWER_MAX_TOKENS,
    OutlineRequest,
    PlanArea,
    PlanDraft,
    PlanRequest,
    PromptBlock,
    Provider,
    StreamRequest,
    Usage,
)
from swarm_common.providers.observed import ObservedProvider
from swarm_common.providers.simulated import SimulatedProvider, SimulatedSettings

__all__ = [
    "DEFAULT_ANSWER_MAX_TOKENS",
    "DEFAULT_MODEL",
    "PROVIDER_CHOICES",
    "ObservedProvider",
    "OutlineRequest",
    "PlanArea",
    "PlanDraft",
    "PlanRequest",
    "PromptBlock",
    "Provider",
    "ProviderChoice",
    "ProviderConfigError",
    "SimulatedProvider",
    "SimulatedSettings",
    "StreamRequest",
    "Usage",
    "make_provider",
    "resolve_provider_name",
]

# A current model that the installed SDK lists and does not mark deprecated (a test checks both).
DEFAULT_MODEL = "claude-sonnet-5-5"
ProviderChoice = Literal["auto", "anthropic", "simulated"]
PROVIDER_CHOICES: tuple[str, ...] = get_args(ProviderChoice)


class ProviderConfigError(ValueError):
    """The provider cannot be set up as asked; the message says what to change."""


def resolve_provider_name(choice: str) -> str:
    """`auto` is anthropic when ANTHROPIC_API_KEY is set, else simulated."""
    if choice not in PROVIDER_CHOICES:
        raise ProviderConfigError(f"unknown provider {choice!r}: choose one of {', '.join(PROVIDER_CHOICES)}")
    if choice == "auto":
        return "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "simulated"
    return choice


def make_provider(choice: str, simulated: SimulatedSettings | None = None) -> Provider:
    """The provider chosen, its calls measured and traced (ObservedProvider)."""
    return ObservedProvider(_chosen(choice, simulated))


def _chosen(choice: str, simulated: SimulatedSettings | None) -> Provider:
    name = resolve_provider_name(choice)
    if name == "simulated":
        return SimulatedProvider(simulated)
    if not os.environ.get("ANTHROPIC_API_KEY"):
        raise ProviderConfigError(
            "--provider anthropic needs ANTHROPIC_API_KEY (behind a proxy that adds the key, "
            "set it to any placeholder and point ANTHROPIC_BASE_URL at the proxy)"
        )
    from swarm_common.providers.anthropic import AnthropicProvider

    return AnthropicProvider()
