"""The real TRELLIS and TRELLIS.2 pipelines on the evaluation photos: a valid, textured GLB per
photo, with seconds per asset and peak GPU memory recorded (see conftest.GpuReport).

Runs only where CUDA, the GPU libraries, the weights (PHOTO3D_WEIGHTS_DIR) and
../shared/evaldata are present; skips with the reason otherwise."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import trimesh
from PIL import Image

from serve_app.backends.base import GeneratedAsset, GenerationOptions
from serve_app.errors import InvalidInput
from serve_app.settings import Settings

pytestmark = pytest.mark.gpu

# Photos copied from public repos (../shared/evaldata/SOURCES.md); the tests skip without them.
_REPO_ROOT = Path(__file__).resolve().parents[2]
_EVALDATA = os.environ.get("PHOTO3D_EVALDATA", str(_REPO_ROOT.parent / "shared" / "evaldata"))
PHOTOS = Path(_EVALDATA) / "photos"


def photos(pattern: str) -> list[Path]:
    """Evaluation photos matching `pattern`, sorted; [] when evaldata is absent."""
    return sorted(PHOTOS.glob(pattern)) if PHOTOS.is_dir() else []


# Photos with transparent backgrounds (alpha path) and one opaque photo (segmenter path).
TRELLIS_PHOTOS = photos("trellis/*.png") + photos("triposr/teapot.png")
MULTI_VIEW = photos("trellis/multi_mushroom/*.png")
TRELLIS2_PHOTOS = photos("trellis2/*.webp") + photos("instantmesh/chair_wood.jpg")


def _ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name[:24]}" for p in paths]


def _params(paths: list[Path]) -> Any:
    # Without evaldata there is nothing to parametrize over: one case that skips.
    return paths or [pytest.param(None, marks=pytest.mark.skip(reason="no evaluation photos"))]


def _open(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def check_glb(asset: GeneratedAsset, *, max_faces: int | None = None) -> trimesh.Scene:
    """The GLB loads, has triangles, finite non-degenerate bounds and a base-colour texture."""
    assert asset.glb[:4] == b"glTF"
    scene = cast(trimesh.Scene, trimesh.load(io.BytesIO(asset.glb), file_type="glb", force="scene"))
    meshes = [g for g in scene.geometry.values() if isinstance(g, trimesh.Trimesh)]
    assert meshes, "GLB has no triangle mesh"
    faces = sum(len(m.faces) for m in meshes)
    assert faces > 100
    if max_faces is not None:
        assert faces <= max_faces
    bounds = scene.bounds
    assert bounds is not None and np.isfinite(bounds).all()
    assert (bounds[1] - bounds[0]).min() > 1e-3
    material = getattr(meshes[0].visual, "material", None)
    texture = getattr(material, "baseColorTexture", None)
    assert texture is not None, "GLB has no base-colour texture"
    return scene


def record(
    report: Any, backend: str, asset_name: str, asset: GeneratedAsset, seconds: float, **extra: Any
) -> None:
    report.add(
        backend=backend,
        asset=asset_name,
        seconds=round(seconds, 2),
        peak_gpu_memory_bytes=asset.stats.get("peak_gpu_memory_bytes"),
        glb_bytes=len(asset.glb),
        faces=asset.stats.get("faces"),
        stage_seconds={k: v for k, v in asset.stats.items() if str(k).startswith("seconds_")},
        **extra,
    )


def _run(
    backend: Any, images: list[Image.Image], options: GenerationOptions
) -> tuple[GeneratedAsset, float]:
    stages: list[str] = []
    start = time.perf_counter()
    asset = backend.generate(images, options, lambda fraction, stage: stages.append(stage))
    seconds = time.perf_counter() - start
    assert stages[-1] == "done"
    return asset, seconds


class TestTrellis:
    @pytest.fixture(scope="class")
    def backend(self, gpu_backends: Any) -> Iterator[Any]:
        from serve_app.backends.trellis import TrellisBackend

        loaded = gpu_backends.load(TrellisBackend(Settings()))
        yield loaded
        gpu_backends.unload(loaded)

    def test_health(self, backend: Any) -> None:
        backend.check_health()

    def test_refuses_trellis2_option_on_real_backend(self, backend: Any) -> None:
        with pytest.raises(InvalidInput):
            backend.generate(
                [Image.new("RGB", (64, 64))], GenerationOptions(resolution=512), lambda f, s: None
            )

    @pytest.mark.parametrize("path", _params(TRELLIS_PHOTOS), ids=_ids(TRELLIS_PHOTOS) or None)
    def test_single_image(self, backend: Any, gpu_report: Any, path: Path) -> None:
        options = GenerationOptions(seed=1, texture_size=1024, face_limit=50_000)
        asset, seconds = _run(backend, [_open(path)], options)
        check_glb(asset)
        assert asset.extra_files["gaussians.ply"][:3] == b"ply"
        record(gpu_report, "trellis", path.name, asset, seconds)

    @pytest.mark.parametrize("mode", ["stochastic", "multidiffusion"])
    def test_multi_image(self, backend: Any, gpu_report: Any, mode: Any) -> None:
        if len(MULTI_VIEW) < 2:
            pytest.skip("multi-view evaluation photos not found")
        images = [_open(p) for p in MULTI_VIEW]
        asset, seconds = _run(backend, images, GenerationOptions(seed=1, multi_image_mode=mode))
        check_glb(asset)
        record(gpu_report, "trellis", f"multi_mushroom[{mode}]", asset, seconds, images=len(images))


class TestTrellis2:
    @pytest.fixture(scope="class")
    def backend(self, gpu_backends: Any) -> Iterator[Any]:
        from serve_app.backends.trellis2 import Trellis2Backend

        loaded = gpu_backends.load(Trellis2Backend(Settings()))
        yield loaded
        gpu_backends.unload(loaded)

    def test_health(self, backend: Any) -> None:
        backend.check_health()

    @pytest.mark.parametrize("path", _params(TRELLIS2_PHOTOS), ids=_ids(TRELLIS2_PHOTOS) or None)
    @pytest.mark.parametrize("resolution", [512, 1024])
    def test_single_image(self, backend: Any, gpu_report: Any, path: Path, resolution: Any) -> None:
        options = GenerationOptions(
            seed=1, resolution=resolution, texture_size=1024, face_limit=100_000
        )
        asset, seconds = _run(backend, [_open(path)], options)
        # o_voxel decimates to the target; remeshing may leave it a little above.
        check_glb(asset, max_faces=int(options.face_limit * 1.1))
        record(gpu_report, "trellis2", path.name, asset, seconds, resolution=resolution)

    def test_resolution_1536(self, backend: Any, gpu_report: Any) -> None:
        if not TRELLIS2_PHOTOS:
            pytest.skip("no evaluation photos")
        path = TRELLIS2_PHOTOS[0]
        options = GenerationOptions(seed=1, resolution=1536, texture_size=2048, face_limit=200_000)
        asset, seconds = _run(backend, [_open(path)], options)
        check_glb(asset, max_faces=int(options.face_limit * 1.1))
        record(gpu_report, "trellis2", path.name, asset, seconds, resolution=1536)
