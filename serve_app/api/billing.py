"""Billing routes: public pricing, Checkout and the Customer Portal, the Stripe webhook, the
account's ledger and the admin grant. Each calls one method of the billing service."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from serve_app.api.deps import ERRORS, AccountDep, AdminDep, ServicesDep
from serve_app.api.schemas import ErrorResponse
from serve_app.errors import PayloadTooLarge

router = APIRouter(
    prefix="/api/v1",
    responses={**ERRORS, 402: {"model": ErrorResponse}},
    tags=["billing"],
)

MAX_WEBHOOK_BYTES = 1024 * 1024  # Stripe events are a few kB


class Pack(BaseModel):
    name: str
    credits: int
    amount: int = Field(description="in the currency's smallest unit (cents)")
    currency: str


class Plan(BaseModel):
    name: str
    interval: str
    amount: int
    allowance: int
    allowance_expires: bool
    metered: bool
    unit_amount: int
    currency: str


class Pricing(BaseModel):
    enabled: bool = Field(description="whether this server charges for generations")
    currency: str
    prices: dict[str, Any] = Field(
        description="credits per generation: {default, backends: {name: credits}, "
        "surcharges: {option: {value: credits}}}"
    )
    packs: list[Pack]
    plans: list[Plan]


class CheckoutRequest(BaseModel):
    pack: str | None = Field(default=None, max_length=64, description="a credit pack's name")
    plan: str | None = Field(default=None, max_length=64, description="a plan's name")


class CheckoutSession(BaseModel):
    id: str
    url: str = Field(description="Stripe Checkout: send the person here")


class PortalSession(BaseModel):
    url: str


class LedgerEntry(BaseModel):
    id: int
    kind: str = Field(
        description="grant | purchase | allowance | reserve | capture | release | refund | "
        "expiry | adjustment"
    )
    amount: int = Field(description="change of the balance in credits (capture: 0)")
    balance_after: int
    task_id: str | None = None
    reason: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: dt.datetime


class LedgerPage(BaseModel):
    entries: list[LedgerEntry]
    next_before: int | None = Field(None, description="Pass as ?before= for the next page.")


class Grant(BaseModel):
    credits: int = Field(ge=-1_000_000_000, le=1_000_000_000)
    reason: str = Field(min_length=1, max_length=500)


class WebhookAck(BaseModel):
    id: str
    type: str
    applied: bool
    duplicate: bool = False
    ignored: bool = False


@router.get("/pricing", response_model=Pricing, summary="Prices, credit packs and plans (public)")
def pricing(services: ServicesDep) -> Pricing:
    return Pricing(**services.billing.pricing())


@router.post(
    "/billing/checkout",
    response_model=CheckoutSession,
    summary="Start a Stripe Checkout for a credit pack or a plan",
)
def checkout(
    body: CheckoutRequest, request: Request, account: AccountDep, services: ServicesDep
) -> CheckoutSession:
    session = services.billing.checkout(
        account, pack=body.pack, plan=body.plan, request_base=str(request.base_url)
    )
    return CheckoutSession(**session)


@router.post(
    "/billing/portal", response_model=PortalSession, summary="Open the Stripe Customer Portal"
)
def portal(request: Request, account: AccountDep, services: ServicesDep) -> PortalSession:
    return PortalSession(**services.billing.portal(account, request_base=str(request.base_url)))


@router.post(
    "/billing/webhook",
    response_model=WebhookAck,
    summary="Stripe webhook endpoint (public; authenticated by the Stripe-Signature header)",
)
async def webhook(
    request: Request,
    services: ServicesDep,
    stripe_signature: Annotated[str | None, Header(max_length=2000)] = None,
) -> WebhookAck:
    payload = b""
    async for chunk in request.stream():
        payload += chunk
        if len(payload) > MAX_WEBHOOK_BYTES:
            raise PayloadTooLarge("a Stripe event is at most 1 MiB")
    result = await run_in_threadpool(services.billing.handle_webhook, payload, stripe_signature)
    return WebhookAck(**result)


@router.get("/account/ledger", response_model=LedgerPage, summary="Your credit ledger")
def ledger(
    account: AccountDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> LedgerPage:
    rows = services.billing.entries(account, limit=limit + 1, before_id=before)
    next_before = rows[limit - 1]["id"] if len(rows) > limit else None
    return LedgerPage(entries=[LedgerEntry(**r) for r in rows[:limit]], next_before=next_before)


@router.post(
    "/admin/accounts/{account_id}/credits",
    response_model=LedgerEntry,
    status_code=201,
    summary="Admin: grant credits to an account (negative: adjust down)",
)
def admin_grant(
    account_id: str, body: Grant, admin: AdminDep, services: ServicesDep
) -> LedgerEntry:
    row = services.billing.grant(account_id, body.credits, body.reason)
    return LedgerEntry(**{**row, "task_id": None})
