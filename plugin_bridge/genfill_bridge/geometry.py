"""Canvas geometry the bridge needs, in pure Python.

Vocabulary, as in ``genfill.fill``:

- canvas: the whole document, ``Size(width, height)`` in pixels;
- mask box: the bounding box of the selection's nonzero pixels;
- context box: the mask box grown so the engine sees enough surroundings;
- region: the part of the canvas the bridge sends (the context box, or the whole canvas when
  cropping would save little).

``context_box`` repeats ``genfill.fill.context_box`` from the mask box alone, without numpy;
``tests/test_bridge.py`` checks the two agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Size(NamedTuple):
    width: int
    height: int


class Box(NamedTuple):
    """A rectangle in canvas pixels: top-left corner, then size."""

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

    def contains(self, other: Box) -> bool:
        return self.x <= other.x and self.y <= other.y and other.right <= self.right and other.bottom <= self.bottom


# The context the server needs around a selection is at most the largest model's native size
# plus a margin (genfill.session uses the same value); sending only that keeps an 8k canvas as
# cheap as a 1k one.
CROP_NATIVE_SIZE = 1024


def context_box(mask_box: Box, canvas: Size, *, native_size: int | None = None, multiple: int = 8) -> Box:
    """Returns the context box for a selection whose mask box is ``mask_box``.

    Same rule as ``genfill.fill.context_box``: the mask box grown on every side by
    ``max(canvas long side / 16, (mask width + mask height) / 4)``, each side at least
    ``native_size`` where the canvas allows, near square, rounded up to ``multiple``, centred
    on the mask box and shifted inward at the canvas edges.

    Raises:
        ValueError: ``mask_box`` is empty or does not lie inside the canvas.
    """
    if mask_box.width <= 0 or mask_box.height <= 0:
        raise ValueError(f"mask box {tuple(mask_box)} is empty")
    if not Box(0, 0, canvas.width, canvas.height).contains(mask_box):
        raise ValueError(f"mask box {tuple(mask_box)} is not inside the {canvas.width}x{canvas.height} canvas")
    margin = math.ceil(max(max(canvas.width, canvas.height) / 16, (mask_box.width + mask_box.height) / 4))
    width = min(mask_box.width + 2 * margin, canvas.width)
    height = min(mask_box.height + 2 * margin, canvas.height)
    if native_size is not None:
        width = max(width, min(native_size, canvas.width))
        height = max(height, min(native_size, canvas.height))
    longer = max(width, height)
    width = max(width, min(longer, canvas.width))
    height = max(height, min(longer, canvas.height))
    width = _round_up_within(width, multiple, canvas.width)
    height = _round_up_within(height, multiple, canvas.height)
    x = _centre_inside(mask_box.x, mask_box.width, width, canvas.width)
    y = _centre_inside(mask_box.y, mask_box.height, height, canvas.height)
    return Box(x, y, width, height)


def region_to_send(mask_box: Box, canvas: Size) -> Box:
    """The part of the canvas to upload for a fill: the context box, or the whole canvas when
    the context box covers more than half of it (cropping then saves too little to matter)."""
    region = context_box(mask_box, canvas, native_size=CROP_NATIVE_SIZE)
    if region.width * region.height * 2 > canvas.width * canvas.height:
        return Box(0, 0, canvas.width, canvas.height)
    return region


def _round_up_within(length: int, multiple: int, limit: int) -> int:
    rounded = -(-length // multiple) * multiple
    return rounded if rounded <= limit else limit


def _centre_inside(inner_start: int, inner_length: int, length: int, limit: int) -> int:
    start = inner_start + (inner_length - length) // 2
    return min(max(start, 0), limit - length)
