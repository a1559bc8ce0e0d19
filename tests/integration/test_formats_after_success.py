"""Issue 11: a task is `succeeded` as soon as its GLB is stored; the other formats it asked for
are converted afterwards, off the claim loop, each marked ready as it is stored; one asked for
before that (or never converted because the worker died) is converted on request. Real
PostgreSQL, the in-process API and the worker engine (no Ray); the order is shown by holding
the worker's conversion on an event, not by timing."""

from __future__ import annotations

import threading
import time
import uuid

from fastapi.testclient import TestClient

from serve_app import exports
from serve_app import worker as worker_module
from serve_app.service import Services
from serve_app.worker import Worker
from tests.support.fake_backends import ZeroCostFakeBackend
from tests.support.images import object_photo


def make_worker(services: Services) -> Worker:
    engine = ZeroCostFakeBackend(services.settings)
    engine.load()
    return Worker(
        queue=services.queue,
        artifacts=services.artifacts,
        backend=engine,  # type: ignore[arg-type]
        heartbeat_seconds=0.2,
        poll_seconds=0.2,
        task_timeout_seconds=60,
    )


def queue_task(services: Services, formats: list[str]) -> uuid.UUID:
    key = f"inputs/{uuid.uuid4().hex}/photo-0.png"
    services.artifacts.put(key, object_photo(64))
    row, _ = services.queue.submit(
        task_id=uuid.uuid4(),
        account_id="local",
        backend="fake-zero",
        options={"backend": "fake-zero", "formats": formats},
        inputs=[key],
        max_attempts=1,
    )
    return uuid.UUID(str(row["id"]))


def stored_files(services: Services, task_id: uuid.UUID) -> dict:
    row = services.queue.get(task_id, "local")
    assert row is not None and row["status"] == "succeeded", row
    return dict(row["result"]["files"])


def wait_until(check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def api_files(client: TestClient, task_id: uuid.UUID) -> dict[str, dict]:
    task = client.get(f"/api/v1/task/{task_id}").json()
    assert task["status"] == "succeeded", task
    return {f["format"]: f for f in task["result"]["files"]}


def test_succeeded_comes_before_the_extra_formats_which_then_become_ready(
    client: TestClient, services: Services, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    converting = threading.Event()
    release = threading.Event()
    real = worker_module.store_format

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        converting.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "store_format", held)  # the worker's conversions only
    worker = make_worker(services)
    task = queue_task(services, ["glb", "stl", "obj"])
    worker.start()
    try:
        assert converting.wait(60)
        # The worker is converting, so the task already succeeded, with its GLB and without
        # the other formats; the API says which are ready.
        files = stored_files(services, task)
        assert files["glb"]["ready"] is True and services.artifacts.exists(files["glb"]["key"])
        for fmt in ("stl", "obj"):
            assert files[fmt]["ready"] is False and files[fmt]["bytes"] is None
            assert not services.artifacts.exists(files[fmt]["key"])
        shown = api_files(client, task)
        assert [shown[f]["ready"] for f in ("glb", "stl", "obj")] == [True, False, False]
        assert shown["glb"]["bytes"] > 0 and shown["stl"]["bytes"] is None
        release.set()
        wait_until(lambda: all(f["ready"] for f in stored_files(services, task).values()))
    finally:
        release.set()
        worker.stop(timeout=10)
    shown = api_files(client, task)
    glb = client.get(f"/api/v1/task/{task}/result/glb").content
    for fmt in ("stl", "obj"):
        download = client.get(f"/api/v1/task/{task}/result/{fmt}")
        assert download.status_code == 200
        assert download.content == exports.convert(glb, fmt)
        assert shown[fmt]["ready"] is True and shown[fmt]["bytes"] == len(download.content)


def test_a_format_the_worker_never_converted_is_made_on_request(
    client: TestClient, services: Services
) -> None:
    """The worker died between the task's success and its conversions: the format is made on
    its first request (plain and signed link), stored, and the task then says it is ready."""
    dying = make_worker(services)
    dying._convert_formats = lambda claim, result: None  # type: ignore[method-assign]
    task = queue_task(services, ["glb", "stl", "ply"])
    assert dying.run_once()
    files = stored_files(services, task)
    assert files["stl"]["ready"] is False and not services.artifacts.exists(files["stl"]["key"])

    glb = client.get(f"/api/v1/task/{task}/result/glb").content
    stl = client.get(f"/api/v1/task/{task}/result/stl")
    assert stl.status_code == 200 and stl.headers["content-type"] == "model/stl"
    assert stl.content == exports.convert(glb, "stl")
    assert services.artifacts.get(files["stl"]["key"]) == stl.content
    shown = api_files(client, task)
    assert shown["stl"]["ready"] is True and shown["stl"]["bytes"] == len(stl.content)
    assert shown["ply"]["ready"] is False
    # The signed link a webhook or the web page hands out works the same way.
    link = client.get(f"/api/v1/task/{task}").json()["result"]["format_urls"]["ply"]
    ply = client.get(link)
    assert ply.status_code == 200 and ply.content == exports.convert(glb, "ply")
    assert api_files(client, task)["ply"]["ready"] is True


def test_a_task_asking_for_glb_only_has_nothing_to_follow(services: Services) -> None:
    """The default request converts nothing: every file is ready at `succeeded`."""
    worker = make_worker(services)
    task = queue_task(services, ["glb"])
    assert worker.run_once()
    assert [f["ready"] for f in stored_files(services, task).values()] == [True]


def test_on_request_mode_leaves_preview_and_formats_to_their_first_fetch(
    client: TestClient, services: Services
) -> None:
    """PHOTO3D_AFTER_SUCCESS_FILES=on_request: the worker makes nothing after `succeeded`;
    the first fetch of each makes it."""
    worker = make_worker(services)
    worker.after_success_files = "on_request"
    task = queue_task(services, ["glb", "stl"])
    assert worker.run_once()
    row = services.queue.get(task, "local")
    assert row is not None and row["result"]["preview"]["ready"] is False
    assert not services.artifacts.exists(row["result"]["preview"]["key"])
    assert not services.artifacts.exists(row["result"]["files"]["stl"]["key"])
    glb = client.get(f"/api/v1/task/{task}/result/glb").content
    assert client.get(f"/api/v1/task/{task}/result/stl").content == exports.convert(glb, "stl")
    preview = client.get(f"/api/v1/task/{task}/preview")
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
    result = client.get(f"/api/v1/task/{task}").json()["result"]
    assert result["preview_ready"] is True
    assert all(f["ready"] for f in result["files"])


def test_on_an_s3_store_a_format_not_converted_yet_is_made_by_its_signed_link(
    seaweed, database_url: str, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The cluster setup: artifacts in a bucket (SeaweedFS). A format the worker has not
    converted is converted by the signed link's request, stored in the bucket, and the link
    redirects to it there."""
    import httpx

    from serve_app.api.app import create_app
    from serve_app.settings import Settings
    from tests.support.app import open_services

    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        artifact_url=f"s3://{seaweed.new_bucket()}/photo3d",
        health_requires_worker=False,
    )
    with open_services(settings) as services, TestClient(create_app(services)) as client:
        dying = make_worker(services)
        dying._convert_formats = lambda claim, result: None  # type: ignore[method-assign]
        task = queue_task(services, ["glb", "obj"])
        assert dying.run_once()
        assert api_files(client, task)["obj"]["ready"] is False
        result = client.get(f"/api/v1/task/{task}").json()["result"]
        redirect = client.get(result["format_urls"]["obj"], follow_redirects=False)
        assert redirect.status_code == 307, redirect.text
        body = httpx.get(redirect.headers["location"])
        glb = services.artifacts.get(stored_files(services, task)["glb"]["key"])
        assert body.status_code == 200 and body.content == exports.convert(glb, "obj")
        assert api_files(client, task)["obj"]["ready"] is True
