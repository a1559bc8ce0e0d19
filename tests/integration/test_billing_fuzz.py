"""Property-based testing (schemathesis) of the billing routes with billing ON, against the
Stripe STAND-IN: whatever a client sends (webhook bodies and signatures included), no server
error and a response the schema allows."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis.checks import positive_data_acceptance

from serve_app.api.app import create_app
from serve_app.service import Services
from serve_app.settings import Settings
from tests.support.stripe_server import run_standin

if os.environ.get("CI") != "true":
    pytest.importorskip("localstripe", reason="localstripe (the dev extra) is not installed")


@pytest.fixture(scope="module")
def app(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.support import pg

    standin_runner = run_standin(tmp_path_factory.mktemp("stripe"))
    standin = next(standin_runner)
    for url in pg.clone_database(pg_admin, prefix="fuzzbill"):
        services = Services.from_settings(
            Settings(
                database_url=url,
                run_dir=tmp_path_factory.mktemp("fuzz"),
                rate_limit_requests=100000,
                request_timeout_seconds=10,
                billing=True,
                signup_credits=3,
                stripe_secret_key=SecretStr("sk_test_fuzz"),
                stripe_webhook_secret=SecretStr("whsec_fuzz"),
                stripe_api_base=standin,
            )
        )
        services.db.open(wait=True)
        services.billing.setup()
        yield create_app(services)
        services.db.close()
    standin_runner.close()


def test_billing_routes_never_error_and_keep_their_schema(app: object) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if "billing" in result.ok().path
        or result.ok().path in ("/api/v1/pricing", "/api/v1/account", "/api/v1/account/ledger")
        or result.ok().path.endswith("/credits")
    ]
    assert len(operations) == 7
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        run()
