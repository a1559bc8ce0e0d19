"""The store's own rooms on a real PostgreSQL: waiting for work with LISTEN/NOTIFY, the one
backlog query, task-change notifications, driver errors mapped in one place, race-free account
creation and rate-window pruning."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from serve_app.accounts import Accounts
from serve_app.errors import Conflict, InvalidInput, Photo3DError
from serve_app.housekeeping import Housekeeping
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.store.db import Database
from serve_app.store.listen import TASK_CHANNEL, Listener
from serve_app.store.tasks import TaskQueue, read_backlog
from tests.support.app import app_client


@pytest.fixture
def queue(db: Database) -> Iterator[TaskQueue]:
    task_queue = TaskQueue(db, lease_seconds=5.0, backoff_seconds=30.0)
    yield task_queue
    task_queue.close()


def submit(queue: TaskQueue, backend: str = "cpu") -> uuid.UUID:
    row, _ = queue.submit(
        task_id=uuid.uuid4(),
        account_id="local",
        backend=backend,
        options={},
        inputs=[],
        max_attempts=2,
    )
    return uuid.UUID(str(row["id"]))


def test_wait_for_work_wakes_on_a_queued_task(queue: TaskQueue) -> None:
    assert queue.wait_for_work(0.2) is False  # nothing queued: the wait times out (and listens)
    submit(queue)
    assert queue.wait_for_work(30) is True  # the NOTIFY ends the wait


def test_wait_for_work_of_one_backend_sleeps_through_another_backends_tasks(
    queue: TaskQueue,
) -> None:
    """Issue 11: an idle worker of one backend is not woken by tasks queued for another."""
    assert queue.wait_for_work(0, ["cpu"]) is False  # now listening
    for _ in range(3):
        submit(queue, "trellis")
    assert queue.wait_for_work(1.0, ["cpu"]) is False  # three NOTIFYs, none for cpu
    submit(queue, "cpu")
    assert queue.wait_for_work(30, ["cpu"]) is True


def test_wait_for_work_outlives_a_dead_database(tmp_path: Path) -> None:
    # A port nobody listens on: the wait is a plain sleep, never an exception.
    db = Database("postgresql://nobody@127.0.0.1:9/none", timeout=1)
    queue = TaskQueue(db, lease_seconds=1, backoff_seconds=0)
    assert queue.wait_for_work(0.2) is False
    queue.close()


def test_backlog_counts_ready_and_running_per_backend(queue: TaskQueue, database_url: str) -> None:
    for _ in range(3):
        submit(queue, "cpu")
    submit(queue, "trellis")
    claim = queue.claim("w-1", ["cpu"])
    assert claim is not None
    # A failed attempt waits out its backoff: queued, but not ready, so no replica for it yet.
    queue.fail(claim, code="x", message="boom", permanent=False)
    running = queue.claim("w-2", ["cpu"])
    assert running is not None
    backlog = queue.backlog(["cpu", "trellis", "nothing"])
    assert (backlog["cpu"].queued, backlog["cpu"].running) == (1, 1)
    assert (backlog["trellis"].queued, backlog["trellis"].running) == (1, 0)
    assert "nothing" not in backlog
    # The autoscaler reads the same query over its own async connection.
    assert asyncio.run(read_backlog(database_url, ["cpu"])) == {"cpu": backlog["cpu"]}


def test_backlog_of_an_unreachable_database_is_a_domain_error() -> None:
    with pytest.raises(Photo3DError):
        asyncio.run(read_backlog("postgresql://nobody@127.0.0.1:9/none", ["cpu"]))


def test_every_task_change_is_notified_with_its_owner(queue: TaskQueue, database_url: str) -> None:
    listener = Listener(database_url, [TASK_CHANNEL])
    try:
        assert listener.wait(0.1) == []  # subscribes
        task_id = submit(queue)
        got = listener.wait(10)
        assert got and got[0][0] == TASK_CHANNEL
        assert json.loads(got[0][1]) == {"task_id": str(task_id), "account_id": "local"}
        queue.cancel(task_id, "local")
        assert json.loads(listener.wait(10)[0][1])["task_id"] == str(task_id)
    finally:
        listener.close()


def test_a_unique_key_clash_is_a_409_conflict(db: Database) -> None:
    params = {"prefix": "samepref", "account_id": "local", "secret_hash": b"x", "name": ""}
    db.fetch_one("create_api_key", params)
    with pytest.raises(Conflict) as err:
        db.fetch_one("create_api_key", params)
    assert err.value.http_status == 409 and err.value.code == "conflict"


def test_concurrent_account_creations_make_one_account(db: Database) -> None:
    accounts = Accounts(db)
    start = threading.Barrier(8)

    def create(_: int) -> str:
        start.wait()
        try:
            accounts.create_account("racer")
        except Conflict as exc:
            return exc.code
        return "created"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(create, range(8)))
    assert outcomes == ["account_exists"] * 7 + ["created"]


def test_concurrent_admin_creations_answer_one_201_and_409s(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=database_url, run_dir=tmp_path, rate_limit_requests=1000)
    with app_client(settings) as (services, client):
        services.accounts.create_account("root", is_admin=True)
        key, _ = services.accounts.create_key("root")
        headers = {"Authorization": f"Bearer {key}"}
        start = threading.Barrier(6)

        def create(_: int) -> int:
            start.wait()
            response = client.post("/api/v1/admin/accounts", headers=headers, json={"id": "twin"})
            assert response.status_code in (201, 409), response.text
            return response.status_code

        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(create, range(6)))
        assert codes == [201] + [409] * 5


def test_housekeeping_prunes_ended_rate_windows(services: Services, database_url: str) -> None:
    services.db.fetch_all_unflushed("count_request", {"key": "live-key", "window": 60})
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rate_windows (key_prefix, window_start, requests)"
            " VALUES ('old-key', now() - interval '2 hours', 5)"
        )
    chores = Housekeeping(
        queue=services.queue,
        artifacts=services.artifacts,
        accounts=services.accounts,
        rate_window_seconds=60,
    )
    chores.run_due()
    with psycopg.connect(database_url) as conn:
        left = [r[0] for r in conn.execute("SELECT key_prefix FROM rate_windows")]
    assert left == ["live-key"]  # the ended window is gone, the current one still counts


def test_a_value_the_database_cannot_hold_is_a_422(client: TestClient, services: Services) -> None:
    # The API refuses control characters before the database sees them...
    response = client.post("/api/v1/keys", json={"name": "a\x00b"})
    assert response.status_code == 422
    # ...and where a value still reaches PostgreSQL, its DataError is a 4xx, never a 500.
    with pytest.raises(InvalidInput) as refused:
        services.db.fetch_one("get_account", {"id": "a\x00b"})
    assert refused.value.code == "invalid_value" and refused.value.http_status == 422
