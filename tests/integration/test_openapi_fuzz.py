"""Property-based testing of the OpenAPI schema (schemathesis): whatever a client sends, the API
answers without a server error and with a response its schema allows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from serve_app.api.app import create_app
from serve_app.service import Services
from serve_app.settings import Settings


@pytest.fixture(scope="module")
def app(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.support import pg

    for url in pg.clone_database(pg_admin, prefix="fuzz"):
        services = Services.from_settings(
            Settings(
                database_url=url,
                run_dir=tmp_path_factory.mktemp("fuzz"),
                rate_limit_requests=100000,
                request_timeout_seconds=10,
                worker_alive_seconds=3600,
            )
        )
        services.db.open(wait=True)
        # A live worker row, so /health is ready (its 503 is covered elsewhere).
        services.queue.register_worker("fuzz-worker", "cpu", "localhost", 1)
        yield create_app(services)
        services.db.close()


def test_api_never_errors_and_keeps_its_schema(app: object) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case: schemathesis.Case) -> None:
            # Every check but positive_data_acceptance: /generate's schema cannot say "a real
            # photo", so schema-valid bytes are rightly refused with a 4xx.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        run()


def test_schema_file_is_valid_openapi(app: object, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    spec = TestClient(app).get("/openapi.json").json()  # type: ignore[arg-type]
    assert spec["openapi"].startswith("3.")
    assert spec["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]
