"""A service's settings as one declared pydantic-settings model: its flags, their environment
twins, `--help`, validation and README's configuration table all come from the model's fields.

A value comes from its flag on the command line, else its environment twin, else the field's
default. A field's environment twin is `SWARM_` + its name in capitals unless it declares another
(`--model` reads `CLAUDE_MODEL`); its flag is its name in kebab case unless it declares another
(`subtask_timeout_s` is `--subtask-timeout`). pydantic-settings reads the environment, and pydantic
validates every value whatever its source. argparse, built from the model, reads the command line:
the contract's flag and variable names follow no single rule that pydantic-settings' own
command-line source could derive (it would offer `--subtask-timeout-s`, or `--claude-model` beside
`--model`). A bad value is one line naming its flag or variable, and exit status 2.

Adding a setting is adding one field, `name: Type = setting(default, "what it means")`.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    AliasGenerator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from swarm_common.config import split_host_port
from swarm_common.providers import DEFAULT_MODEL, ProviderChoice, SimulatedSettings
from swarm_common.serving import CallLimits
from swarm_common.tls import ServerTls, TlsConfigError

__all__ = [
    "LISTEN",
    "HostPort",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveInt",
    "ServiceSettings",
    "SimulatedProviderSettings",
    "env_name",
    "flag_name",
    "setting",
    "settings_table",
]


def _host_port(text: str) -> str:
    split_host_port(text, "address")
    return text


HostPort = Annotated[str, AfterValidator(_host_port)]
"""`host:port` or `[v6]:port`; an empty host means every interface."""


def _optional_host_port(text: str) -> str:
    return _host_port(text) if text else text


OptionalHostPort = Annotated[str, AfterValidator(_optional_host_port)]
"""A HostPort, or empty for "off"."""

LISTEN = "address to serve on; port 0 picks a free one. A service prints `listening on HOST:PORT` when bound"


def setting(default: Any, description: str, *, flag: str | None = None, env: str | None = None) -> Any:
    """One field of a settings model. `description` is its `--help` text and its meaning in README's
    table (where Markdown backticks are kept); `flag` and `env` name it where its kebab-case name
    and `SWARM_NAME` will not do."""
    return Field(default, description=description, validation_alias=env, json_schema_extra={"flag": flag})


def _env_twin(name: str) -> str:
    return f"SWARM_{name.upper()}"


class SimulatedProviderSettings(BaseSettings):
    """the simulated provider (offline runs, demos, tests and benchmarks)

    The first line of a settings class's docstring titles its flags' group in `--help`."""

    model_config = SettingsConfigDict(
        alias_generator=AliasGenerator(validation_alias=_env_twin),
        case_sensitive=True,
        env_ignore_empty=True,  # an empty variable is an unset one, as compose's `${X:-}` gives
        extra="forbid",
        frozen=True,
    )

    sim_latency_ms: NonNegativeFloat = setting(300.0, "simulated provider: time to produce one answer")
    sim_latency_sigma: NonNegativeFloat = setting(
        0.0,
        "simulated provider: each answer's time is lognormal around `--sim-latency-ms` with this sigma "
        "(0 = always that time)",
    )
    sim_chunks: PositiveInt = setting(8, "simulated provider: chunks per answer")
    sim_failure_rate: NonNegativeFloat = setting(
        0.0, "simulated provider: probability that a call fails (fault tests)"
    )
    sim_rate_limit_rate: NonNegativeFloat = setting(
        0.0, "simulated provider: probability that a call is rate-limited (fault tests)"
    )
    sim_bad_plans: int = setting(0, "simulated provider: how many first plans come back wrong (tests)")
    sim_stall_rate: NonNegativeFloat = setting(
        0.0, "simulated provider: probability that a call hangs until its timeout (fault tests)"
    )
    sim_stall_after_chunks: int = setting(
        0, "simulated provider: chunks a stalling call streams before it hangs (0 = none)"
    )
    sim_answer_words: int = setting(0, "simulated provider: words an answer is padded to (0 = a short one)")
    sim_seed: int = setting(
        0,
        "simulated provider: seeds its draws (0 = unseeded); each subtask's attempt then takes the same "
        "time in every run (benchmarks compare runs)",
    )

    def simulated(self) -> SimulatedSettings:
        return SimulatedSettings(
            latency_ms=self.sim_latency_ms,
            latency_sigma=self.sim_latency_sigma,
            chunks=self.sim_chunks,
            failure_rate=self.sim_failure_rate,
            rate_limit_rate=self.sim_rate_limit_rate,
            bad_plans=self.sim_bad_plans,
            stall_rate=self.sim_stall_rate,
            stall_after_chunks=self.sim_stall_after_chunks,
            answer_words=self.sim_answer_words,
            seed=self.sim_seed or None,
        )


class ServiceSettings(SimulatedProviderSettings):
    """every service

    What every service is told: which model to call and how, when to stop, what to log. A service's
    own model names its program, says what it does, and declares its `listen` with its own port."""

    prog: ClassVar[str]
    description: ClassVar[str]

    provider: ProviderChoice = setting(
        "auto", "`anthropic`, `simulated`, or `auto` (anthropic when `ANTHROPIC_API_KEY` is set)"
    )
    model: str = setting(DEFAULT_MODEL, "default model", env="CLAUDE_MODEL")
    shutdown_grace_s: NonNegativeFloat = setting(
        30.0,
        "after SIGTERM: seconds running swarms (orchestrator) or subtasks (worker) may take to finish",
        flag="--shutdown-grace",
    )
    log_level: str = setting("INFO", "logs are JSON lines on standard error")
    metrics_listen: OptionalHostPort = setting(
        "",
        "HOST:PORT serving Prometheus `/metrics` over HTTP; empty = off. Port 0 picks a free one, and "
        "the service logs `metrics served on http://HOST:PORT/metrics`",
    )
    max_streams_per_connection: PositiveInt = setting(
        1000,
        "calls one client connection may have open at once; beyond, a call is refused (a gRPC client "
        "reports `UNAVAILABLE`)",
    )
    stream_write_timeout_s: PositiveFloat = setting(
        30.0,
        "seconds a streamed reply may wait for a caller that does not read before its call ends",
        flag="--stream-write-timeout",
    )
    keepalive_time_s: PositiveFloat = setting(
        30.0, "seconds of quiet on a connection before the service pings the peer", flag="--keepalive-time"
    )
    keepalive_timeout_s: PositiveFloat = setting(
        20.0,
        "seconds a peer has to answer a ping before its connection and its calls are ended",
        flag="--keepalive-timeout",
    )

    max_message_bytes: PositiveInt = setting(
        4 * 1024 * 1024, "largest request message a call may bring (4 MiB); beyond, `RESOURCE_EXHAUSTED`"
    )
    max_metadata_bytes: PositiveInt = setting(
        16 * 1024, "most request metadata (headers) a call may bring (16 KiB); beyond, `RESOURCE_EXHAUSTED`"
    )
    tls_cert: str = setting(
        "",
        "PEM certificate (chain) to serve TLS with; set = TLS only. A renewed file is served from the next "
        "connection on, without a restart",
    )
    tls_key: str = setting("", "PEM private key of `--tls-cert`")
    tls_client_ca: str = setting(
        "", "PEM CA that client certificates must be signed by: set = clients without one are refused (mTLS)"
    )

    def server_tls(self, log: logging.Logger) -> ServerTls | None:
        """The TLS to serve with, or None for plaintext; files that cannot be used raise
        TlsConfigError (a ValueError: exit status 2)."""
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        if not (self.tls_cert and self.tls_key):
            raise TlsConfigError("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
        return ServerTls(self.tls_cert, self.tls_key, self.tls_client_ca, log=log)

    def call_limits(self) -> CallLimits:
        return CallLimits(
            max_streams_per_connection=self.max_streams_per_connection,
            stream_write_timeout_s=self.stream_write_timeout_s,
            keepalive_time_s=self.keepalive_time_s,
            keepalive_timeout_s=self.keepalive_timeout_s,
            max_message_bytes=self.max_message_bytes,
            max_metadata_bytes=self.max_metadata_bytes,
        )

    @classmethod
    def from_command_line(cls, argv: Sequence[str] | None = None) -> Self:
        """The settings from `argv` (default: sys.argv), the environment and the defaults. A bad
        value exits 2 with one line on standard error, as argparse does for an unknown flag."""
        parser = _Parser(prog=cls.prog, description=cls.description)
        for title, names in _groups(cls):
            group = parser.add_argument_group(title)
            for name in names:
                _add_flag(group, name, cls.model_fields[name])
        given: dict[str, Any] = vars(parser.parse_args(argv))
        try:
            # Keyed by environment name, pydantic-settings' name for a field: what was given
            # beats the environment, which beats the default.
            return cls(**{env_name(cls.model_fields[name]): value for name, value in given.items()})
        except ValidationError as error:
            parser.error("; ".join(_describe(cls, problem, given) for problem in error.errors()))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, without argparse's usage block: `--help` is there for that.
        self.exit(2, f"{self.prog}: {message}\n")


def flag_name(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra
    declared = extra.get("flag") if isinstance(extra, dict) else None
    return str(declared) if declared else "--" + name.replace("_", "-")


def env_name(field: FieldInfo) -> str:
    return str(field.validation_alias)


def _groups(cls: type[ServiceSettings]) -> list[tuple[str, list[str]]]:
    """The model's fields by the class that declares them, the service's own first; a group's title
    is its class's docstring."""
    groups: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, SimulatedProviderSettings)):
            continue
        names = [n for n in inspect.get_annotations(klass) if n in cls.model_fields and n not in seen]
        seen.update(names)
        if names:
            title = (klass.__doc__ or klass.__name__).strip().splitlines()[0].rstrip(".")
            groups.append((title, names))
    return groups


def _choices(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _is_switch(annotation: Any) -> bool:
    """A bool setting is a flag that takes no value: given means true."""
    if get_origin(annotation) in (Union, types.UnionType):
        return bool in get_args(annotation)
    return annotation is bool


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_flag(parser: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    flag = flag_name(name, field)
    description = (field.description or "").replace("`", "").replace("%", "%%")
    kind: dict[str, Any]
    if _is_switch(field.annotation):
        kind = {"action": "store_const", "const": True}
    else:
        choices = _choices(field.annotation)
        kind = {
            "metavar": "{" + ",".join(map(str, choices)) + "}"
            if choices
            else flag[2:].replace("-", "_").upper()
        }
    # SUPPRESS: a flag not given leaves no value behind, so the environment and the default get
    # their turn.
    parser.add_argument(
        flag,
        dest=name,
        default=argparse.SUPPRESS,
        help=f"{description} [env {env_name(field)}, default {_shown(field.default)}]",
        **kind,
    )


def _describe(cls: type[ServiceSettings], problem: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """One problem as `--flag 'value': what is wrong`, or `ENV='value' (--flag): what is wrong`."""
    key = str(problem["loc"][0]) if problem["loc"] else ""
    name = next((n for n, f in cls.model_fields.items() if key in (n, env_name(f))), "")
    if problem["type"] == "value_error":
        reason = str(problem["ctx"]["error"])
    else:
        reason = str(problem["msg"])
        reason = reason[:1].lower() + reason[1:]
    if not name:
        return f"{key}: {reason}"
    field = cls.model_fields[name]
    if name in given:
        return f"{flag_name(name, field)} {problem['input']!r}: {reason}"
    return f"{env_name(field)}={problem['input']!r} (for {flag_name(name, field)}): {reason}"


def settings_table(services: Mapping[str, type[ServiceSettings]]) -> str:
    """README's configuration table, in Markdown: a row per flag, grouped as `--help` groups them
    (the services' own settings, then what every service takes, then the simulated provider's).
    A flag that not every service takes says which do; differing defaults are given per service."""
    rows: dict[str, list[tuple[int, str, FieldInfo]]] = {}
    for service, cls in services.items():
        for depth, (_, names) in enumerate(_groups(cls)):
            for name in names:
                field = cls.model_fields[name]
                rows.setdefault(flag_name(name, field), []).append((depth, service, field))
    lines = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for flag in sorted(rows, key=lambda flag: min(depth for depth, _, _ in rows[flag])):
        where = rows[flag]
        meanings = {field.description for _, _, field in where}
        envs = {env_name(field) for _, _, field in where}
        if len(meanings) > 1 or len(envs) > 1:
            raise ValueError(f"{flag} means different things to {', '.join(s for _, s, _ in where)}")
        defaults = [(service, _cell(field.default)) for _, service, field in where]
        if len({cell for _, cell in defaults}) == 1:
            default = defaults[0][1]
        else:
            default = ", ".join(f"{service} {cell}" for service, cell in defaults)
        only = f" ({', '.join(s for _, s, _ in where)})" if len(where) < len(services) else ""
        lines.append(f"| `{flag}`{only} | `{envs.pop()}` | {default} | {meanings.pop()} |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"`{value}`" if isinstance(value, str) and value else _shown(value)
