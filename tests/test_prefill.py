"""The pull-push pre-fill on the shapes its pyramid handles apart: thin images, holes at edges."""

from __future__ import annotations

import numpy as np
import pytest

from genfill_server.engines.prefill import pull_push


def test_pull_push_fills_a_single_row_with_the_known_mean():
    image = np.array([[[10, 20, 30], [0, 0, 0], [30, 40, 51]]], np.uint8)
    hole = np.array([[False, True, False]])
    np.testing.assert_array_equal(pull_push(image, hole)[0, 1], [20, 30, 40])
    np.testing.assert_array_equal(pull_push(image.transpose(1, 0, 2), hole.T)[1, 0], [20, 30, 40])


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (5, 200)])
@pytest.mark.parametrize("corner", ["top-left", "bottom-right", "centre"])
def test_pull_push_keeps_known_pixels_and_stays_within_their_range(shape, corner):
    height, width = shape
    rng = np.random.default_rng(height * width)
    image = rng.integers(40, 200, (height, width, 3), dtype=np.uint8)
    hole = np.zeros(shape, bool)
    rows = {"top-left": slice(0, height // 2), "bottom-right": slice(height // 2, None), "centre": slice(height // 4, height * 3 // 4)}[corner]
    columns = {"top-left": slice(0, width // 3), "bottom-right": slice(width // 3, None), "centre": slice(width // 4, width * 3 // 4)}[corner]
    hole[rows, columns] = True
    filled = pull_push(image, hole)
    np.testing.assert_array_equal(filled[~hole], image[~hole])
    assert filled[hole].min() >= 40 and filled[hole].max() <= 199
