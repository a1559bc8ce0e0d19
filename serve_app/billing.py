"""Billing: prices in credits, credit packs and plans sold through Stripe, Stripe webhooks
applied to the ledger once per event, and metered usage reported to Stripe from an outbox.

No HTTP here (the routes are in api/billing.py) and no SQL (the ledger is in store/ledger.py).
PostgreSQL is the source of truth for money: Stripe is told what happened (meter events) and
tells us what was paid (signed webhooks); a balance never depends on a call to Stripe.
The `stripe` SDK is imported only when billing is on and Stripe is actually called."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.errors import Conflict, InvalidInput, NotFound, Photo3DError, ServiceUnavailable
from serve_app.settings import Settings
from serve_app.store.db import Database, Row
from serve_app.store.ledger import Ledger, LedgerTx, insufficient

log = logging.getLogger(__name__)

ACTIVE_STATUSES = frozenset({"active", "trialing"})


class InvalidSignature(Photo3DError):
    """A webhook whose Stripe-Signature is missing, forged or stale (400; nothing applied)."""

    code = "invalid_signature"
    http_status = 400


class RetryLater(Conflict):
    """An event that refers to something not seen yet (a reordered delivery): answered 409 so
    that Stripe delivers it again later; nothing was applied or recorded."""

    code = "event_out_of_order"


# --- configuration ---------------------------------------------------------------------
class Pack(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    credits: int = Field(gt=0)
    amount: int = Field(gt=0, description="price in the currency's smallest unit")


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    interval: Literal["month", "year"] = "month"
    amount: int = Field(default=0, ge=0, description="subscription price per interval")
    allowance: int = Field(default=0, ge=0, description="credits granted per paid invoice")
    allowance_expires: bool = False
    metered: bool = False
    unit_amount: int = Field(default=0, ge=0, description="metered: price per generation")
    meter_event: str = "photo3d_generation"


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: int = Field(default=1, ge=0)
    backends: dict[str, int] = Field(default_factory=dict)
    surcharges: dict[str, dict[str, int]] = Field(default_factory=dict)


class BillingConfig(BaseModel):
    """Prices, packs and plans (serve_app/billing.yaml, or PHOTO3D_BILLING_CONFIG)."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    prices: PriceTable = Field(default_factory=PriceTable)
    packs: list[Pack] = Field(default_factory=list)
    plans: list[Plan] = Field(default_factory=list)

    def price(self, options: dict[str, Any]) -> int:
        """Credits one generation with these (validated) options costs."""
        backend = str(options.get("backend") or "")
        credits = self.prices.backends.get(backend, self.prices.default)
        for option, table in self.prices.surcharges.items():
            value = options.get(option)
            if value is not None:
                credits += table.get(str(value), 0)
        return credits

    def pack(self, name: str | None) -> Pack | None:
        return next((p for p in self.packs if p.name == name), None)

    def plan(self, name: str | None) -> Plan | None:
        return next((p for p in self.plans if p.name == name), None)


def lookup_key(kind: str, name: str) -> str:
    """The Stripe price lookup key of a pack or plan: how setup and checkout find the price."""
    return f"photo3d_{kind}_{name}"


def load_config(path: Path | None) -> BillingConfig:
    """The billing config at `path`, or the packaged defaults; a bad file stops startup."""
    if path is None:
        text = resources.files("serve_app").joinpath("billing.yaml").read_text()
    else:
        text = Path(path).read_text()
    try:
        return BillingConfig.model_validate(yaml.safe_load(text) or {})
    except (ValidationError, yaml.YAMLError) as exc:
        raise InvalidInput(f"billing config {path}: {exc}", code="config_error") from exc


@dataclass(frozen=True)
class Quote:
    """What a generation will cost an account: credits to reserve, or a meter event."""

    credits: int
    meter_event: str | None = None


def _get(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]…, None where any step is missing."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _ts(value: Any) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(value), dt.UTC) if value else None


class Billing:
    """The billing service of one process."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.ledger = Ledger(db)
        self.config = load_config(settings.billing_config)
        self._meter_stop = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.settings.billing_enabled

    # --- prices and balances ------------------------------------------------------------
    def pricing(self) -> dict[str, Any]:
        """What `GET /api/v1/pricing` shows (public)."""
        cfg = self.config
        return {
            "enabled": self.enabled,
            "currency": cfg.currency,
            "prices": cfg.prices.model_dump(),
            "packs": [{**p.model_dump(), "currency": cfg.currency} for p in cfg.packs],
            "plans": [{**p.model_dump(), "currency": cfg.currency} for p in cfg.plans],
        }

    def ensure_signup_grant(self, account_id: str) -> None:
        """PHOTO3D_SIGNUP_CREDITS, granted once to each account while billing is on."""
        if self.settings.signup_credits <= 0:
            return
        with self.ledger.transaction() as tx:
            if tx.claim_signup_grant(account_id):
                tx.post(account_id, "grant", self.settings.signup_credits, reason="signup credits")

    def quote(self, account_id: str, options: dict[str, Any]) -> Quote:
        """The price of a generation for this account; 402 up front when it cannot pay
        (the reservation in the insert transaction is what actually guards the balance)."""
        self.ensure_signup_grant(account_id)
        account = self.ledger.account(account_id)
        if account is None:
            raise NotFound(f"account {account_id} not found", code="account_not_found")
        plan = self._active_plan(account)
        if plan is not None and plan.metered:
            return Quote(0, plan.meter_event)
        credits = self.config.price(options)
        if account["balance"] < credits:
            raise insufficient(credits, int(account["balance"]))
        return Quote(credits)

    def _active_plan(self, account: Row) -> Plan | None:
        if account.get("plan_status") not in ACTIVE_STATUSES:
            return None
        return self.config.plan(account.get("plan"))

    def account_view(self, account_id: str, *, recent: int = 5) -> dict[str, Any]:
        """Balance, plan, period and usage for `GET /api/v1/account`."""
        if not self.enabled:
            return {"enabled": False}
        self.ensure_signup_grant(account_id)
        account = self.ledger.account(account_id) or {}
        usage = self.ledger.usage_since(account_id, account.get("period_start"))
        plan = self._active_plan(account) if account else None
        return {
            "enabled": True,
            "balance": int(account.get("balance", 0)),
            "plan": plan.name if plan else None,
            "plan_status": account.get("plan_status"),
            "metered": bool(plan and plan.metered),
            "customer": bool(account.get("stripe_customer_id")),
            "period_end": account.get("period_end"),
            "usage_this_period": {
                "generations": int(usage["generations"]),
                "credits": int(usage["credits"]),
            },
            "recent_ledger": self.entries(account_id, limit=recent),
        }

    def entries(
        self, account_id: str, *, limit: int, before_id: int | None = None
    ) -> list[dict[str, Any]]:
        return [
            {**r, "task_id": str(r["task_id"]) if r["task_id"] else None}
            for r in self.ledger.entries(account_id, limit=limit, before_id=before_id)
        ]

    def grant(self, account_id: str, credits: int, reason: str) -> Row:
        """An operator's grant (or, negative, an adjustment down to at most zero)."""
        if credits == 0:
            raise InvalidInput("grant a non-zero number of credits", code="invalid_credits")
        if not reason.strip():
            raise InvalidInput("say why (--reason)", code="missing_reason")
        with self.ledger.transaction() as tx:
            row = tx.post(
                account_id,
                "grant" if credits > 0 else "adjustment",
                credits,
                reason=reason.strip()[:500],
                allowance_delta=min(credits, 0),  # like a generation, a debit uses allowance first
            )
        if row is None:
            raise NotFound(f"account {account_id} not found", code="account_not_found")
        return row

    # --- Stripe: outbound ---------------------------------------------------------------
    @cached_property
    def stripe(self) -> Any:
        """A StripeClient for STRIPE_SECRET_KEY (and STRIPE_API_BASE, a local stand-in)."""
        key = self.settings.stripe_secret_key
        if key is None:
            raise ServiceUnavailable(
                "Stripe is not configured on this server (STRIPE_SECRET_KEY)",
                code="billing_not_configured",
            )
        import stripe

        base = self.settings.stripe_api_base
        addresses: Any = (
            {"api": base, "meter_events": base, "files": base, "connect": base} if base else None
        )
        return stripe.StripeClient(
            key.get_secret_value(), base_addresses=addresses, max_network_retries=1
        )

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Stripe call; Stripe's errors become a 503 without leaking keys."""
        import stripe

        try:
            return fn(*args, **kwargs)
        except stripe.StripeError as exc:
            log.warning("stripe %s failed: %s", what, type(exc).__name__)
            raise ServiceUnavailable(
                f"Stripe could not {what} ({type(exc).__name__}); retry shortly",
                code="stripe_unavailable",
            ) from exc

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise NotFound("billing is not enabled on this server", code="billing_disabled")

    def _customer(self, account_id: str) -> str:
        """The account's Stripe customer, created on first need."""
        account = self.ledger.account(account_id)
        if account is None:
            raise NotFound(f"account {account_id} not found", code="account_not_found")
        if account["stripe_customer_id"]:
            return str(account["stripe_customer_id"])
        customer = self._call(
            "create a customer",
            self.stripe.v1.customers.create,
            params={"name": account_id, "metadata": {"account_id": account_id}},
        )
        with self.ledger.transaction() as tx:
            tx.set_customer(account_id, customer.id)
            stored = tx.account(account_id)
        return str(stored["stripe_customer_id"]) if stored else str(customer.id)

    def _price_id(self, key: str) -> str:
        prices = self._call(
            "look up a price",
            self.stripe.v1.prices.list,
            params={"lookup_keys": [key], "active": True, "limit": 1},
        )
        if not prices.data:
            raise ServiceUnavailable(
                f"no Stripe price with lookup key {key}; run `photo3d billing setup`",
                code="billing_not_set_up",
            )
        return str(prices.data[0].id)

    def _return_url(self, request_base: str | None) -> str:
        return self.settings.billing_return_url or request_base or "http://127.0.0.1:8000/"

    def checkout(
        self,
        account_id: str,
        *,
        pack: str | None = None,
        plan: str | None = None,
        request_base: str | None = None,
    ) -> dict[str, str]:
        """A Checkout Session URL: a credit pack (payment) or a plan (subscription)."""
        self._require_enabled()
        if (pack is None) == (plan is None):
            raise InvalidInput("send either pack or plan", code="invalid_checkout")
        metered = False
        if pack is not None:
            chosen_pack = self.config.pack(pack)
            if chosen_pack is None:
                raise NotFound(f"no credit pack named {pack[:40]}", code="unknown_pack")
            key, mode, meta = lookup_key("pack", chosen_pack.name), "payment", {"pack": pack}
        else:
            chosen_plan = self.config.plan(plan)
            if chosen_plan is None:
                raise NotFound(f"no plan named {str(plan)[:40]}", code="unknown_plan")
            key, mode = lookup_key("plan", chosen_plan.name), "subscription"
            meta, metered = {"plan": chosen_plan.name}, chosen_plan.metered
        metadata = {"account_id": account_id, **meta}
        line: dict[str, Any] = {"price": self._price_id(key)}
        if not metered:
            line["quantity"] = 1  # metered prices take no quantity
        back = self._return_url(request_base)
        sep = "&" if "?" in back else "?"
        params: dict[str, Any] = {
            "mode": mode,
            "customer": self._customer(account_id),
            "client_reference_id": account_id,
            "metadata": metadata,
            "line_items": [line],
            "success_url": f"{back}{sep}checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{back}{sep}checkout=canceled",
        }
        if mode == "subscription":
            params["subscription_data"] = {"metadata": metadata}
        session = self._call(
            "start a checkout", self.stripe.v1.checkout.sessions.create, params=params
        )
        return {"id": str(session.id), "url": str(session.url)}

    def portal(self, account_id: str, *, request_base: str | None = None) -> dict[str, str]:
        """A Customer Portal URL (invoices, payment methods, plan changes and cancel)."""
        self._require_enabled()
        session = self._call(
            "open the billing portal",
            self.stripe.v1.billing_portal.sessions.create,
            params={
                "customer": self._customer(account_id),
                "return_url": self._return_url(request_base),
            },
        )
        return {"url": str(session.url)}

    def setup(self) -> list[str]:
        """Create or update the configured products and prices in Stripe, found by id and
        lookup key, so running it twice changes nothing. Returns what it did, line by line."""
        client = self.stripe
        cfg = self.config
        done: list[str] = []
        for kind, items in (("pack", cfg.packs), ("plan", cfg.plans)):
            for item in items:
                product_id = lookup_key(kind, item.name)
                label = f"photo3d {kind} {item.name}"
                try:
                    client.v1.products.retrieve(product_id)
                except Exception as exc:  # stripe.InvalidRequestError: no such product
                    if getattr(exc, "http_status", None) != 404:
                        raise
                    client.v1.products.create(
                        params={"id": product_id, "name": label, "metadata": {kind: item.name}}
                    )
                    done.append(f"created product {product_id}")
                want = self._price_params(kind, item, product_id)
                key = lookup_key(kind, item.name)
                found = client.v1.prices.list(params={"lookup_keys": [key], "limit": 1}).data
                if found and self._same_price(found[0].to_dict(), want):
                    done.append(f"price {key} is up to date ({found[0].id})")
                    continue
                price = client.v1.prices.create(
                    params={**want, "lookup_key": key, "transfer_lookup_key": True}
                )
                done.append(f"{'updated' if found else 'created'} price {key} ({price.id})")
        return done

    def _price_params(self, kind: str, item: Pack | Plan, product_id: str) -> dict[str, Any]:
        params: dict[str, Any] = {"product": product_id, "currency": self.config.currency}
        if isinstance(item, Pack):
            params["unit_amount"] = item.amount
        elif item.metered:
            params["unit_amount"] = item.unit_amount
            params["recurring"] = {
                "interval": item.interval,
                "usage_type": "metered",
                "meter": self._meter_id(item.meter_event),
            }
        else:
            params["unit_amount"] = item.amount
            params["recurring"] = {"interval": item.interval}
        return params

    @staticmethod
    def _same_price(price: dict[str, Any], want: dict[str, Any]) -> bool:
        recurring = price.get("recurring") or {}
        want_recurring = want.get("recurring") or {}
        return bool(
            price.get("active", True)
            and price.get("unit_amount") == want["unit_amount"]
            and price.get("currency") == want["currency"]
            and price.get("product") == want["product"]
            and recurring.get("interval") == want_recurring.get("interval")
            and (recurring.get("usage_type") or "licensed")
            == (want_recurring.get("usage_type") or "licensed")
        )

    def _meter_id(self, event_name: str) -> str:
        meters = self.stripe.v1.billing.meters.list(params={"limit": 100}).data
        for meter in meters:
            if meter.to_dict().get("event_name") == event_name:
                return str(meter.id)
        meter = self.stripe.v1.billing.meters.create(
            params={
                "display_name": f"photo3d generations ({event_name})",
                "event_name": event_name,
                "default_aggregation": {"formula": "count"},
            }
        )
        return str(meter.id)

    # --- Stripe: webhooks ---------------------------------------------------------------
    def handle_webhook(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """Verify a webhook with the SDK and apply its event once. Bad or stale signature →
        InvalidSignature (nothing applied); a replay → applied False, duplicate True."""
        self._require_enabled()
        secret = self.settings.stripe_webhook_secret
        if secret is None:
            raise ServiceUnavailable(
                "the webhook secret is not configured (STRIPE_WEBHOOK_SECRET)",
                code="billing_not_configured",
            )
        import stripe

        try:
            stripe.WebhookSignature.verify_header(
                payload, signature, secret.get_secret_value(), tolerance=300
            )
            event = json.loads(payload)
        except (stripe.SignatureVerificationError, ValueError) as exc:
            raise InvalidSignature(
                "the Stripe-Signature header is missing, wrong or too old", code=None
            ) from exc
        if not isinstance(event, dict) or not isinstance(event.get("id"), str):
            raise InvalidSignature("the payload is not a Stripe event")
        try:
            return self.apply_event(event)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # Signed, yet not shaped like the event it claims to be: refuse it, apply nothing.
            log.warning("stripe event %s is malformed: %s", event["id"][:80], type(exc).__name__)
            raise InvalidSignature(
                "the event does not have the fields its type needs", code="malformed_event"
            ) from exc

    def apply_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Apply a verified event in one transaction with its once-per-id record."""
        event_type = str(event.get("type", ""))
        handler = {
            "checkout.session.completed": self._on_checkout_completed,
            "checkout.session.async_payment_succeeded": self._on_checkout_completed,
            "invoice.paid": self._on_invoice_paid,
            "customer.subscription.created": self._on_subscription,
            "customer.subscription.updated": self._on_subscription,
            "customer.subscription.deleted": self._on_subscription,
            "charge.refunded": self._on_charge_refunded,
        }.get(event_type)
        result: dict[str, Any] = {"id": event["id"], "type": event_type, "applied": False}
        if handler is None:
            return {**result, "ignored": True}
        obj = _get(event, "data", "object") or {}
        created = int(event.get("created") or 0)
        with self.ledger.transaction() as tx:
            if not tx.record_event(event["id"], event_type, created, None):
                return {**result, "duplicate": True}
            note = handler(tx, event, obj, created)
        log.info("stripe event %s (%s): %s", event["id"], event_type, note)
        return {**result, "applied": True, "note": note}

    def _account_for(self, tx: LedgerTx, obj: dict[str, Any], metadata: Any) -> str | None:
        account_id = _get(metadata, "account_id") if isinstance(metadata, dict) else None
        if account_id and tx.account(str(account_id)) is not None:
            return str(account_id)
        customer = obj.get("customer")
        if isinstance(customer, str):
            return tx.account_by_customer(customer)
        return None

    def _on_checkout_completed(
        self, tx: LedgerTx, event: dict[str, Any], obj: dict[str, Any], created: int
    ) -> str:
        account_id = obj.get("client_reference_id")
        if not isinstance(account_id, str) or tx.account(account_id) is None:
            return "no such account; ignored"
        if isinstance(obj.get("customer"), str):
            tx.set_customer(account_id, obj["customer"])
        metadata = obj.get("metadata") or {}
        if obj.get("mode") == "payment":
            if obj.get("payment_status") not in ("paid", "no_payment_required"):
                return "payment not completed yet"
            pack = self.config.pack(metadata.get("pack"))
            if pack is None:
                return f"unknown pack {str(metadata.get('pack'))[:40]}; ignored"
            # Credits come from our config by pack name, never from the payload's amount.
            tx.post(
                account_id,
                "purchase",
                pack.credits,
                reason=f"credit pack {pack.name}",
                stripe_event_id=event["id"],
                metadata={
                    "pack": pack.name,
                    "payment_intent": obj.get("payment_intent"),
                    "checkout_session": obj.get("id"),
                },
            )
            return f"{pack.credits} credits bought"
        if obj.get("mode") == "subscription":
            plan = self.config.plan(metadata.get("plan"))
            tx.set_subscription(
                account_id,
                plan=plan.name if plan else None,
                status="active",
                subscription_id=obj.get("subscription"),
                customer_id=obj.get("customer"),
                period_start=None,
                period_end=None,
                created=created,
            )
            return f"subscribed to {plan.name if plan else 'an unknown plan'}"
        return "nothing to do"

    def _on_invoice_paid(
        self, tx: LedgerTx, event: dict[str, Any], obj: dict[str, Any], created: int
    ) -> str:
        metadata = _get(obj, "parent", "subscription_details", "metadata") or _get(
            obj, "subscription_details", "metadata"
        )
        account_id = self._account_for(tx, obj, metadata)
        if account_id is None:
            raise RetryLater("the invoice's customer is not known yet; deliver it again later")
        account = tx.account(account_id) or {}
        plan = self.config.plan(_get(metadata, "plan") or account.get("plan"))
        if plan is None or plan.metered or plan.allowance <= 0:
            return "no allowance to grant"
        period = _get(obj, "lines", "data")
        period = period[0].get("period") if isinstance(period, list) and period else {}
        left = int(account.get("allowance_left") or 0)
        if plan.allowance_expires and left > 0:
            tx.post(
                account_id,
                "expiry",
                -left,
                allowance_delta=-left,
                reason="unused allowance of the last period expired",
                stripe_event_id=event["id"],
            )
        tx.post(
            account_id,
            "allowance",
            plan.allowance,
            allowance_delta=plan.allowance,
            reason=f"plan {plan.name} allowance",
            stripe_event_id=event["id"],
            metadata={"invoice": obj.get("id"), "period_end": _get(period, "end")},
        )
        return f"{plan.allowance} allowance credits"

    def _on_subscription(
        self, tx: LedgerTx, event: dict[str, Any], obj: dict[str, Any], created: int
    ) -> str:
        metadata = obj.get("metadata") or {}
        account_id = self._account_for(tx, obj, metadata)
        if account_id is None:
            raise RetryLater("the subscription's customer is not known yet; deliver it again")
        deleted = event.get("type") == "customer.subscription.deleted"
        plan = self.config.plan(metadata.get("plan"))
        if plan is None:  # a plan changed in the portal: find it by its price's lookup key
            for item in _get(obj, "items", "data") or []:
                key = _get(item, "price", "lookup_key") or ""
                plan = next(
                    (p for p in self.config.plans if lookup_key("plan", p.name) == key), None
                )
                if plan:
                    break
        item0 = (_get(obj, "items", "data") or [{}])[0]
        start = obj.get("current_period_start") or _get(item0, "current_period_start")
        end = obj.get("current_period_end") or _get(item0, "current_period_end")
        status = "canceled" if deleted else str(obj.get("status") or "")
        applied = tx.set_subscription(
            account_id,
            plan=None if deleted else (plan.name if plan else None),
            status=status,
            subscription_id=obj.get("id"),
            customer_id=obj.get("customer"),
            period_start=_ts(start),
            period_end=_ts(end),
            created=created,
        )
        if not applied:
            return "older than the subscription state already applied; ignored"
        if deleted and plan is not None and plan.allowance_expires:
            left = int((tx.account(account_id) or {}).get("allowance_left") or 0)
            if left > 0:
                tx.post(
                    account_id,
                    "expiry",
                    -left,
                    allowance_delta=-left,
                    reason="subscription ended; unused allowance expired",
                    stripe_event_id=event["id"],
                )
        return f"subscription {status}"

    def _on_charge_refunded(
        self, tx: LedgerTx, event: dict[str, Any], obj: dict[str, Any], created: int
    ) -> str:
        payment_intent = obj.get("payment_intent")
        amount = int(obj.get("amount") or 0)
        refunded = int(obj.get("amount_refunded") or 0)
        if not isinstance(payment_intent, str) or amount <= 0:
            return "not a credit purchase; ignored"
        bought = tx.payment_credits(payment_intent)
        if int(bought["bought"]) <= 0:
            if obj.get("invoice"):
                return "a subscription charge; nothing to claw back"
            raise RetryLater("the refunded purchase is not known yet; deliver it again later")
        # Claw back the refunded share of the credits bought; partial refunds add up exactly.
        target = int(bought["bought"]) * min(refunded, amount) // amount
        todo = target - int(bought["refunded"])
        if todo <= 0:
            return "already clawed back"
        row = tx.post(
            str(bought["account_id"]),
            "refund",
            -todo,
            reason="payment refunded",
            stripe_event_id=event["id"],
            metadata={"payment_intent": payment_intent, "requested": todo, "charge": obj.get("id")},
        )
        return f"{-int(row['amount']) if row else 0} of {todo} credits clawed back"

    # --- metered usage ------------------------------------------------------------------
    def deliver_meter_events(self, *, limit: int = 100) -> int:
        """Send due meter events to Stripe; returns how many were accepted. A failure leaves
        the row for a later round (backoff); the task id as identifier makes a resend a no-op."""
        rows = self.ledger.claim_meter_events(limit=limit, lease_seconds=60)
        sent = 0
        for row in rows:
            try:
                self._call(
                    "report usage",
                    self.stripe.v1.billing.meter_events.create,
                    params={
                        "event_name": row["event_name"],
                        "identifier": str(row["task_id"]),
                        "timestamp": int(row["created_at"].timestamp()),
                        "payload": {
                            "stripe_customer_id": row["customer_id"],
                            "value": str(row["value"]),
                        },
                    },
                    # Stripe's recommended guard for resends, on top of the identifier.
                    options={"idempotency_key": f"photo3d-meter-{row['task_id']}"},
                )
            except Photo3DError as exc:
                self.ledger.meter_event_failed(row["task_id"], exc.message, backoff_seconds=5)
                continue
            self.ledger.meter_event_sent(row["task_id"])
            sent += 1
        return sent

    def start_meter_reporter(self) -> threading.Thread:
        """Deliver meter events every meter_poll_seconds in a daemon thread."""

        def loop() -> None:
            while not self._meter_stop.wait(self.settings.meter_poll_seconds):
                try:
                    self.deliver_meter_events()
                except Photo3DError as exc:
                    log.warning("meter events: %s", exc.message)
                except Exception:
                    log.exception("meter events: unexpected error")

        thread = threading.Thread(target=loop, name="photo3d-meter-events", daemon=True)
        thread.start()
        return thread

    def stop_meter_reporter(self) -> None:
        self._meter_stop.set()
