"""Accounts and API keys: who you are, your keys, and the admin routes."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import AfterValidator, BaseModel, Field

from serve_app.api.deps import ERRORS, AccountDep, AdminDep, PrincipalDep, ServicesDep
from serve_app.api.limits import has_control_characters

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["accounts"])


def _no_control_characters(value: str) -> str:
    if has_control_characters(value):
        raise ValueError("must not contain control characters")
    return value


# Text a person names things with: no NUL or other control characters (PostgreSQL refuses NUL).
PlainText = Annotated[str, AfterValidator(_no_control_characters)]


class KeyCreate(BaseModel):
    name: PlainText = Field(default="", max_length=100)


class AccountCreate(BaseModel):
    id: PlainText = Field(min_length=1, max_length=63)
    name: PlainText = Field(default="", max_length=200)
    is_admin: bool = False


class KeyInfo(BaseModel):
    prefix: str
    account_id: str
    name: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None


class NewKey(KeyInfo):
    key: str = Field(description="The API key. Shown once: store it now.")


class AccountInfo(BaseModel):
    id: str
    name: str
    is_admin: bool
    auth_required: bool
    billing: dict[str, Any] = Field(default_factory=lambda: {"enabled": False})
    balance: int | None = Field(default=None, description="Credits available (billing on only).")


@router.get("/account", response_model=AccountInfo, summary="Who you are")
def get_account(principal: PrincipalDep, services: ServicesDep) -> AccountInfo:
    billing = (
        services.billing.account_view(principal.account_id)
        if services.settings.billing_enabled
        else {"enabled": False}
    )
    return AccountInfo(
        id=principal.account_id,
        name=services.account_name(principal),
        is_admin=principal.is_admin,
        auth_required=services.settings.auth_enforced,
        billing=billing,
        balance=billing.get("balance"),
    )


@router.get("/keys", response_model=list[KeyInfo], summary="Your API keys (never the secrets)")
def list_own_keys(account: AccountDep, services: ServicesDep) -> list[KeyInfo]:
    return [KeyInfo(**row) for row in services.accounts.list_keys(account)]


@router.post("/keys", response_model=NewKey, status_code=201, summary="Create an API key")
def create_own_key(body: KeyCreate, account: AccountDep, services: ServicesDep) -> NewKey:
    key, row = services.accounts.create_key(
        account, body.name, max_keys=services.settings.max_keys_per_account
    )
    return NewKey(key=key, **row)


@router.delete("/keys/{prefix}", response_model=KeyInfo, summary="Revoke one of your keys")
def revoke_own_key(prefix: str, account: AccountDep, services: ServicesDep) -> KeyInfo:
    return KeyInfo(**services.accounts.revoke_key(prefix, account))


@router.post(
    "/admin/accounts",
    response_model=AccountInfo,
    status_code=201,
    summary="Admin: create an account",
)
def admin_create_account(
    body: AccountCreate, admin: AdminDep, services: ServicesDep
) -> AccountInfo:
    row = services.accounts.create_account(body.id, body.name, is_admin=body.is_admin)
    return AccountInfo(
        id=row["id"],
        name=row["name"],
        is_admin=row["is_admin"],
        auth_required=services.settings.auth_enforced,
    )


@router.post(
    "/admin/accounts/{account_id}/keys",
    response_model=NewKey,
    status_code=201,
    summary="Admin: create a key for an account",
)
def admin_create_key(
    account_id: str, body: KeyCreate, admin: AdminDep, services: ServicesDep
) -> NewKey:
    key, row = services.accounts.create_key(
        account_id, body.name, max_keys=services.settings.max_keys_per_account
    )
    return NewKey(key=key, **row)


@router.get("/admin/keys", response_model=list[KeyInfo], summary="Admin: every key")
def admin_list_keys(admin: AdminDep, services: ServicesDep) -> list[KeyInfo]:
    return [KeyInfo(**row) for row in services.accounts.list_keys(None)]


@router.delete("/admin/keys/{prefix}", response_model=KeyInfo, summary="Admin: revoke any key")
def admin_revoke_key(prefix: str, admin: AdminDep, services: ServicesDep) -> KeyInfo:
    return KeyInfo(**services.accounts.revoke_key(prefix, None))
