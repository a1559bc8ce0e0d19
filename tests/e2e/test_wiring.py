"""Behaviours of the real wiring (issue 10): with polling set to 60 s a queued task is still
claimed within a second (NOTIFY wakes the generator); two ingress replicas serve the same
tasks and their streams, with one LISTEN connection each, not one per client; the retention
configured for the service deletes results through the generator's own wiring."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.support import pg
from tests.support.images import object_photo
from tests.support.stack import Stack, run_stack

RETENTION_S = 4


@pytest.fixture(scope="module")
def stack(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for url in pg.clone_database(pg_admin, prefix="wiring"):
        with run_stack(
            tmp_path_factory.mktemp("wiring"),
            url,
            ingress={"num_replicas": 2},
            env={
                "PHOTO3D_POLL_SECONDS": "60",
                "PHOTO3D_RESULT_RETENTION_SECONDS": str(RETENTION_S),
            },
        ) as running:
            yield running


def submit(stack: Stack, seed: int = 0) -> str:
    with stack.client() as client:
        response = client.post(
            "/api/v1/generate",
            data={"seed": str(seed)},
            files={"image": ("p.png", object_photo(seed=seed), "image/png")},
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_notify_wakes_an_idle_generator_within_a_second(stack: Stack) -> None:
    with stack.client() as client:
        stack.wait_for_task(client, submit(stack, 1))  # the generator is up and idle again
        time.sleep(2)
        task_id = submit(stack, 2)
        stack.wait_for_task(client, task_id)
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) FROM tasks WHERE id = %s",
            (task_id,),
        ).fetchone()
    assert row is not None
    # Polling alone would take up to 60 s here.
    assert float(row[0]) < 1.0, f"claimed {float(row[0]):.2f} s after it was queued"


def listen_connections(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query ILIKE 'LISTEN photo3d_task%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_two_ingress_replicas_share_tasks_and_streams(stack: Stack) -> None:
    assert len(stack.processes("ServeReplica:photo3d:Ingress")) == 2
    # Direct ingress serves one replica per machine: with two, Ray's proxy spreads the requests.
    assert "HTTP goes through Ray's proxy" in stack.log_path.read_text(errors="replace")
    ids = [submit(stack, 10 + i) for i in range(3)]
    finals: dict[str, str] = {}

    def follow(task_id: str) -> None:
        with (
            stack.client() as client,
            client.stream("GET", f"/api/v1/task/{task_id}/stream") as stream,
        ):
            for line in stream.iter_lines():
                if line.startswith("data: ") and '"status":"succeeded"' in line:
                    finals[task_id] = "succeeded"

    followers = [threading.Thread(target=follow, args=(t,)) for t in ids * 3]
    for follower in followers:
        follower.start()
    for follower in followers:
        follower.join(timeout=180)
        assert not follower.is_alive()
    assert finals == dict.fromkeys(ids, "succeeded")
    # Nine streams, at most one LISTEN connection per replica (they stay open for the next).
    assert 1 <= listen_connections(stack.database_url) <= 2
    with stack.client() as client:
        for task_id in ids:  # every replica reads every task: PostgreSQL holds the state
            for _ in range(4):
                assert client.get(f"/api/v1/task/{task_id}").json()["status"] == "succeeded"


def test_results_expire_after_the_configured_retention(stack: Stack) -> None:
    task_id = submit(stack, 20)
    with stack.client() as client:
        stack.wait_for_task(client, task_id)
        assert client.get(f"/api/v1/task/{task_id}/result/glb").status_code == 200
        files = stack.run_dir / "artifacts" / "tasks" / task_id
        assert files.exists()
        time.sleep(RETENTION_S + 1)
        # The generator's housekeeping runs when it wakes; a new task wakes it.
        stack.wait_for_task(client, submit(stack, 21))
        deadline = time.monotonic() + 60
        while client.get(f"/api/v1/task/{task_id}/result/glb").status_code != 410:
            assert time.monotonic() < deadline, "the result never expired"
            time.sleep(0.5)
        gone = client.get(f"/api/v1/task/{task_id}/result/glb")
        assert gone.json()["error"]["code"] == "result_expired"
        assert not files.exists()
