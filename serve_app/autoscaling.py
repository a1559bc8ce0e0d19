"""Scale generator deployments on the PostgreSQL backlog.

Generator replicas pull work from the queue; no request ever reaches them through Serve, so the
default request-based autoscaler would see zero load. This class-based policy (the pattern of
ray/serve/async_inference_autoscaling_policy.py, with PostgreSQL as the broker) asks the
database how many tasks are queued or running for its backend and wants one replica per
`tasks_per_replica` of them, down to min_replicas (0 allowed) when idle.

Configured in serve_config.yaml:

    autoscaling_config:
      min_replicas: 0
      max_replicas: 4
      policy:
        policy_function: serve_app.autoscaling:QueueBacklogPolicy
        policy_kwargs: {backend: trellis, tasks_per_replica: 1}

It runs inside the Serve controller and reads DATABASE_URL from that process's environment
(the head pod's, on KubeRay); the secret never sits in the config.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

from serve_app.errors import Photo3DError
from serve_app.store.tasks import read_backlog

log = logging.getLogger("ray.serve")


def desired_replicas(
    queued: int, running: int, tasks_per_replica: float, min_replicas: int, max_replicas: int
) -> int:
    """Replicas wanted for this backlog, within [min_replicas, max_replicas]."""
    wanted = math.ceil((queued + running) / max(tasks_per_replica, 1e-9))
    return max(min_replicas, min(max_replicas, wanted))


class QueueBacklogPolicy:
    """Serve autoscaling policy: replicas follow the task backlog of one backend."""

    def __init__(
        self,
        backend: str,
        tasks_per_replica: float = 1.0,
        poll_interval_s: float = 5.0,
        database_url_env: str = "DATABASE_URL",
    ) -> None:
        self.backend = backend
        self.tasks_per_replica = tasks_per_replica
        self.poll_interval_s = poll_interval_s
        self.database_url_env = database_url_env
        self.queued = 0
        self.running = 0
        self._task: asyncio.Task[None] | None = None
        self._last_poll = 0.0

    async def _poll_once(self) -> None:
        url = os.environ.get(self.database_url_env)
        if not url:
            log.warning(
                "QueueBacklogPolicy: %s is not set; cannot read the backlog", self.database_url_env
            )
            return
        try:
            backlog = (await read_backlog(url, [self.backend])).get(self.backend)
        except Photo3DError as exc:
            # Keep the last known backlog: scaling to zero on a DB blip would kill running work.
            log.warning("QueueBacklogPolicy(%s): backlog query failed: %s", self.backend, exc.code)
            return
        self.queued = backlog.queued if backlog else 0
        self.running = backlog.running if backlog else 0

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Called by the Serve controller on every autoscaling tick."""
        if self._task is not None and self._task.done():
            self._task = None
        now = time.monotonic()
        if self._task is None and now - self._last_poll >= self.poll_interval_s:
            self._last_poll = now
            self._task = asyncio.get_running_loop().create_task(self._poll_once())
        wanted = desired_replicas(
            self.queued,
            self.running,
            self.tasks_per_replica,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
        return wanted, {"queued": self.queued, "running": self.running}
