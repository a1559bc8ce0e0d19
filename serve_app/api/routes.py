"""HTTP routes of the v1 API: a thin layer over serve_app.service."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from serve_app import __version__
from serve_app.accounts import LOCAL_ACCOUNT, Forbidden, Principal
from serve_app.api.schemas import (
    BackendInfo,
    ErrorResponse,
    Health,
    Task,
    TaskEvent,
    TaskEvents,
    TaskList,
    task_from_row,
)
from serve_app.backends import available_backends
from serve_app.errors import InvalidInput, PayloadTooLarge, Photo3DError, UnsupportedMediaType
from serve_app.fetch import fetch_image_url
from serve_app.images import decode_base64_image
from serve_app.service import Services
from serve_app.store.tasks import TERMINAL

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
    services.accounts.count_request(
        principal.key_prefix or principal.account_id,
        settings.rate_limit_requests,
        settings.rate_limit_window_seconds,
    )
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def current_account(principal: PrincipalDep) -> str:
    """The account id every read and write is scoped to."""
    return principal.account_id


def admin_principal(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin account's key", code="admin_only")
    return principal


AccountDep = Annotated[str, Depends(current_account)]
AdminDep = Annotated[Principal, Depends(admin_principal)]

router = APIRouter(prefix="/api/v1", responses=ERRORS)
health_router = APIRouter()

_GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more photos (JPEG, PNG, WebP).",
                        },
                        "options": {
                            "type": "string",
                            "description": "Options as a JSON object (or send each "
                            "option as its own form field).",
                        },
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {
                            "type": "string",
                            "description": "Base64 or data:image/...;base64, URI.",
                        },
                        "images": {"type": "array", "items": {"type": "string"}},
                        "options": {"type": "object"},
                    },
                }
            },
        },
    }
}

_LIST_FIELDS = {"formats"}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the request is larger than {limit} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _form_options(fields: dict[str, list[str]]) -> dict[str, Any]:
    """Options sent as form fields: JSON in `options`, or one field per option."""
    options: dict[str, Any] = {}
    if "options" in fields:
        try:
            loaded = json.loads(fields.pop("options")[0])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidInput("options must be a JSON object", code="invalid_options") from exc
        if not isinstance(loaded, dict):
            raise InvalidInput("options must be a JSON object", code="invalid_options")
        options.update(loaded)
    for name, values in fields.items():
        if name in _LIST_FIELDS:
            options[name] = [v.strip() for value in values for v in value.split(",") if v.strip()]
        else:
            options[name] = _form_value(values[-1])
    return options


def _form_value(value: str) -> Any:
    """A form field's text as the JSON scalar it spells (1024, 0.5, true), else the text:
    forms carry only strings, and options are typed."""
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value
    return parsed if isinstance(parsed, int | float | bool) or parsed is None else value


def _json_options(payload: dict[str, Any]) -> dict[str, Any]:
    """Options at the top level of a JSON body, or inside its "options" object."""
    options = payload.pop("options", {})
    if not isinstance(options, dict):
        raise InvalidInput("options must be a JSON object", code="invalid_options")
    return {**payload, **options}


async def _parse_generate(
    request: Request, services: Services
) -> tuple[list[bytes], dict[str, Any]]:
    settings = services.settings
    limit = settings.max_upload_bytes * settings.max_images_per_task + 64 * 1024
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        request._body = await _read_body(request, limit)  # form() then parses the bytes we hold
        form = await request.form(max_files=settings.max_images_per_task, max_fields=50)
        photos: list[bytes] = []
        fields: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("image", "images"):
                    raise InvalidInput(
                        f"unexpected file field {name!r}; use 'image'", code="unexpected_field"
                    )
                photos.append(await value.read())
            else:
                fields.setdefault(name, []).append(value)
        return photos, _form_options(fields)
    if content_type == "application/json":
        body = await _read_body(request, limit * 4 // 3 + 64 * 1024)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInput("the body is not valid JSON", code="invalid_json") from exc
        if not isinstance(payload, dict):
            raise InvalidInput("the body must be a JSON object", code="invalid_json")
        raw_images = payload.pop("images", None)
        if "image" in payload:
            raw_images = [payload.pop("image"), *(raw_images or [])]
        image_url = payload.pop("image_url", None)
        if image_url is not None:
            if raw_images:
                raise InvalidInput(
                    "send either image(s) or image_url, not both", code="conflicting_inputs"
                )
            photo = await run_in_threadpool(
                lambda: fetch_image_url(
                    image_url,
                    max_bytes=settings.max_upload_bytes,
                    timeout=settings.url_fetch_timeout_seconds,
                    max_redirects=settings.url_max_redirects,
                    allow_hosts=settings.url_allow_host_set,
                )
            )
            return [photo], _json_options(payload)
        if not isinstance(raw_images, list) or not raw_images:
            raise InvalidInput(
                "send 'image' (base64 or data URI) or 'images'", code="missing_image"
            )
        if len(raw_images) > settings.max_images_per_task:
            raise InvalidInput(
                f"at most {settings.max_images_per_task} images per task", code="too_many_images"
            )
        photos = [decode_base64_image(v, settings.max_upload_bytes) for v in raw_images]
        return photos, _json_options(payload)
    raise UnsupportedMediaType(
        "send multipart/form-data with an 'image' file, or application/json with 'image'",
        code="unsupported_content_type",
    )


@router.post(
    "/generate",
    status_code=202,
    response_model=Task,
    openapi_extra=_GENERATE_BODY,
    summary="Queue a photo-to-3D generation",
)
async def generate(
    request: Request,
    services: ServicesDep,
    account: AccountDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Accept one or more photos of one object; answers 202 with the queued task."""
    photos, options = await _parse_generate(request, services)
    row, created = await run_in_threadpool(
        services.submit, account, photos, options, idempotency_key=idempotency_key
    )
    task = task_from_row(row)
    return JSONResponse(
        task.model_dump(mode="json"),
        status_code=202 if created else 200,
        headers={"Location": task.links["self"]},
    )


@router.get("/task/{task_id}", response_model=Task, summary="Status, progress and result links")
def get_task(task_id: str, services: ServicesDep, account: AccountDep) -> Task:
    return task_from_row(services.get_task(account, task_id))


@router.get("/task/{task_id}/events", response_model=TaskEvents, summary="The task's timeline")
def get_task_events(task_id: str, services: ServicesDep, account: AccountDep) -> TaskEvents:
    row = services.get_task(account, task_id)
    return TaskEvents(events=[TaskEvent(**e) for e in services.queue.events(row["id"])])


@router.get(
    "/task/{task_id}/stream",
    summary="Server-sent events: the task on every change until it ends",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_task(
    task_id: str, request: Request, services: ServicesDep, account: AccountDep
) -> StreamingResponse:
    row = await run_in_threadpool(services.get_task, account, task_id)

    async def events() -> AsyncIterator[str]:
        last: str | None = None
        last_event_id = 0
        idle = 0.0
        current = row
        while True:
            for event in await run_in_threadpool(
                services.queue.events, current["id"], last_event_id
            ):
                last_event_id = event["id"]
                data = TaskEvent(**event).model_dump_json()
                yield f"id: {last_event_id}\nevent: timeline\ndata: {data}\n\n"
            body = task_from_row(current).model_dump_json(exclude={"timings"})
            if body != last:
                last, idle = body, 0.0
                yield f"event: task\ndata: {task_from_row(current).model_dump_json()}\n\n"
            if current["status"] in TERMINAL or await request.is_disconnected():
                return
            await asyncio.sleep(0.5)
            idle += 0.5
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
            try:
                current = await run_in_threadpool(services.get_task, account, task_id)
            except Photo3DError as exc:
                yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
                return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/task/{task_id}/cancel", response_model=Task, summary="Cancel a queued or running task"
)
def cancel_task(task_id: str, services: ServicesDep, account: AccountDep) -> Task:
    row = services.get_task(account, task_id)
    if row["status"] in TERMINAL:
        raise InvalidInput(f"task {task_id} already ended ({row['status']})", code="task_finished")
    services.queue.cancel(row["id"], account)
    return task_from_row(services.get_task(account, task_id))


@router.delete("/task/{task_id}", status_code=204, summary="Delete a task and its files")
def delete_task(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    services.delete_task(account, task_id)
    return Response(status_code=204)


def _file_response(services: Services, key: str, info: dict[str, Any]) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{info["filename"]}"'}
    path = services.store.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=info["media_type"], headers=headers)
    return Response(services.store.get(key), media_type=info["media_type"], headers=headers)


@router.get(
    "/task/{task_id}/result/{fmt}",
    summary="Download the result in one format (glb, obj, stl, ply, usdz)",
    response_class=Response,
    responses={200: {"content": {"model/gltf-binary": {}, "application/octet-stream": {}}}},
)
def download_result(task_id: str, fmt: str, services: ServicesDep, account: AccountDep) -> Response:
    key, info = services.artifact(account, task_id, fmt)
    return _file_response(services, key, info)


def _inline(services: Services, account: str, task_id: str, kind: str) -> Response:
    key, info = services.artifact(account, task_id, kind)
    response = _file_response(services, key, info)
    response.headers["Content-Disposition"] = "inline"
    return response


@router.get(
    "/task/{task_id}/preview",
    summary="PNG preview of the result",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def download_preview(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    return _inline(services, account, task_id, "preview")


@router.get(
    "/task/{task_id}/turntable",
    summary="Animated WebP turntable of the result (rendered on first request)",
    response_class=Response,
    responses={200: {"content": {"image/webp": {}}}},
)
def download_turntable(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    return _inline(services, account, task_id, "turntable")


@router.get("/tasks", response_model=TaskList, summary="Your tasks, newest first")
def list_tasks(
    services: ServicesDep,
    account: AccountDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: Annotated[str | None, Query(max_length=20)] = None,
    batch_id: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TaskList:
    rows, next_cursor = services.queue.list_tasks(
        account, limit=limit, status=status, batch_id=batch_id, cursor=cursor
    )
    return TaskList(tasks=[task_from_row(r) for r in rows], next_cursor=next_cursor)


@router.get(
    "/backends", response_model=list[BackendInfo], summary="Backends served here and their workers"
)
def list_backends(services: ServicesDep) -> list[BackendInfo]:
    workers = services.queue.live_workers(services.settings.worker_alive_seconds)
    return [
        BackendInfo(
            name=name,
            default=name == services.settings.default_backend,
            workers=workers.get(name, 0),
        )
        for name in sorted(services.backends or available_backends(services.settings))
    ]


@health_router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Database and worker readiness",
)
def health(services: ServicesDep) -> JSONResponse:
    settings = services.settings
    database, workers = "ok", {}
    try:
        services.db.ping()
        workers = services.queue.live_workers(settings.worker_alive_seconds)
    except Photo3DError:
        database = "unavailable"
    ready = database == "ok" and (
        not settings.health_requires_worker or workers.get(settings.default_backend, 0) > 0
    )
    body = Health(
        status="ok" if ready else "unavailable",
        database=database,
        workers=workers,
        version=__version__,
    )
    headers = {} if ready else {"Retry-After": "5"}
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=headers)


# --- accounts and keys ------------------------------------------------------------------------
class KeyCreate(BaseModel):
    name: str = Field(default="", max_length=100)


class AccountCreate(BaseModel):
    id: str = Field(min_length=1, max_length=63)
    name: str = Field(default="", max_length=200)
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


@router.get("/account", response_model=AccountInfo, summary="Who you are")
def get_account(principal: PrincipalDep, services: ServicesDep) -> AccountInfo:
    row = services.db.fetch_one("get_account", {"id": principal.account_id}) or {}
    return AccountInfo(
        id=principal.account_id,
        name=row.get("name", principal.account_id),
        is_admin=principal.is_admin,
        auth_required=services.settings.auth_enforced,
    )


@router.get("/keys", response_model=list[KeyInfo], summary="Your API keys (never the secrets)")
def list_own_keys(account: AccountDep, services: ServicesDep) -> list[KeyInfo]:
    return [KeyInfo(**row) for row in services.accounts.list_keys(account)]


@router.post("/keys", response_model=NewKey, status_code=201, summary="Create an API key")
def create_own_key(body: KeyCreate, account: AccountDep, services: ServicesDep) -> NewKey:
    key, row = services.accounts.create_key(account, body.name)
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
    key, row = services.accounts.create_key(account_id, body.name)
    return NewKey(key=key, **row)


@router.get("/admin/keys", response_model=list[KeyInfo], summary="Admin: every key")
def admin_list_keys(admin: AdminDep, services: ServicesDep) -> list[KeyInfo]:
    return [KeyInfo(**row) for row in services.accounts.list_keys(None)]


@router.delete("/admin/keys/{prefix}", response_model=KeyInfo, summary="Admin: revoke any key")
def admin_revoke_key(prefix: str, admin: AdminDep, services: ServicesDep) -> KeyInfo:
    return KeyInfo(**services.accounts.revoke_key(prefix, None))
