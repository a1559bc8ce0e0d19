"""Bulk conversion batches in PostgreSQL: a row per batch, its items are tasks with its id."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.types.json import Jsonb

from serve_app.store.db import Database, Row
from serve_app.store.tasks import decode_cursor_parts, encode_cursor_parts


class BatchStore:
    """Start, update, summarise and list an account's batches."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def start(self, account_id: str, batch_id: str, source: str, options: dict[str, Any]) -> Row:
        """Create the batch, or mark an existing one running again (a rerun resumes it)."""
        row = self.db.fetch_one(
            "start_batch",
            {"account_id": account_id, "id": batch_id, "source": source, "options": Jsonb(options)},
        )
        assert row is not None  # INSERT … ON CONFLICT DO UPDATE … RETURNING always returns
        return row

    def update(
        self,
        account_id: str,
        batch_id: str,
        *,
        total: int | None = None,
        rejected: dict[str, int] | None = None,
        status: str | None = None,
    ) -> Row | None:
        return self.db.fetch_one(
            "update_batch",
            {
                "account_id": account_id,
                "id": batch_id,
                "total": total,
                "rejected": Jsonb(rejected) if rejected is not None else None,
                "status": status,
            },
        )

    def summary(self, account_id: str, batch_id: str) -> Row | None:
        """The batch with its task counts and failures by code; None if not this account's."""
        row = self.db.fetch_one("batch_summary", {"account_id": account_id, "id": batch_id})
        if row is None:
            return None
        failures = self.db.fetch_all("batch_failures", {"account_id": account_id, "id": batch_id})
        return {**row, "failures": {r["code"]: r["n"] for r in failures}}

    def list_batches(
        self, account_id: str, *, limit: int, cursor: str | None = None
    ) -> tuple[list[Row], str | None]:
        """Summaries, newest first; returns (rows, next_cursor)."""
        created, last_id = decode_cursor_parts(cursor) if cursor else (None, None)
        ids = self.db.fetch_all(
            "list_batches",
            {
                "account_id": account_id,
                "cursor_created_at": created,
                "cursor_id": last_id,
                "limit": limit + 1,
            },
        )
        rows = [r for r in (self.summary(account_id, i["id"]) for i in ids[:limit]) if r]
        next_cursor = (
            encode_cursor_parts(rows[-1]["created_at"], rows[-1]["id"])
            if len(ids) > limit and rows
            else None
        )
        return rows, next_cursor

    def task_states(self, account_id: str, task_ids: list[uuid.UUID]) -> list[Row]:
        """The rows of some of the account's tasks (a bulk job's items in flight)."""
        if not task_ids:
            return []
        return self.db.fetch_all("task_states", {"account_id": account_id, "ids": task_ids})
