"""A small synchronous Python client of the photo3d API (httpx).

    from serve_app.client import Client

    with Client("http://127.0.0.1:8000", api_key="p3d_…") as photo3d:
        task = photo3d.submit("mug.heic", options={"formats": ["glb", "stl"]})
        task = photo3d.wait(task["id"])            # SSE, falling back to polling
        photo3d.download(task["id"], "stl", "mug.stl")

Every API error raises an `APIError` subclass carrying the API's error `code`; 429 and 503 are
retried (up to `max_retries`) after the server's `Retry-After`. Tasks are the JSON objects the
API documents (dicts)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
Photo = str | os.PathLike[str] | bytes


# --- errors ------------------------------------------------------------------------------
class APIError(Exception):
    """An error answer of the API: HTTP `status`, machine-readable `code`, human `message`."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class InvalidRequestError(APIError):
    """400, 413, 415, 422: the request (photo, option, body) is not acceptable."""


class AuthenticationError(APIError):
    """401: no key, or not a valid one."""


class PaymentRequiredError(APIError):
    """402: not enough credits for this generation (billing is on)."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: no such task (or another account's)."""


class ConflictError(APIError):
    """409."""


class GoneError(APIError):
    """410: e.g. the result expired and was deleted."""


class RateLimitError(APIError):
    """429 after the retries: too many requests or active tasks."""


class ServiceUnavailableError(APIError):
    """503 after the retries (database down, request timeout), or the server is unreachable."""


class TaskFailedError(APIError):
    """`wait(..., raise_on_failure=True)`: the task ended failed or canceled."""

    def __init__(self, task: dict[str, Any]) -> None:
        error = task.get("error") or {}
        super().__init__(
            200,
            error.get("code") or task["status"],
            error.get("message") or f"task {task['id']} {task['status']}",
        )
        self.task = task


class WaitTimeout(Exception):
    """`wait()` gave up before the task ended; `task` is the last state seen."""

    def __init__(self, task: dict[str, Any]) -> None:
        super().__init__(f"task {task['id']} still {task['status']}")
        self.task = task


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error of an API error answer."""
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status_code}"
        message = response.text[:200] or response.reason_phrase
    cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(response.status_code, code, message, retry_after=_retry_after(response))


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event of a task's stream: `event` is task, timeline or error."""

    event: str
    data: dict[str, Any]
    id: str | None = None


# --- the client --------------------------------------------------------------------------
class Client:
    """The photo3d API. `server` defaults to $PHOTO3D_SERVER, `api_key` to $PHOTO3D_API_KEY."""

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        max_retry_wait: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = (server or os.environ.get("PHOTO3D_SERVER") or DEFAULT_SERVER).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("PHOTO3D_API_KEY")
        headers = {"User-Agent": "photo3d-client/1", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._http = httpx.Client(
            base_url=f"{self.server}/api/v1", headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing --------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send; retry 429/503 after Retry-After (and connection failures of reads)."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # A read, or a submit with its idempotency key, is safe to send again.
                if attempt >= self.max_retries or (
                    method != "GET" and not kwargs.get("headers", {}).get("Idempotency-Key")
                ):
                    raise ServiceUnavailableError(
                        0, "unreachable", f"{self.server}: {type(exc).__name__}: {exc}"
                    ) from exc
                time.sleep(min(2**attempt * 0.5, self.max_retry_wait))
                attempt += 1
                continue
            if response.status_code in (429, 503) and attempt < self.max_retries:
                wait = _retry_after(response)
                time.sleep(min(wait if wait is not None else 2**attempt, self.max_retry_wait))
                attempt += 1
                continue
            if response.is_error:
                raise error_from_response(response)
            return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, path, **kwargs).json()
        return body

    # --- tasks ---------------------------------------------------------------------------
    def submit(
        self,
        photos: Photo | list[Photo] | None = None,
        *,
        image_url: str | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **option_fields: Any,
    ) -> dict[str, Any]:
        """Queue a generation from one or more photos (paths or bytes) of one object, or from
        `image_url`. Options as a dict and/or keywords (formats=["glb", "stl"], seed=3, …).

        An idempotency key is always sent (a fresh one if you give none), so a retry after a
        lost answer returns the same task instead of queuing a second one."""
        opts = {**(options or {}), **option_fields}
        headers = {"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4()}"}
        if image_url is not None:
            if photos is not None:
                raise ValueError("give photos or image_url, not both")
            return self._json(
                "POST",
                "/generate",
                json={"image_url": image_url, "options": opts},
                headers=headers,
            )
        if photos is None:
            raise ValueError("give at least one photo (a path or bytes) or image_url")
        items = photos if isinstance(photos, list) else [photos]
        files = []
        for i, photo in enumerate(items):
            if isinstance(photo, bytes):
                files.append(("image", (f"photo-{i}", photo, "application/octet-stream")))
            else:
                path = Path(photo)
                files.append(("image", (path.name, path.read_bytes(), "application/octet-stream")))
        data = {"options": json.dumps(opts)} if opts else None
        return self._json("POST", "/generate", files=files, data=data, headers=headers)

    def get(self, task_id: str) -> dict[str, Any]:
        """The task: status, progress, queue position, timings, error, result links."""
        return self._json("GET", f"/task/{task_id}")

    def list_tasks(
        self,
        *,
        status: str | None = None,
        batch_id: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of your tasks, newest first: {"tasks": [...], "next_cursor": …}."""
        params = {"limit": limit, "status": status, "batch_id": batch_id, "cursor": cursor}
        return self._json("GET", "/tasks", params={k: v for k, v in params.items() if v})

    def iter_tasks(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every task matching the filters, following the cursors."""
        cursor = None
        while True:
            page = self.list_tasks(cursor=cursor, **filters)
            yield from page["tasks"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._json("POST", f"/task/{task_id}/cancel")

    def delete(self, task_id: str) -> None:
        self._request("DELETE", f"/task/{task_id}")

    def events(self, task_id: str, *, timeout: float | None = None) -> Iterator[ServerEvent]:
        """The task's server-sent events until it ends (`task` events carry the whole task)."""
        read_timeout = timeout if timeout is not None else 60.0
        with self._http.stream(
            "GET",
            f"/task/{task_id}/stream",
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(10.0, read=read_timeout),
        ) as response:
            if response.is_error:
                response.read()
                raise error_from_response(response)
            event, last_id = "message", None
            data: list[str] = []
            for line in response.iter_lines():
                if not line:
                    if data:
                        yield ServerEvent(event, json.loads("\n".join(data)), last_id)
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        event = value
                    elif field == "data":
                        data.append(value)
                    elif field == "id":
                        last_id = value

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll_interval: float = 1.0,
        raise_on_failure: bool = False,
    ) -> dict[str, Any]:
        """Block until the task ends and return it. Follows the SSE stream; if the stream
        breaks (proxy, network), polls instead. `on_update(task)` sees every change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        task: dict[str, Any] | None = None
        with contextlib.suppress(
            httpx.HTTPError, ValueError, RateLimitError, ServiceUnavailableError
        ):
            for event in self.events(task_id, timeout=min(timeout or 60.0, 60.0)):
                if event.event == "error":
                    err = event.data.get("error", {})
                    raise NotFoundError(404, err.get("code", "error"), err.get("message", ""))
                if event.event == "task":
                    task = event.data
                    if on_update:
                        on_update(task)
                    if task["status"] in TERMINAL:
                        break
                if deadline is not None and time.monotonic() > deadline:
                    break
        # Polling: the fallback, and the final truth (a stream may end early).
        while task is None or task["status"] not in TERMINAL:
            latest = self.get(task_id)
            if on_update and latest != task:
                on_update(latest)
            task = latest
            if task["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(task)
            time.sleep(poll_interval)
        if raise_on_failure and task["status"] != "succeeded":
            raise TaskFailedError(task)
        return task

    def download(
        self, task_id: str, format: str = "glb", dest: str | os.PathLike[str] | None = None
    ) -> bytes | Path:
        """A result file (glb, obj, stl, ply, usdz, preview, turntable): its bytes, or written
        to `dest` (returns the path). Formats not asked for at submit, and those the server has
        not converted yet just after the task succeeded, are made on demand."""
        path = (
            f"/task/{task_id}/{format}"
            if format in ("preview", "turntable")
            else (f"/task/{task_id}/result/{format}")
        )
        response = self._request("GET", path, follow_redirects=True)
        if dest is None:
            return response.content
        out = Path(dest)
        out.write_bytes(response.content)
        return out

    # --- webhooks ------------------------------------------------------------------------
    def create_webhook(
        self, url: str, events: list[str] | None = None, description: str = ""
    ) -> dict[str, Any]:
        """Register an endpoint; the answer holds its signing secret (shown only now)."""
        body: dict[str, Any] = {"url": url, "description": description}
        if events is not None:
            body["events"] = events
        return self._json("POST", "/webhooks", json=body)

    def list_webhooks(self) -> list[dict[str, Any]]:
        webhooks: list[dict[str, Any]] = self._json("GET", "/webhooks")["webhooks"]
        return webhooks

    def delete_webhook(self, webhook_id: str) -> None:
        self._request("DELETE", f"/webhooks/{webhook_id}")

    def rotate_webhook_secret(self, webhook_id: str) -> dict[str, Any]:
        return self._json("POST", f"/webhooks/{webhook_id}/rotate")

    def webhook_deliveries(self, webhook_id: str, limit: int = 50) -> list[dict[str, Any]]:
        body = self._json("GET", f"/webhooks/{webhook_id}/deliveries", params={"limit": limit})
        deliveries: list[dict[str, Any]] = body["deliveries"]
        return deliveries
