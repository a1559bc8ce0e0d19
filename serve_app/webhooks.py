"""Webhooks: endpoints an account registers, and the dispatcher that delivers the outbox.

Signatures follow the Standard Webhooks spec (https://www.standardwebhooks.com): headers
`webhook-id` (the same on every retry), `webhook-timestamp` (unix seconds of the attempt) and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, space separated when a
rotated secret still signs too); secrets look like `whsec_<base64>`. The `standardwebhooks`
package verifies them (see the README).

Delivery is at-least-once: the outbox row is written with the task's final status (a trigger),
claimed with SKIP LOCKED by whichever dispatcher is free, and retried with backoff until the
retry window (a day) is over. A dispatcher runs in each ingress replica, on its own threads:
generation never waits on it, and a slow endpoint holds at most one of its bounded slots for at
most the timeout. Destinations obey the image_url rules (serve_app.fetch)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from serve_app import fetch, metrics
from serve_app.errors import Conflict, InvalidInput, NotFound, Photo3DError
from serve_app.settings import Settings
from serve_app.store.db import Row
from serve_app.store.webhooks import Message, WebhookStore

log = logging.getLogger(__name__)

EVENTS = ("task.succeeded", "task.failed", "task.canceled", "batch.completed")
_PORTS = {"http": 80, "https": 443}
USER_AGENT = "photo3d-webhooks/1"


class ForbiddenWebhookURL(InvalidInput):
    code = "forbidden_webhook_url"
    http_status = 422


# --- signing ---------------------------------------------------------------------------
def new_secret() -> str:
    """A fresh signing secret, `whsec_` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<signature>` of the Standard Webhooks scheme."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signature_header(keys: tuple[str, ...], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per secret that still signs."""
    return " ".join(sign(k, webhook_id, timestamp, body) for k in keys)


# --- destinations ------------------------------------------------------------------------
def check_destination(url: str, allow_hosts: set[str]) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to) of a webhook URL, under the image_url rules
    (serve_app.fetch): http(s) only, no credentials, and every address the host resolves to
    public unless `allow_hosts` (PHOTO3D_URL_ALLOW_HOSTS as `host:port` keys) names it."""
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidInput("url must be at most 2048 characters", code="invalid_webhook_url")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput("url contains control characters", code="invalid_webhook_url")
    parts = urlsplit(url)
    if parts.scheme not in _PORTS or not parts.hostname:
        raise InvalidInput("url must be an http:// or https:// URL", code="invalid_webhook_url")
    if parts.username or parts.password:
        raise InvalidInput("url must not contain credentials", code="invalid_webhook_url")
    try:
        port = parts.port or _PORTS[parts.scheme]
    except ValueError as exc:
        raise InvalidInput("url has an invalid port", code="invalid_webhook_url") from exc
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidInput(
            f"url host {host!r} could not be resolved", code="unreachable_webhook_url"
        ) from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise InvalidInput(f"url host {host!r} has no address", code="unreachable_webhook_url")
    allowed = fetch.allow_key(host, port) in allow_hosts
    if not allowed and not all(fetch.is_public_address(a) for a in addresses):
        raise ForbiddenWebhookURL(
            "url points to a private, loopback, link-local or reserved address; only public "
            "addresses (or host:port pairs in PHOTO3D_URL_ALLOW_HOSTS) may receive webhooks"
        )
    return parts.scheme, host, port, str(addresses[0])


# --- endpoints ---------------------------------------------------------------------------
def _endpoint_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise NotFound(f"webhook {value[:64]} not found", code="webhook_not_found") from exc


class Webhooks:
    """Register, list, delete and rotate an account's webhook endpoints; read their attempts."""

    def __init__(self, store: WebhookStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def register(
        self, account_id: str, url: str, events: list[str], description: str = ""
    ) -> tuple[Row, str]:
        """The new endpoint and its signing secret (returned this once)."""
        unknown = sorted(set(events) - set(EVENTS))
        if not events or unknown:
            raise InvalidInput(
                f"events must be a non-empty list of {', '.join(EVENTS)}"
                + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                code="invalid_webhook_events",
            )
        check_destination(url, self.settings.url_allow_host_set)
        secret = new_secret()
        row = self.store.create(
            endpoint_id=uuid.uuid4(),
            account_id=account_id,
            url=url,
            events=sorted(set(events)),
            description=description[:200],
            secret=secret,
            max_count=self.settings.webhook_max_endpoints,
        )
        if row is None:
            raise Conflict(
                f"an account may have at most {self.settings.webhook_max_endpoints} webhooks",
                code="too_many_webhooks",
            )
        return row, secret

    def list_endpoints(self, account_id: str) -> list[Row]:
        return self.store.list_endpoints(account_id)

    def get(self, account_id: str, endpoint_id: str) -> Row:
        """The endpoint, or 404 when it is not there or not this account's."""
        row = self.store.get(_endpoint_id(endpoint_id), account_id)
        if row is None:
            raise NotFound(f"webhook {endpoint_id} not found", code="webhook_not_found")
        return row

    def delete(self, account_id: str, endpoint_id: str) -> None:
        if not self.store.delete(_endpoint_id(endpoint_id), account_id):
            raise NotFound(f"webhook {endpoint_id} not found", code="webhook_not_found")

    def rotate(self, account_id: str, endpoint_id: str) -> tuple[Row, str]:
        """A new secret; the old one keeps signing for the grace period."""
        secret = new_secret()
        grace = self.settings.webhook_secret_grace_seconds
        row = self.store.rotate(_endpoint_id(endpoint_id), account_id, secret, grace)
        if row is None:
            raise NotFound(f"webhook {endpoint_id} not found", code="webhook_not_found")
        return row, secret

    def deliveries(self, account_id: str, endpoint_id: str, limit: int) -> list[Row]:
        row = self.get(account_id, endpoint_id)
        return self.store.deliveries(row["id"], limit)


# --- delivery ----------------------------------------------------------------------------
def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds before the next try after failed attempt `attempt` (1-based): x4 each time."""
    return float(min(cap, base * 4 ** max(attempt - 1, 0)))


class WebhookDispatcher:
    """Claims due outbox messages and POSTs them, on a bounded pool of its own threads.

    `render(message)` returns the event's `data` (the task as the API shows it); it is called at
    delivery time so the payload carries fresh links."""

    def __init__(
        self,
        store: WebhookStore,
        settings: Settings,
        render: Callable[[Message], dict[str, Any]],
    ) -> None:
        self.store = store
        self.settings = settings
        self.render = render
        self._slots = threading.BoundedSemaphore(settings.webhook_concurrency)
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, "photo3d-webhook")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_prune = 0.0
        self.delivered = 0
        self.last_error: str | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> WebhookDispatcher:
        self._thread = threading.Thread(target=self._loop, name="photo3d-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Claim nothing more; deliveries in flight finish (or are retried by another)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.dispatch_due()
            except Photo3DError as exc:  # database down: wait it out
                self.last_error = exc.message
                claimed = 0
            except Exception as exc:  # never let the loop die on a surprise
                log.exception("webhook dispatcher error")
                self.last_error = type(exc).__name__
                claimed = 0
            if not claimed:
                self._stop.wait(self.settings.webhook_poll_seconds)

    # --- one round -----------------------------------------------------------------------
    def dispatch_due(self, wait: bool = False) -> int:
        """Claim as many due messages as there are free slots and start delivering them;
        with wait=True, return only when they are settled. Returns how many were claimed."""
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 3600
            self.store.prune(self.settings.webhook_retention_seconds)
        free = 0
        while self._slots.acquire(blocking=False):
            free += 1
        if not free:
            # Every slot busy: wait briefly for one, without claiming (nothing is leased idle).
            if self._slots.acquire(timeout=self.settings.webhook_poll_seconds):
                self._slots.release()
            return 0
        try:
            lease = self.settings.webhook_timeout_seconds * 2 + 30
            messages = self.store.claim(free, lease, self.settings.webhook_endpoint_concurrency)
        except BaseException:
            for _ in range(free):
                self._slots.release()
            raise
        for _ in range(free - len(messages)):
            self._slots.release()
        futures = [self._pool.submit(self._deliver_and_release, m) for m in messages]
        if wait:
            for future in futures:
                future.result()
        return len(messages)

    def _deliver_and_release(self, message: Message) -> None:
        try:
            self.deliver(message)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", message.webhook_id)
        finally:
            self._slots.release()

    def deliver(self, message: Message) -> bool:
        """One attempt at one message; records it and settles or reschedules the message."""
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            data = self.render(message)
        except Photo3DError as exc:  # e.g. the database blinked: retried like a failed POST
            data = None
            error = f"could not build the payload: {exc.message}"
        except Exception as exc:  # a bug must not strand the message: log it, retry later
            log.exception("webhook %s: building the payload failed", message.webhook_id)
            data = None
            error = f"could not build the payload ({type(exc).__name__})"
        if data is not None:
            body = json.dumps(
                {
                    "type": message.event,
                    "timestamp": dt.datetime.now(dt.UTC).isoformat(),
                    "data": data,
                },
                default=str,
                separators=(",", ":"),
            ).encode()
            status, error = self._post(message, body)
        delivered = status is not None and 200 <= status < 300
        settings = self.settings
        try:
            outcome = self.store.record_attempt(
                message,
                delivered=delivered,
                status_code=status,
                error=error,
                duration_ms=int((time.monotonic() - started) * 1000),
                retry_in=retry_delay(
                    message.attempt,
                    settings.webhook_retry_base_seconds,
                    settings.webhook_retry_max_seconds,
                ),
                window_seconds=settings.webhook_retry_window_seconds,
            )
            if outcome is not None:
                metrics.webhook_delivery(outcome)
        except Photo3DError as exc:  # the lease runs out and another dispatcher retries
            self.last_error = exc.message
        if delivered:
            self.delivered += 1
        else:
            log.info(
                "webhook %s to endpoint %s: attempt %d failed (%s)",
                message.webhook_id,
                message.endpoint_id,
                message.attempt,
                error or f"HTTP {status}",
            )
        return delivered

    def _post(self, message: Message, body: bytes) -> tuple[int | None, str | None]:
        """POST the body to the endpoint: (status code or None, error or None)."""
        settings = self.settings
        try:
            scheme, host, port, address = check_destination(
                message.url, settings.url_allow_host_set
            )
        except InvalidInput as exc:
            return None, exc.message
        parts = urlsplit(message.url)
        ip_host = f"[{address}]" if ":" in address else address
        # Connect to the address just checked (a DNS answer cannot change in between).
        direct = urlunsplit((scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
        timestamp = int(time.time())
        headers = {
            "Host": parts.netloc.rsplit("@", 1)[-1],
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": message.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                message.secrets, message.webhook_id, timestamp, body
            ),
        }
        deadline = time.monotonic() + settings.webhook_timeout_seconds
        try:
            with httpx.Client(
                timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
            ) as client:
                request = client.build_request(
                    "POST", direct, content=body, headers=headers, extensions={"sni_hostname": host}
                )
                response = client.send(request, stream=True)
                try:
                    # Read (and forget) at most the cap: a huge or endless answer ends here.
                    read = 0
                    for chunk in response.iter_bytes():
                        read += len(chunk)
                        if read > settings.webhook_max_response_bytes:
                            break
                        if time.monotonic() > deadline:
                            return response.status_code, "the response took too long"
                finally:
                    response.close()
                return response.status_code, None
        except httpx.TimeoutException:
            return None, f"no answer within {settings.webhook_timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            return None, f"could not connect ({type(exc).__name__})"
