"""The FastAPI application: routes, the one exception-to-response mapping, the web page."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.accounts import RateLimited, Unauthorized
from serve_app.api import (
    accounts,
    batches,
    billing,
    downloads,
    files,
    health,
    observability,
    openapi,
    tasks,
    web,
    webhooks,
)
from serve_app.errors import Photo3DError, ServiceUnavailable
from serve_app.service import Services

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    402: "payment_required",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The API's error shape: {"error": {"code", "message"}}."""
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def static_dir() -> Path:
    return Path(str(resources.files("serve_app").joinpath("static")))


def create_app(services: Services) -> FastAPI:
    """The ingress app, bound to one process's services."""
    app = FastAPI(
        title="photo3d",
        version=__version__,
        description="Photo in, textured 3D model out. Errors are "
        '`{"error": {"code": "...", "message": "..."}}`.',
    )
    app.state.services = services
    app.include_router(health.health_router)
    for module in (tasks, files, downloads, health, accounts, batches, billing, webhooks, web):
        app.include_router(module.router)
    app.webhooks.include_router(webhooks.events_router)
    openapi.install(app)

    @app.exception_handler(Photo3DError)
    async def _domain_error(request: Request, exc: Photo3DError) -> JSONResponse:
        headers: dict[str, str] | None = None
        if isinstance(exc, ServiceUnavailable):
            headers = {"Retry-After": "5"}
        elif isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after)}
        elif isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        if exc.http_status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.message)
        return error_response(exc.http_status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(422, "invalid_request", f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never leak a traceback to the client; the log has it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "an unexpected error occurred")

    timeout = services.settings.request_timeout_seconds

    @app.middleware("http")
    async def _time_limit(request: Request, call_next: Any) -> Any:
        # Bounds the time to the response headers; a stream's body may then run on.
        try:
            return await asyncio.wait_for(call_next(request), timeout)
        except TimeoutError:
            log.warning("%s %s timed out after %.0fs", request.method, request.url.path, timeout)
            return error_response(
                503,
                "request_timeout",
                f"the request took longer than {timeout:.0f} s; retry",
                {"Retry-After": "5"},
            )

    @app.middleware("http")
    async def _rate_limit_headers(request: Request, call_next: Any) -> Any:
        # Authenticated callers see their budget on every answer (including the 429).
        response = await call_next(request)
        window = getattr(request.state, "rate_window", None)
        if window is not None:
            response.headers["RateLimit-Limit"] = str(window.limit)
            response.headers["RateLimit-Remaining"] = str(window.remaining)
            response.headers["RateLimit-Reset"] = str(window.reset_seconds)
        return response

    origins = services.settings.cors_origin_list
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=[
                "Location",
                "Retry-After",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
            ],
            max_age=600,
        )

    # --- observability (#13): request metrics and request ids; added last = outermost --------
    observability.observe(app)

    page = static_dir()
    if (page / "index.html").is_file():
        app.mount("/", StaticFiles(directory=page, html=True), name="web")
    return app
