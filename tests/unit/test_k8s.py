"""The KubeRay manifest: up to date with serve_config.yaml and valid against KubeRay's CRD."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from tests.support.required import missing

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "k8s" / "crds"


def manifest() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "rayservice.photo3d.yaml").read_text())


def test_rendered_manifest_embeds_serve_config_verbatim() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", ROOT / "k8s" / "render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert (ROOT / "k8s" / "rayservice.photo3d.yaml").read_text() == render.render(), (
        "k8s/rayservice.photo3d.yaml is stale: run python k8s/render.py"
    )
    assert manifest()["spec"]["serveConfigV2"] == (ROOT / "serve_config.yaml").read_text()


def test_manifest_follows_kuberay_practice() -> None:
    cluster = manifest()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert gpu["minReplicas"] == 0
    env = {
        e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PHOTO3D_ENVIRONMENT"]["value"] == "production"
    assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]  # the secret never sits in YAML


def test_manifest_is_valid_against_the_kuberay_crd() -> None:
    crd_path = CRDS / "ray.io_rayservices.yaml"
    if not crd_path.exists():
        missing(f"KubeRay CRDs not found at {CRDS} (they ship in ../shared/k8s/crds)")
    crd = yaml.safe_load(crd_path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    jsonschema.validate(manifest(), version["schema"]["openAPIV3Schema"])


def test_bulk_convert_rayjob_is_valid_against_the_kuberay_crd() -> None:
    crd_path = CRDS / "ray.io_rayjobs.yaml"
    if not crd_path.exists():
        missing(f"KubeRay CRDs not found at {CRDS} (they ship in ../shared/k8s/crds)")
    crd = yaml.safe_load(crd_path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.bulk-convert.yaml").read_text())
    jsonschema.validate(job, version["schema"]["openAPIV3Schema"])
    assert "jobs/bulk_convert.py" in job["spec"]["entrypoint"]
