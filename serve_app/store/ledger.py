"""The credit ledger on PostgreSQL: reservations taken in the task's own insert transaction,
credit movements that write the ledger row and the cached balance in one statement, Stripe
events gated once per event id, and the meter-event outbox.

Capture and release are not here: a trigger on the task's status change settles its
reservation in the same transaction as the (attempt-fenced) change itself (migration 0006)."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from serve_app.errors import Photo3DError
from serve_app.store.db import Database, Row, named

KINDS = (
    "grant",
    "purchase",
    "allowance",
    "reserve",
    "capture",
    "release",
    "refund",
    "expiry",
    "adjustment",
)


class InsufficientCredits(Photo3DError):
    """The account cannot pay for this generation (402); nothing was stored or queued."""

    code = "insufficient_credits"
    http_status = 402

    def __init__(
        self, message: str, *, code: str | None = None, price: int = 0, balance: int = 0
    ) -> None:
        super().__init__(message, code=code)
        self.price = price
        self.balance = balance

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_insufficient, (self.message, self.code, self.price, self.balance))


def _rebuild_insufficient(message: str, code: str, price: int, balance: int) -> InsufficientCredits:
    return InsufficientCredits(message, code=code, price=price, balance=balance)


def insufficient(price: int, balance: int) -> InsufficientCredits:
    return InsufficientCredits(
        f"this generation costs {price} credits and the balance is {balance}; "
        "buy credits at /api/v1/pricing",
        price=price,
        balance=balance,
    )


class LedgerTx:
    """Ledger operations inside one open transaction (a Stripe event's effects, a grant)."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self.conn = conn

    def _one(self, name: str, params: dict[str, Any]) -> Row | None:
        return self.conn.execute(**named(name, params)).fetchone()

    def record_event(self, event_id: str, type_: str, created: int, account_id: str | None) -> bool:
        """True the first time this Stripe event id is seen; False for a replay."""
        row = self._one(
            "record_stripe_event",
            {"id": event_id, "type": type_, "created": created, "account_id": account_id},
        )
        return row is not None

    def post(
        self,
        account_id: str,
        kind: str,
        amount: int,
        *,
        reason: str | None = None,
        stripe_event_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        allowance_delta: int = 0,
    ) -> Row | None:
        """Move credits (a debit takes at most the balance); None if the account is unknown."""
        if kind not in KINDS:
            raise ValueError(f"unknown ledger kind {kind}")
        return self._one(
            "post_ledger",
            {
                "account_id": account_id,
                "kind": kind,
                "amount": amount,
                "allowance_delta": allowance_delta,
                "reason": reason,
                "stripe_event_id": stripe_event_id,
                "metadata": Jsonb(metadata or {}),
            },
        )

    def account(self, account_id: str) -> Row | None:
        return self._one("billing_account", {"account_id": account_id})

    def account_by_customer(self, customer_id: str) -> str | None:
        row = self._one("account_by_customer", {"customer_id": customer_id})
        return None if row is None else str(row["id"])

    def set_customer(self, account_id: str, customer_id: str) -> None:
        self._one("set_customer", {"account_id": account_id, "customer_id": customer_id})

    def set_subscription(
        self,
        account_id: str,
        *,
        plan: str | None,
        status: str | None,
        subscription_id: str | None,
        customer_id: str | None,
        period_start: dt.datetime | None,
        period_end: dt.datetime | None,
        created: int,
    ) -> bool:
        """Apply a subscription state unless a newer one was applied already."""
        row = self._one(
            "set_subscription",
            {
                "account_id": account_id,
                "plan": plan,
                "status": status,
                "subscription_id": subscription_id,
                "customer_id": customer_id,
                "period_start": period_start,
                "period_end": period_end,
                "created": created,
            },
        )
        return row is not None

    def payment_credits(self, payment_intent: str) -> Row:
        row = self._one("payment_credits", {"payment_intent": payment_intent})
        return row or {"bought": 0, "refunded": 0, "account_id": None}

    def claim_signup_grant(self, account_id: str) -> bool:
        return self._one("claim_signup_grant", {"account_id": account_id}) is not None


class Ledger:
    """Reads of the ledger, and the transactions that change it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LedgerTx]:
        """One transaction: every change made through the LedgerTx commits or none does
        (driver errors are mapped by Database.connection, as everywhere)."""
        with self.db.connection() as conn, conn.transaction():
            yield LedgerTx(conn)

    def account(self, account_id: str) -> Row | None:
        return self.db.fetch_one("billing_account", {"account_id": account_id})

    def entries(self, account_id: str, *, limit: int, before_id: int | None = None) -> list[Row]:
        """Newest first, keyset-paginated by ledger id."""
        return self.db.fetch_all(
            "list_ledger", {"account_id": account_id, "before_id": before_id, "limit": limit}
        )

    def totals(self, account_id: str) -> Row:
        """The ledger's sum, its number of entries and the cached balance, in one snapshot."""
        row = self.db.fetch_one("ledger_totals", {"account_id": account_id})
        return row or {"total": 0, "entries": 0, "balance": None}

    def usage_since(self, account_id: str, since: dt.datetime | None) -> Row:
        row = self.db.fetch_one("usage_since", {"account_id": account_id, "since": since})
        return row or {"generations": 0, "credits": 0}

    # --- meter outbox ----------------------------------------------------------------
    def claim_meter_events(self, *, limit: int, lease_seconds: float) -> list[Row]:
        return self.db.fetch_all(
            "claim_meter_events", {"limit": limit, "lease_seconds": lease_seconds}
        )

    def meter_event_sent(self, task_id: uuid.UUID) -> None:
        self.db.execute("meter_event_sent", {"task_id": task_id})

    def meter_event_failed(self, task_id: uuid.UUID, error: str, backoff_seconds: float) -> None:
        self.db.execute(
            "meter_event_failed",
            {"task_id": task_id, "error": error[:500], "backoff_seconds": backoff_seconds},
        )

    def meter_outbox_counts(self) -> Row:
        return self.db.fetch_one("meter_outbox_pending") or {"pending": 0, "sent": 0}


def insert_task_reserving(
    db: Database,
    params: dict[str, Any],
    *,
    credits: int,
    meter_event: str | None,
    insert_query: str = "insert_task",
    lock: str | None = None,
) -> Row | None:
    """Insert a task (named query `insert_query`, under the advisory lock `lock` if given) and
    reserve its price in the same transaction. None when nothing was inserted (an idempotency
    key already used, or the insert query's own condition); InsufficientCredits rolls the
    insert back, so nothing is queued."""
    with db.connection() as conn, conn.transaction():
        if lock is not None:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
        row = conn.execute(**named(insert_query, params)).fetchone()
        if row is None:
            return None
        if credits > 0:
            reserved = conn.execute(
                **named(
                    "reserve_credits",
                    {
                        "account_id": params["account_id"],
                        "task_id": params["id"],
                        "price": credits,
                        "metadata": Jsonb({"backend": params.get("backend")}),
                    },
                )
            ).fetchone()
            if reserved is None:
                balance = conn.execute(
                    **named("billing_account", {"account_id": params["account_id"]})
                ).fetchone()
                raise insufficient(credits, int(balance["balance"]) if balance else 0)
            row["credits_reserved"] = credits
        if meter_event is not None:
            conn.execute(
                **named("mark_metered", {"task_id": params["id"], "event_name": meter_event})
            )
            row["meter_event"] = meter_event
        return row
