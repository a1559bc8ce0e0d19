"""Event streams served from the replica's one task-change listener (issue 10): a change wakes
the stream through LISTEN/NOTIFY (nothing polls), streams share one LISTEN connection, and
`Last-Event-ID` resumes a stream after the last event seen."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from serve_app.accounts import LOCAL_ACCOUNT
from serve_app.service import Services
from serve_app.store.changes import Subscription
from tests.integration.test_api_worker import make_worker, submit


def parse_events(text: str) -> list[dict]:
    """The SSE messages of a body: [{"id", "event", "data"}]."""
    messages = []
    for block in text.split("\n\n"):
        message: dict = {}
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            if field in ("id", "event", "data"):
                message[field] = value
        if "event" in message:
            messages.append(message)
    return messages


def listen_connections(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query ILIKE 'LISTEN photo3d_task%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_streams_are_woken_by_notify_through_one_listen_connection(
    client: TestClient, services: Services
) -> None:
    tasks = [submit(client)["id"] for _ in range(3)]
    bodies: dict[str, str] = {}

    def read(task_id: str) -> None:
        bodies[task_id] = client.get(f"/api/v1/task/{task_id}/stream").text

    readers = [threading.Thread(target=read, args=(t,)) for t in tasks]
    for reader in readers:
        reader.start()
    wait_for(
        lambda: services.task_changes.subscriber_count == 3 and services.task_changes.listening
    )
    assert listen_connections(str(services.settings.database_url)) == 1
    for task_id in tasks:  # a change made straight in the database, as a worker would
        client.post(f"/api/v1/task/{task_id}/cancel")
    for reader in readers:
        reader.join(timeout=20)
        assert not reader.is_alive()
    for task_id in tasks:
        statuses = [
            json.loads(m["data"])["status"]
            for m in parse_events(bodies[task_id])
            if m["event"] == "task"
        ]
        assert statuses == ["queued", "canceled"]
    assert services.task_changes.subscriber_count == 0


def test_a_task_that_ends_before_the_stream_subscribes_still_ends_the_stream(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A photo refused in milliseconds: the task ends after the stream first read it, and its
    last notification is handed out before the stream subscribes. The stream must still send
    the ended task and close, not wait for a change that will never come."""
    from starlette.concurrency import run_in_threadpool

    task = submit(client)
    changes = services.task_changes
    subscribe = changes.subscribe

    @contextlib.asynccontextmanager
    async def late_subscribe(task_id: str) -> AsyncIterator[Subscription]:
        async with subscribe(task_id) as probe:  # sees the notification the stream misses
            await run_in_threadpool(services.cancel_task, LOCAL_ACCOUNT, task_id)
            assert await probe.wait(20), "the cancel was never notified"
        async with subscribe(task_id) as subscription:
            yield subscription

    monkeypatch.setattr(changes, "subscribe", late_subscribe)
    bodies: list[str] = []
    reader = threading.Thread(
        target=lambda: bodies.append(client.get(f"/api/v1/task/{task['id']}/stream").text)
    )
    reader.start()
    reader.join(timeout=30)
    hung = reader.is_alive()
    if hung:  # wake it, so that the test fails instead of hanging
        client.portal.call(changes._wake)  # type: ignore[union-attr]
        reader.join(timeout=20)
    assert not hung, "the stream waited for a change after the task had ended"
    statuses = [
        json.loads(m["data"])["status"] for m in parse_events(bodies[0]) if m["event"] == "task"
    ]
    assert statuses == ["canceled"]


def test_last_event_id_resumes_a_stream(client: TestClient, services: Services) -> None:
    task = submit(client)
    assert make_worker(services).run_once()
    whole = parse_events(client.get(f"/api/v1/task/{task['id']}/stream").text)
    timeline = [m for m in whole if m["event"] == "timeline"]
    ids = [int(m["id"]) for m in timeline]
    assert len(ids) >= 3 and ids == sorted(ids)
    resumed = parse_events(
        client.get(f"/api/v1/task/{task['id']}/stream", headers={"Last-Event-ID": str(ids[1])}).text
    )
    assert [int(m["id"]) for m in resumed if m["event"] == "timeline"] == ids[2:]
    assert json.loads(resumed[-1]["data"])["status"] == "succeeded"


def test_streams_per_account_are_capped(services: Services) -> None:
    """Checked on a real server socket: TestClient cannot hold a stream open."""
    import uvicorn

    from serve_app.api.app import create_app

    app = create_app(services)
    app.state.streams.limit = 2
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            task_id = http.post(
                "/api/v1/generate", files={"image": ("p.png", _photo(), "image/png")}
            ).json()["id"]
            url = f"/api/v1/task/{task_id}/stream"
            with http.stream("GET", url) as first, http.stream("GET", url) as second:
                assert first.status_code == second.status_code == 200
                third = http.get(url)
                assert third.status_code == 429
                assert third.json()["error"]["code"] == "too_many_streams"
            # Closed streams give their places back.
            wait_for(lambda: not app.state.streams.counts)
            with http.stream("GET", url) as again:
                assert again.status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _photo() -> bytes:
    from tests.support.images import object_photo

    return object_photo()
