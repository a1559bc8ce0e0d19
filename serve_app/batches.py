"""Bulk conversion batches: what a batch is (its items are tasks) and how far it has come.
No HTTP here; the API, the web page and jobs/bulk_convert.py all read batches through this."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from serve_app.errors import NotFound
from serve_app.store.batches import BatchStore
from serve_app.store.db import Row

# Interactive tasks have priority 0; a batch's wait behind them, so a catalogue never starves
# the people using the same generators (claims order by priority, then age).
BATCH_PRIORITY = -10


@dataclass(frozen=True)
class BatchSummary:
    """A batch's counts by status, progress, throughput, ETA and failures by code."""

    id: str
    status: str
    source: str
    options: dict[str, Any]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    total: int | None
    counts: dict[str, int]
    rejected: int
    failures: dict[str, int] = field(default_factory=dict)
    progress: float = 0.0
    photos_per_minute: float | None = None
    eta_seconds: float | None = None

    @classmethod
    def from_row(cls, row: Row, now: dt.datetime) -> BatchSummary:
        counts = {s: int(row[s]) for s in ("queued", "running", "succeeded", "failed", "canceled")}
        rejected_by_code: dict[str, int] = row["rejected"] or {}
        rejected = sum(rejected_by_code.values())
        ended = counts["succeeded"] + counts["failed"] + counts["canceled"] + rejected
        known = sum(counts.values()) + rejected
        total = row["total"] if row["total"] is not None else None
        progress = ended / max(total if total is not None else known, 1)
        rate = None
        started, last = row["first_started_at"], row["last_finished_at"]
        finished = counts["succeeded"] + counts["failed"]
        if started is not None and finished:
            until = last if row["status"] != "running" and last is not None else now
            minutes = max((until - started).total_seconds(), 1.0) / 60
            rate = round(finished / minutes, 2)
        eta = None
        if rate and row["status"] == "running":
            remaining = max((total if total is not None else known) - ended, 0)
            eta = round(remaining / rate * 60, 1)
        failures = dict(row.get("failures") or {})
        for code, n in rejected_by_code.items():
            failures[code] = failures.get(code, 0) + n
        return cls(
            id=row["id"],
            status=row["status"],
            source=row["source"],
            options=row["options"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            total=total,
            counts=counts,
            rejected=rejected,
            failures=failures,
            progress=round(min(progress, 1.0), 4),
            photos_per_minute=rate,
            eta_seconds=eta,
        )


class Batches:
    """Batches of one deployment: the bulk job writes them, the API reads them."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store

    def start(self, account_id: str, batch_id: str, source: str, options: dict[str, Any]) -> None:
        self.store.start(account_id, batch_id, source, options)

    def update(self, account_id: str, batch_id: str, **changes: Any) -> None:
        self.store.update(account_id, batch_id, **changes)

    def get(self, account_id: str, batch_id: str) -> BatchSummary:
        """The batch, or NotFound when it does not exist or is another account's."""
        row = self.store.summary(account_id, batch_id)
        if row is None:
            raise NotFound(f"batch {batch_id} not found", code="batch_not_found")
        return BatchSummary.from_row(row, dt.datetime.now(dt.UTC))

    def list(
        self, account_id: str, *, limit: int, cursor: str | None = None
    ) -> tuple[list[BatchSummary], str | None]:
        rows, next_cursor = self.store.list_batches(account_id, limit=limit, cursor=cursor)
        now = dt.datetime.now(dt.UTC)
        return [BatchSummary.from_row(r, now) for r in rows], next_cursor
