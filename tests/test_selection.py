"""Selection help (genfill_server.selection): GrabCut seeded by clicks and boxes, on
synthetic shapes with known masks, scored by IoU."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("cv2")

from genfill_server.selection import SelectionUnavailable, select


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    chosen = mask > 0
    return float((chosen & truth).sum() / (chosen | truth).sum())


def scene(seed: int = 0, size: tuple[int, int] = (160, 200)) -> np.ndarray:
    """A mottled green-grey background, the kind of surroundings a subject stands in."""
    rng = np.random.default_rng(seed)
    height, width = size
    base = rng.normal((90, 120, 80), 14, (height, width, 3))
    x = np.arange(width)[None, :, None]
    base += 20 * np.sin(x / 9.0)  # stripes: background is not one flat colour
    return base


def paint(base: np.ndarray, shape: np.ndarray, colour, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = base.copy()
    out[shape] = rng.normal(colour, 10, (int(shape.sum()), 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def disc(size, cy, cx, radius) -> np.ndarray:
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 < radius**2


def test_a_box_around_a_disc_selects_the_disc() -> None:
    truth = disc((160, 200), 80, 90, 40)
    image = paint(scene(), truth, (200, 60, 50))
    mask = select(image, box=(40, 30, 100, 100))
    assert mask.dtype == np.uint8 and mask.shape == truth.shape and set(np.unique(mask)) <= {0, 255}
    assert iou(mask, truth) >= 0.98, iou(mask, truth)


def test_one_click_selects_the_disc_it_lands_on() -> None:
    truth = disc((160, 200), 80, 90, 40)
    image = paint(scene(), truth, (200, 60, 50))
    assert iou(select(image, points=[(90, 80, True)]), truth) >= 0.98


def test_of_two_alike_objects_only_the_clicked_one_is_selected() -> None:
    left = np.zeros((160, 200), bool)
    left[40:110, 20:80] = True
    right = np.zeros((160, 200), bool)
    right[40:110, 120:180] = True
    image = paint(scene(2), left | right, (60, 70, 200))
    mask = select(image, points=[(50, 70, True)])
    assert iou(mask, left) >= 0.98
    assert not (mask[right] > 0).any()


def test_a_negative_click_keeps_a_ring_open() -> None:
    ring = disc((160, 200), 80, 100, 50) & ~disc((160, 200), 80, 100, 22)
    image = paint(scene(3), ring, (230, 200, 60))
    inside = disc((160, 200), 80, 100, 22)
    mask = select(image, points=[(100, 44, True), (100, 80, False)])
    assert iou(mask, ring) >= 0.98, iou(mask, ring)
    assert (mask[inside] == 0).mean() > 0.95
    # Without the negative click the ring's hole is taken as part of the subject.
    filled = select(image, points=[(100, 44, True)])
    assert (filled[inside] > 0).mean() > 0.95


def test_an_object_cut_by_the_image_edge_is_selected_to_the_edge() -> None:
    truth = disc((160, 200), 80, 190, 45)
    image = paint(scene(4), truth, (200, 190, 60))
    mask = select(image, box=(130, 20, 70, 120))
    assert iou(mask, truth) >= 0.98
    assert (mask[60:100, 199] > 0).all()


@pytest.mark.parametrize("colour", [(140, 130, 90), (130, 120, 110)])
def test_a_subject_close_to_its_background_in_colour_is_still_found(colour) -> None:
    # The background averages (90, 120, 80) with stripes of +-20 and noise of 14 a channel.
    truth = disc((160, 200), 80, 90, 40)
    image = paint(scene(), truth, colour)
    assert iou(select(image, points=[(90, 80, True)]), truth) >= 0.98
    assert iou(select(image, box=(40, 30, 100, 100)), truth) >= 0.98


def test_the_same_clicks_give_the_same_mask() -> None:
    truth = disc((160, 200), 80, 90, 40)
    image = paint(scene(5), truth, (180, 80, 140))
    first = select(image, points=[(90, 80, True)], box=(30, 20, 120, 120))
    assert np.array_equal(first, select(image, points=[(90, 80, True)], box=(30, 20, 120, 120)))


def test_rgba_is_accepted() -> None:
    truth = disc((160, 200), 80, 90, 40)
    rgb = paint(scene(), truth, (200, 60, 50))
    rgba = np.dstack([rgb, np.full(truth.shape, 255, np.uint8)])
    assert np.array_equal(select(rgba, box=(40, 30, 100, 100)), select(rgb, box=(40, 30, 100, 100)))


@pytest.mark.parametrize(
    ("points", "box", "message"),
    [
        ([], None, "positive click or a box"),
        ([(5, 5, False)], None, "positive click or a box"),
        ([(200, 5, True)], None, "outside"),
        ([(-1, 5, True)], None, "outside"),
        ([], (150, 10, 60, 10), "not inside"),
        ([], (10, 10, 0, 10), "empty"),
    ],
)
def test_bad_requests_raise_value_error(points, box, message) -> None:
    image = np.zeros((160, 200, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        select(image, points=points, box=box)
    with pytest.raises(ValueError, match="image"):
        select(np.zeros((160, 200), np.uint8), points=[(1, 1, True)])


def test_without_opencv_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # what an install without OpenCV looks like
    with pytest.raises(SelectionUnavailable, match="opencv-python-headless"):
        select(np.zeros((16, 16, 3), np.uint8), points=[(3, 3, True)])
