"""Billing on the web page, in a real Chromium: the real app with billing on (real PostgreSQL,
served by uvicorn; no Ray needed for these screens) and the Stripe STAND-IN (localstripe plus
tests/support/stripe_standin.py). Not enough credits → the 402 message with a button to buy;
Buy → the stand-in's Checkout page → Pay → back on the page, and the balance in the header
goes up when the signed webhook lands."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from serve_app.service import Services
from serve_app.settings import Settings
from tests.integration.test_billing_credits import serve
from tests.support.app import open_services
from tests.support.images import object_photo
from tests.support.stack import free_port
from tests.support.stripe_server import run_standin

if os.environ.get("CI") != "true":
    pytest.importorskip("localstripe", reason="localstripe (the dev extra) is not installed")

SECRET = "whsec_browser_photo3d"


@pytest.fixture
def billed_page(
    browser: Any, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Services, str]]:
    standin_runner = run_standin(tmp_path_factory.mktemp("stripe"))
    standin = next(standin_runner)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    billed = settings.model_copy(
        update={
            "stripe_secret_key": SecretStr("sk_test_browser"),
            "stripe_webhook_secret": SecretStr(SECRET),
            "stripe_api_base": standin,
        }
    )
    try:
        with open_services(billed) as services, serve(services, port):
            services.billing.setup()
            httpx.post(
                f"{standin}/_config/webhooks/photo3d",
                data={"url": f"{base}/api/v1/billing/webhook", "secret": SECRET},
            ).raise_for_status()
            context = browser.new_context(base_url=base)
            page = context.new_page()
            try:
                yield page, services, standin
            finally:
                context.close()
    finally:
        standin_runner.close()


def test_buying_credits_from_the_402_message(
    billed_page: tuple[Any, Services, str], tmp_path: Any
) -> None:
    page, services, _standin = billed_page
    photo = tmp_path / "toy.png"
    photo.write_bytes(object_photo(128))
    page.goto("/")
    page.wait_for_selector("#credits:not([hidden])")
    assert page.inner_text("#credits") == "0 credits"

    page.set_input_files("#file-input", str(photo))
    page.click("#generate-button")
    page.wait_for_selector("#create-error:not([hidden])")
    assert "Not enough credits" in page.inner_text("#create-error")
    assert "costs 1 credits" in page.inner_text("#create-error")

    page.click("#create-error .buy-link")
    page.wait_for_selector("#account-dialog[open] #pricing:not([hidden])")
    assert "100 credits" in page.inner_text("#pricing-packs")
    page.click("#pricing-packs li:first-child button")  # Buy the starter pack
    page.wait_for_selector("text=Stand-in Stripe Checkout")
    page.click("button:has-text('Pay')")
    # Back on the page from Stripe's success_url (?checkout=success, which the page then
    # drops from the address bar): it says so.
    page.wait_for_selector("#toast:has-text('Payment received')", timeout=20_000)
    page.wait_for_function(
        "() => document.querySelector('#credits').textContent === '100 credits'", timeout=20_000
    )
    assert services.billing.ledger.account("local")["balance"] == 100

    page.click("#account-button")
    page.click("#billing .ledger-box summary")
    assert "+100 Bought" in page.inner_text("#billing-ledger")
    page.click("#account-dialog [data-close]")

    # Now the model is accepted, and the header shows the credit it holds.
    page.set_input_files("#file-input", str(photo))
    page.click("#generate-button")
    page.wait_for_url("**/#/task/*")
    page.wait_for_function(
        "() => document.querySelector('#credits').textContent === '99 credits'", timeout=20_000
    )
