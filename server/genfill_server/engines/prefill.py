"""Pre-fill of a selection before a diffusion engine encodes it, one way per mode.

A diffusion model continues what it is given. Starting the selected area from something close
to the answer matters wherever fewer than all steps run there (soft selection edges,
``strength`` below 1, ordinary 4-channel checkpoints): krita-ai-diffusion's pre-fill by mode.

- ``fill``: the surroundings pulled in and smoothed (a pull-push pyramid), so colours flow in.
- ``expand``: edge extension, every new pixel takes the colour of the nearest known one, so
  lines and horizons continue into the margins.
- ``add``: neutral grey, so the new object is not biased towards what was there.
- ``remove``: the classic engine's content-aware fill, so the object is gone before the model
  refines the patch.

All functions take and return ``(H, W, 3)`` uint8 RGB and leave pixels outside ``hole``
bit-identical. Pure numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HARD_THRESHOLD", "extend_edges", "hole_of", "prefill", "pull_push"]

HARD_THRESHOLD = 128
"""Selection values from this one up are pre-filled; below it, the original shows through
(the soft edge is handled by differential denoising, not by the pre-fill)."""

NEUTRAL_GREY = 127
PREFILL_SEED = 0
"""Seed of the content-aware pre-fill for ``remove``. It is fixed, not the variation's seed,
so every variation starts from the same patch and remains reproducible by its own seed."""


def hole_of(selection: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` bool mask a mode pre-fills: the selection at or above ``HARD_THRESHOLD``."""
    return np.asarray(selection) >= HARD_THRESHOLD


def prefill(image: np.ndarray, selection: np.ndarray, mode: str) -> np.ndarray:
    """Returns ``image`` with the selection's hard part pre-filled for ``mode``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        selection: ``(H, W)`` uint8, 0 keeps, 255 replaces.
        mode: ``"fill"``, ``"expand"``, ``"add"`` or ``"remove"``.

    Raises:
        ValueError: unknown mode, or shapes that do not match.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if np.shape(selection) != image.shape[:2]:
        raise ValueError(f"selection is {np.shape(selection)}, image is {image.shape[:2]}")
    hole = hole_of(selection)
    if not hole.any() or hole.all():
        # Nothing known to continue from: leave the pixels as they are (grey for ``add``).
        if mode == "add" and hole.any():
            return np.full_like(image, NEUTRAL_GREY)
        if mode not in ("fill", "expand", "add", "remove"):
            raise ValueError(f"unknown mode {mode!r}")
        return image.copy()
    if mode == "fill":
        return pull_push(image, hole)
    if mode == "expand":
        return extend_edges(image, hole)
    if mode == "add":
        out = image.copy()
        out[hole] = NEUTRAL_GREY
        return out
    if mode == "remove":
        from .classic import content_aware_fill  # the classic engine is heavy; import on use

        return content_aware_fill(image, hole, seed=PREFILL_SEED)
    raise ValueError(f"unknown mode {mode!r}")


def pull_push(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fills ``hole`` with a smooth interpolation of its surroundings (pull-push pyramid).

    Known pixels are averaged down a pyramid until every cell knows a colour, then the coarse
    colours are pushed back up into the hole only, so the fill is blurred surroundings.
    """
    if not hole.any():
        return image.copy()
    known = ~hole
    if min(hole.shape) == 1:
        # A single row or column has no coarser level: the hole takes the known pixels' mean.
        out = image.copy()
        out[hole] = np.clip(np.rint(image[known].astype(np.float32).mean(axis=0)), 0, 255) if known.any() else NEUTRAL_GREY
        return out
    # The first level straight from the uint8 pixels: its sums are integers below 2**10, the
    # same in uint16 as in float32, and the full-size float copies are never made.
    masked = image * known[..., None]
    levels = [(_halve_sum(masked, np.uint16).astype(np.float32), _halve_sum(known, np.uint8).astype(np.float32))]
    while min(levels[-1][1].shape) > 1 and (levels[-1][1] <= 0).any():
        sums, counts = levels[-1]
        levels.append((_halve_sum(sums), _halve_sum(counts)))
    # Only the colours the hole's pixels are pushed from are computed: on each level, the box
    # below plus the one-cell reach of the smoothing, halved (the boxes run finest first).
    shapes = [hole.shape] + [counts.shape for _, counts in levels]
    boxes = [_box_around(hole)]
    for shape in shapes[:-1]:
        boxes.append(_parent_box(boxes[-1], shape))
    # Push: each level's unknown cells take the (upsampled) colour of the level above.
    sums, counts = levels[-1]
    colour = sums / np.maximum(counts, 1e-6)[..., None]
    if (counts <= 0).any():
        colour[counts <= 0] = colour[counts > 0].mean(axis=0) if (counts > 0).any() else NEUTRAL_GREY
    top_box = boxes[-1]
    colour = colour[top_box[0] : top_box[1], top_box[2] : top_box[3]]
    for level in range(len(levels) - 2, -1, -1):
        sums, counts = levels[level]
        box = boxes[level + 1]
        coarse = _double_box(colour, boxes[level + 2], counts.shape, box)
        rows, columns = slice(box[0], box[1]), slice(box[2], box[3])
        counts_here = counts[rows, columns]
        known_here = counts_here > 0
        colour = np.where(known_here[..., None], sums[rows, columns] / np.maximum(counts_here, 1e-6)[..., None], coarse)
        # Cells only partly known near the hole edge blend towards the coarse colour, which
        # smooths the seam without touching fully known pixels at the finest level.
        partial = known_here & (counts_here < counts.max())
        colour[partial] = 0.5 * colour[partial] + 0.5 * coarse[partial]
    # The finest level is the image itself: each pixel is known (weight 1) or in the hole
    # (weight 0), none partly, so its hole pixels take the upsampled colour of level 1 and
    # nothing else of it is used.
    top, bottom, left, right = boxes[0]
    coarse = _double_box(colour, boxes[1], hole.shape, boxes[0])
    np.rint(coarse, out=coarse)
    np.clip(coarse, 0, 255, out=coarse)
    out = image.copy()
    # A masked copy of the whole box: no gather and scatter of the hole's pixels.
    np.copyto(out[top:bottom, left:right], coarse.astype(np.uint8), where=hole[top:bottom, left:right, None])
    return out


Span = tuple[int, int, int, int]
"""A box of a pyramid level's cells: ``(top, bottom, left, right)``, half-open."""


def _box_around(hole: np.ndarray) -> Span:
    """The hole's bounding box."""
    rows = np.flatnonzero(hole.any(axis=1))
    columns = np.flatnonzero(hole.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


def _grown(box: Span, shape: tuple[int, int]) -> Span:
    """``box`` grown by the smoothing's reach of one cell, within a level of ``shape``."""
    top, bottom, left, right = box
    height, width = shape
    return max(top - 1, 0), min(bottom + 1, height), max(left - 1, 0), min(right + 1, width)


def _parent_box(box: Span, shape: tuple[int, int]) -> Span:
    """The cells of the next coarser level that ``_double_box`` reads for ``box`` of a level of
    ``shape``: the box grown by the smoothing's reach of one cell, halved."""
    y0, y1, x0, x1 = _grown(box, shape)
    return y0 // 2, (y1 - 1) // 2 + 1, x0 // 2, (x1 - 1) // 2 + 1


def _double_box(array: np.ndarray, array_box: Span, shape: tuple[int, int], box: Span) -> np.ndarray:
    """The coarser level's colours upsampled by 2 to a level of ``shape`` and smoothed with a
    [1, 2, 1] kernel (so pushed colours show no blocks), on ``box`` only. ``array`` holds the
    coarser level's cells in ``array_box``, which covers ``_parent_box(box, shape)``. Computed
    on the box and a margin of one cell (the smoothing reaches one cell), with the same
    numbers as on the whole level."""
    top, bottom, left, right = box
    y0, y1, x0, x1 = _grown(box, shape)
    parent_top, parent_bottom, parent_left, parent_right = _parent_box(box, shape)
    origin_y, origin_x = array_box[0], array_box[2]
    part = array[parent_top - origin_y : parent_bottom - origin_y, parent_left - origin_x : parent_right - origin_x]
    up = np.repeat(np.repeat(part, 2, axis=0), 2, axis=1)
    up = up[y0 - 2 * (y0 // 2) :, x0 - 2 * (x0 // 2) :][: y1 - y0, : x1 - x0]
    # Inside the level, the margin's neighbours are not the level's: the margin is dropped.
    smooth = _smooth(up)
    return smooth[top - y0 : top - y0 + bottom - top, left - x0 : left - x0 + right - left]


def extend_edges(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fills ``hole`` with the colour of the nearest known pixel (jump flooding), so edges and
    gradients reaching the hole's border continue straight into it."""
    height, width = hole.shape
    inf = np.iinfo(np.int32).max // 4
    nearest_y = np.where(hole, inf, np.arange(height, dtype=np.int32)[:, None]).astype(np.int32)
    nearest_x = np.where(hole, inf, np.arange(width, dtype=np.int32)[None, :]).astype(np.int32)
    ys = np.arange(height, dtype=np.int64)[:, None]
    xs = np.arange(width, dtype=np.int64)[None, :]
    step = 1 << max(0, int(np.ceil(np.log2(max(height, width)))) - 1)
    passes = []
    while step >= 1:
        passes.append(step)
        step //= 2
    # One extra pass at step 1 fixes most of jump flooding's rare misses.
    for step in passes + [1]:
        best = (nearest_y - ys) ** 2 + (nearest_x - xs) ** 2
        for dy in (-step, 0, step):
            for dx in (-step, 0, step):
                if dy == 0 and dx == 0:
                    continue
                cand_y = _shifted(nearest_y, dy, dx, inf)
                cand_x = _shifted(nearest_x, dy, dx, inf)
                dist = (cand_y - ys) ** 2 + (cand_x - xs) ** 2
                better = dist < best
                nearest_y = np.where(better, cand_y, nearest_y)
                nearest_x = np.where(better, cand_x, nearest_x)
                best = np.where(better, dist, best)
    out = image.copy()
    out[hole] = image[nearest_y[hole], nearest_x[hole]]
    return out


def _shifted(array: np.ndarray, dy: int, dx: int, fill_value: int) -> np.ndarray:
    """``out[y, x] = array[y + dy, x + dx]``, ``fill_value`` where that is outside."""
    out = np.full_like(array, fill_value)
    height, width = array.shape
    src_y = slice(max(dy, 0), height + min(dy, 0))
    dst_y = slice(max(-dy, 0), height + min(-dy, 0))
    src_x = slice(max(dx, 0), width + min(dx, 0))
    dst_x = slice(max(-dx, 0), width + min(-dx, 0))
    if src_y.start < src_y.stop and src_x.start < src_x.stop:
        out[dst_y, dst_x] = array[src_y, src_x]
    return out


def _halve_sum(array: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """Sums 2x2 cells, in ``dtype`` (the array's by default); an odd last row or column is
    kept as a cell of its own."""
    height, width = array.shape[:2]
    padded_h, padded_w = height + height % 2, width + width % 2
    if (padded_h, padded_w) != (height, width):
        pad = [(0, padded_h - height), (0, padded_w - width)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pad)
    total = np.add(array[0::2, 0::2], array[1::2, 0::2], dtype=dtype)
    total += array[0::2, 1::2]
    total += array[1::2, 1::2]
    return total


def _smooth(out: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along each axis, edges replicated."""
    for axis in (0, 1):
        padded = np.concatenate([out.take([0], axis=axis), out, out.take([-1], axis=axis)], axis=axis)
        length = out.shape[axis]
        if axis == 0:
            before, centre, after = padded[0:length], padded[1 : length + 1], padded[2 : length + 2]
        else:
            before, centre, after = padded[:, 0:length], padded[:, 1 : length + 1], padded[:, 2 : length + 2]
        # (before + 2 centre + after) / 4, in that order, in one buffer.
        out = np.multiply(centre, 2)
        np.add(before, out, out=out)
        out += after
        out /= 4
    return out
