"""Fill geometry: crop, scale, mask and composite math for generative fill, in pure numpy.

Both the server and the SDK import this module, so it depends on numpy and the standard
library only (no torch, Pillow, Qt or websockets).

Vocabulary used throughout:

canvas
    The whole user image, ``(H, W, 4)`` uint8 RGBA unless a function says otherwise.
selection
    An ``(H, W)`` uint8 mask the size of the canvas: 0 keeps a pixel, 255 replaces it, and
    values in between replace it partially (a soft selection, e.g. a feathered edge).
mask box
    The bounding :class:`Box` of the selection's nonzero pixels.
context box
    The :class:`Box` cropped from the canvas for the engine to see: the mask box plus enough
    surroundings for the model to continue them (see :func:`context_box`).
layer
    An ``(h, w, 4)`` uint8 RGBA result the size of a box, placed at the box's offset in
    canvas coordinates, the way an editor holds a pasted layer.

Boxes and sizes are in pixels, ``x`` to the right and ``y`` down; arrays are indexed
``[row, column]``, so ``array[box.slices]`` is the box's content.

The pipeline (DESIGN.md, "The fill pipeline"): :func:`context_box` picks the crop,
:func:`target_size` and :func:`resize` move it to the model's resolution and back,
:func:`denoise_mask` says where the engine may change pixels, :func:`match_colour` matches the
result to the untouched context, and :func:`compositing_mask`, :func:`make_layer` and
:func:`composite` paste it so that unselected pixels stay bit-identical.
"""

from __future__ import annotations

import math
from typing import NamedTuple, TypeGuard

import numpy as np

__all__ = [
    "Box",
    "EmptyMaskError",
    "Size",
    "blur",
    "composite",
    "compositing_mask",
    "context_box",
    "crop",
    "denoise_mask",
    "expand_canvas",
    "grow",
    "make_layer",
    "mask_box",
    "match_colour",
    "paste",
    "resize",
    "shrink",
    "target_size",
]


class Size(NamedTuple):
    """A width and height in pixels."""

    width: int
    height: int


class Box(NamedTuple):
    """An axis-aligned rectangle in canvas pixels: top-left corner, then extent.

    ``right`` and ``bottom`` are exclusive, as in Python slices.
    """

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height

    @property
    def size(self) -> Size:
        return Size(self.width, self.height)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices, so that ``array[box.slices]`` is the box's content."""
        return slice(self.y, self.bottom), slice(self.x, self.right)


class EmptyMaskError(ValueError):
    """The selection has no nonzero pixel, so there is nothing to fill."""


# --- validation -------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_non_negative_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_array(name: str, array: object) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim < 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be at least 1x1 pixels, got shape {array.shape}")
    return array


def _check_mask(name: str, mask: object) -> np.ndarray:
    mask = _check_array(name, mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"{name} must be an (H, W) uint8 array, got shape {mask.shape} dtype {mask.dtype}")
    return mask


def _check_image(name: str, image: object, channels: int) -> np.ndarray:
    image = _check_array(name, image)
    if image.ndim != 3 or image.shape[2] != channels or image.dtype != np.uint8:
        raise ValueError(
            f"{name} must be an (H, W, {channels}) uint8 array, got shape {image.shape} dtype {image.dtype}"
        )
    return image


def _check_size(name: str, size: object) -> Size:
    if not isinstance(size, tuple) or len(size) != 2 or not all(_is_int(side) and side >= 1 for side in size):
        raise ValueError(f"{name} must be a Size of two ints >= 1, got {size!r}")
    return Size(int(size[0]), int(size[1]))


def _check_box_inside(name: str, box: object, shape: tuple[int, ...]) -> Box:
    if not isinstance(box, tuple) or len(box) != 4 or not all(_is_int(field) for field in box):
        raise ValueError(f"{name} must be a Box of four ints, got {box!r}")
    box = Box(*(int(field) for field in box))
    height, width = shape[:2]
    if box.width < 1 or box.height < 1:
        raise ValueError(f"{name} must be at least 1x1 pixels, got {box!r}")
    if box.x < 0 or box.y < 0 or box.right > width or box.bottom > height:
        raise ValueError(f"{name} {box!r} is not inside the {width}x{height} canvas")
    return box


# --- boxes ------------------------------------------------------------------------------


def mask_box(selection: np.ndarray) -> Box:
    """Returns the mask box: the bounding box of the selection's nonzero pixels.

    Args:
        selection: ``(H, W)`` uint8, 0..255.

    Returns:
        The smallest :class:`Box` holding every nonzero pixel.

    Raises:
        EmptyMaskError: no pixel of ``selection`` is nonzero.
        ValueError: ``selection`` is not an ``(H, W)`` uint8 array.
    """
    selection = _check_mask("selection", selection)
    rows = np.flatnonzero(selection.any(axis=1))
    if rows.size == 0:
        raise EmptyMaskError(f"selection of shape {selection.shape} has no nonzero pixel")
    columns = np.flatnonzero(selection.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(columns[0]), int(columns[-1]) + 1
    return Box(left, top, right - left, bottom - top)


def context_box(selection: np.ndarray, *, native_size: int | None = None, multiple: int = 8) -> Box:
    """Returns the context box: the crop of the canvas the engine sees for this selection.

    The mask box is grown on every side by ``max(canvas long side / 16, mean of the mask box's
    width and height / 2)`` (rounded up), so the model sees enough surroundings to continue
    them. Then, each step only where the canvas is large enough:

    1. each side is at least ``native_size``, because models fill poorly below their native
       resolution and a larger context costs nothing extra once scaled to it;
    2. the shorter side grows toward the longer one (near square), for the same reason;
    3. each side is rounded up to a multiple of ``multiple``; a canvas side too small for
       that is used whole.

    The box is centred on the mask box, and shifted inward where it would cross the canvas
    edge; it shrinks only where it is larger than the canvas. The result always contains the
    mask box and lies inside the canvas. Its size follows the mask, not the canvas, except for
    the ``canvas long side / 16`` margin.

    Args:
        selection: ``(H, W)`` uint8, 0..255, the size of the canvas.
        native_size: the model's native side in pixels, e.g. 512 or 1024; ``None`` sets no
            minimum.
        multiple: the box's sides are multiples of this (8 for latent diffusion), where the
            canvas allows.

    Returns:
        The context :class:`Box`, in canvas pixels.

    Raises:
        EmptyMaskError: no pixel of ``selection`` is nonzero.
        ValueError: ``selection`` is not ``(H, W)`` uint8, or ``native_size`` or ``multiple``
            is not an int >= 1.
    """
    selection = _check_mask("selection", selection)
    if native_size is not None:
        native_size = _check_positive_int("native_size", native_size)
    multiple = _check_positive_int("multiple", multiple)
    canvas_height, canvas_width = selection.shape
    inner = mask_box(selection)

    margin = math.ceil(max(max(canvas_width, canvas_height) / 16, (inner.width + inner.height) / 4))
    width = min(inner.width + 2 * margin, canvas_width)
    height = min(inner.height + 2 * margin, canvas_height)
    if native_size is not None:
        width = max(width, min(native_size, canvas_width))
        height = max(height, min(native_size, canvas_height))
    longer = max(width, height)
    width = max(width, min(longer, canvas_width))
    height = max(height, min(longer, canvas_height))
    width = _round_up_within(width, multiple, canvas_width)
    height = _round_up_within(height, multiple, canvas_height)

    x = _centre_inside(inner.x, inner.width, width, canvas_width)
    y = _centre_inside(inner.y, inner.height, height, canvas_height)
    return Box(x, y, width, height)


def _round_up_within(length: int, multiple: int, limit: int) -> int:
    rounded = -(-length // multiple) * multiple
    return rounded if rounded <= limit else limit


def _centre_inside(inner_start: int, inner_length: int, length: int, limit: int) -> int:
    # Floor division keeps the inner span covered for odd differences; the clamp then shifts
    # the span inward, which keeps covering it because length >= inner_length.
    start = inner_start + (inner_length - length) // 2
    return min(max(start, 0), limit - length)


def target_size(size: Size, native_size: int, multiple: int = 8) -> Size:
    """Returns the size to process a context of ``size`` at: the model's resolution band.

    The aspect ratio is kept and the area is about ``native_size ** 2``, so small contexts are
    scaled up (a 100 px selection is not diffused at 100 px) and large ones down.

    Args:
        size: the context's size in pixels.
        native_size: the model's native side in pixels, e.g. 512 for SD 1.5, 1024 for SDXL.
        multiple: each side of the result is a multiple of this, and at least this.

    Returns:
        A :class:`Size` whose sides are multiples of ``multiple``.

    Raises:
        ValueError: ``size`` has a side < 1, or ``native_size`` or ``multiple`` is not an
            int >= 1.
    """
    size = _check_size("size", size)
    native_size = _check_positive_int("native_size", native_size)
    multiple = _check_positive_int("multiple", multiple)
    scale = native_size / math.sqrt(size.width * size.height)

    def snap(side: int) -> int:
        return max(multiple, round(side * scale / multiple) * multiple)

    return Size(snap(size.width), snap(size.height))


# --- resampling -------------------------------------------------------------------------


def resize(image: np.ndarray, size: Size) -> np.ndarray:
    """Returns ``image`` resampled to ``size`` with an antialiased bilinear filter.

    The filter is a triangle whose support widens by the scale factor when downscaling, the
    same taps and weights as Pillow's ``BILINEAR``, so downscaling averages every source pixel
    instead of skipping some. Edge taps that fall outside the image are dropped and the
    remaining weights renormalized. Channels are resampled independently: premultiply RGBA by
    its alpha first if transparent pixels hold colours that must not bleed.

    Args:
        image: ``(H, W)`` or ``(H, W, C)``, uint8 (0..255) or float32 (any range).
        size: the output size in pixels.

    Returns:
        A new ``(size.height, size.width[, C])`` array of the same dtype; uint8 results are
        rounded and clipped to 0..255. An exact copy when ``size`` is the input's size.

    Raises:
        ValueError: ``image`` has another shape or dtype, or ``size`` has a side < 1.
    """
    image = _check_array("image", image)
    if image.ndim not in (2, 3) or image.dtype not in (np.uint8, np.float32):
        raise ValueError(
            f"image must be (H, W) or (H, W, C), uint8 or float32, got shape {image.shape} dtype {image.dtype}"
        )
    size = _check_size("size", size)
    height, width = image.shape[:2]
    if (size.width, size.height) == (width, height):
        return image.copy()

    result = image.astype(np.float32)
    # Shrinking first along the axis that loses the most keeps the second pass small.
    axes = [(0, height, size.height), (1, width, size.width)]
    axes.sort(key=lambda axis: axis[2] / axis[1])
    for axis, in_length, out_length in axes:
        if in_length != out_length:
            result = _resample_axis(result, axis, *_bilinear_taps(in_length, out_length))

    if image.dtype == np.uint8:
        return _to_uint8(result)
    return result


def _to_uint8(values: np.ndarray) -> np.ndarray:
    # In place: on megapixel images, fresh temporaries cost more than the arithmetic.
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def _bilinear_taps(in_length: int, out_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel, the source indices and normalized weights: two ``(out, taps)`` arrays."""
    scale = in_length / out_length
    filter_scale = max(scale, 1.0)
    support = filter_scale
    centres = (np.arange(out_length) + 0.5) * scale
    # Truncation, not floor, in the tap range matches Pillow's ImagingResample, so the two agree.
    first = np.maximum(np.trunc(centres - support + 0.5), 0).astype(np.int64)
    end = np.minimum(np.trunc(centres + support + 0.5), in_length).astype(np.int64)
    tap_count = int(math.ceil(support)) * 2 + 1
    indices = first[:, None] + np.arange(tap_count)
    weights = np.maximum(0.0, 1.0 - np.abs((indices + 0.5 - centres[:, None]) / filter_scale))
    weights[indices >= end[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    used = weights.any(axis=0)
    return np.minimum(indices, in_length - 1)[:, used], weights[:, used].astype(np.float32)


def _resample_axis(image: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    broadcast = [1] * image.ndim
    broadcast[axis] = -1
    result: np.ndarray | None = None
    for tap in range(indices.shape[1]):
        term = np.take(image, indices[:, tap], axis=axis)
        term *= weights[:, tap].reshape(broadcast)
        if result is None:
            result = term
        else:
            result += term
    assert result is not None, "indices has at least one tap"
    return result


# --- morphology -------------------------------------------------------------------------


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """Returns ``mask`` dilated by ``px`` pixels: the maximum over a ``(2 px + 1)`` square.

    A square rather than a disc because it is separable and costs O(log px) array passes; the
    feathering that usually follows rounds its corners. Pixels outside the array count as 0.

    Args:
        mask: ``(H, W)`` uint8, 0..255.
        px: the reach in pixels, >= 0; 0 returns a copy.

    Returns:
        A new ``(H, W)`` uint8 array, >= ``mask`` everywhere.

    Raises:
        ValueError: ``mask`` is not ``(H, W)`` uint8, or ``px`` is not an int >= 0.
    """
    mask = _check_mask("mask", mask)
    px = _check_non_negative_int("px", px)
    return _square_filter(mask, px, np.maximum, outside=0)


def shrink(mask: np.ndarray, px: int) -> np.ndarray:
    """Returns ``mask`` eroded by ``px`` pixels: the minimum over a ``(2 px + 1)`` square.

    Pixels outside the array count as 255, so the canvas border does not erode: a selection
    that touches the canvas edge stays opaque at that edge, where there is nothing to blend
    with.

    Args:
        mask: ``(H, W)`` uint8, 0..255.
        px: the reach in pixels, >= 0; 0 returns a copy.

    Returns:
        A new ``(H, W)`` uint8 array, <= ``mask`` everywhere.

    Raises:
        ValueError: ``mask`` is not ``(H, W)`` uint8, or ``px`` is not an int >= 0.
    """
    mask = _check_mask("mask", mask)
    px = _check_non_negative_int("px", px)
    return _square_filter(mask, px, np.minimum, outside=255)


def _square_filter(array: np.ndarray, radius: int, reduce: np.ufunc, outside: int) -> np.ndarray:
    if radius == 0:
        return array.copy()
    return _window_reduce(_window_reduce(array, radius, 0, reduce, outside), radius, 1, reduce, outside)


def _window_reduce(array: np.ndarray, radius: int, axis: int, reduce: np.ufunc, outside: int) -> np.ndarray:
    """``reduce`` over a centred window of ``2 radius + 1`` along ``axis``, in O(log radius) passes.

    Windows of doubling length are built first; any window is then the union of two
    overlapping power-of-two windows, which is exact for max and min.
    """
    moved = np.moveaxis(array, axis, 0)
    length = moved.shape[0]
    window = 2 * radius + 1
    border = np.full((radius,) + moved.shape[1:], outside, dtype=array.dtype)
    spans = np.concatenate([border, moved, border])
    span = 1
    while span * 2 <= window:
        spans = reduce(spans[:-span], spans[span:])
        span *= 2
    result = reduce(spans[:length], spans[window - span : window - span + length])
    return np.ascontiguousarray(np.moveaxis(result, 0, axis))


def blur(mask: np.ndarray, px: int) -> np.ndarray:
    """Returns ``mask`` blurred by an approximate Gaussian reaching ``px`` pixels.

    Three box filters per axis whose radii add up to ``px``: each output pixel depends only on
    input pixels within ``px`` rows and columns, and the kernel's standard deviation is about
    ``px / 3`` (a little more for small ``px``: 1.4 at 3). Edges are replicated, so the canvas
    border does not fade.

    Args:
        mask: ``(H, W)``, uint8 (0..255) or float32.
        px: the reach in pixels, >= 0; 0 returns a copy.

    Returns:
        A new ``(H, W)`` array of the input's dtype; uint8 results are rounded.

    Raises:
        ValueError: ``mask`` is not an ``(H, W)`` uint8 or float32 array, or ``px`` is not an
            int >= 0.
    """
    mask = _check_array("mask", mask)
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.float32):
        raise ValueError(f"mask must be an (H, W) uint8 or float32 array, got shape {mask.shape} dtype {mask.dtype}")
    px = _check_non_negative_int("px", px)
    if px == 0:
        return mask.copy()
    radii = [px // 3 + 1] * (px % 3) + [px // 3] * (3 - px % 3)
    result = mask.astype(np.float64)
    for axis in (0, 1):
        for radius in radii:
            if radius:
                result = _box_mean(result, radius, axis)
    if mask.dtype == np.uint8:
        return _to_uint8(result)
    return result.astype(np.float32)


def _box_mean(array: np.ndarray, radius: int, axis: int) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius + 1, radius)
    # Running sums in the padded copy itself, and the mean in the difference's own buffer:
    # each new array of this size costs a first touch of every page, which at 512 px was more
    # than the arithmetic.
    sums = np.pad(array, pad, mode="edge")
    if axis == 0:
        # Row by row: the same additions in the same order as ``np.cumsum(axis=0)``, so the
        # same bits, but each is one vectorized pass over a row (numpy's cumsum down columns
        # of a C-ordered array runs several times slower).
        for row in range(1, sums.shape[0]):
            np.add(sums[row - 1], sums[row], out=sums[row])
    else:
        np.cumsum(sums, axis=axis, out=sums)
    window = 2 * radius + 1
    upper = [slice(None), slice(None)]
    lower = [slice(None), slice(None)]
    upper[axis] = slice(window, None)
    lower[axis] = slice(None, -window)
    means = np.subtract(sums[tuple(upper)], sums[tuple(lower)])
    means /= window
    return means


# --- the three masks --------------------------------------------------------------------


def denoise_mask(selection: np.ndarray, *, grow_px: int, feather_px: int) -> np.ndarray:
    """Returns where the engine may change pixels: the selection grown, then feathered.

    Growing lets the model rework a seam slightly wider than the selection, and feathering
    makes it fade into the untouched surroundings; the compositing mask later keeps every
    change outside the selection out of the result. Soft values stay soft: they are passed to
    the engine as partial denoising strength rather than binarized.

    Args:
        selection: ``(H, W)`` uint8, 0..255.
        grow_px: dilation in pixels, >= 0 (see :func:`grow`).
        feather_px: blur reach in pixels, >= 0 (see :func:`blur`).

    Returns:
        A new ``(H, W)`` uint8 array: >= ``selection`` everywhere (255 wherever it is 255),
        and 0 beyond ``grow_px + feather_px`` pixels from any selected pixel.

    Raises:
        ValueError: ``selection`` is not ``(H, W)`` uint8, or ``grow_px`` or ``feather_px``
            is not an int >= 0.
    """
    selection = _check_mask("selection", selection)
    grow_px = _check_non_negative_int("grow_px", grow_px)
    feather_px = _check_non_negative_int("feather_px", feather_px)
    out = np.zeros_like(selection)
    try:
        box = mask_box(selection)
    except EmptyMaskError:
        return out
    # Every pixel further than ``grow_px + feather_px`` from the selection is 0 after growing
    # and after each blur pass, so the work is done on the box that reaches that far plus one
    # row and column of zeros: edge replication there repeats zeros, running sums start after
    # exact zeros, and the result is the same, bit for bit, as on the whole array.
    reach = grow_px + feather_px + 1
    height, width = selection.shape
    top, left = max(box.y - reach, 0), max(box.x - reach, 0)
    bottom, right = min(box.bottom + reach, height), min(box.right + reach, width)
    inner = selection[top:bottom, left:right]
    out[top:bottom, left:right] = np.maximum(blur(grow(inner, grow_px), feather_px), inner)
    return out


def compositing_mask(selection: np.ndarray, *, blend_px: int) -> np.ndarray:
    """Returns the alpha the engine's result is pasted with.

    Inside the selection the alpha ramps linearly from its border to 255 over ``blend_px``
    pixels (a pixel ``k`` pixels deep, 1 on the border, gets ``255 k / blend_px``), so the
    pasted result fades into the original only where the user allowed change; outside it is
    0, so unselected pixels are never changed. The canvas border is not a selection border:
    no ramp runs along it.

    The ramp shrinks to fit where a part of the selection is thinner than ``2 blend_px``: its
    innermost pixels still reach 255, so a 1-pixel dot or a 2-pixel line is replaced fully.
    This is decided per connected part, so a thin stroke beside a large area keeps its full
    replacement. Distances are in the square (chessboard) metric, matching :func:`shrink`.

    Args:
        selection: ``(H, W)`` uint8, 0..255; soft values are kept as an upper bound.
        blend_px: the ramp's width in pixels, >= 0; 0 returns a copy of ``selection``.

    Returns:
        A new ``(H, W)`` uint8 array, <= ``selection`` everywhere, and equal to it at pixels at
        least ``blend_px`` pixels inside the selection (255 in a hard selection's core).

    Raises:
        ValueError: ``selection`` is not ``(H, W)`` uint8, or ``blend_px`` is not an int >= 0.
    """
    selection = _check_mask("selection", selection)
    blend_px = _check_non_negative_int("blend_px", blend_px)
    if blend_px == 0 or not selection.any():
        return selection.copy()

    # Work on the mask box plus a 1-pixel ring: the ring is unselected wherever the box does not
    # touch the canvas edge, so the result does not depend on what lies beyond it.
    inner = mask_box(selection)
    rows = slice(max(inner.y - 1, 0), min(inner.bottom + 1, selection.shape[0]))
    columns = slice(max(inner.x - 1, 0), min(inner.right + 1, selection.shape[1]))
    region = selection[rows, columns]
    inside = region > 0

    depth_type = np.min_scalar_type(blend_px)
    depth = _inner_depth(inside, blend_px, depth_type)
    reachable_depth = _deepest_nearby(depth, inside, blend_px - 1)
    ramp_width = np.minimum(reachable_depth, blend_px).astype(np.int32)
    ramp_width[~inside] = 1
    ramp = (255 * depth.astype(np.int32) + ramp_width // 2) // ramp_width
    ramp = np.minimum(ramp, 255).astype(np.uint8)

    result = np.zeros_like(selection)
    result[rows, columns] = np.minimum(region, ramp)
    return result


def _inner_depth(inside: np.ndarray, limit: int, dtype: np.dtype) -> np.ndarray:
    """Per pixel, the chessboard distance to the nearest outside pixel (1 on the border), capped at ``limit``.

    Pixels beyond the array count as inside, so the canvas edge adds no depth limit.
    """
    depth = inside.astype(dtype)
    remaining = inside
    for _ in range(limit - 1):
        remaining = _square_filter(remaining, 1, np.minimum, outside=True)
        if not remaining.any():
            break
        depth += remaining
    return depth


def _deepest_nearby(depth: np.ndarray, inside: np.ndarray, steps: int) -> np.ndarray:
    """Per inside pixel, the largest depth reachable in ``steps`` 8-connected steps without leaving ``inside``.

    Reach is measured along the selection, not across gaps, so a thin stroke is not made to
    fade because a large area lies a few pixels away.
    """
    reach = depth
    for _ in range(steps):
        wider = _square_filter(reach, 1, np.maximum, outside=0)
        wider[~inside] = 0
        if np.array_equal(wider, reach):
            break
        reach = wider
    return reach


# --- colour -----------------------------------------------------------------------------

# sRGB primaries with the D65 white point (IEC 61966-2-1). CIELAB divides XYZ by the white
# point (the matrix's row sums), folded into the matrices here.
_LINEAR_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE_XYZ = _LINEAR_RGB_TO_XYZ.sum(axis=1)
_LINEAR_RGB_TO_WHITE_XYZ = (_LINEAR_RGB_TO_XYZ / _WHITE_XYZ[:, None]).astype(np.float32)
_WHITE_XYZ_TO_LINEAR_RGB = (np.linalg.inv(_LINEAR_RGB_TO_XYZ) * _WHITE_XYZ[None, :]).astype(np.float32)
_LAB_EPSILON = 6 / 29
_SRGB_LEVELS = np.arange(256) / 255
_SRGB_DECODE = np.where(
    _SRGB_LEVELS <= 0.04045, _SRGB_LEVELS / 12.92, ((_SRGB_LEVELS + 0.055) / 1.055) ** 2.4
).astype(np.float32)
_STD_RATIO_RANGE = (0.5, 2.0)
_MIN_KNOWN_PIXELS = 16
_CHUNK_PIXELS = 1 << 14
"""Colour conversions run on this many pixels at a time, so that their float32 temporaries
(about 200 KB each) stay in a core's cache instead of streaming through memory."""


class ColourTransform(NamedTuple):
    """A per-channel CIELAB transform: ``(lab - shift_from) * scale + shift_to``; each field
    holds 3 float32 numbers, L, a and b."""

    shift_from: np.ndarray
    scale: np.ndarray
    shift_to: np.ndarray


class ColourStatistics(NamedTuple):
    """CIELAB moments of a set of pixels: their number, and per channel (L, a, b; float64) their
    mean and the sum of their squared deviations from it, so that the statistics of disjoint
    parts merge exactly (:func:`merge_statistics`)."""

    count: int  # type: ignore[assignment]  # shadows tuple.count, which nothing calls
    mean: np.ndarray
    squares: np.ndarray

    @property
    def std(self) -> np.ndarray:
        """The population standard deviation per channel; 0 where ``count`` is 0."""
        return np.sqrt(self.squares / max(self.count, 1))


def match_colour(generated: np.ndarray, original: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Returns ``generated`` with its colour statistics matched to ``original`` over ``known``.

    Diffusion results often drift in brightness or tint from their surroundings. In CIELAB,
    each channel of ``generated`` is shifted and scaled so that its mean and standard deviation
    over the ``known`` pixels equal those of ``original`` there; the same transform then applies
    to the whole image, filled area included. The scale is clamped to ``[0.5, 2]`` so that a
    flat known area cannot blow up or flatten the fill.

    The same as ``apply_colour_transform(generated, colour_transform(generated, original,
    known))``; the two steps apart let a caller measure at one resolution and apply to
    another, or to a part of the image only.

    Args:
        generated: ``(H, W, 3)`` uint8 sRGB, the engine's result for the context box.
        original: ``(H, W, 3)`` uint8 sRGB, the context box before filling.
        known: ``(H, W)`` bool, pixels where both should agree: the unselected context.

    Returns:
        A new ``(H, W, 3)`` uint8 sRGB array; a copy of ``generated`` if fewer than 16 pixels
        are known.

    Raises:
        ValueError: an argument has another shape or dtype, or the shapes disagree.
    """
    transform = colour_transform(generated, original, known)
    if transform is None:
        return np.array(generated, copy=True)
    return apply_colour_transform(generated, transform)


def colour_statistics(image: np.ndarray, known: np.ndarray) -> ColourStatistics:
    """The CIELAB statistics of ``image`` (``(H, W, 3)`` uint8 sRGB) over ``known`` (``(H, W)``
    bool): what :func:`colour_transform` measures of each image. Measured ahead (of the
    original while the engine runs) or in parts (rows apart, then merged with
    :func:`merge_statistics`), they are passed to it as ``original_statistics`` and
    ``generated_statistics``."""
    image = _check_image("image", image, 3)
    known = _check_array("known", known)
    if known.ndim != 2 or known.dtype != np.bool_ or known.shape != image.shape[:2]:
        raise ValueError(f"known must be an (H, W) bool array the image's size, got {known.shape} {known.dtype}")
    return _lab_statistics(image, known)


def merge_statistics(parts: list[ColourStatistics]) -> ColourStatistics:
    """The statistics of the union of disjoint pixel sets, from those of each set (Chan,
    Golub and LeVeque's pairwise update of the sum of squared deviations)."""
    count, mean, squares = 0, np.zeros(3), np.zeros(3)
    for part in parts:
        if part.count == 0:
            continue
        total = count + part.count
        delta = part.mean - mean
        mean = mean + delta * (part.count / total)
        squares = squares + part.squares + delta * delta * (count * part.count / total)
        count = total
    return ColourStatistics(count, mean, squares)


def _lab_statistics(image: np.ndarray, known: np.ndarray) -> ColourStatistics:
    pixels = image.reshape(-1, 3)
    flags = known.reshape(-1)
    parts = []
    for start in range(0, len(flags), _CHUNK_PIXELS):
        # ``compress`` gathers whole pixels three times faster than boolean indexing does.
        chunk = np.compress(flags[start : start + _CHUNK_PIXELS], pixels[start : start + _CHUNK_PIXELS], axis=0)
        if len(chunk) == 0:
            continue
        # Colour planes, (3, N): whole-plane arithmetic beats (N, 3) matrix products here.
        lab = _srgb_to_lab(chunk.T)
        mean = lab.mean(axis=1, dtype=np.float64)
        # Deviations from the chunk's own mean are small, so float32 squares lose nothing that
        # matters; identical values give exactly 0, which keeps flat channels flat.
        lab -= mean.astype(np.float32)[:, None]
        squares = np.array([np.dot(channel, channel) for channel in lab], dtype=np.float64)
        parts.append(ColourStatistics(len(chunk), mean, squares))
    return merge_statistics(parts)


def colour_transform(
    generated: np.ndarray,
    original: np.ndarray,
    known: np.ndarray,
    *,
    original_statistics: ColourStatistics | None = None,
    generated_statistics: ColourStatistics | None = None,
) -> ColourTransform | None:
    """The CIELAB transform :func:`match_colour` applies, measured over the ``known`` pixels;
    ``None`` if fewer than 16 pixels are known. Arguments and errors as ``match_colour``;
    ``original_statistics`` and ``generated_statistics``, if given, are
    ``colour_statistics(original, known)`` and ``colour_statistics(generated, known)``."""
    generated = _check_image("generated", generated, 3)
    original = _check_image("original", original, 3)
    known = _check_array("known", known)
    if known.ndim != 2 or known.dtype != np.bool_:
        raise ValueError(f"known must be an (H, W) bool array, got shape {known.shape} dtype {known.dtype}")
    if original.shape != generated.shape or known.shape != generated.shape[:2]:
        raise ValueError(
            f"shapes disagree: generated {generated.shape}, original {original.shape}, known {known.shape}"
        )
    if np.count_nonzero(known) < _MIN_KNOWN_PIXELS:
        return None
    if generated_statistics is None:
        generated_statistics = _lab_statistics(generated, known)
    if original_statistics is None:
        original_statistics = _lab_statistics(original, known)
    generated_std, original_std = generated_statistics.std, original_statistics.std
    # A channel that is flat in the generated context says nothing about the right scale.
    flat = generated_std < 1e-6
    ratio = np.where(flat, 1.0, original_std / np.where(flat, 1.0, generated_std))
    ratio = np.clip(ratio, *_STD_RATIO_RANGE)
    return ColourTransform(
        generated_statistics.mean.astype(np.float32),
        ratio.astype(np.float32),
        original_statistics.mean.astype(np.float32),
    )


def apply_colour_transform(image: np.ndarray, transform: ColourTransform) -> np.ndarray:
    """Returns ``image`` (``(H, W, 3)`` uint8 sRGB) with ``transform`` applied in CIELAB, as a
    new array of the same shape. Each pixel's result depends on that pixel only, so parts of
    an image can be transformed apart (e.g. side by side) with the same result."""
    image = _check_image("image", image, 3)
    pixels = image.reshape(-1, 3)
    result = np.empty_like(pixels)
    for start in range(0, len(pixels), _CHUNK_PIXELS):
        lab = _srgb_to_lab(pixels[start : start + _CHUNK_PIXELS].T)
        for channel, shift_from, scale, shift_to in zip(lab, *transform):
            channel -= shift_from
            channel *= scale
            channel += shift_to
        result[start : start + _CHUNK_PIXELS] = _lab_to_srgb(lab).T
    return result.reshape(image.shape)


def _srgb_to_lab(planes: np.ndarray) -> np.ndarray:
    """``(3, N)`` uint8 sRGB planes to ``(3, N)`` float32 CIELAB (D65) planes."""
    xyz = _mix(_LINEAR_RGB_TO_WHITE_XYZ, np.take(_SRGB_DECODE, planes))
    f = np.cbrt(xyz)
    dark = xyz <= _LAB_EPSILON**3
    # Dark pixels are few in most images: a boolean scatter, skipped when it has nothing to do.
    if dark.any():
        f[dark] = xyz[dark] / (3 * _LAB_EPSILON**2) + 4 / 29
    lab = xyz
    np.subtract(f[0], f[1], out=lab[1])
    lab[1] *= 500
    np.subtract(f[1], f[2], out=lab[2])
    lab[2] *= 200
    np.multiply(f[1], 116, out=lab[0])
    lab[0] -= 16
    return lab


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """``(3, N)`` float32 CIELAB (D65) planes to ``(3, N)`` uint8 sRGB, clipping out-of-gamut colours."""
    f = np.empty_like(lab)
    f[1] = (lab[0] + 16) / 116
    f[0] = f[1] + lab[1] / 500
    f[2] = f[1] - lab[2] / 200
    xyz = f * f
    xyz *= f
    dark = f <= _LAB_EPSILON
    if dark.any():
        xyz[dark] = 3 * _LAB_EPSILON**2 * (f[dark] - 4 / 29)
    linear = _mix(_WHITE_XYZ_TO_LINEAR_RGB, xyz)
    np.clip(linear, 0.0, 1.0, out=linear)
    encoded = linear ** (1 / 2.4)
    encoded *= 1.055
    encoded -= 0.055
    dark = linear <= 0.0031308
    if dark.any():
        encoded[dark] = 12.92 * linear[dark]
    encoded *= 255
    return _to_uint8(encoded)


def _mix(matrix: np.ndarray, planes: np.ndarray) -> np.ndarray:
    mixed = np.empty_like(planes)
    for row, out in zip(matrix, mixed):
        np.multiply(planes[0], row[0], out=out)
        out += row[1] * planes[1]
        out += row[2] * planes[2]
    return mixed


# --- layers and canvases ----------------------------------------------------------------


def make_layer(generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Returns an RGBA layer from a generated RGB image and its compositing alpha.

    Colour is zeroed where alpha is 0 so a layer never carries hidden pixels (the engine's
    invention outside the selection) to the client or into a saved file.

    Args:
        generated: ``(h, w, 3)`` uint8 RGB.
        alpha: ``(h, w)`` uint8, 0..255, usually from :func:`compositing_mask`.

    Returns:
        A new ``(h, w, 4)`` uint8 RGBA array, not premultiplied.

    Raises:
        ValueError: an argument has another shape or dtype, or the shapes disagree.
    """
    generated = _check_image("generated", generated, 3)
    alpha = _check_mask("alpha", alpha)
    if alpha.shape != generated.shape[:2]:
        raise ValueError(f"shapes disagree: generated {generated.shape}, alpha {alpha.shape}")
    layer = np.concatenate([generated, alpha[:, :, None]], axis=2)
    layer[alpha == 0] = 0
    return layer


def composite(canvas: np.ndarray, layer: np.ndarray, at: Box) -> np.ndarray:
    """Returns a copy of ``canvas`` with ``layer`` pasted over it at ``at``, as an editor would.

    Porter-Duff "over" with straight (not premultiplied) alpha, so it also handles a canvas
    with transparent pixels, such as one grown by :func:`expand_canvas`. Where the layer's
    alpha is 0 the canvas is bit-identical; where it is 255 the layer's RGBA is copied
    exactly; elsewhere results are rounded to the nearest level.

    Args:
        canvas: ``(H, W, 4)`` uint8 RGBA.
        layer: ``(h, w, 4)`` uint8 RGBA, not premultiplied.
        at: where the layer goes, in canvas pixels; its size must be ``(w, h)``.

    Returns:
        A new ``(H, W, 4)`` uint8 RGBA array.

    Raises:
        ValueError: an argument has another shape or dtype, the box's size is not the
            layer's, or the box is not inside the canvas.
    """
    canvas = _check_image("canvas", canvas, 4)
    layer = _check_image("layer", layer, 4)
    at = _check_box_inside("at", at, canvas.shape)
    if layer.shape[:2] != (at.height, at.width):
        raise ValueError(f"layer of shape {layer.shape} does not fit box {at!r}")

    result = canvas.copy()
    target = result[at.slices]
    layer_alpha = layer[..., 3]
    opaque = layer_alpha == 255
    # Only the partly transparent pixels need arithmetic; copying the rest keeps them exact.
    # A masked copy of the opaque ones costs a fraction of a boolean gather and scatter.
    np.copyto(target, layer, where=opaque[..., None])
    partial = (layer_alpha > 0) & ~opaque
    if partial.any():
        target[partial] = _over(layer[partial], target[partial])
    return result


def _over(above: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Porter-Duff "over" of ``(N, 4)`` uint8 straight-alpha RGBA pixels."""
    above = above.astype(np.float64)
    below = below.astype(np.float64)
    above_alpha = above[:, 3:] / 255
    below_alpha = below[:, 3:] / 255 * (1 - above_alpha)
    out_alpha = above_alpha + below_alpha
    colour = (above[:, :3] * above_alpha + below[:, :3] * below_alpha) / np.where(out_alpha > 0, out_alpha, 1)
    return _to_uint8(np.concatenate([colour, out_alpha * 255], axis=1))


def expand_canvas(
    image: np.ndarray, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``image`` on a larger canvas, and the selection of the added margins (outpainting).

    Args:
        image: ``(H, W, 4)`` uint8 RGBA.
        left: pixels to add on the left, >= 0; likewise ``right``, ``top`` and ``bottom``.

    Returns:
        ``(canvas, selection)``: the ``(H + top + bottom, W + left + right, 4)`` uint8 canvas,
        transparent black in the new area and ``image`` at ``(left, top)``; and its
        ``(H + top + bottom, W + left + right)`` uint8 selection, 255 on the new area and 0 on
        the original image.

    Raises:
        ValueError: ``image`` is not ``(H, W, 4)`` uint8, or a margin is not an int >= 0.
    """
    image = _check_image("image", image, 4)
    left = _check_non_negative_int("left", left)
    right = _check_non_negative_int("right", right)
    top = _check_non_negative_int("top", top)
    bottom = _check_non_negative_int("bottom", bottom)
    height, width = image.shape[:2]
    original = Box(left, top, width, height)
    canvas = np.zeros((height + top + bottom, width + left + right, 4), dtype=np.uint8)
    canvas[original.slices] = image
    selection = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    selection[original.slices] = 0
    return canvas, selection


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """Returns a copy of the part of ``image`` inside ``box``.

    Args:
        image: ``(H, W)`` or ``(H, W, C)``, any dtype.
        box: in ``image`` pixels; must lie inside it.

    Returns:
        A new ``(box.height, box.width[, C])`` array.

    Raises:
        ValueError: ``image`` is not an array of at least 1x1 pixels, or ``box`` is not inside it.
    """
    image = _check_array("image", image)
    box = _check_box_inside("box", box, image.shape)
    return image[box.slices].copy()


def paste(canvas: np.ndarray, patch: np.ndarray, at: Box) -> np.ndarray:
    """Returns a copy of ``canvas`` with ``patch`` written over it at ``at``, without blending.

    Args:
        canvas: ``(H, W)`` or ``(H, W, C)``, any dtype.
        patch: ``(h, w)`` or ``(h, w, C)``, the canvas's dtype and channels.
        at: where the patch goes, in canvas pixels; its size must be ``(w, h)``.

    Returns:
        A new array shaped like ``canvas``.

    Raises:
        ValueError: the shapes or dtypes disagree, or ``at`` is not inside the canvas.
    """
    canvas = _check_array("canvas", canvas)
    patch = _check_array("patch", patch)
    at = _check_box_inside("at", at, canvas.shape)
    if patch.shape != (at.height, at.width) + canvas.shape[2:] or patch.dtype != canvas.dtype:
        raise ValueError(
            f"patch of shape {patch.shape} dtype {patch.dtype} does not fit box {at!r} "
            f"of a canvas of shape {canvas.shape} dtype {canvas.dtype}"
        )
    result = canvas.copy()
    result[at.slices] = patch
    return result
