"""HTTP middleware: request metrics by route template, and the request id every log line of the
request carries (X-Request-ID accepted from the client, or generated, and echoed back)."""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import logs, metrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept only when it is short and plain, so it cannot forge log structure.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def route_label(scope: Scope) -> str:
    """The matched route's template (`/api/v1/task/{task_id}`), never the raw path: a label
    with one value per task id would grow without bound."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path or "/"  # the static web page is mounted at the root
    return "unmatched"


def behind_serve_proxy() -> bool:
    """True in a Serve replica: Serve's proxy then accepts or generates X-Request-ID itself and
    echoes it on the response (ray/serve/_private/http_util.py RequestIdMiddleware)."""
    context = sys.modules.get("ray.serve.context")
    return context is not None and context._get_internal_replica_context() is not None


class RequestObservability:
    """Pure ASGI middleware (no BaseHTTPMiddleware: streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.proxy_echoes = behind_serve_proxy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = MutableHeaders(scope=scope)
        given = headers.get(REQUEST_ID_HEADER)
        request_id = given if given and REQUEST_ID_PATTERN.fullmatch(given) else None
        if request_id is None:
            request_id = uuid.uuid4().hex
            if given is not None:
                del headers[REQUEST_ID_HEADER]
            headers[REQUEST_ID_HEADER] = request_id
        # Behind Serve's proxy the header always arrives (the client's or the proxy's id) and
        # the proxy echoes it; the app adds its own only elsewhere, or when it replaced an unfit
        # one (the client then also gets its own back from the proxy).
        echo = not self.proxy_echoes or given != request_id
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if echo:
                    MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        with logs.context(request_id=request_id):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - started
                method = str(scope.get("method", "GET"))
                metrics.http_request(route_label(scope), method, status, elapsed)
                if status >= 500:
                    log.warning("%s %s answered %s", method, route_label(scope), status)


def observe(app: Any) -> None:
    """Install the middleware outermost, so its timing and status cover every other layer."""
    app.add_middleware(RequestObservability)
