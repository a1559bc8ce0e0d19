"""Base-colour texture: the photo cropped to the object, with the background replaced by the
object's own colours so filtering and mipmaps never pull backdrop into the model."""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

JPEG_QUALITY = 90


@dataclass(frozen=True)
class Texture:
    """An encoded texture and the photo-pixel rectangle it covers."""

    data: bytes
    mime_type: str
    left: float
    top: float
    width: float
    height: float
    size: tuple[int, int]  # texture width, height in texels

    def uv(self, x: np.ndarray, y_down: np.ndarray) -> np.ndarray:
        """glTF texture coordinates (origin top-left) of photo pixel positions."""
        u = (x - self.left) / self.width
        v = (y_down - self.top) / self.height
        return np.column_stack([u, v])


def build_texture(rgb: np.ndarray, mask: np.ndarray, texture_size: int) -> Texture:
    """Crop the photo around the object, fill the background, scale to at most texture_size."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    margin = max(2, round(0.01 * max(height, width)))
    x0, x1 = max(0, int(xs.min()) - margin), min(width, int(xs.max()) + 1 + margin)
    y0, y1 = max(0, int(ys.min()) - margin), min(height, int(ys.max()) + 1 + margin)
    crop: np.ndarray = rgb[y0:y1, x0:x1].astype(np.float32)
    # Outline pixels mix object and backdrop (or dark matte fringes); take colour from a
    # little inside and let the fill carry it out to the edge.
    erosion = max(1, round(0.003 * max(height, width)))
    solid: np.ndarray = cv2.erode(
        mask[y0:y1, x0:x1].astype(np.uint8), np.ones((2 * erosion + 1,) * 2, np.uint8)
    ).astype(np.float32)
    if not solid.any():
        solid = mask[y0:y1, x0:x1].astype(np.float32)

    scale = min(1.0, texture_size / max(x1 - x0, y1 - y0))
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    if size != (x1 - x0, y1 - y0):
        crop = cv2.resize(crop * solid[..., None], size, interpolation=cv2.INTER_AREA)
        solid = cv2.resize(solid, size, interpolation=cv2.INTER_AREA)
        # Back to straight colour where partly covered (premultiplied resize avoids halos).
        crop = np.where(solid[..., None] > 0, crop / np.maximum(solid[..., None], 1e-6), 0.0)
    filled = fill_background(crop, solid)
    image = Image.fromarray(np.clip(filled + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return Texture(
        buffer.getvalue(), "image/jpeg", float(x0), float(y0), float(x1 - x0), float(y1 - y0), size
    )


def fill_background(colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Push-pull fill: where weight is 0, smoothly extend the colours where it is positive."""
    weight = weight.astype(np.float32)
    premultiplied = colour.astype(np.float32) * weight[..., None]
    return _push_pull(premultiplied, weight)


def _push_pull(premultiplied: np.ndarray, weight: np.ndarray) -> np.ndarray:
    height, width = weight.shape
    covered = weight > 1e-4
    straight = premultiplied / np.maximum(weight, 1e-4)[..., None]
    if covered.all():
        return straight
    if height <= 2 and width <= 2:
        total = max(float(weight.sum()), 1e-4)
        mean = premultiplied.reshape(-1, 3).sum(axis=0) / total
        return np.where(covered[..., None], straight, mean[None, None, :])
    half = (max(1, (width + 1) // 2), max(1, (height + 1) // 2))
    coarse = _push_pull(
        cv2.resize(premultiplied, half, interpolation=cv2.INTER_AREA),
        cv2.resize(weight, half, interpolation=cv2.INTER_AREA),
    )
    upsampled = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.where(covered[..., None], straight, upsampled)
