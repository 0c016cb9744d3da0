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
    rows = {
        "top-left": slice(0, height // 2), "bottom-right": slice(height // 2, None), "centre": slice(height // 4, height * 3 // 4)
    }[corner]
    columns = {
        "top-left": slice(0, width // 3), "bottom-right": slice(width // 3, None), "centre": slice(width // 4, width * 3 // 4)
    }[corner]
    hole[rows, columns] = True
    filled = pull_push(image, hole)
    np.testing.assert_array_equal(filled[~hole], image[~hole])
    assert filled[hole].min() >= 40 and filled[hole].max() <= 199


@pytest.mark.parametrize("mode", ["fill", "add", "remove"])
def test_the_pipeline_starts_the_engines_prefill_beside_the_masks(mode):
    from genfill.protocol import FillRequest
    from genfill_server.engines.prefill import prefill
    from genfill_server.engines.sd_inpaint import SDInpaintEngine
    from genfill_server.pipeline import prepare_fill

    engine = SDInpaintEngine(lambda: None, native_size=64)  # prepare_fill needs no weights
    rng = np.random.default_rng(5)
    canvas = rng.integers(0, 256, (96, 80, 4), dtype=np.uint8)
    selection = np.zeros((96, 80), np.uint8)
    selection[30:60, 20:50] = 255
    request = FillRequest(image="a" * 64, mask="b" * 64, prompt="", mode=mode)
    job = prepare_fill(engine, request, canvas, selection, [1]).job
    assert job.prefilled is not None
    expected = prefill(job.image, job.selection, mode)
    assert np.array_equal(job.prefilled.result(), expected)
