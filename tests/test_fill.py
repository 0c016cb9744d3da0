"""Tests for genfill.fill: exact tables on tiny arrays, plus invariants on random ones."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from genfill import fill
from genfill.fill import Box, EmptyMaskError, Size
from hypothesis import given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parent.parent
FILL_SOURCE = REPO_ROOT / "sdk" / "genfill" / "fill.py"

# Hypothesis examples are small arrays; the limit keeps the whole file to a few seconds.
quick = settings(max_examples=150, deadline=None)


def grid(text: str) -> np.ndarray:
    """An (H, W) uint8 selection drawn as text: '#' is 255, '.' is 0, rows separated by spaces."""
    return np.array([[255 if cell == "#" else 0 for cell in row] for row in text.split()], dtype=np.uint8)


def u8(rows: list) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


# --- isolation --------------------------------------------------------------------------


def test_importing_fill_loads_neither_torch_nor_pillow():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sdk")}
    code = "import genfill.fill, sys; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    completed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_fill_imports_only_numpy_and_the_standard_library():
    imported = set()
    for node in ast.walk(ast.parse(FILL_SOURCE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "fill must not import the rest of genfill"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"numpy"}


# --- geometry types ---------------------------------------------------------------------


def test_box_properties():
    box = Box(1, 2, 3, 4)
    assert (box.right, box.bottom) == (4, 6)
    assert box.size == Size(3, 4)
    array = np.arange(8 * 8).reshape(8, 8)
    np.testing.assert_array_equal(array[box.slices], array[2:6, 1:4])


# --- mask_box ---------------------------------------------------------------------------

MASK_BOX_CASES = {
    "one pixel, whole canvas": ("#", Box(0, 0, 1, 1)),
    "full, odd size": ("##### ##### #####", Box(0, 0, 5, 3)),
    "one pixel inside": (".... .... .#.. ....", Box(1, 2, 1, 1)),
    "top edge": (".##. .... .... .... ....", Box(1, 0, 2, 1)),
    "bottom edge": (".... .... .... .#.. .##.", Box(1, 3, 2, 2)),
    "left edge": ("... #.. #..", Box(0, 1, 1, 2)),
    "right edge": ("... ..# ...", Box(2, 1, 1, 1)),
    "top-left corner": ("#.. ... ...", Box(0, 0, 1, 1)),
    "top-right corner": ("..# ... ...", Box(2, 0, 1, 1)),
    "bottom-left corner": ("... ... #..", Box(0, 2, 1, 1)),
    "bottom-right corner": (".... .... ...#", Box(3, 2, 1, 1)),
    "two opposite corners": ("#...... ....... ......#", Box(0, 0, 7, 3)),
    "diagonal, 8x8": (" ".join("." * i + "#" + "." * (7 - i) for i in range(8)), Box(0, 0, 8, 8)),
}


@pytest.mark.parametrize(("drawing", "expected"), MASK_BOX_CASES.values(), ids=MASK_BOX_CASES.keys())
def test_mask_box(drawing, expected):
    assert fill.mask_box(grid(drawing)) == expected


def test_mask_box_counts_soft_pixels():
    assert fill.mask_box(u8([[0, 0, 0], [0, 0, 1]])) == Box(2, 1, 1, 1)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8)])
def test_empty_selection_raises(shape):
    selection = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(EmptyMaskError):
        fill.mask_box(selection)
    with pytest.raises(EmptyMaskError):
        fill.context_box(selection)
    assert issubclass(EmptyMaskError, ValueError)


@pytest.mark.parametrize(
    "selection",
    [
        np.ones((3, 3), dtype=bool),
        np.ones((3, 3), dtype=np.float32),
        np.ones((3, 3, 1), dtype=np.uint8),
        np.ones((0, 3), dtype=np.uint8),
        [[255]],
    ],
    ids=["bool", "float32", "3d", "empty shape", "list"],
)
def test_mask_box_rejects_bad_selections(selection):
    with pytest.raises(ValueError, match="selection"):
        fill.mask_box(selection)


# --- context_box ------------------------------------------------------------------------


def one_pixel(height: int, width: int, x: int, y: int) -> np.ndarray:
    selection = np.zeros((height, width), dtype=np.uint8)
    selection[y, x] = 255
    return selection


CONTEXT_BOX_CASES = {
    # margin = ceil(max(long side / 16, (mask width + height) / 4)), then native, square, snap.
    "pixel in 8x8, multiple 8 takes the whole canvas": (one_pixel(8, 8, 3, 3), {}, Box(0, 0, 8, 8)),
    "top-left corner shifts inward": (one_pixel(8, 8, 0, 0), {"multiple": 1}, Box(0, 0, 3, 3)),
    "bottom-right corner shifts inward": (one_pixel(8, 8, 7, 7), {"multiple": 1}, Box(5, 5, 3, 3)),
    "top-right corner": (one_pixel(8, 8, 7, 0), {"multiple": 1}, Box(5, 0, 3, 3)),
    "bottom-left corner": (one_pixel(8, 8, 0, 7), {"multiple": 1}, Box(0, 5, 3, 3)),
    "left edge": (one_pixel(8, 8, 0, 4), {"multiple": 1}, Box(0, 3, 3, 3)),
    "odd canvas, snapped to 2": (one_pixel(5, 7, 3, 2), {"multiple": 2}, Box(1, 0, 4, 4)),
    "wide mask made square": (grid("........ " * 4 + "..##.... " + "........ " * 3), {"multiple": 1}, Box(1, 2, 4, 4)),
    "native minimum": (one_pixel(8, 8, 3, 3), {"native_size": 6, "multiple": 1}, Box(0, 0, 6, 6)),
    "native larger than canvas": (one_pixel(4, 6, 0, 0), {"native_size": 100, "multiple": 1}, Box(0, 0, 6, 4)),
    "short canvas side used whole": (one_pixel(5, 12, 5, 2), {}, Box(1, 0, 8, 5)),
    "full odd canvas": (np.full((3, 5), 255, dtype=np.uint8), {}, Box(0, 0, 5, 3)),
    "canvas margin dominates": (one_pixel(64, 64, 40, 10), {}, Box(32, 2, 16, 16)),
}


@pytest.mark.parametrize(("selection", "options", "expected"), CONTEXT_BOX_CASES.values(), ids=CONTEXT_BOX_CASES.keys())
def test_context_box(selection, options, expected):
    assert fill.context_box(selection, **options) == expected


@pytest.mark.parametrize(
    "options",
    [{"native_size": 0}, {"native_size": -8}, {"native_size": 8.0}, {"multiple": 0}, {"multiple": True}],
)
def test_context_box_rejects_bad_options(options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        fill.context_box(one_pixel(8, 8, 1, 1), **options)


def assert_context_box_invariants(selection: np.ndarray, native_size: int | None, multiple: int) -> None:
    canvas_height, canvas_width = selection.shape
    inner = fill.mask_box(selection)
    box = fill.context_box(selection, native_size=native_size, multiple=multiple)
    assert all(type(field) is int for field in box)
    assert box.x <= inner.x and box.y <= inner.y and box.right >= inner.right and box.bottom >= inner.bottom
    assert box.x >= 0 and box.y >= 0 and box.right <= canvas_width and box.bottom <= canvas_height
    assert box.width % multiple == 0 or box.width == canvas_width
    assert box.height % multiple == 0 or box.height == canvas_height
    if native_size is not None:
        assert box.width >= min(native_size, canvas_width)
        assert box.height >= min(native_size, canvas_height)
    assert box.width == box.height or box.width == canvas_width or box.height == canvas_height


@quick
@given(
    canvas_width=st.integers(1, 300),
    canvas_height=st.integers(1, 300),
    corners=st.tuples(*[st.floats(0, 1, exclude_max=True)] * 4),
    native_size=st.none() | st.integers(1, 400),
    multiple=st.sampled_from([1, 2, 8, 64]),
)
def test_context_box_invariants_on_rectangles(canvas_width, canvas_height, corners, native_size, multiple):
    xs = sorted(int(corner * canvas_width) for corner in corners[:2])
    ys = sorted(int(corner * canvas_height) for corner in corners[2:])
    selection = np.zeros((canvas_height, canvas_width), dtype=np.uint8)
    selection[ys[0] : ys[1] + 1, xs[0] : xs[1] + 1] = 255
    assert_context_box_invariants(selection, native_size, multiple)


def test_context_box_invariants_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(300):
        height, width = rng.integers(1, 200, size=2)
        selection = (rng.random((height, width)) < rng.random() * 0.01).astype(np.uint8) * 255
        selection[rng.integers(height), rng.integers(width)] = rng.integers(1, 256)
        native_size = None if rng.random() < 0.3 else int(rng.integers(1, 256))
        assert_context_box_invariants(selection, native_size, int(rng.choice([1, 8, 16])))


@pytest.mark.parametrize(("canvas_side", "expected"), [(2048, Size(512, 512)), (4096, Size(520, 520))])
def test_small_mask_on_a_large_canvas(canvas_side, expected):
    # The native size wins until the canvas margin (long side / 16 on each side) exceeds it.
    box = fill.context_box(one_pixel(canvas_side, canvas_side, 1500, 1000), native_size=512)
    assert box.size == expected


# --- target_size ------------------------------------------------------------------------

TARGET_SIZE_CASES = [
    (Size(512, 512), 512, 8, Size(512, 512)),
    (Size(100, 100), 512, 8, Size(512, 512)),
    (Size(2048, 2048), 1024, 8, Size(1024, 1024)),
    (Size(1024, 512), 512, 8, Size(728, 360)),
    (Size(3, 3), 8, 8, Size(8, 8)),
    (Size(1, 1000), 64, 8, Size(8, 2024)),
    (Size(7, 5), 6, 1, Size(7, 5)),
]


@pytest.mark.parametrize(("size", "native_size", "multiple", "expected"), TARGET_SIZE_CASES)
def test_target_size(size, native_size, multiple, expected):
    assert fill.target_size(size, native_size, multiple) == expected


@pytest.mark.parametrize(
    ("size", "native_size", "multiple", "name"),
    [(Size(0, 5), 512, 8, "size"), (Size(5, 5), 0, 8, "native_size"), (Size(5, 5), 512, 0, "multiple")],
)
def test_target_size_rejects_bad_values(size, native_size, multiple, name):
    with pytest.raises(ValueError, match=name):
        fill.target_size(size, native_size, multiple)


# --- resize -----------------------------------------------------------------------------

RAMP_4X4 = np.add.outer(7 * np.arange(4), 70 * np.arange(4))  # rows 0, 7, 14, 21; columns 0, 70, 140, 210


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8, 3), (2, 3, 4)])
def test_resize_to_same_size_is_an_exact_copy(dtype, shape):
    image = np.random.default_rng(0).integers(0, 256, size=shape).astype(dtype)
    resized = fill.resize(image, Size(shape[1], shape[0]))
    assert resized.dtype == dtype and resized is not image
    np.testing.assert_array_equal(resized, image)


def test_resize_halves_a_4x4_ramp():
    # Pillow's BILINEAR taps at 2x reduction: weights 3, 3, 1 (sum 7) at the first output,
    # 1, 3, 3 at the last, the missing outer tap dropped at the edge.
    expected = [[55, 165], [66, 176]]
    np.testing.assert_array_equal(fill.resize(RAMP_4X4.astype(np.uint8), Size(2, 2)), u8(expected))
    halved = fill.resize(RAMP_4X4.astype(np.float32), Size(2, 2))
    assert halved.dtype == np.float32
    np.testing.assert_allclose(halved, expected, rtol=1e-6)


def test_resize_doubles_a_pair():
    np.testing.assert_array_equal(fill.resize(u8([[0, 100]]), Size(4, 1)), u8([[0, 25, 75, 100]]))


def test_resize_channels_independently():
    image = np.stack([RAMP_4X4, 231 - RAMP_4X4, np.full((4, 4), 9)], axis=2).astype(np.uint8)
    np.testing.assert_array_equal(
        fill.resize(image, Size(2, 2)),
        np.stack([u8([[55, 165], [66, 176]]), u8([[176, 66], [165, 55]]), np.full((2, 2), 9, np.uint8)], axis=2),
    )


@pytest.mark.parametrize("size", [Size(1, 1), Size(3, 7), Size(16, 2), Size(5, 5)])
def test_resize_keeps_a_flat_image_flat(size):
    resized = fill.resize(np.full((5, 5, 4), 77, np.uint8), size)
    np.testing.assert_array_equal(resized, np.full((size.height, size.width, 4), 77))


def test_resize_keeps_float32_values_outside_0_to_255():
    resized = fill.resize(np.array([[-70, -70, 0, 700]], dtype=np.float32), Size(2, 1))
    assert resized.dtype == np.float32
    np.testing.assert_allclose(resized, [[-60, 290]], rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "size"), [((37, 53, 3), Size(20, 100)), ((64, 48, 3), Size(16, 12)), ((9, 10, 3), Size(31, 29))]
)
def test_resize_agrees_with_pillow_bilinear(shape, size):
    image_module = pytest.importorskip("PIL.Image")
    image = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    expected = np.asarray(image_module.fromarray(image).resize(size, image_module.BILINEAR))
    # Pillow rounds between its two passes; we do not, so results may differ by one level.
    assert np.abs(fill.resize(image, size).astype(int) - expected).max() <= 1


@pytest.mark.parametrize(
    ("image", "size", "name"),
    [
        (np.zeros((4, 4), bool), Size(2, 2), "image"),
        (np.zeros((4, 4), np.float64), Size(2, 2), "image"),
        (np.zeros((4, 4, 3, 1), np.uint8), Size(2, 2), "image"),
        (np.zeros((4, 4), np.uint8), Size(0, 2), "size"),
        (np.zeros((4, 4), np.uint8), (2, 2.5), "size"),
    ],
)
def test_resize_rejects_bad_values(image, size, name):
    with pytest.raises(ValueError, match=name):
        fill.resize(image, size)


# --- grow, shrink, blur -----------------------------------------------------------------

MORPHOLOGY_CASES = {
    "grow 0 is identity": (fill.grow, "... .#. ..#", 0, "... .#. ..#"),
    "grow a pixel to a square": (fill.grow, "..... ..... ..#.. ..... .....", 1, "..... .###. .###. .###. ....."),
    "grow a corner pixel": (fill.grow, "#.. ... ...", 1, "##. ##. ..."),
    "grow past every edge": (fill.grow, "... .#. ...", 5, "### ### ###"),
    "grow odd size by 2": (fill.grow, "......#", 2, "....###"),
    "shrink 0 is identity": (fill.shrink, "##. #..", 0, "##. #.."),
    "shrink a block to its centre": (fill.shrink, "..... .###. .###. .###. .....", 1, "..... ..... ..#.. ..... ....."),
    "shrink keeps a full canvas": (fill.shrink, "### ### ###", 1, "### ### ###"),
    "shrink keeps the canvas edge": (fill.shrink, "##.. ##.. ##.. ##..", 1, "#... #... #... #..."),
    "shrink from a corner": (fill.shrink, "###. ###. ###. ....", 1, "##.. ##.. .... ...."),
    "shrink a 1x1": (fill.shrink, "#", 3, "#"),
    "shrink removes a line": (fill.shrink, ".... #### ....", 1, ".... .... ...."),
}


@pytest.mark.parametrize(
    ("operation", "drawing", "px", "expected"), MORPHOLOGY_CASES.values(), ids=MORPHOLOGY_CASES.keys()
)
def test_grow_and_shrink(operation, drawing, px, expected):
    mask = grid(drawing)
    result = operation(mask, px)
    np.testing.assert_array_equal(result, grid(expected))
    assert result is not mask


def test_grow_and_shrink_are_grayscale():
    np.testing.assert_array_equal(fill.grow(u8([[0, 100, 0, 200, 0]]), 1), u8([[100, 100, 200, 200, 200]]))
    np.testing.assert_array_equal(fill.shrink(u8([[50, 100, 255, 200, 255]]), 1), u8([[50, 50, 100, 200, 200]]))


BLUR_CASES = {
    "0 is identity": (u8([[0, 255], [7, 0]]), 0, u8([[0, 255], [7, 0]])),
    "one box on a row": (u8([[0, 0, 255, 0, 0]]), 1, u8([[0, 85, 85, 85, 0]])),
    "two boxes on a row": (u8([[0, 0, 255, 0, 0]]), 2, u8([[28, 57, 85, 57, 28]])),
    "a pixel spreads over 3x3": (u8([[0, 0, 0], [0, 255, 0], [0, 0, 0]]), 1, np.full((3, 3), 28, np.uint8)),
    "edges replicate": (u8([[255, 255, 0, 0]]), 1, u8([[255, 170, 85, 0]])),
    "1x1": (u8([[9]]), 4, u8([[9]])),
}


@pytest.mark.parametrize(("mask", "px", "expected"), BLUR_CASES.values(), ids=BLUR_CASES.keys())
def test_blur(mask, px, expected):
    np.testing.assert_array_equal(fill.blur(mask, px), expected)


def _box_blur_reference(mask: np.ndarray, px: int) -> np.ndarray:
    # The definition, spelled plainly: three edge-padded running-sum box means per axis in
    # float64, rows first, then rounded to the nearest level.
    radii = [px // 3 + 1] * (px % 3) + [px // 3] * (3 - px % 3)
    result = mask.astype(np.float64)
    for axis in (0, 1):
        for radius in radii:
            if radius:
                pad = [(0, 0), (0, 0)]
                pad[axis] = (radius + 1, radius)
                sums = np.cumsum(np.pad(result, pad, mode="edge"), axis=axis)
                window = 2 * radius + 1
                result = (np.take(sums, range(window, sums.shape[axis]), axis=axis)
                          - np.take(sums, range(sums.shape[axis] - window), axis=axis)) / window
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("px", [1, 5, 16, 40])
def test_blur_gives_the_bits_of_its_plain_definition(px):
    rng = np.random.default_rng(px)
    mask = (rng.random((97, 131)) > 0.6).astype(np.uint8) * 255
    mask[20:60, 30:90] = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    np.testing.assert_array_equal(fill.blur(mask, px), _box_blur_reference(mask, px))


@pytest.mark.parametrize("px", [1, 2, 3, 4, 7])
def test_blur_reaches_exactly_px(px):
    mask = np.zeros((17, 17), np.float32)
    mask[8, 8] = 1.0
    blurred = fill.blur(mask, px)
    assert blurred.dtype == np.float32
    reached = np.zeros_like(mask, dtype=bool)
    reached[8 - px : 9 + px, 8 - px : 9 + px] = True
    np.testing.assert_array_equal(blurred > 0, reached)
    assert blurred.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("operation", [fill.grow, fill.shrink, fill.blur])
@pytest.mark.parametrize("px", [-1, 1.5, True, None])
def test_morphology_rejects_bad_px(operation, px):
    with pytest.raises(ValueError, match="px"):
        operation(np.zeros((3, 3), np.uint8), px)


# --- denoise and compositing masks ------------------------------------------------------

DENOISE_CASES = {
    "grow only": (u8([[0, 0, 255, 0, 0]]), 1, 0, u8([[0, 255, 255, 255, 0]])),
    "feather only": (u8([[0, 0, 255, 0, 0]]), 0, 1, u8([[0, 85, 255, 85, 0]])),
    "grow then feather": (u8([[0, 0, 0, 255, 0, 0, 0]]), 1, 1, u8([[0, 85, 170, 255, 170, 85, 0]])),
    "soft stays soft": (u8([[0, 90, 0]]), 0, 0, u8([[0, 90, 0]])),
    "empty": (np.zeros((2, 3), np.uint8), 2, 2, np.zeros((2, 3), np.uint8)),
}


@pytest.mark.parametrize(
    ("selection", "grow_px", "feather_px", "expected"), DENOISE_CASES.values(), ids=DENOISE_CASES.keys()
)
def test_denoise_mask(selection, grow_px, feather_px, expected):
    np.testing.assert_array_equal(fill.denoise_mask(selection, grow_px=grow_px, feather_px=feather_px), expected)


COMPOSITING_CASES = {
    "blend 0 is identity": (grid("#. ##"), 0, grid("#. ##")),
    "one pixel is fully replaced": (grid("... .#. ..."), 4, grid("... .#. ...")),
    "two-pixel line is fully replaced": (grid(".... .##. .... ...."), 4, grid(".... .##. .... ....")),
    "full canvas has no ramp": (grid("#### #### ####"), 3, grid("#### #### ####")),
    "1x1 canvas": (grid("#"), 8, grid("#")),
    "ring inside a block": (
        grid("." * 9 + " " + ("." + "#" * 7 + ". ") * 7 + "." * 9),
        2,
        np.pad(np.pad(np.full((5, 5), 255, np.uint8), 1, constant_values=128), 1),
    ),
    "no ramp along the canvas edge": (grid("####. " * 5), 2, u8([[255, 255, 255, 128, 0]] * 5)),
    "thin stroke beside a block keeps full replacement": (
        grid("#######..#.. " * 3),
        3,
        u8([[255, 255, 255, 255, 255, 170, 85, 0, 0, 255, 0, 0]] * 3),
    ),
    "soft edge stays below the selection": (
        u8([[0, 200, 255, 255, 255, 200, 0]]),
        2,
        u8([[0, 128, 255, 255, 255, 128, 0]]),
    ),
    "soft everywhere stays soft": (np.full((3, 3), 100, np.uint8), 2, np.full((3, 3), 100, np.uint8)),
    "empty": (np.zeros((3, 2), np.uint8), 2, np.zeros((3, 2), np.uint8)),
}


@pytest.mark.parametrize(
    ("selection", "blend_px", "expected"), COMPOSITING_CASES.values(), ids=COMPOSITING_CASES.keys()
)
def test_compositing_mask(selection, blend_px, expected):
    np.testing.assert_array_equal(fill.compositing_mask(selection, blend_px=blend_px), expected)


@pytest.mark.parametrize("function", [fill.denoise_mask, fill.compositing_mask])
def test_masks_reject_bad_values(function):
    options = {"grow_px": 1, "feather_px": 1} if function is fill.denoise_mask else {"blend_px": 1}
    with pytest.raises(ValueError, match="selection"):
        function(np.zeros((3, 3), bool), **options)
    for name in options:
        with pytest.raises(ValueError, match=name):
            function(np.zeros((3, 3), np.uint8), **{**options, name: -1})


selections = st.integers(0, 2**32 - 1).flatmap(
    lambda seed: st.tuples(st.just(seed), st.integers(1, 24), st.integers(1, 24), st.sampled_from(["hard", "soft"]))
)


def random_selection(seed: int, height: int, width: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hard = fill.grow((rng.random((height, width)) < 0.08).astype(np.uint8) * 255, int(rng.integers(0, 3)))
    if kind == "hard":
        return hard
    return np.minimum(hard, rng.integers(0, 256, size=(height, width))).astype(np.uint8)


@quick
@given(selection_spec=selections, grow_px=st.integers(0, 5), feather_px=st.integers(0, 5), blend_px=st.integers(0, 6))
def test_masks_bracket_the_selection(selection_spec, grow_px, feather_px, blend_px):
    selection = random_selection(*selection_spec)
    denoise = fill.denoise_mask(selection, grow_px=grow_px, feather_px=feather_px)
    assert (denoise >= selection).all()
    assert (denoise[selection == 255] == 255).all()
    # Nothing changes beyond the grow and feather reach.
    reach = fill.grow(selection, grow_px + feather_px)
    assert (denoise[reach == 0] == 0).all()

    alpha = fill.compositing_mask(selection, blend_px=blend_px)
    assert alpha.dtype == np.uint8 and alpha.shape == selection.shape
    assert (alpha <= selection).all()
    # At least blend_px pixels deep (canvas edge not counting), the selection is kept as is.
    core = fill.shrink((selection > 0).astype(np.uint8) * 255, max(blend_px - 1, 0)) == 255
    np.testing.assert_array_equal(alpha[core], selection[core])


def test_every_isolated_pixel_is_fully_replaced():
    selection = np.zeros((8, 8), np.uint8)
    selection[::3, ::3] = 255
    np.testing.assert_array_equal(fill.compositing_mask(selection, blend_px=16), selection)


# --- colour -----------------------------------------------------------------------------


def smooth_image(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([90 + xx % 40, 110 + yy % 30, 100 + (xx + yy) % 50], axis=2).astype(np.uint8)


def test_match_colour_undoes_a_colour_cast():
    original = smooth_image(32, 48)
    generated = np.clip(original.astype(int) + [14, -9, 6], 0, 255).astype(np.uint8)
    known = np.zeros((32, 48), bool)
    known[:, :30] = True
    matched = fill.match_colour(generated, original, known)
    assert matched.dtype == np.uint8 and matched.shape == original.shape
    shift = matched[known].mean(axis=0) - original[known].mean(axis=0)
    assert np.abs(shift).max() <= 1, shift
    # The same correction reaches the unknown (filled) part.
    assert np.abs(matched[~known].mean(axis=0) - original[~known].mean(axis=0)).max() <= 1


def test_match_colour_leaves_a_matching_image_alone():
    image = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    known = np.random.default_rng(4).random((16, 16)) < 0.5
    assert np.abs(fill.match_colour(image, image, known).astype(int) - image).max() <= 1


def test_match_colour_needs_16_known_pixels():
    original = smooth_image(8, 8)
    generated = original // 2
    known = np.zeros((8, 8), bool)
    known[0, :8] = known[1, :7] = True
    unchanged = fill.match_colour(generated, original, known)
    np.testing.assert_array_equal(unchanged, generated)
    assert unchanged is not generated
    known[1, 7] = True
    assert not np.array_equal(fill.match_colour(generated, original, known), generated)


def test_match_colour_rejects_bad_values():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="known"):
        fill.match_colour(image, image, np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="shapes disagree"):
        fill.match_colour(image, np.zeros((4, 5, 3), np.uint8), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="generated"):
        fill.match_colour(np.zeros((4, 4, 4), np.uint8), image, np.ones((4, 4), bool))


# --- layers and canvases ----------------------------------------------------------------


def test_make_layer_hides_colour_where_transparent():
    layer = fill.make_layer(u8([[[1, 2, 3], [4, 5, 6]]]), u8([[0, 7]]))
    np.testing.assert_array_equal(layer, u8([[[0, 0, 0, 0], [4, 5, 6, 7]]]))
    with pytest.raises(ValueError, match="shapes disagree"):
        fill.make_layer(u8([[[1, 2, 3]]]), u8([[0, 7]]))


def test_composite_table():
    canvas = u8([[[10, 20, 30, 255], [200, 100, 50, 128], [7, 8, 9, 0]], [[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]])
    layer = u8([[[100, 100, 100, 128], [100, 100, 100, 128], [100, 100, 100, 128]]])
    expected = canvas.copy()
    expected[0] = [[55, 60, 65, 255], [133, 100, 83, 192], [100, 100, 100, 128]]
    np.testing.assert_array_equal(fill.composite(canvas, layer, Box(0, 0, 3, 1)), expected)


def test_composite_at_an_offset():
    canvas = np.zeros((3, 4, 4), np.uint8)
    layer = u8([[[9, 9, 9, 255], [5, 5, 5, 0]]])
    expected = canvas.copy()
    expected[2, 1] = [9, 9, 9, 255]
    np.testing.assert_array_equal(fill.composite(canvas, layer, Box(1, 2, 2, 1)), expected)


@quick
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 8), width=st.integers(1, 8), data=st.data())
def test_composite_is_exact_where_alpha_is_0_or_255(seed, height, width, data):
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    canvas[..., 3] = rng.choice([0, 0, 255, 17, 200], size=(height, width))
    box_width = data.draw(st.integers(1, width))
    box_height = data.draw(st.integers(1, height))
    box_x = data.draw(st.integers(0, width - box_width))
    box_y = data.draw(st.integers(0, height - box_height))
    box = Box(box_x, box_y, box_width, box_height)
    layer = rng.integers(0, 256, size=(box_height, box_width, 4), dtype=np.uint8)
    layer[..., 3] = rng.choice([0, 255, 1, 128, 254], size=(box_height, box_width))

    result = fill.composite(canvas, layer, box)

    layer_alpha = np.zeros((height, width), np.int16) - 1  # -1 marks pixels outside the box
    layer_alpha[box.slices] = layer[..., 3]
    untouched = layer_alpha <= 0
    np.testing.assert_array_equal(result[untouched], canvas[untouched])
    np.testing.assert_array_equal(result[box.slices][layer[..., 3] == 255], layer[layer[..., 3] == 255])
    assert (result[..., 3] >= canvas[..., 3]).all()


def test_composite_rejects_bad_boxes_and_shapes():
    canvas = np.zeros((4, 4, 4), np.uint8)
    layer = np.zeros((2, 2, 4), np.uint8)
    for box in [Box(3, 0, 2, 2), Box(-1, 0, 2, 2), Box(0, 3, 2, 2)]:
        with pytest.raises(ValueError, match="not inside"):
            fill.composite(canvas, layer, box)
    with pytest.raises(ValueError, match="does not fit"):
        fill.composite(canvas, layer, Box(0, 0, 3, 2))
    with pytest.raises(ValueError, match="canvas"):
        fill.composite(np.zeros((4, 4, 3), np.uint8), layer, Box(0, 0, 2, 2))


def test_expand_canvas_table():
    canvas, selection = fill.expand_canvas(u8([[[1, 2, 3, 4]]]), left=1, bottom=1)
    np.testing.assert_array_equal(canvas, u8([[[0, 0, 0, 0], [1, 2, 3, 4]], [[0, 0, 0, 0], [0, 0, 0, 0]]]))
    np.testing.assert_array_equal(selection, u8([[255, 0], [255, 255]]))


@pytest.mark.parametrize(
    "margins", [{}, {"left": 3}, {"right": 1, "top": 2}, {"left": 1, "right": 2, "top": 3, "bottom": 4}]
)
def test_expand_canvas_round_trip(margins):
    image = np.random.default_rng(5).integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    canvas, selection = fill.expand_canvas(image, **margins)
    original = Box(margins.get("left", 0), margins.get("top", 0), 5, 3)
    assert canvas.shape == (3 + original.y + margins.get("bottom", 0), 5 + original.x + margins.get("right", 0), 4)
    np.testing.assert_array_equal(fill.crop(canvas, original), image)
    np.testing.assert_array_equal(fill.crop(selection, original), np.zeros((3, 5), np.uint8))
    assert (canvas[selection == 255] == 0).all()
    assert np.count_nonzero(selection) == selection.size - 15
    # Pasting a fully opaque fill over the new margins keeps the original bit-identical.
    fill_layer = np.full(canvas.shape, 255, np.uint8)
    fill_layer[selection == 0] = 0
    whole = Box(0, 0, canvas.shape[1], canvas.shape[0])
    np.testing.assert_array_equal(fill.crop(fill.composite(canvas, fill_layer, whole), original), image)


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_expand_canvas_rejects_negative_margins(side):
    with pytest.raises(ValueError, match=side):
        fill.expand_canvas(np.zeros((2, 2, 4), np.uint8), **{side: -1})


def test_crop_and_paste_copy():
    canvas = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    box = Box(1, 2, 3, 2)
    patch = fill.crop(canvas, box)
    np.testing.assert_array_equal(patch, canvas[2:4, 1:4])
    patch[:] = 0
    assert canvas[2, 1, 0] != 0
    pasted = fill.paste(canvas, patch, box)
    expected = canvas.copy()
    expected[2:4, 1:4] = 0
    np.testing.assert_array_equal(pasted, expected)
    np.testing.assert_array_equal(fill.paste(canvas, fill.crop(canvas, box), box), canvas)


def test_crop_and_paste_reject_bad_values():
    canvas = np.zeros((4, 4), np.uint8)
    for box in [Box(0, 0, 5, 1), Box(2, 2, 0, 1), Box(0, -1, 1, 1), (0, 0, 1)]:
        with pytest.raises(ValueError, match="box"):
            fill.crop(canvas, box)
    with pytest.raises(ValueError, match="does not fit"):
        fill.paste(canvas, np.zeros((2, 2), np.uint8), Box(0, 0, 2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        fill.paste(canvas, np.zeros((2, 2), np.float32), Box(0, 0, 2, 2))
