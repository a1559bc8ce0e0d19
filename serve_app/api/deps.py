"""FastAPI dependencies every router shares: the services, who is calling, their account."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from serve_app import logs
from serve_app.accounts import LOCAL_ACCOUNT, Forbidden, Principal, RateLimited, RateWindow
from serve_app.api.schemas import ErrorResponse
from serve_app.service import Services

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 503)
}


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def current_principal(
    request: Request,
    services: ServicesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """Who is calling. A key is required when auth is enforced; without enforcement a request
    with no key is the single local user. Each key's requests are rate-limited."""
    settings = services.settings
    if authorization is None and not settings.auth_enforced:
        return Principal(LOCAL_ACCOUNT, None)
    principal = services.accounts.authenticate(authorization)
    try:
        window = services.accounts.count_request(
            principal.key_prefix or principal.account_id,
            settings.rate_limit_requests,
            settings.rate_limit_window_seconds,
        )
    except RateLimited as exc:
        request.state.rate_window = RateWindow(settings.rate_limit_requests, 0, exc.retry_after)
        raise
    request.state.rate_window = window  # app.py turns it into RateLimit-* headers
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def current_account(principal: PrincipalDep) -> str:
    """The account id every read and write is scoped to (and every log line carries)."""
    logs.bind(account_id=principal.account_id)
    return principal.account_id


def admin_principal(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin account's key", code="admin_only")
    return principal


AccountDep = Annotated[str, Depends(current_account)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
