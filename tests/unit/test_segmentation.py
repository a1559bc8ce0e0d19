"""Segmentation of the CPU backend on synthetic photos whose true object mask is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from serve_app.backends.cpu.segment import segment_image
from serve_app.errors import NoObjectFound

SIZE = 320


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def gradient_background(seed: int, size: int = SIZE) -> np.ndarray:
    """A lit, noisy backdrop: a diagonal colour gradient plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([190 + 40 * xs, 185 + 30 * ys, 170 + 35 * (xs + ys) / 2], axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255)


def textured_object(mask: np.ndarray, seed: int) -> np.ndarray:
    """Object pixels: stripes of two colours with shading and noise (not a flat blob)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]].astype(np.float32)
    stripes = (np.sin(xs / 7.0 + ys / 11.0) > 0)[..., None]
    colour = np.where(stripes, [[[200, 60, 40]]], [[[60, 90, 170]]]).astype(np.float32)
    shading = 0.75 + 0.25 * np.cos((ys - mask.shape[0] / 2) / mask.shape[0] * np.pi)[..., None]
    return np.clip(colour * shading + rng.normal(0, 5, colour.shape), 0, 255)


def compose(background: np.ndarray, mask: np.ndarray, seed: int) -> Image.Image:
    picture = np.where(mask[..., None], textured_object(mask, seed), background)
    return Image.fromarray(picture.astype(np.uint8), "RGB")


def ellipse_mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2 + 10), (size // 4, size // 3), 20, 0, 360, 1, -1)
    return mask.astype(bool)


def test_textured_ellipse_on_noisy_gradient() -> None:
    truth = ellipse_mask()
    segmentation = segment_image(compose(gradient_background(1), truth, 2))
    assert segmentation.method == "grabcut"
    assert iou(segmentation.mask, truth) >= 0.9


def test_polygon_on_two_tone_backdrop() -> None:
    """A wall above a table: the backdrop has two colours, the object a third."""
    truth = np.zeros((SIZE, SIZE), np.uint8)
    star = [(160, 40), (190, 130), (280, 140), (205, 190), (230, 280), (160, 225), (90, 280),
            (115, 190), (40, 140), (130, 130)]  # fmt: skip
    cv2.fillPoly(truth, [np.array(star, np.int32)], 1)
    truth = truth.astype(bool)
    background = gradient_background(3)
    background[int(SIZE * 0.7) :] = background[int(SIZE * 0.7) :] * [0.55, 0.5, 0.45]
    segmentation = segment_image(compose(background, truth, 4))
    assert iou(segmentation.mask, truth) >= 0.9


def test_ring_keeps_its_hole_open() -> None:
    """The backdrop seen through a hole is not part of the object."""
    truth = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(truth, (SIZE // 2, SIZE // 2), 110, 1, -1)
    cv2.circle(truth, (SIZE // 2, SIZE // 2), 50, 0, -1)
    truth = truth.astype(bool)
    segmentation = segment_image(compose(gradient_background(5), truth, 6))
    assert iou(segmentation.mask, truth) >= 0.9
    assert not segmentation.mask[SIZE // 2, SIZE // 2]


def test_object_cut_by_the_frame() -> None:
    """An object running off the bottom edge is still segmented up to that edge."""
    truth = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(truth, (SIZE // 2, SIZE), (SIZE // 4, SIZE // 2), 0, 0, 360, 1, -1)
    truth = truth.astype(bool)
    segmentation = segment_image(compose(gradient_background(7), truth, 8))
    assert iou(segmentation.mask, truth) >= 0.9


def test_alpha_channel_is_the_mask() -> None:
    truth = ellipse_mask()
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = textured_object(truth, 9).astype(np.uint8)
    rgba[..., 3] = truth * 255
    segmentation = segment_image(Image.fromarray(rgba, "RGBA"))
    assert segmentation.method == "alpha"
    assert iou(segmentation.mask, truth) >= 0.99


def test_remove_background_true_segments_the_visible_picture() -> None:
    """Forced segmentation ignores the alpha as a mask but not what the photo shows."""
    truth = ellipse_mask()
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = textured_object(truth, 10).astype(np.uint8)  # garbage under alpha = 0
    rgba[..., 3] = truth * 255
    segmentation = segment_image(Image.fromarray(rgba, "RGBA"), remove_background=True)
    assert segmentation.method == "grabcut"
    assert iou(segmentation.mask, truth) >= 0.9


def test_remove_background_false_takes_the_whole_frame() -> None:
    photo = compose(gradient_background(11), ellipse_mask(), 12)
    segmentation = segment_image(photo, remove_background=False)
    assert segmentation.method == "none"
    assert segmentation.mask.all()


def test_opaque_alpha_is_ignored() -> None:
    truth = ellipse_mask()
    photo = compose(gradient_background(13), truth, 14).convert("RGBA")
    segmentation = segment_image(photo)
    assert segmentation.method == "grabcut"
    assert iou(segmentation.mask, truth) >= 0.9


def test_segmentation_is_deterministic() -> None:
    photo = compose(gradient_background(15), ellipse_mask(), 16)
    assert np.array_equal(segment_image(photo).mask, segment_image(photo).mask)


@pytest.mark.parametrize(
    "photo",
    [
        Image.new("RGB", (200, 150), (120, 130, 140)),
        Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8), "RGB"
        ),
        Image.new("RGBA", (200, 200), (10, 200, 30, 0)),
    ],
    ids=["uniform", "pure-noise", "fully-transparent"],
)
def test_no_object_found(photo: Image.Image) -> None:
    with pytest.raises(NoObjectFound) as caught:
        segment_image(photo)
    assert caught.value.code == "no_object_found"
    assert caught.value.message
