"""The Kubernetes manifests against Kubernetes' own OpenAPI schemas, and the operations pieces
among them (the worker autoscaler, its disruption budget, the prometheus-adapter rule, the
ServiceMonitor) against each other and against the services they serve.

The schemas are those `kubernetes-validate` bundles (Kubernetes 1.37, strict: an unknown field
fails), so nothing is fetched. A ServiceMonitor is a custom resource of the Prometheus Operator,
which the bundle lacks: it is validated against a schema of the fields used here, written from the
operator's monitoring.coreos.com/v1 definition, with Kubernetes' own ObjectMeta and LabelSelector.
The prometheus-adapter rule is a ConfigMap (validated as one); its query runs against a real
Prometheus in tests/test_metrics.py.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "swarm-dashboard.json"
KUBERNETES = "1.37"
METRICS_PORT = 9464
# What a Service port's name must be for a mesh to read its protocol from it (IANA_SVC_NAME).
PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?")
DEFINITIONS = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    # Beside Kubernetes' own schemas, so its references resolve as theirs do.
    "$id": "https://kubernetes.io/api/servicemonitor/monitoring.coreos.com/v1",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": DEFINITIONS + "ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": DEFINITIONS + "LabelSelector"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        },
                    },
                },
            },
        },
    },
}
ADAPTER_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["seriesQuery", "metricsQuery", "name", "resources"],
    "additionalProperties": False,
    "properties": {
        "seriesQuery": {"type": "string"},
        "metricsQuery": {"type": "string"},
        "name": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matches": {"type": "string"}, "as": {"type": "string"}},
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "template": {"type": "string"},
                "overrides": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["resource"],
                        "additionalProperties": False,
                        "properties": {"resource": {"type": "string"}, "group": {"type": "string"}},
                    },
                },
            },
        },
    },
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(path.read_text()) if doc is not None]


MANIFESTS = [
    (path.name, index, doc)
    for path in sorted(K8S.glob("*.yaml"))
    for index, doc in enumerate(documents(path))
]


def find(kind: str, name: str) -> dict[str, Any]:
    (match,) = [doc for _, _, doc in MANIFESTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return match


def kubernetes_definitions() -> referencing.Registry:  # type: ignore[type-arg]
    bundle = (
        resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES}.0-local-strict"
    )
    definitions = json.loads((bundle / "_definitions.json").read_text())
    return referencing.Resource.from_contents(definitions) @ referencing.Registry()


def validate_custom(document: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema, registry=kubernetes_definitions()).validate(document)


def validate(document: dict[str, Any]) -> None:
    if document["kind"] == "ServiceMonitor":
        validate_custom(document, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


@pytest.mark.parametrize(("file", "index", "document"), MANIFESTS, ids=[f"{f}:{i}" for f, i, _ in MANIFESTS])
def test_every_manifest_matches_its_kubernetes_schema(
    file: str, index: int, document: dict[str, Any]
) -> None:
    validate(document)


REPLICAS = [
    (path.name, index, doc)
    for path in sorted((K8S / "replicas").glob("*.yaml"))
    for index, doc in enumerate(documents(path))
]


@pytest.mark.parametrize(
    ("file", "index", "document"), REPLICAS, ids=[f"replicas/{f}:{i}" for f, i, _ in REPLICAS]
)
def test_every_replicas_manifest_matches_its_kubernetes_schema(
    file: str, index: int, document: dict[str, Any]
) -> None:
    validate(document)


@pytest.mark.parametrize(
    ("kind", "name", "spoil"),
    [
        (
            "Deployment",
            "worker",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports="50052"),
        ),
        ("Deployment", "worker", lambda d: d["spec"]["template"]["spec"].update(terminationGrace=40)),
        ("HorizontalPodAutoscaler", "worker", lambda d: d["spec"]["metrics"][0]["external"].update(target=8)),
        ("PodDisruptionBudget", "worker", lambda d: d["spec"].update(maxUnavailble=1)),
        (
            "ServiceMonitor",
            "parallel-agent-scheduler",
            lambda d: d["spec"]["endpoints"][0].update(interval="15 s"),
        ),
        ("ServiceMonitor", "parallel-agent-scheduler", lambda d: d["spec"].update(selectors={})),
        ("ServiceMonitor", "parallel-agent-scheduler", lambda d: d["metadata"].update(labels=["a"])),
    ],
)
def test_a_spoiled_manifest_fails_validation(kind: str, name: str, spoil: Any) -> None:
    """The validation has teeth: a typo in a field's name or a wrong type is caught."""
    document = copy.deepcopy(find(kind, name))
    spoil(document)
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


def pod(name: str) -> dict[str, Any]:
    return dict(find("Deployment", name)["spec"]["template"])


def test_services_name_and_type_their_ports_for_meshes() -> None:
    for name, grpc_port in [("orchestrator", 50051), ("worker", 50052)]:
        service = find("Service", name)
        ports = {port["name"]: port for port in service["spec"]["ports"]}
        (container,) = pod(name)["spec"]["containers"]
        env = {var["name"]: var.get("value") for var in container["env"]}
        # A mesh must be told what the bytes are: TLS when the service serves TLS itself, else gRPC.
        wire = "tls" if env.get("SWARM_TLS_CERT") else "grpc"
        assert ports["grpc"]["port"] == grpc_port and ports["grpc"]["appProtocol"] == wire
        assert (
            ports["http-metrics"]["port"] == METRICS_PORT and ports["http-metrics"]["appProtocol"] == "http"
        )
        container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for port in ports.values():
            assert PORT_NAME.fullmatch(port["name"]), port["name"]
            assert port["targetPort"] in container_ports, f"{name}: no container port {port['targetPort']}"
        assert env["SWARM_METRICS_LISTEN"] == f"0.0.0.0:{container_ports['http-metrics']}"
        annotations = pod(name)["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(container_ports["http-metrics"])


def test_the_autoscaler_scales_workers_on_the_adapters_backlog_metric() -> None:
    hpa = find("HorizontalPodAutoscaler", "worker")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "worker")
    assert (
        1
        <= hpa["spec"]["minReplicas"]
        <= find("Deployment", "worker")["spec"]["replicas"]
        <= hpa["spec"]["maxReplicas"]
    )
    (metric,) = hpa["spec"]["metrics"]
    config = YAML(typ="safe", pure=True).load(
        find("ConfigMap", "prometheus-adapter-swarm")["data"]["config.yaml"]
    )
    (rule,) = config["externalRules"]
    jsonschema.validate(rule, ADAPTER_RULE_SCHEMA)
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("swarm_subtasks_queued{")
    assert re.fullmatch(rule["name"]["matches"], "swarm_subtasks_queued")
    # Scales up at once, down slowly: a drained worker's subtasks finish before the next leaves.
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_the_disruption_budget_covers_the_worker_pods_one_at_a_time() -> None:
    pdb = find("PodDisruptionBudget", "worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod("worker")["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_service_monitor_scrapes_both_services_metrics_ports() -> None:
    monitor = find("ServiceMonitor", "parallel-agent-scheduler")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for name in ("orchestrator", "worker"):
        service = find("Service", name)
        assert selector.items() <= service["metadata"]["labels"].items(), f"{name} is not selected"
        names = {port["name"] for port in service["spec"]["ports"]}
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= names
    assert [endpoint["path"] for endpoint in monitor["spec"]["endpoints"]] == ["/metrics"]


def test_drain_fits_in_the_termination_grace_after_the_prestop_pause() -> None:
    for name in ("orchestrator", "worker"):
        spec = pod(name)["spec"]
        (container,) = spec["containers"]
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        env = {var["name"]: var.get("value") for var in container["env"]}
        assert 0 < pause + float(env["SWARM_SHUTDOWN_GRACE_S"]) < spec["terminationGracePeriodSeconds"]


def test_the_dashboard_is_a_grafana_dashboard_of_the_asked_for_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert [target["refId"] for target in panel["targets"]] == [
            chr(65 + i) for i in range(len(panel["targets"]))
        ]
    expressions = " ".join(target["expr"] for panel in panels for target in panel["targets"])
    for shown in [
        "swarm_subtasks_queued",  # queue depth
        "swarm_subtask_duration_seconds_count",  # throughput
        "histogram_quantile(0.99",  # latency percentiles
        "swarm_model_tokens_total",  # tokens by model
        "swarm_model_cost_usd_total",  # cost by model
        "swarm_subtask_retries_total",  # errors and retries
        "swarm_worker_slots",  # workers' free slots
    ]:
        assert shown in expressions, shown
