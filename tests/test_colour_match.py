"""Colour matching on photographs: statistics exact to float64, measured in parts or whole."""

from __future__ import annotations

import numpy as np
import pytest
from genfill import fill

skimage_data = pytest.importorskip("skimage.data")

# sRGB primaries and D65 white point (IEC 61966-2-1), CIELAB by its CIE definition: a float64
# reference written apart from fill's float32 conversion.
LINEAR_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
WHITE_XYZ = LINEAR_RGB_TO_XYZ.sum(axis=1)


def lab64(pixels: np.ndarray) -> np.ndarray:
    """``(N, 3)`` uint8 sRGB to ``(N, 3)`` float64 CIELAB."""
    encoded = pixels / 255.0
    linear = np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)
    xyz = linear @ LINEAR_RGB_TO_XYZ.T / WHITE_XYZ
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def reference_transform(generated: np.ndarray, original: np.ndarray, known: np.ndarray) -> fill.ColourTransform:
    generated_lab, original_lab = lab64(generated[known]), lab64(original[known])
    ratio = np.clip(original_lab.std(axis=0) / generated_lab.std(axis=0), 0.5, 2.0)
    return fill.ColourTransform(
        generated_lab.mean(axis=0).astype(np.float32), ratio.astype(np.float32), original_lab.mean(axis=0).astype(np.float32)
    )


def photograph(name: str, long_side: int) -> np.ndarray:
    image = np.ascontiguousarray(getattr(skimage_data, name)()[:, :, :3])
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    return fill.resize(image, fill.Size(round(width * scale), round(height * scale)))


def centre_hole(image: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` bool known pixels: all but a centred box half the image's sides."""
    height, width = image.shape[:2]
    known = np.ones((height, width), bool)
    known[height // 4 : height * 3 // 4, width // 4 : width * 3 // 4] = False
    return known


def drifted(image: np.ndarray, kind: str) -> np.ndarray:
    """``image`` as a diffusion result might come back: tinted, noisy, darker, or other content."""
    values = image.astype(np.float32)
    if kind == "cast":
        values = values * [1.1, 0.95, 0.9] + [10, -5, 8]
    elif kind == "noise":
        values = values + np.random.default_rng(0).normal(0, 12, values.shape)
    elif kind == "gamma":
        values = 255 * (values / 255) ** 1.3
    else:
        values = np.roll(values, (37, 91), (0, 1))[:, ::-1] * 0.9 + 20
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "retina", "hubble_deep_field"])
@pytest.mark.parametrize("long_side", [512, 1024])
@pytest.mark.parametrize("kind", ["cast", "noise", "gamma", "other"])
def test_match_colour_is_within_one_level_of_float64_statistics(name, long_side, kind):
    original = photograph(name, long_side)
    known = centre_hole(original)
    generated = drifted(original, kind)
    expected = fill.apply_colour_transform(generated, reference_transform(generated, original, known))
    matched = fill.match_colour(generated, original, known)
    assert np.abs(matched.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("name", ["astronaut", "retina"])
def test_colour_statistics_of_row_parts_merge_to_those_of_the_whole(name):
    image = photograph(name, 1024)
    known = centre_hole(image)
    whole = fill.colour_statistics(image, known)
    parts = [fill.colour_statistics(image[rows], known[rows]) for rows in (slice(0, 301), slice(301, 700), slice(700, None))]
    merged = fill.merge_statistics(parts)
    reference = lab64(image[known])
    assert merged.count == whole.count == np.count_nonzero(known)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-9, atol=1e-9)
    # The parts fall into other chunks, whose float32 squared deviations round differently.
    np.testing.assert_allclose(merged.std, whole.std, rtol=1e-6)
    np.testing.assert_allclose(whole.mean, reference.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(whole.std, reference.std(axis=0), rtol=1e-5)


def test_colour_statistics_of_a_flat_image_have_no_spread():
    image = np.full((200, 300, 3), (90, 140, 200), np.uint8)
    statistics = fill.colour_statistics(image, np.ones((200, 300), bool))
    assert statistics.count == 200 * 300
    np.testing.assert_array_equal(statistics.squares, 0)


def test_merge_of_no_pixels_is_empty():
    empty = fill.colour_statistics(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool))
    assert empty.count == 0
    assert fill.merge_statistics([empty, empty]).count == 0


def test_apply_colour_transform_on_row_parts_equals_the_whole():
    image = photograph("astronaut", 512)
    transform = fill.ColourTransform(
        np.array([50, 3, -4], np.float32), np.array([1.2, 0.8, 1.5], np.float32), np.array([55, -2, 6], np.float32)
    )
    whole = fill.apply_colour_transform(image, transform)
    parts = [fill.apply_colour_transform(image[rows], transform) for rows in (slice(0, 257), slice(257, None))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(whole, image)
