"""Turn an object silhouette into a closed, rounded mesh ("inflation").

The silhouette is rasterised onto a grid of cells; the front surface height is the square root
of a Poisson solution (−∇²u = c, u = 0 on the outline), which gives round cross-sections: a
strip becomes a cylinder, a disc a flattened ball, thin parts stay thin. This front sheet is
decimated (and checked to stay manifold), mirrored to make the back, and a low wall joins the
two along every outline loop, so the mesh is closed and two-manifold by construction, holes
and one-cell-wide parts included, and the front never meets the back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import fast_simplification
import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
from scipy import ndimage

from serve_app.errors import GenerationFailed, NoObjectFound

# −∇²u = INFLATION: 2 makes elongated parts (limbs, handles, bottles) circular in cross-section
# and a disc a half-flattened ball (4 would make it a sphere). Measured on scanned objects
# (bench/quality.py), 1.5-2 fits best; thicker (3-4.5) loses on all but the bulkiest.
INFLATION = 2.0
# The hidden side (issue #17): depth relative to the local width (see _shape_cues).
# Bulkiness = widest inscribed radius / sqrt(area of its part): a disc is 0.56, a 1:4
# rectangle 0.25; at or below BULK_THIN the profile is DEPTH_SCALE_MIN deep, at or above
# BULK_ROUND fully round.
BULK_THIN = 0.22
BULK_ROUND = 0.37
DEPTH_SCALE_MIN = 0.5
# Evenness = mean distance to the outline / the largest: 0.5 for a strip of even width. A
# thin outline of even width is a tube (a banana, a pen, a cable), up to TUBE_DEPTH_SCALE
# deep; one of uneven width (scissors, a flat tool) a plate.
EVENNESS_PLATE = 0.37
EVENNESS_TUBE = 0.42
TUBE_DEPTH_SCALE = 0.85
# Solidity (area / convex hull area) from which an outline counts as flat-sided, and the
# depth scale such objects get at most.
SOLIDITY_CURVED = 0.90
SOLIDITY_FLAT = 0.96
FLAT_DEPTH_SCALE = 0.7
# Exponent applied to the normalised ball profile (a sweep knob for bench/quality.py --geometry;
# 1.0 = the union of balls as it is, which measured best).
PROFILE_EXPONENT = 1.0
# Multiplies the guessed depth scale: 1.0 in the product. bench/quality.py's oracle-scale
# method sweeps it to measure how much a better depth guess could gain at most.
DEPTH_MULTIPLIER = 1.0
# Ground contact (issue #17): a thin object (a plate or a tube: scissors, a banana, a pen)
# lies on the table, so its outline is the table plane seen from the camera's elevation,
# foreshortened: every ball of the union is moved in depth by cot(elevation) x its centre's
# height in the image (lower = nearer), which lays the object back into that plane. The
# elevation is not measured: GROUND_ELEVATION_DEG is an assumed typical photo (0 turns the
# rule off). A bulky object (an animal, a bottle, a drill) stands: it is left upright.
GROUND_ELEVATION_DEG = 30.0
# How "lying" an object is from its depth scale: at or below LIE_SCALE_FLAT (a plate) fully,
# at or above LIE_SCALE_UPRIGHT not at all; a tube (evenness) lies too.
LIE_SCALE_FLAT = 0.6
LIE_SCALE_UPRIGHT = 0.8
# ... and only when its outline runs across the image: seen from a low camera, everything on
# the table is squashed vertically, so a lying object's long axis looks near-horizontal. An
# outline whose long axis is within LIE_AXIS_FLAT_DEG of horizontal counts fully, one beyond
# LIE_AXIS_UPRIGHT_DEG not at all (it stands, or the camera looks down from high above, where
# tilting would stretch it); an outline elongated less than LIE_ELONGATION_MIN (principal
# axes' ratio) says nothing about its axis and is not tilted.
LIE_AXIS_FLAT_DEG = 30.0
LIE_AXIS_UPRIGHT_DEG = 60.0
LIE_ELONGATION_MIN = 1.2
LIE_ELONGATION_FULL = 1.5
# Half-height of the wall along the outline, in cells: gives thin parts some body.
RIM_HALF_HEIGHT = 0.5
# Relief from shading: height in units of the object's size per unit of band-passed lightness.
# Small on purpose: it adds folds and grooves under a light, not a second shape.
RELIEF_AMPLITUDE = 0.04
# Grid density: enough cells to follow the outline well, few enough to stay fast.
MIN_GRID_FACES = 40_000
MAX_GRID_FACES = 160_000
GRID_FACES_PER_LIMIT = 3.0
# fast_simplification's "agg" settings tried in turn (7 is its default); lower ones may stop
# short of the target.
DECIMATION_AGGRESSIVENESS = (7.0, 9.0, 8.0, 10.0)

# fast_simplification keeps its mesh in module-global state: one decimation at a time.
_DECIMATE_LOCK = threading.Lock()


@dataclass(frozen=True)
class InflatedMesh:
    """A closed triangle mesh in photo pixel units, glTF axes: x right, y up (= minus the
    pixel row), z towards the camera."""

    vertices: np.ndarray  # (N, 3) float64
    faces: np.ndarray  # (M, 3) int64, counter-clockwise seen from outside


def inflate_silhouette(
    mask: np.ndarray, face_limit: int, relief: np.ndarray | None = None, *, legacy: bool = False
) -> InflatedMesh:
    """Closed rounded mesh of a boolean silhouette with at most face_limit faces.

    relief: optional per-pixel height offsets (pixels) added to the front surface; the back
    gets the smooth inflated profile only (the photo says nothing about the back's folds).
    legacy: the back mirrors the front, relief included (the behaviour before issue #17).
    """
    # Each cell gives ~4 faces; start a few times over the limit so decimation, not the grid,
    # decides where detail goes. Should decimation not stay manifold (thin parts at a tiny
    # limit), fall back to ever coarser grids that fit the limit without decimating.
    budget = min(max(GRID_FACES_PER_LIMIT * face_limit, MIN_GRID_FACES), MAX_GRID_FACES)
    for _ in range(24):
        sheet = _front_sheet(mask, budget, relief, legacy)
        if _closed_face_count(sheet) <= face_limit:
            return _close(sheet, legacy)
        decimated = _decimate_sheet(sheet, face_limit) if budget > face_limit else None
        if decimated is not None:
            return _close(decimated, legacy)
        budget = min(budget, face_limit) * 0.7
    raise GenerationFailed(
        f"Could not build a closed mesh within {face_limit} faces; try a higher face limit."
    )


@dataclass(frozen=True)
class _Sheet:
    """The front surface: an open height field whose outline becomes the rim."""

    vertices: np.ndarray  # (N, 3): x, y (up), depth >= 0
    faces: np.ndarray  # (M, 3) counter-clockwise seen from +z
    rim_from: np.ndarray  # directed outline edges (face on the left)
    rim_to: np.ndarray
    base: _BaseDepth  # the smooth profile without relief, for the back


def _front_sheet(
    mask: np.ndarray, grid_faces: float, relief: np.ndarray | None, legacy: bool = False
) -> _Sheet:
    cells, origin, cell_size = _cell_grid(mask, grid_faces)
    cells = _remove_pinches(cells)
    if not cells.any():
        raise NoObjectFound("The object is too small in the photo to build a 3D shape from.")

    padded = np.pad(cells, 1)
    # Vertex (r, c) of the grid is the corner shared by cells (r-1..r, c-1..c).
    around = np.stack([padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]], axis=0)
    used = around.any(axis=0)
    interior = np.logical_and.reduce(around, axis=0)

    if legacy:
        height, mid = _poisson_height(interior, cell_size), np.zeros(interior.shape)
    else:
        height, mid = _profile(interior, cell_size)
    rows, cols = np.nonzero(used)
    index = np.full(used.shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(len(rows))
    xy = np.stack([origin[0] + cols * cell_size[0], origin[1] + rows * cell_size[1]], axis=1)
    faces = _cell_faces(cells, index)
    rim_from, rim_to = _boundary_edges(faces, len(rows))
    xy = _smooth_outline(xy, rim_from, rim_to, max_shift=0.4 * min(cell_size))

    # A low wall along the outline gives one-cell-wide parts some body and keeps the front
    # and back apart, so they can never touch or cross.
    rim_z = RIM_HALF_HEIGHT * min(cell_size)
    depth = height[rows, cols] + rim_z
    if relief is not None:
        # Fade the relief out towards the outline so the rim stays smooth.
        depth = depth + _sample(relief, xy) * np.clip(height[rows, cols] / (8.0 * rim_z), 0.0, 1.0)
        depth = np.maximum(depth, 0.5 * rim_z)
    vertices = np.column_stack([xy[:, 0], -xy[:, 1], depth + mid[rows, cols]])
    base = _BaseDepth(height + rim_z, origin, cell_size, 0.5 * rim_z, mid)
    return _Sheet(vertices, faces, rim_from, rim_to, base)


def _closed_face_count(sheet: _Sheet) -> int:
    return 2 * len(sheet.faces) + 2 * len(sheet.rim_from)


@dataclass(frozen=True)
class _BaseDepth:
    """The inflated height on the grid's vertices (relief excluded)."""

    grid: np.ndarray  # (rows + 1, cols + 1) depth at grid vertices
    origin: tuple[float, float]
    cell_size: tuple[float, float]
    floor: float
    mid: np.ndarray  # (rows + 1, cols + 1) depth of the mid-surface front and back mirror

    def back(self, vertices: np.ndarray) -> np.ndarray:
        """Depth of the back under sheet vertices (x, y up): the mid-surface less the
        bilinear profile."""
        cols = (vertices[:, 0] - self.origin[0]) / self.cell_size[0]
        rows = (-vertices[:, 1] - self.origin[1]) / self.cell_size[1]
        depth = ndimage.map_coordinates(self.grid, [rows, cols], order=1, mode="nearest")
        mid = ndimage.map_coordinates(self.mid, [rows, cols], order=1, mode="nearest")
        return np.asarray(mid, np.float64) - np.maximum(np.asarray(depth, np.float64), self.floor)


def _close(sheet: _Sheet, legacy: bool = False) -> InflatedMesh:
    """Make the back (the smooth profile; a mirror of the front when legacy) and stitch the
    rim with a wall."""
    count = len(sheet.vertices)
    back = sheet.vertices * [1.0, 1.0, -1.0]
    if not legacy:
        # Same outline (the rim wall stays vertical), smooth depth: the front's shading
        # relief is what the camera saw, not what is behind.
        back[:, 2] = sheet.base.back(sheet.vertices)
    rim_from, rim_to = sheet.rim_from, sheet.rim_to
    wall = np.concatenate(
        [
            np.column_stack([rim_to, rim_from, rim_from + count]),
            np.column_stack([rim_to, rim_from + count, rim_to + count]),
        ]
    )
    faces = np.concatenate([sheet.faces, sheet.faces[:, ::-1] + count, wall])
    if not is_closed_manifold(faces):
        raise GenerationFailed("The reconstructed surface is not closed.")
    return InflatedMesh(np.concatenate([sheet.vertices, back]), faces)


def _decimate_sheet(sheet: _Sheet, face_limit: int) -> _Sheet | None:
    """Quadric decimation of the front sheet so the closed mesh fits face_limit, or None."""
    target = min(int(0.45 * face_limit), len(sheet.faces) - 1)
    for _ in range(8):
        if target < 4:
            return None
        decimated = _simplify_sheet(sheet, target)
        if decimated is None:
            target -= max(target // 20, 1)
            continue
        excess = _closed_face_count(decimated) - face_limit
        if excess <= 0:
            return decimated
        # The outline simplifies less than the inside: shrink the target by what is over.
        target -= max(excess // 2 + 1, target // 20)
    return None


def _simplify_sheet(sheet: _Sheet, target: int) -> _Sheet | None:
    """The sheet decimated to ~target faces, or None if no setting kept it manifold."""
    # The collapse order depends on the aggressiveness; an occasional fold at one setting
    # is usually absent at another.
    for aggressiveness in DECIMATION_AGGRESSIVENESS:
        with _DECIMATE_LOCK:
            points, faces = fast_simplification.simplify(
                sheet.vertices,
                sheet.faces.astype(np.int32),
                target_count=target,
                agg=aggressiveness,
            )
        points, faces = _drop_unused(np.asarray(points), np.asarray(faces, dtype=np.int64))
        if len(faces) == 0:
            continue
        points, faces = _split_pinches(points, faces)
        if _is_manifold_sheet(faces, len(points)):
            rim_from, rim_to = _boundary_edges(faces, len(points))
            return _Sheet(points, faces, rim_from, rim_to, sheet.base)
    return None


def _split_pinches(points: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give each fan of faces at a vertex where outline loops touch its own vertex copy.

    Decimation can merge two outline vertices across a narrow gap; the copies are nudged a
    hair towards their own fan so the closed mesh has no coincident vertices.
    """
    rim_from, _ = _boundary_edges(faces, len(points))
    values, counts = np.unique(rim_from, return_counts=True)
    pinched = values[counts > 1]
    if len(pinched) == 0:
        return points, faces
    faces = faces.copy()
    extra: list[np.ndarray] = []
    for vertex in pinched.tolist():
        rows, corners = np.nonzero(faces == vertex)
        # Around the vertex each face is the wedge vertex -> nxt -> prv; wedges sharing an
        # edge (one's prv is another's nxt) belong to the same fan.
        nxt = faces[rows, (corners + 1) % 3]
        prv = faces[rows, (corners + 2) % 3]
        fan = _fans(nxt.tolist(), prv.tolist())
        for label in np.unique(fan)[1:]:
            members = rows[fan == label]
            centre = points[faces[members]].reshape(-1, 3).mean(axis=0)
            extra.append(points[vertex] + 0.02 * (centre - points[vertex]))
            faces[members, corners[fan == label]] = len(points) + len(extra) - 1
    return np.concatenate([points, np.array(extra)]), faces


def _fans(nxt: list[int], prv: list[int]) -> np.ndarray:
    """Label wedges around one vertex by fan: wedge i continues into j when prv[i] == nxt[j]."""
    parent = list(range(len(nxt)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_next = {vertex: i for i, vertex in enumerate(nxt)}
    for i, vertex in enumerate(prv):
        j = by_next.get(vertex)
        if j is not None:
            parent[root(i)] = root(j)
    return np.array([root(i) for i in range(len(nxt))])


def _is_manifold_sheet(faces: np.ndarray, vertex_count: int) -> bool:
    """Oriented, edge-manifold, and every outline vertex on exactly one outline loop."""
    start = faces.ravel()
    end = faces[:, [1, 2, 0]].ravel()
    keys = np.sort(start * vertex_count + end)
    if bool((keys[1:] == keys[:-1]).any()):
        return False
    rim_from, rim_to = _boundary_edges(faces, vertex_count)
    # A vertex where two outline loops touch would give the wall a non-manifold edge.
    return not (_has_repeats(rim_from) or _has_repeats(rim_to))


def _has_repeats(values: np.ndarray) -> bool:
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


def shading_relief(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-pixel height offsets (pixels) from shading: lighter bulges out, darker recedes."""
    ys, xs = np.nonzero(mask)
    size = float(max(np.ptp(xs), np.ptp(ys)) + 1)
    # Work where the object spans ~256 pixels: the mesh grid cannot hold finer relief.
    scale = min(1.0, 256.0 / size)
    height, width = mask.shape
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    lightness = cv2.resize(grey, small_size, interpolation=cv2.INTER_AREA)
    weight = cv2.resize(mask.astype(np.float32), small_size, interpolation=cv2.INTER_AREA)

    def blur(sigma: float) -> np.ndarray:
        # Normalised convolution: the backdrop's lightness never leaks into the object.
        total = cv2.GaussianBlur(lightness * weight, (0, 0), sigma)
        return np.asarray(total / np.maximum(cv2.GaussianBlur(weight, (0, 0), sigma), 1e-4))

    band = blur(1.0) - blur(max(2.0, 0.03 * size * scale))
    relief = cv2.resize(band, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(RELIEF_AMPLITUDE * size * relief, dtype=np.float32)


def _cell_grid(
    mask: np.ndarray, grid_faces: float
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Cells over the mask's bounding box (~grid_faces/4 of them), origin and cell size."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise NoObjectFound("The object mask is empty: there is nothing to reconstruct.")
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    side = max(1.0, float(np.sqrt(len(xs) / (grid_faces / 4.0))))
    grid_w, grid_h = max(1, round((x1 - x0) / side)), max(1, round((y1 - y0) / side))
    coverage = cv2.resize(crop, (grid_w, grid_h), interpolation=cv2.INTER_AREA)
    cell_size = ((x1 - x0) / grid_w, (y1 - y0) / grid_h)
    cells = coverage >= 0.5
    if not cells.any():
        # Coarser than the object is thick (a tiny face limit): keep its best-covered cells.
        cells = coverage >= 0.5 * float(coverage.max())
    return cells, (float(x0), float(y0)), cell_size


def _remove_pinches(cells: np.ndarray) -> np.ndarray:
    """Fill cells so no two cells touch only at a corner (that vertex would be non-manifold)."""
    cells = cells.copy()
    for _ in range(32):
        a, b = cells[:-1, :-1], cells[:-1, 1:]
        c, d = cells[1:, :-1], cells[1:, 1:]
        main = a & d & ~b & ~c
        anti = b & c & ~a & ~d
        if not (main.any() or anti.any()):
            return cells
        cells[:-1, 1:] |= main
        cells[1:, :-1] |= main
        cells[:-1, :-1] |= anti
        cells[1:, 1:] |= anti
    raise GenerationFailed("Could not build a manifold outline from the object mask.")


def _profile(interior: np.ndarray, cell_size: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Height of the front above the mid-surface (the back mirrors it) and the mid-surface's
    depth (0 for an upright object), both on the grid's vertices.

    Every inside point carries a ball as wide as the silhouette there (its distance to the
    outline); the surface is the top of their union, scaled by `_shape_cues`. So depth
    follows the local width: a limb or handle is a round tube, a compact body (an animal's
    trunk, a stone) as deep as it is wide, where the Poisson profile of the legacy path made
    a disc only 0.7 of that. A thin object lies on the table: each ball is moved in depth
    with its centre's height in the image (see GROUND_ELEVATION_DEG).
    """
    if not interior.any():
        return np.zeros(interior.shape), np.zeros(interior.shape)
    distance = cv2.distanceTransform(
        np.pad(interior, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
    )[1:-1, 1:-1].astype(np.float64)
    step = 0.5 * (cell_size[0] + cell_size[1])
    height, owner = _ball_height_and_owner(interior, distance)
    if PROFILE_EXPONENT != 1.0 and height.max() > 0:
        top = float(height.max())
        height = top * (height / top) ** PROFILE_EXPONENT
    # Each part of the mask (a pair of shoes, a cup beside its saucer) is judged on its own:
    # its depth scale, whether it lies on the table, and its mid-surface. A ball never
    # reaches across the outline into another part, so the heights need no split.
    count, labels = cv2.connectedComponents(interior.astype(np.uint8), connectivity=4)
    scale = np.zeros(interior.shape)
    mid = np.zeros(interior.shape)
    if count > 2:
        # Outline vertices belong to the part of their nearest inside vertex.
        _, nearest = ndimage.distance_transform_edt(~interior, return_indices=True)
        nearest_label = labels[nearest[0], nearest[1]]
    for label in range(1, count):
        part = labels == label
        part_scale, lying, tube = _shape_cues(part, np.where(part, distance, 0.0))
        scale[part] = part_scale
        if lying > 0 and GROUND_ELEVATION_DEG > 0:
            part_mid = _lying_mid(part, distance, owner, lying, tube, cell_size)
            if count > 2:
                mid[nearest_label == label] = part_mid[nearest_label == label]
            else:
                mid = part_mid
    return height * step * scale * DEPTH_MULTIPLIER, mid


def _lying_mid(
    part: np.ndarray,
    distance: np.ndarray,
    owner: np.ndarray,
    lying: float,
    tube: float,
    cell_size: tuple[float, float],
) -> np.ndarray:
    """Depth of the mid-surface of a part lying on the table (see GROUND_ELEVATION_DEG), on
    every vertex of the grid (outside the part: its nearest inside vertex's)."""
    # Smoothed over the widest ball's radius: a square end or a corner, whose balls shrink
    # into the corner, does not bend away. A plate lies in the table plane across its width
    # too: there each vertex's own row counts; a tube's cross-section stays round about its
    # axis: its ball's centre row.
    sigma = max(float(distance[part].max()), 1.0)
    total = cv2.GaussianBlur(np.where(part, owner, 0.0), (0, 0), sigma)
    smooth = total / np.maximum(cv2.GaussianBlur(part.astype(np.float64), (0, 0), sigma), 1e-12)
    _, nearest = ndimage.distance_transform_edt(~part, return_indices=True)
    smooth = smooth[nearest[0], nearest[1]]
    row = np.arange(part.shape[0], dtype=np.float64)[:, None]
    centre = tube * smooth + (1.0 - tube) * row
    slope = lying / np.tan(np.radians(GROUND_ELEVATION_DEG))
    return np.asarray(slope * (centre - float(centre[part].mean())) * cell_size[1])


def _shape_cues(interior: np.ndarray, distance: np.ndarray) -> tuple[float, float, float]:
    """How deep the object is relative to its local width, how much it lies flat on the
    table (0 upright .. 1 lying) and how much it is a tube, guessed from its silhouette.

    - Bulkiness: the widest inscribed disc against the size of the part it lies in
      (radius / sqrt(area)). A thin, spread-out outline (scissors, a flat tool, a leaf seen
      at an angle) is mostly a plate: DEPTH_SCALE_MIN. A compact one (an animal, a
      stone) gets round cross-sections (1.0); in between it is interpolated.
    - Evenness: a thin outline of even width (a banana, a pen, a cable) is a tube, not a
      plate: at least TUBE_DEPTH_SCALE.
    - Flat faces: a nearly convex outline (solidity close to 1: a bottle, a box, a can) is
      taken as a manufactured object with flat sides, at most FLAT_DEPTH_SCALE deep.
    - Lying: a plate (depth scale at most LIE_SCALE_FLAT) or a tube lies on the table; an
      object of round sections (depth scale from LIE_SCALE_UPRIGHT) stands.
    Chosen with bench/quality.py on six scans (docs/cpu-backend.md): a heuristic, not a
    measurement of the object.
    """
    peak = np.unravel_index(int(np.argmax(distance)), distance.shape)
    _, labels = cv2.connectedComponents(interior.astype(np.uint8), connectivity=4)
    part = labels == labels[peak]
    bulk = float(distance[peak]) / float(np.sqrt(part.sum()))
    ramp = (bulk - BULK_THIN) / (BULK_ROUND - BULK_THIN)
    scale = DEPTH_SCALE_MIN + (1.0 - DEPTH_SCALE_MIN) * float(np.clip(ramp, 0.0, 1.0))
    plate = float(np.clip((LIE_SCALE_UPRIGHT - scale) / (LIE_SCALE_UPRIGHT - LIE_SCALE_FLAT), 0, 1))
    evenness = float(distance[part].mean()) / float(distance[peak])
    tube = float(np.clip((evenness - EVENNESS_PLATE) / (EVENNESS_TUBE - EVENNESS_PLATE), 0, 1))
    scale = max(scale, TUBE_DEPTH_SCALE * tube)
    rows, cols = np.nonzero(part)
    hull = cv2.convexHull(np.column_stack([cols, rows]).astype(np.float32))
    solidity = min(1.0, len(rows) / max(float(cv2.contourArea(hull)), 1.0))
    flat = float(np.clip((solidity - SOLIDITY_CURVED) / (SOLIDITY_FLAT - SOLIDITY_CURVED), 0, 1))
    lying = max(plate, tube) * _across(rows, cols)
    return scale - flat * max(scale - FLAT_DEPTH_SCALE, 0.0), lying, tube


def _across(rows: np.ndarray, cols: np.ndarray) -> float:
    """1 when an outline's long axis runs across the image, 0 when it runs up it or the
    outline is about as wide as high in every direction (see LIE_AXIS_FLAT_DEG)."""
    if len(rows) < 3:
        return 0.0
    spread = np.cov(np.vstack([cols, rows]).astype(np.float64))
    values, vectors = np.linalg.eigh(spread)
    elongation = float(np.sqrt(values[1] / max(float(values[0]), 1e-12)))
    angle = float(np.degrees(np.arctan2(abs(vectors[1, 1]), abs(vectors[0, 1]))))
    along = (LIE_AXIS_UPRIGHT_DEG - angle) / (LIE_AXIS_UPRIGHT_DEG - LIE_AXIS_FLAT_DEG)
    long = (elongation - LIE_ELONGATION_MIN) / (LIE_ELONGATION_FULL - LIE_ELONGATION_MIN)
    return float(np.clip(along, 0.0, 1.0) * np.clip(long, 0.0, 1.0))


def _ball_height_and_owner(
    interior: np.ndarray, distance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top of the union of balls of radius distance[q] centred on every interior vertex q,
    in cells, and the row of the ball's centre q that reaches highest at each vertex:
    h(p)^2 = max_q distance[q]^2 - |p - q|^2, computed separably (rows, then columns; a
    squared distance splits into its two axes, and the first pass keeps each row's own)."""
    squared = np.where(interior, distance**2, -np.inf)
    reach = int(np.ceil(distance.max())) + 1
    best = squared.copy()
    source = squared
    for offset in range(1, min(reach, best.shape[1])):
        penalty = float(offset * offset)
        np.maximum(best[:, offset:], source[:, :-offset] - penalty, out=best[:, offset:])
        np.maximum(best[:, :-offset], source[:, offset:] - penalty, out=best[:, :-offset])
    source = best
    best = source.copy()
    row = np.broadcast_to(np.arange(best.shape[0], dtype=np.float64)[:, None], best.shape)
    owner = row.copy()
    for offset in range(1, min(reach, best.shape[0])):
        penalty = float(offset * offset)
        for to, frm in (
            (slice(offset, None), slice(None, -offset)),
            (slice(None, -offset), slice(offset, None)),
        ):
            candidate = source[frm] - penalty
            higher = candidate > best[to]
            best[to] = np.where(higher, candidate, best[to])
            owner[to] = np.where(higher, row[frm], owner[to])
    height = np.where(interior, np.sqrt(np.maximum(best, 0.0)), 0.0)
    return height, owner


def _poisson_height(interior: np.ndarray, cell_size: tuple[float, float]) -> np.ndarray:
    """sqrt(u) with −∇²u = INFLATION on interior vertices and u = 0 on the outline."""
    height = np.zeros(interior.shape, dtype=np.float64)
    rows, cols = np.nonzero(interior)
    n = len(rows)
    if n == 0:
        return height
    index = np.full(interior.shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(n)
    wx, wy = 1.0 / cell_size[0] ** 2, 1.0 / cell_size[1] ** 2
    ids = np.arange(n)
    entries_r, entries_c, entries_v = [ids], [ids], [np.full(n, 2.0 * (wx + wy))]
    for dr, dc, weight in ((0, 1, wx), (0, -1, wx), (1, 0, wy), (-1, 0, wy)):
        # Interior vertices never sit on the grid's edge, so neighbours are in range.
        neighbour = index[rows + dr, cols + dc]
        inside = neighbour >= 0
        entries_r.append(ids[inside])
        entries_c.append(neighbour[inside])
        entries_v.append(np.full(int(inside.sum()), -weight))
    matrix = sparse.csc_matrix(
        (np.concatenate(entries_v), (np.concatenate(entries_r), np.concatenate(entries_c))),
        shape=(n, n),
    )
    # A direct solve (not CG) so the result is bit-for-bit repeatable.
    u = sparse_linalg.spsolve(matrix, np.full(n, INFLATION))
    height[rows, cols] = np.sqrt(np.maximum(u, 0.0))
    return height


def _cell_faces(cells: np.ndarray, vertex_index: np.ndarray) -> np.ndarray:
    """Two front triangles per cell, counter-clockwise seen from +z once y points up."""
    r, c = np.nonzero(cells)
    v00, v01 = vertex_index[r, c], vertex_index[r, c + 1]
    v10, v11 = vertex_index[r + 1, c], vertex_index[r + 1, c + 1]
    # Alternate the diagonal like a chequerboard so decimation sees no preferred direction.
    flip = ((r + c) % 2).astype(bool)
    first = np.where(
        flip[:, None], np.column_stack([v00, v10, v01]), np.column_stack([v00, v10, v11])
    )
    second = np.where(
        flip[:, None], np.column_stack([v01, v10, v11]), np.column_stack([v00, v11, v01])
    )
    return np.concatenate([first, second])


def _boundary_edges(faces: np.ndarray, vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges of an open sheet whose reverse is absent: the outline loops."""
    start = faces.ravel()
    end = faces[:, [1, 2, 0]].ravel()
    keys = start * vertex_count + end
    reverse = end * vertex_count + start
    outline = ~_contains(np.sort(keys), reverse)
    return start[outline], end[outline]


def _contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership test against a sorted array (np.isin, without its hashing cost)."""
    if len(sorted_values) == 0:
        return np.zeros(len(queries), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_values, queries), len(sorted_values) - 1)
    return np.asarray(sorted_values[position] == queries)


def _smooth_outline(
    xy: np.ndarray, rim_from: np.ndarray, rim_to: np.ndarray, max_shift: float
) -> np.ndarray:
    """Taubin-smooth the staircase outline in the image plane (interior stays put)."""
    following = np.full(len(xy), -1, dtype=np.int64)
    preceding = np.full(len(xy), -1, dtype=np.int64)
    following[rim_from] = rim_to
    preceding[rim_to] = rim_from
    on_rim = np.flatnonzero(following >= 0)
    start = xy[on_rim].copy()
    points = xy.copy()
    # lambda/mu pairs smooth without the shrinking plain Laplacian smoothing causes.
    for factor in (0.5, -0.53) * 6:
        mean = 0.5 * (points[following[on_rim]] + points[preceding[on_rim]])
        points[on_rim] += factor * (mean - points[on_rim])
    shift = points[on_rim] - start
    length = np.linalg.norm(shift, axis=1, keepdims=True)
    points[on_rim] = start + shift * np.minimum(1.0, max_shift / np.maximum(length, 1e-12))
    return points


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a float image at pixel positions (pixel centres at +0.5)."""
    height, width = image.shape
    x = np.clip(xy[:, 0] - 0.5, 0.0, width - 1.0)
    y = np.clip(xy[:, 1] - 0.5, 0.0, height - 1.0)
    x0, y0 = np.minimum(x.astype(np.int64), width - 2), np.minimum(y.astype(np.int64), height - 2)
    x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = x - x0, y - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return np.asarray(top * (1 - fy) + bottom * fy, dtype=np.float64)


def _drop_unused(points: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    degenerate = (
        (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    )
    faces = faces[~degenerate]
    used = np.unique(faces)
    remap = np.full(len(points), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return points[used], remap[faces]


def is_closed_manifold(faces: np.ndarray) -> bool:
    """True when every directed edge appears once and its reverse once (closed, oriented)."""
    if len(faces) == 0:
        return False
    start = faces.ravel().astype(np.int64)
    end = faces[:, [1, 2, 0]].ravel().astype(np.int64)
    n = int(faces.max()) + 1
    keys = np.sort(start * n + end)
    if bool((keys[1:] == keys[:-1]).any()):
        return False
    # Unique directed edges whose reverses are the same set: every edge is shared by
    # exactly two faces with opposite orientation.
    return bool(np.array_equal(keys, np.sort(end * n + start)))


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted smooth vertex normals (unit length)."""
    tri = vertices[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    corners = faces.ravel()
    normals = np.column_stack(
        [
            np.bincount(corners, np.repeat(face_normals[:, axis], 3), minlength=len(vertices))
            for axis in range(3)
        ]
    )
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(length, 1e-12)
