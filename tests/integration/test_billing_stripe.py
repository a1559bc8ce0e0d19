"""Billing against a Stripe STAND-IN (localstripe from PyPI, plus tests/support/stripe_standin.py
for the Prices, Checkout, portal and meter routes localstripe lacks), driven through the
official `stripe` SDK: `billing setup`, Checkout for packs and plans with the webhooks the
stand-in signs and delivers to the real app, the portal, and metered usage through the outbox
while Stripe is unreachable and after it comes back."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from serve_app.billing import Billing
from serve_app.service import Services
from serve_app.settings import Settings
from tests.integration.test_billing_credits import PHOTO, serve, worker
from tests.support.app import open_services
from tests.support.stack import free_port
from tests.support.stripe_server import run_standin

if os.environ.get("CI") != "true":
    pytest.importorskip("localstripe", reason="localstripe (the dev extra) is not installed")

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "whsec_standin_photo3d"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stand-in Stripe server on a free loopback port."""
    yield from run_standin(tmp_path_factory.mktemp("stripe"))


@pytest.fixture
def services(settings: Settings, standin: str) -> Iterator[Services]:
    billing = settings.model_copy(
        update={
            "billing": True,
            "stripe_secret_key": SecretStr("sk_test_photo3d"),
            "stripe_webhook_secret": SecretStr(WEBHOOK_SECRET),
            "stripe_api_base": standin,
            "max_active_tasks": 100,
        }
    )
    with open_services(billing) as opened:
        opened.billing.setup()
        yield opened


def wait_for(check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the webhook to be applied")
        time.sleep(0.2)


@contextlib.contextmanager
def app_with_webhook(services: Services, standin: str) -> Iterator[httpx.Client]:
    """The real app on a real port, registered as the stand-in's webhook endpoint."""
    with serve(services) as base, httpx.Client(base_url=base, timeout=30) as client:
        httpx.post(
            f"{standin}/_config/webhooks/photo3d",
            data={"url": f"{base}/api/v1/billing/webhook", "secret": WEBHOOK_SECRET},
        ).raise_for_status()
        yield client


def balance(services: Services) -> int:
    totals = services.billing.ledger.totals("local")  # one snapshot: sum and cached balance
    assert totals["total"] == totals["balance"]
    return int(totals["balance"])


def test_billing_setup_is_idempotent_and_follows_config_changes(
    services: Services, tmp_path: Path
) -> None:
    again = services.billing.setup()  # the fixture already ran it once
    assert all("up to date" in line for line in again), again
    assert len(again) == 4  # two packs and two plans in the packaged billing.yaml
    cheaper = tmp_path / "billing.yaml"
    cheaper.write_text(
        "packs: [{name: starter, credits: 100, amount: 400}]\n"
        "plans: [{name: hobby, amount: 900, allowance: 200}]\n"
    )
    changed = Billing(services.settings.model_copy(update={"billing_config": cheaper}), services.db)
    lines = changed.setup()
    assert any(line.startswith("updated price photo3d_pack_starter") for line in lines), lines
    assert any("photo3d_plan_hobby is up to date" in line for line in lines), lines
    price = changed.stripe.v1.prices.list(params={"lookup_keys": ["photo3d_pack_starter"]})
    assert [p.unit_amount for p in price.data] == [400]  # the lookup key moved to the new price


def test_buying_a_pack_through_checkout_credits_the_account(
    services: Services, standin: str
) -> None:
    with app_with_webhook(services, standin) as client:
        response = client.post("/api/v1/billing/checkout", json={"pack": "starter"})
        assert response.status_code == 200, response.text
        session = response.json()
        assert session["url"].startswith(standin) and session["id"].startswith("cs_")
        assert balance(services) == 0
        httpx.post(f"{standin}/_config/standin/checkout/{session['id']}/pay").raise_for_status()
        wait_for(lambda: balance(services) == 100)
        account = client.get("/api/v1/account").json()
        assert account["balance"] == 100
        assert account["billing"]["recent_ledger"][0]["kind"] == "purchase"
        # A refund of the payment claws the credits back (charge.refunded from the stand-in).
        purchase = services.billing.entries("local", limit=1)[0]
        pi = purchase["metadata"]["payment_intent"]
        httpx.post(f"{standin}/_config/standin/payments/{pi}/refund").raise_for_status()
        wait_for(lambda: balance(services) == 0)


def test_a_plan_subscription_grants_its_allowance(services: Services, standin: str) -> None:
    with app_with_webhook(services, standin) as client:
        session = client.post("/api/v1/billing/checkout", json={"plan": "hobby"}).json()
        httpx.post(f"{standin}/_config/standin/checkout/{session['id']}/pay").raise_for_status()
        wait_for(lambda: balance(services) == 200)
        wait_for(lambda: client.get("/api/v1/account").json()["billing"]["plan"] == "hobby")
        portal = client.post("/api/v1/billing/portal")
        assert portal.status_code == 200 and portal.json()["url"].startswith(standin)


def test_checkout_errors_are_clear(services: Services, standin: str) -> None:
    with serve(services) as base, httpx.Client(base_url=base) as client:
        unknown = client.post("/api/v1/billing/checkout", json={"pack": "gold"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_pack"
        both = client.post("/api/v1/billing/checkout", json={"pack": "starter", "plan": "hobby"})
        assert both.status_code == 422
        pricing = httpx.get(f"{base}/api/v1/pricing").json()
        assert [p["name"] for p in pricing["packs"]] == ["starter", "studio"]
        assert pricing["packs"][0] == {
            "name": "starter",
            "credits": 100,
            "amount": 500,
            "currency": "usd",
        }
        assert pricing["prices"]["backends"]["cpu"] == 1


def test_metered_usage_is_reported_once_even_through_a_stripe_outage(
    services: Services, standin: str
) -> None:
    with app_with_webhook(services, standin) as client:
        session = client.post("/api/v1/billing/checkout", json={"plan": "metered"}).json()
        httpx.post(f"{standin}/_config/standin/checkout/{session['id']}/pay").raise_for_status()
        wait_for(lambda: client.get("/api/v1/account").json()["billing"]["metered"] is True)
        # A metered account needs no credits: the generation is billed by Stripe afterwards.
        task = client.post(
            "/api/v1/generate", files={"image": ("p.png", PHOTO, "image/png")}
        ).json()
        assert task["credits_reserved"] == 0
        assert worker(services).run_once()
    assert services.billing.ledger.meter_outbox_counts() == {"pending": 1, "sent": 0}

    down = services.settings.model_copy(
        update={"stripe_api_base": f"http://127.0.0.1:{free_port()}"}
    )
    unreachable = Billing(down, services.db)
    assert unreachable.deliver_meter_events() == 0  # Stripe unreachable: kept, not lost
    assert services.billing.ledger.meter_outbox_counts() == {"pending": 1, "sent": 0}

    with services.db.connection() as conn:  # skip the backoff: Stripe is back
        conn.execute("UPDATE meter_outbox SET next_try_at = now()")
    assert services.billing.deliver_meter_events() == 1
    assert services.billing.deliver_meter_events() == 0
    assert services.billing.ledger.meter_outbox_counts() == {"pending": 0, "sent": 1}
    events = httpx.get(f"{standin}/_config/standin/meter_events").json()["data"]
    mine = [e for e in events if e["identifier"] == task["id"]]
    assert len(mine) == 1 and mine[0]["event_name"] == "photo3d_generation"


def test_cli_billing_setup_and_credits(
    services: Services,
    standin: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from serve_app.cli import main
    from serve_app.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", str(services.settings.database_url))
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_cli")
    monkeypatch.setenv("STRIPE_API_BASE", standin)
    get_settings.cache_clear()
    try:
        assert main(["billing", "setup"]) == 0
        out = capsys.readouterr().out
        assert out.count("is up to date") == 4 and "sk_test_cli" not in out
        assert main(["credits", "grant", "local", "25", "--reason", "welcome"]) == 0
        assert "balance 25" in capsys.readouterr().out
        assert main(["credits", "grant", "local", "5"]) == 2  # a grant must say why
        assert main(["credits", "show", "local"]) == 0
        shown = capsys.readouterr().out
        assert "local: balance 25 credits" in shown and "welcome" in shown
        assert main(["credits", "show", "nobody"]) == 2
    finally:
        get_settings.cache_clear()


def test_admin_grant_route(services: Services) -> None:
    services.accounts.create_account("boss", is_admin=True)
    admin_key = services.accounts.create_key("boss")[0]
    services.accounts.create_account("carol")
    user_key = services.accounts.create_key("carol")[0]
    with serve(services) as base, httpx.Client(base_url=base) as client:
        body = {"credits": 40, "reason": "support ticket 12"}
        denied = client.post(
            "/api/v1/admin/accounts/carol/credits",
            json=body,
            headers={"Authorization": f"Bearer {user_key}"},
        )
        assert denied.status_code == 403
        granted = client.post(
            "/api/v1/admin/accounts/carol/credits",
            json=body,
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        assert granted.status_code == 201 and granted.json()["balance_after"] == 40
        missing = client.post(
            "/api/v1/admin/accounts/nobody/credits",
            json=body,
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        assert missing.status_code == 404
        mine = client.get("/api/v1/account", headers={"Authorization": f"Bearer {user_key}"})
        assert mine.json()["balance"] == 40


def test_a_grant_reason_postgresql_cannot_store_is_a_4xx(services: Services) -> None:
    services.accounts.create_account("boss", is_admin=True)
    admin_key = services.accounts.create_key("boss")[0]
    with serve(services) as base, httpx.Client(base_url=base) as client:
        response = client.post(
            "/api/v1/admin/accounts/boss/credits",
            json={"credits": 5, "reason": "nul \u0000 byte"},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
    assert response.status_code == 422
    assert services.billing.ledger.account("boss")["balance"] == 0
