"""A user's path through the real stack: upload, watch, download, on PostgreSQL + Ray Serve."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import trimesh

from tests.support.images import object_photo
from tests.support.stack import Stack

ROOT = Path(__file__).resolve().parents[2]


def check_glb(data: bytes) -> trimesh.Trimesh:
    """The GLB opens, is a non-empty, closed (or near-closed) mesh with a texture or colours."""
    assert data[:4] == b"glTF"
    scene = trimesh.load(io.BytesIO(data), file_type="glb")
    meshes = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    assert meshes, "the GLB has no mesh"
    mesh = meshes[0]
    assert len(mesh.faces) > 100
    open_edges = len(trimesh.grouping.group_rows(mesh.edges_sorted, require_count=1))
    welded = mesh.copy()
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    assert welded.is_watertight or open_edges / len(mesh.edges) < 0.01
    visual = mesh.visual
    has_texture = getattr(visual, "uv", None) is not None and visual.material is not None
    assert has_texture or visual.kind == "vertex"
    return mesh


def test_multipart_upload_to_glb(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post(
            "/api/v1/generate",
            files={"image": ("toy.jpg", object_photo(fmt="JPEG"), "image/jpeg")},
            data={"seed": "3", "formats": "glb,stl"},
        )
        assert response.status_code == 202, response.text
        task = response.json()
        # Accepted and not yet ended; an idle worker woken by NOTIFY may already have claimed
        # it by the time the reply is built. The timeline below shows it was queued first.
        assert task["status"] in ("queued", "running")
        assert task["links"]["self"].endswith(task["id"])
        seen = {task["status"]}
        deadline = time.monotonic() + 120
        while task["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            task = client.get(f"/api/v1/task/{task['id']}").json()
            seen.add(task["status"])
            time.sleep(0.1)
        assert task["status"] == "succeeded", task
        assert task["progress"] == 1.0
        assert task["timings"]["total_s"] > 0 and task["timings"]["generate_s"] > 0
        timeline = client.get(f"/api/v1/task/{task['id']}/events").json()["events"]
        statuses = [e["status"] for e in timeline]
        assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "succeeded"
        formats = {f["format"] for f in task["result"]["files"]}
        assert {"glb", "stl"} <= formats
        glb = client.get(f"/api/v1/task/{task['id']}/result/glb")
        assert glb.status_code == 200
        assert glb.headers["content-type"] == "model/gltf-binary"
        check_glb(glb.content)
        stl = client.get(f"/api/v1/task/{task['id']}/result/stl")
        assert trimesh.load(io.BytesIO(stl.content), file_type="stl").is_watertight
        # The STL follows `succeeded` (issue 11): stored by the worker just after, or by the
        # download above if it came first; either way the task then says it is ready.
        deadline = time.monotonic() + 60
        while True:
            files = client.get(f"/api/v1/task/{task['id']}").json()["result"]["files"]
            entry = next(f for f in files if f["format"] == "stl")
            if entry["ready"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert entry["ready"] is True and entry["bytes"] == len(stl.content)
        preview = client.get(f"/api/v1/task/{task['id']}/preview")
        assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_base64_and_data_uri(stack: Stack) -> None:
    photo = object_photo(seed=1, alpha=True)
    b64 = base64.b64encode(photo).decode()
    with stack.client() as client:
        ids = []
        for image in (b64, f"data:image/png;base64,{b64}"):
            response = client.post("/api/v1/generate", json={"image": image})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        for task_id in ids:
            task = stack.wait_for_task(client, task_id)
            assert task["status"] == "succeeded", task
            check_glb(client.get(f"/api/v1/task/{task_id}/result/glb").content)


def test_bad_uploads_get_a_clear_4xx_and_nothing_is_stored(stack: Stack) -> None:
    with stack.client() as client:
        before = client.get("/api/v1/tasks", params={"limit": 100}).json()["tasks"]
        cases = [
            ({"files": {"image": ("notes.txt", b"hello, not a photo", "text/plain")}}, 415),
            ({"files": {"image": ("empty.png", b"", "image/png")}}, 422),
            ({"json": {"image": "%%% not base64 %%%"}}, 422),
            ({"json": {"image": "aGVsbG8=", "bogus_option": 1}}, 422),
            ({"json": {}}, 422),
            ({"content": b"raw", "headers": {"content-type": "application/octet-stream"}}, 415),
            (
                {
                    "files": {"image": ("a.png", object_photo(), "image/png")},
                    "data": {"backend": "nope"},
                },
                422,
            ),
            (
                {
                    "files": {"image": ("a.png", object_photo(), "image/png")},
                    "data": {"face_limit": "-5"},
                },
                422,
            ),
        ]
        for kwargs, expected in cases:
            response = client.post("/api/v1/generate", **kwargs)
            assert response.status_code == expected, (kwargs.keys(), response.text)
            error = response.json()["error"]
            assert error["code"] and error["message"]
            assert "Traceback" not in response.text
        after = client.get("/api/v1/tasks", params={"limit": 100}).json()["tasks"]
        assert len(after) == len(before)
        inputs = stack.run_dir / "artifacts" / "inputs"
        stored = {p.name for p in inputs.iterdir()} if inputs.exists() else set()
        assert stored <= {t["id"] for t in after}
        assert client.get("/health").status_code == 200  # still serving


def test_listing_pagination_and_filter(stack: Stack) -> None:
    with stack.client() as client:
        ids = [
            client.post(
                "/api/v1/generate", files={"image": ("t.png", object_photo(seed=i), "image/png")}
            ).json()["id"]
            for i in range(3)
        ]
        first = client.get("/api/v1/tasks", params={"limit": 2}).json()
        assert [t["id"] for t in first["tasks"]] == ids[::-1][:2]
        second = client.get("/api/v1/tasks", params={"limit": 2, "cursor": first["next_cursor"]})
        assert second.json()["tasks"][0]["id"] == ids[0]
        for task_id in ids:
            stack.wait_for_task(client, task_id)
        done = client.get("/api/v1/tasks", params={"status": "succeeded", "limit": 100}).json()
        assert set(ids) <= {t["id"] for t in done["tasks"]}
        assert all(t["status"] == "succeeded" for t in done["tasks"])
        assert client.get("/api/v1/tasks", params={"status": "nope"}).status_code == 422
        assert client.get("/api/v1/task/not-a-uuid").status_code == 404
        assert client.get("/api/v1/task/00000000-0000-0000-0000-000000000000").status_code == 404


def test_health_reports_database_and_workers(stack: Stack) -> None:
    with stack.client() as client:
        body = client.get("/health").json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["workers"].get("cpu", 0) >= 1
    with stack.client() as client:
        backends = {b["name"]: b for b in client.get("/api/v1/backends").json()}
    # No GPU here: the launcher deploys only the CPU backend (and the test's fake one).
    assert set(backends) == {"cpu", "fake-slow"} and backends["cpu"]["default"]


def test_generator_killed_mid_task_is_retried_and_succeeds_once(stack: Stack) -> None:
    with stack.client() as client:
        task_id = client.post(
            "/api/v1/generate",
            files={"image": ("t.png", object_photo(seed=7), "image/png")},
            data={"backend": "fake-slow"},
        ).json()["id"]
        running = stack.wait_for_task(client, task_id, until=("running",), timeout=60)
        assert running["attempt"] == 1
        with psycopg.connect(stack.database_url) as conn:
            worker_id, pid = conn.execute(
                "SELECT w.id, w.pid FROM tasks t JOIN workers w ON w.id = t.worker_id "
                "WHERE t.id = %s",
                (task_id,),
            ).fetchone()
        os.kill(pid, signal.SIGKILL)
        task = stack.wait_for_task(client, task_id, timeout=180)
        assert task["status"] == "succeeded", task
        assert task["attempt"] == 2
        timeline = client.get(f"/api/v1/task/{task_id}/events").json()["events"]
        assert [e["status"] for e in timeline].count("succeeded") == 1
        assert any(e["message"] and "stopped responding" in e["message"] for e in timeline)
        with psycopg.connect(stack.database_url) as conn:
            result_worker = conn.execute(
                "SELECT result->>'worker_id' FROM tasks WHERE id = %s", (task_id,)
            ).fetchone()[0]
        assert result_worker != worker_id
        check_glb(client.get(f"/api/v1/task/{task_id}/result/glb").content)
        # Only the winning attempt's files remain.
        attempts = sorted(
            p.name for p in (stack.run_dir / "artifacts" / "tasks" / task_id).iterdir()
        )
        # The kill lands before this attempt writes; a kill after a partial write is in
        # tests/integration/test_recovery.py.
        assert attempts == ["attempt-2"]


def test_generators_scale_on_the_queue_backlog(stack: Stack) -> None:
    """Nothing routes requests to generators; the backlog policy must still add a replica."""

    def cpu_replicas() -> int:
        return len(stack.processes("ServeReplica:photo3d:generator-cpu"))

    def queued() -> int:
        with psycopg.connect(stack.database_url) as conn:
            return conn.execute(
                "SELECT count(*) FROM tasks WHERE status = 'queued' AND backend = 'cpu'"
            ).fetchone()[0]

    assert cpu_replicas() == 1  # min_replicas while idle
    with stack.client() as client:

        def submit(count: int) -> list[str]:
            return [
                client.post(
                    "/api/v1/generate",
                    files={"image": ("p.png", object_photo(size=768, seed=i), "image/png")},
                ).json()["id"]
                for i in range(count)
            ]

        ids = submit(20)
        deadline = time.monotonic() + 60
        most = 1
        while time.monotonic() < deadline and most < 2:
            most = max(most, cpu_replicas())
            # One replica can drain 20 small tasks before the policy's upscale delay has
            # passed: keep a backlog of at least 10 (5 replicas' worth) until it reacts.
            if most < 2 and queued() < 10:
                ids += submit(10)
            time.sleep(0.5)
        assert most == 2, "a backlog of 10 or more tasks did not bring a second cpu replica"
        for task_id in ids:
            assert stack.wait_for_task(client, task_id)["status"] == "succeeded"


def listening_ports(processes: list) -> set[int]:
    return {
        conn.laddr.port
        for proc in processes
        for conn in proc.net_connections(kind="tcp")
        if conn.status == "LISTEN"
    }


def test_the_ingress_replica_itself_answers_on_the_service_port(stack: Stack) -> None:
    """Direct ingress (the default on one machine): no Ray proxy hop on the service port, and
    Ray's proxy still serves the same app on a loopback port beside it."""
    log = stack.log_path.read_text(errors="replace")
    found = re.search(r"Ingress on 127\.0\.0\.1:(\d+) \(direct\); Ray's proxy on :(\d+)", log)
    assert found, "photo3d serve did not say it serves the Ingress directly"
    service_port, proxy_port = int(found[1]), int(found[2])
    assert stack.url.endswith(f":{service_port}")
    assert service_port in listening_ports(stack.processes("ServeReplica:photo3d:Ingress"))
    assert service_port not in listening_ports(stack.processes("ProxyActor"))
    with stack.client() as client:
        assert client.get("/health").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{proxy_port}/health", timeout=10).status_code == 200


def test_nothing_of_the_stack_listens_beyond_loopback(stack: Stack) -> None:
    """Bound to 127.0.0.1, the one-machine stack opens no port another host can reach: not the
    API, not Ray's proxy, GCS, raylet or agents, and not the gRPC port every Serve replica
    opens for calls between deployments (Ray binds that one to all interfaces)."""
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    processes = [psutil.Process(stack.process.pid), *stack.processes("")]
    exposed: list[str] = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in loopback:
                    exposed.append(f"{' '.join(process.cmdline())[:60]} on {conn.laddr}")
    replicas = stack.processes("ServeReplica:photo3d:")
    assert len(replicas) >= 3  # the Ingress, a generator and the queue monitor were looked at
    assert not exposed, exposed
