"""Bulk conversion as a real Ray Job: `ray job submit` to the job server `photo3d serve` starts,
over folders of generated photos, with reruns, a stop halfway and more photos than the account's
interactive limit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trimesh

from tests.e2e.test_generate_e2e import check_glb
from tests.support import pg
from tests.support.images import object_photo
from tests.support.stack import ROOT, Stack, free_port, run_stack

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def stack(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    env = {
        "PHOTO3D_DASHBOARD_PORT": str(port),
        "PHOTO3D_MAX_ACTIVE_TASKS": "5",
        "PHOTO3D_MAX_BATCH_IN_FLIGHT": "6",
    }
    for url in pg.clone_database(pg_admin, prefix="bulk"):
        with run_stack(tmp_path_factory.mktemp("bulk"), url, env=env) as running:
            running.job_server = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
            yield running


def submit(stack: Stack, submission_id: str, *args: str) -> None:
    """`ray job submit` exactly as the README says, without waiting for the job."""
    command = [
        RAY, "job", "submit", "--address", stack.job_server,  # type: ignore[attr-defined]
        "--submission-id", submission_id, "--no-wait", "--working-dir", str(ROOT),
        "--", "python", "-m", "jobs.bulk_convert", *args,
    ]  # fmt: skip
    for _ in range(5):  # Ray's job server asks to retry while its agent is still starting
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout + done.stderr


def job_status(stack: Stack, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(stack.job_server)  # type: ignore[attr-defined]
    return str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]


def job_logs(stack: Stack, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(stack.job_server).get_job_logs(submission_id)  # type: ignore[attr-defined]


def wait_for_job(stack: Stack, submission_id: str, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(stack, submission_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {submission_id} still {status}:\n{job_logs(stack, submission_id)}")


def test_ray_job_converts_a_folder_reports_and_skips_on_rerun(stack: Stack, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "shelf").mkdir(parents=True)
    for i in range(3):
        (photos / f"toy{i}.png").write_bytes(object_photo(size=160, seed=20 + i))
    (photos / "shelf" / "toy0.jpg").write_bytes(object_photo(size=160, seed=30, fmt="JPEG"))
    (photos / "broken.jpg").write_bytes(b"not a photo")
    (photos / "notes.txt").write_text("not an item")
    out = tmp_path / "out"
    args = ("--input", str(photos), "--output", str(out), "--formats", "glb,stl")

    submit(stack, "bulk-first", *args)
    assert wait_for_job(stack, "bulk-first") == "SUCCEEDED", job_logs(stack, "bulk-first")
    logs = job_logs(stack, "bulk-first")
    assert "items ended" in logs  # progress lines in the job's log

    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"succeeded": 4, "rejected": 1}
    rejected = next(i for i in report["items"] if i["status"] == "rejected")
    assert rejected["error"]["code"] == "unsupported_image_type"
    for name in ("toy0", "toy1", "toy2", "shelf__toy0"):
        check_glb((out / f"{name}.glb").read_bytes())
        assert trimesh.load(out / f"{name}.stl").is_watertight
        assert (out / f"{name}.preview.png").stat().st_size > 0
    assert "shelf__toy0.preview.png" in (out / "report.html").read_text()
    for item in report["items"]:
        for file_name in item.get("files", {}).values():
            # <name>.glb, <name>_obj.zip, <name>.mask.png: the item's name, then a separator.
            assert file_name.startswith((f"{item['name']}.", f"{item['name']}_")), file_name
            assert (out / file_name).stat().st_size > 0
    assert any("mask" in item.get("files", {}) for item in report["items"])  # photos, no alpha

    batch_id = report["batch_id"]
    with stack.client() as client:
        tasks = client.get("/api/v1/tasks", params={"batch_id": batch_id}).json()["tasks"]
        assert len(tasks) == 4 and {t["status"] for t in tasks} == {"succeeded"}
        batch = client.get(f"/api/v1/batches/{batch_id}").json()
        assert batch["status"] == "completed"
        assert batch["total"] == 5 and batch["progress"] == 1.0
        assert batch["counts"]["succeeded"] == 4 and batch["rejected"] == 1
        assert batch["failures"] == {"unsupported_image_type": 1}
        listed = client.get("/api/v1/batches").json()["batches"]
        assert batch_id in [b["id"] for b in listed]

    # The same command again: the same batch, every photo already converted, nothing queued.
    submit(stack, "bulk-again", *args)
    assert wait_for_job(stack, "bulk-again") == "SUCCEEDED", job_logs(stack, "bulk-again")
    again = json.loads((out / "report.json").read_text())
    assert again["batch_id"] == batch_id
    assert again["counts"] == {"skipped": 4, "rejected": 1}
    with stack.client() as client:
        assert len(client.get("/api/v1/tasks", params={"batch_id": batch_id}).json()["tasks"]) == 4


def test_more_photos_than_the_interactive_limit_stop_and_resume(
    stack: Stack, tmp_path: Path
) -> None:
    """60 photos with PHOTO3D_MAX_ACTIVE_TASKS=5: none refused; `ray job stop` halfway, then the
    same command finishes the batch without converting anything twice; meanwhile the account's
    interactive requests are still accepted."""
    photos = tmp_path / "catalogue"
    photos.mkdir()
    for i in range(60):
        (photos / f"item{i:02d}.png").write_bytes(object_photo(size=96, seed=100 + i))
    out = tmp_path / "out"
    args = ("--input", str(photos), "--output", str(out))

    submit(stack, "catalogue-1", *args)
    with stack.client() as client:
        deadline = time.monotonic() + 300
        batch: dict = {}
        while time.monotonic() < deadline:
            listed = client.get("/api/v1/batches").json()["batches"]
            batch = next((b for b in listed if b["source"] == str(photos)), {})
            if batch and batch["counts"]["succeeded"] >= 8:
                break
            time.sleep(0.5)
        assert batch and batch["counts"]["succeeded"] >= 8, batch
        # An interactive task of the same account is not refused while the batch runs.
        reply = client.post(
            "/api/v1/generate", files={"image": ("me.png", object_photo(size=96, seed=7))}
        )
        assert reply.status_code == 202, reply.text
        interactive = reply.json()["id"]

    stop = subprocess.run(
        [RAY, "job", "stop", "--address", stack.job_server, "catalogue-1"],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert wait_for_job(stack, "catalogue-1") == "STOPPED"
    with stack.client() as client:
        halfway = client.get(f"/api/v1/batches/{batch['id']}").json()
    assert sum(halfway["counts"].values()) < 60, "stopped too late to show a resume"

    submit(stack, "catalogue-2", *args)
    assert wait_for_job(stack, "catalogue-2") == "SUCCEEDED", job_logs(stack, "catalogue-2")
    report = json.loads((out / "report.json").read_text())
    assert report["batch_id"] == batch["id"]
    assert sum(report["counts"].values()) == 60
    assert set(report["counts"]) <= {"succeeded", "skipped"}
    for i in range(60):
        assert (out / f"item{i:02d}.glb").exists()
    with stack.client() as client:
        final = client.get(f"/api/v1/batches/{batch['id']}").json()
        assert final["counts"]["succeeded"] == 60 and final["status"] == "completed"
        ids, cursor = set(), None
        while True:
            params = {
                "batch_id": batch["id"],
                "limit": 100,
                **({"cursor": cursor} if cursor else {}),
            }
            page = client.get("/api/v1/tasks", params=params).json()
            ids |= {t["id"] for t in page["tasks"]}
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(ids) == 60  # one task per photo: nothing converted twice
        assert stack.wait_for_task(client, interactive)["status"] == "succeeded"
