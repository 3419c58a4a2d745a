"""deploy/: every manifest parses, every probe asks a port its container serves, and each
container's env, read by the service's own flag parser, configures what the manifest says.

The served port is not read off the manifest's `containerPort` alone: the service's parser is
run with the container's env (as the process would see it), so a misspelt MINEHEAD_* name or a
server left on 127.0.0.1 (unreachable for the kubelet's probe) fails here.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
SERVICES = {"minehead-embedder": "embedder", "minehead-head": "head", "minehead-miner": "miner"}


def docs() -> list[dict]:
    out = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in docs() if d["kind"] == kind]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def service_config(service: str, env: dict[str, str], monkeypatch):
    """The ServiceConfig the service's main() would build in a container with this env."""
    import importlib

    for k in [k for k in __import__("os").environ if k.startswith("MINEHEAD_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from minehead.core.config import config_from_args

    mod = importlib.import_module(f"{service}_svc.__main__")
    args = mod.parser().parse_args([])
    return config_from_args(service, args, tuple(k for k in vars(args) if k not in {
        "host", "port", "data_dir", "models_dir", "allowed_roots", "max_message_mb", "workers", "auth_token",
        "tls_cert", "tls_key", "log_format", "log_level"}))


def test_every_manifest_parses_and_names_its_kind():
    found = docs()
    assert {n for n, _ in found} == {"raycluster.yaml", "services.yaml"}
    kinds = sorted(d["kind"] for _, d in found)
    assert kinds.count("Deployment") == 3 and kinds.count("Service") == 3 and kinds.count("RayCluster") == 1
    for _, d in found:
        assert d["apiVersion"] and d["metadata"]["name"]


@pytest.mark.parametrize("app", sorted(SERVICES))
def test_deployment_probes_point_at_the_port_the_service_serves(app, monkeypatch):
    (dep,) = [d for d in by_kind("Deployment") if d["spec"]["template"]["metadata"]["labels"]["app"] == app]
    assert dep["spec"]["selector"]["matchLabels"]["app"] == app
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] and ":" in c["image"]
    service = SERVICES[app]
    assert c["command"] == [f"minehead-{service}"]  # a console script of pyproject.toml
    cfg = service_config(service, env_of(c), monkeypatch)
    assert cfg.host == "0.0.0.0"  # reachable by the kubelet and the other pods
    served = {p["containerPort"] for p in c["ports"]}
    assert served == {cfg.port}
    probes = [c[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in c]
    assert {"livenessProbe", "readinessProbe"} <= set(c)
    for p in probes:
        assert p["grpc"]["port"] == cfg.port  # grpc.health.v1 on the served port
    # Its Service forwards to that port, and selects this Deployment.
    (svc,) = [s for s in by_kind("Service") if s["spec"]["selector"] == {"app": app}]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [cfg.port]
    # Volumes the container mounts exist, and their claims are declared.
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    claims = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    for m in c.get("volumeMounts", []):
        assert vols[m["name"]]["persistentVolumeClaim"]["claimName"] in claims
        assert m["mountPath"] == str(cfg.data_dir)


def test_services_find_each_other_and_the_miner_finds_ray(monkeypatch):
    deps = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0] for d in by_kind("Deployment")}
    services = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in by_kind("Service")}
    miner = service_config("miner", env_of(deps["miner"]), monkeypatch)
    head = service_config("head", env_of(deps["head"]), monkeypatch)
    for addr in (miner.extra["embedder_addr"], miner.extra["head_addr"], head.extra["embedder_addr"]):
        host, port = addr.rsplit(":", 1)
        assert services[host] == int(port), addr
    (rc,) = by_kind("RayCluster")
    assert miner.extra["ray_address"] == f"ray://{rc['metadata']['name']}-head-svc:10001"  # KubeRay's head Service, Ray Client
    head_ports = {p["containerPort"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert 10001 in head_ports


def test_ray_cluster_runs_the_services_image_and_the_pinned_ray():
    (rc,) = by_kind("RayCluster")
    pinned = re.search(r'"ray==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert rc["spec"]["rayVersion"] == pinned
    images = {c["image"] for d in by_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]}
    groups = [rc["spec"]["headGroupSpec"]] + rc["spec"]["workerGroupSpecs"]
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            assert c["image"] in images  # the workers import miner_svc: the same image as the miner
            assert env_of(c)["MINEHEAD_MODELS_DIR"] == "/models"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no detector actors on the head
    gpu = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"


def test_every_env_the_manifests_set_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    names = {e["name"] for _, d in docs() for c in _containers(d) for e in c.get("env", [])}
    assert "MINEHEAD_RAY_ADDRESS" in names
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"set in deploy/ but not in README.md: {missing}"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "minehead:0.1.0" in dockerfile and "minehead:0.1.0" in readme


def _containers(d: dict) -> list[dict]:
    if d["kind"] == "Deployment":
        return d["spec"]["template"]["spec"]["containers"]
    if d["kind"] == "RayCluster":
        groups = [d["spec"]["headGroupSpec"]] + d["spec"]["workerGroupSpecs"]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    return []


def test_the_image_builds_what_the_manifests_run():
    """The Dockerfile installs the package (console scripts), generates the stubs, fetches the
    offline model into the models dir the manifests name, and installs the cluster extra."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert "grpc_tools.protoc" in text and "embedder_svc.minisam --models-dir /models" in text
    assert "'.[cluster]'" in text
    assert 'cluster = ["ray[default]==' in (REPO / "pyproject.toml").read_text()
