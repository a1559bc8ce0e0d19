"""The client's retry rules against a real HTTP server on loopback that answers 429/503 first:
Retry-After is honoured, the same Idempotency-Key is sent again, and errors carry the API code."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.client import Client, RateLimitError, ServiceUnavailableError


@contextlib.contextmanager
def scripted_server(answers: list[tuple[int, dict[str, str], dict]]) -> Iterator[tuple[str, list]]:
    """Answers requests with `answers` in order (the last repeats); records (method, path,
    headers) of each request."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            if length:
                self.rfile.read(length)
            seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            status, headers, body = answers[min(len(seen) - 1, len(answers) - 1)]
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def error(code: str) -> dict:
    return {"error": {"code": code, "message": code.replace("_", " ")}}


TASK = {"id": "t1", "status": "queued"}


def test_429_and_503_are_retried_after_retry_after_with_the_same_idempotency_key() -> None:
    answers = [
        (429, {"Retry-After": "0"}, error("rate_limited")),
        (503, {"Retry-After": "0"}, error("service_unavailable")),
        (202, {}, TASK),
    ]
    with scripted_server(answers) as (url, seen), Client(url, "p3d_k") as client:
        assert client.submit(b"photo bytes", seed=1) == TASK
    assert [s[1] for s in seen] == ["/api/v1/generate"] * 3
    keys = {s[2]["idempotency-key"] for s in seen}
    assert len(keys) == 1 and keys.pop().startswith("client-")
    assert all(s[2]["authorization"] == "Bearer p3d_k" for s in seen)


def test_after_the_retries_the_typed_error_carries_the_code() -> None:
    answers = [(429, {"Retry-After": "0"}, error("too_many_active_tasks"))]
    with (
        scripted_server(answers) as (url, seen),
        Client(url, max_retries=2) as client,
        pytest.raises(RateLimitError) as raised,
    ):
        client.get("t1")
    assert raised.value.code == "too_many_active_tasks" and raised.value.status == 429
    assert raised.value.retry_after == 0 and len(seen) == 3


def test_a_non_json_error_still_raises_a_typed_error() -> None:
    with (
        scripted_server([(503, {"Retry-After": "0"}, {})]) as (url, _),
        Client(url, max_retries=0) as client,
        pytest.raises(ServiceUnavailableError) as raised,
    ):
        client.get("t1")
    assert raised.value.status == 503 and raised.value.code == "http_503"
