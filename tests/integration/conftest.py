"""In-process fixtures: real services on the test database, and a client of the real app.
A module overrides `services` when it needs other settings."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.store.db import Database
from tests.support import pg
from tests.support.app import open_services

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    with open_services(settings) as opened:
        yield opened


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    # Server exceptions become responses, as a real client sees them (a 500 fails the test).
    with TestClient(create_app(services), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """An open pool on the test database, for tests of the store itself."""
    database = Database(database_url, max_size=12)
    database.open(wait=True)
    yield database
    database.close()


@pytest.fixture
def embedded_run_dir() -> Iterator[Path]:
    """A run folder for a test's own embedded PostgreSQL (`<run dir>/pgdata`, as `make run` has
    it); the server is stopped if the test left it running, and the folder deleted."""
    run_dir = pg.server_folder(ROOT / ".run", "embedded-run-")
    yield run_dir
    if (run_dir / "pgdata" / "postmaster.pid").exists():
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=run_dir / "pgdata", user="pgserver")
    shutil.rmtree(run_dir, ignore_errors=True)
