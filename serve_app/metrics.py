"""Every `photo3d_*` metric, and one helper per event so the API and the worker record each with
one line.

The metrics go out through Ray's metrics pipeline (`ray.util.metrics`): each replica's values
reach its node's metrics agent, which Prometheus (or KubeRay's PodMonitor) already scrapes next
to Ray's and Serve's own metrics. Ray exports them as `ray_photo3d_*`; the scrape configs in
cluster/prometheus rename them back to `photo3d_*`, the names dashboards and alerts use.

Outside a Ray worker (unit tests, the CLI's `generate`, a plain script) every helper is a no-op:
this module never starts or joins Ray, and importing it does not import Ray.

Labels are kept to small, bounded sets (backend, status, error code, stage, format, route
template, method): never a task id, an account id or anything a client chooses freely.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Seconds: from 50 ms API calls to 15-minute GPU generations.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
WORK_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800]
WAIT_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its kind, name (without Ray's `ray_` prefix), help text and labels."""

    kind: str  # counter | gauge | histogram
    name: str
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    # --- HTTP (ingress replicas) -------------------------------------------------------
    MetricSpec(
        "counter",
        "photo3d_http_requests",
        "HTTP requests answered, by route template, method and status code.",
        ("route", "method", "status"),
    ),
    MetricSpec(
        "histogram",
        "photo3d_http_request_seconds",
        "Time to the end of the response, by route template and method.",
        ("route", "method"),
        tuple(LATENCY_BUCKETS),
    ),
    # --- tasks (ingress and generator replicas) ------------------------------------------
    MetricSpec("counter", "photo3d_tasks_submitted", "Tasks accepted (202).", ("backend",)),
    MetricSpec(
        "counter",
        "photo3d_tasks_finished",
        "Attempts that ended: succeeded, failed (final), retrying (failed, will be retried) or "
        "lost (lease taken over), by error code (`none` on success).",
        ("backend", "status", "code"),
    ),
    MetricSpec(
        "counter", "photo3d_task_attempts", "Attempts started (claims).", ("backend", "kind")
    ),
    MetricSpec(
        "counter",
        "photo3d_stalled_recovered",
        "Running tasks whose lease expired, requeued or failed by the recovery sweep.",
        ("outcome",),
    ),
    MetricSpec(
        "counter",
        "photo3d_watchdog_kills",
        "Generator replicas ended because a generation ran past its timeout.",
        ("backend",),
    ),
    MetricSpec(
        "histogram",
        "photo3d_generation_seconds",
        "Backend time per stage of a generation (`total` is the whole backend call).",
        ("backend", "stage"),
        tuple(WORK_BUCKETS),
    ),
    MetricSpec(
        "histogram",
        "photo3d_task_queue_wait_seconds",
        "From the moment a task could run (submitted, or its retry backoff ended) to its claim.",
        ("backend",),
        tuple(WAIT_BUCKETS),
    ),
    MetricSpec(
        "histogram",
        "photo3d_export_seconds",
        "Time to convert the generated GLB to the requested formats.",
        ("backend",),
        tuple(WORK_BUCKETS),
    ),
    MetricSpec(
        "histogram",
        "photo3d_preview_seconds",
        "Time to render the preview thumbnail.",
        ("backend",),
        tuple(WORK_BUCKETS),
    ),
    MetricSpec(
        "counter",
        "photo3d_artifact_bytes",
        "Bytes of result files written to the artifact store, by kind (format, preview, extra).",
        ("backend", "kind"),
    ),
    # --- queue: read from PostgreSQL by the one QueueMonitor replica ------------------------
    MetricSpec(
        "gauge",
        "photo3d_queue_tasks",
        "Tasks in the queue by status (queued, running) and backend, from PostgreSQL.",
        ("backend", "status"),
    ),
    MetricSpec(
        "gauge",
        "photo3d_queue_oldest_queued_age_seconds",
        "Age of the oldest queued task that may run now (0 when none), from PostgreSQL.",
        ("backend",),
    ),
    MetricSpec(
        "gauge",
        "photo3d_workers_live",
        "Worker loops that beat their presence recently, by backend, from PostgreSQL.",
        ("backend",),
    ),
    MetricSpec(
        "gauge",
        "photo3d_deployment_replicas",
        "Running replicas per Serve deployment (0 when scaled to zero), from the Serve controller.",
        ("deployment",),
    ),
    # --- hooks for billing and webhooks (#12, #15): defined here, called by those features --
    MetricSpec(
        "counter",
        "photo3d_credits_charged",
        "Credits captured for finished generations.",
        ("backend",),
    ),
    MetricSpec(
        "counter",
        "photo3d_webhook_deliveries",
        "Webhook delivery attempts by outcome (delivered, failed, gave_up).",
        ("outcome",),
    ),
)

SPEC_BY_NAME = {spec.name: spec for spec in SPECS}

_lock = threading.Lock()
_metrics: dict[str, Any] = {}


def ray_available() -> bool:
    """True inside a connected Ray worker or driver; never imports or starts Ray itself."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _metric(name: str) -> Any | None:
    """The Ray metric object for `name`, created on first use; None outside Ray."""
    if not ray_available():
        return None
    found = _metrics.get(name)
    if found is not None:
        return found
    with _lock:
        if name in _metrics:
            return _metrics[name]
        from ray.util import metrics as ray_metrics

        spec = SPEC_BY_NAME[name]
        created: Any
        if spec.kind == "counter":
            created = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.labels)
        elif spec.kind == "gauge":
            created = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.labels)
        else:
            created = ray_metrics.Histogram(
                spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels
            )
        _metrics[name] = created
        return created


def _tags(**labels: object) -> dict[str, str]:
    return {k: str(v) for k, v in labels.items()}


def _inc(name: str, value: float = 1.0, **labels: object) -> None:
    if value <= 0:
        return
    metric = _metric(name)
    if metric is None:
        return
    try:
        metric.inc(value, tags=_tags(**labels))
    except Exception:  # metrics must never break a request or a task
        log.debug("could not record %s", name, exc_info=True)


def _observe(name: str, value: float, **labels: object) -> None:
    metric = _metric(name)
    if metric is None:
        return
    try:
        metric.observe(max(0.0, float(value)), tags=_tags(**labels))
    except Exception:
        log.debug("could not record %s", name, exc_info=True)


def _set(name: str, value: float, **labels: object) -> None:
    metric = _metric(name)
    if metric is None:
        return
    try:
        metric.set(float(value), tags=_tags(**labels))
    except Exception:
        log.debug("could not record %s", name, exc_info=True)


# --- HTTP ---------------------------------------------------------------------------------
def http_request(route: str, method: str, status: int, seconds: float) -> None:
    """One answered HTTP request."""
    _inc("photo3d_http_requests", route=route, method=method, status=status)
    _observe("photo3d_http_request_seconds", seconds, route=route, method=method)


# --- tasks --------------------------------------------------------------------------------
def task_submitted(backend: str) -> None:
    _inc("photo3d_tasks_submitted", backend=backend)


def task_claimed(backend: str, attempt: int, queue_wait_seconds: float) -> None:
    """A worker claimed an attempt; attempts after the first are retries."""
    _inc("photo3d_task_attempts", backend=backend, kind="first" if attempt <= 1 else "retry")
    _observe("photo3d_task_queue_wait_seconds", queue_wait_seconds, backend=backend)


def task_finished(backend: str, status: str, code: str | None = None) -> None:
    """An attempt ended: succeeded | failed | retrying | lost."""
    _inc("photo3d_tasks_finished", backend=backend, status=status, code=code or "none")


def stalled_recovered(outcome: str, count: int = 1) -> None:
    """Leases recovered by the sweep: outcome is `queued` (retried) or `failed`."""
    _inc("photo3d_stalled_recovered", count, outcome=outcome)


def watchdog_kill(backend: str) -> None:
    _inc("photo3d_watchdog_kills", backend=backend)


def generation_seconds(backend: str, stage: str, seconds: float) -> None:
    _observe("photo3d_generation_seconds", seconds, backend=backend, stage=stage)


def export_seconds(backend: str, seconds: float) -> None:
    _observe("photo3d_export_seconds", seconds, backend=backend)


def preview_seconds(backend: str, seconds: float) -> None:
    _observe("photo3d_preview_seconds", seconds, backend=backend)


def artifact_bytes(backend: str, kind: str, count: int) -> None:
    _inc("photo3d_artifact_bytes", count, backend=backend, kind=kind)


# --- queue (QueueMonitor only) --------------------------------------------------------------
def queue_tasks(backend: str, status: str, count: int) -> None:
    _set("photo3d_queue_tasks", count, backend=backend, status=status)


def queue_oldest_age(backend: str, seconds: float) -> None:
    _set("photo3d_queue_oldest_queued_age_seconds", seconds, backend=backend)


def workers_live(backend: str, count: int) -> None:
    _set("photo3d_workers_live", count, backend=backend)


def deployment_replicas(deployment: str, count: int) -> None:
    _set("photo3d_deployment_replicas", count, deployment=deployment)


# --- hooks: billing (#12) and webhooks (#15) call these ---------------------------------------
def credits_charged(backend: str, credits: float) -> None:
    """Call once per captured charge (after the ledger row is committed)."""
    _inc("photo3d_credits_charged", credits, backend=backend)


def webhook_delivery(outcome: str) -> None:
    """Call once per delivery attempt: delivered | failed | gave_up."""
    _inc("photo3d_webhook_deliveries", outcome=outcome)


def report_interval_seconds() -> float:
    """How often this process hands its metrics to the node's agent (Ray's
    metrics_report_interval_ms); 10 s when it cannot be read."""
    try:
        import ray

        return float(ray._config.metrics_report_interval_ms()) / 1000.0
    except Exception:
        return 10.0
