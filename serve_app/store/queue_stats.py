"""Cluster-wide queue figures read from PostgreSQL for the queue gauges (the database is the
truth; no replica's memory is)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.store.db import Database

ACTIVE_STATUSES = ("queued", "running")


@dataclass(frozen=True)
class QueueSnapshot:
    """Tasks per (backend, status), oldest queued age per backend, live workers per backend.
    Every backend asked about appears, with zeros, so a dashboard shows 0 rather than nothing."""

    tasks: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest_queued_s: dict[str, float] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)


class QueueStats:
    """Reads the queue gauges' values in three small statements."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def snapshot(self, backends: list[str], alive_seconds: float) -> QueueSnapshot:
        """The queue as it is now; backends seen in the database but not listed are kept too."""
        depth = self.db.fetch_all("queue_depth")
        oldest = self.db.fetch_all("oldest_queued")
        workers = self.db.fetch_all("live_workers", {"alive_seconds": alive_seconds})
        names = set(backends) | {r["backend"] for r in depth} | {r["backend"] for r in workers}
        tasks = {(b, s): 0 for b in names for s in ACTIVE_STATUSES}
        for row in depth:
            tasks[(row["backend"], row["status"])] = int(row["tasks"])
        ages = dict.fromkeys(names, 0.0)
        for row in oldest:
            ages[row["backend"]] = max(0.0, float(row["age_s"]))
        alive = dict.fromkeys(names, 0)
        for row in workers:
            alive[row["backend"]] = int(row["workers"])
        return QueueSnapshot(tasks, ages, alive)
