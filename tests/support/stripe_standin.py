"""STAND-IN for Stripe, for tests and local demos: never the real thing.

The server is `localstripe` (a stateful fake Stripe server from PyPI: customers, products,
webhook delivery signed with a registered secret, …). localstripe 1.15 has no Prices, Checkout
Sessions, Customer Portal sessions, Billing Meters or meter events, so this module adds those
routes to localstripe's own aiohttp app, and nothing else. It also adds `/_standin/…` routes
that play the customer's part (pay a Checkout Session, refund a payment): each makes the events
Stripe would send and has localstripe sign and deliver them to the registered webhook.

    python -m tests.support.stripe_standin --port 8420

Then STRIPE_API_BASE=http://127.0.0.1:8420 and STRIPE_SECRET_KEY=sk_test_anything, and register
the webhook: POST http://127.0.0.1:8420/_config/webhooks/photo3d url=… secret=whsec_…
"""

from __future__ import annotations

import argparse
import random
import string
import time
from typing import Any

from aiohttp import web
from localstripe import resources
from localstripe import server as ls
from localstripe.errors import UserError
from localstripe.webhooks import schedule_webhook

# localstripe pickles its store to /tmp/localstripe.pickle after every write: a file shared by
# every instance on the machine. Ours keep their state in memory only.
resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]

PRICES: dict[str, dict[str, Any]] = {}
SESSIONS: dict[str, dict[str, Any]] = {}
METERS: dict[str, dict[str, Any]] = {}
METER_EVENTS: list[dict[str, Any]] = []
IDEMPOTENT: dict[str, dict[str, Any]] = {}


def _id(prefix: str) -> str:
    return prefix + "".join(random.choice(string.ascii_letters + string.digits) for _ in range(14))


def _list(url: str, items: list[dict[str, Any]], limit: Any = None) -> dict[str, Any]:
    n = int(limit or 10)
    return {"object": "list", "url": url, "has_more": len(items) > n, "data": items[:n]}


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "invalid_request_error", "message": message}
    if code:
        body["code"] = code
    return ls.json_response({"error": body}, status=status)


class _Payload:
    """What localstripe's Event wants as its data object: something with _export()."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def _export(self) -> dict[str, Any]:
        return self.obj


def _emit(type_: str, obj: dict[str, Any]) -> None:
    """Have localstripe record, sign and deliver an event to the registered webhooks."""
    schedule_webhook(resources.Event(type_, _Payload(obj)))


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _customer_exists(customer: Any) -> bool:
    try:
        resources.Customer._api_retrieve(customer)
    except UserError:
        return False
    return True


# --- prices (lookup keys) -----------------------------------------------------------------
async def create_price(request: web.Request) -> web.Response:
    data = await ls.get_post_data(request) or {}
    try:
        resources.Product._api_retrieve(data.get("product", ""))
    except UserError:
        return _error(400, "No such product", "resource_missing")
    key = data.get("lookup_key")
    holder = next((p for p in PRICES.values() if key and p["lookup_key"] == key), None)
    if holder is not None:
        if str(data.get("transfer_lookup_key")).lower() != "true":
            return _error(400, f"A price with lookup key {key} already exists")
        holder["lookup_key"] = None
    recurring = data.get("recurring")
    if recurring and "meter" in recurring and recurring["meter"] not in METERS:
        return _error(400, "No such meter", "resource_missing")
    price = {
        "id": _id("price_"),
        "object": "price",
        "active": True,
        "currency": data.get("currency"),
        "unit_amount": int(data.get("unit_amount", 0)),
        "product": data.get("product"),
        "lookup_key": key,
        "recurring": recurring or None,
        "type": "recurring" if recurring else "one_time",
        "created": int(time.time()),
        "livemode": False,
    }
    PRICES[price["id"]] = price
    return ls.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    query = ls.unflatten_data(request.query)
    keys = query.get("lookup_keys")
    keys = [keys] if isinstance(keys, str) else keys
    found = [
        p
        for p in PRICES.values()
        if (not keys or p["lookup_key"] in keys)
        and (query.get("active") is None or str(p["active"]).lower() == query["active"])
    ]
    return ls.json_response(_list("/v1/prices", found, query.get("limit")))


async def get_price(request: web.Request) -> web.Response:
    price = PRICES.get(request.match_info["id"])
    return ls.json_response(price) if price else _error(404, "No such price", "resource_missing")


# --- checkout sessions --------------------------------------------------------------------
async def create_session(request: web.Request) -> web.Response:
    data = await ls.get_post_data(request) or {}
    mode = data.get("mode")
    if mode not in ("payment", "subscription", "setup"):
        return _error(400, "mode must be payment, subscription or setup")
    if not data.get("success_url"):
        return _error(400, "success_url is required")
    if data.get("customer") and not _customer_exists(data["customer"]):
        return _error(400, "No such customer", "resource_missing")
    amount, currency = 0, None
    for line in data.get("line_items") or []:
        price = PRICES.get(line.get("price", ""))
        if price is None:
            return _error(400, "No such price", "resource_missing")
        if (price["type"] == "recurring") != (mode == "subscription"):
            return _error(400, f"price {price['id']} does not fit mode {mode}")
        amount += price["unit_amount"] * int(line.get("quantity", 1))
        currency = price["currency"]
    session = {
        "id": _id("cs_test_"),
        "object": "checkout.session",
        "mode": mode,
        "status": "open",
        "payment_status": "unpaid",
        "customer": data.get("customer"),
        "client_reference_id": data.get("client_reference_id"),
        "metadata": data.get("metadata") or {},
        "amount_total": amount,
        "currency": currency,
        "success_url": data["success_url"],
        "cancel_url": data.get("cancel_url"),
        "payment_intent": None,
        "subscription": None,
        "livemode": False,
        "created": int(time.time()),
        "_subscription_data": data.get("subscription_data") or {},
        "_line_items": data.get("line_items") or [],
    }
    session["url"] = f"{_base(request)}/_config/standin/checkout/{session['id']}"
    SESSIONS[session["id"]] = session
    return ls.json_response(_public(session))


def _public(session: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}


async def get_session(request: web.Request) -> web.Response:
    session = SESSIONS.get(request.match_info["id"])
    if session is None:
        return _error(404, "No such checkout session", "resource_missing")
    return ls.json_response(_public(session))


async def pay_session(request: web.Request) -> web.Response:
    """The customer pays on the hosted page: the session completes and Stripe's events go out."""
    session = SESSIONS.get(request.match_info["id"])
    if session is None or session["status"] != "open":
        return _error(404, "No open checkout session")
    session.update(status="complete", payment_status="paid")
    if session["mode"] == "payment":
        session["payment_intent"] = _id("pi_")
        _emit("checkout.session.completed", _public(session))
    else:
        now = int(time.time())
        metadata = session["_subscription_data"].get("metadata") or {}
        price = PRICES[session["_line_items"][0]["price"]]
        subscription = {
            "id": _id("sub_"),
            "object": "subscription",
            "customer": session["customer"],
            "status": "active",
            "metadata": metadata,
            "items": {
                "data": [
                    {
                        "price": price,
                        "current_period_start": now,
                        "current_period_end": now + 30 * 86400,
                    }
                ]
            },
        }
        session["subscription"] = subscription["id"]
        _emit("checkout.session.completed", _public(session))
        _emit("customer.subscription.created", subscription)
        _emit(
            "invoice.paid",
            {
                "id": _id("in_"),
                "object": "invoice",
                "customer": session["customer"],
                "status": "paid",
                "amount_paid": price["unit_amount"]
                if price["recurring"].get("usage_type") != "metered"
                else 0,
                "parent": {
                    "type": "subscription_details",
                    "subscription_details": {
                        "subscription": subscription["id"],
                        "metadata": metadata,
                    },
                },
                "lines": {"data": [{"period": {"start": now, "end": now + 30 * 86400}}]},
            },
        )
    if "text/html" in request.headers.get("Accept", ""):  # the demo page's Pay button
        back = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])
        raise web.HTTPSeeOther(back)
    return ls.json_response(_public(session))


async def checkout_page(request: web.Request) -> web.Response:
    """The hosted payment page, reduced to one button (STAND-IN: no card is asked for)."""
    session = SESSIONS.get(request.match_info["id"])
    if session is None:
        return _error(404, "No such checkout session")
    amount = f"{session['amount_total'] / 100:.2f} {str(session['currency']).upper()}"
    cancel = session.get("cancel_url") or "/"
    return web.Response(
        content_type="text/html",
        text=f"""<!doctype html><title>Stand-in Checkout</title>
<h1>Stand-in Stripe Checkout (test only)</h1>
<p>{session["mode"]}: {amount} {session["metadata"]}</p>
<form method="post" action="/_config/standin/checkout/{session["id"]}/pay">
<button type="submit">Pay</button></form><p><a href="{cancel}">Cancel</a></p>""",
    )


async def portal_page(request: web.Request) -> web.Response:
    return web.Response(
        content_type="text/html",
        text="<!doctype html><title>Stand-in portal</title><h1>Stand-in customer portal</h1>",
    )


async def refund_payment(request: web.Request) -> web.Response:
    """Refund (part of) a Checkout payment: Stripe sends charge.refunded."""
    pi = request.match_info["pi"]
    session = next((s for s in SESSIONS.values() if s["payment_intent"] == pi), None)
    if session is None:
        return _error(404, "No such payment")
    data = await ls.get_post_data(request) or {}
    refunded = session.get("_refunded", 0) + int(data.get("amount", session["amount_total"]))
    session["_refunded"] = min(refunded, session["amount_total"])
    charge = {
        "id": _id("ch_"),
        "object": "charge",
        "payment_intent": pi,
        "customer": session["customer"],
        "amount": session["amount_total"],
        "amount_refunded": session["_refunded"],
        "refunded": session["_refunded"] >= session["amount_total"],
    }
    _emit("charge.refunded", charge)
    return ls.json_response(charge)


# --- customer portal ----------------------------------------------------------------------
async def create_portal_session(request: web.Request) -> web.Response:
    data = await ls.get_post_data(request) or {}
    if not _customer_exists(data.get("customer")):
        return _error(400, "No such customer", "resource_missing")
    session_id = _id("bps_")
    return ls.json_response(
        {
            "id": session_id,
            "object": "billing_portal.session",
            "customer": data["customer"],
            "return_url": data.get("return_url"),
            "url": f"{_base(request)}/_config/standin/portal/{session_id}",
            "livemode": False,
            "created": int(time.time()),
        }
    )


# --- billing meters and meter events ------------------------------------------------------
async def create_meter(request: web.Request) -> web.Response:
    data = await ls.get_post_data(request) or {}
    if any(m["event_name"] == data.get("event_name") for m in METERS.values()):
        return _error(400, "A meter with this event_name already exists")
    meter = {
        "id": _id("mtr_"),
        "object": "billing.meter",
        "display_name": data.get("display_name"),
        "event_name": data.get("event_name"),
        "default_aggregation": data.get("default_aggregation") or {"formula": "sum"},
        "status": "active",
        "livemode": False,
        "created": int(time.time()),
    }
    METERS[meter["id"]] = meter
    return ls.json_response(meter)


async def list_meters(request: web.Request) -> web.Response:
    query = ls.unflatten_data(request.query)
    return ls.json_response(_list("/v1/billing/meters", list(METERS.values()), query.get("limit")))


async def create_meter_event(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if key and key in IDEMPOTENT:  # Stripe replays the first response for a repeated key
        return ls.json_response(IDEMPOTENT[key])
    data = await ls.get_post_data(request) or {}
    if not any(m["event_name"] == data.get("event_name") for m in METERS.values()):
        return _error(400, "No active meter for this event_name")
    payload = data.get("payload") or {}
    if not _customer_exists(payload.get("stripe_customer_id")):
        return _error(400, "No such customer", "resource_missing")
    identifier = data.get("identifier") or _id("mev_")
    if any(e["identifier"] == identifier for e in METER_EVENTS):
        return _error(400, "An event with this identifier already exists", "duplicate_meter_event")
    event = {
        "object": "billing.meter_event",
        "event_name": data["event_name"],
        "identifier": identifier,
        "payload": payload,
        "timestamp": int(data.get("timestamp") or time.time()),
        "created": int(time.time()),
        "livemode": False,
    }
    METER_EVENTS.append(event)
    if key:
        IDEMPOTENT[key] = event
    return ls.json_response(event)


async def list_meter_events(request: web.Request) -> web.Response:
    return ls.json_response({"data": METER_EVENTS})


def add_routes(app: web.Application) -> None:
    """Add what localstripe lacks to its app (before it starts)."""
    app.router.add_post("/v1/prices", create_price)
    app.router.add_get("/v1/prices", list_prices)
    app.router.add_get("/v1/prices/{id}", get_price)
    app.router.add_post("/v1/checkout/sessions", create_session)
    app.router.add_get("/v1/checkout/sessions/{id}", get_session)
    app.router.add_post("/v1/billing_portal/sessions", create_portal_session)
    app.router.add_post("/v1/billing/meters", create_meter)
    app.router.add_get("/v1/billing/meters", list_meters)
    app.router.add_post("/v1/billing/meter_events", create_meter_event)
    # The customer's side, for tests and demos (no auth, like localstripe's /_config routes).
    app.router.add_get("/_config/standin/checkout/{id}", checkout_page)
    app.router.add_post("/_config/standin/checkout/{id}/pay", pay_session)
    app.router.add_get("/_config/standin/portal/{id}", portal_page)
    app.router.add_post("/_config/standin/payments/{pi}/refund", refund_payment)
    app.router.add_get("/_config/standin/meter_events", list_meter_events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    args = parser.parse_args()
    add_routes(ls.app)
    web.run_app(ls.app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
