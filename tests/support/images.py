"""Synthetic photos for tests: an object the CPU backend can find, on a plain or busy background."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def object_photo(size: int = 384, *, seed: int = 0, fmt: str = "PNG", alpha: bool = False) -> bytes:
    """A shaded, textured blob (a 'toy') in the middle of a soft gradient background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    background = np.stack([200 + 30 * x, 205 + 25 * y, 210 + 0 * x], -1)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([size * 0.25, size * 0.18, size * 0.75, size * 0.85], fill=255)
    draw.ellipse([size * 0.35, size * 0.08, size * 0.65, size * 0.35], fill=255)
    cx, cy = size / 2, size / 2
    shade = 1.0 - 0.5 * (((x * size - cx) ** 2 + (y * size - cy) ** 2) / (size * 0.4) ** 2)
    noise = rng.normal(0, 12, (size, size, 1))
    colour = np.array([190.0, 60.0, 40.0]) * shade[..., None] + noise
    obj = Image.fromarray(colour.clip(0, 255).astype(np.uint8), "RGB")
    image.paste(obj, (0, 0), mask.filter(ImageFilter.GaussianBlur(1)))
    if alpha:
        image = image.convert("RGBA")
        image.putalpha(mask)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()
