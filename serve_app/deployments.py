"""Ray Serve deployments: a FastAPI ingress and one generator deployment per backend.

Both are thin shims: the ingress around `create_app(Services)`, the generator around `Worker`.
`build_app` is the app builder that serve_config.yaml names in its `import_path`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve_app.settings import get_settings

log = logging.getLogger("ray.serve")

# Set by `photo3d serve` for the one-machine cluster it starts; replicas inherit it.
REPLICA_GRPC_HOST_ENV = "PHOTO3D_REPLICA_GRPC_HOST"


def bind_replica_grpc_to(host: str | None) -> None:
    """Every Serve replica of Ray 2.60 opens a gRPC port for calls between deployments, on all
    interfaces (`[::]:0`, fixed in ray/serve/_private/replica.py), even in a local cluster
    whose other ports are on 127.0.0.1. It speaks Ray's internal protocol, unauthenticated.
    On one machine nothing outside needs it: bind it to `host` instead. Runs in each replica
    process, from the deployment's constructor: Ray starts that server after the constructor."""
    if not host:
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "photo3d_host", None) is not None:
        return  # bound already (the module imported twice)

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        port: int = original(server, address)
        return port

    add_port.photo3d_host = host  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


class AppArgs(BaseModel):
    """Typed `args:` of the application in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    backends: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """HTTP entry point: validates input, stores photos, queues tasks, serves results."""

    def __init__(
        self,
        backends: list[str],
        generators: list[DeploymentHandle] | None = None,
        monitor: DeploymentHandle | None = None,
    ):
        bind_replica_grpc_to(os.environ.get(REPLICA_GRPC_HOST_ENV))  # before Ray opens it
        from serve_app import logs
        from serve_app.errors import Photo3DError
        from serve_app.service import Services

        logs.configure(get_settings().log_format)
        self.services = Services.from_settings(get_settings(), backends=backends)
        # Don't wait for the database: while it is down the API answers 503, it doesn't crash.
        self.services.db.open(wait=False)
        self.services.downloads  # noqa: B018  (a missing URL signing key fails the deploy now)
        try:
            self.services.artifacts.check()
        except Photo3DError as exc:  # /health answers 503 naming it until it is fixed
            log.error("artifact store not usable: %s", exc.message)
        self._generators = generators or []  # bound so that Serve deploys them
        self._monitor = monitor
        if self.services.settings.billing_enabled and self.services.settings.stripe_secret_key:
            # Metered usage goes to Stripe from the outbox; several replicas share it safely.
            self.services.billing.start_meter_reporter()
        self.webhook_dispatcher = start_webhook_dispatcher(self.services)

    def __serve_build_asgi_app__(self) -> Any:
        from serve_app.api.app import create_app

        return create_app(self.services)

    def __del__(self) -> None:
        if "billing" in vars(self.services):
            self.services.billing.stop_meter_reporter()
        dispatcher = getattr(self, "webhook_dispatcher", None)
        if dispatcher is not None:
            dispatcher.stop(timeout=5)
        self.services.close()


def start_webhook_dispatcher(services: Any) -> Any:
    """The webhook delivery loop of this ingress replica (#15), unless turned off.

    It runs here, not in a deployment of its own: every installation has an ingress, replicas
    share the outbox through SKIP LOCKED (more replicas, more delivery slots), and its threads
    are its own, so neither requests nor generation wait on a slow endpoint."""
    if not services.settings.webhook_dispatcher:
        return None
    from functools import partial

    from serve_app.api.webhooks import task_payload
    from serve_app.webhooks import WebhookDispatcher

    return WebhookDispatcher(
        services.webhooks.store, services.settings, partial(task_payload, services)
    ).start()


@serve.deployment(
    name="Generator",
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
    max_ongoing_requests=4,
)
class Generator:
    """Pulls tasks for one backend from PostgreSQL and runs them (no request traffic)."""

    def __init__(self, backend: str) -> None:
        bind_replica_grpc_to(os.environ.get(REPLICA_GRPC_HOST_ENV))  # before Ray opens it
        from serve_app import logs
        from serve_app.backends import create_backend
        from serve_app.service import Services
        from serve_app.worker import Worker

        settings = get_settings()
        logs.configure(settings.log_format)
        self.services = Services.from_settings(settings)
        self.services.db.open(wait=False)
        self.backend = create_backend(backend, settings)
        self.backend.load()  # weights and warm-up once per replica
        self.worker = Worker(
            queue=self.services.queue,
            artifacts=self.services.artifacts,
            backend=self.backend,
            heartbeat_seconds=settings.heartbeat_seconds,
            poll_seconds=settings.poll_seconds,
            task_timeout_seconds=settings.task_timeout_seconds,
            retention_seconds=settings.result_retention_seconds,
            accounts=self.services.accounts,
            rate_window_seconds=settings.rate_limit_window_seconds,
            after_success_files=settings.after_success_files,
        )
        self.worker.start()
        log.info("generator %s started as worker %s", backend, self.worker.worker_id)

    def check_health(self) -> None:
        """Unhealthy (so Serve replaces the replica) when the claim loop died or the backend broke.
        A database outage is not a reason: the worker waits it out."""
        if not self.worker.alive:
            raise RuntimeError("the worker loop stopped")
        self.backend.check_health()

    def status(self) -> dict[str, Any]:
        """What this replica is doing (for debugging through a handle)."""
        return {
            "worker_id": self.worker.worker_id,
            "busy": self.worker.busy,
            "tasks_done": self.worker.tasks_done,
            "last_error": self.worker.last_error,
        }

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: finish the task in hand, claim nothing new.
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop(timeout=55)
            self.services.close()


@serve.deployment(
    name="QueueMonitor",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=10,
)
class QueueMonitor:
    """Exports the queue gauges from PostgreSQL: exactly one replica in the cluster (see
    serve_app/monitor.py for why a one-replica deployment rather than a leader election)."""

    def __init__(self, backends: list[str]) -> None:
        bind_replica_grpc_to(os.environ.get(REPLICA_GRPC_HOST_ENV))  # before Ray opens it
        from serve_app import logs
        from serve_app.monitor import QueueMonitor as Engine
        from serve_app.monitor import serve_replica_counts
        from serve_app.store.db import Database
        from serve_app.store.queue_stats import QueueStats

        settings = get_settings()
        logs.configure(settings.log_format)
        self.db = Database(str(settings.database_url), min_size=1, max_size=2)
        self.db.open(wait=False)
        self.engine = Engine(
            QueueStats(self.db),
            backends,
            alive_seconds=settings.worker_alive_seconds,
            interval_seconds=settings.queue_metrics_seconds,
            replica_counts=serve_replica_counts,
        )
        self.engine.start()

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the queue monitor loop stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
            self.db.close()


MONITOR_NAME = "QueueMonitor"


def generator_name(backend: str) -> str:
    return f"generator-{backend}"


def build_app(args: dict[str, Any]) -> Application:
    """App builder for serve_config.yaml: the ingress plus one generator per backend."""
    parsed = AppArgs.model_validate(args)
    generators = [
        Generator.options(name=generator_name(b)).bind(b)  # type: ignore[attr-defined]
        for b in parsed.backends
    ]
    monitor = QueueMonitor.bind(parsed.backends)  # type: ignore[attr-defined]
    return Ingress.bind(parsed.backends, generators, monitor)  # type: ignore[attr-defined]
