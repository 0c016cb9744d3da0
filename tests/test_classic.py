"""The classic engine: content-aware fill without weights (genfill_server.engines.classic)."""

from __future__ import annotations

import numpy as np
import pytest
from genfill_server.engines.base import Engine, EngineError, EngineJob, JobCancelledError
from genfill_server.engines.classic import ClassicEngine, _harmonic_fill, content_aware_fill


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def brick_wall(size_px: int = 96) -> np.ndarray:
    """A running-bond brick pattern: 16 x 8 px bricks with 2 px mortar, shaded per brick."""
    y, x = np.mgrid[0:size_px, 0:size_px]
    course = y // 8
    shifted = x + 8 * (course % 2)
    mortar = (y % 8 < 2) | (shifted % 16 < 2)
    shade = 120 + 40 * ((course * 7 + shifted // 16 * 3) % 3)
    grey = np.where(mortar, 225, shade).astype(np.uint8)
    return np.stack([grey, grey, (grey * 0.8).astype(np.uint8)], axis=-1)


def centre_hole(size_px: int, side_px: int) -> np.ndarray:
    hole = np.zeros((size_px, size_px), bool)
    top = (size_px - side_px) // 2
    hole[top : top + side_px, top : top + side_px] = True
    return hole


def texture_kept(result: np.ndarray, original: np.ndarray, hole: np.ndarray) -> float:
    """RMS luma gradient inside the hole of ``result`` over that of ``original``."""

    def energy(image: np.ndarray) -> float:
        luma = image.astype(np.float64).mean(axis=-1)
        gx = np.zeros_like(luma)
        gy = np.zeros_like(luma)
        gx[:, :-1] = np.diff(luma, axis=1)
        gy[:-1] = np.diff(luma, axis=0)
        return float(((gx**2 + gy**2)[hole]).sum())

    return (energy(result) / energy(original)) ** 0.5


def correlation_in_hole(result: np.ndarray, original: np.ndarray, hole: np.ndarray) -> float:
    a = result[hole].astype(np.float64).ravel()
    b = original[hole].astype(np.float64).ravel()
    if a.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def continues_pattern(result: np.ndarray, original: np.ndarray, hole: np.ndarray) -> bool:
    """Whether a fill continues a regular pattern rather than smearing it.

    Smearing fills (Telea, Navier-Stokes, a mean) keep a third of the texture or less and
    hardly correlate with the hidden bricks; a continued pattern keeps most of both.
    """
    return texture_kept(result, original, hole) >= 0.7 and correlation_in_hole(result, original, hole) >= 0.4


# -- the fill function ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hole_box",
    [
        (20, 20, 12, 12),  # interior
        (0, 0, 10, 10),  # a corner
        (0, 20, 48, 6),  # a column from top to bottom edge
        (40, 0, 8, 48),  # a band across the whole width at the bottom edge
        (23, 31, 1, 1),  # a single pixel
    ],
)
def test_pixels_outside_the_hole_are_bit_identical(hole_box: tuple[int, int, int, int]) -> None:
    image = noise_image(48, 48)
    top, left, height, width = hole_box
    hole = np.zeros((48, 48), bool)
    hole[top : top + height, left : left + width] = True
    result = content_aware_fill(image, hole, seed=1)
    assert result.shape == image.shape and result.dtype == np.uint8
    assert np.array_equal(result[~hole], image[~hole])


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (2, 2), (3, 7), (5, 5), (8, 8), (8, 3)])
@pytest.mark.parametrize("where", ["first", "centre", "all_but_one", "all"])
def test_tiny_images(size: tuple[int, int], where: str) -> None:
    image = noise_image(*size, seed=3)
    hole = np.zeros(size, bool)
    if where == "first":
        hole[0, 0] = True
    elif where == "centre":
        hole[size[0] // 2, size[1] // 2] = True
    elif where == "all_but_one":
        hole[:] = True
        hole[-1, -1] = size != (1, 1)
    else:
        hole[:] = True
    result = content_aware_fill(image, hole, seed=0)
    assert result.shape == image.shape and result.dtype == np.uint8
    assert np.array_equal(result[~hole], image[~hole])


def test_a_hole_covering_almost_everything_falls_back_to_a_smooth_fill() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :2] = (200, 40, 40)
    hole = np.ones((64, 64), bool)
    hole[:, :2] = False
    result = content_aware_fill(image, hole, seed=0)
    assert np.array_equal(result[:, :2], image[:, :2])
    # Nothing to copy from but a red edge: the fill takes its colour rather than noise.
    assert np.abs(result[hole].astype(int) - (200, 40, 40)).max() <= 2


def test_an_empty_hole_returns_a_copy() -> None:
    image = noise_image(16, 16)
    result = content_aware_fill(image, np.zeros((16, 16), bool), seed=0)
    assert np.array_equal(result, image) and result is not image


def test_the_same_seed_gives_the_same_fill_and_another_seed_another() -> None:
    image = noise_image(64, 64, seed=5)
    hole = centre_hole(64, 16)
    first = content_aware_fill(image, hole, seed=7)
    assert np.array_equal(first, content_aware_fill(image, hole, seed=7))
    assert not np.array_equal(first, content_aware_fill(image, hole, seed=8))


def test_bad_arguments_raise_value_error() -> None:
    image = noise_image(8, 8)
    with pytest.raises(ValueError, match="image"):
        content_aware_fill(image.astype(np.float32), np.zeros((8, 8), bool), seed=0)
    with pytest.raises(ValueError, match="hole"):
        content_aware_fill(image, np.zeros((8, 9), bool), seed=0)
    with pytest.raises(ValueError, match="hole"):
        content_aware_fill(image, np.zeros((8, 8), np.uint8), seed=0)


def test_bricks_are_continued_not_smeared() -> None:
    wall = brick_wall(96)
    hole = centre_hole(96, 28)
    damaged = wall.copy()
    damaged[hole] = 0
    result = content_aware_fill(damaged, hole, seed=0)
    assert continues_pattern(result, wall, hole), (
        texture_kept(result, wall, hole),
        correlation_in_hole(result, wall, hole),
    )

    # The assertion has teeth: smearing fills fail it.
    mean_fill = damaged.copy()
    mean_fill[hole] = wall[~hole].mean(axis=0).astype(np.uint8)
    assert not continues_pattern(mean_fill, wall, hole)
    cv2 = pytest.importorskip("cv2")
    for method in (cv2.INPAINT_TELEA, cv2.INPAINT_NS):
        smeared = cv2.inpaint(damaged, hole.astype(np.uint8) * 255, 3, method)
        assert not continues_pattern(smeared, wall, hole)


def test_a_smooth_gradient_is_continued_without_patch_seams() -> None:
    # Copied patches alone carry the wrong brightness into a ramp (mean error 2.5 levels, up
    # to 8); the low band from the membrane follows it.
    y, x = np.mgrid[0:128, 0:192]
    ramp = np.stack([40 + x, 60 + 0.5 * y + 0.3 * x, 200 - 0.8 * x], axis=-1).astype(np.uint8)
    hole = np.zeros((128, 192), bool)
    hole[34:94, 60:140] = True
    damaged = ramp.copy()
    damaged[hole] = 0
    result = content_aware_fill(damaged, hole, seed=0)
    error = np.abs(result[hole].astype(int) - ramp[hole])
    assert error.mean() <= 1.5 and error.max() <= 4, (error.mean(), error.max())


def test_the_membrane_solves_laplaces_equation() -> None:
    # A linear function is harmonic: the membrane reproduces it inside the hole, also where
    # the hole touches the image border (no flux across it).
    y, x = np.mgrid[0:64, 0:80]
    plane = np.stack([30 + 2 * x, 50 + y + x, 250 - 3 * y], axis=-1).astype(np.float32)
    hole = np.zeros((64, 80), bool)
    hole[10:50, 20:60] = True
    assert np.abs(_harmonic_fill(plane, hole, sweeps=200)[hole] - plane[hole]).max() < 0.5
    edge = np.zeros((64, 80), bool)
    edge[20:40, 50:] = True
    flat = np.full((64, 80, 3), 90, np.float32)
    assert np.abs(_harmonic_fill(flat, edge)[edge] - 90).max() < 1e-3


def test_a_cancel_raised_by_the_callback_propagates_promptly() -> None:
    calls: list[tuple[int, int]] = []

    def cancel(step: int, total: int, preview: np.ndarray | None) -> None:
        calls.append((step, total))
        raise JobCancelledError

    image = noise_image(256, 256)
    with pytest.raises(JobCancelledError):
        content_aware_fill(image, centre_hole(256, 80), seed=0, on_step=cancel)
    assert len(calls) == 1


def test_progress_rises_to_its_total() -> None:
    calls: list[tuple[int, int]] = []
    content_aware_fill(noise_image(128, 128), centre_hole(128, 40), seed=0, on_step=lambda s, t, p: calls.append((s, t)))
    steps = [s for s, _ in calls]
    assert len(calls) >= 3
    assert steps == sorted(steps) and calls[-1][0] == calls[-1][1]
    assert len({t for _, t in calls}) == 1


# -- the engine ------------------------------------------------------------------------------------


def make_job(seeds: list[int], selection: np.ndarray | None = None) -> EngineJob:
    image = brick_wall(64)
    if selection is None:
        selection = np.zeros((64, 64), np.uint8)
        selection[20:40, 24:44] = 255
        selection[19, 24:44] = 128  # a soft edge is replaced, too
    return EngineJob(image=image, selection=selection, denoise_mask=selection, seeds=seeds)


def test_engine_returns_one_image_per_seed_and_reports_progress_over_the_whole_job() -> None:
    engine = ClassicEngine()
    assert isinstance(engine, Engine)
    assert engine.name == "classic" and engine.capabilities.native_size is None
    engine.load()
    calls: list[tuple[int, int]] = []
    job = make_job([1, 2, 3])
    images = engine.run(job, lambda step, total, preview: calls.append((step, total)))
    engine.close()

    assert len(images) == 3
    keep = job.selection == 0
    for image in images:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image[keep], job.image[keep])
    assert not np.array_equal(images[0], images[1])
    steps = [s for s, _ in calls]
    assert steps == sorted(steps)
    assert {t for _, t in calls} == {calls[-1][1]} and calls[-1][0] == calls[-1][1]


def test_engine_rejects_an_empty_selection() -> None:
    with pytest.raises(EngineError) as caught:
        ClassicEngine().run(make_job([0], np.zeros((64, 64), np.uint8)), lambda *args: None)
    assert caught.value.code == "empty_selection"


def test_engine_lets_a_cancel_propagate() -> None:
    def cancel(step: int, total: int, preview: np.ndarray | None) -> None:
        raise JobCancelledError

    with pytest.raises(JobCancelledError):
        ClassicEngine().run(make_job([0, 1]), cancel)
