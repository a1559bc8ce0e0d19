"""The CPU backend end to end: synthetic photo in, a GLB a viewer can load out."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import trimesh
from PIL import Image

from serve_app.backends import create_backend
from serve_app.backends.base import Backend, GeneratedAsset, GenerationOptions
from serve_app.backends.cpu import CPUBackend
from serve_app.errors import InvalidInput, NoObjectFound
from serve_app.settings import Settings

SIZE = 320


def photo(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A tall ellipse, red on top and blue below, on a noisy gradient backdrop."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    picture = np.stack([200 + 30 * xs, 195 + 25 * ys, 185 + 20 * xs], axis=-1)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (size // 5, size * 2 // 5), 0, 0, 360, 1, -1)
    top = ys < 0.5
    colour = np.where(top[..., None], [[[210, 40, 30]]], [[[40, 60, 200]]])
    picture = np.where(mask[..., None].astype(bool), colour, picture)
    picture = np.clip(picture + rng.normal(0, 5, picture.shape), 0, 255)
    return Image.fromarray(picture.astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def backend() -> CPUBackend:
    cpu = CPUBackend(Settings())
    cpu.load()
    return cpu


@pytest.fixture(scope="module")
def asset(backend: CPUBackend) -> GeneratedAsset:
    return backend.generate([photo()], GenerationOptions(), lambda fraction, stage: None)


def load_mesh(glb: bytes) -> trimesh.Trimesh:
    scene = trimesh.load(io.BytesIO(glb), file_type="glb")
    meshes = list(scene.geometry.values())
    assert len(meshes) == 1
    mesh: trimesh.Trimesh = meshes[0]
    return mesh


def test_is_a_backend(backend: CPUBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "cpu"
    backend.check_health()
    assert isinstance(create_backend("cpu", Settings()), CPUBackend)


def test_glb_is_a_closed_textured_mesh(asset: GeneratedAsset) -> None:
    mesh = load_mesh(asset.glb)
    assert len(mesh.faces) > 100
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    assert mesh.volume > 0  # outward-facing normals
    assert asset.stats["watertight"] is True
    assert asset.stats["faces"] == len(mesh.faces)
    assert asset.stats["vertices"] == len(mesh.vertices)
    assert asset.preview_png is None

    uv = mesh.visual.uv
    assert uv is not None and uv.shape == (len(mesh.vertices), 2)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    texture = mesh.visual.material.baseColorTexture
    assert isinstance(texture, Image.Image)
    assert min(texture.size) > 16


def test_shape_has_depth_and_gltf_orientation(asset: GeneratedAsset) -> None:
    mesh = load_mesh(asset.glb)
    lower, upper = mesh.bounds
    extent = upper - lower
    assert np.allclose((lower + upper) / 2, 0.0, atol=1e-3)  # centred
    assert extent.max() == pytest.approx(1.0, abs=1e-3)  # unit-sized
    assert extent[1] > 1.5 * extent[0]  # the ellipse is tall: +Y is up
    assert extent[2] > 0.3 * extent[:2].max()  # inflated, not a flat card


def test_texture_faces_the_camera_right_way_up(asset: GeneratedAsset) -> None:
    """Vertices on top of the object sample the red top half of the photo."""
    mesh = load_mesh(asset.glb)
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), dtype=float)
    height, width = texture.shape[:2]
    front = mesh.vertices[:, 2] > 0.5 * mesh.vertices[:, 2].max()
    for band, channel in ((mesh.vertices[:, 1] > 0.2, 0), (mesh.vertices[:, 1] < -0.2, 2)):
        uv = mesh.visual.uv[front & band]
        # trimesh moves the uv origin to the lower left on load.
        rows = np.clip(((1.0 - uv[:, 1]) * height).astype(int), 0, height - 1)
        cols = np.clip((uv[:, 0] * width).astype(int), 0, width - 1)
        colours = texture[rows, cols].mean(axis=0)
        assert colours.argmax() == channel


def test_respects_face_limit(backend: CPUBackend) -> None:
    asset = backend.generate([photo()], GenerationOptions(face_limit=500), lambda f, s: None)
    mesh = load_mesh(asset.glb)
    assert 100 < len(mesh.faces) <= 500
    assert mesh.is_watertight


def test_default_face_limit(asset: GeneratedAsset) -> None:
    assert asset.stats["faces"] <= GenerationOptions().face_limit


def test_deterministic(backend: CPUBackend, asset: GeneratedAsset) -> None:
    again = backend.generate([photo()], GenerationOptions(), lambda f, s: None)
    assert again.glb == asset.glb


def test_generation_keeps_blas_on_one_thread(asset: GeneratedAsset) -> None:
    """A generation's BLAS pool spun idle threads: twice the CPU per task (issue 11)."""
    import threadpoolctl

    blas = [pool for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]
    assert blas
    assert all(pool["num_threads"] == 1 for pool in blas)


def test_reports_progress_by_stage(backend: CPUBackend) -> None:
    calls: list[tuple[float, str]] = []
    backend.generate(
        [photo()], GenerationOptions(face_limit=2000), lambda f, s: calls.append((f, s))
    )
    stages = [stage for _, stage in calls]
    assert stages[:4] == ["segmenting", "meshing", "texturing", "exporting"]
    fractions = [fraction for fraction, _ in calls]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


def test_uniform_photo_has_no_object(backend: CPUBackend) -> None:
    with pytest.raises(NoObjectFound):
        backend.generate(
            [Image.new("RGB", (256, 256), (128, 128, 128))], GenerationOptions(), lambda f, s: None
        )


def test_no_images_is_invalid(backend: CPUBackend) -> None:
    with pytest.raises(InvalidInput):
        backend.generate([], GenerationOptions(), lambda f, s: None)


def test_rgba_uses_the_alpha(backend: CPUBackend) -> None:
    """A flat-coloured photo has nothing to segment; its alpha still defines the object."""
    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[..., :3] = (90, 140, 60)
    rgba[60:140, 30:270, 3] = 255  # a wide bar: 240 x 80 pixels
    asset = backend.generate(
        [Image.fromarray(rgba, "RGBA")], GenerationOptions(), lambda f, s: None
    )
    assert asset.stats["segmentation"] == "alpha"
    extent = load_mesh(asset.glb).extents
    assert extent[0] / extent[1] == pytest.approx(3.0, rel=0.05)


def test_texture_size_and_glb_size(backend: CPUBackend) -> None:
    options = GenerationOptions(texture_size=512)
    asset = backend.generate([photo(size=1024, seed=3)], options, lambda f, s: None)
    texture = load_mesh(asset.glb).visual.material.baseColorTexture
    assert max(texture.size) <= 512
    assert len(asset.glb) <= 5 * 1024 * 1024


def test_glb_of_a_1024_photo_is_small(backend: CPUBackend) -> None:
    asset = backend.generate([photo(size=1024, seed=4)], GenerationOptions(), lambda f, s: None)
    assert len(asset.glb) <= 5 * 1024 * 1024
    assert load_mesh(asset.glb).is_watertight


def test_asset_carries_the_mask(asset: GeneratedAsset) -> None:
    """The mask the model was built from comes back with the asset (stored as a task file)."""
    assert asset.mask_png is not None
    mask = np.asarray(Image.open(io.BytesIO(asset.mask_png)))
    assert mask.shape == (SIZE, SIZE)
    ellipse = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(ellipse, (SIZE // 2, SIZE // 2), (SIZE // 5, SIZE * 2 // 5), 0, 0, 360, 1, -1)
    overlap = ((mask > 0) & (ellipse > 0)).sum() / ((mask > 0) | (ellipse > 0)).sum()
    assert overlap >= 0.9


def test_legacy_path_stays_callable(backend: CPUBackend) -> None:
    """The pre-#17 segmentation and mirrored back are kept for bench/quality.py."""
    legacy = CPUBackend(Settings(), legacy=True)
    mesh = load_mesh(legacy.generate([photo()], GenerationOptions(), lambda f, s: None).glb)
    assert mesh.is_watertight
