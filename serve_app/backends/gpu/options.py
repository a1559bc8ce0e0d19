"""Generation options as the TRELLIS pipelines take them: image counts, sampler overrides and
the simplification that meets a face limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from serve_app.backends.base import GenerationOptions
from serve_app.errors import (
    InvalidInput,
)
from serve_app.settings import Settings


def check_image_count(
    images: Sequence[Image.Image], settings: Settings, *, multi: bool, backend: str
) -> None:
    """Refuse empty input, too many photos, or several photos where the backend takes one."""
    if not images:
        raise InvalidInput("at least one image is required", code="no_images")
    if len(images) > settings.max_images_per_task:
        raise InvalidInput(
            f"{len(images)} images given; at most {settings.max_images_per_task} per task",
            code="too_many_images",
        )
    if not multi and len(images) > 1:
        raise InvalidInput(
            f"backend {backend!r} takes one image per task ({len(images)} given); use backend "
            "'trellis' for multi-view input",
            code="multi_image_unsupported",
        )


def sampler_overrides(
    options: GenerationOptions, guidance_key: str, *, with_guidance: bool = True
) -> dict[str, Any]:
    """Sampler params a task overrides; unset options keep the checkpoint's pipeline.json values
    (upstream merges them as {**self.<stage>_sampler_params, **sampler_params})."""
    params: dict[str, Any] = {}
    if options.steps is not None:
        params["steps"] = options.steps
    if with_guidance and options.guidance is not None:
        params[guidance_key] = options.guidance
    return params


def effective_simplify(simplify: float, face_limit: int, raw_faces: int) -> float:
    """TRELLIS v1's to_glb removes a *ratio* of faces; raise that ratio when needed so the result
    lands near `face_limit` (hole filling afterwards may add a few faces back)."""
    if raw_faces <= 0:
        return simplify
    needed = 1.0 - face_limit / raw_faces
    return float(min(0.99, max(simplify, needed, 0.0)))
