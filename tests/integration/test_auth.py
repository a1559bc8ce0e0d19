"""Accounts, keys and tenant isolation: another account's task answers 404 on every route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve_app.backends import create_backend
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.worker import Worker
from tests.support.app import app_client, open_services
from tests.support.images import object_photo


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        rate_limit_requests=1000,
        max_active_tasks=3,
    )
    with open_services(settings) as opened:
        yield opened


def key_for(services: Services, account: str, *, admin: bool = False) -> dict[str, str]:
    services.accounts.create_account(account, is_admin=admin)
    key, _ = services.accounts.create_key(account)
    return {"Authorization": f"Bearer {key}"}


def finished_task(client: TestClient, services: Services, headers: dict[str, str]) -> str:
    response = client.post(
        "/api/v1/generate", headers=headers, files={"image": ("p.png", object_photo(), "image/png")}
    )
    assert response.status_code == 202, response.text
    backend = create_backend("cpu", services.settings)
    Worker(
        queue=services.queue,
        artifacts=services.artifacts,
        backend=backend,
        heartbeat_seconds=1,
        poll_seconds=1,
        task_timeout_seconds=60,
    ).run_once()
    task_id: str = response.json()["id"]
    return task_id


def test_every_route_but_health_and_page_needs_a_key(client: TestClient) -> None:
    for method, path in [
        ("GET", "/api/v1/tasks"),
        ("POST", "/api/v1/generate"),
        ("GET", "/api/v1/task/00000000-0000-0000-0000-000000000000"),
        ("GET", "/api/v1/account"),
        ("GET", "/api/v1/keys"),
        ("GET", "/api/v1/backends"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "missing_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    # /health is public: no worker runs here, so it answers "unavailable", not 401.
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["database"] == "ok"
    bad = client.get("/api/v1/tasks", headers={"Authorization": "Bearer p3d_aaaaaaaa_" + "x" * 32})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert (
        client.get("/api/v1/tasks", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code
        == 401
    )


def test_keys_are_hashed_shown_once_and_revocable(client: TestClient, services: Services) -> None:
    headers = key_for(services, "alice")
    key = headers["Authorization"].split()[1]
    with services.db.connection() as conn:
        stored = conn.execute("SELECT secret_hash FROM api_keys").fetchall()
    assert all(key.encode() not in bytes(row["secret_hash"]) for row in stored)
    listed = client.get("/api/v1/keys", headers=headers).json()
    assert (
        len(listed) == 1
        and "key" not in listed[0]
        and key.startswith(f"p3d_{listed[0]['prefix']}_")
    )
    created = client.post("/api/v1/keys", headers=headers, json={"name": "laptop"})
    assert created.status_code == 201 and created.json()["key"].startswith("p3d_")
    second = {"Authorization": f"Bearer {created.json()['key']}"}
    assert client.get("/api/v1/tasks", headers=second).status_code == 200
    assert (
        client.delete(f"/api/v1/keys/{created.json()['prefix']}", headers=headers).status_code
        == 200
    )
    assert client.get("/api/v1/tasks", headers=second).status_code == 401


def test_another_accounts_task_is_404_on_every_route(
    client: TestClient, services: Services
) -> None:
    alice = key_for(services, "alice")
    bob = key_for(services, "bob")
    task_id = finished_task(client, services, alice)
    assert client.get(f"/api/v1/task/{task_id}", headers=alice).json()["status"] == "succeeded"
    for method, suffix in [
        ("GET", ""),
        ("GET", "/events"),
        ("GET", "/stream"),
        ("GET", "/result/glb"),
        ("GET", "/result/stl"),
        ("GET", "/preview"),
        ("GET", "/turntable"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ]:
        response = client.request(method, f"/api/v1/task/{task_id}{suffix}", headers=bob)
        assert response.status_code == 404, (method, suffix, response.text)
        assert response.json()["error"]["code"] == "task_not_found"
    assert client.get("/api/v1/tasks", headers=bob).json()["tasks"] == []
    assert [t["id"] for t in client.get("/api/v1/tasks", headers=alice).json()["tasks"]] == [
        task_id
    ]
    # Bob cannot revoke Alice's key either.
    alice_prefix = client.get("/api/v1/keys", headers=alice).json()[0]["prefix"]
    assert client.delete(f"/api/v1/keys/{alice_prefix}", headers=bob).status_code == 404
    assert client.get(f"/api/v1/task/{task_id}/result/glb", headers=alice).status_code == 200


def test_admin_routes(client: TestClient, services: Services) -> None:
    admin = key_for(services, "root", admin=True)
    user = key_for(services, "carol")
    assert client.post("/api/v1/admin/accounts", headers=user, json={"id": "x"}).status_code == 403
    made = client.post("/api/v1/admin/accounts", headers=admin, json={"id": "dave"})
    assert made.status_code == 201
    assert (
        client.post("/api/v1/admin/accounts", headers=admin, json={"id": "dave"}).status_code == 409
    )
    assert (
        client.post("/api/v1/admin/accounts", headers=admin, json={"id": "../x"}).status_code == 422
    )
    new_key = client.post("/api/v1/admin/accounts/dave/keys", headers=admin, json={}).json()
    dave = {"Authorization": f"Bearer {new_key['key']}"}
    assert client.get("/api/v1/account", headers=dave).json()["id"] == "dave"
    assert (
        client.delete(f"/api/v1/admin/keys/{new_key['prefix']}", headers=admin).status_code == 200
    )
    assert client.get("/api/v1/account", headers=dave).status_code == 401


def wait_for_fresh_window(window: int, needed: float = 15) -> None:
    """Sleep into the next rate window when fewer than `needed` seconds are left of this one, so
    a test's requests never straddle a window boundary (windows start at multiples of `window`
    seconds since the epoch, on the database's clock: this machine's)."""
    left = window - time.time() % window
    if left < needed:
        time.sleep(left + 0.05)


def test_rate_limit_answers_429_with_retry_after(database_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        rate_limit_requests=3,
        rate_limit_window_seconds=60,
    )
    with app_client(settings) as (services, client):
        headers = key_for(services, "eve")
        wait_for_fresh_window(60)
        codes = [client.get("/api/v1/tasks", headers=headers).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = client.get("/api/v1/tasks", headers=headers)
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60


def test_concurrency_limit_and_idempotency(client: TestClient, services: Services) -> None:
    headers = key_for(services, "frank")
    photo = {"image": ("p.png", object_photo(), "image/png")}
    first = client.post(
        "/api/v1/generate", headers={**headers, "Idempotency-Key": "k1"}, files=photo
    )
    again = client.post(
        "/api/v1/generate", headers={**headers, "Idempotency-Key": "k1"}, files=photo
    )
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    for _ in range(2):
        assert client.post("/api/v1/generate", headers=headers, files=photo).status_code == 202
    limited = client.post("/api/v1/generate", headers=headers, files=photo)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "too_many_active_tasks"
    assert int(limited.headers["retry-after"]) > 0
    # The idempotent retry still finds its task at the limit.
    assert (
        client.post(
            "/api/v1/generate", headers={**headers, "Idempotency-Key": "k1"}, files=photo
        ).status_code
        == 200
    )
    inputs = services.settings.artifacts_path / "inputs"
    assert len(list(inputs.iterdir())) == 3


def test_cors_is_off_unless_origins_are_configured(database_url: str, tmp_path: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in (("", False), ("https://app.example", True)):
        settings = Settings(database_url=database_url, run_dir=tmp_path, cors_origins=origins)
        with app_client(settings) as (_, client):
            response = client.options("/api/v1/generate", headers=preflight)
            got = response.headers.get("access-control-allow-origin")
            assert (got == "https://app.example") is allowed
            other = client.options(
                "/api/v1/generate", headers={**preflight, "Origin": "https://evil.example"}
            )
            assert "access-control-allow-origin" not in other.headers


def test_slow_requests_end_with_a_clear_503(database_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=database_url, run_dir=tmp_path, request_timeout_seconds=0.001)
    with app_client(settings) as (_, client):
        response = client.get("/api/v1/tasks")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "request_timeout"
        assert response.headers["retry-after"]
