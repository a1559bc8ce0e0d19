"""The queue gauges' exporter: every few seconds, read the queue from PostgreSQL (and the replica
counts from the Serve controller) and set photo3d_queue_*, photo3d_workers_live and
photo3d_deployment_replicas.

Exactly one process in the cluster must export these (each replica exporting the same figures
would multiply every `sum()` by the replica count). The QueueMonitor deployment in
serve_app/deployments.py runs this with `num_replicas: 1`: Serve keeps exactly one alive and
restarts it when it dies, with no extra moving part. An advisory-lock leader among the ingress
replicas would also work, but a replica that loses the lock keeps exporting its last values
until it dies (Ray gauges cannot be withdrawn), so the dashboards would show stale figures;
during a Serve rollout two monitor replicas may briefly overlap, and they export identical
figures, which the dashboards and rules read with max(), never sum().
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from serve_app import metrics
from serve_app.errors import Photo3DError
from serve_app.store.queue_stats import QueueSnapshot, QueueStats

log = logging.getLogger(__name__)

ReplicaCounter = Callable[[], dict[str, int]]


def serve_replica_counts() -> dict[str, int]:
    """Running replicas per deployment, from the Serve controller (0 for scaled-to-zero ones)."""
    from ray import serve

    counts: dict[str, int] = {}
    for app in serve.status().applications.values():
        for name, deployment in app.deployments.items():
            states = deployment.replica_states or {}
            counts[name] = int(sum(n for s, n in states.items() if str(s).endswith("RUNNING")))
    return counts


class QueueMonitor:
    """Reads the queue and the replica counts, sets the gauges; `run_once` for tests."""

    def __init__(
        self,
        stats: QueueStats,
        backends: list[str],
        *,
        alive_seconds: float,
        interval_seconds: float,
        replica_counts: ReplicaCounter | None = None,
    ) -> None:
        self.stats = stats
        self.backends = backends
        self.alive_seconds = alive_seconds
        self.interval_seconds = interval_seconds
        self.replica_counts = replica_counts
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> QueueSnapshot:
        """One reading of the queue, exported."""
        snapshot = self.stats.snapshot(self.backends, self.alive_seconds)
        for (backend, status), count in snapshot.tasks.items():
            metrics.queue_tasks(backend, status, count)
        for backend, age in snapshot.oldest_queued_s.items():
            metrics.queue_oldest_age(backend, age)
        for backend, count in snapshot.workers.items():
            metrics.workers_live(backend, count)
        if self.replica_counts is not None:
            for deployment, count in self.replica_counts().items():
                metrics.deployment_replicas(deployment, count)
        return snapshot

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="photo3d-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                self.last_error = None
            except Photo3DError as exc:  # database down: keep the last values, try again
                self.last_error = exc.message
                log.warning("queue monitor: %s", exc.message)
            except Exception as exc:  # the Serve controller busy, say: never die over it
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("queue monitor: %s", self.last_error)
            self._stop.wait(self.interval_seconds)
