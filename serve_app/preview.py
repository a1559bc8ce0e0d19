"""Previews of a GLB rendered on the CPU: a PNG thumbnail and an animated WebP turntable.

No GL is needed: a small vectorised numpy z-buffer rasteriser draws the triangles, interpolates
UVs or vertex colours perspective-correctly, samples the texture and applies lambert shading.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from serve_app.errors import GenerationFailed, InvalidInput
from serve_app.exports import MeshPart, read_glb, sample_texture

__all__ = ["render_thumbnail", "render_turntable"]

# A 3/4 view: from the front-right (glTF's front is +Z) and a little above.
_AZIMUTH = math.radians(35.0)
_ELEVATION = math.radians(20.0)
_FOV = math.radians(30.0)  # narrow enough to look like a product shot, wide enough for depth
_MARGIN = 0.04  # fraction of the image left empty on each side
_SUPERSAMPLE = 2  # render at 2x and average: smooth edges at about 3x the cost of 1x
_EMPTY = np.zeros(0, dtype=np.int64)
_NONE = np.zeros(0, dtype=np.float32)
_CHUNK = 1 << 19  # candidate pixels rasterised at once; bounds memory to tens of MB
# Lights in camera space (x right, y up, z into the screen), pointing towards the light.
_AMBIENT = 0.38
_LIGHTS = (
    (np.array([-0.45, 0.65, -0.62]), 0.72),  # key: upper left, in front
    (np.array([0.8, 0.1, -0.3]), 0.18),  # fill: right
)


@dataclass(frozen=True)
class _Model:
    """All parts flattened into shared arrays, centred on the bounding-box centre."""

    vertices: NDArray[np.float64]  # (V, 3)
    normals: NDArray[np.float64]  # (V, 3)
    faces: NDArray[np.int64]  # (F, 3) into the shared vertex array
    face_part: NDArray[np.int64]  # (F,) index into parts
    parts: list[MeshPart]
    offsets: NDArray[np.int64]  # first shared vertex index of each part
    double_sided: NDArray[np.bool_]  # per part: draw faces seen from behind too
    used: NDArray[np.int64]  # vertices that some face uses
    radius: float


def render_thumbnail(glb: bytes, size: int = 512) -> bytes:
    """A PNG (RGBA, transparent background) of the model in a 3/4 view, filling the frame."""
    _check_size(size)
    model = _model(glb)
    rotation = _rotation(_AZIMUTH, _ELEVATION)
    fit = _fit(model, [rotation])
    image = _render(model, rotation, fit, size)
    buf = io.BytesIO()
    Image.fromarray(image, "RGBA").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def render_turntable(glb: bytes, size: int = 256, frames: int = 24) -> bytes:
    """An animated, looping WebP of the model turning once around its vertical axis."""
    _check_size(size)
    if not 1 <= frames <= 360:
        raise InvalidInput("frames must be between 1 and 360", code="invalid_preview")
    model = _model(glb)
    rotations = [_rotation(_AZIMUTH + 2 * math.pi * i / frames, _ELEVATION) for i in range(frames)]
    # One fit for all frames, so the object keeps its size as it turns.
    fit = _fit(model, rotations)
    images = [Image.fromarray(_render(model, r, fit, size), "RGBA") for r in rotations]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=100,
        loop=0,
        quality=80,
        method=4,
    )
    return buf.getvalue()


def _check_size(size: int) -> None:
    # The z-buffer at 2x supersampling costs about 20 bytes a pixel: 1024 -> 80 MB.
    if not 16 <= size <= 1024:
        raise InvalidInput("preview size must be between 16 and 1024", code="invalid_preview")


def _model(glb: bytes) -> _Model:
    parts = read_glb(glb)
    vertices, normals, faces, face_part, offsets = [], [], [], [], []
    offset = 0
    for k, part in enumerate(parts):
        finite = np.asarray(np.isfinite(part.vertices).all(axis=1))
        keep = finite[part.faces].all(axis=1)  # a NaN corner would poison a whole chunk
        vertices.append(np.where(finite[:, None], part.vertices, 0.0))
        normals.append(np.nan_to_num(part.normals))
        faces.append(part.faces[keep] + offset)
        face_part.append(np.full(int(keep.sum()), k, dtype=np.int64))
        offsets.append(offset)
        offset += len(part.vertices)
    all_faces = np.concatenate(faces)
    if len(all_faces) == 0:
        raise GenerationFailed("the GLB has no finite triangles to render", code="preview_failed")
    v = np.concatenate(vertices)
    used_index = np.unique(all_faces)
    used = v[used_index]
    centre = (used.min(axis=0) + used.max(axis=0)) / 2
    v = v - centre
    radius = float(np.linalg.norm(used - centre, axis=1).max())
    return _Model(
        vertices=v,
        normals=np.concatenate(normals),
        faces=all_faces,
        face_part=np.concatenate(face_part),
        parts=parts,
        offsets=np.array(offsets, dtype=np.int64),
        double_sided=np.array([p.double_sided for p in parts], dtype=bool),
        used=used_index,
        radius=radius if radius > 0 else 1.0,
    )


def _rotation(azimuth: float, elevation: float) -> NDArray[np.float64]:
    """World-to-camera rotation, rows = camera right, up, forward, for a camera on a sphere."""
    towards_eye = np.array(
        [
            math.sin(azimuth) * math.cos(elevation),
            math.sin(elevation),
            math.cos(azimuth) * math.cos(elevation),
        ]
    )
    forward = -towards_eye
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.stack([right, up, forward])


def _camera_space(model: _Model, rotation: NDArray[np.float64]) -> NDArray[np.float64]:
    distance = model.radius / math.sin(_FOV / 2)
    cam = model.vertices @ rotation.T
    cam[:, 2] += distance  # the eye sits `distance` back along the view axis
    return cam


def _fit(model: _Model, rotations: list[NDArray[np.float64]]) -> tuple[float, float, float]:
    """(scale, centre x, centre y) mapping projected coordinates so the model fills the frame."""
    lo = np.full(2, np.inf)
    hi = np.full(2, -np.inf)
    for rotation in rotations:
        cam = _camera_space(model, rotation)[model.used]
        projected = cam[:, :2] / cam[:, 2:3]
        lo = np.minimum(lo, projected.min(axis=0))
        hi = np.maximum(hi, projected.max(axis=0))
    extent = float((hi - lo).max())
    scale = (1 - 2 * _MARGIN) / extent if extent > 0 else 1.0
    centre = (lo + hi) / 2
    return scale, float(centre[0]), float(centre[1])


def _render(
    model: _Model, rotation: NDArray[np.float64], fit: tuple[float, float, float], size: int
) -> NDArray[np.uint8]:
    """RGBA uint8 (size, size, 4) image of the model seen through `rotation`."""
    n = size * _SUPERSAMPLE
    scale, cx, cy = fit
    cam = _camera_space(model, rotation)
    inv_z = 1.0 / cam[:, 2]
    px = (0.5 + scale * (cam[:, 0] * inv_z - cx)) * n
    py = (0.5 - scale * (cam[:, 1] * inv_z - cy)) * n  # image rows grow downwards
    tri = np.stack([px, py], axis=-1)[model.faces]  # (F, 3, 2)

    # glTF front faces wind counter-clockwise, which is clockwise (negative) on a y-down
    # screen. Single-sided faces seen from behind are culled, as a glTF viewer does.
    signed = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (
        tri[:, 2, 0] - tri[:, 0, 0]
    ) * (tri[:, 1, 1] - tri[:, 0, 1])
    front = signed < 0
    drawn = np.flatnonzero(front | model.double_sided[model.face_part])
    covered, face_id, l0, l1 = _rasterize(tri[drawn], inv_z[model.faces[drawn]], n, n)

    faces = drawn[face_id]
    corners = model.faces[faces]
    # Screen-space barycentrics -> perspective-correct ones, weighting each corner by 1/z.
    iz = inv_z[corners]
    weights = np.empty((len(faces), 3), dtype=np.float32)
    weights[:, 0] = l0 * iz[:, 0]
    weights[:, 1] = l1 * iz[:, 1]
    weights[:, 2] = (1.0 - l0 - l1) * iz[:, 2]
    weights /= weights.sum(axis=1, keepdims=True)

    # Lambert at the vertices, interpolated (Gouraud): at thumbnail sizes it looks like
    # per-pixel lighting for a fraction of the work. Faces seen from behind get the inner side.
    normals = model.normals @ rotation.T
    shade = np.einsum("ij,ij->i", _lambert(normals)[corners], weights)
    back = np.flatnonzero(~front[faces])
    if len(back):
        shade[back] = np.einsum("ij,ij->i", _lambert(-normals)[corners[back]], weights[back])

    rgba = np.zeros((n * n, 4), dtype=np.uint8)
    colour = _albedo(model, faces, corners, weights)[:, :3] * shade[:, None]
    rgba[covered, :3] = np.clip(colour + 0.5, 0, 255).astype(np.uint8)
    rgba[covered, 3] = 255
    image = Image.fromarray(rgba.reshape(n, n, 4), "RGBA")
    if _SUPERSAMPLE > 1:
        # Average premultiplied colour so the silhouette does not fade to black.
        image = image.convert("RGBa").reduce(_SUPERSAMPLE).convert("RGBA")
    return np.asarray(image)


def _lambert(normals: NDArray[np.float64]) -> NDArray[np.float32]:
    """Ambient plus lambert terms of the fixed lights for camera-space normals."""
    length = np.linalg.norm(normals, axis=1)
    unit = normals / np.where(length > 0, length, 1.0)[:, None]
    shade = np.full(len(normals), _AMBIENT)
    for direction, strength in _LIGHTS:
        shade += strength * np.clip(unit @ (direction / np.linalg.norm(direction)), 0.0, None)
    return shade.astype(np.float32)


def _rasterize(
    tri: NDArray[np.float64], inv_z: NDArray[np.float64], width: int, height: int
) -> tuple[NDArray[np.intp], NDArray[np.int64], NDArray[np.float32], NDArray[np.float32]]:
    """Z-buffer triangles given in pixel coordinates.

    Returns the covered pixels (flat indices), the nearest triangle at each and its
    screen-space barycentrics l0, l1 there. Each triangle is cut into pixel rows and each row
    into the exact span of pixel centres inside it, so only covered pixels are evaluated."""
    n_pixels = width * height
    face_buf = np.full(n_pixels, -1, dtype=np.int32)
    depth_buf = np.zeros(n_pixels)  # 1/z, affine on screen; 0 is infinitely far
    l0_buf = np.zeros(n_pixels, dtype=np.float32)
    l1_buf = np.zeros(n_pixels, dtype=np.float32)

    x, y = tri[..., 0], tri[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    ok = np.isfinite(area) & (np.abs(area) > 1e-12)
    y_first = np.clip(np.ceil(y.min(axis=1) - 0.5), 0, height)
    y_last = np.clip(np.floor(y.max(axis=1) - 0.5), -1, height - 1)
    x_first = np.clip(np.ceil(x.min(axis=1) - 0.5), 0, width)
    x_last = np.clip(np.floor(x.max(axis=1) - 0.5), -1, width - 1)
    n_rows = np.where(ok, y_last - y_first + 1, 0).clip(0).astype(np.int64)
    live = np.flatnonzero(n_rows > 0)
    if len(live) == 0:
        return _EMPTY, _EMPTY, _NONE, _NONE

    # Barycentric l_i = a_i * x + b_i * y + c_i, from the edge opposite corner i.
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_area = 1.0 / area
    a = np.empty((len(tri), 3))
    b = np.empty((len(tri), 3))
    c = np.empty((len(tri), 3))
    for i, (j, k) in enumerate(((1, 2), (2, 0), (0, 1))):
        a[:, i] = (y[:, j] - y[:, k]) * inv_area
        b[:, i] = (x[:, k] - x[:, j]) * inv_area
        c[:, i] = (x[:, j] * y[:, k] - x[:, k] * y[:, j]) * inv_area
    dz = inv_z - inv_z[:, 2:3]  # depth = z2 + l0 * (z0 - z2) + l1 * (z1 - z2)

    # One entry per (triangle, pixel row) it touches.
    row_face = np.repeat(live, n_rows[live])
    row_y = y_first[row_face] + (
        np.arange(len(row_face)) - np.repeat(np.cumsum(n_rows[live]) - n_rows[live], n_rows[live])
    )
    ra = a[row_face]
    rv = b[row_face] * (row_y + 0.5)[:, None] + c[row_face]  # l_i = ra_i * x + rv_i on the row
    # The span of x where every l_i >= -eps; eps leaves no cracks along shared edges.
    bound = (-1e-7 - rv) / np.where(ra != 0, ra, 1.0)
    lo = np.where(ra > 0, bound, -np.inf).max(axis=1)
    hi = np.where(ra < 0, bound, np.inf).min(axis=1)
    lo = np.where(((ra == 0) & (rv < -1e-7)).any(axis=1), np.inf, lo)
    with np.errstate(invalid="ignore"):
        col0 = np.maximum(np.ceil(lo - 0.5), x_first[row_face])
        col1 = np.minimum(np.floor(hi - 0.5), x_last[row_face])
    span = np.where(col1 >= col0, col1 - col0 + 1, 0).astype(np.int64)
    keep = span > 0
    row_face, row_y, ra, rv = row_face[keep], row_y[keep], ra[keep], rv[keep]
    col0, span = col0[keep].astype(np.int64), span[keep]
    if len(span) == 0:
        return _EMPTY, _EMPTY, _NONE, _NONE
    row_dz = dz[row_face]
    # Depth is affine along the row too: depth = za * x + zv.
    za = ra[:, 0] * row_dz[:, 0] + ra[:, 1] * row_dz[:, 1]
    zv = inv_z[row_face, 2] + rv[:, 0] * row_dz[:, 0] + rv[:, 1] * row_dz[:, 1]
    row_pixel = row_y.astype(np.int64) * width

    ends = np.cumsum(span)
    cuts = np.unique(np.searchsorted(ends, np.arange(_CHUNK, int(ends[-1]), _CHUNK)))
    for rows in np.split(np.arange(len(span)), cuts):
        if len(rows) == 0:
            continue
        s = span[rows]
        r = np.repeat(rows, s)
        px = np.arange(int(s.sum())) + np.repeat(col0[rows] - (np.cumsum(s) - s), s)
        xc = px + 0.5
        depth = za[r] * xc + zv[r]
        pixel = row_pixel[r] + px
        face = row_face[r]

        # Nearest fragment per pixel; exact ties go to the higher triangle index, so the
        # result does not depend on evaluation order.
        before = depth_buf[pixel]
        np.maximum.at(depth_buf, pixel, depth)
        best = depth_buf[pixel]
        win = depth == best
        face_buf[pixel[win & (best > before)]] = -1
        np.maximum.at(face_buf, pixel[win], face[win])
        final = np.flatnonzero(win & (face_buf[pixel] == face))
        rf = r[final]
        l0_buf[pixel[final]] = ra[rf, 0] * xc[final] + rv[rf, 0]
        l1_buf[pixel[final]] = ra[rf, 1] * xc[final] + rv[rf, 1]
    covered = np.flatnonzero(face_buf >= 0)
    return covered, face_buf[covered].astype(np.int64), l0_buf[covered], l1_buf[covered]


def _albedo(
    model: _Model,
    faces: NDArray[np.int64],
    corners: NDArray[np.int64],
    weights: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Surface colour (0..255 RGBA) at each covered pixel, from its part's texture or colours."""
    out = np.empty((len(faces), 4), dtype=np.float32)
    part_of = model.face_part[faces] if len(model.parts) > 1 else _EMPTY
    for k, part in enumerate(model.parts):
        if len(model.parts) == 1:
            sel: slice | NDArray[np.int64] = slice(None)
            local, w = corners, weights
        else:
            sel = np.flatnonzero(part_of == k)
            local, w = corners[sel] - model.offsets[k], weights[sel]
        if part.texture is not None and part.uv is not None:
            uv = np.einsum("nij,ni->nj", part.uv.astype(np.float32)[local], w)
            colour = sample_texture(part.texture, uv)
            if np.any(part.base_color != 255):
                colour *= part.base_color / np.float32(255.0)
            out[sel] = colour
        elif part.vertex_colors is not None:
            out[sel] = np.einsum("nij,ni->nj", part.vertex_colors.astype(np.float32)[local], w)
        else:
            out[sel] = part.base_color
    return out
