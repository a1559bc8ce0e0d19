"""Downloads: a result in any format, the preview and the turntable."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, StreamingResponse

from serve_app.api.deps import ERRORS, AccountDep, ServicesDep
from serve_app.formats import FORMATS
from serve_app.service import ArtifactFile

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["files"])


def file_response(file: ArtifactFile, disposition: str = "attachment") -> Response:
    """The file as a download: from its path, or streamed chunk by chunk (S3)."""
    info = file.info
    headers = {"Content-Disposition": f'attachment; filename="{info.filename}"'}
    if disposition == "inline":
        headers["Content-Disposition"] = "inline"
    if file.path is not None:
        return FileResponse(file.path, media_type=info.media_type, headers=headers)
    return StreamingResponse(file.chunks or iter(()), media_type=info.media_type, headers=headers)


@router.get(
    "/task/{task_id}/result/{fmt}",
    summary=f"Download the result in one format ({', '.join(FORMATS)})",
    response_class=Response,
    responses={200: {"content": {"model/gltf-binary": {}, "application/octet-stream": {}}}},
)
def download_result(task_id: str, fmt: str, services: ServicesDep, account: AccountDep) -> Response:
    return file_response(services.open_artifact(account, task_id, fmt))


@router.get(
    "/task/{task_id}/preview",
    summary="PNG preview of the result",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def download_preview(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    return file_response(services.open_artifact(account, task_id, "preview"), "inline")


@router.get(
    "/task/{task_id}/turntable",
    summary="Animated WebP turntable of the result (rendered on first request)",
    response_class=Response,
    responses={200: {"content": {"image/webp": {}}}},
)
def download_turntable(task_id: str, services: ServicesDep, account: AccountDep) -> Response:
    return file_response(services.open_artifact(account, task_id, "turntable"), "inline")
