"""Packaging: a backend's generated asset becomes stored files and a typed TaskResult (every
format asked for, the backend's extra files, the preview)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from serve_app import artifact_keys, exports, metrics, preview
from serve_app.artifacts import ArtifactStore
from serve_app.backends.base import GeneratedAsset, GenerationOptions
from serve_app.results import Preview, ResultTimings, StoredFile, TaskResult


def package_asset(
    asset: GeneratedAsset,
    options: GenerationOptions,
    artifacts: ArtifactStore,
    task_id: uuid.UUID,
    attempt: int,
    *,
    on_stage: Callable[[str], None] = lambda stage: None,
    render_preview: bool = True,
    convert_formats: bool = True,
) -> TaskResult:
    """Store the asset's files as this attempt's and describe them. Timings and the worker id
    are the caller's to fill in. With render_preview=False a preview the backend did not make
    is left for `render_preview` (the result says it is not ready); with convert_formats=False
    the formats asked for besides GLB are left for `store_format` (each says it is not ready)."""
    files: dict[str, StoredFile] = {}

    def put(name: str, filename: str, media_type: str, data: bytes) -> None:
        key = artifact_keys.attempt_file(task_id, attempt, filename)
        artifacts.put(key, data)
        files[name] = StoredFile(key=key, bytes=len(data), media_type=media_type, filename=filename)

    backend = str(options.backend)
    wanted = list(dict.fromkeys(["glb", *options.formats]))
    # Issue 11: the GLB alone on the way to `succeeded`; the other formats follow.
    later = [] if convert_formats else [fmt for fmt in wanted if fmt != "glb"]
    started = time.monotonic()
    converted = exports.convert_many(asset.glb, [fmt for fmt in wanted if fmt not in later])
    metrics.export_seconds(backend, time.monotonic() - started)
    for fmt in wanted:
        info = exports.FORMATS[fmt]
        if fmt in later:
            key = artifact_keys.attempt_file(task_id, attempt, info.filename)
            files[fmt] = StoredFile(
                key=key, media_type=info.media_type, filename=info.filename, ready=False
            )
            continue
        put(fmt, info.filename, info.media_type, converted[fmt])
        metrics.artifact_bytes(backend, fmt, len(converted[fmt]))
    for name, data in asset.extra_files.items():
        put(name, name, "application/octet-stream", data)
        metrics.artifact_bytes(backend, "extra", len(data))
    # Issue #17: the object mask the backend built the model from, so a user can see why a
    # model looks wrong (GET /api/v1/task/{id}/result/mask).
    if asset.mask_png:
        put("mask", "mask.png", "image/png", asset.mask_png)
    preview_key = artifact_keys.attempt_file(task_id, attempt, "preview.png")
    if asset.preview_png is None and not render_preview:
        shown = Preview(key=preview_key, ready=False)
    else:
        on_stage("rendering preview")
        shown = store_preview(artifacts, preview_key, asset.preview_png, asset.glb, backend)
    return TaskResult(
        files=files,
        preview=shown,
        stats=dict(asset.stats),
        timings=ResultTimings(),
    )


def store_preview(
    artifacts: ArtifactStore, key: str, png: bytes | None, glb: bytes, backend: str = "unknown"
) -> Preview:
    """Store the preview PNG (the backend's, or a thumbnail rendered from the GLB, ~0.25 s)."""
    started = time.monotonic()
    data = png or preview.render_thumbnail(glb)
    metrics.preview_seconds(backend, time.monotonic() - started)
    metrics.artifact_bytes(backend, "preview", len(data))
    artifacts.put(key, data)
    return Preview(key=key, bytes=len(data))


def store_format(
    artifacts: ArtifactStore, file: StoredFile, fmt: str, glb: bytes, backend: str = "unknown"
) -> StoredFile:
    """Convert the GLB into `fmt` and store it where `file` says (issue 11: after the task has
    succeeded, by the worker or on first request); the stored file, ready."""
    started = time.monotonic()
    data = exports.convert(glb, fmt)
    metrics.export_seconds(backend, time.monotonic() - started)
    metrics.artifact_bytes(backend, fmt, len(data))
    artifacts.put(file.key, data)
    return file.model_copy(update={"bytes": len(data), "ready": True})
