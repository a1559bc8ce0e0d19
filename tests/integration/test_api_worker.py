"""The HTTP API and the worker engine together on a real PostgreSQL, in one process (no Ray):
the same code the Serve deployments wrap."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid

from fastapi.testclient import TestClient
from PIL import Image

from serve_app.backends import Backend, create_backend
from serve_app.service import Services
from serve_app.worker import Worker
from tests.support.fake_backends import HangingFakeBackend
from tests.support.images import object_photo


def make_worker(services: Services, engine: Backend | None = None, **kwargs: object) -> Worker:
    engine = engine or create_backend("cpu", services.settings)
    engine.load()
    return Worker(
        queue=services.queue,
        artifacts=services.artifacts,
        backend=engine,
        heartbeat_seconds=0.2,
        poll_seconds=0.2,
        task_timeout_seconds=60,
        **kwargs,
    )  # type: ignore[arg-type]


def submit(client: TestClient, **data: str) -> dict:
    response = client.post(
        "/api/v1/generate", files={"image": ("p.png", object_photo(), "image/png")}, data=data
    )
    assert response.status_code == 202, response.text
    return response.json()


def test_task_runs_to_success_with_progress_timeline(
    client: TestClient, services: Services
) -> None:
    task = submit(client, formats="glb,obj")
    assert task["queue_position"] == 0
    assert make_worker(services).run_once()
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    stages = [e["stage"] for e in client.get(f"/api/v1/task/{task['id']}/events").json()["events"]]
    assert stages[1] == "starting" and stages[-1] == "done"
    obj = client.get(f"/api/v1/task/{task['id']}/result/obj")
    assert obj.status_code == 200 and obj.content[:2] == b"PK"
    # A format not asked for is made on demand, then served from the store.
    ply = client.get(f"/api/v1/task/{task['id']}/result/ply")
    assert ply.status_code == 200 and ply.content.startswith(b"ply")
    assert client.get(f"/api/v1/task/{task['id']}/result/fbx").status_code == 404
    turntable = client.get(f"/api/v1/task/{task['id']}/turntable")
    assert turntable.status_code == 200 and turntable.content[8:12] == b"WEBP"


def test_options_as_form_fields_are_typed(client: TestClient) -> None:
    task = submit(
        client,
        texture_size="2048",
        face_limit="5000",
        remove_background="true",
        seed="7",
        backend="cpu",
    )
    assert task["options"]["texture_size"] == 2048 and task["options"]["face_limit"] == 5000
    assert task["options"]["remove_background"] is True and task["options"]["seed"] == 7


def test_queue_position_counts_tasks_ahead(client: TestClient) -> None:
    ids = [submit(client)["id"] for _ in range(3)]
    tasks = [client.get(f"/api/v1/task/{i}").json() for i in ids]
    assert [t["queue_position"] for t in tasks] == [0, 1, 2]
    assert [t["queue_position_estimated"] for t in tasks] == [False, False, False]  # exact


def test_event_stream_follows_the_task_to_its_end(client: TestClient, services: Services) -> None:
    task = submit(client)
    worker = make_worker(services)
    worker.start()
    try:
        statuses = []
        with client.stream("GET", f"/api/v1/task/{task['id']}/stream") as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "task":
                    statuses.append(json.loads(line.removeprefix("data: "))["status"])
        assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded"
    finally:
        worker.stop(timeout=10)


def test_cancel_running_task_drops_its_result(client: TestClient, services: Services) -> None:
    task = submit(client)
    claim = services.queue.claim("someone", ["cpu"])
    assert claim is not None
    response = client.post(f"/api/v1/task/{task['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert client.post(f"/api/v1/task/{task['id']}/cancel").status_code == 422
    worker = make_worker(services)
    worker.process(claim)  # the stale claim runs anyway, as a slow worker would
    assert client.get(f"/api/v1/task/{task['id']}").json()["status"] == "canceled"
    leftovers = services.settings.artifacts_path / "tasks" / task["id"]
    assert not [p for p in leftovers.rglob("*") if p.is_file()]


def test_delete_removes_task_and_files(client: TestClient, services: Services) -> None:
    task = submit(client)
    make_worker(services).run_once()
    assert (services.settings.artifacts_path / "tasks" / task["id"]).exists()
    assert client.delete(f"/api/v1/task/{task['id']}").status_code == 204
    assert client.get(f"/api/v1/task/{task['id']}").status_code == 404
    assert not (services.settings.artifacts_path / "tasks" / task["id"]).exists()
    assert not (services.settings.artifacts_path / "inputs" / task["id"]).exists()


def test_no_object_fails_permanently_with_reason(client: TestClient, services: Services) -> None:
    flat = io.BytesIO()
    Image.new("RGB", (128, 128), (120, 120, 120)).save(flat, format="PNG")
    task = client.post(
        "/api/v1/generate", files={"image": ("flat.png", flat.getvalue(), "image/png")}
    ).json()
    make_worker(services).run_once()
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "failed" and done["attempt"] == 1
    assert done["error"]["code"] == "no_object_found"


def test_a_jpeg_no_decoder_reads_fails_its_task_at_once(
    client: TestClient, services: Services
) -> None:
    """The ingress checks a JPEG's header and markers, not its pixels (issue 11): a photo whose
    scan cannot be decoded is accepted, and its task fails on the first attempt, with the same
    error the ingress gives a truncated one, instead of being retried."""
    photo = io.BytesIO()
    Image.open(io.BytesIO(object_photo())).convert("RGB").save(photo, format="JPEG")
    data = bytearray(photo.getvalue())
    at = data.find(b"\xff\xc4")  # the first Huffman table: code counts no decoder accepts
    data[at + 5 : at + 21] = b"\xff" * 16
    response = client.post(
        "/api/v1/generate", files={"image": ("p.jpg", bytes(data), "image/jpeg")}
    )
    assert response.status_code == 202, response.text
    make_worker(services).run_once()
    done = client.get(f"/api/v1/task/{response.json()['id']}").json()
    assert done["status"] == "failed" and done["attempt"] == 1
    assert done["error"]["code"] == "corrupt_image"


def test_hanging_backend_is_ended_by_the_watchdog_then_fails(services: Services) -> None:
    """A generation that never returns: the watchdog records why and ends the process; after
    max_attempts the task fails with that reason."""
    services.artifacts.put("inputs/hang/photo-0.png", object_photo())
    row, _ = services.queue.submit(
        task_id=uuid.uuid4(),
        account_id="local",
        backend="fake-hang",
        options={},
        inputs=["inputs/hang/photo-0.png"],
        max_attempts=2,
    )
    for attempt in (1, 2):
        exits: list[int] = []
        worker = make_worker(
            services, HangingFakeBackend(services.settings), exit_process=exits.append
        )
        worker.task_timeout_seconds = 0.5
        threading.Thread(target=worker.run_once, daemon=True).start()
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exits == [70]  # the process would end here; Serve starts a new replica
        task = services.queue.get(row["id"], "local")
        assert task is not None and task["attempt"] == attempt
        assert task["error_code"] == "generation_timeout"
    assert task["status"] == "failed"
    assert "longer than 0 s (attempt 2 of 2)" in task["error_message"]


def test_artifact_store_failure_retries_then_fails_without_serving_files(
    client: TestClient, services: Services
) -> None:
    task = submit(client)
    # A file where the results folder should be: every write fails with a real OS error.
    blocked = services.settings.artifacts_path / "tasks"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("in the way")
    worker = make_worker(services)
    for _ in range(services.settings.max_attempts):
        assert worker.run_once()
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "failed" and done["attempt"] == services.settings.max_attempts
    assert done["error"]["code"] == "artifact_store_error"
    assert "could not write" in done["error"]["message"]
    assert client.get(f"/api/v1/task/{task['id']}/result/glb").status_code == 422


def test_results_expire_and_are_deleted(client: TestClient, services: Services) -> None:
    task = submit(client)
    worker = make_worker(services, retention_seconds=0.5)
    assert worker.run_once()
    files = services.settings.artifacts_path / "tasks" / task["id"]
    assert client.get(f"/api/v1/task/{task['id']}/result/glb").status_code == 200
    time.sleep(1.0)
    assert worker.housekeeping.reap_expired() == 1
    assert not [p for p in files.rglob("*") if p.is_file()]
    gone = client.get(f"/api/v1/task/{task['id']}/result/glb")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "result_expired"
    body = client.get(f"/api/v1/task/{task['id']}").json()
    assert body["expired_at"] and body["result"] is None and body["status"] == "succeeded"


def test_health_needs_a_live_worker(client: TestClient, services: Services) -> None:
    response = client.get("/health")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["database"] == "ok"
    services.queue.register_worker("w-1", "cpu", "host", 1)
    assert client.get("/health").status_code == 200


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/health",
        "/api/v1/generate",
        "/api/v1/task/{task_id}",
        "/api/v1/tasks",
        "/api/v1/task/{task_id}/stream",
        "/api/v1/task/{task_id}/cancel",
        "/api/v1/task/{task_id}/result/{fmt}",
        "/api/v1/task/{task_id}/preview",
    } <= paths
    assert client.get("/docs").status_code == 200


def test_worker_stays_alive_for_health_during_a_long_generation(
    client: TestClient, services: Services
) -> None:
    """A generation longer than worker_alive_seconds must not make /health report no worker."""
    from tests.support.fake_backends import SlowFakeBackend

    services.artifacts.put("inputs/slow/photo-0.png", object_photo())
    services.queue.submit(
        task_id=uuid.uuid4(),
        account_id="local",
        backend="fake-slow",
        options={},
        inputs=["inputs/slow/photo-0.png"],
        max_attempts=1,
    )
    # A generation 3x longer than the liveness window (wide margins: a loaded CI machine can
    # stall a 0.2 s presence beat for a second or two).
    services.settings = services.settings.model_copy(update={"worker_alive_seconds": 3.0})
    backend = SlowFakeBackend(services.settings)
    backend.seconds = 9
    worker = make_worker(services, backend)
    worker.start()
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert client.get("/health").json()["workers"].get("fake-slow") == 1
            time.sleep(0.5)
    finally:
        worker.stop(timeout=15)


def test_task_succeeds_before_its_preview_and_the_preview_follows(
    client: TestClient, services: Services
) -> None:
    """A task is succeeded as soon as its model is stored; the worker renders the preview
    afterwards and says so, and a preview asked for earlier (or never rendered because the
    worker died in between) is rendered on request."""
    seen: list[dict] = []
    worker = make_worker(services)
    render = worker._render_preview

    def watch_then_render(claim, result) -> None:  # type: ignore[no-untyped-def]
        seen.append(client.get(f"/api/v1/task/{claim.id}").json())
        render(claim, result)

    worker._render_preview = watch_then_render  # type: ignore[method-assign]
    task = submit(client)
    assert worker.run_once()
    (at_success,) = seen
    assert at_success["status"] == "succeeded"
    assert at_success["result"]["preview_ready"] is False
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["result"]["preview_ready"] is True
    preview = client.get(f"/api/v1/task/{task['id']}/preview")
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")

    # A worker that died between success and preview: the first request renders it.
    dying = make_worker(services)
    dying._render_preview = lambda claim, result: None  # type: ignore[method-assign]
    orphan = submit(client)
    assert dying.run_once()
    body = client.get(f"/api/v1/task/{orphan['id']}").json()
    assert body["status"] == "succeeded" and body["result"]["preview_ready"] is False
    late = client.get(f"/api/v1/task/{orphan['id']}/preview")
    assert late.status_code == 200 and late.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(late.content)).size[0] > 0


def wait_until(check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def queue_photo_task(services: Services, backend: str) -> uuid.UUID:
    key = f"inputs/{uuid.uuid4().hex}/photo-0.png"
    services.artifacts.put(key, object_photo(64))
    row, _ = services.queue.submit(
        task_id=uuid.uuid4(),
        account_id="local",
        backend=backend,
        options={"backend": backend},
        inputs=[key],
        max_attempts=1,
    )
    return uuid.UUID(str(row["id"]))


def status_of(services: Services, task_id: uuid.UUID) -> str:
    return str(services.queue.get(task_id, "local")["status"])  # type: ignore[index]


def test_idle_worker_does_no_work_for_another_backends_tasks(services: Services) -> None:
    """Issue 11: every queued task sends a NOTIFY; a worker wakes (and claims) only for its own
    backend's. Counted in-process: its claim calls."""
    from tests.support.fake_backends import ZeroCostFakeBackend

    claims: list[list[str]] = []
    claim = services.queue.claim

    def counted(worker_id: str, backends: list[str]):  # type: ignore[no-untyped-def]
        claims.append(backends)
        return claim(worker_id, backends)

    services.queue.claim = counted  # type: ignore[method-assign]
    worker = make_worker(services, ZeroCostFakeBackend(services.settings))
    worker.poll_seconds = 120  # no polling rounds during the test: only NOTIFYs wake it
    worker.start()
    try:
        # Listening (the first claim found nothing; the listener's LISTEN has run).
        wait_until(
            lambda: (
                services.queue._work_listener is not None
                and services.queue._work_listener._conn is not None
            )
        )
        others = [queue_photo_task(services, "cpu") for _ in range(5)]
        mine = queue_photo_task(services, "fake-zero")
        wait_until(lambda: status_of(services, mine) == "succeeded")
        # The first look, the claim its own task's NOTIFY woke, and at most the look for more
        # after it: none for the five tasks of the other backend, which stay queued.
        assert len(claims) <= 3, claims
        assert all(status_of(services, task) == "queued" for task in others)
    finally:
        worker._stop.set()
        queue_photo_task(services, "fake-zero")  # wakes the loop, which now sees the stop
        worker.stop(timeout=10)


def test_next_task_is_claimed_while_the_previous_preview_renders(services: Services) -> None:
    """Issue 11: the preview renders on a thread of its own after the task succeeded, so it
    delays neither that task nor the next one; it is marked ready once rendered."""
    from tests.support.fake_backends import ZeroCostFakeBackend

    release = threading.Event()
    worker = make_worker(services, ZeroCostFakeBackend(services.settings))
    render = worker._render_preview

    def held_render(claim, result) -> None:  # type: ignore[no-untyped-def]
        release.wait(60)
        render(claim, result)

    worker._render_preview = held_render  # type: ignore[method-assign]
    first = queue_photo_task(services, "fake-zero")
    second = queue_photo_task(services, "fake-zero")
    worker.start()
    try:
        # Both succeed while the first preview is still held.
        wait_until(lambda: status_of(services, second) == "succeeded")
        assert status_of(services, first) == "succeeded"
        assert not release.is_set()
        for task in (first, second):
            row = services.queue.get(task, "local")
            assert row is not None and row["result"]["preview"]["ready"] is False
        release.set()
        for task in (first, second):
            wait_until(
                lambda task=task: services.queue.get(task, "local")["result"]["preview"]["ready"]  # type: ignore[index]
            )
    finally:
        release.set()
        worker.stop(timeout=10)
