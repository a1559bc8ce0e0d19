"""Inputs and outputs of the TRELLIS pipelines as images and meshes: preparing photos (alpha,
background), the synthetic warm-up object, GLB bytes and mesh counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from serve_app.errors import (
    GenerationFailed,
    NoObjectFound,
)

# upstream preprocess_image keeps pixels whose alpha exceeds 0.8 * 255 when it crops
# (trellis/pipelines/trellis_image_to_3d.py, trellis2/pipelines/trellis2_image_to_3d.py).
_ALPHA_KEEP = 0.8 * 255


def normalize_mode(image: Image.Image) -> Image.Image:
    """RGBA when the photo carries transparency, RGB otherwise (upstream only looks at 'RGBA')."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return image.convert("RGB")


def has_alpha(image: Image.Image) -> bool:
    """Upstream's test: RGBA with at least one pixel not fully opaque."""
    if image.mode != "RGBA":
        return False
    alpha = np.asarray(image.getchannel("A"))
    return bool((alpha < 255).any())


def flatten_on_white(image: Image.Image) -> Image.Image:
    """Drop the alpha channel over white, so the segmenter sees the photo's real background."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas


def premultiplied_rgb(image: Image.Image) -> Image.Image:
    """RGB with alpha premultiplied on black: the form upstream preprocess_image hands the model."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    arr = np.asarray(image).astype(np.float32) / 255.0
    rgb = arr[:, :, :3] * arr[:, :, 3:4]
    return Image.fromarray((rgb * 255).astype(np.uint8))


def prepare_images(
    images: Sequence[Image.Image],
    remove_background: bool | None,
    preprocess: Callable[[Image.Image], Image.Image],
) -> list[Image.Image]:
    """Turn uploaded photos into what the pipeline's `run(..., preprocess_image=False)` expects.

    remove_background: None = upstream's auto rule (use the alpha channel when there is one, else
    segment); True = always segment (alpha is flattened over white first); False = the photo is
    already framed, pass it through (alpha premultiplied)."""
    out = []
    for index, raw in enumerate(images):
        image = normalize_mode(raw)
        if remove_background is False:
            out.append(premultiplied_rgb(image))
            continue
        if remove_background is True:
            image = flatten_on_white(image)
        elif has_alpha(image) and not (np.asarray(image.getchannel("A")) > _ALPHA_KEEP).any():
            raise NoObjectFound(
                f"image {index + 1}: its alpha channel is (almost) fully transparent; "
                "there is no object to reconstruct"
            )
        try:
            out.append(preprocess(image))
        except ValueError as exc:
            # Upstream crops to the mask's bounding box with np.min/np.max, which raise
            # ValueError on an empty mask: the segmenter found no foreground.
            raise NoObjectFound(
                f"image {index + 1}: no object could be separated from the background ({exc})"
            ) from exc
    return out


def synthetic_object(size: int = 256) -> Image.Image:
    """A shaded ball on a transparent background, for warm-up runs (no file, no segmenter)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r = size * 0.35
    d = np.sqrt((xx - c) ** 2 + (yy - c) ** 2) / r
    inside = d <= 1.0
    shade = np.clip(1.0 - 0.6 * d, 0.0, 1.0)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = (200 * shade).astype(np.uint8)
    rgba[..., 1] = (120 * shade).astype(np.uint8)
    rgba[..., 2] = (60 * shade).astype(np.uint8)
    rgba[..., 3] = np.where(inside, 255, 0).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def glb_bytes(mesh: Any) -> bytes:
    """Serialize a trimesh Trimesh/Scene as binary glTF.

    PNG textures, not upstream's `extension_webp=True`: EXT_texture_webp is not read by every
    viewer nor by the OBJ/USDZ converters downstream."""
    data = mesh.export(file_type="glb")
    if not isinstance(data, bytes) or not data.startswith(b"glTF"):
        raise GenerationFailed("the exported GLB is not a binary glTF file", code="export_failed")
    return bytes(data)


def mesh_counts(mesh: Any) -> dict[str, int]:
    """Vertex / face counts of the exported trimesh, for task stats."""
    out: dict[str, int] = {}
    for key in ("vertices", "faces"):
        value = getattr(mesh, key, None)
        if value is not None:
            out[key] = len(value)
    return out
