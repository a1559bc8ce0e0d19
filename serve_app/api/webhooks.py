"""Webhook routes: register an endpoint (its secret shown once), list, read, delete, rotate the
secret, and the recent delivery attempts. Also what an event's `data` is: the task as
GET /api/v1/task/{id} shows it."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.batches import _batch as batch_view
from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.api.tasks import view as task_view
from serve_app.errors import NotFound
from serve_app.service import Services
from serve_app.store.db import Row
from serve_app.store.webhooks import Message

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["webhooks"])


class WebhookEvent(StrEnum):
    """What happened: a task ended, or a bulk conversion batch ended (any way; its `status`
    says completed, failed or stopped)."""

    task_succeeded = "task.succeeded"
    task_failed = "task.failed"
    task_canceled = "task.canceled"
    batch_completed = "batch.completed"


ALL_EVENTS: tuple[WebhookEvent, ...] = tuple(WebhookEvent)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://example.com/hooks/photo3d",
                    "events": ["task.succeeded", "task.failed"],
                    "description": "order pipeline",
                }
            ]
        },
    )

    url: str = Field(max_length=2048, description="http(s) URL that receives POSTed events.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(ALL_EVENTS),
        min_length=1,
        max_length=10,
    )
    description: str = Field(default="", max_length=200)


class Webhook(BaseModel):
    id: str
    url: str
    events: list[WebhookEvent]
    description: str
    created_at: dt.datetime
    secret_rotated_until: dt.datetime | None = Field(
        None, description="Until then the pre-rotation secret signs too (a second signature)."
    )


class WebhookWithSecret(Webhook):
    secret: str = Field(
        description="Signing secret (`whsec_…`), shown only now: store it to verify deliveries."
    )


class WebhookList(BaseModel):
    webhooks: list[Webhook]


class WebhookDelivery(BaseModel):
    id: int
    webhook_id: str = Field(description="The `webhook-id` header; the same on every retry.")
    event: WebhookEvent
    task_id: str | None
    batch_id: str | None = None
    attempt: int
    at: dt.datetime
    status_code: int | None = Field(None, description="The endpoint's HTTP status, if any.")
    error: str | None = None
    duration_ms: int
    state: Literal["delivered", "retrying", "failed"] = Field(
        description="Where the message stands now."
    )
    next_attempt_at: dt.datetime | None = None


class WebhookDeliveries(BaseModel):
    deliveries: list[WebhookDelivery]


class WebhookEventPayload(BaseModel):
    """The JSON body POSTed to an endpoint (signed per Standard Webhooks)."""

    type: WebhookEvent
    timestamp: dt.datetime
    data: dict[str, Any] = Field(
        description="task.*: the task as GET /api/v1/task/{id} returns it; batch.completed: "
        "the batch as GET /api/v1/batches/{id} returns it."
    )


def _webhook(row: Row) -> Webhook:
    rotated = row.get("previous_expires_at")
    return Webhook(
        id=str(row["id"]),
        url=row["url"],
        events=row["events"],
        description=row["description"],
        created_at=row["created_at"],
        secret_rotated_until=rotated if rotated and rotated > dt.datetime.now(dt.UTC) else None,
    )


def _delivery(row: Row) -> WebhookDelivery:
    state: Literal["delivered", "retrying", "failed"] = (
        "delivered" if row["delivered_at"] else "failed" if row["failed_at"] else "retrying"
    )
    return WebhookDelivery(
        id=row["id"],
        webhook_id=f"msg_{row['message_id'].hex}",
        event=row["event"],
        task_id=str(row["task_id"]) if row["task_id"] else None,
        batch_id=row["batch_id"],
        attempt=row["attempt"],
        at=row["at"],
        status_code=row["status_code"],
        error=row["error"],
        duration_ms=row["duration_ms"],
        state=state,
        next_attempt_at=row["next_attempt_at"] if state == "retrying" else None,
    )


@router.post(
    "/webhooks",
    status_code=201,
    response_model=WebhookWithSecret,
    summary="Register a webhook endpoint (the signing secret is returned once)",
)
def create_webhook(
    body: WebhookCreate, services: ServicesDep, account: AccountDep
) -> WebhookWithSecret:
    row, secret = services.webhooks.register(account, body.url, list(body.events), body.description)
    return WebhookWithSecret(**_webhook(row).model_dump(), secret=secret)


@router.get("/webhooks", response_model=WebhookList, summary="Your webhook endpoints")
def list_webhooks(services: ServicesDep, account: AccountDep) -> WebhookList:
    return WebhookList(webhooks=[_webhook(r) for r in services.webhooks.list_endpoints(account)])


@router.get("/webhooks/{webhook_id}", response_model=Webhook, summary="One webhook endpoint")
def get_webhook(webhook_id: str, services: ServicesDep, account: AccountDep) -> Webhook:
    return _webhook(services.webhooks.get(account, webhook_id))


@router.delete("/webhooks/{webhook_id}", status_code=204, summary="Delete a webhook endpoint")
def delete_webhook(webhook_id: str, services: ServicesDep, account: AccountDep) -> Response:
    services.webhooks.delete(account, webhook_id)
    return Response(status_code=204)


@router.post(
    "/webhooks/{webhook_id}/rotate",
    response_model=WebhookWithSecret,
    summary="New signing secret; the old one also signs for a day",
)
def rotate_webhook_secret(
    webhook_id: str, services: ServicesDep, account: AccountDep
) -> WebhookWithSecret:
    row, secret = services.webhooks.rotate(account, webhook_id)
    return WebhookWithSecret(**_webhook(row).model_dump(), secret=secret)


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    response_model=WebhookDeliveries,
    summary="Recent delivery attempts, newest first",
)
def list_deliveries(
    webhook_id: str,
    services: ServicesDep,
    account: AccountDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> WebhookDeliveries:
    rows = services.webhooks.deliveries(account, webhook_id, limit)
    return WebhookDeliveries(deliveries=[_delivery(r) for r in rows])


# What endpoints receive, for the OpenAPI document's `webhooks` section (never routed).
events_router = APIRouter()


def _document_event(event: str) -> None:
    def receive(
        body: WebhookEventPayload,
        webhook_id: Annotated[str, Header(alias="webhook-id")],
        webhook_timestamp: Annotated[str, Header(alias="webhook-timestamp")],
        webhook_signature: Annotated[str, Header(alias="webhook-signature")],
    ) -> None:
        """Signed per Standard Webhooks: verify `webhook-signature` (`v1,<base64 HMAC-SHA256 of
        "{webhook-id}.{webhook-timestamp}.{body}">`, space-separated while a rotated secret
        still signs) with the endpoint's `whsec_` secret, e.g. with the `standardwebhooks`
        package. Answer 2xx within 10 s; anything else is retried with backoff for a day, with
        the same `webhook-id` (deduplicate on it)."""

    events_router.post(
        event,
        summary=f"{event}: a {event.split('.')[0]} ended",
        status_code=204,
        response_class=Response,
        responses={204: {"description": "Any 2xx acknowledges the event."}},
    )(receive)


for _event in ALL_EVENTS:
    _document_event(_event.value)


def task_payload(services: Services, message: Message) -> dict[str, Any]:
    """An event's `data`: the task (or batch) as the API shows it now, or what the outbox
    recorded at the status change if it was deleted since."""
    if message.batch_id is not None:
        try:
            batch = services.batches.get(message.account_id, message.batch_id)
        except NotFound:
            return dict(message.snapshot)
        return batch_view(batch).model_dump(mode="json")
    row = services.queue.get(message.task_id, message.account_id) if message.task_id else None
    if row is None:
        return dict(message.snapshot)
    return task_view(services, message.account_id, row).model_dump(mode="json")
