"""Separate the object from its background: a trusted alpha matte when the photo has one,
otherwise GrabCut seeded from the image border and a colour-distance prior."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from serve_app.backends.cpu.backdrop import Backdrop, fit_backdrop, kmeans_palette
from serve_app.errors import NoObjectFound

SegmentationMethod = Literal["alpha", "grabcut", "learned", "none"]
# A learned matte: an (H, W, 3) uint8 photo → its (H, W) uint8 alpha (matte.LearnedMatte).
Matte = Callable[[np.ndarray], np.ndarray]

# GrabCut runs on about this many pixels (256 x 256: ~0.15 s on one core); the outline is
# smoothed at full resolution afterwards, so a larger working image buys little.
WORK_PIXELS = 256 * 256
GRABCUT_ITERATIONS = 4
GRABCUT_SEED = 0x5EED
# An object must cover between these fractions of the frame to count as separable.
MIN_COVERAGE = 0.002
MAX_COVERAGE = 0.98
# Holes smaller than this fraction of the object's area are segmentation noise; larger ones
# (between chair legs, inside a handle) are real and stay open.
SMALL_HOLE_FRACTION = 0.01
# Weight of lightness against hue in the colour distance to the backdrop.
LIGHTNESS_WEIGHT = 0.8
# Guided-filter regulariser (grey levels²): edges weaker than ~sqrt of it are ignored.
GUIDED_EPSILON = 0.02**2
# Outline pixels are decided by colour only where object and backdrop differ this much (RGB).
MATTE_MIN_CONTRAST = 24.0
# The matte's local means blur with a sigma that grows with the photo (1.5 working pixels);
# wider than this many pixels, the blur runs on a reduced copy (a large photo: 3.7 of 4.7 s
# of a 4000 px photo's segmentation went to full-size blurs of sigma 23).
MATTE_MAX_SIGMA = 8.0
# A last graph cut at full resolution may move the outline by up to this many working
# pixels (GrabCut at the working size is off by one or two along low-contrast edges) ...
OUTLINE_BAND = 2.0
# ... in this many GrabCut iterations (its colour models learnt from the object's crop),
# on a copy of the photo at most this large (its cost grows with the crop's pixels).
OUTLINE_ITERATIONS = 1
OUTLINE_MAX_SIDE = 1024
# Pixels of the mask that the backdrop model calls shadow and that lie at most this many
# working pixels inside the outline (a contact shadow GrabCut took along) start that graph
# cut as probable backdrop rather than sure object.
OUTLINE_SHADOW_DEPTH = 6.0
# A second clear part joins the object when it is at least this strong (a pair of shoes).
SALIENT_SHARE = 0.3
# A region of the mask with the backdrop's chromaticity is a pocket of backdrop (a handle
# loop, a contact shadow) when it is at most this share of the mask; larger, the object.
POCKET_MAX_SHARE = 0.25
# ... and when its mean colour is at least this far (weighted Lab) from the rest's colours.
POCKET_MIN_DISTANCE = 5.0
# Pocket candidates at least this light against the backdrop form their own pockets.
POCKET_LIGHT_RATIO = 0.8
# ... and it needs this fraction of that colour distance when the object encloses it on the
# table, or when it is mostly a shadow on a coloured table (below).
POCKET_ENCLOSED_EASING = 0.5
# A table whose colour has at least this chroma (weighted Lab) is coloured: its shadows keep a
# hue that a neutral part of the object (grey rubber, a black blade) does not share.
COLOURED_FLOOR_CHROMA = 10.0
# A part enclosed by the photo's edges joins the object when the edge between it and the
# backdrop is on average this many times the backdrop's own median gradient.
EDGE_MIN_CONTRAST = 3.0
# ... and at least this many times the mean gradient a few pixels further out (crisp).
EDGE_MIN_CRISPNESS = 1.5


@dataclass(frozen=True)
class Segmentation:
    """An object mask at the photo's resolution and where it came from."""

    mask: np.ndarray  # bool (H, W), True on the object
    method: SegmentationMethod
    rgb: np.ndarray  # (H, W, 3) uint8: the picture the mask refers to
    # Intermediate images (uint8, working resolution) when asked for: why a mask looks wrong.
    debug: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        """Fraction of the frame the object covers."""
        return float(self.mask.mean())


def split_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB pixels (H, W, 3 uint8) and the alpha channel when it carries information."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    array = np.asarray(image)
    if image.mode == "RGB":
        return array, None
    rgb, alpha = array[..., :3], array[..., 3]
    return rgb, (alpha if has_meaningful_alpha(alpha) else None)


def has_meaningful_alpha(alpha: np.ndarray) -> bool:
    """True when the alpha channel marks a real cut-out (not an all-opaque export)."""
    # A few stray translucent pixels (anti-aliased corners, editor artefacts) do not make a
    # matte; require a visible share of the frame to be transparent.
    return bool((alpha < 128).mean() >= 0.001)


def segment_image(
    image: Image.Image,
    remove_background: bool | None = None,
    *,
    legacy: bool = False,
    debug: bool = False,
    matte: Matte | None = None,
) -> Segmentation:
    """Segment a PIL photo; see `segment_arrays`."""
    rgb, alpha = split_alpha(image)
    return segment_arrays(rgb, alpha, remove_background, legacy=legacy, debug=debug, matte=matte)


def segment_arrays(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    remove_background: bool | None,
    *,
    legacy: bool = False,
    debug: bool = False,
    matte: Matte | None = None,
) -> Segmentation:
    """Object mask: alpha when present (auto), GrabCut when asked or without alpha.

    remove_background: None = auto, True = always segment the visible picture (alpha is
    not trusted as a mask), False = trust the alpha as it is, or take the whole frame when
    there is none. legacy: the segmentation before issue #17 (for benchmarks). debug: also
    return intermediate images in `Segmentation.debug`. matte: a learned matte (photo →
    8-bit alpha, `matte.LearnedMatte`) used instead of the colour segmentation; its alpha is
    then trusted like the photo's own.
    """
    if remove_background is False:
        if alpha is None:
            return Segmentation(np.ones(rgb.shape[:2], dtype=bool), "none", rgb)
        return Segmentation(_alpha_mask(alpha), "alpha", rgb)
    if alpha is not None and remove_background is None:
        return Segmentation(_alpha_mask(alpha), "alpha", rgb)
    # Pixels under transparency are arbitrary (often black or leftover backdrop); what the
    # user sees is the picture over a plain backdrop, so segment that.
    picture = rgb if alpha is None else flatten_onto_backdrop(rgb, alpha)
    if legacy:
        return Segmentation(_legacy_grabcut_mask(picture), "grabcut", picture)
    if matte is not None:
        _refuse_flat(_working_copy(picture))
        learned = matte(picture)
        debug_images = {"learned_matte": learned} if debug else {}
        return Segmentation(
            _checked_coverage(_alpha_mask(learned)), "learned", picture, debug_images
        )
    images: dict[str, np.ndarray] = {}
    mask = _photo_mask(picture, images if debug else None)
    return Segmentation(mask, "grabcut", picture, images)


def flatten_onto_backdrop(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite RGBA over white, or over black when the visible object is mostly light."""
    weight = alpha.astype(np.float32)[..., None] / 255.0
    visible_luma = float((rgb.astype(np.float32) * weight).sum() / max(weight.sum() * 3, 1.0))
    backdrop = 0.0 if visible_luma > 170 else 255.0
    flat = rgb.astype(np.float32) * weight + backdrop * (1.0 - weight)
    return np.clip(flat + 0.5, 0, 255).astype(np.uint8)


def _alpha_mask(alpha: np.ndarray) -> np.ndarray:
    mask = alpha >= 128
    if not mask.any():
        raise NoObjectFound("The photo is fully transparent: there is no object to reconstruct.")
    # The matte is trusted, so keep every sizeable part (a pair of shoes is two blobs);
    # only specks and pinholes go.
    mask = _keep_components(mask, min_fraction_of_largest=0.02)
    return _fill_small_holes(mask, SMALL_HOLE_FRACTION / 10)


def _legacy_grabcut_mask(rgb: np.ndarray) -> np.ndarray:
    """The segmentation before issue #17 (one border colour model, RGB GrabCut), kept so
    bench/quality.py can compare against it in the same run."""
    height, width = rgb.shape[:2]
    small = _working_copy(rgb)
    _refuse_flat(small)

    distance, ring = _background_distance(small)
    ring_values = distance[ring]
    # Robust noise level of the background: how far border pixels stray from the model.
    noise = 1.4826 * float(np.median(ring_values)) + 1e-3
    # Two levels: pixels above Otsu's split clearly stand out and seed the object's core;
    # fainter ones (a white vase on a grey table) are left for GrabCut to decide.
    threshold = max(_otsu_threshold(distance), 4.0 * noise, 6.0)
    faint_threshold = max(0.5 * threshold, 4.0 * noise, 6.0)
    small_bgr = np.ascontiguousarray(small[..., ::-1])
    mask, salient = _seeded_grabcut(small_bgr, distance, ring, threshold, faint_threshold)
    if not mask.any():
        raise NoObjectFound("No object could be separated from the background.")
    # Parts GrabCut grew from the solid prior are the object; other blobs are clutter.
    mask = _keep_components_touching(mask, salient)
    # Small holes are noise; a larger one stays open only if it shows the backdrop (the
    # gap in a handle), not a highlight or reflection on the object.
    mask = _fill_small_holes(mask, SMALL_HOLE_FRACTION)
    mask = _fill_holes_unlike_backdrop(mask, distance > 0.5 * threshold)
    mask = _upsample_smooth(mask, (width, height))
    return _checked_coverage(mask)


def _core(salient: np.ndarray) -> np.ndarray:
    """The salient region shrunk away from its outline, where GrabCut may not relabel it."""
    for size in (9, 5, 3):
        core = cv2.erode(salient.astype(np.uint8), np.ones((size, size), np.uint8))
        # Small objects would vanish under a wide erosion; shrink less for them.
        if core.sum() >= 0.25 * salient.sum():
            return core.astype(bool)
    return salient


def _background_distance(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour distance to a background model fitted to the border ring."""
    height, width = small.shape[:2]
    raw_lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab = np.asarray(cv2.GaussianBlur(raw_lab, (0, 0), 1.2), dtype=np.float32)
    # Lightness counts a bit less than hue: soft shadows on the backdrop change L, but a
    # white object on a grey table differs only in L.
    lab[..., 0] *= LIGHTNESS_WEIGHT

    # The band must leave room for the object in a long, thin photo.
    band = min(max(2, round(0.03 * max(height, width))), max(1, min(height, width) // 8))
    ring = np.zeros((height, width), dtype=bool)
    ring[:band], ring[-band:], ring[:, :band], ring[:, -band:] = True, True, True, True

    # A quadratic colour field through the border models gradients and vignetting.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / max(width - 1, 1) - 0.5, ys / max(height - 1, 1) - 0.5
    basis = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)
    ring_basis, ring_lab = basis[ring], lab[ring]
    keep = np.ones(len(ring_lab), dtype=bool)
    for _ in range(2):
        # Refit without border pixels that belong to an object touching the frame.
        coef, *_ = np.linalg.lstsq(ring_basis[keep], ring_lab[keep], rcond=None)
        residual = np.linalg.norm(ring_basis @ coef - ring_lab, axis=1)
        keep = residual <= max(3.0 * 1.4826 * float(np.median(residual)), 2.0)
    field_distance = np.linalg.norm(basis @ coef - lab, axis=-1)

    # Colour clusters of the border catch two-tone backdrops (wall and table).
    palette = kmeans_palette(ring_lab)
    cluster_distance = np.min(
        np.linalg.norm(lab[:, :, None, :] - palette[None, None], axis=-1), axis=-1
    )
    return np.minimum(field_distance, cluster_distance).astype(np.float32), ring


def _otsu_threshold(values: np.ndarray) -> float:
    top = float(np.percentile(values, 99.5)) + 1e-6
    scaled = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
    level, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(level) / 255.0 * top


def _keep_components(mask: np.ndarray, min_fraction_of_largest: float) -> np.ndarray:
    """Drop connected components smaller than a fraction of the largest one."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count <= 2:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if min_fraction_of_largest >= 1.0:
        # Exactly one component; ties go to the lowest label so the choice is deterministic.
        return labels == 1 + int(np.argmax(areas))
    keep = np.flatnonzero(areas >= min_fraction_of_largest * areas.max()) + 1
    return np.isin(labels, keep)


def _keep_components_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Connected components of mask that contain at least one seed pixel."""
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.unique(labels[seeds & mask])
    keep = keep[keep != 0]
    return np.isin(labels, keep)


def _fill_small_holes(mask: np.ndarray, max_fraction: float) -> np.ndarray:
    """Fill background islands enclosed by the object that are smaller than max_fraction."""
    holes = _holes(mask)
    count = int(holes.max())
    if count == 0:
        return mask
    areas = np.bincount(holes.ravel(), minlength=count + 1)
    small = np.flatnonzero(areas <= max_fraction * float(mask.sum()))
    small = small[small != 0]
    return mask | np.isin(holes, small) if len(small) else mask


def _fill_holes_unlike_backdrop(mask: np.ndarray, unlike_backdrop: np.ndarray) -> np.ndarray:
    """Fill enclosed holes whose pixels mostly do not look like the background."""
    holes = _holes(mask)
    count = int(holes.max())
    if count == 0:
        return mask
    areas = np.bincount(holes.ravel(), minlength=count + 1)
    unlike = np.bincount(holes.ravel(), weights=unlike_backdrop.ravel(), minlength=count + 1)
    fill = np.flatnonzero(unlike > 0.5 * np.maximum(areas, 1))
    fill = fill[fill != 0]
    return mask | np.isin(holes, fill) if len(fill) else mask


def _holes(mask: np.ndarray) -> np.ndarray:
    """Label image of the background regions enclosed by the mask (0 elsewhere)."""
    # Pad with background so everything outside the object is one component.
    padded = np.pad((~mask).astype(np.uint8), 1, constant_values=1)
    _, labels = cv2.connectedComponents(padded, connectivity=4)
    outside = labels[0, 0]
    labels = labels[1:-1, 1:-1]
    return np.where(labels == outside, 0, labels)


def _upsample_smooth(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample a working-resolution mask with a smooth (not blocky) outline."""
    width, height = size
    factor = width / mask.shape[1]
    soft = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if factor > 1.5:
        soft = cv2.GaussianBlur(soft, (0, 0), 0.5 * factor)
    return soft >= 0.5


# --------------------------------------------------------------------------- photo segmentation


def _photo_mask(rgb: np.ndarray, debug: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Object mask of a photo without alpha (an object on a table in front of a wall).

    A backdrop model (wall and table band, Lab colour fields and palettes, shadows) seeds
    GrabCut on a Lab working copy; the backdrop is then refitted to everything GrabCut called
    background and GrabCut runs again. Parts joined to the object by a thin neck that touch
    the frame are dropped, holes are judged, and the outline is refined at full resolution
    along the photo's own edges.
    """
    height, width = rgb.shape[:2]
    small = _working_copy(rgb)
    small_h, small_w = small.shape[:2]
    _refuse_flat(small)

    model = fit_backdrop(small)
    mask, salient, faint = _grabcut_pass(small, model)
    first_mask = mask
    if mask.any():
        # Refine: the backdrop seen between and around the object teaches the colour model
        # more than the border alone (a blotch, the table's far part behind the object).
        margin = max(3, round(0.02 * max(small_h, small_w)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
        background = ~cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
        model = fit_backdrop(small, background, first=model)
        mask, salient, faint = _grabcut_pass(small, model)
    if debug is not None:
        debug["backdrop_distance"] = np.clip(model.distance * 4.0, 0, 255).astype(np.uint8)
        debug["shadow"] = model.shadow.astype(np.uint8) * 255
        debug["table"] = model.table.astype(np.uint8) * 255
        debug["grabcut"] = mask.astype(np.uint8) * 255
    if not mask.any():
        raise NoObjectFound("No object could be separated from the background.")
    grown = _grow_along_edges(mask, model, first_mask)
    if debug is not None:
        debug["edge_grown"] = (grown & ~mask).astype(np.uint8) * 255
    mask = grown
    carved = _carve_backdrop_pockets(mask, model)
    pockets = mask & ~carved
    if debug is not None:
        debug["pockets"] = pockets.astype(np.uint8) * 255
    mask = _drop_necked_border_parts(carved, salient)
    mask = _keep_components_touching(mask, salient)
    mask = _fill_small_holes(mask, SMALL_HOLE_FRACTION)
    # A carved pocket is backdrop, however unlike the backdrop model its shadow makes it.
    mask = _fill_holes_unlike_backdrop(mask, (model.distance > faint) & ~model.shadow & ~pockets)
    mask = _edge_aware_upsample(mask, rgb)
    factor = rgb.shape[1] / small_w
    mask = _colour_matte(mask, rgb, factor)
    shadow = cv2.resize(
        model.shadow.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    mask = _graph_cut_outline(mask, rgb, factor, shadow)
    return _checked_coverage(mask)


def _working_copy(rgb: np.ndarray) -> np.ndarray:
    """The photo reduced to about WORK_PIXELS (never enlarged). By area, not longest side, so
    a long thin photo keeps enough rows."""
    height, width = rgb.shape[:2]
    scale = min(1.0, float(np.sqrt(WORK_PIXELS / (height * width))))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _refuse_flat(small: np.ndarray) -> None:
    """NoObjectFound for a photo of one flat colour (every photo path: colour, learned, legacy)."""
    if float(small.reshape(-1, 3).std(axis=0).max()) < 1.5:
        raise NoObjectFound(
            "The photo is a single flat colour: there is no object to separate from the "
            "background. Upload a photo of one object, ideally on a plain background."
        )


def _grow_along_edges(mask: np.ndarray, model: Backdrop, first: np.ndarray) -> np.ndarray:
    """Give the object the parts of it GrabCut left to a wall of nearly its own colour (a
    head, ears) when the photo's edges enclose them: a watershed on the colour gradient,
    flooded from the object's core and from the sure backdrop (the border, the shadows, the
    table around the object), claims for the object what the backdrop can reach only across
    a stronger edge than the object can. Only wall pixels are added (a textured table is full
    of edges), and only parts whose boundary with the backdrop is a clear edge. `first`: the
    mask before the backdrop's refit, whose parts may come back by the same test."""
    lab = model.lab
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    gradient = np.sqrt((gx * gx + gy * gy).sum(axis=-1)) / 8.0
    markers = np.zeros(mask.shape, np.int16)
    markers[model.ring | model.shadow | (model.table & ~mask)] = 1
    # What the first GrabCut (before the refit) also found seeds the object: the refit
    # learns the wall around the object and may drop a part of the wall's colour.
    core = cv2.erode((mask | first).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    if not core.any():
        return mask
    markers[core] = 2
    levels = np.clip(gradient * 200.0, 0, 65535).astype(np.uint16)
    flooded = ndimage.watershed_ift(levels, markers)
    added = (flooded == 2) & ~mask & ~model.table
    if not added.any():
        return mask
    # The backdrop's own roughness (noise, blotches): an outline must stand well above it.
    wall_ring = model.ring & ~model.table
    roughness = float(np.median(gradient[wall_ring])) if wall_ring.any() else 0.0
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        added.astype(np.uint8), connectivity=8
    )
    height, width = mask.shape
    backdrop = flooded == 1
    outline = backdrop & cv2.dilate(
        (flooded == 2).astype(np.uint8), np.ones((3, 3), np.uint8)
    ).astype(bool)
    # The table's edge line is a strong edge of the backdrop itself: never evidence.
    seam = np.zeros(mask.shape, bool)
    if model.table.any():
        table = model.table.astype(np.uint8)
        seam = cv2.dilate(table, np.ones((7, 7), np.uint8)).astype(bool) & ~cv2.erode(
            table, np.ones((7, 7), np.uint8)
        ).astype(bool)
    result = mask.copy()
    for label in range(1, count):
        x, y, w, h = stats[label, :4]
        if x == 0 or y == 0 or x + w >= width or y + h >= height:
            continue
        part = labels == label
        grown = cv2.dilate(part.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        near = grown & outline & ~seam
        # A crisp outline: strong on the edge, weak a few pixels out (a soft blotch of the
        # wall has a wide ramp instead).
        beyond = (
            cv2.dilate(part.astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
            & ~cv2.dilate(part.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            & backdrop
            & ~seam
        )
        if not near.any() or not beyond.any():
            continue
        edge = float(np.mean(gradient[near]))
        if edge < EDGE_MIN_CONTRAST * roughness or edge < EDGE_MIN_CRISPNESS * float(
            np.mean(gradient[beyond])
        ):
            continue
        result |= part
    # A rim a pixel or two wide is where the watershed put the outline on the edge's ridge
    # rather than its inner side: the outline refinement at full resolution decides there.
    kept = cv2.morphologyEx(
        (result & ~mask).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)
    ).astype(bool)
    return mask | kept


def _carve_backdrop_pockets(mask: np.ndarray, model: Backdrop) -> np.ndarray:
    """Remove pockets of backdrop GrabCut closed into the mask: the table (often in shadow)
    seen through a handle loop, a contact shadow taken as a dark base. A pocket is a
    connected region of the mask with the backdrop's chromaticity (lit, or darker on the
    floor) that is small next to the object and whose colour is unlike the rest of the
    object's; a large one, or one coloured like the rest, is the object itself (a grey box on
    a grey table, the shaded side of a brown bottle on a brown table) and stays."""
    candidates = cv2.morphologyEx(
        (mask & model.backdrop_like).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)
    )
    # A pocket about as light as the backdrop (the table seen through a loop) and a dark part
    # of the object next to it (neutral rubber, shadow-like on the table) are split apart.
    ratio = model.lab[..., 0] / np.maximum(model.predicted[..., 0], 1.0)
    light = candidates.astype(bool) & (ratio >= POCKET_LIGHT_RATIO)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        light.astype(np.uint8), connectivity=4
    )
    dark_count, dark_labels, dark_stats, _ = cv2.connectedComponentsWithStats(
        (candidates.astype(bool) & ~light).astype(np.uint8), connectivity=4
    )
    labels = np.where(dark_labels > 0, dark_labels + count - 1, labels)
    stats = np.concatenate([stats, dark_stats[1:]])
    count += dark_count - 1
    rest = mask & ~candidates.astype(bool)
    if count <= 1 or rest.sum() < 0.3 * mask.sum():
        # Most of the mask looks like the backdrop: no object colour to compare with.
        return mask
    palette = kmeans_palette(model.lab[rest], clusters=6, min_share=0.0, max_samples=4000)
    nearest = np.zeros(mask.shape, np.float32)
    inside = labels > 0
    nearest[inside] = np.min(
        np.linalg.norm(model.lab[inside][:, None, :] - palette[None], axis=-1), axis=-1
    )
    area = np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    unlike = np.bincount(labels.ravel(), weights=nearest.ravel(), minlength=count) / area
    # A region on the table the object encloses on every side (seen through a loop) needs less
    # colour evidence than one on the object's outline: the rest of the object next to it is
    # often shaded like it (the inside of a loop in its own shadow).
    outside = cv2.dilate((~mask).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    open_side = np.bincount(labels[outside].ravel(), minlength=count) > 0

    def mostly(flags: np.ndarray) -> np.ndarray:
        """Per candidate: whether more than half its pixels are flagged."""
        return np.bincount(labels.ravel(), weights=flags.ravel(), minlength=count) > 0.5 * area

    # On the wall, an enclosed region of the wall's colour is as likely a part of the object
    # in front of a near-colour wall: only on the table is enclosure evidence.
    on_floor = mostly(model.table)
    eased = on_floor & ~open_side
    # A contact shadow on a coloured table (wood) has the table's hue, darker; the object's
    # own dark parts would need that hue too. On a grey table they need not (grey rubber on
    # grey cloth is shadow-like), and the full colour evidence stays.
    if _coloured_floor(model):
        eased |= on_floor & mostly(model.shadow)
    needed = max(POCKET_MIN_DISTANCE, 2.0 * model.noise) * np.where(
        eased, POCKET_ENCLOSED_EASING, 1.0
    )
    pocket = (area <= POCKET_MAX_SHARE * float(mask.sum())) & (unlike > needed)
    pocket[0] = False
    result = mask & ~pocket[labels]
    return result if result.any() else mask


def _coloured_floor(model: Backdrop) -> bool:
    """Whether the table's expected colour is coloured rather than grey (COLOURED_FLOOR_CHROMA)."""
    if not model.table.any():
        return False
    floor = model.predicted[model.table]
    return float(np.median(np.hypot(floor[:, 1], floor[:, 2]))) >= COLOURED_FLOOR_CHROMA


def _colour_matte(mask: np.ndarray, rgb: np.ndarray, factor: float) -> np.ndarray:
    """Decide the pixels along the outline by colour at full resolution: each is compared
    with the object's and the backdrop's colours next to it (normalised blurs of the sure
    inside and outside) and kept when it is nearer the object's. Removes the rim of blended
    backdrop a working-resolution GrabCut leaves around thin parts (scissor blades)."""
    reach = max(2, round(1.5 * factor))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    shrunk = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
    band = grown & ~shrunk
    if not band.any() or not shrunk.any():
        return mask
    ys, xs = np.nonzero(band)
    pad = 6 * reach
    y0, y1 = max(0, int(ys.min()) - pad), min(mask.shape[0], int(ys.max()) + pad + 1)
    x0, x1 = max(0, int(xs.min()) - pad), min(mask.shape[1], int(xs.max()) + pad + 1)
    colour = rgb[y0:y1, x0:x1].astype(np.float32)
    # Narrow: a round object is darker at its limb than in its middle, so the object's colour
    # to compare an outline pixel with is the one right next to it.
    sigma = 1.0 * reach

    def blurred(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _wide_blur(colour * region[..., None], sigma), _wide_blur(
            region.astype(np.float32), sigma
        )

    inside_total, inside_weight = blurred(shrunk[y0:y1, x0:x1])
    outside_total, outside_weight = blurred(~grown[y0:y1, x0:x1])
    # Only the band's pixels are decided: the arithmetic runs on them alone.
    rows, cols = np.nonzero(band[y0:y1, x0:x1] & (inside_weight > 0.05) & (outside_weight > 0.05))
    inside = inside_total[rows, cols] / np.maximum(inside_weight[rows, cols], 1e-4)[:, None]
    outside = outside_total[rows, cols] / np.maximum(outside_weight[rows, cols], 1e-4)[:, None]
    contrast = inside - outside
    alpha = ((colour[rows, cols] - outside) * contrast).sum(-1) / np.maximum(
        (contrast**2).sum(-1), 1e-6
    )
    decided = np.linalg.norm(contrast, axis=-1) > MATTE_MIN_CONTRAST
    result = mask.copy()
    region = result[y0:y1, x0:x1]
    region[rows[decided], cols[decided]] = alpha[decided] >= 0.5
    # Only what stays joined to the sure inside is the object.
    return _keep_components_touching(result, shrunk)


def _wide_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; above MATTE_MAX_SIGMA it runs on a copy reduced by the smallest integer
    step that brings the sigma to at most MATTE_MAX_SIGMA, and is scaled back (the result is
    smooth at that scale): the cost no longer grows with the photo's area times the sigma."""
    if sigma <= MATTE_MAX_SIGMA:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    step = int(np.ceil(sigma / MATTE_MAX_SIGMA))
    height, width = image.shape[:2]
    reduced = cv2.resize(
        image, (max(1, -(-width // step)), max(1, -(-height // step))), interpolation=cv2.INTER_AREA
    )
    reduced = cv2.GaussianBlur(reduced, (0, 0), sigma / step)
    return cv2.resize(reduced, (width, height), interpolation=cv2.INTER_LINEAR)


def _graph_cut_outline(
    mask: np.ndarray, rgb: np.ndarray, factor: float, shadow: np.ndarray | None = None
) -> np.ndarray:
    """Settle the outline at full resolution with GrabCut in a band around it: what lies
    deeper inside is sure object, what lies further out sure backdrop, and the band goes to
    whichever side the photo's own edges and the colours of the object's crop say. A GrabCut
    at the working size follows a faint edge (dark rubber on its own shadow, a yellow banana
    before a yellow wall) only to within a working pixel or two, and the colour matte leaves
    such edges undecided or, on a shaded rim, decides them wrongly; the graph cut's edge
    term finds them. `shadow` (full resolution): the backdrop model's shadows, which start
    as probable backdrop up to OUTLINE_SHADOW_DEPTH inside the outline. OUTLINE_BAND or
    OUTLINE_SHADOW_DEPTH at 0 turns the step or its shadow rule off (bench sweeps)."""
    if OUTLINE_BAND <= 0:
        return mask
    height, width = mask.shape
    if max(height, width) > OUTLINE_MAX_SIDE:
        return _graph_cut_outline_reduced(mask, rgb, factor, shadow)
    reach = max(2, round(OUTLINE_BAND * factor))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    shrunk = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
    if not shrunk.any():
        return mask
    shallow = np.zeros_like(mask)
    if shadow is not None and shadow.any() and OUTLINE_SHADOW_DEPTH > 0:
        depth = max(reach, round(OUTLINE_SHADOW_DEPTH * factor))
        deep = cv2.erode(
            mask.astype(np.uint8),
            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * depth + 1, 2 * depth + 1)),
        ).astype(bool)
        shallow = mask & shadow & ~deep
        if not (shrunk & ~shallow).any():
            shallow[:] = False
    # The crop: the band and a margin of backdrop for the colour models to learn from.
    ys, xs = np.nonzero(grown)
    pad = 2 * reach
    y0, y1 = max(0, int(ys.min()) - pad), min(mask.shape[0], int(ys.max()) + pad + 1)
    x0, x1 = max(0, int(xs.min()) - pad), min(mask.shape[1], int(xs.max()) + pad + 1)
    labels = np.full((y1 - y0, x1 - x0), cv2.GC_BGD, dtype=np.uint8)
    labels[grown[y0:y1, x0:x1]] = cv2.GC_PR_BGD
    labels[mask[y0:y1, x0:x1]] = cv2.GC_PR_FGD
    labels[shrunk[y0:y1, x0:x1]] = cv2.GC_FGD
    labels[shallow[y0:y1, x0:x1]] = cv2.GC_PR_BGD
    background_model = np.zeros((1, 65), np.float64)
    object_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(GRABCUT_SEED)
    cv2.grabCut(
        np.ascontiguousarray(rgb[y0:y1, x0:x1]),
        labels,
        (0, 0, 0, 0),
        background_model,
        object_model,
        OUTLINE_ITERATIONS,
        cv2.GC_INIT_WITH_MASK,
    )
    result = mask.copy()
    result[y0:y1, x0:x1] = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    # Only what stays joined to the sure inside is the object.
    return _keep_components_touching(result, shrunk & ~shallow)


def _graph_cut_outline_reduced(
    mask: np.ndarray, rgb: np.ndarray, factor: float, shadow: np.ndarray | None
) -> np.ndarray:
    """`_graph_cut_outline` for a photo larger than OUTLINE_MAX_SIDE: the cut runs on a
    reduced copy, and its result replaces the full-resolution mask only where it changed
    the copy (elsewhere the colour matte's full-resolution outline stays)."""
    height, width = mask.shape
    scale = OUTLINE_MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    reduced = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
    reduced_shadow = None
    if shadow is not None:
        reduced_shadow = cv2.resize(
            shadow.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST
        ).astype(bool)
    cut = _graph_cut_outline(
        reduced,
        cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
        factor * size[0] / width,
        reduced_shadow,
    )
    changed = cut != reduced
    if not changed.any():
        return mask
    full = (width, height)
    decided = cv2.resize(cut.astype(np.float32), full, interpolation=cv2.INTER_LINEAR) >= 0.5
    where = cv2.dilate(
        cv2.resize(changed.astype(np.uint8), full, interpolation=cv2.INTER_NEAREST),
        np.ones((3, 3), np.uint8),
    ).astype(bool)
    result = np.where(where, decided, mask)
    # Only what stays joined to the object's inside is the object.
    return _keep_components_touching(result, mask & ~where)


def _grabcut_pass(small: np.ndarray, model: Backdrop) -> tuple[np.ndarray, np.ndarray, float]:
    """One GrabCut on a Lab copy seeded from the backdrop model: (mask, salient seeds, the
    distance above which a pixel probably is not backdrop)."""
    distance = np.where(model.shadow, 0.0, model.distance).astype(np.float32)
    threshold = max(_otsu_threshold(distance), 3.0 * model.noise, 5.0)
    faint_threshold = max(0.5 * threshold, 2.0 * model.noise, 3.0)
    # GrabCut's colour models in a perceptual space: weighted Lab, packed into 8 bits.
    lab = model.lab
    packed = np.stack([lab[..., 0] * 2.0, lab[..., 1] + 128.0, lab[..., 2] + 128.0], axis=-1)
    packed = np.ascontiguousarray(np.clip(packed + 0.5, 0, 255).astype(np.uint8))
    mask, salient = _seeded_grabcut(packed, distance, model.ring, threshold, faint_threshold)
    return mask, salient, faint_threshold


def _seeded_grabcut(
    image: np.ndarray,
    distance: np.ndarray,
    ring: np.ndarray,
    threshold: float,
    faint_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GrabCut on `image` (3 channels, 8 bits) seeded from a distance-to-backdrop map: pixels
    above `threshold` are the object's core, fainter ones joined to them probably object, the
    border ring backdrop unless it looks like the object. Returns (mask, salient seeds);
    NoObjectFound when too little stands out. Both the legacy and the current path use it."""
    clearly_object = distance > threshold
    # Fainter pixels count as probable object only where they join the clear ones (a blotch
    # of the wall far from the object is not).
    near_clear = cv2.dilate(clearly_object.astype(np.uint8), np.ones((7, 7), np.uint8))
    likely_object = (distance > faint_threshold) & near_clear.astype(bool)
    if clearly_object.mean() < MIN_COVERAGE:
        raise NoObjectFound(
            "No object stands out from the background. Use a photo where the object is "
            "clearly visible against a contrasting background, or upload a PNG with transparency."
        )
    labels = np.full(distance.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    labels[likely_object] = cv2.GC_PR_FGD
    # The border is background unless it looks like the object (an object cut by the frame).
    labels[ring & ~likely_object] = cv2.GC_BGD
    # A solid core of the prior stays object, so GrabCut cannot swap figure and ground.
    salient = _salient_parts(clearly_object, distance)
    labels[_core(salient)] = cv2.GC_FGD

    background_model = np.zeros((1, 65), np.float64)
    object_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(GRABCUT_SEED)
    cv2.grabCut(
        image,
        labels,
        (0, 0, 0, 0),  # no rectangle: initialised from the label mask
        background_model,
        object_model,
        GRABCUT_ITERATIONS,
        cv2.GC_INIT_WITH_MASK,
    )
    mask = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return mask.astype(bool), salient


def _drop_necked_border_parts(mask: np.ndarray, salient: np.ndarray) -> np.ndarray:
    """Drop parts joined to the object only by a thin neck when they touch the frame (a
    slab of wall or table GrabCut grew into), unless they are the object's largest part."""
    area = float(mask.sum())
    radius = max(1, round(0.035 * np.sqrt(area)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    height, width = mask.shape
    thin = mask & ~opened.astype(bool)
    _, thin_labels, thin_stats, _ = cv2.connectedComponentsWithStats(
        thin.astype(np.uint8), connectivity=8
    )
    tx, ty, tw, th = (thin_stats[:, i] for i in range(4))
    thin_touches = (tx == 0) | (ty == 0) | (tx + tw >= width) | (ty + th >= height)
    thin_touches[0] = False
    if thin_touches.any():
        # A thin strip running to the frame is a table edge or a wall seam, not the object.
        mask = mask & ~thin_touches[thin_labels]
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = 1 + int(np.argmax(areas))
    drop = []
    for label in range(1, count):
        x, y, w, h = stats[label, :4]
        touches = x == 0 or y == 0 or x + w >= width or y + h >= height
        if label != largest and touches:
            drop.append(label)
    if not drop:
        return mask
    dropped = np.isin(labels, drop)
    # What the opening removed is either a thin part of the object or the neck to a dropped
    # part: keep thin bits unless they lead to a dropped part.
    grown = cv2.dilate(dropped.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    lost = np.unique(thin_labels[grown & thin])
    lost = lost[lost != 0]
    result = mask & ~dropped & ~np.isin(thin_labels, lost)
    return result if result.any() else mask


def _edge_aware_upsample(mask: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Upsample a working-resolution mask and snap its outline to the photo's edges with a
    guided filter (where the photo shows no edge it stays the smooth upsampled outline)."""
    height, width = rgb.shape[:2]
    factor = width / mask.shape[1]
    soft = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if factor > 1.5:
        soft = cv2.GaussianBlur(soft, (0, 0), 0.5 * factor)
    # Only the band around the outline can change: work on its bounding box.
    band = (soft > 0.02) & (soft < 0.98)
    if not band.any():
        return soft >= 0.5
    ys, xs = np.nonzero(band)
    radius = max(2, round(1.5 * factor))
    y0, y1 = max(0, int(ys.min()) - 2 * radius), min(height, int(ys.max()) + 2 * radius + 1)
    x0, x1 = max(0, int(xs.min()) - 2 * radius), min(width, int(xs.max()) + 2 * radius + 1)
    guide = cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    source = soft[y0:y1, x0:x1]
    size = (2 * radius + 1, 2 * radius + 1)

    def box(image: np.ndarray) -> np.ndarray:
        return np.asarray(cv2.boxFilter(image, -1, size, borderType=cv2.BORDER_REFLECT))

    mean_guide, mean_source = box(guide), box(source)
    variance = box(guide * guide) - mean_guide * mean_guide
    covariance = box(guide * source) - mean_guide * mean_source
    slope = covariance / (variance + GUIDED_EPSILON)
    offset = mean_source - slope * mean_guide
    refined = box(slope) * guide + box(offset)
    result = soft >= 0.5
    result[y0:y1, x0:x1] = refined >= 0.5
    return result


def _salient_parts(clear: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The clearly-not-backdrop parts that make the object: the strongest part (area times
    contrast, favouring the centre, where a photographer puts the object) and parts nearly
    as strong; a weaker part that touches the frame is backdrop (a blotch, a door frame)."""
    # Parts a few pixels apart (an object crossing the table's edge) are one part.
    joined = cv2.dilate(clear.astype(np.uint8), np.ones((5, 5), np.uint8))
    count, labels, stats, centres = cv2.connectedComponentsWithStats(joined, connectivity=8)
    if count <= 2:
        return clear
    height, width = clear.shape
    contrast = np.bincount(labels.ravel(), weights=distance.ravel(), minlength=count)
    offset = (centres[:, 0] / width - 0.5) ** 2 + (centres[:, 1] / height - 0.5) ** 2
    score = contrast * np.exp(-offset / (2 * 0.3**2))
    score[0] = 0.0
    best = int(np.argmax(score))
    x, y, w, h = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
    touches = (x == 0) | (y == 0) | (x + w >= width) | (y + h >= height)
    keep = (score >= SALIENT_SHARE * score[best]) & ~touches
    keep[best] = True
    keep[0] = False
    return np.asarray(keep[labels] & clear)


def encode_mask(mask: np.ndarray) -> bytes:
    """A boolean mask as an 8-bit greyscale PNG (255 = object)."""
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError("could not encode the mask")
    return bytes(data.tobytes())


def _checked_coverage(mask: np.ndarray) -> np.ndarray:
    """The mask, unless the object it found is too small or fills the frame (both segmentation
    paths refuse the same cases with the same advice)."""
    coverage = float(mask.mean())
    if coverage < MIN_COVERAGE:
        raise NoObjectFound(
            f"The only object found covers {coverage:.1%} of the photo, too little to "
            "reconstruct. Crop the photo around the object or upload a PNG with transparency."
        )
    if coverage > MAX_COVERAGE:
        raise NoObjectFound(
            "No background could be told apart from the object (it would fill the whole "
            "photo). Leave some background around the object, upload a PNG with transparency, "
            "or set remove_background to false to use the whole frame."
        )
    return mask
