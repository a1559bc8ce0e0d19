"""Billing through the real stack (`photo3d serve`: Ray Serve ingress + CPU generator, real
PostgreSQL) and the Stripe STAND-IN (localstripe plus tests/support/stripe_standin.py):
signup credits, 402, capture on success, a pack bought through Checkout with the signed webhook
arriving through the Serve proxy, and a metered plan whose usage the ingress reports to Stripe."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support import pg
from tests.support.images import object_photo
from tests.support.stack import ROOT, Stack, run_stack
from tests.support.stripe_server import run_standin

if os.environ.get("CI") != "true":
    pytest.importorskip("localstripe", reason="localstripe (the dev extra) is not installed")

pytestmark = pytest.mark.slow
SECRET = "whsec_e2e_photo3d"
PHOTO = object_photo(128)


@pytest.fixture(scope="module")
def billed(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    standin_runner = run_standin(tmp_path_factory.mktemp("stripe"))
    standin = next(standin_runner)
    env = {
        "STRIPE_SECRET_KEY": "sk_test_e2e",
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_API_BASE": standin,
        "PHOTO3D_SIGNUP_CREDITS": "2",
        "PHOTO3D_METER_POLL_SECONDS": "1",
    }
    setup = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "billing", "setup"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert setup.returncode == 0, setup.stderr
    assert "created price photo3d_pack_starter" in setup.stdout
    try:
        for url in pg.clone_database(pg_admin, prefix="bill"):
            with run_stack(tmp_path_factory.mktemp("stack"), url, env=env) as stack:
                httpx.post(
                    f"{standin}/_config/webhooks/photo3d",
                    data={"url": f"{stack.url}/api/v1/billing/webhook", "secret": SECRET},
                ).raise_for_status()
                yield stack, standin
    finally:
        standin_runner.close()


def wait_for(check: Callable[[], Any], what: str, seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def submit(client: httpx.Client) -> httpx.Response:
    return client.post("/api/v1/generate", files={"image": ("toy.png", PHOTO, "image/png")})


def test_credits_checkout_and_metered_usage_through_the_stack(billed: tuple[Stack, str]) -> None:
    stack, standin = billed
    with stack.client() as client:
        assert client.get("/api/v1/account").json()["balance"] == 2  # signup credits
        first, second = submit(client), submit(client)
        assert (first.status_code, second.status_code) == (202, 202)
        refused = submit(client)
        assert refused.status_code == 402
        assert refused.json()["error"]["code"] == "insufficient_credits"
        for task in (first.json(), second.json()):
            done = stack.wait_for_task(client, task["id"])
            assert done["status"] == "succeeded" and done["credits_charged"] == 1
        ledger = client.get("/api/v1/account/ledger").json()["entries"]
        assert sorted(e["kind"] for e in ledger) == sorted(
            ["grant", "reserve", "reserve", "capture", "capture"]
        )
        assert sum(e["amount"] for e in ledger) == 0

        # A pack through Checkout: the stand-in signs the event, the Serve proxy delivers it.
        session = client.post("/api/v1/billing/checkout", json={"pack": "starter"}).json()
        httpx.post(f"{standin}/_config/standin/checkout/{session['id']}/pay").raise_for_status()
        wait_for(lambda: client.get("/api/v1/account").json()["balance"] == 100, "the pack")

        # A metered plan: no credits spent; the ingress reports each success to Stripe once.
        session = client.post("/api/v1/billing/checkout", json={"plan": "metered"}).json()
        httpx.post(f"{standin}/_config/standin/checkout/{session['id']}/pay").raise_for_status()
        wait_for(
            lambda: client.get("/api/v1/account").json()["billing"]["metered"], "the subscription"
        )
        metered = submit(client).json()
        assert metered["credits_reserved"] == 0
        assert stack.wait_for_task(client, metered["id"])["status"] == "succeeded"

        def reported() -> list[dict[str, Any]]:
            events = httpx.get(f"{standin}/_config/standin/meter_events").json()["data"]
            return [e for e in events if e["identifier"] == metered["id"]]

        events = wait_for(reported, "the meter event")
        assert len(events) == 1
        time.sleep(2.5)  # two more reporter rounds: still exactly one
        assert len(reported()) == 1
        assert client.get("/api/v1/account").json()["balance"] == 100
