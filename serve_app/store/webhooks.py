"""Webhook endpoints and their outbox on PostgreSQL. The outbox rows themselves are written by a
trigger on `tasks` (migration 0007) and by `update_batch`, with the change that ends the task or
the batch."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from serve_app.store.db import Database, Row


@dataclass(frozen=True)
class Message:
    """One claimed outbox row: an event for one endpoint; `attempt` fences its settlement."""

    id: uuid.UUID
    endpoint_id: uuid.UUID
    account_id: str
    event: str
    task_id: uuid.UUID | None
    batch_id: str | None
    snapshot: dict[str, Any]
    attempt: int
    url: str
    secrets: tuple[str, ...]  # current first, then the pre-rotation one while it still signs

    @property
    def webhook_id(self) -> str:
        """The `webhook-id` header: the same on every retry of this message."""
        return f"msg_{self.id.hex}"


class WebhookStore:
    """Every webhook statement, each one named query."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        *,
        endpoint_id: uuid.UUID,
        account_id: str,
        url: str,
        events: list[str],
        description: str,
        secret: str,
        max_count: int,
    ) -> Row | None:
        """The new endpoint, or None when the account already has `max_count`."""
        return self.db.fetch_one(
            "webhook_create",
            {
                "id": endpoint_id,
                "account_id": account_id,
                "url": url,
                "events": events,
                "description": description,
                "secret": secret,
                "max_count": max_count,
            },
        )

    def list_endpoints(self, account_id: str) -> list[Row]:
        return self.db.fetch_all("webhook_list", {"account_id": account_id})

    def get(self, endpoint_id: uuid.UUID, account_id: str) -> Row | None:
        return self.db.fetch_one("webhook_get", {"id": endpoint_id, "account_id": account_id})

    def delete(self, endpoint_id: uuid.UUID, account_id: str) -> bool:
        row = self.db.fetch_one("webhook_delete", {"id": endpoint_id, "account_id": account_id})
        return row is not None

    def rotate(
        self, endpoint_id: uuid.UUID, account_id: str, secret: str, grace_seconds: float
    ) -> Row | None:
        return self.db.fetch_one(
            "webhook_rotate",
            {
                "id": endpoint_id,
                "account_id": account_id,
                "secret": secret,
                "grace_seconds": grace_seconds,
            },
        )

    def deliveries(self, endpoint_id: uuid.UUID, limit: int) -> list[Row]:
        return self.db.fetch_all("webhook_deliveries", {"endpoint_id": endpoint_id, "limit": limit})

    # --- the dispatcher --------------------------------------------------------------
    def claim(self, limit: int, lease_seconds: float, per_endpoint: int) -> list[Message]:
        """Up to `limit` due messages (at most `per_endpoint` in flight per endpoint), leased to
        the caller for `lease_seconds`."""
        rows = self.db.fetch_all(
            "webhook_claim",
            {"limit": limit, "lease_seconds": lease_seconds, "per_endpoint": per_endpoint},
        )
        return [
            Message(
                id=r["id"],
                endpoint_id=r["endpoint_id"],
                account_id=r["account_id"],
                event=r["event"],
                task_id=r["task_id"],
                batch_id=r["batch_id"],
                snapshot=r["snapshot"],
                attempt=r["attempts"],
                url=r["url"],
                secrets=tuple(s for s in (r["secret"], r["previous_secret"]) if s),
            )
            for r in rows
        ]

    def record_attempt(
        self,
        message: Message,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        duration_ms: int,
        retry_in: float,
        window_seconds: float,
    ) -> str | None:
        """Log the attempt and settle the message: delivered | failed (to be retried) | gave_up;
        None when a newer claim owns it."""
        row = self.db.fetch_one(
            "webhook_record_attempt",
            {
                "id": message.id,
                "attempt": message.attempt,
                "delivered": delivered,
                "status_code": status_code,
                "error": (error or "")[:500] or None,
                "duration_ms": duration_ms,
                "retry_in": retry_in,
                "window_seconds": window_seconds,
            },
        )
        return str(row["outcome"]) if row is not None else None

    def prune(self, retention_seconds: float) -> int:
        return self.db.execute("webhook_prune", {"retention_seconds": retention_seconds})
