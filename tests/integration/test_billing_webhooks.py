"""Stripe webhooks on a real PostgreSQL: signatures made here with the secret and verified by
the official SDK; forged, stale, replayed and reordered deliveries; packs, allowances,
subscription changes and refunds applied to the ledger exactly once."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve_app.api.app import create_app
from serve_app.service import Services
from serve_app.settings import Settings
from tests.support.app import open_services

SECRET = "whsec_test_photo3d"


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    billing = settings.model_copy(
        update={"billing": True, "stripe_webhook_secret": SecretStr(SECRET)}
    )
    with open_services(billing) as opened:
        opened.accounts.create_account("alice")
        yield opened


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services), raise_server_exceptions=False) as test_client:
        yield test_client


def event(type_: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "type": type_,
        "created": created or int(time.time()),
        "data": {"object": obj},
    }


def deliver(
    client: TestClient,
    evt: dict[str, Any],
    *,
    secret: str = SECRET,
    timestamp: int | None = None,
    header: str | None = None,
) -> httpx.Response:
    payload = json.dumps(evt)
    signature = header or stripe.WebhookSignature.generate_signature_header(
        payload, secret, timestamp
    )
    return client.post(
        "/api/v1/billing/webhook",
        content=payload,
        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
    )


def balance(services: Services, account: str = "alice") -> int:
    totals = services.billing.ledger.totals(account)  # one snapshot: sum and cached balance
    assert totals["total"] == totals["balance"]
    return int(totals["balance"])


def pack_session(pack: str = "starter", pi: str = "pi_1", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"cs_{uuid.uuid4().hex[:10]}",
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "client_reference_id": "alice",
        "customer": "cus_alice",
        "payment_intent": pi,
        "amount_total": 1,  # never trusted: credits come from the config by pack name
        "metadata": {"pack": pack, "account_id": "alice"},
        **extra,
    }


def test_a_pack_purchase_is_applied_once_from_the_signed_event_alone(
    client: TestClient, services: Services
) -> None:
    evt = event("checkout.session.completed", pack_session())
    first = deliver(client, evt)
    assert first.status_code == 200 and first.json()["applied"] is True
    assert balance(services) == 100  # the starter pack's credits from billing.yaml
    replay = deliver(client, evt)
    assert replay.status_code == 200
    assert replay.json()["duplicate"] is True and replay.json()["applied"] is False
    assert balance(services) == 100
    entry = services.billing.entries("alice", limit=1)[0]
    assert entry["kind"] == "purchase" and entry["metadata"]["pack"] == "starter"


@pytest.mark.parametrize(
    "how", ["forged", "stale", "missing", "garbage", "tampered"], ids=lambda h: h
)
def test_bad_signatures_are_400_and_apply_nothing(
    client: TestClient, services: Services, how: str
) -> None:
    evt = event("checkout.session.completed", pack_session())
    if how == "forged":
        response = deliver(client, evt, secret="whsec_someone_else")
    elif how == "stale":
        response = deliver(client, evt, timestamp=int(time.time()) - 3600)
    elif how == "missing":
        response = client.post("/api/v1/billing/webhook", content=json.dumps(evt))
    elif how == "garbage":
        response = deliver(client, evt, header="t=abc,v1=zz")
    else:
        payload = json.dumps(evt)
        header = stripe.WebhookSignature.generate_signature_header(payload, SECRET)
        tampered = payload.replace('"starter"', '"studio"')
        response = client.post(
            "/api/v1/billing/webhook", content=tampered, headers={"Stripe-Signature": header}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert balance(services) == 0
    # Nothing was recorded either: the genuine delivery still applies.
    assert deliver(client, evt).json()["applied"] is True
    assert balance(services) == 100


def test_unknown_event_types_are_acknowledged_and_ignored(
    client: TestClient, services: Services
) -> None:
    response = deliver(client, event("customer.created", {"id": "cus_x"}))
    assert response.status_code == 200 and response.json()["ignored"] is True
    assert balance(services) == 0


def test_unknown_pack_or_account_grants_nothing(client: TestClient, services: Services) -> None:
    assert deliver(client, event("checkout.session.completed", pack_session("gold"))).json()[
        "applied"
    ]
    stranger = pack_session(client_reference_id="nobody")
    assert deliver(client, event("checkout.session.completed", stranger)).status_code == 200
    assert balance(services) == 0


def refund(pi: str, amount: int, refunded: int) -> dict[str, Any]:
    return {
        "id": "ch_1",
        "object": "charge",
        "payment_intent": pi,
        "amount": amount,
        "amount_refunded": refunded,
        "refunded": refunded >= amount,
    }


def test_refunds_claw_back_the_credits_bought_exactly_once(
    client: TestClient, services: Services
) -> None:
    deliver(client, event("checkout.session.completed", pack_session(pi="pi_9")))
    assert balance(services) == 100
    half = event("charge.refunded", refund("pi_9", 500, 250))
    assert deliver(client, half).status_code == 200
    assert balance(services) == 50
    assert deliver(client, half).json()["duplicate"] is True
    assert deliver(client, event("charge.refunded", refund("pi_9", 500, 500))).status_code == 200
    assert balance(services) == 0
    kinds = [(e["kind"], e["amount"]) for e in services.billing.entries("alice", limit=10)]
    assert kinds[:2] == [("refund", -50), ("refund", -50)]


def test_a_refund_before_its_purchase_is_retried_not_lost(
    client: TestClient, services: Services
) -> None:
    early = event("charge.refunded", refund("pi_early", 500, 500))
    response = deliver(client, early)
    assert response.status_code == 409  # Stripe delivers it again later
    assert response.json()["error"]["code"] == "event_out_of_order"
    deliver(client, event("checkout.session.completed", pack_session(pi="pi_early")))
    assert balance(services) == 100
    assert deliver(client, early).json()["applied"] is True
    assert balance(services) == 0


def test_a_refund_after_spending_never_drives_the_balance_negative(
    client: TestClient, services: Services
) -> None:
    deliver(client, event("checkout.session.completed", pack_session(pi="pi_s")))
    services.billing.grant("alice", -70, "spent elsewhere (test)")
    deliver(client, event("charge.refunded", refund("pi_s", 500, 500)))
    assert balance(services) == 0
    last = services.billing.entries("alice", limit=1)[0]
    assert last["kind"] == "refund" and last["amount"] == -30
    assert last["metadata"]["requested"] == 100


def subscription(status: str = "active", plan: str = "hobby", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_alice",
        "status": status,
        "metadata": {"account_id": "alice", "plan": plan},
        "items": {"data": [{"current_period_start": now, "current_period_end": now + 86400}]},
        **extra,
    }


def invoice(plan: str = "hobby", number: int = 1) -> dict[str, Any]:
    return {
        "id": f"in_{number}",
        "object": "invoice",
        "customer": "cus_alice",
        "parent": {
            "subscription_details": {
                "subscription": "sub_1",
                "metadata": {"account_id": "alice", "plan": plan},
            }
        },
        "lines": {"data": [{"period": {"start": 0, "end": 1}}]},
    }


def test_subscription_allowance_expires_at_period_end(
    client: TestClient, services: Services
) -> None:
    session = {
        "id": "cs_sub",
        "object": "checkout.session",
        "mode": "subscription",
        "payment_status": "paid",
        "client_reference_id": "alice",
        "customer": "cus_alice",
        "subscription": "sub_1",
        "metadata": {"plan": "hobby", "account_id": "alice"},
    }
    deliver(client, event("checkout.session.completed", session))
    deliver(client, event("customer.subscription.created", subscription()))
    deliver(client, event("invoice.paid", invoice(number=1)))
    assert balance(services) == 200
    services.billing.grant("alice", 10, "bonus (never expires)")
    view = services.billing.account_view("alice")
    assert view["plan"] == "hobby" and view["plan_status"] == "active"
    assert view["period_end"] is not None
    # 50 of the allowance are spent; at the next paid invoice the other 150 expire.
    services.billing.grant("alice", -50, "spent (test)")
    deliver(client, event("invoice.paid", invoice(number=2)))
    entries = services.billing.entries("alice", limit=2)
    assert [(e["kind"], e["amount"]) for e in entries] == [("allowance", 200), ("expiry", -150)]
    assert balance(services) == 210
    # Cancelled: the plan ends and its unused allowance expires.
    deliver(client, event("customer.subscription.deleted", subscription(status="canceled")))
    assert services.billing.account_view("alice")["plan"] is None
    assert balance(services) == 10


def test_reordered_subscription_updates_keep_the_newest_state(
    client: TestClient, services: Services
) -> None:
    now = int(time.time())
    newer = event("customer.subscription.updated", subscription("past_due"), created=now)
    older = event("customer.subscription.updated", subscription("active"), created=now - 60)
    assert deliver(client, newer).status_code == 200
    assert deliver(client, older).status_code == 200
    assert services.billing.ledger.account("alice")["plan_status"] == "past_due"


def test_an_invoice_for_an_unknown_customer_is_retried(
    client: TestClient, services: Services
) -> None:
    orphan = invoice()
    orphan["parent"] = None
    orphan["customer"] = "cus_unknown"
    assert deliver(client, event("invoice.paid", orphan)).status_code == 409
    assert balance(services) == 0


def test_a_signed_but_malformed_event_is_400_and_applies_nothing(
    client: TestClient, services: Services
) -> None:
    evt = event("checkout.session.completed", pack_session())
    evt["created"] = "yesterday"
    response = deliver(client, evt)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_event"
    evt["created"] = int(time.time())
    assert deliver(client, evt).json()["applied"] is True  # nothing was recorded before
    assert balance(services) == 100


def test_a_customer_is_never_moved_to_another_account(
    client: TestClient, services: Services
) -> None:
    deliver(client, event("checkout.session.completed", pack_session(pi="pi_a")))
    services.accounts.create_account("mallory")
    theirs = pack_session(pi="pi_m", client_reference_id="mallory")  # same customer id
    response = deliver(client, event("checkout.session.completed", theirs))
    assert response.status_code == 200
    assert services.billing.ledger.account("alice")["stripe_customer_id"] == "cus_alice"
    assert services.billing.ledger.account("mallory")["stripe_customer_id"] is None


def test_the_same_event_delivered_ten_times_at_once_applies_once(services: Services) -> None:
    from concurrent.futures import ThreadPoolExecutor

    evt = event("checkout.session.completed", pack_session(pi="pi_race"))
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda _: services.billing.apply_event(evt), range(10)))
    assert sum(1 for r in results if r["applied"]) == 1
    assert sum(1 for r in results if r.get("duplicate")) == 9
    assert balance(services) == 100
