"""The cluster configs scale to 64 GPUs: structure checks on the YAML alone (no cluster, no network)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
LAUNCHER = ROOT / "cluster" / "cluster-launcher.yaml"
MANIFEST = ROOT / "manifests" / "cluster.yaml"
CONFIGS = [RAYCLUSTER, RAYJOB, LAUNCHER, MANIFEST]
MAX_GPUS = 64


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def _cluster_spec(path: Path) -> dict:
    data = _load(path)
    assert data["apiVersion"] == "ray.io/v1"
    return data["spec"]["rayClusterSpec"] if data["kind"] == "RayJob" else data["spec"]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpus(group: dict) -> int:
    limits = _containers(group["template"])[0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def _walk(node, path=()):
    """Yield (key path, value) for every leaf and mapping in a parsed YAML document."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + (str(k),))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (str(i),))


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_shape(path: Path) -> None:
    spec = _cluster_spec(path)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values() if _gpus(g) > 0]
    cpu_groups = [g for g in groups.values() if _gpus(g) == 0]
    assert gpu_groups and cpu_groups, f"{path.name}: needs a GPU and a CPU worker group"
    assert sum(g["maxReplicas"] * _gpus(g) for g in gpu_groups) == MAX_GPUS
    for g in groups.values():
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        res = _containers(g["template"])[0]["resources"]
        assert res["requests"] == res["limits"], g["groupName"]
    for g in gpu_groups:
        # One actor per GPU reserves 1 CPU; the rest of the pod's CPUs run decode/encode tasks.
        cpus = int(_containers(g["template"])[0]["resources"]["limits"]["cpu"])
        assert cpus > _gpus(g), g["groupName"]


def test_rayjob_resumes_and_cleans_up() -> None:
    spec = _load(RAYJOB)["spec"]
    assert spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    assert "manifests/cluster.yaml" in spec["entrypoint"]


def _images(path: Path) -> set[str]:
    return {v for p, v in _walk(_load(path)) if p and p[-1] == "image" and isinstance(v, str)}


def test_image_and_ray_version_consistent() -> None:
    images = _images(RAYCLUSTER) | _images(RAYJOB) | _images(LAUNCHER)
    assert len(images) == 1, images
    tag = images.pop().rsplit(":", 1)[1]
    documented = set(re.findall(r"realdgen:(\d+\.\d+\.\d+)", (ROOT / "cluster" / "OPERATOR.md").read_text()))
    assert documented == {tag}
    base = re.search(r"rayproject/ray:([\d.]+)", (ROOT / "cluster" / "Dockerfile").read_text())
    assert base is not None
    for path in (RAYCLUSTER, RAYJOB):
        assert _cluster_spec(path)["rayVersion"] == base.group(1)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_credentials_from_secret_only(path: Path) -> None:
    spec = _cluster_spec(path)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        for c in _containers(t):
            assert any("secretRef" in e for e in c.get("envFrom", [])), c["name"]
            for e in c.get("env", []):
                if e["name"].startswith("AWS_"):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e


_CREDENTIAL_KEY = re.compile(r"(secret|password|access_key|token|credential)", re.IGNORECASE)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_credential_literals(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[:=]", text)
    assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text)  # an AWS access key id
    for p, v in _walk(_load(path)):
        if isinstance(v, dict) and v.get("name", "").startswith("AWS_"):
            assert "value" not in v, p  # env entries take AWS_* from a secretKeyRef only
        if p and _CREDENTIAL_KEY.search(p[-1]) and p[-1] not in ("secretRef", "secretKeyRef"):
            assert isinstance(v, dict | list), f"{'.'.join(p)} holds a literal"


def test_launcher_reaches_64_gpus() -> None:
    cfg = _load(LAUNCHER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers.values())
    assert gpu == MAX_GPUS
    assert any(t["resources"].get("GPU", 0) == 0 and t["max_workers"] > 0 for t in workers.values())
    assert cfg["max_workers"] == sum(t["max_workers"] for t in workers.values())
    assert all(t["min_workers"] == 0 for t in workers.values())


def test_cluster_manifest_loads_for_64_gpus() -> None:
    m = load_manifest(MANIFEST, [], kind="generate")
    assert m.compute.device == "cuda"
    assert m.compute.actors.max == MAX_GPUS
    assert 1 <= m.compute.actors.min <= 8


def test_docker_context_holds_what_the_dockerfile_copies_and_no_venv():
    """.dockerignore excludes everything (the 2 GB .venv, out/, data/) but what the image COPYs."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copies = [
        src
        for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY")
        for src in line.split()[1:-1]
        if not src.startswith("--")
    ]
    assert copies and set(copies) <= allowed, set(copies) - allowed
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines() and ".venv" not in allowed
    for src in copies:
        assert (ROOT / src).exists(), src
