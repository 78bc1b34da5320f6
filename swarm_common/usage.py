"""A model call's usage between its two forms: the providers' `Usage` and the API's `Usage` message."""

from __future__ import annotations

from swarm.v1 import events_pb2
from swarm_common.providers import Usage


def usage_proto(usage: Usage) -> events_pb2.Usage:
    return events_pb2.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=usage.cost_usd,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
    )


def usage_of(proto: events_pb2.Usage) -> Usage:
    return Usage(
        proto.input_tokens,
        proto.output_tokens,
        proto.cost_usd,
        cache_creation_input_tokens=proto.cache_creation_input_tokens,
        cache_read_input_tokens=proto.cache_read_input_tokens,
    )


def add(total: events_pb2.Usage, usage: events_pb2.Usage) -> None:
    """Adds `usage` into `total`, in place."""
    total.input_tokens += usage.input_tokens
    total.output_tokens += usage.output_tokens
    total.cost_usd += usage.cost_usd
    total.cache_creation_input_tokens += usage.cache_creation_input_tokens
    total.cache_read_input_tokens += usage.cache_read_input_tokens


def subtract(total: events_pb2.Usage, usage: events_pb2.Usage) -> None:
    """Takes `usage` out of `total`, in place."""
    total.input_tokens -= usage.input_tokens
    total.output_tokens -= usage.output_tokens
    total.cost_usd -= usage.cost_usd
    total.cache_creation_input_tokens -= usage.cache_creation_input_tokens
    total.cache_read_input_tokens -= usage.cache_read_input_tokens
