"""The Kubernetes example parses and wires API servers, workers, Redis, probes and autoscaling together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastdeploy.cli import build_parser
from fastdeploy.settings import OPTIONS

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to check the Kubernetes manifest (pip install PyYAML)")

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "fastdeploy.yaml"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs
        if d["kind"] == kind and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def broker_url(docs: list[dict[str, Any]], c: dict[str, Any]) -> str:
    (env,) = [e for e in c["env"] if e["name"] == "FASTDEPLOY_BROKER"]
    if "value" in env:
        return env["value"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"])
    return secret["stringData"][ref["key"]]


def test_every_document_is_a_kubernetes_object(docs):
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name")


@pytest.mark.parametrize("component", ["api", "worker"])
def test_deployments_select_their_own_pods(docs, component):
    deployment = one(docs, "Deployment", component)
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == component


def test_api_deployment_runs_serve_with_probes(docs):
    api = one(docs, "Deployment", "api")
    c = container(api)
    command = c["command"] + c.get("args", [])
    assert command[:2] == ["fastdeploy", "serve"]
    args = build_parser().parse_args(command[1:])  # the real CLI accepts these arguments
    assert args.command == "serve"
    (port,) = c["ports"]
    assert int(args.port) == port["containerPort"]
    ready, alive = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready" and alive["path"] == "/health"
    for probe in (ready, alive):
        assert probe["port"] in (port["containerPort"], port["name"])
    assert broker_url(docs, c).startswith("redis://")


def test_worker_deployment_runs_worker_on_the_same_broker_and_image(docs):
    api, worker = one(docs, "Deployment", "api"), one(docs, "Deployment", "worker")
    c = container(worker)
    command = c["command"] + c.get("args", [])
    assert command[:2] == ["fastdeploy", "worker"]
    assert build_parser().parse_args(command[1:]).command == "worker"
    assert c["image"] == container(api)["image"]
    assert broker_url(docs, c) == broker_url(docs, container(api))


def test_environment_names_are_real_settings(docs):
    names = {o.env for o in OPTIONS} | {legacy for o in OPTIONS for legacy in o.legacy_env}
    for component in ("api", "worker"):
        for env in container(one(docs, "Deployment", component))["env"]:
            assert env["name"] in names, f"{env['name']} is not a fastDeploy setting"


def test_broker_points_at_a_redis_service_in_the_manifest(docs):
    url = broker_url(docs, container(one(docs, "Deployment", "api")))
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert host in services, f"the broker host {host} is not a Service of the manifest"
    assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]


def test_service_routes_to_the_api_pods(docs):
    api = one(docs, "Deployment", "api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    services = [
        d for d in docs if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels.items()
    ]
    assert len(services) == 1
    (port,) = services[0]["spec"]["ports"]
    (container_port,) = container(api)["ports"]
    assert port["targetPort"] in (container_port["containerPort"], container_port["name"])


def test_autoscaler_scales_workers_on_queue_depth(docs):
    worker = one(docs, "Deployment", "worker")
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", worker["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    source = metric[metric["type"].lower()]
    assert source["metric"]["name"] == "fastdeploy_queue_depth"
    assert float(source["target"].get("averageValue") or source["target"].get("value")) > 0
