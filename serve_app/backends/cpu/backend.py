"""The `cpu` backend: classical single-photo reconstruction that needs no GPU and no weights.

segment the object → inflate its silhouette into a closed rounded mesh → project the photo
onto it as a texture → GLB. It uses the first photo of a task (multi-view is a TRELLIS
feature) and ignores the sampler options (seed, steps, guidance, resolution): the result is a
deterministic function of the photo, texture_size, face_limit and remove_background.
"""

from __future__ import annotations

import functools
import time

import cv2
import numpy as np
import threadpoolctl
from PIL import Image

from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.backends.cpu.geometry import (
    inflate_silhouette,
    is_closed_manifold,
    shading_relief,
    vertex_normals,
)
from serve_app.backends.cpu.glb import write_glb
from serve_app.backends.cpu.matte import LearnedMatte
from serve_app.backends.cpu.segment import Matte, encode_mask, segment_arrays, split_alpha
from serve_app.backends.cpu.texture import build_texture
from serve_app.backends.gpu.paths import local_paths
from serve_app.errors import InvalidInput
from serve_app.settings import Settings

# Photos larger than this (longest side) are reduced first: the texture never needs more
# and every full-resolution step stays cheap.
MIN_WORKING_SIDE = 1024
MAX_WORKING_SIDE = 4096


class CPUBackend:
    """Silhouette-inflation reconstruction on the CPU (the default, weight-free backend)."""

    name = "cpu"

    def __init__(self, settings: Settings, *, legacy: bool = False) -> None:
        self.settings = settings
        # legacy: the segmentation and mirrored back before issue #17, kept callable so
        # bench/quality.py can compare both in one run. Never used by the service.
        self.legacy = legacy
        self.matte: LearnedMatte | None = None

    def load(self) -> None:
        """Nothing to download or warm up, unless the learned matte is on: then open its local
        file (BackendUnavailable, saying what to do, when it or onnxruntime is missing)."""
        if self.settings.cpu_matte == "u2net" and self.matte is None:
            self.matte = LearnedMatte.load(local_paths(self.settings).u2net_file)

    def check_health(self) -> None:
        """Always healthy: the backend holds no device or model state."""

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        """Reconstruct the object in the first photo as a textured, closed GLB mesh."""
        if not images:
            raise InvalidInput("At least one image is required.", code="no_image")
        started = time.perf_counter()
        one_thread_per_generation()

        progress(0.0, "segmenting")
        image = _working_image(images[0], options.texture_size)
        rgb, alpha = split_alpha(image)
        segmentation = segment_arrays(
            rgb, alpha, options.remove_background, legacy=self.legacy, matte=self.matte
        )

        progress(0.35, "meshing")
        relief = shading_relief(segmentation.rgb, segmentation.mask)
        mesh = inflate_silhouette(segmentation.mask, options.face_limit, relief, legacy=self.legacy)

        progress(0.65, "texturing")
        texture = build_texture(segmentation.rgb, segmentation.mask, options.texture_size)

        progress(0.85, "exporting")
        # Pixel units → centred on the origin, longest side 1.0 (glTF axes already).
        lower, upper = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
        positions = (mesh.vertices - (lower + upper) / 2.0) / float((upper - lower).max())
        uvs = texture.uv(mesh.vertices[:, 0], -mesh.vertices[:, 1])
        normals = vertex_normals(mesh.vertices, mesh.faces)
        glb = write_glb(positions, normals, uvs, mesh.faces, texture.data, texture.mime_type)

        progress(1.0, "done")
        return GeneratedAsset(
            glb=glb,
            mask_png=encode_mask(segmentation.mask),
            stats={
                "vertices": len(positions),
                "faces": len(mesh.faces),
                "watertight": is_closed_manifold(mesh.faces),
                "seconds": round(time.perf_counter() - started, 3),
                "segmentation": segmentation.method,
            },
        )


def debug_images(
    image: Image.Image, options: GenerationOptions, matte: Matte | None = None
) -> dict[str, bytes]:
    """PNG images explaining the segmentation of a photo (`photo3d generate --debug-dir`):
    the mask, the mask over the photo, and the intermediates of photo segmentation (distance
    to the backdrop model, shadows, the table band, the raw GrabCut result)."""
    rgb, alpha = split_alpha(_working_image(image, options.texture_size))
    segmentation = segment_arrays(rgb, alpha, options.remove_background, debug=True, matte=matte)
    overlay = segmentation.rgb.astype(np.float32)
    overlay[~segmentation.mask] = overlay[~segmentation.mask] * 0.3 + np.array([255, 0, 255]) * 0.2
    images = {
        "mask": segmentation.mask.astype(np.uint8) * 255,
        "overlay": np.clip(overlay, 0, 255).astype(np.uint8),
        **segmentation.debug,
    }
    result = {}
    for name, picture in images.items():
        array = picture if picture.ndim == 2 else np.ascontiguousarray(picture[..., ::-1])
        ok, data = cv2.imencode(".png", array)
        if ok:
            result[f"{name}.png"] = bytes(data.tobytes())
    return result


@functools.cache
def one_thread_per_generation() -> None:
    """Run this process's BLAS (and OpenMP) pools on one thread (once, process-wide).

    A generation is a chain of small array operations: at the bench's photo the BLAS pool
    (least squares, matrix products) made no step faster yet spun its idle threads, 0.38
    CPU-seconds per task instead of 0.20 (docs/performance.md). The service scales CPU
    generation by replicas of one CPU each (serve_config.yaml), so a pool per replica only
    competes with the other replicas. Ray's OMP_NUM_THREADS=1 already keeps BLAS on one
    thread in a replica of one CPU, but not in `photo3d generate`, the benches, or a replica
    given more CPUs. OpenCV keeps its own pool: with cv2.setNumThreads(1) its precise
    distance transform (OpenCV 5.0) returns different values from one call to the next.
    """
    threadpoolctl.threadpool_limits(limits=1)


def _working_image(image: Image.Image, texture_size: int) -> Image.Image:
    """The photo reduced to the working resolution, in RGB or RGBA."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    limit = min(MAX_WORKING_SIDE, max(MIN_WORKING_SIDE, 2 * texture_size))
    longest = max(image.size)
    if longest <= limit:
        return image
    scale = limit / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: integer box reduction first, then a short filter: fast on huge photos.
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
