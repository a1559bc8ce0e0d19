"""Tenant fairness at the HTTP edge: request bodies with a deadline and a minimum rate, control
characters refused in paths and queries, and per-account caps on what holds a connection open
(event streams, uploads) in this replica.

Ray Serve gives each ingress replica `max_ongoing_requests` slots (serve_config.yaml); a slot is
held for as long as a request runs, a live stream's whole life included. These limits keep one
tenant from holding enough of them to make everyone else queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from serve_app.accounts import RateLimited

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a C0 control character (NUL included) or DEL. PostgreSQL refuses
    NUL in text, and no name, id or filter of this API needs any of them."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


class EdgeGuard:
    """Pure ASGI middleware (so that errors raised while reading the body reach the app's error
    handlers as they are): refuses control characters in the path and the query (400); reads
    every request body under a deadline for the whole body and, after a grace period, a
    minimum rate (408 for a client that trickles); answers 503 when the response headers are
    not ready within `request_timeout` (a stream's body may then run on)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        request_timeout: float,
        body_timeout: float,
        min_rate: int,
        grace: float,
    ) -> None:
        self.app = app
        self.request_timeout = request_timeout
        self.body_timeout = body_timeout
        self.min_rate = min_rate
        self.grace = grace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        if has_control_characters(scope.get("path", "")) or has_control_characters(
            urllib.parse.unquote_plus(query)
        ):
            await _error(400, "invalid_characters", "the path or query has control characters")(
                scope, receive, send
            )
            return
        started = asyncio.Event()

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        app = asyncio.ensure_future(self.app(scope, self._timed(receive), watched_send))
        headers = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({app, headers}, timeout=self.request_timeout)
            if not started.is_set() and not app.done():
                app.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app
                log.warning(
                    "%s %s timed out after %.0fs",
                    scope.get("method"),
                    scope.get("path"),
                    self.request_timeout,
                )
                response = _error(
                    503,
                    "request_timeout",
                    f"the request took longer than {self.request_timeout:.0f} s; retry",
                )
                response.headers["Retry-After"] = "5"
                await response(scope, receive, send)
                return
            await app
        finally:
            headers.cancel()
            if not app.done():
                app.cancel()

    def _timed(self, receive: Receive) -> Receive:
        start = time.monotonic()
        received = 0
        done = False

        async def timed_receive() -> Message:
            nonlocal received, done
            if done:  # the body is read: what remains is waiting for a disconnect
                return await receive()
            now = time.monotonic()
            # The next byte must arrive before the whole-body deadline and before the rate
            # falls under the minimum (counted after the grace period).
            by = start + self.body_timeout
            if self.min_rate > 0:
                by = min(by, start + self.grace + (received + 1) / self.min_rate)
            try:
                async with asyncio.timeout(max(0.0, by - now)):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body did not arrive in time (whole body within "
                    f"{self.body_timeout:g} s, at least {self.min_rate} bytes/s)",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            return message

        return timed_receive


class InFlight:
    """Per-account counts of long-held requests in this replica (streams, uploads)."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        self.counts: Counter[str] = Counter()

    def acquire(self, account: str) -> Callable[[], None]:
        """Take a slot for `account` (RateLimited when it holds `limit`); returns the release."""
        if self.counts[account] >= self.limit:
            raise RateLimited(
                f"{self.counts[account]} {self.what} are already open for this account; "
                f"the limit is {self.limit}",
                code=f"too_many_{self.what.replace(' ', '_')}",
                retry_after=5,
            )
        self.counts[account] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.counts[account] -= 1
                if self.counts[account] <= 0:
                    del self.counts[account]

        return release

    @contextlib.contextmanager
    def slot(self, account: str) -> Iterator[None]:
        release = self.acquire(account)
        try:
            yield
        finally:
            release()


class HeldStream(StreamingResponse):
    """A streaming response that gives its slot back however the stream ends, even when the
    client leaves before the first byte (the body generator then never starts)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[arg-type]
        finally:
            self._release()


class AddressThrottle:
    """Failed authentications per client address in fixed windows, in this replica's memory: an
    address past its budget is answered 429 before any key lookup touches the database."""

    def __init__(self, limit: int, window_seconds: int) -> None:
        self.limit = limit
        self.window = window_seconds
        self.failures: dict[str, tuple[int, int]] = {}  # address -> (window number, failures)

    def _window(self) -> int:
        return int(time.time() // self.window)

    def check(self, address: str) -> None:
        """RateLimited when `address` failed `limit` times in the current window."""
        window, failures = self.failures.get(address, (0, 0))
        now = self._window()
        if window == now and failures >= self.limit:
            retry = max(1, int((now + 1) * self.window - time.time() + 0.999))
            raise RateLimited(
                f"too many failed authentications from this address; retry in {retry} s",
                code="too_many_auth_failures",
                retry_after=retry,
            )

    def record_failure(self, address: str) -> None:
        now = self._window()
        window, failures = self.failures.get(address, (now, 0))
        self.failures[address] = (now, failures + 1 if window == now else 1)
        if len(self.failures) > 100_000:  # bounded memory: forget past windows
            self.failures = {a: v for a, v in self.failures.items() if v[0] == now}
