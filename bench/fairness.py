"""Tenant fairness through the real stack: how long another account waits while one account
holds eight event streams, eight uploads trickling at 1 byte/s, or eight image_url fetches
from a server that sends a byte every 0.5 s.

    .venv/bin/python bench/fairness.py [--rounds 5]
    .venv/bin/python bench/fairness.py --max-ongoing 5 --caps 8   # as before issue 10

Starts `photo3d serve` (embedded PostgreSQL, local Ray) with AUTH_REQUIRED=true, then for each
situation times `--rounds` rounds of GET /api/v1/account, GET /health and GET /api/v1/tasks as
the other account, and prints the median and the maximum per situation. `--max-ongoing 5
--caps 8` sets Ray's default of 5 ongoing requests on the ingress and lets one account hold 8
streams and 8 uploads, which reproduces the service before issue 10.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.accounts import Accounts
from serve_app.store.db import Database
from tests.e2e.test_fairness import SlowImageServer, slow_upload
from tests.support import pg
from tests.support.images import object_photo
from tests.support.stack import Stack, run_stack

GREEDY = 8
PATHS = ("/api/v1/account", "/health", "/api/v1/tasks")


TIMEOUT_S = 30.0


def other_tenant(stack: Stack, headers: dict[str, str], rounds: int) -> list[float]:
    """Latencies of the other account's requests; a request not answered in TIMEOUT_S counts
    as TIMEOUT_S and ends the series (the service is frozen for it)."""
    latencies = []
    with stack.client(timeout=TIMEOUT_S) as client:
        for _ in range(rounds):
            for path in PATHS:
                started = time.monotonic()
                try:
                    client.get(path, headers=headers)
                except httpx.TimeoutException:
                    latencies.append(TIMEOUT_S)
                    return latencies
                latencies.append(time.monotonic() - started)
    return latencies


@contextmanager
def streams(stack: Stack, headers: dict[str, str]) -> Iterator[None]:
    with stack.client() as client:
        task = client.post(
            "/api/v1/generate",
            headers=headers,
            data={"backend": "fake-hang"},
            files={"image": ("p.png", object_photo(), "image/png")},
        ).json()
    stop, opened = threading.Event(), []

    def hold() -> None:
        with (
            stack.client(timeout=120) as client,
            client.stream("GET", f"/api/v1/task/{task['id']}/stream", headers=headers) as stream,
        ):
            opened.append(stream.status_code)
            stop.wait(120)

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(GREEDY)]
    for holder in holders:
        holder.start()
    deadline = time.monotonic() + 60
    while len(opened) < GREEDY and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield
    finally:
        stop.set()
        with stack.client() as client, suppress(httpx.HTTPError):
            client.post(f"/api/v1/task/{task['id']}/cancel", headers=headers)


@contextmanager
def uploads(stack: Stack, headers: dict[str, str]) -> Iterator[None]:
    started: list[bool] = []
    with ThreadPoolExecutor(GREEDY) as pool:
        for _ in range(GREEDY):
            pool.submit(slow_upload, stack, headers, started)
        while len(started) < GREEDY:
            time.sleep(0.05)
        time.sleep(0.5)
        yield


@contextmanager
def image_urls(stack: Stack, headers: dict[str, str], server: SlowImageServer) -> Iterator[None]:
    body = {"image_url": f"http://127.0.0.1:{server.port}/photo.png"}

    def fetch() -> None:
        with stack.client(timeout=120) as client:
            client.post("/api/v1/generate", headers=headers, json=body)

    with ThreadPoolExecutor(GREEDY) as pool:
        for _ in range(GREEDY):
            pool.submit(fetch)
        time.sleep(1.0)
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-ongoing", type=int, default=None, help="override the ingress's")
    parser.add_argument("--caps", type=int, default=None, help="streams and uploads per account")
    args = parser.parse_args()
    server = SlowImageServer()
    env = {
        "AUTH_REQUIRED": "true",
        "PHOTO3D_URL_ALLOW_HOSTS": f"127.0.0.1:{server.port}",
        "PHOTO3D_TASK_TIMEOUT_SECONDS": "600",
        "PHOTO3D_RATE_LIMIT_REQUESTS": "100000",
        "PHOTO3D_RATE_LIMIT_ACCOUNT_REQUESTS": "100000",
    }
    if args.caps:
        env["PHOTO3D_MAX_STREAMS_PER_ACCOUNT"] = env["PHOTO3D_MAX_UPLOADS_PER_ACCOUNT"] = str(
            args.caps
        )
    ingress = {"max_ongoing_requests": args.max_ongoing} if args.max_ongoing else None
    # Under the project's .run (not /tmp's 0700 folders: the embedded server's user reads it).
    root = Path(__file__).resolve().parents[1] / ".run" / "bf"  # short: Ray's socket paths
    root.mkdir(parents=True, exist_ok=True)
    admin, handle = pg.admin_url(root)
    pg.make_template(admin)
    for url in pg.clone_database(admin, prefix="bench"):
        with run_stack(
            root / f"s{int(time.time()) % 10000}",
            url,
            extra_backends={"fake-hang": "tests.support.fake_backends:HangingFakeBackend"},
            env=env,
            ingress=ingress,
        ) as stack:
            measure(stack, url, server, args)
    server.close()
    del handle
    return 0


def measure(stack: Stack, url: str, server: SlowImageServer, args: argparse.Namespace) -> None:
    """Print the table: the other account's latencies in each situation."""
    db = Database(url)
    db.open(wait=True)
    headers = {}
    for name in ("greedy", "other"):
        Accounts(db).create_account(name)
        key, _ = Accounts(db).create_key(name)
        headers[name] = {"Authorization": f"Bearer {key}"}
    db.close()
    greedy = headers["greedy"]
    situations: list[tuple[str, Callable[[], Any]]] = [
        ("no load", _nothing),
        (f"{GREEDY} open event streams", lambda: streams(stack, greedy)),
        (f"{GREEDY} uploads at 1 byte/s", lambda: uploads(stack, greedy)),
        (
            f"{GREEDY} image_url fetches, 1 byte / 0.5 s",
            lambda: image_urls(stack, greedy, server),
        ),
    ]
    print(
        f"# {platform.machine()}, {platform.system()}, Python {platform.python_version()};"
        f" ingress max_ongoing_requests={args.max_ongoing or 'serve_config.yaml'},"
        f" caps={args.caps or 'defaults'}; {args.rounds} rounds of {', '.join(PATHS)}"
    )
    print("| another account's request, while one account holds | median s | max s |")
    print("|---|---|---|")
    for label, make in situations:
        with make():
            latencies = other_tenant(stack, headers["other"], args.rounds)
        print(
            f"| {label} | {statistics.median(latencies):.3f} | {max(latencies):.3f}"
            f"{' (timed out)' if max(latencies) >= TIMEOUT_S else ''} |",
            flush=True,
        )
        time.sleep(1)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    raise SystemExit(main())
