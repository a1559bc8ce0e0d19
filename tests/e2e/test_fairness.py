"""One tenant cannot freeze the service (issue 10), through the real Ray Serve stack: with eight
open event streams, eight uploads trickling at 1 byte/s, or eight image_url fetches from a
server that sends a byte every 0.5 s, all from one account, another account's requests and
/health are answered in under a second (they took 7.5-16.9 s before), and the greedy account's
extra requests are refused with 429 at its caps."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from serve_app.accounts import Accounts
from serve_app.store.db import Database
from tests.support import pg
from tests.support.images import object_photo
from tests.support.stack import Stack, run_stack

# A starved request waited 7.5-16.9 s before this fix and 0.07-0.16 s without load: one second
# is the bound the issue sets, far above the unloaded time.
BOUND_S = 1.0
GREEDY = 8
CAP = 4  # PHOTO3D_MAX_UPLOADS_PER_ACCOUNT (default)


class SlowImageServer:
    """A loopback HTTP server that answers 200 and then sends one byte every 0.5 s."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            )
            while not self.stopped.is_set():
                conn.sendall(b"\x89")
                time.sleep(0.5)

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SlowImageServer]:
    server = SlowImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(
    pg_admin: str, tmp_path_factory: pytest.TempPathFactory, slow_server: SlowImageServer
) -> Iterator[Stack]:
    for url in pg.clone_database(pg_admin, prefix="fair"):
        with run_stack(
            tmp_path_factory.mktemp("fairness"),
            url,
            extra_backends={"fake-hang": "tests.support.fake_backends:HangingFakeBackend"},
            env={
                "AUTH_REQUIRED": "true",
                "PHOTO3D_URL_ALLOW_HOSTS": f"127.0.0.1:{slow_server.port}",
                "PHOTO3D_URL_FETCH_TIMEOUT_SECONDS": "4",
                "PHOTO3D_MAX_STREAMS_PER_ACCOUNT": str(GREEDY),
                "PHOTO3D_TASK_TIMEOUT_SECONDS": "600",
            },
        ) as running:
            yield running


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, dict[str, str]]:
    db = Database(stack.database_url)
    db.open(wait=True)
    try:
        accounts, headers = Accounts(db), {}
        for name in ("greedy", "other"):
            accounts.create_account(name)
            key, _ = accounts.create_key(name)
            headers[name] = {"Authorization": f"Bearer {key}"}
        return headers
    finally:
        db.close()


def assert_other_tenant_is_served(stack: Stack, headers: dict[str, str]) -> list[float]:
    """Another account's reads and /health, each answered under BOUND_S; their latencies."""
    latencies = []
    with stack.client() as client:
        for path in ("/api/v1/account", "/health", "/api/v1/tasks") * 2:
            started = time.monotonic()
            response = client.get(path, headers=headers)
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200, (path, response.text)
    assert max(latencies) < BOUND_S, latencies
    return latencies


def wait_until(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_open_event_streams_do_not_starve_others(
    stack: Stack, keys: dict[str, dict[str, str]]
) -> None:
    greedy = keys["greedy"]
    with stack.client() as client:
        task = client.post(
            "/api/v1/generate",
            headers=greedy,
            data={"backend": "fake-hang"},
            files={"image": ("p.png", object_photo(), "image/png")},
        )
        assert task.status_code == 202, task.text
    url = f"/api/v1/task/{task.json()['id']}/stream"
    opened, stop = [], threading.Event()

    def hold_stream() -> None:
        with stack.client() as client, client.stream("GET", url, headers=greedy) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            while not next(lines).startswith("event: task"):
                pass
            opened.append(True)
            stop.wait(60)

    holders = [threading.Thread(target=hold_stream, daemon=True) for _ in range(GREEDY)]
    for holder in holders:
        holder.start()
    try:
        wait_until(lambda: len(opened) == GREEDY)
        assert_other_tenant_is_served(stack, keys["other"])
        with stack.client() as client:
            extra = client.get(url, headers=greedy)
        assert extra.status_code == 429 and extra.json()["error"]["code"] == "too_many_streams"
    finally:
        stop.set()
        for holder in holders:
            holder.join(timeout=10)


def slow_upload(stack: Stack, headers: dict[str, str], started: list[bool]) -> int:
    """POST /generate declaring 100000 bytes, sent at 1 byte/s; the status it ends with."""
    port = int(stack.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = (
            "POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {headers['Authorization']}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
        )
        # A well-formed start of a photo part, so the streaming multipart parser waits for
        # more instead of refusing the body at once; then the photo's bytes, one a second.
        part = (
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
            b"Content-Type: image/png\r\n\r\n\x89"
        )
        sock.sendall(head.encode() + part)
        started.append(True)
        sock.settimeout(1.0)
        for _ in range(60):
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(b"P")
                continue
            return int(answer.split(b" ", 2)[1]) if answer else 0
    return 0


def test_slow_uploads_do_not_starve_others(stack: Stack, keys: dict[str, dict[str, str]]) -> None:
    started: list[bool] = []
    with ThreadPoolExecutor(GREEDY) as pool:
        uploads = [pool.submit(slow_upload, stack, keys["greedy"], started) for _ in range(GREEDY)]
        wait_until(lambda: len(started) == GREEDY)
        time.sleep(0.5)  # the uploads are in the replica now, trickling
        assert_other_tenant_is_served(stack, keys["other"])
        statuses = sorted(u.result() for u in uploads)
    # Four held the account's upload slots until the minimum rate cut them off; four were 429.
    assert statuses == [408] * CAP + [429] * (GREEDY - CAP), stack.log()[-5000:]


def test_slow_image_urls_do_not_starve_others(
    stack: Stack, keys: dict[str, dict[str, str]], slow_server: SlowImageServer
) -> None:
    body = {"image_url": f"http://127.0.0.1:{slow_server.port}/photo.png"}
    before = slow_server.connections

    def fetch() -> tuple[int, str]:
        with stack.client() as client:
            response = client.post("/api/v1/generate", headers=keys["greedy"], json=body)
            return response.status_code, response.json()["error"]["code"]

    with ThreadPoolExecutor(GREEDY) as pool:
        fetches = [pool.submit(fetch) for _ in range(GREEDY)]
        wait_until(lambda: slow_server.connections - before == CAP)
        assert_other_tenant_is_served(stack, keys["other"])
        outcomes = sorted(f.result() for f in fetches)
    assert outcomes == [(422, "image_url_timeout")] * CAP + [(429, "too_many_uploads")] * (
        GREEDY - CAP
    )


def test_the_greedy_account_is_served_again_afterwards(
    stack: Stack, keys: dict[str, dict[str, str]]
) -> None:
    photo = base64.b64encode(object_photo()).decode()
    with stack.client() as client:
        response = client.post(
            "/api/v1/generate",
            headers={**keys["greedy"], "Content-Type": "application/json"},
            content=json.dumps({"image": photo}),
        )
        assert response.status_code == 202, response.text
        backends = client.get("/api/v1/backends", headers=keys["greedy"])
        assert backends.status_code == 200
        assert client.get("/api/v1/backends").status_code == 401
