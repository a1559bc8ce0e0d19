"""Queue position and listing at the store, on a real PostgreSQL: what a waiting user reads.

The position counts the queued tasks a worker of the same backend takes first (higher priority,
then older). It is exact up to QUEUE_POSITION_EXACT_UP_TO tasks ahead; past that it comes from
enqueue numbers (migration 0012), so some tests lower the cap to see the estimate at work."""

from __future__ import annotations

import threading
import uuid
from importlib import resources

import psycopg
import pytest

from serve_app.store import tasks as tasks_module
from serve_app.store.db import Database
from serve_app.store.tasks import TaskQueue

BATCH = -10  # the bulk job's priority (serve_app/batches.py)


@pytest.fixture(autouse=True)
def accounts(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for account in ("acct", "other"):
            conn.execute("INSERT INTO accounts (id, name) VALUES (%s, %s)", (account, account))


@pytest.fixture
def queue(db: Database) -> TaskQueue:
    return TaskQueue(db, lease_seconds=30.0, backoff_seconds=0.0)


def submit(
    queue: TaskQueue,
    *,
    backend: str = "cpu",
    priority: int = 0,
    account: str = "acct",
    batch_id: str | None = None,
) -> uuid.UUID:
    row, _ = queue.submit(
        task_id=uuid.uuid4(),
        account_id=account,
        backend=backend,
        options={},
        inputs=[],
        max_attempts=3,
        priority=priority,
        batch_id=batch_id,
    )
    return row["id"]


def position(queue: TaskQueue, task_id: uuid.UUID, account: str = "acct") -> tuple[int, bool]:
    row = queue.get(task_id, account)
    assert row is not None and row["status"] == "queued"
    return row["queue_position"], row["queue_position_estimated"]


def positions(queue: TaskQueue, ids: list[uuid.UUID]) -> list[int]:
    return [position(queue, i)[0] for i in ids]


def test_position_counts_only_the_same_backend(queue: TaskQueue) -> None:
    mine = []
    for _ in range(4):
        submit(queue, backend="trellis")  # another backend's line, interleaved
        mine.append(submit(queue))
    assert [position(queue, i) for i in mine] == [(0, False), (1, False), (2, False), (3, False)]
    # Another account's tasks of the same backend are in the same line.
    theirs = submit(queue, account="other")
    assert position(queue, theirs, "other") == (4, False)


def test_higher_priority_tasks_are_ahead(queue: TaskQueue) -> None:
    batch = [submit(queue, priority=BATCH, batch_id="b") for _ in range(3)]
    interactive = [submit(queue) for _ in range(2)]
    assert positions(queue, interactive) == [0, 1]
    assert positions(queue, batch) == [2, 3, 4]


def test_position_falls_as_workers_claim(queue: TaskQueue) -> None:
    ids = [submit(queue) for _ in range(5)]
    submit(queue, backend="trellis")
    assert queue.claim("w", ["cpu"]) is not None
    assert queue.claim("w", ["trellis"]) is not None  # another line: no change to ours
    assert positions(queue, ids[1:]) == [0, 1, 2, 3]
    assert queue.claim("w", ["cpu"]) is not None
    assert positions(queue, ids[2:]) == [0, 1, 2]
    ran = queue.get(ids[0], "acct")
    assert ran is not None and ran["queue_position"] is None  # not queued any more


def test_a_retried_task_keeps_its_place_at_the_front(queue: TaskQueue) -> None:
    ids = [submit(queue) for _ in range(3)]
    batch = submit(queue, priority=BATCH, batch_id="b")
    claim = queue.claim("w", ["cpu"])
    assert claim is not None and claim.id == ids[0]
    assert positions(queue, ids[1:]) == [0, 1]
    row = queue.fail(claim, code="backend_error", message="boom", permanent=False)
    assert row is not None and row["status"] == "queued"
    assert positions(queue, ids) == [0, 1, 2]  # oldest first, as the claim takes them
    # Past the cap, the estimate counts it too (a retried task has no enqueue number).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks_module, "QUEUE_POSITION_EXACT_UP_TO", 1)
        assert position(queue, ids[2]) == (2, True)
        assert position(queue, batch) == (3, True)  # three interactive tasks ahead


def test_canceling_a_task_moves_those_behind_it(queue: TaskQueue) -> None:
    ids = [submit(queue) for _ in range(4)]
    assert queue.cancel(ids[1], "acct") is not None
    assert positions(queue, [ids[0], ids[2], ids[3]]) == [0, 1, 2]


def test_past_the_cap_the_position_is_estimated(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks_module, "QUEUE_POSITION_EXACT_UP_TO", 3)
    interactive = [submit(queue) for _ in range(6)]
    batch = [submit(queue, priority=BATCH, batch_id="b") for _ in range(6)]
    for _ in range(3):
        submit(queue, backend="trellis")
    # Near the front: exact. Past the cap: estimated, and right while nothing left the middle.
    assert position(queue, interactive[2]) == (2, False)
    assert position(queue, interactive[5]) == (5, True)
    assert position(queue, batch[0]) == (6, True)  # six interactive tasks ahead
    assert position(queue, batch[5]) == (11, True)
    # Claims take the front: the estimates follow them exactly.
    for _ in range(2):
        assert queue.claim("w", ["cpu"]) is not None
    assert position(queue, interactive[5]) == (3, True)
    assert position(queue, batch[5]) == (9, True)
    # A canceled task in the middle is still counted by the estimate: an upper bound, never
    # more than one too many per task that left the middle.
    assert queue.cancel(interactive[3], "acct") is not None
    assert position(queue, interactive[5])[0] in (2, 3)
    assert position(queue, batch[5])[0] in (8, 9)
    # Once the line is short again, it is exact.
    for _ in range(3):
        assert queue.claim("w", ["cpu"]) is not None
    assert position(queue, batch[5]) == (5, True)  # batch[0..4] ahead: still past the cap of 3
    assert position(queue, batch[2]) == (2, False)


def test_migration_numbers_the_tasks_already_queued(database_url: str, queue: TaskQueue) -> None:
    """0012 on a database that already has a queue: the queued tasks get their numbers in
    claim order, per backend and priority, and the estimate is right from the first read."""
    ids = [submit(queue) for _ in range(4)] + [submit(queue, priority=BATCH) for _ in range(2)]
    submit(queue, backend="trellis")
    migration = next(
        e.read_text()
        for e in resources.files("serve_app.store").joinpath("migrations").iterdir()
        if e.name.startswith("0012_")
    )
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        # Back to the schema before 0012, with the queue as it was.
        for (seq,) in conn.execute("SELECT seq FROM queue_levels").fetchall():
            conn.execute(f'DROP SEQUENCE "{seq}"')  # type: ignore[arg-type]  # md5 hex names
        conn.execute(
            "DROP TRIGGER tasks_number_queued_insert ON tasks;"
            " DROP TRIGGER tasks_number_queued_requeue ON tasks;"
            " DROP FUNCTION tasks_number_queued(); DROP FUNCTION queue_level_seq(text, integer);"
            " DROP TABLE queue_levels; DROP INDEX tasks_batch_listing_idx;"
            " ALTER TABLE tasks DROP COLUMN queue_seq"
        )
        conn.execute(migration)  # type: ignore[arg-type]  # the file shipped with us
        numbers = conn.execute(
            "SELECT backend, priority, queue_seq FROM tasks ORDER BY created_at"
        ).fetchall()
    assert numbers == [("cpu", 0, n) for n in (1, 2, 3, 4)] + [
        ("cpu", BATCH, 1),
        ("cpu", BATCH, 2),
        ("trellis", 0, 1),
    ]
    later = submit(queue)  # the counters carry on from the numbers given
    assert queue.claim("w", ["cpu"]) is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks_module, "QUEUE_POSITION_EXACT_UP_TO", 1)
        assert position(queue, later) == (3, True)
        assert position(queue, ids[5]) == (5, True)


def test_listing_pages_through_filters_newest_first(queue: TaskQueue) -> None:
    made = []
    for i in range(14):
        batch_id = "b1" if i % 3 == 0 else None
        made.append((submit(queue, batch_id=batch_id, priority=BATCH if batch_id else 0), batch_id))
    submit(queue, account="other", batch_id="b1")  # another account's: never listed
    for _ in range(4):
        claim = queue.claim("w", ["cpu"])
        assert claim is not None
        queue.succeed(claim, {})
    rows = {r["id"]: r for r in queue.list_tasks("acct", limit=100)[0]}

    def pages(**filters: str) -> list[uuid.UUID]:
        seen: list[uuid.UUID] = []
        cursor = None
        while True:
            page, cursor = queue.list_tasks("acct", limit=3, cursor=cursor, **filters)
            seen += [r["id"] for r in page]
            if cursor is None:
                return seen

    newest_first = [task_id for task_id, _ in reversed(made)]
    assert pages() == newest_first
    assert pages(batch_id="b1") == [t for t, b in reversed(made) if b == "b1"]
    succeeded = [t for t in newest_first if rows[t]["status"] == "succeeded"]
    assert pages(status="succeeded") == succeeded and len(succeeded) == 4
    assert pages(status="queued", batch_id="b1") == [
        t for t, b in reversed(made) if b == "b1" and rows[t]["status"] == "queued"
    ]


def test_concurrent_first_tasks_of_a_new_level_all_get_numbers(db: Database) -> None:
    """Eight submissions race to open a new (backend, priority) level: one creates its sequence,
    none fails, and the numbers are distinct."""
    queue = TaskQueue(db, lease_seconds=30.0, backoff_seconds=0.0)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            start.wait()
            submit(queue, backend="brand-new", priority=3)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(db.url, autocommit=True) as conn:
        numbers = sorted(
            r[0] for r in conn.execute("SELECT queue_seq FROM tasks WHERE backend = 'brand-new'")
        )
        levels = conn.execute("SELECT count(*) FROM queue_levels WHERE backend = 'brand-new'")
        assert levels.fetchone() == (1,)
    assert numbers == list(range(1, 9))
