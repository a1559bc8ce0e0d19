"""In-process fixtures: real services on the test database, and a client of the real app.
A module overrides `services` when it needs other settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.store.db import Database
from tests.support.app import open_services


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
