"""Housekeeping chores that run on a timer beside the claim loop, each at its own pace:
stalled-lease recovery (often: a dead worker's task should not wait long), deleting expired
results, and pruning the request counters of ended rate windows."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app import artifact_keys, metrics
from serve_app.accounts import Accounts
from serve_app.artifacts import ArtifactStore
from serve_app.errors import Photo3DError
from serve_app.store.tasks import TaskQueue

log = logging.getLogger(__name__)


@dataclass
class _Chore:
    name: str
    every: float
    run: Callable[[], object]
    due: float = 0.0


class Housekeeping:
    """The chores of one worker process; `run_due` runs those whose time has come."""

    def __init__(
        self,
        *,
        queue: TaskQueue,
        artifacts: ArtifactStore,
        accounts: Accounts | None = None,
        recover_every: float = 5.0,
        retention_seconds: float = 0,
        rate_window_seconds: int = 60,
    ) -> None:
        self.queue = queue
        self.artifacts = artifacts
        self.accounts = accounts
        self.retention_seconds = retention_seconds
        self.rate_window_seconds = rate_window_seconds
        self.chores = [_Chore("recover stalled leases", recover_every, self.recover_stalled)]
        if retention_seconds > 0:
            self.chores.append(
                _Chore(
                    "delete expired results", min(300.0, retention_seconds / 2), self.reap_expired
                )
            )
        if accounts is not None:
            self.chores.append(
                _Chore("prune rate windows", float(rate_window_seconds), self.prune_rate_windows)
            )

    def run_due(self) -> float:
        """Run every chore that is due; returns the seconds until the next one is."""
        now = time.monotonic()
        for chore in self.chores:
            if now >= chore.due:
                chore.due = now + chore.every
                try:
                    chore.run()
                except Photo3DError as exc:  # a database outage: try again next time
                    log.warning("housekeeping (%s): %s", chore.name, exc.message)
        return max(0.0, min(c.due for c in self.chores) - time.monotonic())

    def run_until(self, stop: threading.Event) -> None:
        """Run chores on their timers until `stop` is set."""
        while not stop.is_set():
            try:
                wait = self.run_due()
            except Exception:  # keep the timer alive; the next round retries
                log.exception("housekeeping failed")
                wait = 1.0
            stop.wait(max(wait, 0.1))

    def recover_stalled(self) -> int:
        """Requeue (or fail) tasks whose lease expired; counted and logged per task."""
        rows = self.queue.recover_stalled()
        for row in rows:
            # The stalled attempt's files (written in part before its worker died) are never
            # served: the task runs again as a new attempt, or has failed (issue 10).
            self.artifacts.delete_prefix(artifact_keys.attempt_prefix(row["id"], row["attempt"]))
            metrics.stalled_recovered(str(row["status"]))
            log.warning(
                "lease expired; task %s",
                "failed" if row["status"] == "failed" else "requeued",
                extra={"task_id": str(row["id"]), "attempt": row["attempt"]},
            )
        return len(rows)

    def reap_expired(self) -> int:
        """Delete the files of tasks finished longer ago than the retention; returns how many."""
        if self.retention_seconds <= 0:
            return 0
        count = 0
        for task_id in self.queue.expired(self.retention_seconds, limit=100):
            for prefix in artifact_keys.task_prefixes(task_id):
                self.artifacts.delete_prefix(prefix)
            if self.queue.mark_expired(task_id):
                count += 1
        return count

    def prune_rate_windows(self) -> int:
        """Drop the request counters of rate windows that have ended; returns how many."""
        if self.accounts is None:
            return 0
        return self.accounts.prune_rate_windows(self.rate_window_seconds)
