"""The FastAPI application: routes, the one exception-to-response mapping, the web page."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
from serve_app.api.limits import AddressThrottle, EdgeGuard, InFlight
from serve_app.errors import Photo3DError, ServiceUnavailable
from serve_app.service import Services

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    402: "payment_required",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
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


class RateLimitHeaders:
    """RateLimit-Limit/Remaining/Reset on every answer to an authenticated caller (the 429
    included), from the budget the auth dependency leaves in the request state (#15). Pure ASGI,
    so streamed bodies pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_budget(message: Message) -> None:
            if message["type"] == "http.response.start":
                window = scope.get("state", {}).get("rate_window")
                if window is not None:
                    headers = MutableHeaders(scope=message)
                    headers["RateLimit-Limit"] = str(window.limit)
                    headers["RateLimit-Remaining"] = str(window.remaining)
                    headers["RateLimit-Reset"] = str(window.reset_seconds)
            await send(message)

        await self.app(scope, receive, send_with_budget)


def static_dir() -> Path:
    return Path(str(resources.files("serve_app").joinpath("static")))


def create_app(services: Services) -> FastAPI:
    """The ingress app, bound to one process's services."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await services.db.aclose()  # the event loop's pool (the sync pool is the owner's)

    app = FastAPI(
        lifespan=lifespan,
        title="photo3d",
        version=__version__,
        description="Photo in, textured 3D model out. Errors are "
        '`{"error": {"code": "...", "message": "..."}}`.',
    )
    app.state.services = services
    # Tenant fairness (issue 10): per-account caps on long-held requests in this replica.
    settings = services.settings
    app.state.streams = InFlight("streams", settings.max_streams_per_account)
    app.state.uploads = InFlight("uploads", settings.max_uploads_per_account)
    app.state.auth_failures = AddressThrottle(
        settings.auth_failures_per_address, settings.rate_limit_window_seconds
    )
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

    app.add_middleware(RateLimitHeaders)

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

    # Refuses control characters before routing, bounds every request body and the
    # time to the response headers (a stream's body may then run on).
    app.add_middleware(
        EdgeGuard,
        request_timeout=settings.request_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        min_rate=settings.body_min_rate_bytes_per_s,
        grace=settings.body_grace_seconds,
    )

    # --- observability (#13): request metrics and request ids; added last = outermost --------
    observability.observe(app)

    page = static_dir()
    if (page / "index.html").is_file():
        app.mount("/", StaticFiles(directory=page, html=True), name="web")
    return app
