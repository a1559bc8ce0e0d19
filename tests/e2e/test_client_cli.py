"""The Python client, the `photo3d` CLI and webhooks against the real stack (`photo3d serve`:
PostgreSQL + Ray Serve, keys required): what an integrator's code and scripts meet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.accounts import Accounts
from serve_app.client import (
    AuthenticationError,
    Client,
    InvalidRequestError,
    NotFoundError,
)
from serve_app.store.db import Database
from tests.support import pg
from tests.support.images import object_photo
from tests.support.receiver import run_receiver
from tests.support.required import require
from tests.support.stack import FAKE_SLOW, ROOT, Stack, free_port, run_stack

standardwebhooks = require("standardwebhooks", "pip install -e .[dev]")


@pytest.fixture(scope="module")
def hook_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(
    pg_admin: str, tmp_path_factory: pytest.TempPathFactory, hook_port: int
) -> Iterator[Stack]:
    env = {
        "PHOTO3D_AUTH_REQUIRED": "true",
        # The test's webhook receiver listens on loopback: allowed by name (and port), as an
        # operator would allow an internal host.
        "PHOTO3D_URL_ALLOW_HOSTS": f"127.0.0.1,127.0.0.1:{hook_port}",
        "PHOTO3D_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
        "PHOTO3D_FAKE_SLOW_SECONDS": "30",
    }
    for url in pg.clone_database(pg_admin, prefix="client"):
        run_dir = tmp_path_factory.mktemp("stack")
        with run_stack(run_dir, url, extra_backends=FAKE_SLOW, env=env) as running:
            yield running


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    db = Database(stack.database_url)
    db.open(wait=True)
    try:
        accounts = Accounts(db)
        accounts.create_account("integrator")
        key, _ = accounts.create_key("integrator")
    finally:
        db.close()
    return key


def test_client_submits_waits_downloads_and_gets_a_signed_webhook(
    stack: Stack, api_key: str, tmp_path: Path, hook_port: int
) -> None:
    photo = tmp_path / "toy.jpg"
    photo.write_bytes(object_photo(256, fmt="JPEG"))
    with (
        run_receiver(statuses=[500, 204], port=hook_port) as receiver,
        Client(stack.url, api_key) as client,
    ):
        hook = client.create_webhook(receiver.url, ["task.succeeded"])
        task = client.submit(photo, options={"formats": ["glb"]}, seed=2, idempotency_key="t-1")
        assert (
            client.submit(photo, options={"formats": ["glb"]}, seed=2, idempotency_key="t-1")["id"]
            == task["id"]
        )
        seen: list[str] = []
        done = client.wait(task["id"], timeout=240, on_update=lambda t: seen.append(t["status"]))
        assert done["status"] == "succeeded", done
        assert seen[-1] == "succeeded" and done["options"]["seed"] == 2
        glb = client.download(task["id"], "glb", tmp_path / "toy.glb")
        assert isinstance(glb, Path) and glb.read_bytes()[:4] == b"glTF"
        stl = client.download(task["id"], "stl")  # not asked for: made on demand
        assert isinstance(stl, bytes) and len(stl) > 84
        assert any(t["id"] == task["id"] for t in client.iter_tasks(status="succeeded"))

        # The ingress's dispatcher delivers the event: a 500 first, then the retry.
        first, second = receiver.wait_for(2, timeout=120)
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        for request in (first, second):
            payload = standardwebhooks.Webhook(hook["secret"]).verify(request.body, request.headers)
            assert payload["type"] == "task.succeeded" and payload["data"]["id"] == task["id"]
            assert payload["data"]["result"]["files"][0]["format"] == "glb"
        for _ in range(50):  # the attempt is logged just after the receiver answers
            deliveries = client.webhook_deliveries(hook["id"])
            if len(deliveries) == 2:
                break
            time.sleep(0.2)
        assert [d["status_code"] for d in deliveries] == [204, 500]


def test_client_errors_are_typed_and_cancel_works(stack: Stack, api_key: str) -> None:
    with Client(stack.url, "p3d_abcdefgh_" + "x" * 32) as stranger:
        with pytest.raises(AuthenticationError) as denied:
            stranger.list_tasks()
        assert denied.value.code == "invalid_api_key" and denied.value.status == 401
    with Client(stack.url, api_key) as client:
        with pytest.raises(NotFoundError) as missing:
            client.get(str(uuid.uuid4()))
        assert missing.value.code == "task_not_found"
        with pytest.raises(InvalidRequestError) as refused:
            client.submit(b"GIF89a not a photo")
        assert refused.value.code == "unsupported_image_type"
        # Several photos (bytes) on the slow backend, then canceled while it waits or runs.
        task = client.submit(
            [object_photo(96, seed=1), object_photo(96, seed=2)], backend="fake-slow"
        )
        assert client.cancel(task["id"])["status"] == "canceled"
        assert client.wait(task["id"], timeout=30)["status"] == "canceled"


def cli(*args: str, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PHOTO3D_API_KEY"}
    if key:
        env["PHOTO3D_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "serve_app.cli", *args],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_submit_wait_status_tasks_download(stack: Stack, api_key: str, tmp_path: Path) -> None:
    photo = tmp_path / "mug.png"
    photo.write_bytes(object_photo(256, seed=5))
    out = tmp_path / "mug.stl"
    submitted = cli("submit", str(photo), "--server", stack.url, "-o", str(out), key=api_key)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert uuid.UUID(task_id) and out.stat().st_size > 84
    assert "%" in submitted.stderr  # the progress bar
    assert "HTTP Request" not in submitted.stderr  # httpx's request log is for --verbose only

    status = cli("status", task_id, "--server", stack.url, key=api_key)
    assert status.returncode == 0 and "succeeded" in status.stdout
    listed = cli("tasks", "--server", stack.url, key=api_key)
    assert listed.returncode == 0 and task_id in listed.stdout
    obj = tmp_path / "mug.obj"
    fetched = cli(
        "download", task_id, "--format", "obj", "-o", str(obj), "--server", stack.url, key=api_key
    )
    assert fetched.returncode == 0 and obj.read_bytes()[:2] == b"PK"

    # Exit codes scripts branch on.
    unknown = cli("status", str(uuid.uuid4()), "--server", stack.url, key=api_key)
    assert unknown.returncode == 2 and "task_not_found" in unknown.stderr
    assert cli("tasks", "--server", stack.url, key=None).returncode == 2  # no key
    down = cli("tasks", "--server", f"http://127.0.0.1:{free_port()}", key=api_key)
    assert down.returncode == 3
    bad_photo = tmp_path / "notes.txt"
    bad_photo.write_text("not a photo")
    refused = cli("submit", str(bad_photo), "--server", stack.url, key=api_key)
    assert refused.returncode == 2 and "unsupported_image_type" in refused.stderr
