"""The durable task queue on PostgreSQL: submit, claim (SKIP LOCKED), heartbeat, finish with a
fencing token, retry with backoff, stalled-lease recovery, waiting for work (LISTEN/NOTIFY with
polling behind it), the backlog the autoscaler reads, listing and timeline."""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from serve_app.errors import InvalidInput, ServiceUnavailable
from serve_app.store.db import Database, Row, named, translate_errors
from serve_app.store.listen import QUEUED_CHANNEL, Listener

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
# A queued task's position is counted exactly up to this many tasks ahead (of higher priority, and
# of its own priority); past it, get_task estimates it from enqueue numbers (queries.sql).
QUEUE_POSITION_EXACT_UP_TO = 1000
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class ActiveTaskLimitReached(Exception):
    """The account already has `limit` tasks queued or running; nothing was inserted."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"active task limit {limit} reached")
        self.limit = limit


@dataclass(frozen=True)
class Claim:
    """A task a worker owns until its lease expires; `attempt` is the fencing token."""

    id: uuid.UUID
    attempt: int
    backend: str
    options: dict[str, Any]
    inputs: list[str]
    max_attempts: int
    account_id: str | None = None  # for log lines
    queue_wait_seconds: float = 0.0  # from "could run" (submit or backoff end) to this claim


def encode_cursor_parts(created_at: dt.datetime, key: object) -> str:
    """Opaque cursor for keyset pagination after the row (created_at, key)."""
    raw = f"{created_at.isoformat()}|{key}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor_parts(cursor: str) -> tuple[dt.datetime, str]:
    """Inverse of encode_cursor_parts; a tampered cursor is a 4xx."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, sep, key = raw.partition("|")
        if not sep:
            raise ValueError("no separator")
        return dt.datetime.fromisoformat(created), key
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("the cursor is not valid", code="invalid_cursor") from exc


def encode_cursor(row: Row) -> str:
    """Opaque cursor for keyset pagination after task `row`."""
    return encode_cursor_parts(row["created_at"], row["id"])


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """Inverse of encode_cursor; a tampered cursor is a 4xx."""
    created, key = decode_cursor_parts(cursor)
    try:
        return created, uuid.UUID(key)
    except ValueError as exc:
        raise InvalidInput("the cursor is not valid", code="invalid_cursor") from exc


class TaskQueue:
    """All task state changes, each a single SQL statement."""

    def __init__(self, db: Database, *, lease_seconds: float, backoff_seconds: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.backoff_seconds = backoff_seconds
        self._work_listener: Listener | None = None

    # --- producers -----------------------------------------------------------------
    def submit(
        self,
        *,
        task_id: uuid.UUID,
        account_id: str,
        backend: str,
        options: dict[str, Any],
        inputs: list[str],
        max_attempts: int,
        priority: int = 0,
        idempotency_key: str | None = None,
        batch_id: str | None = None,
        request_hash: str | None = None,
        max_active: int | None = None,
        credits: int = 0,
        meter_event: str | None = None,
    ) -> tuple[Row, bool]:
        """Insert a queued task; returns (row, created). An idempotency key already used by this
        account returns the original task and created=False. With billing, `credits` are
        reserved (or `meter_event` noted) in the insert's own transaction. With `max_active`, the
        account's queued and running tasks are counted and the task inserted (and paid for)
        under one per-account lock, so concurrent submissions cannot pass the limit together
        (ActiveTaskLimitReached)."""
        params = {
            "id": task_id,
            "account_id": account_id,
            "backend": backend,
            "priority": priority,
            "options": Jsonb(options),
            "inputs": Jsonb(inputs),
            "max_attempts": max_attempts,
            "idempotency_key": idempotency_key,
            "batch_id": batch_id,
            "request_hash": request_hash,
        }
        if credits or meter_event:
            from serve_app.store.ledger import insert_task_reserving

            if max_active is None:
                row = insert_task_reserving(
                    self.db, params, credits=credits, meter_event=meter_event
                )
            else:  # the count, the insert and the reservation in one locked transaction
                row = insert_task_reserving(
                    self.db,
                    {**params, "max_active": max_active},
                    credits=credits,
                    meter_event=meter_event,
                    insert_query="insert_task_within_limit",
                    lock=f"tasks:{account_id}",
                )
        elif max_active is None:
            row = self.db.fetch_one("insert_task", params)
        else:
            row = self.db.fetch_one_locked(
                f"tasks:{account_id}",
                "insert_task_within_limit",
                {**params, "max_active": max_active},
            )
        if row is not None:
            return row, True
        existing = self.by_idempotency_key(account_id, idempotency_key or "")
        if existing is None and max_active is not None:
            raise ActiveTaskLimitReached(max_active)
        if existing is None:  # the original was deleted between the two statements
            raise InvalidInput("idempotency key conflict; retry", code="idempotency_conflict")
        return existing, False

    def by_idempotency_key(self, account_id: str, idempotency_key: str) -> Row | None:
        """The account's task submitted with this Idempotency-Key, if any."""
        return self.db.fetch_one(
            "get_task_by_idempotency_key",
            {"account_id": account_id, "idempotency_key": idempotency_key},
        )

    def cancel(self, task_id: uuid.UUID, account_id: str) -> Row | None:
        """Cancel a queued or running task; None if it is not cancelable (or not ours)."""
        return self.db.fetch_one("cancel_task", {"id": task_id, "account_id": account_id})

    def delete(self, task_id: uuid.UUID, account_id: str) -> Row | None:
        return self.db.fetch_one("delete_task", {"id": task_id, "account_id": account_id})

    # --- readers -------------------------------------------------------------------
    def get(self, task_id: uuid.UUID, account_id: str) -> Row | None:
        """The task with, when queued, its queue_position (and queue_position_estimated)."""
        return self.db.fetch_one("get_task", get_params(task_id, account_id))

    async def aget(self, task_id: uuid.UUID, account_id: str) -> Row | None:
        """get on the event loop (GET /task, issue 11)."""
        return await self.db.afetch_one("get_task", get_params(task_id, account_id))

    def list_tasks(
        self,
        account_id: str,
        *,
        limit: int,
        status: str | None = None,
        batch_id: str | None = None,
        cursor: str | None = None,
    ) -> tuple[list[Row], str | None]:
        """Newest first; returns (rows, next_cursor)."""
        if status is not None and status not in STATUSES:
            raise InvalidInput(
                f"status must be one of {', '.join(STATUSES)}", code="invalid_status"
            )
        created, last_id = decode_cursor(cursor) if cursor else (None, None)
        rows = self.db.fetch_all(
            "list_tasks",
            {
                "account_id": account_id,
                "status": status,
                "batch_id": batch_id,
                "cursor_created_at": created,
                "cursor_id": last_id,
                "limit": limit + 1,
            },
        )
        next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return rows[:limit], next_cursor

    def events(self, task_id: uuid.UUID, after_id: int = 0) -> list[Row]:
        return self.db.fetch_all("task_events", {"id": task_id, "after_id": after_id})

    def backlog(self, backends: list[str]) -> dict[str, Backlog]:
        """Tasks ready to run and running, per backend (what the autoscaler scales on)."""
        return _backlog(self.db.fetch_all("backlog", {"backends": backends}))

    def live_workers(self, alive_seconds: float) -> dict[str, int]:
        rows = self.db.fetch_all("live_workers", {"alive_seconds": alive_seconds})
        return {r["backend"]: r["workers"] for r in rows}

    # --- workers -------------------------------------------------------------------
    def claim(self, worker_id: str, backends: list[str]) -> Claim | None:
        """Take the next task for these backends (in the order given), or None when there is
        none."""
        row = None
        for backend in backends:
            row = self.db.fetch_one(
                "claim_task",
                {"backend": backend, "worker_id": worker_id, "lease_seconds": self.lease_seconds},
            )
            if row is not None:
                break
        if row is None:
            return None
        return Claim(
            id=row["id"],
            attempt=row["attempt"],
            backend=row["backend"],
            options=row["options"],
            inputs=row["inputs"],
            max_attempts=row["max_attempts"],
            account_id=row.get("account_id"),
            queue_wait_seconds=queue_wait_seconds(row),
        )

    def heartbeat(
        self, claim: Claim, *, progress: float | None = None, stage: str | None = None
    ) -> bool:
        """Extend the lease; False means this attempt no longer owns the task (stop work)."""
        row = self.db.fetch_one(
            "heartbeat",
            {
                "id": claim.id,
                "attempt": claim.attempt,
                "lease_seconds": self.lease_seconds,
                "progress": progress,
                "stage": stage,
            },
        )
        return row is not None

    def succeed(self, claim: Claim, result: dict[str, Any]) -> bool:
        """Record the result; False when a newer attempt or a cancel owns the task."""
        row = self.db.fetch_one(
            "finish_succeeded", {"id": claim.id, "attempt": claim.attempt, "result": Jsonb(result)}
        )
        return row is not None

    def preview_ready(self, claim: Claim, size: int) -> bool:
        """Mark the preview of this attempt's result rendered; False when the task has moved on
        (deleted, or another attempt's result)."""
        row = self.db.fetch_one(
            "preview_ready", {"id": claim.id, "attempt": claim.attempt, "bytes": size}
        )
        return row is not None

    # --- issue 11: files stored after success (sql/results.sql) ---------------------------
    def result_file_ready(
        self, task_id: uuid.UUID | str, attempt: int, name: str, size: int
    ) -> bool:
        """Mark one file of a succeeded attempt's result stored: "preview" or a format name.
        False when the task has moved on (deleted, expired) or has no such entry."""
        path = ["preview"] if name == "preview" else ["files", name]
        row = self.db.fetch_one(
            "result_file_ready",
            {"id": task_id, "attempt": attempt, "path": path, "bytes": size},
        )
        return row is not None

    def fail(self, claim: Claim, *, code: str, message: str, permanent: bool) -> Row | None:
        """Record a failure: retried with backoff unless permanent or out of attempts."""
        return self.db.fetch_one(
            "finish_failed",
            {
                "id": claim.id,
                "attempt": claim.attempt,
                "permanent": permanent,
                "error_code": code,
                "error_message": message[:2000],
                "backoff_seconds": self.backoff_seconds,
            },
        )

    def recover_stalled(self) -> list[Row]:
        """Requeue (or fail) tasks whose lease expired; returns the rows changed."""
        return self.db.fetch_all("recover_stalled", {"backoff_seconds": self.backoff_seconds})

    def expired(self, retention_seconds: float, limit: int = 100) -> list[uuid.UUID]:
        """Finished tasks whose files are past their retention."""
        rows = self.db.fetch_all(
            "expired_tasks", {"retention_seconds": retention_seconds, "limit": limit}
        )
        return [r["id"] for r in rows]

    def mark_expired(self, task_id: uuid.UUID) -> bool:
        """Forget a task's result links once its files are deleted."""
        return self.db.execute("mark_expired", {"id": task_id}) > 0

    def register_worker(self, worker_id: str, backend: str, hostname: str, pid: int) -> None:
        self.db.execute(
            "upsert_worker", {"id": worker_id, "backend": backend, "hostname": hostname, "pid": pid}
        )

    def unregister_worker(self, worker_id: str) -> None:
        self.db.execute("delete_worker", {"id": worker_id})

    def wait_for_work(self, timeout: float, backends: Collection[str] | None = None) -> bool:
        """Sleep until a NOTIFY says a task was queued (True), or `timeout` passes (False):
        the caller polls the queue either way, so a lost notification only costs latency.
        With `backends`, a task queued for another backend does not end the wait (the
        notification's payload is the task's backend), so an idle worker does no work for it."""
        if self._work_listener is None:
            self._work_listener = Listener(self.db.url, [QUEUED_CHANNEL])
        deadline = time.monotonic() + timeout
        while True:
            notes = self._work_listener.wait(max(0.0, deadline - time.monotonic()))
            if not notes:
                return False
            if backends is None or any(payload in backends for _, payload in notes):
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        """Drop the listening connection, if one was opened."""
        if self._work_listener is not None:
            self._work_listener.close()
            self._work_listener = None


@dataclass(frozen=True)
class Backlog:
    """Tasks of one backend: queued and ready to run (backoff over), and running."""

    queued: int = 0
    running: int = 0


def _backlog(rows: list[Row]) -> dict[str, Backlog]:
    return {r["backend"]: Backlog(int(r["queued"]), int(r["running"])) for r in rows}


async def read_backlog(url: str, backends: list[str]) -> dict[str, Backlog]:
    """The backlog over a short-lived async connection, for the Serve controller (which runs
    the autoscaling policy in its event loop and has no pool of ours)."""
    try:
        with translate_errors():
            async with await psycopg.AsyncConnection.connect(
                url, connect_timeout=5, row_factory=dict_row
            ) as conn:
                cur = await conn.execute(**named("backlog", {"backends": backends}))
                return _backlog(await cur.fetchall())
    except psycopg.Error as exc:  # e.g. the schema is not migrated yet: no backlog to read
        raise ServiceUnavailable(f"backlog unreadable: {type(exc).__name__}") from exc


def queue_wait_seconds(row: Row) -> float:
    """Seconds a claimed attempt waited: from submit (or the end of its retry backoff) to the
    claim."""
    started, created, run_after = (
        row.get("attempt_started_at"),
        row.get("created_at"),
        row.get("run_after"),
    )
    if started is None or created is None:
        return 0.0
    ready = max(created, run_after) if run_after is not None else created
    return max(0.0, (started - ready).total_seconds())


def get_params(task_id: uuid.UUID, account_id: str) -> dict[str, Any]:
    """The parameters of query get_task."""
    return {"id": task_id, "account_id": account_id, "exact_up_to": QUEUE_POSITION_EXACT_UP_TO}
