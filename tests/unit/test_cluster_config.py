"""cluster/ray-cluster.gpu.yaml: valid for `ray up` (Ray's own schema and config preparation),
with the CPU image on the head and CPU workers and the GPU image only on GPU workers."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster" / "ray-cluster.gpu.yaml"


def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_is_valid_for_ray_up() -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(config(), schema)  # the file as written
    validate_config(prepare_config(config()))  # what `ray up` checks after filling defaults


def test_images_and_resources_per_node_type() -> None:
    cfg = config()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cpu_image = f"ghcr.io/photo3d/photo3d-cpu:{version}"
    gpu_image = f"ghcr.io/photo3d/photo3d-gpu:{version}"
    assert cfg["docker"]["head_image"] == cfg["docker"]["worker_image"] == cpu_image
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # nothing scheduled on the head
    gpu_types = {name for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types == {"gpu"}
    for name, node_type in types.items():
        image = node_type.get("docker", {}).get("worker_image", cfg["docker"]["worker_image"])
        assert image == (gpu_image if name in gpu_types else cpu_image), name
    gpu = types["gpu"]
    assert gpu["min_workers"] == 0
    assert "-v /mnt/models:/models:ro" in gpu["docker"]["worker_run_options"]


def test_start_commands_migrate_first_and_export_metrics() -> None:
    cfg = config()
    head = " ".join(cfg["head_start_ray_commands"])
    assert head.index("photo3d migrate") < head.index("ray start --head")
    assert "--num-cpus=0" in head
    env_example = (ROOT / "cluster" / "photo3d.env.example").read_text()
    port = next(
        line.split("=", 1)[1]
        for line in env_example.splitlines()
        if line.startswith("PHOTO3D_METRICS_PORT=")
    )
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert f"--metrics-export-port={port}" in " ".join(commands)
    # Settings reach every node's container from the env file, never from the repository.
    assert cfg["file_mounts"] == {"/home/ray/photo3d.env": "./photo3d.env"}
    assert "/photo3d.env" in (ROOT / ".gitignore").read_text().splitlines()
