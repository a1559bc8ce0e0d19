"""The task queue's rules, on a real PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest

from serve_app.errors import InvalidInput
from serve_app.store.db import Database
from serve_app.store.tasks import TaskQueue


@pytest.fixture(autouse=True)
def accounts(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for account in ("acct", "someone-else"):
            conn.execute("INSERT INTO accounts (id, name) VALUES (%s, %s)", (account, account))


@pytest.fixture
def queue(db: Database) -> TaskQueue:
    return TaskQueue(db, lease_seconds=1.0, backoff_seconds=0.0)


def submit(
    queue: TaskQueue,
    *,
    backend: str = "cpu",
    priority: int = 0,
    account: str = "acct",
    max_attempts: int = 3,
    key: str | None = None,
) -> uuid.UUID:
    row, _ = queue.submit(
        task_id=uuid.uuid4(),
        account_id=account,
        backend=backend,
        options={},
        inputs=[],
        max_attempts=max_attempts,
        priority=priority,
        idempotency_key=key,
    )
    return row["id"]


def status(queue: TaskQueue, task_id: uuid.UUID) -> dict:
    row = queue.db.fetch_one("get_task_any_account", {"id": task_id})
    assert row is not None
    return row


def test_claim_order_is_priority_then_age_and_per_backend(queue: TaskQueue) -> None:
    first = submit(queue)
    second = submit(queue)
    urgent = submit(queue, priority=5)
    other_backend = submit(queue, backend="trellis")
    order = [queue.claim("w", ["cpu"]) for _ in range(4)]
    assert [c.id for c in order[:3] if c] == [urgent, first, second]
    assert order[3] is None  # the trellis task is not ours
    claimed = queue.claim("g", ["trellis"])
    assert claimed is not None and claimed.id == other_backend


def test_expired_lease_is_retried_with_a_new_attempt(queue: TaskQueue) -> None:
    task_id = submit(queue)
    first = queue.claim("w1", ["cpu"])
    assert first is not None and first.attempt == 1
    assert queue.recover_stalled() == []  # lease still valid
    time.sleep(1.2)
    recovered = queue.recover_stalled()
    assert [(r["id"], r["status"]) for r in recovered] == [(task_id, "queued")]
    second = queue.claim("w2", ["cpu"])
    assert second is not None and second.id == task_id and second.attempt == 2


def test_fencing_rejects_a_stale_finisher(queue: TaskQueue) -> None:
    submit(queue)
    stale = queue.claim("w1", ["cpu"])
    assert stale is not None
    time.sleep(1.2)
    queue.recover_stalled()
    fresh = queue.claim("w2", ["cpu"])
    assert fresh is not None
    # The old worker wakes up: it can neither heartbeat, succeed nor fail the task.
    assert not queue.heartbeat(stale)
    assert not queue.succeed(stale, {"from": "stale"})
    assert queue.fail(stale, code="x", message="stale", permanent=True) is None
    assert queue.succeed(fresh, {"from": "fresh"})
    row = status(queue, fresh.id)
    assert row["status"] == "succeeded" and row["result"] == {"from": "fresh"}
    # Written once: a second success of the same attempt changes nothing.
    assert not queue.succeed(fresh, {"from": "again"})
    assert status(queue, fresh.id)["result"] == {"from": "fresh"}


def test_max_attempts_then_failed_with_reason(queue: TaskQueue) -> None:
    task_id = submit(queue, max_attempts=2)
    for attempt in (1, 2):
        claim = queue.claim("w", ["cpu"])
        assert claim is not None and claim.attempt == attempt
        time.sleep(1.1)
        queue.recover_stalled()
    row = status(queue, task_id)
    assert row["status"] == "failed"
    assert row["error_code"] == "worker_lost"
    assert "attempt 2 of 2" in row["error_message"]
    assert queue.claim("w", ["cpu"]) is None


def test_retryable_failure_backs_off_and_permanent_failure_ends(db: Database) -> None:
    queue = TaskQueue(db, lease_seconds=30, backoff_seconds=60)
    retry_id = submit(queue)
    claim = queue.claim("w", ["cpu"])
    assert claim is not None
    row = queue.fail(claim, code="backend_error", message="boom", permanent=False)
    assert row is not None and row["status"] == "queued" and row["error_code"] == "backend_error"
    assert queue.claim("w", ["cpu"]) is None  # backing off for 60 s
    perm_id = submit(queue)
    claim = queue.claim("w", ["cpu"])
    assert claim is not None and claim.id == perm_id
    row = queue.fail(claim, code="no_object_found", message="nothing there", permanent=True)
    assert row is not None and row["status"] == "failed" and row["attempt"] == 1
    assert status(queue, retry_id)["status"] == "queued"


def test_cancel_queued_and_running(queue: TaskQueue) -> None:
    queued = submit(queue)
    assert queue.cancel(queued, "acct")["status"] == "canceled"
    running = submit(queue)
    claim = queue.claim("w", ["cpu"])
    assert claim is not None and claim.id == running
    assert queue.cancel(running, "other-account") is None  # not theirs
    assert queue.cancel(running, "acct")["status"] == "canceled"
    assert not queue.heartbeat(claim)  # the worker learns it must stop
    assert not queue.succeed(claim, {})
    assert status(queue, running)["status"] == "canceled"


def test_idempotency_key_returns_the_original(queue: TaskQueue) -> None:
    first = submit(queue, key="abc")
    again, created = queue.submit(
        task_id=uuid.uuid4(),
        account_id="acct",
        backend="cpu",
        options={},
        inputs=[],
        max_attempts=3,
        idempotency_key="abc",
    )
    assert not created and again["id"] == first
    other_account = submit(queue, key="abc", account="someone-else")
    assert other_account != first


def test_events_record_every_status_change(queue: TaskQueue) -> None:
    task_id = submit(queue)
    claim = queue.claim("w", ["cpu"])
    assert claim is not None
    queue.heartbeat(claim, progress=0.4, stage="meshing")
    queue.succeed(claim, {})
    timeline = [(e["status"], e["stage"]) for e in queue.events(task_id)]
    assert timeline == [
        ("queued", None),
        ("running", "starting"),
        ("running", "meshing"),
        ("succeeded", "done"),
    ]


def test_listing_is_newest_first_with_cursor_and_filter(queue: TaskQueue) -> None:
    ids = [submit(queue) for _ in range(5)]
    claim = queue.claim("w", ["cpu"])
    assert claim is not None
    queue.succeed(claim, {})
    seen, cursor = [], None
    while True:
        rows, cursor = queue.list_tasks("acct", limit=2, cursor=cursor)
        seen += [r["id"] for r in rows]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    done, _ = queue.list_tasks("acct", limit=10, status="succeeded")
    assert [r["id"] for r in done] == [ids[0]]
    assert queue.list_tasks("nobody", limit=10)[0] == []
    with pytest.raises(InvalidInput):
        queue.list_tasks("acct", limit=2, cursor="not-a-cursor")
    with pytest.raises(InvalidInput):
        queue.list_tasks("acct", limit=2, status="exploded")


def test_concurrent_claimers_never_share_a_task(db: Database) -> None:
    """8 threads x 500 tasks: every task is claimed exactly once."""
    queue = TaskQueue(db, lease_seconds=300, backoff_seconds=0)
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (id, backend, max_attempts) "
            "SELECT gen_random_uuid(), 'cpu', 3 FROM generate_series(1, 500)"
        )
    claimed: list[uuid.UUID] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claimer(n: int) -> None:
        start.wait()
        while (claim := queue.claim(f"w{n}", ["cpu"])) is not None:
            with lock:
                claimed.append(claim.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(claimed)
    assert len(counts) == 500
    assert max(counts.values()) == 1
    with psycopg.connect(db.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM tasks WHERE status = 'running' AND attempt = 1"
        ).fetchone()
    assert row is not None and row[0] == 500
