"""Shared fixtures: a real PostgreSQL (embedded or from the environment), a database per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.settings import Settings
from tests.support import pg

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """Admin URL of the test server, with the migrated template database ready."""
    url, server = pg.admin_url(ROOT / ".run")
    pg.make_template(url)
    yield url
    if server is not None:
        # Stop it now, while pytest still captures logs: pgserver's own exit hook would log to a
        # stream pytest has closed, and print a page of "Logging error" tracebacks.
        server.cleanup()


@pytest.fixture
def database_url(pg_admin: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    yield from pg.clone_database(pg_admin)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test database and a temporary artifact folder."""
    return Settings(
        database_url=database_url,
        run_dir=tmp_path / "run",
        lease_seconds=2,
        heartbeat_seconds=0.5,
        poll_seconds=0.5,
        retry_backoff_seconds=0,
        max_attempts=3,
        worker_alive_seconds=1.5,
    )


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real S3-compatible server (SeaweedFS) on loopback for the whole session."""
    from tests.support.seaweed import run_seaweed

    with run_seaweed(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
