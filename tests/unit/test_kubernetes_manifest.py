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


# -- what a cluster operator expects (issue #15, point 3) ------------------------------------

GPU_PATCH = MANIFEST.with_name("gpu-patch.yaml")
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 1e-3}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "2", "1Gi") as a number."""
    text = str(value)
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _UNITS[suffix]
    return float(text)


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` applied to ``base`` the way a strategic merge patch applies it to a Deployment:
    maps merge, lists of named entries (containers, env, volumes) merge by name, other lists replace."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list) and all("name" in v for v in value):
            by_name = {item["name"]: item for item in base[key]}
            for item in value:
                by_name[item["name"]] = merged(by_name.get(item["name"], {}), item)
            out[key] = list(by_name.values())
        else:
            out[key] = value
    return out


def test_every_pod_runs_as_a_non_root_user_without_privileges(docs):
    from fastdeploy.container import UID

    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        for c in pod["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], name
            if security.get("readOnlyRootFilesystem"):  # fastDeploy and redis still need somewhere to write
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts or "/data" in mounts, name
    for component in ("api", "worker"):  # the user `fastdeploy build` images are made for
        assert one(docs, "Deployment", component)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == UID


def test_every_container_has_requests_within_its_limits(docs):
    for workload in workloads(docs):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert 0 < quantity(requests[resource]) <= quantity(limits[resource]), (c["name"], resource)


def test_a_disruption_budget_keeps_an_api_server_up_and_lets_drains_proceed(docs):
    budget = one(docs, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    api, worker = one(docs, "Deployment", "api"), one(docs, "Deployment", "worker")
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector.items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert 1 <= budget["spec"]["minAvailable"] < api["spec"]["replicas"]  # == replicas would block every drain


def test_redis_keeps_its_append_only_file_on_a_persistent_volume_claim(docs):
    (redis,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    folder = args[args.index("--dir") + 1] if "--dir" in args else "/data"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == folder]
    (claim,) = [t for t in redis["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == mount["name"]]
    assert "ReadWriteOnce" in claim["spec"]["accessModes"]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 2**30
    assert not any(v["name"] == mount["name"] for v in redis["spec"]["template"]["spec"].get("volumes", []))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert redis["spec"]["serviceName"] in services
    assert services[redis["spec"]["serviceName"]]["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items())
    pod_security = redis["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["fsGroup"] == pod_security["runAsUser"]  # the volume is writable to Redis


def test_the_gpu_patch_gives_each_worker_a_gpu_and_a_valid_configuration(docs):
    from fastdeploy.settings import load_settings

    (patch,) = [d for d in yaml.safe_load_all(GPU_PATCH.read_text()) if d]
    worker = one(docs, "Deployment", "worker")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", worker["metadata"]["name"])
    names = {c["name"] for c in container_list(worker)}
    assert {c["name"] for c in container_list(patch)} <= names  # merges into the worker, adds no container
    gpu_worker = merged(worker, patch)
    c = container(gpu_worker)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    for resource in ("cpu", "memory"):
        assert 0 < quantity(requests[resource]) <= quantity(limits[resource])
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    settings = load_settings("/recipe", {}, environ=env)  # the real settings accept every variable's value
    assert settings.devices not in ("", "cpu")
    assert settings.threads == quantity(limits["cpu"])
    assert "FASTDEPLOY_BROKER" in {e["name"] for e in c["env"]}  # the patch kept the worker's own variables


def test_worker_threads_match_its_cpu_limit(docs):
    """A pod sees every core of its node: threads per loop follow the CPU limit, not os.cpu_count()."""
    from fastdeploy.settings import load_settings

    c = container(one(docs, "Deployment", "worker"))
    settings = load_settings("/recipe", {}, environ={e["name"]: e["value"] for e in c["env"] if "value" in e})
    assert settings.threads * settings.replicas == quantity(c["resources"]["limits"]["cpu"])


def container_list(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]
