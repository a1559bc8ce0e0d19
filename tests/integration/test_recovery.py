"""A worker killed after writing part of its files: when its task is recovered, the stalled
attempt's files are removed and only the new attempt's remain. Also: migrations started by
several processes at once apply each migration exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

from serve_app.backends import create_backend
from serve_app.housekeeping import Housekeeping
from serve_app.settings import Settings
from serve_app.store.migrate import migrate, migrations
from serve_app.worker import Worker
from tests.support import pg
from tests.support.app import open_services
from tests.support.images import object_photo

ROOT = Path(__file__).resolve().parents[2]

# A real worker in its own process whose artifact store writes half of the first file and then
# hangs: the test SIGKILLs it there, after a partial write, as a crash would.
PARTIAL_WRITER = """
import time
from serve_app.backends import create_backend
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.worker import Worker

settings = Settings()
services = Services.from_settings(settings)
services.db.open(wait=True)
store_put = services.artifacts.put

def put(key, data):
    store_put(key, data[: max(1, len(data) // 2)])
    time.sleep(3600)

services.artifacts.put = put
backend = create_backend("cpu", settings)
backend.load()
Worker(
    queue=services.queue,
    artifacts=services.artifacts,
    backend=backend,
    heartbeat_seconds=settings.heartbeat_seconds,
    poll_seconds=settings.poll_seconds,
    task_timeout_seconds=600,
).run_once()
"""


def test_stalled_attempts_partial_files_are_removed_on_recovery(settings: Settings) -> None:
    with open_services(settings) as services:
        row, _ = services.submit("local", [object_photo()], {})
        task_dir = settings.artifacts_path / "tasks" / str(row["id"])
        env = {
            **os.environ,
            "DATABASE_URL": str(settings.database_url),
            "PHOTO3D_RUN_DIR": str(settings.run_dir),
            "PHOTO3D_LEASE_SECONDS": str(settings.lease_seconds),
            "PHOTO3D_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "PYTHONPATH": str(ROOT),
        }
        child = subprocess.Popen([sys.executable, "-c", PARTIAL_WRITER], env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while not (task_dir / "attempt-1").exists() or not any(
                (task_dir / "attempt-1").rglob("*.*")
            ):
                assert child.poll() is None, "the worker exited before writing"
                assert time.monotonic() < deadline, "the worker never wrote a file"
                time.sleep(0.1)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        assert [p.name for p in task_dir.iterdir()] == ["attempt-1"]  # the partial write

        backend = create_backend("cpu", settings)
        backend.load()
        worker = Worker(
            queue=services.queue,
            artifacts=services.artifacts,
            backend=backend,
            heartbeat_seconds=settings.heartbeat_seconds,
            poll_seconds=settings.poll_seconds,
            task_timeout_seconds=600,
        )
        housekeeping = Housekeeping(queue=services.queue, artifacts=services.artifacts)
        deadline = time.monotonic() + 30
        while not housekeeping.recover_stalled():  # the lease runs out, then it is recovered
            assert time.monotonic() < deadline, "the stalled task was never recovered"
            time.sleep(0.2)
        assert [p.name for p in task_dir.iterdir()] == []  # the partial files went with it
        assert worker.run_once()
        task = services.get_task("local", str(row["id"]))
        assert task["status"] == "succeeded" and task["attempt"] == 2
        assert sorted(p.name for p in task_dir.iterdir()) == ["attempt-2"]


def test_concurrent_migrations_apply_each_migration_once(pg_admin: str) -> None:
    name = f"migr_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pg.with_database(pg_admin, name)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: migrate(url), range(4)))
        everything = [version for version, _, _ in migrations()]
        assert sorted(v for applied in results for v in applied) == everything
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == everything
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
