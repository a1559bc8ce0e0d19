"""Public readiness (/health) and the backends this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app import __version__
from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.api.schemas import BackendInfo, Health

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["health"])
health_router = APIRouter(tags=["health"])


@router.get(
    "/backends", response_model=list[BackendInfo], summary="Backends served here and their workers"
)
def list_backends(services: ServicesDep, account: AccountDep) -> list[BackendInfo]:
    return [
        BackendInfo(name=b.name, default=b.default, workers=b.workers)
        for b in services.backend_statuses()
    ]


@health_router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Database, artifact store and worker readiness",
)
def health(services: ServicesDep) -> JSONResponse:
    readiness = services.readiness()
    body = Health(
        status="ok" if readiness.ready else "unavailable",
        database=readiness.database,
        artifacts=readiness.artifacts,
        workers=readiness.workers,
        version=__version__,
    )
    ready = readiness.ready
    headers = {} if ready else {"Retry-After": "5"}
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=headers)
