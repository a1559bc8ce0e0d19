"""Webhooks on a real PostgreSQL and a real HTTP receiver on loopback: registration, the outbox
written with the task's final status, Standard Webhooks signatures (checked with the
`standardwebhooks` package, as a receiver would), retries with the same webhook-id, the
deliveries listing, and the address rules."""

from __future__ import annotations

import functools
import json
import uuid

import psycopg
import pytest
from fastapi.testclient import TestClient

from serve_app.api.webhooks import task_payload
from serve_app.errors import NotFound
from serve_app.results import Preview, StoredFile, TaskResult
from serve_app.service import Services
from serve_app.settings import Settings
from serve_app.webhooks import WebhookDispatcher
from tests.support.images import object_photo
from tests.support.receiver import Received, Receiver, run_receiver
from tests.support.required import require
from tests.support.stack import free_port

standardwebhooks = require("standardwebhooks", "pip install -e .[dev]")


@pytest.fixture
def ports() -> list[int]:
    """Ports for the receivers of one test, known before the settings are made."""
    return [free_port(), free_port()]


@pytest.fixture
def settings(settings: Settings, ports: list[int]) -> Settings:
    # The receivers run on loopback: allowed by name (and port), as an operator would allow an
    # internal host.
    return settings.model_copy(
        update={
            "url_allow_hosts": ",".join(["127.0.0.1", *(f"127.0.0.1:{p}" for p in ports)]),
            "webhook_retry_base_seconds": 0.0,
            "webhook_timeout_seconds": 2.0,
        }
    )


def dispatcher(services: Services, **overrides: object) -> WebhookDispatcher:
    settings = services.settings.model_copy(update=overrides) if overrides else services.settings
    return WebhookDispatcher(
        services.webhooks.store, settings, functools.partial(task_payload, services)
    )


def register(client: TestClient, url: str, events: list[str] | None = None) -> dict:
    body: dict = {"url": url}
    if events is not None:
        body["events"] = events
    response = client.post("/api/v1/webhooks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def finished_task(services: Services, how: str) -> str:
    """A task ended the way a worker or a user ends one: 'succeeded', 'failed' or 'canceled'."""
    row, _ = services.submit("local", [object_photo(96)], {})
    if how == "canceled":
        services.queue.cancel(row["id"], "local")
        return str(row["id"])
    claim = services.queue.claim("test-worker", ["cpu"])
    assert claim is not None and claim.id == row["id"]
    if how == "succeeded":
        result = TaskResult(
            files={
                "glb": StoredFile(
                    key=f"tasks/{claim.id}/model.glb",
                    bytes=3,
                    media_type="model/gltf-binary",
                    filename="model.glb",
                )
            },
            preview=Preview(key=f"tasks/{claim.id}/preview.png"),
        )
        assert services.queue.succeed(claim, result.model_dump(mode="json"))
    else:
        services.queue.fail(claim, code="no_object_found", message="nothing there", permanent=True)
    return str(row["id"])


def verify(secret: str, request: Received) -> dict:
    """What a receiver does: verify the signature with the standardwebhooks package."""
    payload = standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    assert isinstance(payload, dict)
    return payload


def deliver_until(receiver: Receiver, services: Services, count: int) -> list[Received]:
    sender = dispatcher(services)
    for _ in range(20):
        if len(receiver.received) >= count:
            break
        sender.dispatch_due(wait=True)
    return receiver.wait_for(count)


def test_failed_task_is_retried_with_the_same_webhook_id_and_verifies(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(statuses=[500, 204], port=ports[0]) as receiver:
        hook = register(client, receiver.url)
        assert hook["secret"].startswith("whsec_")
        assert hook["events"] == [
            "batch.completed",
            "task.canceled",
            "task.failed",
            "task.succeeded",
        ]
        task_id = finished_task(services, "failed")
        first, second = deliver_until(receiver, services, 2)

    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.headers["webhook-id"].startswith("msg_")
    for request in (first, second):
        payload = verify(hook["secret"], request)
        assert payload["type"] == "task.failed"
        # The task as GET /api/v1/task/{id} shows it.
        assert payload["data"] == {
            **client.get(f"/api/v1/task/{task_id}").json(),
            "timings": payload["data"]["timings"],
        }
        assert payload["data"]["error"]["code"] == "no_object_found"
    # Another secret does not verify: the signature really depends on it.
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").verify(
            first.body, first.headers
        )

    deliveries = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["deliveries"]
    assert [(d["attempt"], d["status_code"]) for d in deliveries] == [(2, 204), (1, 500)]
    assert {d["webhook_id"] for d in deliveries} == {first.headers["webhook-id"]}
    assert all(d["task_id"] == task_id and d["event"] == "task.failed" for d in deliveries)
    assert all(d["state"] == "delivered" for d in deliveries)

    # Delivered once: nothing more goes out.
    assert dispatcher(services).dispatch_due(wait=True) == 0


def test_succeeded_task_payload_has_result_links(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(port=ports[0]) as receiver:
        hook = register(client, receiver.url, ["task.succeeded"])
        task_id = finished_task(services, "succeeded")
        (request,) = deliver_until(receiver, services, 1)
    payload = verify(hook["secret"], request)
    assert payload["type"] == "task.succeeded" and payload["data"]["id"] == task_id
    formats = {f["format"]: f["url"] for f in payload["data"]["result"]["files"]}
    # A signed link, made at delivery time: the receiver downloads the model with no API key.
    assert f"/download/{task_id}/glb?" in formats["glb"] and "signature=" in formats["glb"]
    services.artifacts.put(f"tasks/{task_id}/model.glb", b"glTF-test")
    download = client.get(formats["glb"])
    assert download.status_code == 200 and download.content == b"glTF-test"
    assert client.get(formats["glb"].replace("signature=", "signature=0")).status_code >= 400


def test_only_subscribed_events_are_sent(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(port=ports[0]) as receiver:
        register(client, receiver.url, ["task.succeeded"])
        finished_task(services, "canceled")
        assert dispatcher(services).dispatch_due(wait=True) == 0
        hook = register(client, receiver.url, ["task.canceled"])
        task_id = finished_task(services, "canceled")
        (request,) = deliver_until(receiver, services, 1)
    payload = verify(hook["secret"], request)
    assert payload["type"] == "task.canceled" and payload["data"]["status"] == "canceled"
    assert payload["data"]["id"] == task_id


def test_outbox_row_commits_or_rolls_back_with_the_status_change(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    register(client, f"http://127.0.0.1:{ports[0]}/hooks")
    row, _ = services.submit("local", [object_photo(96)], {})
    count = "SELECT count(*) FROM webhook_outbox WHERE task_id = %s"
    with psycopg.connect(str(services.settings.database_url)) as conn:
        conn.execute("UPDATE tasks SET status = 'canceled' WHERE id = %s", (row["id"],))
        conn.rollback()
        assert conn.execute(count, (row["id"],)).fetchone() == (0,)
        conn.execute("UPDATE tasks SET status = 'canceled' WHERE id = %s", (row["id"],))
        conn.commit()
        assert conn.execute(count, (row["id"],)).fetchone() == (1,)


def test_a_deleted_task_still_gets_its_event(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(port=ports[0]) as receiver:
        hook = register(client, receiver.url)
        task_id = finished_task(services, "failed")
        assert client.delete(f"/api/v1/task/{task_id}").status_code == 204
        (request,) = deliver_until(receiver, services, 1)
    data = verify(hook["secret"], request)["data"]
    assert data["id"] == task_id and data["status"] == "failed"


def test_rotated_secret_signs_alongside_the_old_one(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(port=ports[0]) as receiver:
        hook = register(client, receiver.url)
        rotated = client.post(f"/api/v1/webhooks/{hook['id']}/rotate")
        assert rotated.status_code == 200
        new_secret = rotated.json()["secret"]
        assert new_secret != hook["secret"] and rotated.json()["secret_rotated_until"]
        finished_task(services, "canceled")
        (request,) = deliver_until(receiver, services, 1)
    assert len(request.headers["webhook-signature"].split()) == 2
    verify(new_secret, request)
    verify(hook["secret"], request)  # receivers still on the old secret keep working


def test_unanswered_endpoint_is_recorded_and_given_up_after_the_window(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(delay_s=1.5, port=ports[0]) as receiver:
        hook = register(client, receiver.url)
        finished_task(services, "canceled")
        sender = dispatcher(
            services, webhook_timeout_seconds=0.3, webhook_retry_window_seconds=0.01
        )
        assert sender.dispatch_due(wait=True) == 1
        receiver.wait_for(1)
    (attempt,) = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["deliveries"]
    assert attempt["status_code"] is None and "no answer" in attempt["error"]
    assert attempt["state"] == "failed"  # past the retry window: no more tries
    assert dispatcher(services).dispatch_due(wait=True) == 0


def test_destinations_follow_the_image_url_rules(client: TestClient, ports: list[int]) -> None:
    for url, code in [
        ("http://169.254.169.254/latest/meta-data", "forbidden_webhook_url"),
        ("http://10.0.0.1/hook", "forbidden_webhook_url"),
        ("ftp://example.com/hook", "invalid_webhook_url"),
        ("http://user:pw@127.0.0.1/hook", "invalid_webhook_url"),
    ]:
        response = client.post("/api/v1/webhooks", json={"url": url})
        assert response.status_code == 422, url
        assert response.json()["error"]["code"] == code, url
    response = client.post(
        "/api/v1/webhooks",
        json={"url": f"http://127.0.0.1:{ports[0]}/h", "events": ["task.exploded"]},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_list_get_delete_and_isolation(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    hook = register(client, f"http://127.0.0.1:{ports[0]}/a")
    listed = client.get("/api/v1/webhooks").json()["webhooks"]
    assert [h["id"] for h in listed] == [hook["id"]]
    assert (
        "secret" not in listed[0]
        and "secret" not in client.get(f"/api/v1/webhooks/{hook['id']}").json()
    )
    with pytest.raises(NotFound):  # another account does not see it
        services.webhooks.get("someone-else", hook["id"])
    assert client.get(f"/api/v1/webhooks/{uuid.uuid4()}").status_code == 404
    assert client.get("/api/v1/webhooks/not-a-uuid/deliveries").status_code == 404
    assert client.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 204
    assert client.get(f"/api/v1/webhooks/{hook['id']}").json()["error"]["code"] == (
        "webhook_not_found"
    )
    limit = services.settings.webhook_max_endpoints
    for _ in range(limit):
        register(client, f"http://127.0.0.1:{ports[0]}/a")
    over = client.post("/api/v1/webhooks", json={"url": f"http://127.0.0.1:{ports[0]}/a"})
    assert over.status_code == 409 and over.json()["error"]["code"] == "too_many_webhooks"
    json.dumps(listed)  # plain JSON


def test_a_slow_endpoint_cannot_take_every_delivery_slot(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(delay_s=0.5, port=ports[0]) as slow, run_receiver(port=ports[1]) as fast:
        register(client, slow.url, ["task.canceled"])
        for _ in range(4):
            finished_task(services, "canceled")
        register(client, fast.url, ["task.canceled"])
        finished_task(services, "canceled")
        # Five messages wait for the slow endpoint, the oldest first, and one for the fast one.
        sender = dispatcher(services, webhook_concurrency=4, webhook_endpoint_concurrency=2)
        assert sender.dispatch_due(wait=True) == 3
        assert len(fast.wait_for(1)) == 1
        assert len(slow.received) == 2  # two in flight at most; the rest wait their turn
        while sender.dispatch_due(wait=True):
            pass
        assert len(slow.wait_for(5)) == 5


def test_an_ended_batch_sends_batch_completed_once(
    client: TestClient, services: Services, ports: list[int]
) -> None:
    with run_receiver(port=ports[0]) as receiver:
        hook = register(client, receiver.url, ["batch.completed"])
        services.batches.start("local", "spring-catalog", "/photos/spring", {})
        row, _ = services.submit("local", [object_photo(96)], {}, batch_id="spring-catalog")
        services.queue.cancel(row["id"], "local")  # a task event, not subscribed here
        services.batches.update("local", "spring-catalog", total=1)  # still running: no event
        services.batches.update("local", "spring-catalog", status="completed")
        services.batches.update("local", "spring-catalog", status="completed")  # no second
        (request,) = deliver_until(receiver, services, 1)
        assert dispatcher(services).dispatch_due(wait=True) == 0
    payload = verify(hook["secret"], request)
    assert payload["type"] == "batch.completed"
    data = payload["data"]
    assert data["id"] == "spring-catalog" and data["status"] == "completed"
    assert data["counts"]["canceled"] == 1 and data["total"] == 1
    assert data == client.get("/api/v1/batches/spring-catalog").json() | {
        k: data[k] for k in ("photos_per_minute", "eta_seconds")
    }
    (delivery,) = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()["deliveries"]
    assert delivery["batch_id"] == "spring-catalog" and delivery["task_id"] is None
