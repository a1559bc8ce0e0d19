"""The API app bound to real services, for in-process tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.service import Services
from serve_app.settings import Settings


@contextlib.contextmanager
def open_services(settings: Settings) -> Iterator[Services]:
    """Services with an open database pool, closed afterwards."""
    services = Services.from_settings(settings)
    services.db.open(wait=True)
    try:
        yield services
    finally:
        services.db.close()


@contextlib.contextmanager
def app_client(settings: Settings) -> Iterator[tuple[Services, TestClient]]:
    """Open services and a client of the real app on them."""
    with open_services(settings) as services, TestClient(create_app(services)) as client:
        yield services, client
