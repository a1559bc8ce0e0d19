"""Signed download links: the public route behind every result, preview and turntable link the
API hands out (no Bearer header; the signature is the authorization). See serve_app/downloads.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from serve_app.api.deps import ERRORS, ServicesDep
from serve_app.api.files import file_response
from serve_app.downloads import REDIRECT_GRACE_SECONDS

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["files"])


@router.get(
    "/download/{task_id}/{kind}",
    summary="Fetch a result, preview or turntable by its signed link (no Bearer header)",
    response_class=Response,
    responses={
        200: {"content": {"model/gltf-binary": {}, "image/png": {}, "image/webp": {}}},
        307: {"description": "Redirect to a presigned URL of the S3 artifact store."},
    },
)
async def signed_download(
    task_id: str,
    kind: str,
    services: ServicesDep,
    account: Annotated[str, Query(max_length=200)],
    expires: Annotated[int, Query(ge=0, le=2**40)],
    signature: Annotated[str, Query(max_length=100)],
) -> Response:
    left = services.downloads.verify(account, task_id, kind, expires, signature)
    key, info = await run_in_threadpool(services.artifact, account, task_id, kind)
    inline = kind in ("preview", "turntable")
    # In a thread: finding credentials may ask an instance metadata service the first time.
    url = await run_in_threadpool(
        services.store.presigned_url,
        key,
        left + REDIRECT_GRACE_SECONDS,
        filename=info["filename"],
        media_type=info["media_type"],
        inline=inline,
    )
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    response = await run_in_threadpool(file_response, services, key, info)
    if inline:
        response.headers["Content-Disposition"] = "inline"
    response.headers["Cache-Control"] = f"private, max-age={max(0, left)}"
    return response
