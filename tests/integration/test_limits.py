"""Limits that hold under races and cannot be multiplied (issue 10): the active-task limit with
50 concurrent submissions, idempotency under concurrency, rate limits per account across keys,
the cap on keys per account, failed authentication throttled per address, NUL bytes a 4xx."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from serve_app.accounts import RateLimited
from serve_app.settings import Settings
from tests.integration.test_auth import key_for, wait_for_fresh_window
from tests.support.app import app_client, open_services
from tests.support.images import object_photo

PHOTO = object_photo(size=64)


def active_tasks(database_url: str, account: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM tasks WHERE account_id = %s AND status IN ('queued', 'running')",
            (account,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_fifty_concurrent_submissions_with_limit_five_accept_exactly_five(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=database_url, run_dir=tmp_path, max_active_tasks=5, db_pool_max=16
    )
    with open_services(settings) as services:

        def submit(i: int) -> str:
            try:
                services.submit("local", [PHOTO], {"seed": i})
            except RateLimited as exc:
                return exc.code
            return "accepted"

        with ThreadPoolExecutor(50) as pool:
            outcomes = list(pool.map(submit, range(50)))
    assert outcomes.count("accepted") == 5
    assert outcomes.count("too_many_active_tasks") == 45
    assert active_tasks(database_url, "local") == 5
    # Refused submissions leave no photos behind.
    assert len(list((settings.artifacts_path / "inputs").iterdir())) == 5


def test_concurrent_retries_with_one_idempotency_key_make_one_task(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=database_url, run_dir=tmp_path, db_pool_max=16)
    with open_services(settings) as services:

        def submit(_: int) -> tuple[str, bool]:
            row, created = services.submit("local", [PHOTO], {}, idempotency_key="same")
            return str(row["id"]), created

        with ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(submit, range(20)))
    assert len({task_id for task_id, _ in outcomes}) == 1
    assert [created for _, created in outcomes].count(True) == 1
    assert active_tasks(database_url, "local") == 1
    assert len(list((settings.artifacts_path / "inputs").iterdir())) == 1


def test_rate_limit_counts_every_key_of_an_account(database_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        rate_limit_requests=100,
        rate_limit_account_requests=4,
        rate_limit_window_seconds=60,
    )
    with app_client(settings) as (services, client):
        first = key_for(services, "mallory")
        key, _ = services.accounts.create_key("mallory")
        second = {"Authorization": f"Bearer {key}"}
        other = key_for(services, "trent")
        wait_for_fresh_window(60)
        codes = [client.get("/api/v1/tasks", headers=h).status_code for h in [first, second] * 3]
        assert codes == [200, 200, 200, 200, 429, 429]
        limited = client.get("/api/v1/tasks", headers=second)
        assert limited.json()["error"]["code"] == "rate_limited"
        assert "account" in limited.json()["error"]["message"]
        # Another account has its own budget.
        assert client.get("/api/v1/tasks", headers=other).status_code == 200


def test_keys_per_account_are_capped(database_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=database_url, run_dir=tmp_path, auth_required=True, max_keys_per_account=3
    )
    with app_client(settings) as (services, client):
        headers = key_for(services, "oscar")  # key 1
        made = [client.post("/api/v1/keys", headers=headers, json={}) for _ in range(3)]
        assert [r.status_code for r in made] == [201, 201, 409]
        assert made[2].json()["error"]["code"] == "too_many_keys"
        # Revoking one frees its place.
        prefix = made[0].json()["prefix"]
        assert client.delete(f"/api/v1/keys/{prefix}", headers=headers).status_code == 200
        assert client.post("/api/v1/keys", headers=headers, json={}).status_code == 201


def test_keys_cap_holds_under_concurrency(database_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=database_url, run_dir=tmp_path, db_pool_max=16)
    with open_services(settings) as services:
        services.accounts.create_account("peggy")

        def create(_: int) -> bool:
            try:
                services.accounts.create_key("peggy", max_keys=5)
            except Exception:
                return False
            return True

        with ThreadPoolExecutor(20) as pool:
            made = list(pool.map(create, range(20)))
        assert made.count(True) == 5
        assert len(services.accounts.list_keys("peggy")) == 5


def test_failed_authentication_is_throttled_per_address(database_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        auth_failures_per_address=5,
        rate_limit_window_seconds=60,
    )
    bad = {"Authorization": "Bearer p3d_aaaaaaaa_" + "x" * 32}
    with app_client(settings) as (_, client):
        wait_for_fresh_window(60)
        codes = [client.get("/api/v1/tasks", headers=bad).status_code for _ in range(7)]
        assert codes == [401] * 5 + [429] * 2
        limited = client.get("/api/v1/tasks", headers=bad)
        assert limited.json()["error"]["code"] == "too_many_auth_failures"
        assert int(limited.headers["retry-after"]) >= 1
        # Another address is not affected; a request without a key costs no lookup and is
        # not counted.
        with TestClient(client.app, client=("203.0.113.7", 5000)) as elsewhere:
            assert elsewhere.get("/api/v1/tasks", headers=bad).status_code == 401
            assert [elsewhere.get("/api/v1/tasks").status_code for _ in range(6)] == [401] * 6
            assert elsewhere.get("/api/v1/tasks", headers=bad).status_code == 401


def test_failed_authentication_behind_a_proxy_counts_the_forwarded_address(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=database_url,
        run_dir=tmp_path,
        auth_required=True,
        auth_failures_per_address=2,
        client_address_header="X-Forwarded-For",
    )
    bad = {"Authorization": "Bearer p3d_aaaaaaaa_" + "x" * 32}
    with app_client(settings) as (_, client):
        wait_for_fresh_window(60)
        one = {**bad, "X-Forwarded-For": "198.51.100.1, 203.0.113.1"}
        other = {**bad, "X-Forwarded-For": "198.51.100.1, 203.0.113.2"}
        assert [client.get("/api/v1/tasks", headers=one).status_code for _ in range(3)] == [
            401,
            401,
            429,
        ]
        assert client.get("/api/v1/tasks", headers=other).status_code == 401


def test_nul_and_control_characters_are_a_4xx(database_url: str, tmp_path: Path) -> None:
    """The probes of issue 10, each a 500 before."""
    settings = Settings(database_url=database_url, run_dir=tmp_path)
    with app_client(settings) as (_, client):
        for response in [
            client.get("/api/v1/tasks?batch_id=a%00b"),
            client.delete("/api/v1/keys/%00"),
            client.post("/api/v1/keys", json={"name": "a\u0000b"}),
            client.post("/api/v1/keys", json={"name": "a\u0007b"}),
            client.post("/api/v1/generate", json={"image_url": "http://a.example/\u0000"}),
            client.post(
                "/api/v1/generate",
                headers={"Idempotency-Key": "a\tb"},
                files={"image": ("p.png", PHOTO, "image/png")},
            ),
        ]:
            assert 400 <= response.status_code < 500, response.text
            assert response.json()["error"]["code"]
        assert client.get("/api/v1/keys").json() == []
