"""FastAPI dependencies every router shares: the services, who is calling, their account."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from serve_app import logs
from serve_app.accounts import (
    LOCAL_ACCOUNT,
    Forbidden,
    Principal,
    RateLimited,
    RateWindow,
    Unauthorized,
)
from serve_app.api.limits import AddressThrottle
from serve_app.api.schemas import ErrorResponse
from serve_app.service import Services

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 503)
}


# Issue 11: every dependency here is `async def`. FastAPI runs a plain `def` dependency on the
# threadpool, and in a Serve replica each such hop cost more CPU than the query behind it; the
# database reads below run on the event loop (`Database.afetch_one`).


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def client_address(request: Request, header: str) -> str:
    """The caller's address: the last entry of `header` when a reverse proxy sets it, else the
    connection's peer."""
    if header:
        forwarded = request.headers.get(header, "").rsplit(",", 1)[-1].strip()
        if forwarded:
            return forwarded[:100]
    return request.client.host if request.client else "unknown"


async def current_principal(
    request: Request,
    services: ServicesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """Who is calling. A key is required when auth is enforced; without enforcement a request
    with no key is the single local user. Requests are rate-limited per key and per account."""
    settings = services.settings
    if authorization is None and not settings.auth_enforced:
        return Principal(LOCAL_ACCOUNT, None)
    # Failed authentications are throttled per client address, before the key lookup.
    throttle: AddressThrottle = request.app.state.auth_failures
    address = client_address(request, settings.client_address_header)
    throttle.check(address)
    try:
        principal = await services.accounts.aauthenticate(authorization)
    except Unauthorized as exc:
        if exc.code == "invalid_api_key":  # a key that cost a lookup (a missing one costs none)
            throttle.record_failure(address)
        raise
    try:
        if principal.key_prefix is None:
            window = await services.accounts.acount_request(
                principal.account_id,
                settings.rate_limit_requests,
                settings.rate_limit_window_seconds,
            )
        else:  # per key, and per account so that more keys do not mean more requests
            window = await services.accounts.acount_key_and_account(
                principal.key_prefix,
                principal.account_id,
                settings.rate_limit_requests,
                settings.rate_limit_account_requests,
                settings.rate_limit_window_seconds,
            )
    except RateLimited as exc:
        request.state.rate_window = RateWindow(settings.rate_limit_requests, 0, exc.retry_after)
        raise
    request.state.rate_window = window  # app.py turns it into RateLimit-* headers (#15)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


async def current_account(principal: PrincipalDep) -> str:
    """The account id every read and write is scoped to (and every log line carries)."""
    logs.bind(account_id=principal.account_id)
    return principal.account_id


async def admin_principal(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin account's key", code="admin_only")
    return principal


AccountDep = Annotated[str, Depends(current_account)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
