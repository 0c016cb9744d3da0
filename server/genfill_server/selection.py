"""Selection help: a mask of the object a user points at, weights-free (GrabCut).

``select(image, points, box)`` turns a few clicks (and optionally a rough box) into a hard
selection that follows the object's edges, for "Select subject" in the editors. It runs
GrabCut (Rother, Kolmogorov and Blake, "GrabCut", SIGGRAPH 2004; OpenCV's ``grabCut``)
seeded by the clicks, then keeps the parts the positive clicks (or the box) hold, with their
holes filled, and drops specks.

Seeding without a box: each positive click grows a probable-object region of similar colour
around it (a flood fill in a tolerance of ``FLOOD_TOLERANCE``, bounded to ``REACH`` of the
image's short side), so GrabCut's colour models start from the object rather than from a
handful of pixels. Negative clicks are certain background.

OpenCV is optional (``opencv-python-headless``, which the diffusion extra already brings
through controlnet_aux); without it ``select`` raises ``SelectionUnavailable`` saying so.
This module is a pure function: wiring it into the protocol, SDK and editors is separate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SEED_RADIUS = 0.01
"""A click marks a disc of this share of the image's short side (at least 2 px) as certain."""

REACH = 0.35
"""A positive click's flood fill stays within this share of the short side of the click."""

FLOOD_TOLERANCE = 24
"""Per-channel colour tolerance of the seeding flood fill, against the clicked pixel's
neighbourhood (OpenCV's fixed-range flood fill)."""

ITERATIONS = 5
"""GrabCut iterations (OpenCV's examples use 5; more changed nothing on the tests' shapes)."""

MIN_PART_SHARE = 0.002
"""Parts of the result smaller than this share of the image are specks and dropped, unless a
positive click lies in them."""

RNG_SEED = 0
"""GrabCut initialises its colour models with k-means, seeded from OpenCV's global random
generator: it is seeded here, so the same clicks give the same mask."""


class SelectionUnavailable(RuntimeError):
    """OpenCV, which selection help runs on, is not installed."""


Point = tuple[int, int, bool]
"""A click: ``(x, y, positive)`` in pixels; ``positive`` is False for "not this"."""


def select(
    image: np.ndarray,
    points: Sequence[Point] = (),
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Returns the selection of the object that ``points`` and ``box`` show.

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8 (alpha is ignored).
        points: clicks ``(x, y, positive)``; ``x`` in ``0 .. W - 1``, ``y`` in ``0 .. H - 1``.
        box: ``(x, y, width, height)`` around the object, or ``None``. Inside it GrabCut
            decides; outside it is background. With a box, clicks are optional.

    Returns:
        ``(H, W)`` uint8 mask, 255 on the object, 0 elsewhere (a hard selection).

    Raises:
        ValueError: bad shapes or dtypes, a click outside the image, a box not inside the
            image or empty, or neither a positive click nor a box.
        SelectionUnavailable: OpenCV is not installed.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3|4) uint8, got shape {image.shape} and dtype {image.dtype}")
    height, width = image.shape[:2]
    clicks = [(int(x), int(y), bool(positive)) for x, y, positive in points]
    for x, y, _ in clicks:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"click ({x}, {y}) is outside the {width}x{height} image")
    if box is not None:
        bx, by, bw, bh = (int(v) for v in box)
        if bw <= 0 or bh <= 0 or bx < 0 or by < 0 or bx + bw > width or by + bh > height:
            raise ValueError(f"box {tuple(box)} is empty or not inside the {width}x{height} image")
    if box is None and not any(positive for _, _, positive in clicks):
        raise ValueError("select needs a positive click or a box")
    try:
        import cv2
    except ImportError as exc:
        raise SelectionUnavailable(
            "selection help needs OpenCV: pip install opencv-python-headless"
        ) from exc

    rgb = np.ascontiguousarray(image[..., :3])
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    short = min(height, width)
    seed_radius = max(2, round(SEED_RADIUS * short))

    labels = np.full((height, width), cv2.GC_PR_BGD, np.uint8)
    if box is not None:
        labels[:] = cv2.GC_BGD
        labels[by : by + bh, bx : bx + bw] = cv2.GC_PR_FGD
    for x, y, positive in clicks:
        if positive and box is None:
            labels[_flood(rgb, x, y, round(REACH * short))] = cv2.GC_PR_FGD
    for x, y, positive in clicks:
        cv2.circle(labels, (x, y), seed_radius, int(cv2.GC_FGD if positive else cv2.GC_BGD), thickness=-1)

    values = set(np.unique(labels).tolist())
    has_object = values & {cv2.GC_FGD, cv2.GC_PR_FGD}
    has_background = values & {cv2.GC_BGD, cv2.GC_PR_BGD}
    if has_object and has_background:
        cv2.setRNGSeed(RNG_SEED)
        background_model = np.zeros((1, 65), np.float64)
        object_model = np.zeros((1, 65), np.float64)
        cv2.grabCut(bgr, labels, None, background_model, object_model, ITERATIONS, cv2.GC_INIT_WITH_MASK)
    chosen = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    return _tidy(chosen, clicks, cv2).astype(np.uint8) * 255


def _flood(rgb: np.ndarray, x: int, y: int, reach: int) -> np.ndarray:
    """The ``(H, W)`` bool region of colours like the clicked pixel's around it, within
    ``reach`` pixels (a square) of the click."""
    import cv2

    height, width = rgb.shape[:2]
    top, left = max(0, y - reach), max(0, x - reach)
    bottom, right = min(height, y + reach + 1), min(width, x + reach + 1)
    window = np.ascontiguousarray(cv2.GaussianBlur(rgb[top:bottom, left:right], (5, 5), 0))
    mask = np.zeros((bottom - top + 2, right - left + 2), np.uint8)
    tolerance = (FLOOD_TOLERANCE,) * 3
    flags = 8 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    cv2.floodFill(window, mask, (x - left, y - top), (0, 0, 0), tolerance, tolerance, flags)
    region = np.zeros((height, width), bool)
    region[top:bottom, left:right] = mask[1:-1, 1:-1] > 0
    return region


def _tidy(chosen: np.ndarray, clicks: list[Point], cv2) -> np.ndarray:
    """Keeps the parts holding a positive click (all parts but specks when there is none),
    minus negative clicks' parts, with holes filled."""
    count, parts, stats, _ = cv2.connectedComponentsWithStats(chosen.astype(np.uint8), connectivity=8)
    positive = [(x, y) for x, y, is_positive in clicks if is_positive]
    keep = np.zeros(count, bool)
    if positive:
        for x, y in positive:
            keep[parts[y, x]] = True
    else:
        keep[:] = stats[:, cv2.CC_STAT_AREA] >= MIN_PART_SHARE * chosen.size
    keep[0] = False
    kept = keep[parts]
    # Holes: background parts that do not reach the image's edge.
    count, holes = cv2.connectedComponents((~kept).astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    inner = np.ones(count, bool)
    inner[edge] = False
    inner[0] = False
    for x, y, is_positive in clicks:
        if not is_positive:
            inner[holes[y, x]] = False  # a "not this" click inside keeps its hole open
    return kept | inner[holes]
