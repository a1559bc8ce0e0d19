"""Packaging: a backend's generated asset becomes stored files and a typed TaskResult (every
format asked for, the backend's extra files, the preview)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from serve_app import artifact_keys, exports, preview
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
) -> TaskResult:
    """Store the asset's files as this attempt's and describe them. Timings and the worker id
    are the caller's to fill in."""
    files: dict[str, StoredFile] = {}

    def put(name: str, filename: str, media_type: str, data: bytes) -> None:
        key = artifact_keys.attempt_file(task_id, attempt, filename)
        artifacts.put(key, data)
        files[name] = StoredFile(key=key, bytes=len(data), media_type=media_type, filename=filename)

    wanted = list(dict.fromkeys(["glb", *options.formats]))
    for fmt, data in exports.convert_many(asset.glb, wanted).items():
        info = exports.FORMATS[fmt]
        put(fmt, info.filename, info.media_type, data)
    for name, data in asset.extra_files.items():
        put(name, name, "application/octet-stream", data)
    on_stage("rendering preview")
    preview_png = asset.preview_png or preview.render_thumbnail(asset.glb)
    preview_key = artifact_keys.attempt_file(task_id, attempt, "preview.png")
    artifacts.put(preview_key, preview_png)
    return TaskResult(
        files=files,
        preview=Preview(key=preview_key, bytes=len(preview_png)),
        stats=dict(asset.stats),
        timings=ResultTimings(),
    )
