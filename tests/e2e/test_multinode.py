"""photo3d on a real two-node Ray cluster on this machine: the head runs the ingress, a second node
(custom resource `generator_node`) runs every generator replica, artifacts live in SeaweedFS.
A photo goes in by HTTP and the GLB comes back by its signed link; the generator node is killed
mid-task and the task is retried and succeeds once the node is back, nothing lost."""

from __future__ import annotations

import io
import secrets as secrets_module
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trimesh
import yaml

from tests.support import pg
from tests.support.images import object_photo
from tests.support.ray_nodes import RayNode, start_node, stopping, wait_for_nodes
from tests.support.seaweed import SeaweedS3
from tests.support.stack import FAKE_SLOW, Stack, run_stack, write_config

pytestmark = pytest.mark.slow


def two_node_config(path: Path) -> Path:
    """serve_config.yaml for this cluster: the proxy and ingress on the head (`ingress_node`),
    the generators on the node with `generator_node`, fixed replica counts."""
    write_config(path, {"fake-slow": 0.25})
    config = yaml.safe_load(path.read_text())
    config["proxy_location"] = "HeadOnly"  # one HTTP port on 127.0.0.1, not one per node
    app = config["applications"][0]
    app["args"]["backends"] = ["cpu", "fake-slow"]
    deployments = []
    for deployment in app["deployments"]:
        name = deployment["name"]
        if name == "Ingress":
            deployment["ray_actor_options"] = {"num_cpus": 0.1, "resources": {"ingress_node": 0.1}}
        elif name in ("generator-cpu", "generator-fake-slow"):
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
            deployment["ray_actor_options"] = {
                "num_cpus": 0.25,
                "resources": {"generator_node": 0.5},
            }
        else:
            continue
        deployments.append(deployment)
    app["deployments"] = deployments
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cluster(
    pg_admin: str, seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, list[RayNode], str, dict[str, str]]]:
    run_dir = tmp_path_factory.mktemp("multinode")
    # Short: Ray's socket paths must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="p3d-ray-", dir="/tmp"))
    bucket = seaweed.new_bucket()
    for database_url in pg.clone_database(pg_admin, prefix="multinode"):
        # As on a VM cluster: each node's environment holds the secrets (the database, the S3
        # credentials, the URL signing key); `photo3d serve --address` sends only settings.
        secrets = {
            "DATABASE_URL": database_url,
            **seaweed.env,
            "PHOTO3D_URL_SIGNING_KEY": secrets_module.token_urlsafe(48),
        }
        node_env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), **secrets}
        with stopping([]) as nodes:
            head, address = start_node(
                "head",
                run_dir,
                temp_dir=temp_dir,
                num_cpus=1,
                resources={"ingress_node": 1},
                env=node_env,
            )
            nodes.append(head)
            generator_node, _ = start_node(
                "generator-1",
                run_dir,
                head_address=address,
                num_cpus=1,
                resources={"generator_node": 1},
                env=node_env,
            )
            nodes.append(generator_node)
            wait_for_nodes(address, 2, nodes)
            with run_stack(
                run_dir,
                database_url,
                extra_backends=FAKE_SLOW,
                config_path=two_node_config(run_dir / "serve_config.two-node.yaml"),
                serve_args=["--address", address],
                env={
                    **secrets,
                    "PHOTO3D_ARTIFACT_URL": f"s3://{bucket}/photo3d",
                    "PHOTO3D_FAKE_SLOW_SECONDS": "20",
                    "PHOTO3D_LEASE_SECONDS": "4",
                },
                timeout=420,
            ) as stack:
                yield stack, nodes, address, node_env
            # No secret went out with the deployed application.
            assert secrets["PHOTO3D_URL_SIGNING_KEY"] not in stack.log()
    shutil.rmtree(temp_dir, ignore_errors=True)


def worker_pid(database_url: str, task_id: str) -> int:
    """The process that made the task's result (its worker id is backend-host-pid-suffix)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT result->>'worker_id' FROM tasks WHERE id = %s", (task_id,)
        ).fetchone()
    assert row and row[0], row
    return int(row[0].rsplit("-", 2)[-2])


def submit(client: httpx.Client, backend: str) -> dict[str, Any]:
    response = client.post(
        "/api/v1/generate",
        files={"image": ("toy.png", object_photo(256, seed=9), "image/png")},
        data={"backend": backend},
    )
    assert response.status_code == 202, response.text
    return response.json()


def fetch_glb(client: httpx.Client, task: dict[str, Any]) -> trimesh.Trimesh:
    link = next(f["url"] for f in task["result"]["files"] if f["format"] == "glb")
    hop = client.get(link)  # no key: the signature is the authorization
    assert hop.status_code == 307, hop.text
    assert "X-Amz-Signature=" in hop.headers["location"]  # bytes come from the bucket
    glb = httpx.get(hop.headers["location"], timeout=30)
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"
    mesh = trimesh.load(io.BytesIO(glb.content), file_type="glb", force="mesh")
    assert len(mesh.faces) > 100
    return mesh


def test_photo_in_glb_out_with_generators_on_the_other_node(cluster: Any) -> None:
    stack, nodes, _, _ = cluster
    head, generator_node = nodes[0], nodes[1]
    with stack.client() as client:
        task = submit(client, "cpu")
        done = stack.wait_for_task(client, task["id"], timeout=240)
        assert done["status"] == "succeeded", done
        fetch_glb(client, done)
    pid = worker_pid(stack.database_url, task["id"])
    assert generator_node.owns(pid) and not head.owns(pid)


def test_generator_node_killed_mid_task_is_retried_when_it_returns(cluster: Any) -> None:
    stack, nodes, address, node_env = cluster
    with stack.client() as client:
        task = submit(client, "fake-slow")
        stack.wait_for_task(client, task["id"], timeout=240, until=("running",))
        nodes[1].kill()  # the generator node dies with the task in hand
        # Nothing runs it now; it is not lost: it waits (queued again once its lease runs out).
        time.sleep(8)
        waiting = client.get(f"/api/v1/task/{task['id']}").json()
        assert waiting["status"] in ("queued", "running"), waiting
        returned, _ = start_node(
            "generator-2",
            stack.run_dir,
            head_address=address,
            num_cpus=1,
            resources={"generator_node": 1},
            env=node_env,
        )
        nodes.append(returned)
        done = stack.wait_for_task(client, task["id"], timeout=400)
        assert done["status"] == "succeeded", (done, stack.log())
        assert done["attempt"] >= 2
        fetch_glb(client, done)
        statuses = [
            e["status"] for e in client.get(f"/api/v1/task/{task['id']}/events").json()["events"]
        ]
        assert statuses.count("succeeded") == 1
    assert returned.owns(worker_pid(stack.database_url, task["id"]))
