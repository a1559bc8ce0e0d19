"""Billing's money model on a real PostgreSQL: reserve at accept (same transaction as the task
insert), capture on success, release on failure/cancel/delete, exactly once each; 402 when the
balance cannot pay; 50 concurrent submissions against a balance that covers 10."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.backends import create_backend
from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.errors import ServiceUnavailable
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.worker import Worker
from tests.integration.test_api_worker import make_worker
from tests.support.app import open_services
from tests.support.images import object_photo
from tests.support.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
PHOTO = object_photo(96)


@pytest.fixture
def billing_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"billing": True, "max_active_tasks": 100})


@pytest.fixture
def services(billing_settings: Settings) -> Iterator[Services]:
    with open_services(billing_settings) as opened:
        yield opened


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services), raise_server_exceptions=False) as test_client:
        yield test_client


def submit(client: TestClient, **data: str) -> httpx.Response:
    return client.post(
        "/api/v1/generate", files={"image": ("p.png", PHOTO, "image/png")}, data=data
    )


def ledger(services: Services, account: str = "local") -> list[dict]:
    return list(reversed(services.billing.entries(account, limit=1000)))


def assert_ledger_sums(services: Services, account: str = "local") -> int:
    """The cached balance equals the sum of the ledger, and is returned."""
    totals = services.billing.ledger.totals(account)  # one snapshot: sum and cached balance
    assert totals["total"] == totals["balance"]
    return int(totals["balance"])


class FastBackend:
    """FAKE: a tiny ready-made GLB (from the real CPU backend, made once), so that tests of money
    spend no time on reconstruction. Fails the first `fail_first` attempts (transient)."""

    name = "cpu"
    _glb: bytes | None = None

    def __init__(self, settings: Settings, fail_first: int = 0) -> None:
        self.settings = settings
        self.fail_first = fail_first
        self.calls = 0

    def load(self) -> None:
        if FastBackend._glb is None:
            import io

            from PIL import Image

            inner = create_backend("cpu", self.settings)
            inner.load()
            image = Image.open(io.BytesIO(PHOTO))
            FastBackend._glb = inner.generate(
                [image], GenerationOptions(face_limit=500), lambda f, s: None
            ).glb

    def check_health(self) -> None:
        pass

    def generate(
        self, images: list, options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("transient failure (test)")
        assert FastBackend._glb is not None
        return GeneratedAsset(glb=FastBackend._glb, preview_png=PHOTO)


def worker(services: Services, backend: FastBackend | None = None) -> Worker:
    """The worker engine as the other integration tests build it, on a FAKE fast backend."""
    return make_worker(services, backend or FastBackend(services.settings))  # type: ignore[arg-type]


def test_no_credits_is_402_naming_price_and_balance_and_nothing_is_queued(
    client: TestClient, services: Services
) -> None:
    services.billing.grant("local", 4, "test")
    response = submit(client, backend="cpu", texture_size="4096")  # 1 + 2 surcharge
    assert response.status_code == 202, response.text
    assert response.json()["credits_reserved"] == 3
    response = submit(client, backend="cpu", texture_size="4096")
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_credits"
    assert "costs 3 credits" in error["message"] and "balance is 1" in error["message"]
    assert len(client.get("/api/v1/tasks").json()["tasks"]) == 1
    assert len(list((services.settings.artifacts_path / "inputs").iterdir())) == 1
    assert assert_ledger_sums(services) == 1


def test_success_captures_once_and_the_task_shows_it(
    client: TestClient, services: Services
) -> None:
    services.billing.grant("local", 10, "test")
    task = submit(client).json()
    assert task["credits_reserved"] == 1 and task["credits_charged"] == 0
    assert worker(services).run_once()
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "succeeded"
    assert done["credits_reserved"] == 1 and done["credits_charged"] == 1
    kinds = [(e["kind"], e["amount"]) for e in ledger(services)]
    assert kinds == [("grant", 10), ("reserve", -1), ("capture", 0)]
    assert assert_ledger_sums(services) == 9
    account = client.get("/api/v1/account").json()
    assert account["balance"] == 9 and account["billing"]["enabled"] is True
    assert account["billing"]["usage_this_period"] == {"generations": 1, "credits": 1}
    page = client.get("/api/v1/account/ledger", params={"limit": 2}).json()
    assert [e["kind"] for e in page["entries"]] == ["capture", "reserve"]
    rest = client.get("/api/v1/account/ledger", params={"before": page["next_before"]}).json()
    assert [e["kind"] for e in rest["entries"]] == ["grant"] and rest["next_before"] is None


def test_a_retried_task_is_charged_once(client: TestClient, services: Services) -> None:
    services.billing.grant("local", 5, "test")
    task = submit(client).json()
    flaky = FastBackend(services.settings, fail_first=1)
    engine = worker(services, flaky)
    assert engine.run_once()  # attempt 1 fails (transient): back to the queue
    assert client.get(f"/api/v1/task/{task['id']}").json()["status"] == "queued"
    assert engine.run_once()  # attempt 2 succeeds
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["credits_charged"] == 1
    kinds = [e["kind"] for e in ledger(services)]
    assert kinds.count("reserve") == 1 and kinds.count("capture") == 1
    assert "release" not in kinds
    assert assert_ledger_sums(services) == 4


def test_permanent_failure_cancel_and_delete_release_exactly_once(
    client: TestClient, services: Services
) -> None:
    services.billing.grant("local", 3, "test")
    failing = submit(client).json()
    canceled = submit(client).json()
    deleted = submit(client).json()
    assert assert_ledger_sums(services) == 0
    assert submit(client).status_code == 402

    engine = worker(services, FastBackend(services.settings, fail_first=99))
    for _ in range(3):  # max_attempts=3: the third failure is final
        assert engine.run_once()
    assert client.get(f"/api/v1/task/{failing['id']}").json()["status"] == "failed"
    assert client.post(f"/api/v1/task/{canceled['id']}/cancel").status_code == 200
    # A second cancel changes nothing (the task already ended): no second release.
    assert client.post(f"/api/v1/task/{canceled['id']}/cancel").status_code == 422
    assert client.delete(f"/api/v1/task/{deleted['id']}").status_code == 204
    # The failed task's deletion must not release again either.
    assert client.delete(f"/api/v1/task/{failing['id']}").status_code == 204
    releases = [e for e in ledger(services) if e["kind"] == "release"]
    assert sorted(e["task_id"] for e in releases) == sorted(
        [failing["id"], canceled["id"], deleted["id"]]
    )
    assert all(e["amount"] == 1 for e in releases)
    assert assert_ledger_sums(services) == 3
    canceled_now = client.get(f"/api/v1/task/{canceled['id']}").json()
    assert canceled_now["credits_reserved"] == 1 and canceled_now["credits_charged"] == 0


def test_a_worker_that_lost_its_lease_charges_nothing(
    client: TestClient, services: Services
) -> None:
    services.billing.grant("local", 2, "test")
    task = submit(client).json()
    claim = services.queue.claim("w-old", ["cpu"])
    assert claim is not None
    services.queue.cancel(claim.id, "local")  # the task moved on while the worker ran
    assert services.queue.succeed(claim, {"files": {}}) is False
    kinds = [e["kind"] for e in ledger(services)]
    assert kinds == ["grant", "reserve", "release"]
    assert client.get(f"/api/v1/task/{task['id']}").json()["credits_charged"] == 0
    assert assert_ledger_sums(services) == 2


def test_idempotent_retry_reserves_once(client: TestClient, services: Services) -> None:
    services.billing.grant("local", 5, "test")
    headers = {"Idempotency-Key": "same-request"}
    first = client.post(
        "/api/v1/generate", files={"image": ("p.png", PHOTO, "image/png")}, headers=headers
    )
    again = client.post(
        "/api/v1/generate", files={"image": ("p.png", PHOTO, "image/png")}, headers=headers
    )
    assert (first.status_code, again.status_code) == (202, 200)
    assert [e["kind"] for e in ledger(services)] == ["grant", "reserve"]
    assert assert_ledger_sums(services) == 4


def test_signup_credits_are_granted_once(billing_settings: Settings) -> None:
    with open_services(billing_settings.model_copy(update={"signup_credits": 7})) as services:
        services.accounts.create_account("newbie")
        for _ in range(3):
            assert services.billing.account_view("newbie")["balance"] == 7
        assert [e["kind"] for e in ledger(services, "newbie")] == ["grant"]


@contextlib.contextmanager
def serve(services: Services, port: int | None = None) -> Iterator[str]:
    """The real app on a real HTTP server (uvicorn) on a free loopback port."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(services), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_fifty_concurrent_submissions_against_ten_credits(services: Services) -> None:
    services.billing.grant("local", 10, "test")
    with serve(services) as base, httpx.Client(base_url=base, timeout=60) as http:

        def one(i: int) -> httpx.Response:
            return http.post("/api/v1/generate", files={"image": (f"{i}.png", PHOTO, "image/png")})

        with ThreadPoolExecutor(max_workers=50) as pool:
            responses = list(pool.map(one, range(50)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == 10 and codes.count(402) == 40, codes
    assert all(
        r.json()["error"]["code"] == "insufficient_credits"
        for r in responses
        if r.status_code == 402
    )
    entries = ledger(services)
    assert [e["kind"] for e in entries].count("reserve") == 10
    assert assert_ledger_sums(services) == 0
    assert len(httpx_tasks(services)) == 10
    inputs = services.settings.artifacts_path / "inputs"
    assert len(list(inputs.iterdir())) == 10  # a refused submission leaves no photo behind


def test_fifty_concurrent_paid_submissions_against_an_active_limit_of_five(
    billing_settings: Settings,
) -> None:
    """With billing on, the active-task limit holds under a race exactly as without it, and a
    refused submission reserves nothing."""
    limited = billing_settings.model_copy(update={"max_active_tasks": 5, "db_pool_max": 16})
    with open_services(limited) as services:
        services.billing.grant("local", 100, "test")
        with serve(services) as base, httpx.Client(base_url=base, timeout=60) as http:

            def one(i: int) -> httpx.Response:
                return http.post(
                    "/api/v1/generate", files={"image": (f"{i}.png", PHOTO, "image/png")}
                )

            with ThreadPoolExecutor(max_workers=50) as pool:
                responses = list(pool.map(one, range(50)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(202) == 5 and codes.count(429) == 45, codes
        assert [e["kind"] for e in ledger(services)].count("reserve") == 5
        assert assert_ledger_sums(services) == 95
        assert len(httpx_tasks(services)) == 5


def httpx_tasks(services: Services) -> list[dict]:
    with TestClient(create_app(services)) as client:
        return client.get("/api/v1/tasks", params={"limit": 100}).json()["tasks"]


def test_billing_off_changes_nothing(settings: Settings) -> None:
    assert not settings.billing_enabled
    with open_services(settings) as services, TestClient(create_app(services)) as client:
        for _ in range(3):
            assert submit(client).status_code == 202  # no credits anywhere, no 402
        account = client.get("/api/v1/account").json()
        assert account["billing"] == {"enabled": False} and account["balance"] is None
        assert services.billing.ledger.totals("local")["entries"] == 0
        task = client.get("/api/v1/tasks").json()["tasks"][0]
        assert task["credits_reserved"] == 0 and task["credits_charged"] == 0


def test_the_service_does_not_import_stripe_while_billing_is_off(settings: Settings) -> None:
    code = (
        "import sys; from serve_app.service import Services; from serve_app.api.app import "
        "create_app; from serve_app.settings import Settings; "
        f"s = Services.from_settings(Settings(database_url={settings.database_url!r})); "
        "create_app(s); print('stripe' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


KILL_SCRIPT = """
import os, signal, sys
from tests.integration.test_billing_credits import FastBackend, worker
from tests.support.app import open_services
from serve_app.settings import Settings

settings = Settings(database_url=sys.argv[1], run_dir=sys.argv[2], billing=True, lease_seconds=2)
with open_services(settings) as services:
    real_succeed = services.queue.succeed

    def succeed_then_die(claim, result):
        ok = real_succeed(claim, result)  # committed: the task is succeeded and captured
        os.kill(os.getpid(), signal.SIGKILL)  # ... and the worker dies before it returns
        return ok

    services.queue.succeed = succeed_then_die
    worker(services).run_once()
"""


def test_worker_killed_after_capture_is_charged_once(
    client: TestClient, services: Services
) -> None:
    services.billing.grant("local", 5, "test")
    task = submit(client).json()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            str(services.settings.database_url),
            str(services.settings.run_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    time.sleep(2.5)  # past the dead worker's lease: a stall recovery must find nothing to redo
    assert services.queue.recover_stalled() == []
    assert worker(services).run_once() is False
    done = client.get(f"/api/v1/task/{task['id']}").json()
    assert done["status"] == "succeeded" and done["credits_charged"] == 1
    kinds = [e["kind"] for e in ledger(services)]
    assert kinds == ["grant", "reserve", "capture"]
    assert assert_ledger_sums(services) == 4


def test_database_outage_during_submit_is_503_and_charges_nothing(
    client: TestClient, services: Services
) -> None:
    services.billing.grant("local", 1, "test")

    def down(*args: object, **kwargs: object) -> object:
        raise ServiceUnavailable("the database is unavailable; retry shortly")

    original = services.queue.submit
    services.queue.submit = down  # type: ignore[method-assign]
    try:
        assert submit(client).status_code == 503
    finally:
        services.queue.submit = original  # type: ignore[method-assign]
    assert assert_ledger_sums(services) == 1
    assert os.listdir(services.settings.artifacts_path / "inputs") == []
