"""Request bodies of POST /generate (multipart, JSON with base64 or data URIs, image_url) into
photos and raw options."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from serve_app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serve_app.fetch import fetch_image_url
from serve_app.images import decode_base64_image
from serve_app.service import Services
from serve_app.settings import Settings

_LIST_FIELDS = {"formats"}


def _refuse_declared(request: Request, limit: int) -> None:
    """Refuse up front a body whose Content-Length already says it is too large."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request is larger than {limit} bytes", code="request_too_large")


async def _limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body chunk by chunk, refused as soon as it passes `limit` bytes."""
    _refuse_declared(request, limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the request is larger than {limit} bytes", code="request_too_large"
            )
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refusing it as soon as it passes `limit` bytes."""
    return b"".join([chunk async for chunk in _limited_stream(request, limit)])


async def _read_form(request: Request, limit: int, max_files: int) -> FormData:
    """A multipart body parsed as it streams in, within the size limit. A malformed body is a
    400, as Starlette's own request.form() answers."""
    parser = MultiPartParser(
        request.headers, _limited_stream(request, limit), max_files=max_files, max_fields=50
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(status_code=400, detail=exc.message) from exc


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


async def parse_generate(
    request: Request, services: Services
) -> tuple[list[bytes], dict[str, Any]]:
    """(photos, raw options) of a POST /generate body, by its content type."""
    settings = services.settings
    limit = settings.max_upload_bytes * settings.max_images_per_task + 64 * 1024
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _parse_multipart(request, limit, settings.max_images_per_task)
    if content_type == "application/json":
        return await _parse_json(request, limit * 4 // 3 + 64 * 1024, settings)
    raise UnsupportedMediaType(
        "send multipart/form-data with an 'image' file, or application/json with 'image'",
        code="unsupported_content_type",
    )


async def _parse_multipart(
    request: Request, limit: int, max_files: int
) -> tuple[list[bytes], dict[str, Any]]:
    form = await _read_form(request, limit, max_files)
    try:
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
    finally:
        await form.close()


async def _parse_json(
    request: Request, limit: int, settings: Settings
) -> tuple[list[bytes], dict[str, Any]]:
    body = await _read_body(request, limit)
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
        photo = await fetch_image_url(  # asynchronous, one total deadline: no thread held
            image_url,
            max_bytes=settings.max_upload_bytes,
            timeout=settings.url_fetch_timeout_seconds,
            max_redirects=settings.url_max_redirects,
            allow_hosts=settings.url_allow_host_set,
        )
        return [photo], _json_options(payload)
    if not isinstance(raw_images, list) or not raw_images:
        raise InvalidInput("send 'image' (base64 or data URI) or 'images'", code="missing_image")
    if len(raw_images) > settings.max_images_per_task:
        raise InvalidInput(
            f"at most {settings.max_images_per_task} images per task", code="too_many_images"
        )
    photos = [decode_base64_image(v, settings.max_upload_bytes) for v in raw_images]
    return photos, _json_options(payload)
