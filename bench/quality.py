"""Shape quality of the CPU backend against real scanned meshes.

    .venv/bin/python bench/quality.py /work/shared/evaldata/meshes [--size 512] [--jobs 2]

Every mesh (*.obj under the directory) is rendered from several views, on a transparent
background (RGBA: the backend uses the alpha), composited over an opaque studio backdrop, and
placed in three photo-like scenes (RGB: the backend must segment): a wall with a gradient and
blotches (photo-near: wall and blotches of colours close to the object's), a wood or cloth
table in perspective that the object stands on, a soft contact shadow, slight defocus and
noise. Each is reconstructed by the backend as it is (cpu) and as it was before issue #17
(cpu-legacy: border-colour GrabCut, mirrored back), side by side; optionally (--methods) also
by two naive baselines built from the same silhouette (a "billboard": the silhouette extruded
to 5% of its width; an ellipsoid on the silhouette's bounding box), plus a ceiling: the
ground-truth depth of the visible side lifted to a mesh. Every result is normalised (bounding
box centred, diagonal 1), aligned to the ground truth by similarity ICP started from the 24
axis-aligned rotations, and scored by Chamfer-L1 and F-score at 2/5/10% of the diagonal.
Silhouette IoU compares the backend's segmentation with the true mask (opaque backdrops).
With `--matte PATH/u2net.onnx`, method cpu-u2net is the backend with its optional learned matte
(PHOTO3D_CPU_MATTE=u2net) on the same photos.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import trimesh
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.backends.base import GenerationOptions
from serve_app.backends.cpu import CPUBackend, geometry, segment
from serve_app.backends.cpu import backdrop as backdrop_model
from serve_app.backends.cpu.matte import LearnedMatte
from serve_app.backends.cpu.segment import segment_image
from serve_app.errors import Photo3DError
from serve_app.settings import Settings

# Oracles (bench only, never the product; issue #17, hidden side): how much F@2% a better
# guess could gain at most. oracle-scale: the cpu backend with the best of these multipliers
# of its depth scale per case, picked against the ground truth. oracle-mirror: the true
# visible depth with its back mirrored about the plane (offsets from the outline's mean
# depth, in units of the visible depth range) that fits the ground truth best.
ORACLE_MULTIPLIERS = (0.5, 0.7, 0.85, 1.0, 1.2, 1.45, 1.8)
ORACLE_MIRROR_OFFSETS = (-0.2, 0.0, 0.2, 0.4)
ORACLES = ("oracle-scale", "oracle-mirror")
METHODS = ("cpu-legacy", "cpu", "cpu-u2net", "billboard", "ellipsoid", "ceiling", *ORACLES)
DEFAULT_METHODS = ("cpu-legacy", "cpu")
# The backend's modules whose constants --geometry and --segment may override (sweeps).
CONSTANTS = {"geometry": geometry, "segment": segment, "backdrop": backdrop_model}
STYLES = ("transparent", "opaque", "photo-near", "photo-wood", "photo-cloth")
THRESHOLDS = (0.02, 0.05, 0.10)
# Views as (azimuth, elevation) in degrees around the mesh's up axis: four sides from a
# photographer's height and one from above.
VIEWS = ((30.0, 20.0), (120.0, 20.0), (210.0, 20.0), (300.0, 20.0), (75.0, 60.0))
FIELD_OF_VIEW = 30.0
METRIC_POINTS = 20_000
ICP_POINTS = 1_500
# Objects whose thinnest side is at least this fraction of their longest count as "bulky".
BULKY_RATIO = 0.25
# Scans without a texture image get a plain paint colour (picked from the name).
PAINTS = ((196, 142, 104), (214, 170, 60), (90, 120, 170), (170, 70, 60))
BACKDROPS = (
    ((228, 230, 234), (168, 172, 182)),
    ((196, 212, 228), (120, 134, 150)),
    ((214, 226, 206), (150, 160, 140)),
    ((236, 232, 224), (96, 98, 104)),
    ((132, 138, 146), (200, 204, 210)),
)


@dataclass(frozen=True)
class Scan:
    """A ground-truth mesh with its colour source, in a z-up frame."""

    name: str
    mesh: trimesh.Trimesh
    texture: np.ndarray | None  # (H, W, 3) float in 0..1, or None: painted
    uv: np.ndarray | None  # per-vertex texture coordinates with the texture
    paint: np.ndarray  # RGB used when there is no texture
    bulky: bool


@dataclass(frozen=True)
class Render:
    """One view of a scan: picture, true mask, and the visible surface in camera space."""

    rgba: np.ndarray  # (H, W, 4) uint8, straight alpha
    mask: np.ndarray  # (H, W) bool
    camera_points: np.ndarray  # (H, W, 3) camera space (x right, y up, z towards camera)
    rotation: np.ndarray  # world -> camera


# --------------------------------------------------------------------------- scans


def load_scan(path: Path, up: str) -> Scan:
    """Load an OBJ and rotate it so +z is up."""
    mesh = trimesh.load(path, force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh):
        raise SystemExit(f"{path}: not a triangle mesh")
    axis = up if up != "auto" else ("z" if "ycb" in str(path).lower() else "y")
    if axis == "y":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    texture, uv = None, getattr(mesh.visual, "uv", None)
    image = getattr(getattr(mesh.visual, "material", None), "image", None)
    # Loaders substitute a tiny flat image when the texture file is missing.
    if image is not None and min(image.size) > 8 and uv is not None:
        texture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    centred = mesh.vertices - mesh.vertices.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    extents = np.ptp(centred @ axes.T, axis=0)
    name = path.parent.name if path.stem.startswith("textured") else path.stem
    paint = np.array(PAINTS[sum(name.encode()) % len(PAINTS)], dtype=np.float64)
    return Scan(
        name,
        mesh,
        texture,
        None if texture is None else np.asarray(uv),
        paint,
        bool(extents.min() / extents.max() >= BULKY_RATIO),
    )


# --------------------------------------------------------------------------- rendering


def camera_rotation(azimuth: float, elevation: float) -> np.ndarray:
    """World (z up) to camera (x right, y up, looking down -z) for a camera on a sphere."""
    az, el = np.radians(azimuth), np.radians(elevation)
    back = np.array([np.cos(el) * np.sin(az), -np.cos(el) * np.cos(az), np.sin(el)])
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    return np.stack([right, up, back])


def rasterize(
    screen: np.ndarray, faces: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer (larger z wins): per pixel the face id (-1 empty) and barycentrics."""
    depth = np.full(height * width, -np.inf)
    face_id = np.full(height * width, -1, dtype=np.int64)
    tri = screen[faces]
    lower = np.floor(tri[:, :, :2].min(axis=1)).astype(np.int64)
    upper = np.ceil(tri[:, :, :2].max(axis=1)).astype(np.int64)
    span = np.maximum((upper - lower).max(axis=1), 1)
    tile = 2 ** np.ceil(np.log2(span)).astype(np.int64)
    for size in np.unique(tile):
        selected = np.flatnonzero(tile == size)
        offsets_y, offsets_x = np.mgrid[0:size, 0:size]
        batches = max(1, len(selected) * int(size) ** 2 // 4_000_000 + 1)
        for batch in np.array_split(selected, batches):
            px = (lower[batch, 0, None] + offsets_x.ravel()[None]).ravel()
            py = (lower[batch, 1, None] + offsets_y.ravel()[None]).ravel()
            face = np.repeat(batch, int(size) ** 2)
            l0, l1, l2 = _barycentric(tri[face], px + 0.5, py + 0.5)
            inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0) & (px >= 0) & (px < width)
            inside &= (py >= 0) & (py < height)
            if not inside.any():
                continue
            t = tri[face[inside]]
            z = l0[inside] * t[:, 0, 2] + l1[inside] * t[:, 1, 2] + l2[inside] * t[:, 2, 2]
            pixel = (py * width + px)[inside]
            order = np.lexsort((-z, pixel))
            pixel, z, face_hit = pixel[order], z[order], face[inside][order]
            first = np.r_[True, pixel[1:] != pixel[:-1]]
            pixel, z, face_hit = pixel[first], z[first], face_hit[first]
            closer = z > depth[pixel]
            depth[pixel[closer]] = z[closer]
            face_id[pixel[closer]] = face_hit[closer]
    face_grid = face_id.reshape(height, width)
    ys, xs = np.nonzero(face_grid >= 0)
    bary = np.zeros((height, width, 3))
    l0, l1, l2 = _barycentric(screen[faces[face_grid[ys, xs]]], xs + 0.5, ys + 0.5)
    bary[ys, xs] = np.column_stack([l0, l1, l2])
    return face_grid, bary


def _barycentric(
    tri: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    den = np.where(np.abs(den) < 1e-12, np.nan, den)
    l0 = ((b[:, 1] - c[:, 1]) * (x - c[:, 0]) + (c[:, 0] - b[:, 0]) * (y - c[:, 1])) / den
    l1 = ((c[:, 1] - a[:, 1]) * (x - c[:, 0]) + (a[:, 0] - c[:, 0]) * (y - c[:, 1])) / den
    l0, l1 = np.nan_to_num(l0, nan=-1.0), np.nan_to_num(l1, nan=-1.0)
    return l0, l1, 1.0 - l0 - l1


def render(scan: Scan, azimuth: float, elevation: float, size: int) -> Render:
    """Perspective render, 2x supersampled, Lambert-lit, object filling ~80% of the frame."""
    mesh = scan.mesh
    rotation = camera_rotation(azimuth, elevation)
    centre = (mesh.bounds[0] + mesh.bounds[1]) / 2
    radius = float(np.linalg.norm(mesh.vertices - centre, axis=1).max())
    focal_angle = np.radians(FIELD_OF_VIEW / 2)
    distance = radius / np.sin(focal_angle) / 0.85
    camera = (mesh.vertices - centre) @ rotation.T - [0.0, 0.0, distance]
    raster = 2 * size
    focal = raster / 2 / np.tan(focal_angle)
    screen = np.column_stack(
        [
            raster / 2 + focal * camera[:, 0] / -camera[:, 2],
            raster / 2 - focal * camera[:, 1] / -camera[:, 2],
            camera[:, 2],
        ]
    )
    face_id, bary = rasterize(screen, mesh.faces, raster, raster)
    covered = face_id >= 0
    corners = mesh.faces[np.maximum(face_id, 0)]
    points = np.einsum("hwk,hwkc->hwc", bary, camera[corners])

    normals = np.asarray(mesh.vertex_normals) @ rotation.T
    normal = np.einsum("hwk,hwkc->hwc", bary, normals[corners])
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-9)
    view = -points / np.maximum(np.linalg.norm(points, axis=-1, keepdims=True), 1e-9)
    # Scans are not always consistently oriented: light the side facing the camera.
    normal *= np.where((normal * view).sum(-1, keepdims=True) < 0, -1.0, 1.0)
    light = np.array([-0.4, 0.6, 0.7]) / np.linalg.norm([-0.4, 0.6, 0.7])
    shade = 0.35 + 0.65 * np.clip(normal @ light, 0.0, 1.0)
    if scan.texture is not None and scan.uv is not None:
        uv = np.einsum("hwk,hwkc->hwc", bary, scan.uv[corners])
        th, tw = scan.texture.shape[:2]
        cols = np.clip((uv[..., 0] % 1.0) * (tw - 1), 0, tw - 1).astype(int)
        rows = np.clip((1.0 - uv[..., 1] % 1.0) * (th - 1), 0, th - 1).astype(int)
        albedo = scan.texture[rows, cols] * 255.0
    else:
        albedo = np.broadcast_to(scan.paint, points.shape)
    colour = np.where(covered[..., None], albedo * shade[..., None], 0.0)
    alpha = covered.astype(np.float32)
    # 2x2 box filter: anti-aliased edges, premultiplied then straightened.
    premultiplied = cv2.resize(
        colour.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA
    )
    coverage = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA)
    straight = premultiplied / np.maximum(coverage[..., None], 1e-6)
    rgba = np.dstack([np.clip(straight, 0, 255), coverage * 255.0]).round().astype(np.uint8)
    small_points = points[::2, ::2]
    small_covered = covered[::2, ::2] & (coverage > 0.5)
    return Render(
        rgba, coverage >= 0.5, np.where(small_covered[..., None], small_points, np.nan), rotation
    )


def backdrop(size: int, seed: int) -> np.ndarray:
    """A plain studio-like backdrop: wall gradient, a darker table, blotches and noise."""
    rng = np.random.default_rng(seed)
    wall, table = (np.array(c, dtype=np.float32) for c in BACKDROPS[seed % len(BACKDROPS)])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    picture = wall * (1.05 - 0.15 * ys - 0.08 * xs)[..., None]
    horizon = 0.72 + 0.05 * np.sin(seed)
    floor = ys > horizon + 0.03 * (xs - 0.5)
    picture = np.where(floor[..., None], table * (0.9 + 0.15 * ys)[..., None], picture)
    blotches = cv2.GaussianBlur(
        rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 24
    )
    picture = (
        picture * (1.0 + 0.25 * blotches / max(float(np.abs(blotches).max()), 1e-6))[..., None]
    )
    return np.clip(picture + rng.normal(0, 3.0, picture.shape), 0, 255)


def photo(view: Render, style: str, seed: int) -> Image.Image:
    """The render as the backend receives it: RGBA (transparent) or composited RGB."""
    if style == "transparent":
        return Image.fromarray(view.rgba, "RGBA")
    alpha = view.rgba[..., 3:4].astype(np.float32) / 255.0
    if style in PHOTO_STYLES:
        return Image.fromarray(photo_scene(view, style, seed), "RGB")
    composite = view.rgba[..., :3] * alpha + backdrop(len(alpha), seed) * (1.0 - alpha)
    return Image.fromarray(np.clip(composite + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- photo-like scenes

# Photo-like scenes: (wall style, table style). "near" walls take a colour close to the
# object's own (the hard case: a teal drill in front of a green wall).
PHOTO_STYLES = ("photo-near", "photo-wood", "photo-cloth")
TABLE_WOOD = (150, 104, 66)
TABLE_CLOTH = (150, 152, 156)


def _object_colour(view: Render) -> np.ndarray:
    """Median colour of the object in the render."""
    return np.median(view.rgba[view.mask][:, :3].astype(np.float32), axis=0)


def _near_colour(colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour a few ΔE from `colour`: slightly lighter/darker and shifted in hue."""
    lab = cv2.cvtColor(colour.reshape(1, 1, 3).astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab = lab.reshape(3)
    lightness = lab[0] + (12.0 if lab[0] < 55 else -12.0)
    angle = rng.uniform(0, 2 * np.pi)
    shifted = np.array([lightness, lab[1] + 8 * np.cos(angle), lab[2] + 8 * np.sin(angle)])
    rgb = cv2.cvtColor(shifted.reshape(1, 1, 3).astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb.reshape(3) * 255.0, 0, 255)


def photo_scene(view: Render, style: str, seed: int) -> np.ndarray:
    """A photo-like RGB scene around the render: a wall with a gradient and blotches (in a
    colour near the object's for "photo-near"), a wood or cloth table seen in perspective on
    which the object stands, a soft contact shadow under it, slight defocus and sensor noise."""
    rng = np.random.default_rng(seed)
    size = view.mask.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    rows = np.flatnonzero(view.mask.any(axis=1))
    top, bottom = float(rows[0]), float(rows[-1])
    obj = _object_colour(view)
    # The table's far edge crosses behind the object, a little tilted.
    horizon = top + rng.uniform(0.45, 0.7) * (bottom - top)
    tilt = rng.uniform(-0.06, 0.06)
    edge = horizon + tilt * (xs - size / 2)

    if style == "photo-near":
        wall = _near_colour(obj, rng)
        blotch_colour = _near_colour(obj, rng)
    else:
        wall = np.array(BACKDROPS[seed % len(BACKDROPS)][0], dtype=np.float32)
        blotch_colour = _near_colour(obj, rng) if rng.random() < 0.5 else wall * 0.8
    gradient = 1.08 - 0.18 * ys / size - 0.1 * np.abs(xs / size - rng.uniform(0.3, 0.7))
    picture = wall[None, None] * gradient[..., None]
    # Large soft blotches, some in the blotch colour.
    field = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 16)
    field /= max(float(np.abs(field).max()), 1e-6)
    weight = np.clip((field - 0.25) * 2.5, 0, 1)[..., None]
    picture = picture * (1 - 0.7 * weight) + blotch_colour * gradient[..., None] * 0.7 * weight

    # The table in perspective: depth ~ 1 / (row - horizon); texture in table coordinates.
    below = ys - edge
    depth = 0.35 * size / np.maximum(below + 0.02 * size, 1.0)
    u = (xs - size / 2) * depth / size * 8.0
    v = depth * 8.0
    if style == "photo-cloth":
        weave = 0.5 + 0.25 * np.sin(u * 40) * np.sin(v * 40)
        table = np.array(TABLE_CLOTH, np.float32)[None, None] * (0.9 + 0.15 * weave[..., None])
    else:
        wobble = 0.4 * np.sin(v * 3.0 + 2 * np.sin(u * 0.7))
        grain = 0.5 + 0.5 * np.sin((u + wobble) * 9.0 + rng.uniform(0, 6))
        planks = (np.floor(u * 0.8) % 2)[..., None]
        table = np.array(TABLE_WOOD, np.float32)[None, None] * (
            0.85 + 0.15 * grain[..., None] - 0.08 * planks
        )
    # Farther parts of the table are a little lighter (light falls off towards the camera).
    table = table * (1.05 - 0.15 * np.clip(below / size * 2.5, 0, 1))[..., None]
    on_table = (below > 0)[..., None]
    picture = np.where(on_table, table, picture)

    # Contact shadow: the object's footprint, squashed onto the table and blurred, plus a
    # wider ambient darkening.
    mask = view.mask.astype(np.float32)
    height = max(int(bottom - horizon), 4)
    foot = mask[int(horizon) : int(bottom) + 1]
    squashed = cv2.resize(foot, (size, max(2, height // 3)), interpolation=cv2.INTER_AREA)
    footprint = np.zeros((size, size), np.float32)
    start = int(bottom) + 1 - len(squashed) + max(2, size // 100)
    start = min(start, size - len(squashed))
    footprint[start : start + len(squashed)] = squashed
    footprint = np.maximum(footprint, mask * (ys > horizon))
    tight = cv2.GaussianBlur(footprint, (0, 0), size / 120)
    wide = cv2.GaussianBlur(footprint, (0, 0), size / 30)
    darkening = np.clip(0.45 * tight + 0.35 * wide / max(float(wide.max()), 1e-6), 0, 0.7)
    picture = picture * (1.0 - darkening[..., None] * (below > -3)[..., None])

    alpha = view.rgba[..., 3:4].astype(np.float32) / 255.0
    composite = view.rgba[..., :3] * alpha + picture * (1.0 - alpha)
    composite = cv2.GaussianBlur(composite.astype(np.float32), (0, 0), 0.7)
    composite = composite + rng.normal(0, 2.5, composite.shape)
    return np.clip(composite + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- predictions


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Area-uniform surface samples (seeded)."""
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points)


def cpu_points(glb: bytes, count: int) -> np.ndarray:
    """Surface samples of the backend's GLB."""
    scene = trimesh.load(io.BytesIO(glb), file_type="glb")
    mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError("the GLB holds no triangle mesh")
    return sample_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), count, 0)


def silhouette_frame(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (x, y) of mask pixels as x right / y up coordinates, and the outline points."""
    ys, xs = np.nonzero(mask)
    inside = np.column_stack([xs + 0.5, -(ys + 0.5)]).astype(np.float64)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    outline = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    outline = np.column_stack([outline[:, 0] + 0.5, -(outline[:, 1] + 0.5)])
    return inside, outline


def billboard_points(mask: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The silhouette extruded to 5% of its width: front, back and side walls."""
    rng = np.random.default_rng(seed)
    inside, outline = silhouette_frame(mask)
    width = float(np.ptp(inside[:, 0])) + 1.0
    thickness = 0.05 * width
    area_faces, area_sides = 2.0 * len(inside), len(outline) * thickness
    n_faces = round(count * area_faces / (area_faces + area_sides))
    picks = inside[rng.integers(0, len(inside), n_faces)] + rng.uniform(-0.5, 0.5, (n_faces, 2))
    z = np.where(rng.random(n_faces) < 0.5, thickness / 2, -thickness / 2)
    sides = outline[rng.integers(0, len(outline), count - n_faces)]
    side_z = rng.uniform(-thickness / 2, thickness / 2, len(sides))
    return np.concatenate([np.column_stack([picks, z]), np.column_stack([sides, side_z])])


def ellipsoid_points(mask: np.ndarray, count: int, seed: int) -> np.ndarray:
    """An ellipsoid filling the silhouette's bounding box, as deep as the box's short side."""
    inside, _ = silhouette_frame(mask)
    lower, upper = inside.min(axis=0) - 0.5, inside.max(axis=0) + 0.5
    semi = np.array([*(upper - lower) / 2, (upper - lower).min() / 2])
    sphere = trimesh.creation.icosphere(subdivisions=4)
    vertices = np.asarray(sphere.vertices) * semi + [*(lower + upper) / 2, 0.0]
    return sample_mesh(vertices, np.asarray(sphere.faces), count, seed)


def ceiling_points(view: Render, count: int, seed: int) -> np.ndarray:
    """The true depth of the visible side, lifted to a mesh (no back side)."""
    points = view.camera_points
    valid = np.isfinite(points[..., 0])
    height, width = valid.shape
    index = np.full((height, width), -1, dtype=np.int64)
    index[valid] = np.arange(int(valid.sum()))
    vertices = points[valid]
    scale = float(np.ptp(vertices, axis=0).max())
    a, b = index[:-1, :-1], index[:-1, 1:]
    c, d = index[1:, :-1], index[1:, 1:]
    faces = np.concatenate(
        [np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)]
    )
    faces = faces[(faces >= 0).all(axis=1)]
    # Do not bridge depth jumps (an ear in front of the body).
    z = vertices[faces][:, :, 2]
    faces = faces[np.ptp(z, axis=1) < 0.03 * scale]
    return sample_mesh(vertices, faces, count, seed)


def mirrored_truth_points(view: Render, count: int, seed: int, offset: float) -> np.ndarray:
    """Oracle (bench only): the true visible surface and its mirror about a smooth surface
    through the outline (the outline's true depth spread inwards), moved `offset`
    visible-depth ranges back, with a wall joining the two along the outline."""
    points = view.camera_points
    valid = np.isfinite(points[..., 0])
    rim = valid & ~ndimage.binary_erosion(valid)
    depth = np.where(valid, points[..., 2], 0.0)
    sigma = 0.15 * float(np.sqrt(valid.sum()))
    weight = cv2.GaussianBlur(rim.astype(np.float64), (0, 0), sigma)
    spread = cv2.GaussianBlur(np.where(rim, depth, 0.0), (0, 0), sigma) / np.maximum(weight, 1e-12)
    plane = spread - offset * float(np.ptp(depth[valid]))
    mirrored = points.copy()
    mirrored[..., 2] = 2.0 * plane - points[..., 2]
    mirrored[~valid] = np.nan
    front = ceiling_points(view, count, seed)
    back = ceiling_points(Render(view.rgba, view.mask, mirrored, view.rotation), count, seed + 1)
    rng = np.random.default_rng(seed)
    rim_points, gap = points[rim], 2.0 * (points[rim][:, 2] - plane[rim])
    # Wall area ~ outline length x gap; the outline length ~ rim pixels x pixel pitch.
    pitch = float(np.median(np.abs(np.diff(points[valid][:, 0]))))
    front_area = float(valid.sum()) * pitch**2
    wall_count = round(count * float(np.abs(gap).sum()) * pitch / max(front_area, 1e-12))
    picks = rng.integers(0, len(rim_points), wall_count)
    wall = rim_points[picks].copy()
    wall[:, 2] -= rng.random(wall_count) * gap[picks]
    return np.concatenate([front, back, wall])


# --------------------------------------------------------------------------- alignment, metrics


def normalise(points: np.ndarray) -> np.ndarray:
    """Bounding box centred at the origin with a diagonal of 1."""
    lower, upper = points.min(axis=0), points.max(axis=0)
    return (points - (lower + upper) / 2) / float(np.linalg.norm(upper - lower))


def axis_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes."""
    rotations = []
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), permutation] = signs
            if np.linalg.det(matrix) > 0:
                rotations.append(matrix)
    return rotations


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, rotation, translation minimising |s R source + t - target|^2."""
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    xs, xt = source - mu_s, target - mu_t
    u, sigma, vt = np.linalg.svd(xt.T @ xs / len(source))
    fix = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[2, 2] = -1.0
    rotation = u @ fix @ vt
    scale = float((sigma * np.diag(fix)).sum() / max(float((xs**2).sum() / len(source)), 1e-12))
    return scale, rotation, mu_t - scale * rotation @ mu_s


def icp(
    source: np.ndarray, target: np.ndarray, target_tree: cKDTree, start: np.ndarray, steps: int
) -> tuple[np.ndarray, float]:
    """Similarity ICP with symmetric nearest-neighbour pairs; returns (transform, chamfer)."""
    scale, rotation, shift = 1.0, start, np.zeros(3)
    for _ in range(steps):
        moved = scale * source @ rotation.T + shift
        _, forward = target_tree.query(moved)
        _, backward = cKDTree(moved).query(target)
        pairs_source = np.concatenate([source, source[backward]])
        pairs_target = np.concatenate([target[forward], target])
        scale, rotation, shift = umeyama(pairs_source, pairs_target)
    moved = scale * source @ rotation.T + shift
    transform = np.eye(4)
    transform[:3, :3], transform[:3, 3] = scale * rotation, shift
    return transform, chamfer(moved, target, target_tree)


def chamfer(points: np.ndarray, target: np.ndarray, target_tree: cKDTree) -> float:
    forward, _ = target_tree.query(points)
    backward, _ = cKDTree(points).query(target)
    return float(forward.mean() + backward.mean()) / 2


def align(prediction: np.ndarray, truth: np.ndarray, seed: int) -> np.ndarray:
    """Prediction moved onto the truth (both normalised) by the best of 24 ICP starts."""
    rng = np.random.default_rng(seed)
    small_p = prediction[rng.choice(len(prediction), ICP_POINTS, replace=False)]
    small_t = truth[rng.choice(len(truth), ICP_POINTS, replace=False)]
    tree = cKDTree(small_t)
    trials = [icp(small_p, small_t, tree, start, 12) for start in axis_rotations()]
    transform, _ = min(trials, key=lambda trial: trial[1])
    # Refine the winner on more points.
    mid_p = prediction[rng.choice(len(prediction), 4 * ICP_POINTS, replace=False)]
    mid_t = truth[rng.choice(len(truth), 4 * ICP_POINTS, replace=False)]
    moved = mid_p @ transform[:3, :3].T + transform[:3, 3]
    refine, _ = icp(moved, mid_t, cKDTree(mid_t), np.eye(3), 15)
    transform = refine @ transform
    return prediction @ transform[:3, :3].T + transform[:3, 3]


def scores(prediction: np.ndarray, truth: np.ndarray, truth_tree: cKDTree) -> list[float]:
    """Chamfer-L1 and the F-scores at THRESHOLDS, in units of the truth's diagonal (= 1)."""
    forward, _ = truth_tree.query(prediction)
    backward, _ = cKDTree(prediction).query(truth)
    result = [float(forward.mean() + backward.mean()) / 2]
    for tau in THRESHOLDS:
        precision, recall = float((forward < tau).mean()), float((backward < tau).mean())
        result.append(2 * precision * recall / max(precision + recall, 1e-12))
    return result


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Case:
    """One reconstruction to score: a scan, a view and a background style."""

    path: Path
    up: str
    view: int
    style: str
    size: int
    methods: tuple[str, ...] = DEFAULT_METHODS
    # Overrides of the backend's constants (module in CONSTANTS, name, value), for sweeps.
    overrides: tuple[tuple[str, str, float], ...] = ()
    matte: str = ""  # the U2-Net file of cpu-u2net


@functools.cache
def learned_matte(path: str) -> LearnedMatte:
    """One U2-Net session per bench process."""
    return LearnedMatte.load(Path(path))


@dataclass(frozen=True)
class Result:
    """Scores of one method on one case (error set when the backend refused the photo)."""

    scan: str
    bulky: bool
    view: int
    style: str
    method: str
    iou: float = float("nan")
    chamfer: float = float("nan")
    f_scores: tuple[float, ...] = ()
    error: str = ""
    # Silhouette errors in pixels: (missed, extra), and how many of each lie in the one-pixel
    # rim along the true outline (inside it for missed, outside for extra).
    missed: tuple[int, int] = (0, 0)
    extra: tuple[int, int] = (0, 0)


def evaluate(case: Case) -> list[Result]:
    """All methods on one (scan, view, background) case."""
    cv2.setNumThreads(1)
    for module, name, value in case.overrides:
        setattr(CONSTANTS[module], name, value)
    scan = load_scan(case.path, case.up)
    azimuth, elevation = VIEWS[case.view]
    view = render(scan, azimuth, elevation, case.size)
    image = photo(view, case.style, seed=case.view + 7 * len(scan.name))
    truth = normalise(sample_mesh(scan.mesh.vertices, scan.mesh.faces, METRIC_POINTS, 1))
    truth_tree = cKDTree(truth)
    key = (scan.name, scan.bulky, case.view, case.style)
    results = []
    mask = None
    for method in case.methods:
        legacy = method == "cpu-legacy"
        try:
            if method in ("cpu", "cpu-legacy", "cpu-u2net"):
                matte = learned_matte(case.matte) if method == "cpu-u2net" else None
                seg = segment_image(image, legacy=legacy, matte=matte).mask
                backend = CPUBackend(Settings(), legacy=legacy)
                backend.matte = matte
                asset = backend.generate([image], GenerationOptions(), lambda f, s: None)
                points = cpu_points(asset.glb, METRIC_POINTS)
                if method == "cpu":
                    mask = seg
            else:
                # The baselines use the backend's own silhouette: only the geometry differs.
                seg = mask if mask is not None else segment_image(image).mask
                mask = seg
                if method == "billboard":
                    points = billboard_points(seg, METRIC_POINTS, 2)
                elif method == "ellipsoid":
                    points = ellipsoid_points(seg, METRIC_POINTS, 3)
                elif method == "ceiling":
                    points = ceiling_points(view, METRIC_POINTS, 4)
                else:
                    candidates = _oracle_candidates(method, image, view)
        except Photo3DError as error:
            results.append(Result(*key, method=method, error=error.code))
            continue
        if method not in ORACLES:
            candidates = [points]
        iou = float((seg & view.mask).sum() / max((seg | view.mask).sum(), 1))
        missed, extra = silhouette_errors(seg, view.mask)
        # An oracle keeps its best variant by F@2% against the truth (the first on a tie).
        chamfer_l1, *f_scores = max(
            (scores(align(normalise(p), truth, seed=5), truth, truth_tree) for p in candidates),
            key=lambda scored: scored[1],
        )
        results.append(
            Result(*key, method, iou, chamfer_l1, tuple(f_scores), missed=missed, extra=extra)
        )
    return results


def silhouette_errors(
    mask: np.ndarray, truth: np.ndarray
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((missed, missed in the rim), (extra, extra in the rim)) in pixels: the rim is the
    one-pixel band along the true outline, inside it for missed pixels and outside it for
    extra ones. Errors in the rim are where the outline lies; the rest are whole regions
    (a shadow strip, a part of the object lost)."""
    kernel = np.ones((3, 3), np.uint8)
    inner = truth & ~cv2.erode(truth.astype(np.uint8), kernel).astype(bool)
    outer = ~truth & cv2.dilate(truth.astype(np.uint8), kernel).astype(bool)
    missed, extra = truth & ~mask, mask & ~truth
    return (
        (int(missed.sum()), int((missed & inner).sum())),
        (int(extra.sum()), int((extra & outer).sum())),
    )


def _oracle_candidates(method: str, image: Image.Image, view: Render) -> list[np.ndarray]:
    """An oracle's variants (not a product method): the cpu backend at each depth multiplier,
    or the mirrored truth at each offset; the caller scores them and keeps the best."""
    if method == "oracle-mirror":
        return [mirrored_truth_points(view, METRIC_POINTS, 4, o) for o in ORACLE_MIRROR_OFFSETS]
    candidates = []
    product = geometry.DEPTH_MULTIPLIER
    for multiplier in ORACLE_MULTIPLIERS:
        geometry.DEPTH_MULTIPLIER = product * multiplier
        try:
            asset = CPUBackend(Settings()).generate([image], GenerationOptions(), lambda f, s: None)
        finally:
            geometry.DEPTH_MULTIPLIER = product
        candidates.append(cpu_points(asset.glb, METRIC_POINTS))
    return candidates


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def _f(result: Result, tau: float) -> float:
    return result.f_scores[THRESHOLDS.index(tau)]


def summarise(results: list[Result], styles: tuple[str, ...], methods: tuple[str, ...]) -> str:
    """Markdown tables: means per background and method, per scan, and the #17 targets."""
    scored = [r for r in results if not r.error]
    f_names = " | ".join(f"F@{round(t * 100)}% ↑" for t in THRESHOLDS)
    lines = [
        "\n**per background** (mean over scans × views; IoU = silhouette IoU of the mask)\n",
        f"| background | method | n | Chamfer-L1 ↓ | {f_names} | IoU mean | IoU min |",
        "|---|---|---|---|" + "---|" * (len(THRESHOLDS) + 2),
    ]
    for style, method in itertools.product((*styles, "all photo-like", "all"), methods):
        chosen = [
            r
            for r in scored
            if r.method == method
            and (
                r.style == style
                or style == "all"
                or (style == "all photo-like" and r.style in PHOTO_STYLES)
            )
        ]
        if chosen:
            f_means = [_mean(r.f_scores[i] for r in chosen) for i in range(len(THRESHOLDS))]
            ious = [r.iou for r in chosen]
            lines.append(
                f"| {style} | {method} | {len(chosen)} | {_mean(r.chamfer for r in chosen):.4f}"
                f" | {' | '.join(f'{f:.3f}' for f in f_means)} | {_mean(ious):.3f}"
                f" | {min(ious):.3f} |"
            )
    lines += [
        "\n**per scan** (mean over views): F@2%, F@5% and silhouette IoU, "
        + " → ".join(methods)
        + "\n",
        "| scan | bulky | background | F@2% | F@5% | IoU |",
        "|---|---|---|---|---|---|",
    ]
    for scan in sorted({r.scan for r in scored}):
        for style in styles:
            mine = [r for r in scored if r.scan == scan and r.style == style]
            if not mine:
                continue
            cells = []
            for value in (lambda r: _f(r, 0.02), lambda r: _f(r, 0.05), lambda r: r.iou):
                cells.append(
                    " → ".join(
                        f"{_mean(value(r) for r in mine if r.method == m):.3f}" for m in methods
                    )
                )
            lines.append(f"| {scan} | {mine[0].bulky} | {style} | " + " | ".join(cells) + " |")
    lines.append("\n**targets (issue #17)**\n")
    for method in methods:
        if not method.startswith("cpu"):
            continue
        alpha = {
            (r.scan, r.view): _f(r, 0.05)
            for r in scored
            if r.method == method and r.style == "transparent"
        }
        gaps = [
            alpha[(r.scan, r.view)] - _f(r, 0.05)
            for r in scored
            if r.method == method and r.style in PHOTO_STYLES and (r.scan, r.view) in alpha
        ]
        photo_ious = [r.iou for r in scored if r.method == method and r.style in PHOTO_STYLES]
        refused = [r for r in results if r.error and r.method == method]
        if not photo_ious:
            continue
        masks = (
            f"silhouette IoU min {min(photo_ious):.3f}, "
            f"{sum(i < 0.95 for i in photo_ious)} of {len(photo_ious)} below 0.95; "
            f"{len(refused)} photos refused"
        )
        if gaps:
            lines.append(
                f"- {method}: F@5% on photo-like backgrounds is {_mean(gaps):.3f} below the "
                f"same views with alpha (mean over {len(gaps)}; worst case {max(gaps):.3f}); "
                + masks
            )
        else:
            # Without the transparent renders (a sweep of the masks) only the masks' part.
            lines.append(f"- {method} (no transparent renders to compare with): " + masks)
    if "cpu" in methods and "cpu-legacy" in methods:
        for label, chosen_styles in (("all backgrounds", styles), ("photo-like", PHOTO_STYLES)):
            pairs = {
                (r.scan, r.view, r.style): _f(r, 0.02)
                for r in scored
                if r.method == "cpu-legacy" and r.style in chosen_styles
            }
            deltas = [
                _f(r, 0.02) - pairs[(r.scan, r.view, r.style)]
                for r in scored
                if r.method == "cpu" and (r.scan, r.view, r.style) in pairs
            ]
            if deltas:
                lines.append(
                    f"- F@2% cpu − cpu-legacy on {label}: {_mean(deltas):+.3f} "
                    f"(mean over {len(deltas)} paired cases)"
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("meshes", type=Path, help="directory searched for *.obj")
    parser.add_argument("--size", type=int, default=512, help="render size in pixels")
    parser.add_argument(
        "--views",
        default=str(len(VIEWS)),
        help="a count (the first N views) or comma-separated view indices (0-4)",
    )
    parser.add_argument(
        "--up",
        choices=("auto", "y", "z"),
        default="auto",
        help="up axis of the scans; auto: z for YCB (path contains 'ycb'), else y",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--styles",
        default=",".join(STYLES),
        help="backgrounds, comma-separated: " + ", ".join(STYLES),
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="reconstructions, comma-separated: " + ", ".join(METHODS),
    )
    parser.add_argument(
        "--scans", default="", help="only scans whose path contains one of these (comma-separated)"
    )
    parser.add_argument(
        "--geometry",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a constant of serve_app/backends/cpu/geometry.py (sweeps); repeatable",
    )
    parser.add_argument(
        "--segment",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a constant of serve_app/backends/cpu/segment.py or backdrop.py "
        "(sweeps); repeatable",
    )
    parser.add_argument(
        "--matte",
        default="",
        metavar="PATH",
        help="u2net.onnx for method cpu-u2net (the backend's optional learned matte)",
    )
    # --- issue #17 masks: every case's silhouette IoU, to find the failing masks ---
    parser.add_argument(
        "--cases",
        action="store_true",
        help="also list every case's silhouette IoU per method, worst first",
    )
    args = parser.parse_args()
    styles = tuple(x for x in args.styles.split(",") if x)
    methods = tuple(x for x in args.methods.split(",") if x)
    if not set(styles) <= set(STYLES) or not set(methods) <= set(METHODS):
        parser.error("unknown style or method")
    if ("cpu-u2net" in methods) != bool(args.matte):
        parser.error("--matte PATH goes with method cpu-u2net, and cpu-u2net needs it")
    if args.matte:
        try:  # a missing file or onnxruntime: say so before rendering
            learned_matte(args.matte)
        except Photo3DError as error:
            parser.error(error.message)

    wanted = [x for x in args.scans.split(",") if x] or [""]
    paths = [p for p in sorted(args.meshes.rglob("*.obj")) if any(w in str(p) for w in wanted)]
    if not paths:
        print(f"no .obj files under {args.meshes}", file=sys.stderr)
        return 2
    if "," in args.views or not args.views.isdigit():
        view_indices = [int(x) for x in args.views.split(",") if x]
    else:
        view_indices = list(range(min(int(args.views), len(VIEWS))))
    if not view_indices or not all(0 <= v < len(VIEWS) for v in view_indices):
        parser.error("unknown view")
    overrides = []
    for items, modules, where in (
        (args.geometry, ("geometry",), "geometry.py"),
        (args.segment, ("segment", "backdrop"), "segment.py or backdrop.py"),
    ):
        for item in items:
            name, _, value = item.partition("=")
            owner = [m for m in modules if name.isupper() and hasattr(CONSTANTS[m], name)]
            if not owner:
                parser.error(f"no constant {name} in serve_app/backends/cpu/{where}")
            overrides.append((owner[0], name, float(value)))
    views = len(view_indices)
    cases = [
        Case(path, args.up, view, style, args.size, methods, tuple(overrides), args.matte)
        for path in paths
        for view in view_indices
        for style in styles
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = [result for batch in pool.map(evaluate, cases) for result in batch]
    print(f"# bench/quality.py {' '.join(sys.argv[1:])}")
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}: "
        f"{len(paths)} scans × {views} views × {len(styles)} backgrounds, "
        f"{time.perf_counter() - started:.0f} s"
    )
    for failed in (r for r in results if r.error):
        print(f"# backend refused: {failed.scan} view {failed.view} {failed.style}: {failed.error}")
    print(summarise(results, styles, methods))
    if args.cases:
        print(
            "\n**per case** (silhouette IoU, worst first; missed and extra pixels, of which "
            "in the one-pixel rim along the true outline)\n"
        )
        print(
            "| scan | view | background | method | IoU | missed (rim) | extra (rim) |\n"
            "|---|---|---|---|---|---|---|"
        )
        for r in sorted(
            (r for r in results if not r.error and r.iou == r.iou), key=lambda r: r.iou
        ):
            print(
                f"| {r.scan} | {r.view} | {r.style} | {r.method} | {r.iou:.3f} "
                f"| {r.missed[0]} ({r.missed[1]}) | {r.extra[0]} ({r.extra[1]}) |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
