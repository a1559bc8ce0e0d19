"""Accounts, API keys and per-key limits.

A key looks like `p3d_<prefix>_<secret>`: the prefix identifies it in listings and logs, the
whole key is stored only as a SHA-256 hash (keys are 190 random bits, so a slow hash buys
nothing) and is shown once, at creation."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from serve_app.errors import Conflict, InvalidInput, NotFound, Photo3DError
from serve_app.store.db import Database, Row

KEY_PATTERN = re.compile(r"p3d_([a-z0-9]{8})_([A-Za-z0-9_-]{32})")
ACCOUNT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
LOCAL_ACCOUNT = "local"


class Unauthorized(Photo3DError):
    code = "unauthorized"
    http_status = 401


class Forbidden(Photo3DError):
    code = "forbidden"
    http_status = 403


class RateLimited(Photo3DError):
    """Too many requests or tasks; `retry_after` says when to come back (seconds)."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_rate_limited, (self.message, self.code, self.retry_after))


def _rebuild_rate_limited(message: str, code: str, retry_after: int) -> RateLimited:
    return RateLimited(message, code=code, retry_after=retry_after)


@dataclass(frozen=True)
class RateWindow:
    """The caller's request budget: the RateLimit-Limit/Remaining/Reset headers (#15)."""

    limit: int
    remaining: int
    reset_seconds: int


@dataclass(frozen=True)
class Principal:
    """Who is calling: an account, and the key used (None in local single-user mode)."""

    account_id: str
    key_prefix: str | None
    is_admin: bool = False


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, str]:
    """(prefix, full key) of a fresh random key."""
    prefix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    return prefix, f"p3d_{prefix}_{secrets.token_urlsafe(24)}"


class Accounts:
    """Account and key operations on the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_account(self, account_id: str, name: str = "", *, is_admin: bool = False) -> Row:
        if not ACCOUNT_ID.fullmatch(account_id):
            raise InvalidInput(
                "account id: 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit",
                code="invalid_account_id",
            )
        row = self.db.fetch_one(
            "create_account", {"id": account_id, "name": name or account_id, "is_admin": is_admin}
        )
        if row is None:  # ON CONFLICT DO NOTHING: the id is taken
            raise Conflict(f"account {account_id} already exists", code="account_exists")
        return row

    def get_account(self, account_id: str) -> Row | None:
        """The account row, or None."""
        return self.db.fetch_one("get_account", {"id": account_id})

    def list_accounts(self) -> list[Row]:
        return self.db.fetch_all("list_accounts")

    def create_key(self, account_id: str, name: str = "", *, max_keys: int = 20) -> tuple[str, Row]:
        """Make a key for the account; returns (the key — shown once, its listing row). An
        account holds at most `max_keys` active keys: each key has its own rate window."""
        if self.get_account(account_id) is None:
            raise NotFound(f"account {account_id} not found", code="account_not_found")
        prefix, key = new_key()
        row = self.db.fetch_one_locked(
            f"keys:{account_id}",
            "create_api_key_within_limit",
            {
                "prefix": prefix,
                "account_id": account_id,
                "secret_hash": hash_key(key),
                "name": name[:100],
                "max_keys": max_keys,
            },
        )
        if row is None:
            raise Conflict(
                f"the account already has {max_keys} active keys; revoke one first",
                code="too_many_keys",
            )
        return key, row

    def list_keys(self, account_id: str | None = None) -> list[Row]:
        return self.db.fetch_all("list_api_keys", {"account_id": account_id})

    def revoke_key(self, prefix: str, account_id: str | None = None) -> Row:
        row = self.db.fetch_one("revoke_api_key", {"prefix": prefix, "account_id": account_id})
        if row is None:
            raise NotFound(f"active key {prefix[:16]} not found", code="key_not_found")
        return row

    async def aauthenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <key>` header, or Unauthorized. On the
        event loop: the Ingress's request path (issue 11)."""
        prefix, key = bearer_key(authorization)
        return principal_of(await self.db.afetch_one("authenticate_key", {"prefix": prefix}), key)

    async def acount_request(self, bucket: str, limit: int, window_seconds: int) -> RateWindow:
        """Count one request in the bucket's window; RateLimited past `limit`. Returns what the
        RateLimit-* response headers say. On the event loop: the Ingress's request path."""
        params = {"key": bucket, "window": window_seconds}
        rows = await self.db.afetch_all_unflushed("count_request", params)
        return window_of(rows, limit, window_seconds)

    async def acount_key_and_account(
        self, key_prefix: str, account_id: str, key_limit: int, account_limit: int, window: int
    ) -> RateWindow:
        """Count one request against its key's window and its account's (all keys together);
        RateLimited past either limit. Returns the tighter budget (the RateLimit-* headers)."""
        params = {"key": key_prefix, "account": f"account:{account_id}", "window": window}
        rows = await self.db.afetch_all_unflushed("count_request_and_account", params)
        return budget_of(rows, key_limit, account_limit, window)

    def prune_rate_windows(self, window_seconds: int) -> int:
        """Drop the request counters of windows that have ended; returns how many went."""
        return self.db.execute("prune_rate_windows", {"window": window_seconds})

    @staticmethod
    def too_many_active(limit: int) -> RateLimited:
        return RateLimited(
            f"{limit} tasks are already queued or running, the limit. Wait for one to finish.",
            code="too_many_active_tasks",
            retry_after=5,
        )


def bearer_key(authorization: str | None) -> tuple[str, str]:
    """(prefix, key) of an `Authorization: Bearer <key>` header, or Unauthorized."""
    if not authorization:
        raise Unauthorized("send an API key: Authorization: Bearer p3d_…", code="missing_api_key")
    scheme, _, key = authorization.strip().partition(" ")
    match = KEY_PATTERN.fullmatch(key.strip())
    if scheme.lower() != "bearer" or match is None:
        raise Unauthorized(
            "the Authorization header must be 'Bearer p3d_…'", code="invalid_api_key"
        )
    return match[1], key.strip()


def principal_of(row: Row | None, key: str) -> Principal:
    """The key's principal, given its prefix's row; Unauthorized when the secret differs."""
    if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), hash_key(key)):
        raise Unauthorized("the API key is not valid or was revoked", code="invalid_api_key")
    return Principal(row["account_id"], row["prefix"], bool(row["is_admin"]))


def window_of(rows: list[Row], limit: int, window_seconds: int) -> RateWindow:
    """The budget left in one counted window; RateLimited past `limit`."""
    row = rows[0] if rows else None
    if row is None:  # pragma: no cover - the upsert always returns its row
        return RateWindow(limit, limit, window_seconds)
    retry = max(1, int(float(row["reset_s"]) + 0.999))
    if row["requests"] > limit:
        raise RateLimited(
            f"more than {limit} requests in {window_seconds} s; retry in {retry} s",
            retry_after=retry,
        )
    return RateWindow(limit, max(0, limit - int(row["requests"])), retry)


def budget_of(rows: list[Row], key_limit: int, account_limit: int, window: int) -> RateWindow:
    """The tighter budget of a key's and its account's counted windows; RateLimited past
    either limit."""
    budget = RateWindow(key_limit, key_limit, window)
    for row in rows:
        limit = account_limit if row["bucket"].startswith("account:") else key_limit
        retry = max(1, int(float(row["reset_s"]) + 0.999))
        if row["requests"] > limit:
            whom = "this account" if row["bucket"].startswith("account:") else "this key"
            raise RateLimited(
                f"more than {limit} requests from {whom} in {window} s; retry in {retry} s",
                retry_after=retry,
            )
        remaining = max(0, limit - int(row["requests"]))
        if remaining < budget.remaining:
            budget = RateWindow(limit, remaining, retry)
    return budget
