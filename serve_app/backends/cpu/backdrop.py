"""A model of the photo's backdrop for segmentation without alpha: a wall and, when the
borders show one, a table seen as a perspective band below a (slightly tilted) edge line.

Each part gets a smooth colour field in CIE Lab (gradients, vignetting, the light falling off
along the table) plus its dominant border colours (blotches, two-tone walls), fitted to the
border ring and then refitted to every pixel the first segmentation called background. A
shadow test marks pixels that are darker than the backdrop predicted at their place but have
its chromaticity (a contact shadow on the table, a shadow cast on the wall).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Weight of lightness against the colour axes in the distance to the backdrop: shading on
# the backdrop changes L, but a white object on a grey table differs only in L.
LIGHTNESS_WEIGHT = 0.8
# A table edge must change the border colour by at least this much (Lab units) on both sides.
MIN_EDGE_STEP = 5.0
# The edge may tilt by at most this much (rows per column).
MAX_EDGE_TILT = 0.15
# Rows above and below the edge line compared when scoring a candidate edge.
EDGE_PROBE = 3
# Half-width (working pixels) of the blend between wall and table along the edge.
EDGE_BAND = 3.0
# A border colour cluster this small is an object touching the frame, not backdrop.
MIN_PALETTE_SHARE = 0.2
PALETTE_SEED = 0x5EED
# Shadow test: lightness ratio to the backdrop and the largest chromaticity difference.
SHADOW_RATIO = (0.2, 0.93)
SHADOW_CHROMA = 0.025
# Width (fraction of the frame) of the local backdrop estimate used when refining.
LOCAL_SIGMA = 0.04
# An edge whose lightness ratio jumps by more than this within 3 pixels is crisp (not a
# penumbra); a shadow-like region with more than this share of crisp edges around it is not
# a shadow.
SHADOW_MAX_JUMP = 0.3
SHADOW_MAX_CRISP_SHARE = 0.5
# Dark plateaus: a shadow-like piece split off by fine lightness steps (more than
# SHADOW_FINE_JUMP within 3 pixels) is a dark part of the object lying in its own shadow (a
# grey blade on grey cloth) when such steps make most of its edge towards the rest of the
# backdrop (an outline all round, SHADOW_PLATEAU_STEP_SHARE), it borders little else
# (SHADOW_PLATEAU_MAX_OTHER: a shadow's core hugs the object that casts it) and it is about as
# light as the shadow around it (SHADOW_PLATEAU_RATIO: a core is clearly darker than its
# penumbra; the outline, not a ramp down, sets it apart).
SHADOW_FINE_JUMP = 0.12
SHADOW_PLATEAU_STEP_SHARE = 0.8
SHADOW_PLATEAU_MAX_OTHER = 0.15
SHADOW_PLATEAU_RATIO = (0.85, 1.05)
SHADOW_PLATEAU_MIN_PIXELS = 20


@dataclass(frozen=True)
class Backdrop:
    """The fitted backdrop at the working resolution."""

    lab: np.ndarray  # (H, W, 3) the picture in weighted Lab (L scaled by LIGHTNESS_WEIGHT)
    predicted: np.ndarray  # (H, W, 3) the backdrop's expected weighted Lab at each pixel
    distance: np.ndarray  # (H, W) colour distance to the backdrop, noise floor removed
    shadow: np.ndarray  # (H, W) bool: darker than the backdrop, same chromaticity
    table: np.ndarray  # (H, W) bool: below the table's edge line (all False: no table)
    ring: np.ndarray  # (H, W) bool: the border band the model was seeded from
    noise: float  # robust spread of backdrop pixels around the model
    # (H, W) bool: the backdrop's chromaticity, darker than expected (on the floor) or about
    # as light as expected (anywhere): what a pocket of backdrop inside the mask looks like.
    backdrop_like: np.ndarray


def weighted_lab(rgb: np.ndarray, blur: float = 1.0) -> np.ndarray:
    """Lab of an 8-bit RGB picture, lightly blurred, L scaled by LIGHTNESS_WEIGHT."""
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    if blur > 0:
        lab = cv2.GaussianBlur(lab, (0, 0), blur)
    weighted: np.ndarray = np.asarray(lab, dtype=np.float32) * np.array(
        [LIGHTNESS_WEIGHT, 1.0, 1.0], dtype=np.float32
    )
    return weighted


def border_ring(height: int, width: int) -> np.ndarray:
    """The border band the backdrop is seeded from (leaves room in a long, thin photo)."""
    band = min(max(2, round(0.03 * max(height, width))), max(1, min(height, width) // 8))
    ring = np.zeros((height, width), dtype=bool)
    ring[:band], ring[-band:], ring[:, :band], ring[:, -band:] = True, True, True, True
    return ring


def fit_backdrop(
    rgb: np.ndarray, background: np.ndarray | None = None, first: Backdrop | None = None
) -> Backdrop:
    """Fit the backdrop to the border ring, or to `background` (a first segmentation's
    background) when given. `first`: an earlier fit to the same picture, whose Lab copy,
    ring and table are reused rather than computed again."""
    height, width = rgb.shape[:2]
    if first is None:
        lab = weighted_lab(rgb)
        ring = border_ring(height, width)
        table = _table_region(lab, ring)
    else:
        lab, ring, table = first.lab, first.ring, first.table
    samples = ring if background is None else background | ring
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / max(width - 1, 1) - 0.5, ys / max(height - 1, 1) - 0.5
    basis = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)

    predicted = np.zeros_like(lab)
    distance = np.full((height, width), np.inf, dtype=np.float32)
    noise_map = np.zeros((height, width), dtype=np.float32)
    regions = [~table, table] if table.any() else [np.ones((height, width), dtype=bool)]
    noises = []
    for region in regions:
        chosen = samples & region
        if chosen.sum() < 12:
            chosen = ring & region
        if chosen.sum() < 12:
            chosen = ring
        field, field_residual = _fit_field(basis, lab, chosen)
        region_distance = np.linalg.norm(field - lab, axis=-1)
        # The border palette only seeds the first pass; the refit uses the local estimate.
        if background is None:
            border = ring & region
            palette = kmeans_palette(lab[border] if border.sum() >= 12 else lab[chosen])
            cluster_distance = np.min(
                np.linalg.norm(lab[:, :, None, :] - palette[None, None], axis=-1), axis=-1
            )
            region_distance = np.minimum(region_distance, cluster_distance)
        noise = 1.4826 * float(np.median(region_distance[chosen])) + 1e-3
        noises.append(noise)
        predicted[region] = field[region]
        # Near the table edge either part may be the backdrop: keep the smaller distance.
        near = cv2.dilate(region.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        better = near & (region_distance - 1.5 * noise < distance)
        distance[better] = region_distance[better] - 1.5 * noise
        noise_map[region] = noise
        del field_residual
    if background is not None and background.any():
        # Refinement: the backdrop seen around the object, interpolated locally, follows
        # blotches and the table's far edge that the smooth fields cannot.
        weight = background.astype(np.float32)
        sigma = LOCAL_SIGMA * max(height, width)
        total = cv2.GaussianBlur(weight, (0, 0), sigma)
        local = (
            cv2.GaussianBlur(lab * weight[..., None], (0, 0), sigma)
            / np.maximum(total, 1e-4)[..., None]
        )
        local_distance = np.linalg.norm(lab - local, axis=-1) - 1.5 * noise_map
        distance = np.where(total > 0.05, np.minimum(distance, local_distance), distance)
    distance = np.maximum(distance, 0.0).astype(np.float32)
    if table.any():
        # Along the table's edge the picture blends wall and table (defocus, the working
        # copy's own blur): neither model fits there, so fade the distance out on the line.
        from_edge = cv2.distanceTransform((~_edge_line(table)).astype(np.uint8), cv2.DIST_L2, 3)
        distance *= np.clip(from_edge / EDGE_BAND, 0.0, 1.0)
    # Shadows that matter lie on the table (contact shadows); without a table, on the lower
    # half of the frame. Elsewhere a darker patch of the backdrop's hue is more likely the
    # object's own shading (a blue object in front of a blue wall).
    if table.any():
        floor = cv2.dilate(table.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    else:
        floor = np.zeros((height, width), dtype=bool)
        floor[height // 2 :] = True
    shadow_like, lit = _backdrop_likeness(rgb, predicted)
    shadow, plateau = _soft_shadows(shadow_like & floor, rgb, predicted, lit)
    noise = float(np.median(noises))
    return Backdrop(
        lab,
        predicted,
        distance,
        shadow,
        table,
        ring,
        noise,
        (shadow_like & floor & ~plateau) | lit,
    )


def _fit_field(
    basis: np.ndarray, lab: np.ndarray, chosen: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A quadratic colour field through the chosen pixels, robust to object pixels."""
    chosen_basis, chosen_lab = basis[chosen], lab[chosen]
    if len(chosen_lab) > 20000:
        step = len(chosen_lab) // 20000 + 1
        chosen_basis, chosen_lab = chosen_basis[::step], chosen_lab[::step]
    keep = np.ones(len(chosen_lab), dtype=bool)
    residual = np.zeros(len(chosen_lab))
    coef = np.zeros((basis.shape[-1], 3))
    for _ in range(2):
        # Refit without pixels that belong to an object touching the frame.
        coef, *_ = np.linalg.lstsq(chosen_basis[keep], chosen_lab[keep], rcond=None)
        residual = np.linalg.norm(chosen_basis @ coef - chosen_lab, axis=1)
        keep = residual <= max(3.0 * 1.4826 * float(np.median(residual)), 2.0)
        if keep.sum() < 8:
            break
    return np.asarray(basis @ coef, dtype=np.float32), residual


def kmeans_palette(
    colours: np.ndarray,
    clusters: int = 4,
    min_share: float = MIN_PALETTE_SHARE,
    max_samples: int | None = None,
) -> np.ndarray:
    """Representative colours of a set of pixels (deterministic k-means): the centres of the
    clusters holding at least `min_share` of them (the largest always). With `max_samples`,
    a larger set is thinned to every n-th colour first."""
    colours = np.ascontiguousarray(colours, dtype=np.float32)
    if len(colours) <= clusters:
        return colours
    if max_samples is not None and len(colours) > max_samples:
        colours = colours[:: len(colours) // max_samples + 1]
    cv2.setRNGSeed(PALETTE_SEED)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    initial = np.zeros((len(colours), 1), np.int32)
    _, labels, centres = cv2.kmeans(colours, clusters, initial, criteria, 2, cv2.KMEANS_PP_CENTERS)
    share = np.bincount(np.asarray(labels).ravel(), minlength=clusters) / len(colours)
    return np.asarray(centres[share >= min(min_share, share.max())], dtype=np.float32)


def _table_region(lab: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Pixels below the table's far edge, found as a colour step down both side borders."""
    height, width = lab.shape[:2]
    band = int(ring[height // 2].argmin()) or 1
    window = max(3, height // 14)
    profiles = []
    for side in (lab[:, :band], lab[:, width - band :]):
        profile = side.mean(axis=1).astype(np.float64)
        cumulative = np.vstack([np.zeros((1, 3)), np.cumsum(profile, axis=0)])
        rows = np.arange(window, height - window)
        above = (cumulative[rows] - cumulative[rows - window]) / window
        below = (cumulative[rows + window] - cumulative[rows]) / window
        step = np.zeros(height)
        step[rows] = np.linalg.norm(above - below, axis=1)
        # Ignore the top quarter (a wall's own shading).
        step[: height // 4] = 0.0
        profiles.append(step)
    left, right = profiles
    # Candidate rows on each side (the strongest steps); the edge is the pair, a limited tilt
    # apart, across which the colour changes most consistently along the whole line (a
    # blotch on one border does not continue across the picture).
    reach = max(1, round(MAX_EDGE_TILT * width))
    columns = np.arange(width)
    best, left_row, right_row = 0.0, 0, 0
    for row_l in _peaks(left):
        for row_r in _peaks(right):
            if abs(row_r - row_l) > reach:
                continue
            line = np.round(row_l + (row_r - row_l) * columns / max(width - 1, 1)).astype(int)
            upper = np.clip(line - EDGE_PROBE, 0, height - 1)
            lower = np.clip(line + EDGE_PROBE, 0, height - 1)
            score = float(
                np.median(np.linalg.norm(lab[upper, columns] - lab[lower, columns], axis=1))
            )
            if score > best:
                best, left_row, right_row = score, row_l, row_r
    if best < MIN_EDGE_STEP:
        return np.zeros((height, width), dtype=bool)
    ys, xs = np.mgrid[0:height, 0:width]
    edge = left_row + (right_row - left_row) * xs / max(width - 1, 1)
    return np.asarray(ys >= edge)


def _backdrop_likeness(rgb: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shadow-like, lit backdrop): pixels with the backdrop's chromaticity that are darker
    than it expected here (a shadow), and those about as light as expected (the backdrop
    itself, lit)."""
    expected = predicted.copy()
    expected[..., 0] /= LIGHTNESS_WEIGHT
    expected_rgb = cv2.cvtColor(expected, cv2.COLOR_LAB2RGB)
    actual = cv2.GaussianBlur(rgb.astype(np.float32) / 255.0, (0, 0), 1.0)
    actual_sum = actual.sum(axis=-1) + 1e-3
    expected_sum = expected_rgb.sum(axis=-1) + 1e-3
    chroma = np.linalg.norm(
        actual / actual_sum[..., None] - expected_rgb / expected_sum[..., None], axis=-1
    )
    ratio = actual_sum / expected_sum
    darker = (ratio >= SHADOW_RATIO[0]) & (ratio <= SHADOW_RATIO[1])
    # Dark pixels have noisier chromaticity: allow a little more there.
    allowance = SHADOW_CHROMA * (1.0 + 0.5 * (1.0 - np.clip(ratio, 0.0, 1.0)))
    same_chroma = chroma <= allowance
    lit = (ratio > SHADOW_RATIO[1]) & (ratio <= 1.0 / SHADOW_RATIO[1])
    return np.asarray(darker & same_chroma), np.asarray(lit & same_chroma)


def _soft_shadows(
    candidates: np.ndarray, rgb: np.ndarray, predicted: np.ndarray, lit: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(shadows, dark plateaus). Shadows: shadow-like regions bounded by soft edges (a
    penumbra). A region mostly bounded by crisp edges is a dark part of the object instead (a
    grey blade on a grey table), as is a dark plateau inside a shadow (`_dark_plateaus`)."""
    lightness = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)[..., 0]
    raw_ratio = lightness / np.maximum(predicted[..., 0] / LIGHTNESS_WEIGHT, 1.0)
    # Fine texture (wood grain, a weave) is not an edge: a median filter removes it and
    # keeps real edges sharp.
    ratio = cv2.medianBlur(np.ascontiguousarray(raw_ratio, dtype=np.float32), 3)
    kernel = np.ones((3, 3), np.uint8)
    crisp = (cv2.dilate(ratio, kernel) - cv2.erode(ratio, kernel)) > SHADOW_MAX_JUMP
    # Crisp edges split a dark part from the shadow it casts.
    pieces = candidates & ~crisp
    count, labels = cv2.connectedComponents(pieces.astype(np.uint8), connectivity=8)
    if count <= 1:
        return pieces, np.zeros_like(pieces)
    grown = cv2.dilate(labels.astype(np.float32), np.ones((5, 5), np.uint8)).astype(np.int32)
    border = (labels == 0) & (grown > 0)
    crisp_share = np.bincount(grown[border], weights=crisp[border], minlength=count) / np.maximum(
        np.bincount(grown[border], minlength=count), 1
    )
    soft = crisp_share < SHADOW_MAX_CRISP_SHARE
    soft[0] = False
    shadow = np.asarray(soft[labels])
    if SHADOW_FINE_JUMP <= 0:
        return shadow, np.zeros_like(shadow)
    plateau = _dark_plateaus(shadow, ratio, candidates | lit)
    return shadow & ~plateau, plateau


def _dark_plateaus(shadow: np.ndarray, ratio: np.ndarray, backdrop: np.ndarray) -> np.ndarray:
    """Pieces of `shadow` that are dark plateaus of the object (see SHADOW_PLATEAU_*):
    split off by fine lightness steps, outlined by them towards the rest of the backdrop,
    bordering little but backdrop, and about as light as the backdrop around them."""
    kernel = np.ones((3, 3), np.uint8)
    step = (cv2.dilate(ratio, kernel) - cv2.erode(ratio, kernel)) > SHADOW_FINE_JUMP
    pieces = shadow & ~step
    count, labels = cv2.connectedComponents(pieces.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(shadow)
    grown = cv2.dilate(labels.astype(np.float32), np.ones((5, 5), np.uint8)).astype(np.int32)
    border = (labels == 0) & (grown > 0)
    outer = border & backdrop

    def around(where: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Per piece: the count (or sum of `weights`) of `where`'s pixels around it."""
        values = None if weights is None else weights[where]
        return np.bincount(grown[where], weights=values, minlength=count)

    outer_count = np.maximum(around(outer), 1)
    step_share = around(outer, step) / outer_count
    other_share = around(border & ~backdrop) / np.maximum(around(border), 1)
    size = np.bincount(labels[pieces], minlength=count)
    inner_ratio = np.bincount(labels[pieces], weights=ratio[pieces], minlength=count) / np.maximum(
        size, 1
    )
    outer_ratio = around(outer, ratio) / outer_count
    relative = inner_ratio / np.maximum(outer_ratio, 1e-3)
    plateau = (
        (step_share >= SHADOW_PLATEAU_STEP_SHARE)
        & (other_share <= SHADOW_PLATEAU_MAX_OTHER)
        & (relative >= SHADOW_PLATEAU_RATIO[0])
        & (relative <= SHADOW_PLATEAU_RATIO[1])
        & (size >= SHADOW_PLATEAU_MIN_PIXELS)
    )
    plateau[0] = False
    return np.asarray(plateau[labels])


def _edge_line(table: np.ndarray) -> np.ndarray:
    """The first table row of every column."""
    line = np.zeros_like(table)
    first = table.argmax(axis=0)
    columns = np.flatnonzero(table.any(axis=0))
    line[first[columns], columns] = True
    return line


def _peaks(step: np.ndarray, count: int = 4) -> list[int]:
    """Rows of the strongest local maxima of a step profile above MIN_EDGE_STEP."""
    local = (step >= np.roll(step, 1)) & (step >= np.roll(step, -1)) & (step >= MIN_EDGE_STEP)
    rows = np.flatnonzero(local)
    return [int(r) for r in rows[np.argsort(-step[rows])][:count]]
