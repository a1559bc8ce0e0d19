"""What operators read, in process on a real PostgreSQL: request ids, the route templates and
statuses the HTTP metrics are labelled with, the worker's task metrics, the queue gauges'
figures against the database, and log lines that carry ids but never a key."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app import logs, metrics
from serve_app.monitor import QueueMonitor
from serve_app.service import Services
from serve_app.store.queue_stats import QueueStats
from tests.integration.test_api_worker import make_worker, submit


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """Every metrics helper call, as (helper name, args), instead of Ray's pipeline."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for name in (
        "http_request",
        "task_submitted",
        "task_claimed",
        "task_finished",
        "generation_seconds",
        "export_seconds",
        "preview_seconds",
        "artifact_bytes",
        "queue_tasks",
        "queue_oldest_age",
        "workers_live",
        "deployment_replicas",
    ):
        monkeypatch.setattr(
            metrics, name, lambda *args, _name=name: calls.append((_name, args)), raising=True
        )
    return calls


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    logger = logging.getLogger("serve_app")
    saved = list(logger.handlers), logger.propagate, logger.level
    stream = io.StringIO()
    logs.configure("json")
    next(h for h in logger.handlers if h.name == "photo3d").setStream(stream)  # type: ignore[attr-defined]
    yield stream
    logger.handlers[:], logger.propagate, logger.level = saved


def test_request_id_is_generated_or_kept_and_echoed(client: TestClient) -> None:
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == (
        "abc-123"
    )
    # An id that could forge log structure is replaced, not echoed.
    odd = client.get("/health", headers={"X-Request-ID": 'x" "level":"ERROR'})
    assert odd.headers["x-request-id"] != 'x" "level":"ERROR'
    assert len(odd.headers["x-request-id"]) == 32


def test_http_metrics_use_route_templates_never_raw_paths(
    client: TestClient, recorded: list[tuple[str, tuple[Any, ...]]]
) -> None:
    task_id = uuid.uuid4()
    client.get(f"/api/v1/task/{task_id}")
    client.post("/api/v1/generate", files={"image": ("x.png", b"not an image", "image/png")})
    http = [args for name, args in recorded if name == "http_request"]
    routes = {(route, method, status) for route, method, status, _ in http}
    assert ("/api/v1/task/{task_id}", "GET", 404) in routes
    assert any(r == "/api/v1/generate" and s in (400, 415, 422) for r, _, s in routes)
    assert all(str(task_id) not in route for route, *_ in http)
    assert all(seconds >= 0 for *_, seconds in http)


def test_submit_and_worker_record_task_metrics_and_log_with_ids(
    client: TestClient,
    services: Services,
    recorded: list[tuple[str, tuple[Any, ...]]],
    log_lines: io.StringIO,
) -> None:
    task = submit(client, formats="glb,stl")
    flat = io.BytesIO()
    Image.new("RGB", (128, 128), (120, 120, 120)).save(flat, format="PNG")
    failing = client.post(
        "/api/v1/generate", files={"image": ("flat.png", flat.getvalue(), "image/png")}
    ).json()
    worker = make_worker(services)
    assert worker.run_once() and worker.run_once()
    names = [name for name, _ in recorded]
    assert names.count("task_submitted") == 2
    claims = [args for name, args in recorded if name == "task_claimed"]
    assert [(b, a) for b, a, _ in claims] == [("cpu", 1), ("cpu", 1)]
    assert all(wait >= 0 for *_, wait in claims)
    finished = {args for name, args in recorded if name == "task_finished"}
    assert ("cpu", "succeeded") in finished
    assert ("cpu", "failed", "no_object_found") in finished
    stages = {args[1] for name, args in recorded if name == "generation_seconds"}
    assert "total" in stages and len(stages) > 1
    kinds = {args[1] for name, args in recorded if name == "artifact_bytes"}
    assert {"glb", "stl", "preview"} <= kinds
    assert "export_seconds" in names and "preview_seconds" in names

    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    queued = [line for line in lines if line["message"] == "task queued"]
    assert {line["task_id"] for line in queued} == {task["id"], failing["id"]}
    assert all(line["account_id"] == "local" and line["request_id"] for line in queued)
    about_failing = [line for line in lines if line.get("task_id") == failing["id"]]
    assert any("failed (no_object_found)" in line["message"] for line in about_failing)
    assert all(line["attempt"] == 1 for line in about_failing if "attempt" in line)


def test_queue_snapshot_matches_the_database(
    client: TestClient, services: Services, recorded: list[tuple[str, tuple[Any, ...]]]
) -> None:
    for _ in range(3):
        submit(client)
    services.queue.claim("w-test", ["cpu"])
    services.queue.register_worker("w-test", "cpu", "host", 1)
    monitor = QueueMonitor(
        QueueStats(services.db),
        ["cpu", "trellis"],
        alive_seconds=30,
        interval_seconds=1,
        replica_counts=lambda: {"Ingress": 1, "generator-trellis": 0},
    )
    snapshot = monitor.run_once()
    assert snapshot.tasks == {
        ("cpu", "queued"): 2,
        ("cpu", "running"): 1,
        ("trellis", "queued"): 0,
        ("trellis", "running"): 0,
    }
    assert snapshot.workers == {"cpu": 1, "trellis": 0}
    assert snapshot.oldest_queued_s["cpu"] >= 0 and snapshot.oldest_queued_s["trellis"] == 0
    gauges = {args for name, args in recorded if name == "queue_tasks"}
    assert ("cpu", "queued", 2) in gauges and ("trellis", "running", 0) in gauges
    assert ("generator-trellis", 0) in {args for n, args in recorded if n == "deployment_replicas"}
