"""What integrators build on: an OpenAPI document that validates and generates a typed client
(third-party tools, as an integrator runs them), RateLimit-* headers, Idempotency-Key reuse with
another request refused, and HEIC photos through the API."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.artifact_keys import input_key
from serve_app.images import load_stored_input
from serve_app.service import Services
from serve_app.settings import Settings
from tests.integration.test_api_worker import make_worker
from tests.support.app import open_services
from tests.support.images import object_photo
from tests.support.required import require


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = Settings(
        database_url=database_url, run_dir=tmp_path, auth_required=True, rate_limit_requests=5
    )
    with open_services(settings) as opened:
        yield opened


def key_for(services: Services, account: str) -> dict[str, str]:
    services.accounts.create_account(account)
    key, _ = services.accounts.create_key(account)
    return {"Authorization": f"Bearer {key}"}


def test_openapi_validates_and_generates_a_typed_client(
    client: TestClient, services: Services, tmp_path: Path
) -> None:
    validator = require("openapi_spec_validator", "pip install -e .[dev]")
    require("datamodel_code_generator", "pip install -e .[dev]")
    doc = client.get("/openapi.json").json()
    validator.validate(doc)

    schemas = doc["components"]["schemas"]
    assert schemas["TaskStatus"]["enum"] == ["queued", "running", "succeeded", "failed", "canceled"]
    assert {"invalid_image", "task_not_found", "idempotency_key_reused"} <= set(
        schemas["ErrorCode"]["enum"]
    )
    assert schemas["GenerationOptions"]["properties"]["texture_size"]["enum"] == [
        512,
        1024,
        2048,
        4096,
    ]
    body = doc["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    form = body["multipart/form-data"]["schema"]["properties"]
    assert form["seed"]["type"] == "integer" and form["image"]["type"] == "array"
    stream = doc["paths"]["/api/v1/task/{task_id}/stream"]["get"]["responses"]["200"]
    assert "text/event-stream" in stream["content"]
    assert set(doc["webhooks"]) == {
        "task.succeeded",
        "task.failed",
        "task.canceled",
        "batch.completed",
    }

    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(doc))
    out = tmp_path / "photo3d_models.py"
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "datamodel_code_generator",
            "--input",
            str(spec),
            "--input-file-type",
            "openapi",
            "--output-model-type",
            "pydantic_v2.BaseModel",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stderr
    module_spec = importlib.util.spec_from_file_location("photo3d_models", out)
    assert module_spec is not None and module_spec.loader is not None
    models = importlib.util.module_from_spec(module_spec)
    sys.modules["photo3d_models"] = models
    module_spec.loader.exec_module(models)

    # The generated models read what the server really answers.
    headers = key_for(services, "gen")
    answer = client.post(
        "/api/v1/generate",
        headers=headers,
        files={"image": ("p.png", object_photo(96), "image/png")},
        data={"seed": "4", "formats": "glb,stl"},
    )
    assert answer.status_code == 202, answer.text
    task = models.Task.model_validate(answer.json())
    assert task.status == models.TaskStatus.queued and task.options["seed"] == 4
    missing = client.get("/api/v1/task/00000000-0000-0000-0000-000000000000", headers=headers)
    error = models.ErrorResponse.model_validate(missing.json())
    code = error.error.code
    assert getattr(code, "value", code) == models.ErrorCode.task_not_found.value
    options = models.GenerationOptions.model_validate({"formats": ["glb"], "seed": 1})
    assert options.texture_size is not None
    sys.modules.pop("photo3d_models", None)


def test_rate_limit_headers_count_down_to_the_429(client: TestClient, services: Services) -> None:
    headers = key_for(services, "counted")
    seen = []
    for _ in range(5):
        response = client.get("/api/v1/tasks", headers=headers)
        assert response.status_code == 200
        assert response.headers["ratelimit-limit"] == "5"
        assert 1 <= int(response.headers["ratelimit-reset"]) <= 60
        seen.append(int(response.headers["ratelimit-remaining"]))
    assert seen == [4, 3, 2, 1, 0]
    limited = client.get("/api/v1/tasks", headers=headers)
    assert limited.status_code == 429
    assert limited.headers["ratelimit-remaining"] == "0"
    assert int(limited.headers["ratelimit-reset"]) == int(limited.headers["retry-after"])
    assert "ratelimit-limit" not in client.get("/health").headers  # public route: no budget


def test_idempotency_key_reused_with_another_request_is_refused(
    client: TestClient, services: Services
) -> None:
    headers = {**key_for(services, "idem"), "Idempotency-Key": "order-17"}
    photo = object_photo(96)
    first = client.post(
        "/api/v1/generate", headers=headers, files={"image": ("a.png", photo, "image/png")}
    )
    assert first.status_code == 202
    # The same request (also as form fields in another order) is the same task.
    same = client.post(
        "/api/v1/generate", headers=headers, files={"image": ("b.png", photo, "image/png")}
    )
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    for files, data in [
        ({"image": ("a.png", object_photo(96, seed=1), "image/png")}, {}),
        ({"image": ("a.png", photo, "image/png")}, {"seed": "9"}),
    ]:
        other = client.post("/api/v1/generate", headers=headers, files=files, data=data)
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_heic_photo_becomes_a_model(client: TestClient, services: Services) -> None:
    source = Image.open(io.BytesIO(object_photo(256)))
    out = io.BytesIO()
    source.save(out, format="HEIF", quality=90)  # real HEIC bytes, encoded by pillow-heif
    answer = client.post(
        "/api/v1/generate",
        headers=key_for(services, "phone"),
        files={"image": ("IMG_0001.HEIC", out.getvalue(), "image/heic")},
    )
    assert answer.status_code == 202, answer.text
    # Stored as it came; the worker decodes it the same way and makes the model.
    stored = services.artifacts.get(input_key(answer.json()["id"], 0, ".heic"))
    assert load_stored_input(stored).size == (256, 256)
    assert make_worker(services).run_once()
    task = services.queue.get(uuid.UUID(answer.json()["id"]), "phone")
    assert task is not None and task["status"] == "succeeded", task


def test_openapi_python_client_generates_a_working_client(
    client: TestClient, services: Services, tmp_path: Path
) -> None:
    require("openapi_python_client", "pip install -e .[dev]")
    spec = tmp_path / "openapi.json"
    spec.write_text(client.get("/openapi.json").text)
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(spec),
            "--output-path",
            str(tmp_path / "photo3d_api"),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        from photo3d_api import Client as GeneratedClient  # type: ignore[import-not-found]
        from photo3d_api.api.tasks import get_task, list_tasks  # type: ignore[import-not-found]
        from photo3d_api.api.webhooks import create_webhook  # type: ignore[import-not-found]
        from photo3d_api.models import (  # type: ignore[import-not-found]
            WebhookCreate,
            WebhookEvent,
        )

        # The generated functions, sent through the real app (TestClient is an httpx.Client).
        client.headers.update(key_for(services, "generated"))
        api = GeneratedClient(base_url="http://testserver")
        api.set_httpx_client(client)
        answer = client.post(
            "/api/v1/generate", files={"image": ("p.png", object_photo(96), "image/png")}
        )
        task = get_task.sync(task_id=answer.json()["id"], client=api)
        assert task.status.value == "queued" and task.id == answer.json()["id"]
        listed = list_tasks.sync(client=api)
        assert [t.id for t in listed.tasks] == [task.id]
        body = WebhookCreate(url="http://10.1.2.3/hook", events=[WebhookEvent.TASK_FAILED])
        hook = create_webhook.sync(client=api, body=body)
        assert hook.error.code == "forbidden_webhook_url"  # the typed error body
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("photo3d_api")]:
            del sys.modules[name]
