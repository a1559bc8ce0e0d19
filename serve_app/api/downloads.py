"""Signed download links: the public route behind every result, preview and turntable link the
API hands out (no Bearer header; the signature is the authorization). See serve_app/downloads.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import RedirectResponse

from serve_app.api.deps import ERRORS, ServicesDep
from serve_app.api.files import file_response

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
def signed_download(
    task_id: str,
    kind: str,
    services: ServicesDep,
    account: Annotated[str, Query(max_length=200)],
    expires: Annotated[int, Query(ge=0, le=2**40)],
    signature: Annotated[str, Query(max_length=100)],
) -> Response:
    target, left = services.signed_artifact(account, task_id, kind, expires, signature)
    if isinstance(target, str):  # a presigned URL of the S3 store: the bytes come from there
        return RedirectResponse(target, status_code=307, headers={"Cache-Control": "no-store"})
    response = file_response(target, "inline" if kind in ("preview", "turntable") else "attachment")
    response.headers["Cache-Control"] = f"private, max-age={max(0, left)}"
    return response
