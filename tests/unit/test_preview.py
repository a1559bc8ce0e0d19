"""CPU previews of a GLB: a thumbnail PNG and a turntable WebP that show the object's colours."""

from __future__ import annotations

import io

import numpy as np
import pytest
import trimesh
from PIL import Image

from serve_app.errors import GenerationFailed, InvalidInput
from serve_app.preview import render_thumbnail, render_turntable
from tests.support.meshes import uv_sphere as support_sphere


def uv_sphere(texture: np.ndarray) -> trimesh.Trimesh:
    """A textured radius-0.5 sphere, finer than the exports' one; u = 0 faces +Z (front)."""
    return support_sphere(texture, nlat=24, nlon=32)


def glb_of(*meshes: trimesh.Trimesh) -> bytes:
    data: bytes = trimesh.Scene(list(meshes)).export(file_type="glb")
    return data


def solid(rgb: tuple[int, int, int], size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()


def opaque_pixels(png: bytes) -> np.ndarray:
    rgba = np.asarray(Image.open(io.BytesIO(png)))
    return rgba[rgba[..., 3] == 255][:, :3].astype(float)


@pytest.fixture(scope="module")
def red_sphere() -> bytes:
    return glb_of(uv_sphere(solid((220, 30, 20))))


def test_thumbnail_is_a_transparent_png_of_the_asked_size(red_sphere: bytes) -> None:
    png = render_thumbnail(red_sphere, size=160)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.mode == "RGBA"
    assert image.size == (160, 160)
    alpha = np.asarray(image)[..., 3]
    assert alpha[0, 0] == alpha[0, -1] == alpha[-1, 0] == alpha[-1, -1] == 0
    # A sphere filling the frame covers about pi/4 of it.
    assert 0.6 < (alpha > 0).mean() < 0.85


def test_thumbnail_default_size_is_512(red_sphere: bytes) -> None:
    assert Image.open(io.BytesIO(render_thumbnail(red_sphere))).size == (512, 512)


def test_object_fills_the_frame() -> None:
    # A long thin box: its longest side on screen should nearly span the image.
    box = trimesh.creation.box(extents=[2.0, 0.2, 0.2])
    alpha = np.asarray(Image.open(io.BytesIO(render_thumbnail(glb_of(box), size=128))))[..., 3]
    cols = np.flatnonzero(alpha.max(axis=0))
    rows = np.flatnonzero(alpha.max(axis=1))
    span = max(cols[-1] - cols[0], rows[-1] - rows[0]) + 1
    assert span >= 0.85 * 128


def test_red_texture_renders_reddish(red_sphere: bytes) -> None:
    r, g, b = opaque_pixels(render_thumbnail(red_sphere, size=96)).mean(axis=0)
    assert r > 80
    assert r > 3 * g
    assert r > 3 * b


def test_visible_side_and_texture_orientation_are_right() -> None:
    # Texture: top half red, bottom half blue; the front (u near 0 or 1) green, the back black.
    tex = np.zeros((64, 64, 3), dtype=np.uint8)
    tex[:32, :, 0] = 230
    tex[32:, :, 2] = 230
    tex[:, 16:48] = 0  # back hemisphere (u in 0.25..0.75) black
    png = render_thumbnail(glb_of(uv_sphere(tex)), size=128)
    rgba = np.asarray(Image.open(io.BytesIO(png))).astype(float)
    opaque = rgba[..., 3] == 255
    rows = np.flatnonzero(opaque.any(axis=1))
    top = rgba[rows[0] : rows[0] + 30][opaque[rows[0] : rows[0] + 30]]
    bottom = rgba[rows[-1] - 29 : rows[-1] + 1][opaque[rows[-1] - 29 : rows[-1] + 1]]
    assert top[:, 0].mean() > 2 * top[:, 2].mean()  # north pole is red: v is not flipped
    assert bottom[:, 2].mean() > 2 * bottom[:, 0].mean()
    # The camera looks at the front: the black back hemisphere is mostly hidden.
    dark = (rgba[opaque][:, :3].max(axis=1) < 10).mean()
    assert dark < 0.3


def test_vertex_colours_and_plain_meshes_render() -> None:
    green = trimesh.creation.icosphere(subdivisions=2)
    green.visual = trimesh.visual.ColorVisuals(
        green, vertex_colors=np.tile([20, 200, 40, 255], (len(green.vertices), 1))
    )
    r, g, b = opaque_pixels(render_thumbnail(glb_of(green), size=96)).mean(axis=0)
    assert g > 3 * r and g > 3 * b

    plain = trimesh.creation.icosphere(subdivisions=2)  # no colours, no material: grey
    pixels = opaque_pixels(render_thumbnail(glb_of(plain), size=96))
    assert len(pixels) > 0.5 * 96 * 96
    assert np.ptp(pixels.mean(axis=0)) < 3


def test_every_mesh_of_a_scene_is_drawn_where_its_node_puts_it() -> None:
    red = uv_sphere(solid((220, 30, 20)))
    blue = uv_sphere(solid((20, 30, 220)))
    scene = trimesh.Scene()
    scene.add_geometry(red, transform=trimesh.transformations.translation_matrix([-0.6, 0, 0]))
    scene.add_geometry(blue, transform=trimesh.transformations.translation_matrix([0.6, 0, 0]))
    rgba = np.asarray(Image.open(io.BytesIO(render_thumbnail(scene.export(file_type="glb"), 128))))
    opaque = rgba[..., 3] == 255
    left, right = rgba[:, :40][opaque[:, :40]], rgba[:, -40:][opaque[:, -40:]]
    assert left[:, 0].mean() > 2 * left[:, 2].mean()  # -X is on the left in the 3/4 view
    assert right[:, 2].mean() > 2 * right[:, 0].mean()


def test_double_sided_surface_is_seen_from_behind() -> None:
    # A single quad facing away from the camera: drawn only because it is double-sided.
    quad = trimesh.Trimesh(
        [[-0.5, -0.5, 0], [-0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, -0.5, 0]],
        [[0, 1, 2], [0, 2, 3]],  # clockwise from +Z: the front faces -Z
        process=False,
    )
    material = trimesh.visual.material.PBRMaterial(
        baseColorFactor=[200, 200, 200, 255], doubleSided=True
    )
    quad.visual = trimesh.visual.TextureVisuals(material=material)
    assert len(opaque_pixels(render_thumbnail(glb_of(quad), size=64))) > 0.2 * 64 * 64


def test_turntable_is_a_looping_animated_webp() -> None:
    tex = np.zeros((32, 32, 3), dtype=np.uint8)
    tex[:, :16] = (220, 30, 20)
    tex[:, 16:] = (20, 30, 220)
    data = render_turntable(glb_of(uv_sphere(tex)), size=64, frames=8)
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP"
    assert image.is_animated
    assert image.n_frames == 8
    assert image.size == (64, 64)
    assert image.info.get("loop") == 0
    first = np.asarray(image.convert("RGBA")).copy()
    image.seek(4)  # half a turn later the other colour faces the camera
    assert not np.array_equal(first, np.asarray(image.convert("RGBA")))


def test_rendering_is_deterministic(red_sphere: bytes) -> None:
    assert render_thumbnail(red_sphere, size=96) == render_thumbnail(red_sphere, size=96)
    assert render_turntable(red_sphere, 48, 4) == render_turntable(red_sphere, 48, 4)


@pytest.mark.parametrize("size", [0, 8, 100_000])
def test_unreasonable_sizes_are_refused(red_sphere: bytes, size: int) -> None:
    with pytest.raises(InvalidInput):
        render_thumbnail(red_sphere, size=size)


def test_unreasonable_frame_counts_are_refused(red_sphere: bytes) -> None:
    with pytest.raises(InvalidInput):
        render_turntable(red_sphere, size=64, frames=0)


def test_unreadable_glb_is_a_domain_error() -> None:
    with pytest.raises(GenerationFailed):
        render_thumbnail(b"glTF garbage", size=64)
