"""Command-line flags with environment-variable twins, so containers are configured by environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def env_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str | None,
    *,
    default: Any,
    type: Callable[[str], Any] = str,
    help: str,
    choices: tuple[str, ...] | None = None,
) -> None:
    """Adds `flag`; its default comes from `env` when that is set. A bad value exits with a clear line."""
    value = default
    raw = os.environ.get(env) if env else None
    if raw is not None and raw != "":
        try:
            value = type(raw)
        except (TypeError, ValueError):
            parser.error(f"{env}={raw!r} is not a valid value for {flag}")
        if choices is not None and value not in choices:
            parser.error(f"{env}={raw!r} is not one of {', '.join(choices)}")
    twin = f"env {env}, " if env else ""
    parser.add_argument(
        flag, default=value, type=type, choices=choices, help=f"{help} [{twin}default {default!r}]"
    )


def split_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """`host:port` or `[v6]:port`. The host may be empty: what that means is the caller's to say."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"{raw} is not a positive integer")
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"{raw} is negative")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{raw} is not a positive number")
    return value


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(f"{raw} is negative")
    return value


def add_simulated_flags(parser: argparse.ArgumentParser) -> None:
    """The simulated provider's knobs: both services take them, since both call the model."""
    env_flag(
        parser,
        "--sim-latency-ms",
        "SWARM_SIM_LATENCY_MS",
        default=300.0,
        type=non_negative_float,
        help="simulated provider: time to produce one answer, in milliseconds",
    )
    env_flag(
        parser,
        "--sim-latency-sigma",
        "SWARM_SIM_LATENCY_SIGMA",
        default=0.0,
        type=non_negative_float,
        help="simulated provider: lognormal sigma of each answer's time around --sim-latency-ms (0 = fixed)",
    )
    env_flag(
        parser,
        "--sim-chunks",
        "SWARM_SIM_CHUNKS",
        default=8,
        type=positive_int,
        help="simulated provider: chunks per streamed answer",
    )
    env_flag(
        parser,
        "--sim-failure-rate",
        "SWARM_SIM_FAILURE_RATE",
        default=0.0,
        type=non_negative_float,
        help="simulated provider: probability that a streamed call fails (for fault tests)",
    )
    env_flag(
        parser,
        "--sim-rate-limit-rate",
        "SWARM_SIM_RATE_LIMIT_RATE",
        default=0.0,
        type=non_negative_float,
        help="simulated provider: probability of a 429 (for fault tests)",
    )
    env_flag(
        parser,
        "--sim-bad-plans",
        "SWARM_SIM_BAD_PLANS",
        default=0,
        type=int,
        help="simulated provider: how many first plans come back wrong (for tests)",
    )
    env_flag(
        parser,
        "--sim-stall-rate",
        "SWARM_SIM_STALL_RATE",
        default=0.0,
        type=non_negative_float,
        help="simulated provider: probability that a call hangs until its timeout (for fault tests)",
    )
    env_flag(
        parser,
        "--sim-stall-after-chunks",
        "SWARM_SIM_STALL_AFTER_CHUNKS",
        default=0,
        type=int,
        help="simulated provider: chunks a stalling call streams before it hangs (0 = none)",
    )


def add_call_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What one connection and one call may hold of the service: both services take them."""
    env_flag(
        parser,
        "--max-streams-per-connection",
        "SWARM_MAX_STREAMS_PER_CONNECTION",
        default=1000,
        type=positive_int,
        help="HTTP/2 streams (calls) one client connection may have open at once",
    )
    env_flag(
        parser,
        "--stream-write-timeout",
        "SWARM_STREAM_WRITE_TIMEOUT_S",
        default=30.0,
        type=positive_float,
        help="seconds a streamed reply may wait for a caller that does not read it before the call ends",
    )
    env_flag(
        parser,
        "--keepalive-time",
        "SWARM_KEEPALIVE_TIME_S",
        default=30.0,
        type=positive_float,
        help="seconds of quiet on a connection before the service pings the peer",
    )
    env_flag(
        parser,
        "--keepalive-timeout",
        "SWARM_KEEPALIVE_TIMEOUT_S",
        default=20.0,
        type=positive_float,
        help="seconds a peer has to answer a ping before its connection and calls are ended",
    )
