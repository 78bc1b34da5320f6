"""Each service's settings model: the contract's flags and environment twins, their precedence,
one clear line for a bad value (through the real console scripts), `--help`, and README's table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from ruamel.yaml import YAML

from orchestrator_service.settings import OrchestratorSettings
from swarm_common.pricing import PRICES
from swarm_common.settings import ServiceSettings, env_name, flag_name, setting, settings_table
from worker_service.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICES: dict[str, type[ServiceSettings]] = {"orchestrator": OrchestratorSettings, "worker": WorkerSettings}
README_TABLE_MARK = (
    "<!-- the services' settings: generated from their models, checked by tests/test_settings.py -->"
)

BOTH = [
    ("--provider", "SWARM_PROVIDER", "auto"),
    ("--model", "CLAUDE_MODEL", "claude-sonnet-5-5"),
    ("--shutdown-grace", "SWARM_SHUTDOWN_GRACE_S", 30.0),
    ("--log-level", "SWARM_LOG_LEVEL", "INFO"),
    ("--metrics-listen", "SWARM_METRICS_LISTEN", ""),
    ("--sim-latency-ms", "SWARM_SIM_LATENCY_MS", 300.0),
    ("--sim-latency-sigma", "SWARM_SIM_LATENCY_SIGMA", 0.0),
    ("--sim-chunks", "SWARM_SIM_CHUNKS", 8),
    ("--sim-failure-rate", "SWARM_SIM_FAILURE_RATE", 0.0),
    ("--sim-rate-limit-rate", "SWARM_SIM_RATE_LIMIT_RATE", 0.0),
    ("--sim-bad-plans", "SWARM_SIM_BAD_PLANS", 0),
    ("--sim-stall-rate", "SWARM_SIM_STALL_RATE", 0.0),
    ("--sim-stall-after-chunks", "SWARM_SIM_STALL_AFTER_CHUNKS", 0),
    ("--sim-answer-words", "SWARM_SIM_ANSWER_WORDS", 0),
    ("--sim-seed", "SWARM_SIM_SEED", 0),
    ("--max-streams-per-connection", "SWARM_MAX_STREAMS_PER_CONNECTION", 1000),
    ("--stream-write-timeout", "SWARM_STREAM_WRITE_TIMEOUT_S", 30.0),
    ("--keepalive-time", "SWARM_KEEPALIVE_TIME_S", 30.0),
    ("--keepalive-timeout", "SWARM_KEEPALIVE_TIMEOUT_S", 20.0),
    ("--max-message-bytes", "SWARM_MAX_MESSAGE_BYTES", 4 * 1024 * 1024),
    ("--max-metadata-bytes", "SWARM_MAX_METADATA_BYTES", 16 * 1024),
    ("--tls-cert", "SWARM_TLS_CERT", ""),
    ("--tls-key", "SWARM_TLS_KEY", ""),
    ("--tls-client-ca", "SWARM_TLS_CLIENT_CA", ""),
]
# The names and defaults that containers, manifests and scripts rely on (the contract, and
# README's table as it stood before the models): a rename or a changed default fails here.
CONTRACT: dict[str, list[tuple[str, str, object]]] = {
    "orchestrator": [
        ("--listen", "SWARM_LISTEN", "0.0.0.0:50051"),
        ("--workers", "SWARM_WORKERS", "dns:///localhost:50052"),
        ("--max-agents", "SWARM_MAX_AGENTS", 256),
        ("--max-idea-bytes", "SWARM_MAX_IDEA_BYTES", 65536),
        ("--answer-max-tokens", "SWARM_ANSWER_MAX_TOKENS", 4096),
        ("--max-swarm-input-bytes", "SWARM_MAX_SWARM_INPUT_BYTES", 4 * 1024 * 1024),
        ("--max-agents-in-flight", "SWARM_MAX_AGENTS_IN_FLIGHT", 4096),
        ("--max-watchers-per-swarm", "SWARM_MAX_WATCHERS_PER_SWARM", 100),
        ("--max-page-bytes", "SWARM_MAX_PAGE_BYTES", 1024 * 1024),
        ("--list-text-bytes", "SWARM_LIST_TEXT_BYTES", 1024),
        ("--subtask-timeout", "SWARM_SUBTASK_TIMEOUT_S", 600.0),
        ("--max-attempts", "SWARM_MAX_ATTEMPTS", 3),
        ("--delta-window-ms", "SWARM_DELTA_WINDOW_MS", 50.0),
        ("--max-delta-rate", "SWARM_MAX_DELTA_RATE", 2000.0),
        ("--no-progress-timeout", "SWARM_NO_PROGRESS_TIMEOUT_S", 120.0),
        ("--model-rpm", "SWARM_MODEL_RPM", 0),
        ("--model-input-tpm", "SWARM_MODEL_INPUT_TPM", 0),
        ("--model-output-tpm", "SWARM_MODEL_OUTPUT_TPM", 0),
        ("--model-concurrency", "SWARM_MODEL_CONCURRENCY", 0),
        ("--rate-window", "SWARM_RATE_WINDOW_S", 60.0),
        ("--plan-attempts", "SWARM_PLAN_ATTEMPTS", 3),
        ("--refresh-interval", "SWARM_REFRESH_INTERVAL_S", 10.0),
        ("--no-worker-timeout", "SWARM_NO_WORKER_TIMEOUT_S", 30.0),
        ("--db", "SWARM_DB", "swarms.db"),
        ("--retention", "SWARM_RETENTION_S", 604800.0),
        ("--lease-ttl", "SWARM_LEASE_TTL_S", 15.0),
        ("--worker-model", "SWARM_WORKER_MODEL", ""),
        ("--hedging", "SWARM_HEDGING", False),
        ("--hedge-max-extra", "SWARM_HEDGE_MAX_EXTRA", 0.1),
        ("--no-prompt-caching", "SWARM_NO_PROMPT_CACHING", False),
        ("--worker-tls-ca", "SWARM_WORKER_TLS_CA", ""),
        ("--worker-tls-cert", "SWARM_WORKER_TLS_CERT", ""),
        ("--worker-tls-key", "SWARM_WORKER_TLS_KEY", ""),
        ("--auth-file", "SWARM_AUTH_FILE", ""),
        ("--allow-unauthenticated", "SWARM_ALLOW_UNAUTHENTICATED", False),
        ("--reflection-needs-token", "SWARM_REFLECTION_NEEDS_TOKEN", False),
        *BOTH,
    ],
    "worker": [
        ("--listen", "SWARM_LISTEN", "0.0.0.0:50052"),
        ("--worker-id", "SWARM_WORKER_ID", ""),
        ("--max-concurrency", "SWARM_MAX_CONCURRENCY", 16),
        ("--direct-slots", "SWARM_DIRECT_SLOTS", 2),
        ("--max-idea-bytes", "SWARM_MAX_IDEA_BYTES", 65536),
        ("--max-subtask-bytes", "SWARM_MAX_SUBTASK_BYTES", 128 * 1024),
        ("--allowed-models", "SWARM_ALLOWED_MODELS", ",".join(PRICES)),
        ("--stream-queue", "SWARM_STREAM_QUEUE", 1024),
        *BOTH,
    ],
}


def declared(cls: type[ServiceSettings]) -> list[tuple[str, str, object]]:
    return [(flag_name(n, f), env_name(f), f.default) for n, f in cls.model_fields.items()]


def console(command: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "ANTHROPIC_API_KEY"}
    return subprocess.run(
        [str(BIN / command), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "COLUMNS": "1000", **(env or {})},
    )


@pytest.fixture
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SWARM_") or key == "CLAUDE_MODEL":
            monkeypatch.delenv(key)


@pytest.mark.parametrize("service", SERVICES)
def test_every_flag_of_the_contract_keeps_its_name_env_twin_and_default(service: str) -> None:
    assert sorted(declared(SERVICES[service]), key=str) == sorted(CONTRACT[service], key=str)


@pytest.mark.usefixtures("no_settings_in_env")
@pytest.mark.parametrize(
    ("flag", "env", "flag_value", "env_value", "field", "expected_flag", "expected_env"),
    [
        ("--max-agents", "SWARM_MAX_AGENTS", "12", "7", "max_agents", 12, 7),
        ("--model", "CLAUDE_MODEL", "claude-a", "claude-b", "model", "claude-a", "claude-b"),
        ("--subtask-timeout", "SWARM_SUBTASK_TIMEOUT_S", "2.5", "9", "subtask_timeout_s", 2.5, 9.0),
        ("--provider", "SWARM_PROVIDER", "simulated", "anthropic", "provider", "simulated", "anthropic"),
        ("--sim-stall-rate", "SWARM_SIM_STALL_RATE", "0.25", "0.5", "sim_stall_rate", 0.25, 0.5),
        (
            "--sim-stall-after-chunks",
            "SWARM_SIM_STALL_AFTER_CHUNKS",
            "3",
            "2",
            "sim_stall_after_chunks",
            3,
            2,
        ),
    ],
)
def test_a_flag_beats_its_env_twin_which_beats_the_default(
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    env: str,
    flag_value: str,
    env_value: str,
    field: str,
    expected_flag: object,
    expected_env: object,
) -> None:
    default = OrchestratorSettings.model_fields[field].default
    assert getattr(OrchestratorSettings.from_command_line([]), field) == default
    monkeypatch.setenv(env, env_value)
    assert getattr(OrchestratorSettings.from_command_line([]), field) == expected_env
    assert getattr(OrchestratorSettings.from_command_line([flag, flag_value]), field) == expected_flag


@pytest.mark.usefixtures("no_settings_in_env")
def test_the_last_of_a_repeated_flag_wins_and_an_empty_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tests restart an orchestrator with its first flags and then the ones that change.
    assert OrchestratorSettings.from_command_line(["--db", "a.db", "--db", "b.db"]).db == "b.db"
    monkeypatch.setenv("CLAUDE_MODEL", "")  # what compose's `${CLAUDE_MODEL:-}` gives when unset
    assert WorkerSettings.from_command_line([]).model == "claude-sonnet-5-5"


@pytest.mark.usefixtures("no_settings_in_env")
def test_the_simulated_provider_gets_every_knob() -> None:
    knobs = {
        "--sim-latency-ms": "120",
        "--sim-chunks": "4",
        "--sim-failure-rate": "0.1",
        "--sim-rate-limit-rate": "0.2",
        "--sim-bad-plans": "1",
        "--sim-stall-rate": "0.3",
        "--sim-stall-after-chunks": "2",
    }
    settings = WorkerSettings.from_command_line([part for pair in knobs.items() for part in pair]).simulated()
    assert (settings.latency_ms, settings.chunks, settings.failure_rate, settings.rate_limit_rate) == (
        120.0,
        4,
        0.1,
        0.2,
    )
    assert (settings.bad_plans, settings.stall_rate, settings.stall_after_chunks) == (1, 0.3, 2)


@pytest.mark.usefixtures("no_settings_in_env")
def test_a_new_setting_is_one_declared_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kinds the next settings need (a switch, an optional file, a number) come from one line each."""

    class Later(WorkerSettings):
        """later"""

        prog: ClassVar[str] = "swarm-later"
        allow_unauthenticated: bool = setting(False, "serve without tokens")
        tls_cert: Path | None = setting(None, "PEM file")
        lease_ttl_s: float = setting(15.0, "seconds", flag="--lease-ttl")

    assert Later.from_command_line([]).allow_unauthenticated is False
    given = Later.from_command_line(["--allow-unauthenticated", "--tls-cert", "/x.pem", "--lease-ttl", "5"])
    assert (given.allow_unauthenticated, given.tls_cert, given.lease_ttl_s) == (True, Path("/x.pem"), 5.0)
    monkeypatch.setenv("SWARM_ALLOW_UNAUTHENTICATED", "true")
    monkeypatch.setenv("SWARM_LEASE_TTL_S", "7")
    from_env = Later.from_command_line([])
    assert (from_env.allow_unauthenticated, from_env.lease_ttl_s) == (True, 7.0)


@pytest.mark.parametrize(
    ("command", "args", "env", "says"),
    [
        ("swarm-orchestrator", ["--max-agents", "0"], {}, "--max-agents '0': input should be greater than 0"),
        ("swarm-orchestrator", [], {"SWARM_SUBTASK_TIMEOUT_S": "soon"}, "SWARM_SUBTASK_TIMEOUT_S='soon'"),
        ("swarm-orchestrator", ["--provider", "openai"], {}, "--provider 'openai': input should be 'auto'"),
        (
            "swarm-worker",
            [],
            {"SWARM_MAX_CONCURRENCY": "-1"},
            "SWARM_MAX_CONCURRENCY='-1' (for --max-concurrency)",
        ),
        ("swarm-worker", ["--sim-stall-rate", "-0.5"], {}, "--sim-stall-rate '-0.5'"),
        ("swarm-worker", [], {"SWARM_SIM_STALL_AFTER_CHUNKS": "two"}, "SWARM_SIM_STALL_AFTER_CHUNKS='two'"),
        (
            "swarm-worker",
            ["--listen", "nowhere"],
            {},
            "--listen 'nowhere': address 'nowhere' is not HOST:PORT",
        ),
        ("swarm-worker", ["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_value_is_one_line_naming_it_and_exit_2(
    command: str, args: list[str], env: dict[str, str], says: str
) -> None:
    done = console(command, *args, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"{command}: ") and says in done.stderr, done.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_help_lists_every_flag_with_its_env_twin_and_default(service: str) -> None:
    done = console(f"swarm-{service}", "--help")
    assert done.returncode == 0, done.stderr
    entries: dict[str, str] = {}  # flag: its help, however argparse laid it out
    for line in done.stdout.splitlines():
        if line.strip().startswith("--"):
            flag = line.split()[0]
            entries[flag] = line
        elif line.startswith(" ") and entries:
            entries[flag] += line
    for flag, env, default in CONTRACT[service]:
        shown = "none" if default == "" else f"{default:g}" if isinstance(default, float) else str(default)
        assert " ".join(entries.get(flag, "").split()).endswith(f"[env {env}, default {shown}]"), flag


def test_readme_table_is_the_one_the_models_give() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(README_TABLE_MARK) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    expected = settings_table(SERVICES)
    assert "\n".join(lines[start:end]) + "\n" == expected, (
        f"README's configuration table is not the models' one; put this after {README_TABLE_MARK}:\n{expected}"
    )


def test_deploy_files_set_only_settings_their_service_has() -> None:
    compose = YAML(typ="safe").load((ROOT / "docker-compose.yml").read_text())
    given = {name: set(compose["services"][name].get("environment", {})) for name in SERVICES}
    for path in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        for document in YAML(typ="safe").load_all(path.read_text()):
            if document and document.get("kind") == "Deployment":
                name = document["metadata"]["name"]
                for container in document["spec"]["template"]["spec"]["containers"]:
                    given[name] |= {item["name"] for item in container.get("env", [])}
    for name, cls in SERVICES.items():
        known = {env for _, env, _ in declared(cls)} | {"ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"}
        assert given[name] - known == set(), f"{name} is given variables it does not read"
