"""The classic engine: content-aware fill without weights (genfill_server.engines.classic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from genfill_server.engines.base import (
    Engine,
    EngineError,
    EngineJob,
    EngineOptions,
    JobCancelledError,
)
from genfill_server.engines.classic import (
    EXPAND_BAND_DEPTH_FACTOR,
    EXPAND_MIN_SOURCE_RATIO,
    ClassicEngine,
    _harmonic_fill,
    _regions,
    content_aware_fill,
    source_mask,
)


def grow_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated by a square of side ``2 * radius + 1`` (chessboard distance)."""
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = np.zeros_like(mask)
            h, w = mask.shape
            shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
            out |= shifted
    return out


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


# -- removal: where sources come from, structure, and the set of real photos ---------------------


def backdrop_with_a_face(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mottled grey backdrop, a skin-coloured disc ("face") beside a hole in the backdrop.

    Returns ``(image, hole, face)``, the last two ``(H, W)`` bool."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(150, 10, (128, 160, 3)), 0, 255).astype(np.uint8)
    y, x = np.mgrid[0:128, 0:160]
    face = (y - 64) ** 2 + (x - 40) ** 2 < 30**2
    image[face] = np.clip(rng.normal((210, 150, 120), 12, (int(face.sum()), 3)), 0, 255).astype(np.uint8)
    hole = (np.abs(y - 64) < 24) & (np.abs(x - 104) < 22)
    return image, hole, face


def skin_share(image: np.ndarray, hole: np.ndarray) -> float:
    """Share of hole pixels far redder than the grey backdrop: pasted face."""
    pixels = image[hole].astype(int)
    return float(((pixels[:, 0] - pixels[:, 2]) > 60).mean())


def test_sources_lie_in_a_band_and_never_on_colours_the_border_lacks() -> None:
    image, hole, face = backdrop_with_a_face()
    allowed, band_px = source_mask(image, hole)
    assert not (allowed & hole).any()
    assert not (allowed & face).any()
    # Within the band every backdrop pixel may be copied, beyond it none.
    near = grow_square(hole, band_px) & ~hole & ~grow_square(face, 3)
    assert allowed[near].mean() > 0.95
    assert not (allowed & ~grow_square(hole, band_px)).any()
    assert np.count_nonzero(allowed) >= 2 * np.count_nonzero(hole)


def test_a_face_beside_the_hole_is_not_pasted_into_the_backdrop() -> None:
    image, hole, _ = backdrop_with_a_face()
    damaged = image.copy()
    damaged[hole] = 0
    for seed in range(3):
        assert skin_share(content_aware_fill(damaged, hole, seed=seed), hole) == 0


def test_the_band_widens_when_it_holds_too_little() -> None:
    # A thick hole in a thin frame: the first band cannot hold twice the hole's pixels.
    image = noise_image(96, 96)
    hole = np.zeros((96, 96), bool)
    hole[8:88, 8:88] = True
    allowed, band_px = source_mask(image, hole)
    assert np.array_equal(allowed, ~hole)
    assert band_px >= 96


def test_an_edge_crossing_the_hole_is_continued_straight() -> None:
    # Grey above, near-black below (a backdrop on a pedestal); the hole straddles the edge.
    rng = np.random.default_rng(4)
    image = np.where(
        (np.arange(128)[:, None, None] < 70),
        rng.normal(170, 8, (128, 160, 3)),
        rng.normal(25, 6, (128, 160, 3)),
    )
    image = np.clip(image, 0, 255).astype(np.uint8)
    hole = np.zeros((128, 160), bool)
    hole[30:100, 50:110] = True
    damaged = image.copy()
    damaged[hole] = 0
    result = content_aware_fill(damaged, hole, seed=0)
    luma = result.astype(float).mean(axis=-1)
    for column in range(50, 110, 4):
        dark_rows = np.flatnonzero(luma[30:100, column] < 100) + 30
        # Every column of the hole is grey down to the edge and dark below it, give or take
        # the patches' reach.
        assert dark_rows.size and abs(dark_rows.min() - 70) <= 3, (column, dark_rows[:5])
        assert (luma[dark_rows.min() : 100, column] < 100).mean() > 0.95, column


def test_the_regions_of_a_border_follow_its_edges_not_its_gradients() -> None:
    y, x = np.mgrid[0:96, 0:128]
    ramp = np.stack([40 + x, 60 + 0.5 * y + 0.3 * x, 200 - 0.8 * x], axis=-1).astype(np.uint8)
    hole = np.zeros((96, 128), bool)
    hole[30:66, 40:90] = True
    assert _regions(ramp, hole).count == 1
    split = ramp.copy()
    split[50:] = (20, 30, 25)
    regions = _regions(split, hole)
    assert regions.count == 2
    # Inside the hole the regions meet where the edge would run.
    top, bottom = regions.labels[32, 65], regions.labels[63, 65]
    assert top != bottom
    assert (regions.labels[30:47, 42:88] == top).all() and (regions.labels[53:66, 42:88] == bottom).all()


def removal_case(name: str) -> tuple[np.ndarray, np.ndarray]:
    import json

    from PIL import Image, ImageDraw

    folder = Path(__file__).parent / "data" / "removal"
    data = json.loads((folder / "masks.json").read_text())
    case = data["cases"][name]
    image = np.asarray(Image.open(folder / f"{case['photo']}.jpg").convert("RGB"))
    canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for cx, cy, rx, ry in case.get("ellipse", []):
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    for points in case.get("polygon", []):
        draw.polygon([tuple(p) for p in points], fill=255)
    hole = grow_square(np.asarray(canvas) > 0, data["margin_px"] - 1)
    return image, hole


def test_removing_the_shuttle_pastes_no_face_into_the_backdrop() -> None:
    """The issue's first report (astronaut photo): PatchMatch over the whole image pastes
    the astronaut's face and hair into the grey backdrop where the shuttle model was."""
    import patchmatch

    image, hole = removal_case("astronaut_shuttle")
    damaged = image.copy()
    damaged[hole] = 0
    # Above the pedestal: the mask's foot touches the orange suit, which may continue there.
    backdrop = hole.copy()
    backdrop[230:] = False
    for seed in range(2):
        ours = content_aware_fill(damaged, hole, seed=seed)
        assert skin_share(ours, backdrop) == 0, (seed, skin_share(ours, backdrop))
        # The measure has teeth: unrestricted PatchMatch fails it on this photo.
        patchmatch.set_random_seed(seed)
        plain = patchmatch.inpaint(damaged, hole.astype(np.uint8), patch_size=3)
        assert skin_share(plain, backdrop) > 0.01, (seed, skin_share(plain, backdrop))


@pytest.mark.parametrize(
    ("mode", "blend_px", "least_alpha", "soft_alpha"),
    [
        ("remove", None, 255, 100),  # removal pastes a hard selection hard: no ring of the object
        ("fill", None, 208, 100),  # the default ramp (4 px here) starts at the floor: at most 25% kept
        ("fill", 4, 64, 64),  # a ramp the request asked for is the full ramp
    ],
)
def test_a_hard_selection_keeps_at_most_a_quarter_of_the_original(mode, blend_px, least_alpha, soft_alpha) -> None:
    from genfill.protocol import FillRequest
    from genfill_server.pipeline import run_fill

    wall = np.tile(brick_wall(64), (8, 8, 1))
    canvas = np.dstack([wall, np.full(wall.shape[:2], 255, np.uint8)])
    selection = np.zeros(wall.shape[:2], np.uint8)
    selection[150:350, 100:400] = 255
    selection[149, 100:400] = 100  # a soft edge blends as its alpha says (or less, in a ramp)
    request = FillRequest(image="a" * 64, mask="b" * 64, prompt="", mode=mode, blend_px=blend_px)
    result = run_fill(ClassicEngine(), request, canvas, selection, [0], lambda *args: None)
    alpha = np.zeros(selection.shape, np.uint8)
    alpha[result.box.slices] = result.layers[0][..., 3]
    assert alpha[selection == 255].min() == least_alpha
    assert (alpha[selection == 0] == 0).all()
    assert (alpha[149, 101:399] == soft_alpha).all()


def sky_with_a_balloon() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mottled sky 128 x 160, a red kite string along its right edge (rows 56-65), and a
    red balloon 40 px in from that edge; then a 64 px margin to the right to expand into.

    Returns ``(image, margin, balloon)`` on the grown canvas."""
    rng = np.random.default_rng(2)
    image = np.clip(rng.normal((120, 160, 210), 6, (128, 224, 3)), 0, 255).astype(np.uint8)
    y, x = np.mgrid[0:128, 0:224]
    balloon = (y - 30) ** 2 + (x - 110) ** 2 < 12**2
    image[balloon] = (220, 30, 40)
    image[56:66, 120:160] = (220, 30, 40)
    margin = x >= 160
    image[margin] = 0
    return image, margin, balloon


def test_expand_continues_the_edge_and_leaves_objects_further_in_alone() -> None:
    image, margin, balloon = sky_with_a_balloon()
    inward, _ = source_mask(image, margin)
    outward, band_px = source_mask(image, margin, EXPAND_BAND_DEPTH_FACTOR, EXPAND_MIN_SOURCE_RATIO)
    # Red is a border colour (the string): deep in the default band the balloon is a source,
    # in expand's shallow band it is not.
    assert (inward & balloon).any()
    assert not (outward & balloon).any() and band_px == 24

    engine = ClassicEngine()
    selection = margin.astype(np.uint8) * 255
    job = EngineJob(image=image, selection=selection, denoise_mask=selection, seeds=[0, 1], options=EngineOptions.of(mode="expand"))
    for result in engine.run(job, lambda *args: None):
        red = (result[..., 0].astype(int) - result[..., 2]) > 100
        # The string may continue outward; no red anywhere else in the margin.
        rows = np.flatnonzero((red & margin).any(axis=1))
        assert rows.size == 0 or (rows.min() >= 46 and rows.max() <= 75), rows
