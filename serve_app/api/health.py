"""Public readiness (/health) and the backends this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app import __version__
from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.api.schemas import BackendInfo, Health
from serve_app.backends import available_backends
from serve_app.errors import Photo3DError

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["health"])
health_router = APIRouter(tags=["health"])


@router.get(
    "/backends", response_model=list[BackendInfo], summary="Backends served here and their workers"
)
def list_backends(services: ServicesDep, account: AccountDep) -> list[BackendInfo]:
    workers = services.queue.live_workers(services.settings.worker_alive_seconds)
    return [
        BackendInfo(
            name=name,
            default=name == services.settings.default_backend,
            workers=workers.get(name, 0),
        )
        for name in sorted(services.backends or available_backends(services.settings))
    ]


@health_router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Database and worker readiness",
)
def health(services: ServicesDep) -> JSONResponse:
    settings = services.settings
    database, workers = "ok", {}
    try:
        services.db.ping()
        workers = services.queue.live_workers(settings.worker_alive_seconds)
    except Photo3DError:
        database = "unavailable"
    ready = database == "ok" and (
        not settings.health_requires_worker or workers.get(settings.default_backend, 0) > 0
    )
    body = Health(
        status="ok" if ready else "unavailable",
        database=database,
        workers=workers,
        version=__version__,
    )
    headers = {} if ready else {"Retry-After": "5"}
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=headers)
