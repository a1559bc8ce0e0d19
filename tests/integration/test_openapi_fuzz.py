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
    from openapi_spec_validator import validate

    spec = TestClient(app).get("/openapi.json").json()  # type: ignore[arg-type]
    validate(spec)  # raises on any violation of the OpenAPI specification
    assert spec["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]


# NUL, other C0 controls and DEL: PostgreSQL refuses NUL in text (a 500 before issue 10).
CONTROL_STRINGS = ["a\x00b", "\x00", "a\x01b", "x\x1fy", "a\x7fb", "tab\there"]
# A valid value for each path parameter, so that only the swept parameter is hostile.
VALID_PATH = {
    "task_id": "00000000-0000-0000-0000-000000000000",
    "prefix": "abcd1234",
    "account_id": "local",
    "fmt": "glb",
    "batch_id": "b1",
}


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _is_string(spec: dict, schema: dict) -> bool:
    schema = _resolve(spec, schema)
    options = schema.get("anyOf", [schema])
    return any(_resolve(spec, s).get("type") == "string" for s in options)


def test_control_characters_in_every_string_parameter_are_a_4xx(app: object) -> None:
    """Sweeps every string parameter of the schema (path, query, header, JSON body property)
    with control characters: each answer is a 4xx with an error code, never a 500."""
    from fastapi.testclient import TestClient

    spec = TestClient(app).get("/openapi.json").json()  # type: ignore[arg-type]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    swept: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        raw = spec["paths"][operation.path][operation.method.lower()]
        path_values = {
            p["name"]: VALID_PATH.get(p["name"], "x")
            for p in raw.get("parameters", [])
            if p["in"] == "path"
        }
        targets: list[tuple[str, str]] = [
            (p["in"], p["name"])
            for p in raw.get("parameters", [])
            if _is_string(spec, p.get("schema", {}))
        ]
        body_schema = (
            raw.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        )
        body_props: dict = {}
        if body_schema is not None:
            body_props = _resolve(spec, body_schema).get("properties", {})
            targets += [("body", n) for n, s in body_props.items() if _is_string(spec, s)]
        for where, name in targets:
            for value in CONTROL_STRINGS:
                kwargs: dict = {"path_parameters": dict(path_values)}
                if where == "path":
                    kwargs["path_parameters"][name] = value
                elif where == "query":
                    kwargs["query"] = {name: value}
                elif where == "header":
                    kwargs["headers"] = {name: value}
                if body_schema is not None:
                    body = {n: "x" for n, s in body_props.items() if _is_string(spec, s)}
                    if where == "body":
                        body[name] = value
                    kwargs.update(body=body, media_type="application/json")
                case = operation.Case(**kwargs)
                try:
                    response = case.call()
                except Exception as exc:  # a header no HTTP client can send
                    assert where == "header", (operation.label, name, exc)
                    continue
                label = f"{operation.label} {where}:{name}={value!r}"
                assert 400 <= response.status_code < 500, (label, response.text[:300])
                assert response.json()["error"]["code"], label
                swept.append(label)
    # Every kind of place a string travels in was reached.
    kinds = {label.split(" ")[2].split(":")[0] for label in swept}
    assert kinds >= {"path", "query", "body"}, kinds
    assert len({label.rsplit("=", 1)[0] for label in swept}) >= 10
