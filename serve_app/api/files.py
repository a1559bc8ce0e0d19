"""Downloads: a result in any format, the preview and the turntable."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, StreamingResponse

from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.service import Services

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["files"])


def file_response(services: Services, key: str, info: dict[str, Any]) -> Response:
    """The artifact as a download, streamed (a file, or S3 chunks: never the whole in memory)."""
    headers = {"Content-Disposition": f'attachment; filename="{info["filename"]}"'}
    path = services.store.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=info["media_type"], headers=headers)
    chunks = services.store.iter_chunks(key)
    first = next(chunks, b"")  # a missing object is a 404 now, not a broken stream later

    def body() -> Any:
        yield first
        yield from chunks

    return StreamingResponse(body(), media_type=info["media_type"], headers=headers)


@router.get(
    "/task/{task_id}/result/{fmt}",
    summary="Download the result in one format (glb, obj, stl, ply, usdz)",
    response_class=Response,
    responses={200: {"content": {"model/gltf-binary": {}, "application/octet-stream": {}}}},
)
def download_result(task_id: str, fmt: str, services: ServicesDep, account: AccountDep) -> Response:
    key, info = services.artifact(account, task_id, fmt)
    return file_response(services, key, info)


def _inline(services: Services, account: str, task_id: str, kind: str) -> Response:
    key, info = services.artifact(account, task_id, kind)
    response = file_response(services, key, info)
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
