"""The CPU backend's hidden side (issue #17): how deep the inflated shape is for its outline."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import trimesh

from serve_app.backends.cpu import geometry
from serve_app.backends.cpu.geometry import inflate_silhouette, is_closed_manifold

SIZE = 400


def disc(cx: int = SIZE // 2, radius: int = 150) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(mask, (cx, SIZE // 2), radius, 1, -1)
    return mask.astype(bool)


def animal() -> np.ndarray:
    """A four-legged animal side-on: a body 160 px high, legs, a head."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (200, 180), (130, 80), 0, 0, 360, 1, -1)
    for x in (100, 150, 250, 300):
        mask[200:330, x - 12 : x + 12] = 1
    cv2.circle(mask, (330, 120), 45, 1, -1)
    return mask.astype(bool)


def bar() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[190:210, 20:380] = True
    return mask


def thickness(mask: np.ndarray, *, legacy: bool = False) -> tuple[float, trimesh.Trimesh]:
    """The largest front-to-back distance (the back lies under the front: same x, y)."""
    mesh = inflate_silhouette(mask, 20_000, legacy=legacy)
    assert is_closed_manifold(mesh.faces)
    loaded = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    half = len(mesh.vertices) // 2
    front, back = mesh.vertices[:half], mesh.vertices[half:]
    assert np.allclose(front[:, :2], back[:, :2])
    return float((front[:, 2] - back[:, 2]).max()), loaded


def test_animal_trunk_is_about_as_deep_as_it_is_high() -> None:
    depth, mesh = thickness(animal())
    legacy_depth, _ = thickness(animal(), legacy=True)
    # The trunk is 160 px high: round, as deep as that (the legacy profile was shallower).
    assert 0.9 * 160 <= depth <= 1.1 * 160
    assert depth > 1.08 * legacy_depth
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


def test_convex_outline_is_taken_as_flat_sided_but_still_bulky() -> None:
    """A disc could be a ball or a can seen end-on: it gets depth comparable to its width."""
    depth, mesh = thickness(disc())
    assert 0.6 * 300 <= depth <= 0.8 * 300
    assert mesh.is_watertight and mesh.volume > 0


def test_thin_bar_stays_thin() -> None:
    depth, mesh = thickness(bar())
    assert depth <= 20  # no fatter than the bar is wide (a tube at most)
    assert depth <= 0.05 * 360
    assert mesh.is_watertight and mesh.volume > 0


def test_thin_ring_stays_thin() -> None:
    """A handle loop or the ring of a pair of scissors: a plate, not a doughnut."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(mask, (SIZE // 2, SIZE // 2), 150, 1, 16)
    depth, mesh = thickness(mask.astype(bool))
    assert depth <= 16
    assert mesh.is_watertight and mesh.volume > 0


def test_plate_of_uneven_width_stays_flat() -> None:
    """Scissors: a tapering blade and two handle rings. Thin and of uneven width, so a plate
    (half as deep as wide), not a tube."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mask, [np.array([[60, 190], [60, 215], [330, 205]])], 1)
    cv2.circle(mask, (330, 170), 45, 1, 14)
    cv2.circle(mask, (330, 250), 45, 1, 14)
    depth, mesh = thickness(mask.astype(bool))
    assert depth <= 0.6 * 26  # the blade's root is 26 px wide
    assert mesh.is_watertight and mesh.volume > 0


def test_each_part_gets_its_own_depth() -> None:
    """Two objects in one photo (a pair of shoes): each as deep as it would be alone."""
    pair = disc(100, 80) | disc(300, 80)
    alone, _ = thickness(disc(100, 80))
    both, mesh = thickness(pair)
    assert both == pytest.approx(alone, rel=0.05)
    assert mesh.is_watertight


def wedge() -> np.ndarray:
    """A thin triangle standing up the image (a blade, a flat tool): a plate."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mask, [np.array([[290, 40], [330, 40], [310, 360]], np.int32)], 1)
    return mask.astype(bool)


def test_each_part_is_judged_on_its_own() -> None:
    """A plate beside a bulky object keeps the plate's depth, not the bulky one's (the part
    holding the widest disc used to decide for every part)."""
    pair = disc(120, 90) | wedge()
    cells = (1.0, 1.0)
    alone_plate, _ = geometry._profile(wedge(), cells)
    alone_disc, _ = geometry._profile(disc(120, 90), cells)
    both, _ = geometry._profile(pair, cells)
    # Alone, the plate is flatter for its width than the disc.
    plate_width = cv2.distanceTransform(wedge().astype(np.uint8), cv2.DIST_L2, 5).max()
    assert alone_plate.max() / plate_width < 0.8 * alone_disc.max() / 90
    assert both[wedge()].max() == pytest.approx(alone_plate.max(), rel=1e-6)
    assert both[disc(120, 90)].max() == pytest.approx(alone_disc.max(), rel=1e-6)


def blob(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random 40 x 50 outline with holes and parts, and its distance to the outline."""
    rng = np.random.default_rng(seed)
    interior = cv2.GaussianBlur(rng.random((40, 50)), (0, 0), 3) > 0.5
    distance = cv2.distanceTransform(
        np.pad(interior, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
    )[1:-1, 1:-1].astype(np.float64)
    return interior, distance


def test_ball_height_matches_brute_force() -> None:
    interior, distance = blob(3)
    fast = geometry._ball_height_and_owner(interior, distance)[0]
    rows, cols = np.nonzero(interior)
    ys, xs = np.mgrid[0:40, 0:50]
    squared = distance[rows, cols, None, None] ** 2 - (ys - rows[:, None, None]) ** 2
    squared = squared - (xs - cols[:, None, None]) ** 2
    slow = np.where(interior, np.sqrt(np.maximum(squared.max(axis=0), 0.0)), 0.0)
    assert np.allclose(fast, slow)


def test_profile_exponent_reshapes_the_profile_but_not_its_peak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep knob of bench/quality.py: below 1 the profile is fuller near the outline
    (boxier), at the same peak height; 1.0 (the default) leaves the union of balls as it is."""
    interior = np.pad(disc()[::4, ::4], 1)
    plain = geometry._profile(interior, (1.0, 1.0))[0]
    monkeypatch.setattr(geometry, "PROFILE_EXPONENT", 0.5)
    fuller = geometry._profile(interior, (1.0, 1.0))[0]
    assert fuller.max() == pytest.approx(plain.max())
    near_rim = interior & (plain > 0) & (plain < 0.5 * plain.max())
    assert (fuller[near_rim] > plain[near_rim]).all()


def scissors(angle: float = 0.0) -> np.ndarray:
    """A thin plate of uneven width (a blade and two rings), its long axis `angle` degrees
    from the image's horizontal."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mask, [np.array([[60, 190], [60, 215], [330, 205]])], 1)
    cv2.circle(mask, (330, 170), 45, 1, 14)
    cv2.circle(mask, (330, 250), 45, 1, 14)
    turn = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, 1.0)
    return cv2.warpAffine(mask, turn, (SIZE, SIZE), flags=cv2.INTER_NEAREST).astype(bool)


def mid_slope(mask: np.ndarray) -> float:
    """How much nearer the camera the object's mid-surface gets per pixel down the image."""
    mesh = inflate_silhouette(mask, 20_000)
    assert is_closed_manifold(mesh.faces)
    half = len(mesh.vertices) // 2
    mid = 0.5 * (mesh.vertices[:half, 2] + mesh.vertices[half:, 2])
    down = -mesh.vertices[:half, 1]
    return float(np.polyfit(down, mid, 1)[0])


def test_thin_plate_across_the_image_lies_in_the_table_plane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ground contact: scissors seen from a low camera are the table plane foreshortened, so
    their lower parts are nearer the camera (by cot(elevation) per pixel down)."""
    slope = mid_slope(scissors())
    expected = 1.0 / np.tan(np.radians(geometry.GROUND_ELEVATION_DEG))
    assert 0.7 * expected <= slope <= 1.1 * expected
    monkeypatch.setattr(geometry, "GROUND_ELEVATION_DEG", 0.0)
    assert abs(mid_slope(scissors())) < 0.05


def test_thin_plate_running_up_the_image_is_not_tilted() -> None:
    """Its long axis vertical: it stands, or the camera is high above (tilting would
    stretch it)."""
    assert abs(mid_slope(scissors(90.0))) < 0.05


def test_bulky_object_stands_upright() -> None:
    assert abs(mid_slope(animal())) < 0.05


def test_lying_tube_keeps_round_sections() -> None:
    """A banana across the image lies on the table along its axis, but each cross-section
    is still a round tube about that axis: as thick as without the tilt, not a sheared
    ribbon."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (200, 120), (160, 110), 0, 20, 160, 1, 24)
    tube = mask.astype(bool)
    tilted, _ = thickness(tube)
    assert mid_slope(tube) > 0.5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(geometry, "GROUND_ELEVATION_DEG", 0.0)
        upright, _ = thickness(tube)
    assert tilted == pytest.approx(upright, rel=0.02)
    assert tilted <= 26


def test_ball_owner_row_reaches_the_ball_height() -> None:
    """The ball centre's row found with the separable pass carries the highest ball."""
    interior, distance = blob(5)
    height, owner = geometry._ball_height_and_owner(interior, distance)
    ys, xs = np.nonzero(interior)
    source = owner[ys, xs].astype(int)
    cols = np.arange(50)
    reach = np.where(interior[source], distance[source] ** 2, -np.inf)
    reach = reach - (xs[:, None] - cols[None]) ** 2 - ((ys - source) ** 2)[:, None]
    assert np.allclose(np.sqrt(np.maximum(reach.max(axis=1), 0.0)), height[ys, xs])
