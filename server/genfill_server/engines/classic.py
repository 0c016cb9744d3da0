"""The classic engine: content-aware fill from the image itself, needing no model weights.

The fill is PatchMatch completion (Barnes et al., "PatchMatch", SIGGRAPH 2009; Wexler,
Shechtman and Irani, "Space-Time Completion of Video", PAMI 2007), restricted in where it
may copy from and split by the structure that crosses the hole, in five stages. Issue 15
and ``benchmarks/removal.py`` (22 object removals on real photos, with a contact sheet) say
why each is there: PatchMatch over the whole image pasted the astronaut's face into the
backdrop behind her, and a smooth low band under copied texture smeared a saucer.

1. *Sampling area* (``source_mask``): the sources lie in a band around the hole, as
   Content-Aware Fill's "auto" sampling area does, widened only when it holds too little;
   only pixels whose local colour the hole's border has, joined to the border, may be
   copied. The context box is the hole's bounding box grown by that band.
2. *Structure* (``_regions``): where the border's colours fall into distinct regions that
   meet at edges (a backdrop and a pedestal, a saucer and a table), each region is
   continued into the hole by the membrane of its indicator, so an edge entering on one
   side leaves on the other along a smooth curve; each region is filled from its own
   sources. Gradients and textures, whose colours spread evenly, stay one region.
3. *Completion at working scale*: the context is halved until it has at most
   ``WORK_PIXELS`` pixels, and PyPatchMatch fills each region there. Its multi-scale
   expectation-maximisation continues regular textures (bricks, stripes).
4. *Refinement*: for contexts larger than the working scale, a nearest-neighbour field (NNF)
   is searched for the working-scale fill, then scaled up an octave at a time. Intermediate
   octaves are voted from their sources and refined by a local PatchMatch search; the finest
   copies every hole pixel from the full-resolution source its NNF points at, which keeps
   the sources' detail.
5. *Low band*: a copied patch carries a gradient (a sky, a lit wall) with steps; the fill's
   low band, a Gaussian of ``LOW_BAND_SIGMA`` pixels, is replaced by that of the membrane
   (the harmonic fill: Laplace's equation with the edge as boundary), region by region, so
   no region's colour is smeared across an edge into the next.

Vocabulary: the *hole* is the set of pixels to replace; *targets* are the centres of patches
that overlap the hole (the hole grown by the patch radius); *sources* are the centres of
patches with no hole pixel, the only ones that may be copied; *allowed* sources are the
sources the sampling area keeps.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from genfill.protocol import ErrorCode, Mode

from .base import DeviceKind, EngineCapabilities, EngineDefaults, EngineError, EngineJob, StepCallback

WORK_PIXELS = 32000
"""The context is halved until it has at most this many pixels before PyPatchMatch runs. On
the removal set 50 000 cost 0.45 s of CPU a fill and 32 000 0.35 s, seams 1.10 against 1.15;
20 000 (0.27 s) gave visibly worse seams (1.24)."""

PATCHMATCH_RADIUS = 3
"""PyPatchMatch compares ``7 x 7`` patches; its examples use 3, and 2 and 4 measured worse."""

BAND_MIN_PX = 24
"""Sources lie in a band around the hole, at least this wide ..."""

BAND_DEPTH_FACTOR = 1.0
"""... and this many times the hole's half-thickness (its deepest pixel's distance to the
edge): a thick hole needs sources from further out than a thin stroke does. On the removal
set 1.5 gave seams of 1.23 against 1.17 here, for the same time."""

EXPAND_BAND_DEPTH_FACTOR = 0.25
"""For expand, the band is this many times the new margin's depth: a margin continues the
image's edge region, and salient objects deeper in stay where they are. Expanding the
astronaut photo 128 px down, a half-deep band (64 px) copied the suit's white fittings and
glove into the margin as ghosts; a quarter-deep one continues the suit and helmet."""

MIN_SOURCE_RATIO = 2.0
"""The band is doubled until it holds this many allowed source pixels per hole pixel ..."""

EXPAND_MIN_SOURCE_RATIO = 0.25
"""... for expand this many: the quarter-deep band along an edge holds a quarter of the
margin's area."""

BORDER_RING_PX = (2.0, 6.0)
"""The hole's border, whose colours say what may be copied: known pixels this far from the
hole. The first pixel out is skipped, as it often holds the removed object's soft edge."""

COLOUR_BIN = 10.0
"""Side of a CIELAB cell, in Lab units, in the table of the border's colours. A source is
allowed when its local colour falls in a cell next to one the border fills (within about
one to two cells, 10 to 20 Lab units): a face next to a grey backdrop is not a source for
the backdrop, grey from the other side of the hole is."""

BORDER_CELL_SHARE = 0.002
"""A cell counts as the border's when it holds at least this share of the border ring's
pixels (and at least 2 of them): a few stray pixels of the removed object's edge do not
open its colours to copying."""

SOURCE_BLUR_SIGMA = 2.0
"""Local colour is the mean over a Gaussian of this many pixels, over known pixels only."""

REGION_BLUR_SIGMA = 8.0
"""Regions are told apart by local colour over a Gaussian of this many pixels: wide enough
that a texture (gravel, grass) is one region, narrow enough that a saucer and the table
beside it are two."""

REGION_SWEEPS = 2
"""SOR sweeps of the regions' indicator membranes at full scale (coarser scales as usual)."""

MAX_REGIONS = 3
"""At most this many regions meet at the hole's border (k-means over its colours)."""

REGION_MIN_SHARE = 0.12
"""A region holds at least this share of the border; smaller clusters join their nearest."""

REGION_MERGE_DE = 25.0
"""Regions whose mean colours lie closer than this (CIELAB Delta E) are one region."""


PATCHMATCH_MULTIPLE = 8
"""PyPatchMatch runs on images padded to a multiple of this many pixels a side."""

PATCH_RADIUS = 2
"""The refinement compares ``(2 * PATCH_RADIUS + 1)``-pixel square patches."""

REFINE_SWEEPS = 1
"""PatchMatch sweeps (propagation, then random search within 4 px) per intermediate octave."""

REFINE_SEARCH_TARGETS = 200_000
"""Octaves with more target patches than this take the scaled-up NNF without searching it,
which keeps a 15% hole in a 2048 x 2048 image within a few seconds."""

COARSE_SWEEPS = 6
"""PatchMatch sweeps that find, at the working scale, where PyPatchMatch's fill came from (its
NNF is not exposed). The finest scale copies each pixel from where this field points, so an
incoherent field is a collage of single pixels: with 2 sweeps gravel and grass came out as
a grey mush on the contact sheet, with 6 the stones are whole (0.03 s more at 512 px)."""

REGION_BETWEEN = 0.2
"""A border colour is between two regions when it projects onto the middle of the segment
joining their centres, within this share of its length of the midpoint ..."""

REGION_MAX_BETWEEN_SHARE = 0.15
"""... and two regions are one when more than this share of their colours is between them."""

LOW_BAND_SIGMA = 12.0
"""The fill's low band, a Gaussian of this many pixels, comes from the membrane, the rest from
the patches. On the benchmark 3 px gave 16.25 dB and texture 0.83, 4 px 16.20 dB and 0.85,
5 px 16.16 dB and 0.85, 6 px 16.13 dB and 0.86."""


HARMONIC_SWEEPS = 20
"""Red-black SOR sweeps of the membrane at each coarser scale ..."""

HARMONIC_TOP_SWEEPS = 6
"""... and at full scale, where only the low band is used: 20 there gained 0.02 dB for 0.09 s."""

HARMONIC_OVERRELAX = 1.6
"""SOR over-relaxation factor (1.8 measured the same)."""

MIN_SOURCES = 16
"""With fewer source patches than this in the context, the hole is filled smoothly: there is
no texture to continue, and PatchMatch would copy from the image's edge padding."""

ProgressCallback = Callable[[int, int, "np.ndarray | None"], None]

# PyPatchMatch keeps its random seed in process-global state: seeding and filling must not
# interleave between threads.
_patchmatch_lock = threading.Lock()
_HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genfill-classic")


class Box(NamedTuple):
    x: int
    y: int
    width: int
    height: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


def content_aware_fill(
    image: np.ndarray,
    hole: np.ndarray,
    *,
    seed: int,
    on_step: ProgressCallback | None = None,
    outward: bool = False,
) -> np.ndarray:
    """Fills ``hole`` with texture and structure taken from the rest of ``image``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image. Pixels inside the hole are ignored.
        hole: ``(H, W)`` bool mask, ``True`` where pixels are replaced. It may touch the
            border or cover all but a few pixels; with too little left to copy from, the hole
            is filled smoothly from its edge (mid grey if nothing is known).
        seed: seed of the randomised search; equal inputs and seeds give equal results, and
            different seeds give different plausible fills wherever the image offers more
            than one good source.
        on_step: called as ``on_step(step, total, None)`` after every unit of work (at most
            about a second apart at the working scale), with ``step`` rising to ``total``. It
            may raise (``JobCancelledError``) to stop the fill; the exception propagates.
            ``None`` reports nothing.
        outward: the hole is new canvas around the image (expand): sources come from a
            band ``EXPAND_BAND_DEPTH_FACTOR`` times as deep as the margin, so the border
            region is continued outward rather than objects further in copied out as ghosts.

    Returns:
        ``(H, W, 3)`` uint8 RGB image, bit-identical to ``image`` outside the hole.

    Raises:
        ValueError: ``image`` or ``hole`` has the wrong shape or dtype.
        RuntimeError: PyPatchMatch's native library is missing or failed.
    """
    image = np.asarray(image)
    hole = np.asarray(hole)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} and dtype {image.dtype}")
    if hole.shape != image.shape[:2] or hole.dtype != np.bool_:
        raise ValueError(
            f"hole must be ({image.shape[0]}, {image.shape[1]}) bool, got shape {hole.shape} and dtype {hole.dtype}"
        )
    report = on_step or _ignore_step
    out = image.copy()
    if not hole.any():
        report(1, 1, None)
        return out

    if outward:
        allowed, band_px = source_mask(image, hole, EXPAND_BAND_DEPTH_FACTOR, EXPAND_MIN_SOURCE_RATIO)
    else:
        allowed, band_px = source_mask(image, hole)
    box = context_box(hole, band_px)
    crop = box.slices
    regions = _regions(image[crop], hole[crop])
    filled = _fill_context(image[crop], hole[crop], allowed[crop], regions, np.random.default_rng(seed), seed, report)
    region = out[crop]
    region[hole[crop]] = filled[hole[crop]]
    return out


class Regions(NamedTuple):
    """The regions that meet at a hole's border, and where they continue inside it.

    Attributes:
        labels: ``(h, w)`` int8, each pixel's region (known pixels by their local colour, hole
            pixels by the continuation), ``0 .. count - 1``.
        count: how many regions; 1 where the border is all one colour region.
    """

    labels: np.ndarray
    count: int


def _regions(image: np.ndarray, hole: np.ndarray) -> Regions:
    """Structure before texture: the hole's border is split into up to ``MAX_REGIONS``
    regions of distinct local colour (k-means), and each region is continued into the hole
    by the membrane of its indicator, so an edge entering the hole on one side leaves it on
    the other along a smooth curve (the saucer's rim behind a cup, a table's edge behind an
    object). Each region is then filled from its own sources only."""
    known = ~hole
    labels = np.zeros(hole.shape, np.int8)
    ring = known & _grow(hole, int(BORDER_RING_PX[1])) & ~_grow(hole, int(BORDER_RING_PX[0]) - 1)
    if np.count_nonzero(ring) < 8 or not known.any():
        return Regions(labels, 1)
    radius = max(1, round(REGION_BLUR_SIGMA / 2))
    weight = known.astype(np.float32)
    total = image.astype(np.float32) * weight[..., None]
    count = weight
    for _ in range(3):
        total, count = _box_blur(total, radius), _box_blur(count, radius)
    lab = _srgb_to_lab(total / np.maximum(count, 1e-6)[..., None]).astype(np.float32)
    centres = _cluster(lab[ring])
    if len(centres) < 2:
        return Regions(labels, 1)
    distance = ((lab[:, :, None, :] - centres[None, None]) ** 2).sum(axis=-1)
    labels = distance.argmin(axis=-1).astype(np.int8)
    indicator = np.zeros(hole.shape + (3,), np.float32)
    for index in range(len(centres)):
        indicator[..., index] = labels == index
    # Only the argmax is used: a few sweeps at full scale suffice.
    continued = _harmonic_fill(indicator, hole, sweeps=REGION_SWEEPS)
    labels[hole] = continued[hole][:, : len(centres)].argmax(axis=-1)
    return Regions(labels, len(centres))


def _cluster(points: np.ndarray) -> np.ndarray:
    """Up to ``MAX_REGIONS`` k-means centres of ``(n, 3)`` Lab points, farthest-point seeded;
    small clusters and close centres merged."""
    centres = [np.median(points, axis=0)]
    for _ in range(MAX_REGIONS - 1):
        gap = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(points[int(gap.argmax())])
    centres = np.array(centres, np.float32)
    for _ in range(8):
        nearest = ((points[:, None] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
        shares = np.bincount(nearest, minlength=len(centres)) / len(points)
        keep = shares >= REGION_MIN_SHARE
        centres = np.array([points[nearest == i].mean(axis=0) for i in np.flatnonzero(keep)], np.float32)
        merged: list[np.ndarray] = []
        for centre in centres:
            if all(np.sqrt(((centre - other) ** 2).sum()) >= REGION_MERGE_DE for other in merged):
                merged.append(centre)
        centres = np.array(merged, np.float32)
        if len(centres) < 2:
            return centres
    # Regions meet at edges: few border colours lie between two of them. A gradient (a sky,
    # a lit wall) or a texture spreads its colours evenly between any centres k-means finds:
    # such a pair is one region, whose membrane continues it.
    while len(centres) >= 2:
        own = ((points[:, None] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
        worst, pair = 0.0, None
        for i in range(len(centres)):
            for j in range(i + 1, len(centres)):
                members = points[(own == i) | (own == j)]
                axis = centres[j] - centres[i]
                along = (members - centres[i]) @ axis / max(float(axis @ axis), 1e-6)
                share = float((np.abs(along - 0.5) < REGION_BETWEEN).mean())
                if share > worst:
                    worst, pair = share, (i, j)
        if pair is None or worst <= REGION_MAX_BETWEEN_SHARE:
            break
        i, j = pair
        joined = points[(own == i) | (own == j)].mean(axis=0)
        centres = np.array([c for k, c in enumerate(centres) if k not in pair] + [joined], np.float32)
    return centres


def source_mask(
    image: np.ndarray,
    hole: np.ndarray,
    depth_factor: float = BAND_DEPTH_FACTOR,
    min_ratio: float = MIN_SOURCE_RATIO,
) -> tuple[np.ndarray, int]:
    """Returns ``(allowed, band_px)``: the ``(H, W)`` bool mask of pixels the fill may copy
    from, and the width of the band around the hole they lie in.

    Content-Aware Fill's "auto" sampling area, by three rules. Sources lie in a band around
    the hole (``BAND_MIN_PX``, ``BAND_DEPTH_FACTOR``): near content is the relevant content,
    and far content pasted in is what makes a fill look foreign. Their local colour must be
    one the hole's border has (``COLOUR_BIN``): a face beside a plain backdrop is never
    copied into the backdrop. And they must be joined to the border through such pixels: the
    same colour beyond a strong edge is another region. The band doubles until it holds
    ``min_ratio`` allowed pixels per hole pixel; where even the whole image does not,
    the colour rules are dropped rather than leave too little to copy from. Distances are
    chessboard distances.
    """
    known = ~hole
    depth = _depth(hole)
    needed = min_ratio * np.count_nonzero(hole)
    band_px = max(BAND_MIN_PX, int(np.ceil(depth_factor * depth)))
    longest = max(hole.shape)
    while True:
        box = context_box(hole, band_px + int(BORDER_RING_PX[1]))
        crop = box.slices
        local_hole = hole[crop]
        local_known = ~local_hole
        outer = _grow(local_hole, int(BORDER_RING_PX[1]))
        ring = local_known & outer & ~_grow(local_hole, int(BORDER_RING_PX[0]) - 1)
        if np.count_nonzero(ring) < 8:
            ring = local_known & outer
        compatible = _border_colours(_local_lab(image[crop], local_known), ring)
        # A patch centred beside a foreign colour copies some of it: keep a patch's reach.
        compatible &= ~_grow(local_known & ~compatible, PATCHMATCH_RADIUS)
        band = local_known & _grow(local_hole, band_px)
        allowed = _joined_to(band & compatible, ring, reach_px=2 * band_px)
        if np.count_nonzero(allowed) >= needed:
            full = np.zeros_like(hole)
            full[crop] = allowed
            return full, band_px
        if band_px >= longest:
            return known, band_px
        band_px = min(2 * band_px, longest)


def _depth(hole: np.ndarray) -> int:
    """The largest chessboard distance from a hole pixel to the known pixels (the image edge
    is no known pixel), by bisection on erosions; ``hole`` has a known pixel."""
    rows = np.flatnonzero(hole.any(axis=1))
    cols = np.flatnonzero(hole.any(axis=0))
    hole = hole[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]
    low, high = 1, max(hole.shape)
    while low < high:
        middle = (low + high + 1) // 2
        # Hole pixels whose square of side 2 middle - 1 holds no known pixel.
        if (hole & ~_grow(~hole, middle - 1)).any():
            low = middle
        else:
            high = middle - 1
    return low


def _box_blur(array: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a square of side ``2 * radius + 1``, zero beyond the edge, per channel."""
    d = 2 * radius + 1
    pad = [(radius + 1, radius), (radius + 1, radius)] + [(0, 0)] * (array.ndim - 2)
    sums = np.pad(array, pad).cumsum(0).cumsum(1)
    return (sums[d:, d:] - sums[:-d, d:] - sums[d:, :-d] + sums[:-d, :-d]) / (d * d)


def _local_lab(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """CIELAB ``(h, w, 3)`` float32 of the known pixels' mean around each pixel (two box
    passes, about a Gaussian of ``SOURCE_BLUR_SIGMA``)."""
    radius = max(1, round(SOURCE_BLUR_SIGMA))
    weight = known.astype(np.float32)
    total = image.astype(np.float32) * weight[..., None]
    count = weight
    for _ in range(2):
        total, count = _box_blur(total, radius), _box_blur(count, radius)
    return _srgb_to_lab(total / np.maximum(count, 1e-6)[..., None])


_SRGB_TO_XYZ_WHITE = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32
) / np.array([[0.9505], [1.0], [1.089]], np.float32)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of ``(..., 3)`` float sRGB in 0..255."""
    c = np.clip(rgb / 255.0, 0.0, 1.0)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ_WHITE.T
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _colour_cells(lab: np.ndarray) -> tuple[np.ndarray, int]:
    side = int(np.ceil(256 / COLOUR_BIN)) + 1
    cells = np.clip(np.floor((lab + (0.0, 128.0, 128.0)) / COLOUR_BIN).astype(np.int32), 0, side - 1)
    return (cells[..., 0] * side + cells[..., 1]) * side + cells[..., 2], side


def _border_colours(lab: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """``(h, w)`` bool: pixels whose local colour lies in or next to a cell that the border
    ring's colours fill."""
    cells, side = _colour_cells(lab)
    counts = np.bincount(cells[ring], minlength=side**3).reshape(side, side, side)
    least = max(2, BORDER_CELL_SHARE * np.count_nonzero(ring))
    filled = counts >= least
    if not filled.any():
        filled = counts > 0
    # One cell of slack each way: a cell edge must not split a colour from its own.
    padded = np.pad(filled, 1)
    near = np.zeros_like(filled)
    for dl in range(3):
        for da in range(3):
            for db in range(3):
                near |= padded[dl : dl + side, da : da + side, db : db + side]
    return near.ravel()[cells]


JOIN_STEP_PX = 2
"""The geodesic dilation in ``_joined_to`` steps this far at a time: a quarter of the
passes of single steps, at the cost of leaping gaps of one pixel (an edge between regions is
wider than that in local colour, which is blurred)."""


def _joined_to(mask: np.ndarray, seeds: np.ndarray, reach_px: int, coarse: bool = True) -> np.ndarray:
    """The pixels of ``mask`` reached from ``seeds`` within about ``reach_px`` pixels of
    path inside ``mask`` (a geodesic dilation: within a band, the parts joined to the
    border)."""
    if coarse and min(mask.shape) >= 64:
        # At half scale (a coarse pixel is in the mask when all four of its pixels are):
        # an eighth of the work, and the parts that the coarse dilation misses are thin.
        height, width = mask.shape
        joined = _joined_to(_halve_all(mask), _halve_any(seeds & mask), (reach_px + 1) // 2, coarse=False)
        up = np.repeat(np.repeat(joined, 2, axis=0), 2, axis=1)[:height, :width]
        return _grow(up, 1) & mask | (seeds & mask)
    reached = seeds & mask
    for _ in range(-(-reach_px // JOIN_STEP_PX)):
        grown = _grow(reached, JOIN_STEP_PX) & mask
        if np.array_equal(grown, reached):
            break
        reached = grown
    return reached


def _halve_any(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, ((0, h % 2), (0, w % 2)))
    return padded.reshape((h + h % 2) // 2, 2, (w + w % 2) // 2, 2).any(axis=(1, 3))


def context_box(hole: np.ndarray, band_px: int) -> Box:
    """Returns the part of the image the fill looks at: the hole's bounding box grown by the
    sources' band and the patches' reach, clipped to the image. ``hole`` must have at least
    one ``True`` pixel."""
    rows = np.flatnonzero(hole.any(axis=1))
    cols = np.flatnonzero(hole.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    margin = band_px + 2 * (PATCHMATCH_RADIUS + 1)
    height, width = hole.shape
    top, left = max(0, top - margin), max(0, left - margin)
    bottom, right = min(height, bottom + margin), min(width, right + margin)
    return Box(int(left), int(top), int(right - left), int(bottom - top))


def _ignore_step(step: int, total: int, preview: np.ndarray | None) -> None:
    pass


class ClassicEngine:
    """The ``Engine`` for content-aware fill; needs no weights and runs on the CPU."""

    name = "classic"
    # The fill is the image's own pixels: matching its colours to the context changed no
    # pixel on the removal set and cost about 10 ms a fill.
    capabilities = EngineCapabilities(prompt=False, device_kind=DeviceKind.CPU, needs_colour_match=False)
    defaults = EngineDefaults()

    def load(self) -> None:
        """Checks that PyPatchMatch's native library loaded.

        Raises:
            EngineError: ``engine_unavailable`` when it did not.
        """
        import patchmatch

        if not patchmatch.patchmatch_available:
            raise EngineError(ErrorCode.ENGINE_UNAVAILABLE, "the classic engine's PatchMatch library is not available")

    def close(self) -> None:
        pass

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns one fill per seed in ``job.seeds``, each ``(H, W, 3)`` uint8 RGB.

        The hole is every pixel with a non-zero ``job.selection``: soft selection edges are
        replaced too, and the pipeline's composite blends them back with the selection's
        alpha. Progress counts over the whole job: ``total`` is the same for every call.

        Raises:
            EngineError: ``empty_selection`` when the selection is all zero.
        """
        hole = np.asarray(job.selection) > 0
        outward = job.options.mode is Mode.EXPAND
        if not hole.any():
            raise EngineError(ErrorCode.EMPTY_SELECTION, "the selection is empty: there is nothing to fill")
        seeds = list(job.seeds)
        results: list[np.ndarray] = []
        for index, seed in enumerate(seeds):

            def report(step: int, total: int, preview: np.ndarray | None, index: int = index) -> None:
                on_step(index * total + step, len(seeds) * total, preview)

            results.append(content_aware_fill(job.image, hole, seed=seed, on_step=report, outward=outward))
        return results


def _fill_context(
    image: np.ndarray,
    hole: np.ndarray,
    allowed: np.ndarray,
    regions: Regions,
    rng: np.random.Generator,
    seed: int,
    report: ProgressCallback,
) -> np.ndarray:
    """Returns the context ``image`` with ``hole`` filled from ``allowed`` pixels, each
    region of ``regions`` from its own, ``(h, w, 3)`` uint8."""
    images = [image.astype(np.float32)]
    holes = [hole]
    alloweds = [allowed & ~hole]
    labels = [regions.labels]
    while images[-1].shape[0] * images[-1].shape[1] > WORK_PIXELS:
        smaller, smaller_hole = _halve(images[-1], holes[-1])
        images.append(smaller)
        holes.append(smaller_hole)
        alloweds.append(_halve_all(alloweds[-1]) & ~smaller_hole)
        labels.append(_halve_labels(labels[-1]))
    octaves = len(images) - 1
    total = 4 + octaves
    report(1, total, None)

    if _source_count(holes[-1]) < MIN_SOURCES:
        filled = _harmonic_fill(images[0], holes[0])
        report(total, total, None)
        return np.clip(np.rint(filled), 0, 255).astype(np.uint8)
    if np.count_nonzero(alloweds[-1] & ~_grow(holes[-1], PATCHMATCH_RADIUS)) < MIN_SOURCES:
        # The allowed sources vanish at the working scale (a thin band): any known pixel.
        alloweds = [~h for h in holes]

    # The membranes are numpy and PyPatchMatch native code that releases the GIL: on two
    # cores they run side by side.
    membranes = _HELPER.submit(_membranes, images, holes, labels, regions.count)
    work = np.clip(np.rint(images[-1]), 0, 255).astype(np.uint8)
    work = _patchmatch_regions(work, holes[-1], alloweds[-1], labels[-1], regions.count, seed).astype(np.float32)
    report(2, total, None)
    if octaves:
        level = _Level(work, holes[-1], rng, alloweds[-1])
        level.start_random()
        level.search(sweeps=COARSE_SWEEPS)
        report(3, total, None)
        for octave in reversed(range(octaves)):
            finer = _Level(images[octave], holes[octave], rng, alloweds[octave])
            searched = octave > 0 and finer.target_y.size <= REFINE_SEARCH_TARGETS
            finer.start_from_coarser(level.nnf, vote_radius=1 if searched else None)
            if searched:
                finer.search(sweeps=REFINE_SWEEPS, steps=(1,), max_radius=4)
            finer.vote(radius=0, refresh=False)
            level = finer
            report(total - 1 - octave, total, None)
        work = level.image[..., :3]
    else:
        report(3, total, None)

    # Low band from each region's membrane, high band from the copied patches: patches
    # carry a gradient with steps, the membrane follows it. Per region, so the membrane never
    # smears one region's colour across an edge into the next.
    for region_hole, smooth in membranes.result():
        work = work + _blur_in_hole(smooth - work, region_hole, LOW_BAND_SIGMA) * region_hole[..., None]
    report(total, total, None)
    return np.clip(np.rint(work), 0, 255).astype(np.uint8)


def _membranes(
    images: list[np.ndarray], holes: list[np.ndarray], labels: list[np.ndarray], count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per region: its part of the hole at full scale and the membrane there, bounded by
    that region's known pixels only. A single region is solved at full scale; several at
    the working scale and scaled up (only their low band is used)."""
    if count == 1:
        return [(holes[0], _harmonic_fill(images[0], holes[0], HARMONIC_TOP_SWEEPS))]
    height, width = holes[0].shape
    factor = 2 ** (len(images) - 1)
    out = []
    for index in range(count):
        region_hole = holes[0] & (labels[0] == index)
        if not region_hole.any():
            continue
        unknown = holes[-1] | (labels[-1] != index)
        if unknown.all():
            continue
        smooth = _harmonic_fill(images[-1], unknown)
        up = np.repeat(np.repeat(smooth, factor, axis=0), factor, axis=1)[:height, :width]
        out.append((region_hole, up))
    return out


def _halve_labels(labels: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    return np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")[::2, ::2]


def _patchmatch_regions(
    image: np.ndarray, hole: np.ndarray, allowed: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> np.ndarray:
    """PyPatchMatch once per region: each region's part of the hole from that region's
    allowed sources (all allowed ones where it has too few)."""
    if count == 1:
        return _patchmatch(image, hole, allowed, seed)
    out = image.copy()
    reach = _grow(hole, PATCHMATCH_RADIUS)
    for index in range(count):
        part = hole & (labels == index)
        if not part.any():
            continue
        sources = allowed & (labels == index)
        if np.count_nonzero(sources & ~reach) < max(MIN_SOURCES, np.count_nonzero(part)):
            sources = allowed
        # Each pass looks only at its part and sources; the rest of the hole is neither
        # filled nor copied in it.
        box = _bounding_box(part | sources, PATCHMATCH_RADIUS + 1)
        crop = box.slices
        filled = _patchmatch(image[crop], part[crop], sources[crop], seed, others=(hole & ~part)[crop])
        out[crop][part[crop]] = filled[part[crop]]
    return out


def _bounding_box(mask: np.ndarray, margin: int) -> Box:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    top, left = max(0, rows[0] - margin), max(0, cols[0] - margin)
    bottom, right = min(height, rows[-1] + 1 + margin), min(width, cols[-1] + 1 + margin)
    return Box(int(left), int(top), int(right - left), int(bottom - top))


def _patchmatch(
    image: np.ndarray, hole: np.ndarray, allowed: np.ndarray, seed: int, others: np.ndarray | None = None
) -> np.ndarray:
    import patchmatch

    # PyPatchMatch neither fills nor copies from its ``global_mask``: every known pixel
    # that is not an allowed source, and ``others``, hole pixels left for another pass.
    excluded = ~hole & ~allowed
    if others is not None:
        excluded |= others
    # PyPatchMatch's pyramid misaligns on sides that are not multiples of 8: on a ramp, a
    # 156 px wide context filled with errors up to 32 levels where 160 px gave 8. The image
    # is padded to a multiple of 8 with excluded pixels.
    height, width = hole.shape
    pad = ((0, -height % PATCHMATCH_MULTIPLE), (0, -width % PATCHMATCH_MULTIPLE))
    image = np.pad(image, pad + ((0, 0),), mode="edge")
    hole_u8 = np.pad(hole, pad).astype(np.uint8)
    excluded = np.pad(excluded, pad, constant_values=True).astype(np.uint8)
    with _patchmatch_lock:
        patchmatch.set_random_seed(seed)
        filled = patchmatch.inpaint(image, hole_u8, global_mask=excluded, patch_size=PATCHMATCH_RADIUS)
    return filled[:height, :width]


def _halve_all(mask: np.ndarray) -> np.ndarray:
    """A coarse pixel is set when all its fine pixels are (an odd edge is padded with its own)."""
    h, w = mask.shape
    padded = np.pad(mask, ((0, h % 2), (0, w % 2)), mode="edge")
    return padded.reshape((h + h % 2) // 2, 2, (w + w % 2) // 2, 2).all(axis=(1, 3))


def _source_count(hole: np.ndarray) -> int:
    return int((~_grow(hole, PATCHMATCH_RADIUS)).sum())


class _Level:
    """Image, hole and NNF of one scale, in edge-padded flat coordinates.

    Pixels are packed as 4 float32 (RGB and a zero) viewed as one complex128, so a single 1-D
    ``np.take`` gathers whole patches: about twice as fast as row fancy-indexing.
    """

    def __init__(self, image: np.ndarray, hole: np.ndarray, rng: np.random.Generator, allowed: np.ndarray | None = None):
        self.rng = rng
        self.hole = hole
        self.height, self.width = hole.shape
        r = PATCH_RADIUS
        self.padded_width = self.width + 2 * r
        targets = _grow(hole, r)
        self.target_y, self.target_x = np.nonzero(targets)
        self.target_flat = self._flat(self.target_y, self.target_x)
        self.valid = ~targets
        if allowed is not None and np.count_nonzero(self.valid & allowed) >= MIN_SOURCES:
            self.valid &= allowed
        self.sources = np.flatnonzero(self.valid)
        offsets = np.arange(-r, r + 1)
        dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
        self.tap_dy, self.tap_dx = dy.ravel(), dx.ravel()
        self.taps = self.tap_dy * self.padded_width + self.tap_dx
        self.image = np.zeros((self.height, self.width, 4), np.float32)
        self.image[..., :3] = image
        self.nnf_y = np.zeros(hole.shape, np.int32)
        self.nnf_x = np.zeros(hole.shape, np.int32)
        self._refresh_pixels()

    @property
    def nnf(self) -> tuple[np.ndarray, np.ndarray]:
        return self.nnf_y, self.nnf_x

    def _flat(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (y + PATCH_RADIUS) * self.padded_width + (x + PATCH_RADIUS)

    def _refresh_pixels(self) -> None:
        r = PATCH_RADIUS
        padded = np.pad(self.image, ((r, r), (r, r), (0, 0)), mode="edge")
        self.pixels = np.ascontiguousarray(padded).reshape(-1, 4)
        self.packed = self.pixels.view(np.complex128).ravel()

    def _refresh(self) -> None:
        """Recomputes the target patches and their distances after the image changed."""
        self._refresh_pixels()
        self.target_patches = self._patches(self.target_flat)
        ty, tx = self.target_y, self.target_x
        self.dist = self._distance(self.nnf_y[ty, tx], self.nnf_x[ty, tx])

    def _patches(self, flat: np.ndarray) -> np.ndarray:
        gathered = np.take(self.packed, flat[:, None] + self.taps[None, :])
        return gathered.view(np.float32).reshape(flat.size, self.taps.size, 4)

    def _distance(self, sy: np.ndarray, sx: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
        diff = self._patches(self._flat(sy, sx))
        diff -= self.target_patches if subset is None else self.target_patches[subset]
        diff *= diff
        return diff.sum(axis=(1, 2))

    def start_random(self) -> None:
        pick = self.sources[self.rng.integers(0, self.sources.size, self.target_y.size)]
        self.nnf_y[self.target_y, self.target_x] = pick // self.width
        self.nnf_x[self.target_y, self.target_x] = pick % self.width
        self._refresh()

    def start_from_coarser(self, coarse: tuple[np.ndarray, np.ndarray], vote_radius: int | None = 1) -> None:
        """Scales up a coarser level's NNF; with a ``vote_radius``, votes the hole from it and
        computes the patch distances a following search needs."""
        cy, cx = coarse
        ty, tx = self.target_y, self.target_x
        py = np.minimum(ty // 2, cy.shape[0] - 1)
        px = np.minimum(tx // 2, cy.shape[1] - 1)
        sy = np.clip(2 * cy[py, px] + ty % 2, 0, self.height - 1)
        sx = np.clip(2 * cx[py, px] + tx % 2, 0, self.width - 1)
        bad = ~self.valid[sy, sx]
        if bad.any():
            pick = self.sources[self.rng.integers(0, self.sources.size, int(bad.sum()))]
            sy[bad] = pick // self.width
            sx[bad] = pick % self.width
        self.nnf_y[ty, tx] = sy
        self.nnf_x[ty, tx] = sx
        self.dist = np.zeros(ty.size, np.float32)
        if vote_radius is not None:
            self.vote(radius=vote_radius, refresh=True)

    def _try(self, sy: np.ndarray, sx: np.ndarray) -> None:
        sy = np.clip(sy, 0, self.height - 1)
        sx = np.clip(sx, 0, self.width - 1)
        ok = np.flatnonzero(self.valid[sy, sx])
        if ok.size == 0:
            return
        d = self._distance(sy[ok], sx[ok], ok)
        better = d < self.dist[ok]
        idx = ok[better]
        self.dist[idx] = d[better]
        self.nnf_y[self.target_y[idx], self.target_x[idx]] = sy[idx]
        self.nnf_x[self.target_y[idx], self.target_x[idx]] = sx[idx]

    def search(self, sweeps: int, steps: tuple[int, ...] = (1, 4), max_radius: int | None = None) -> None:
        """PatchMatch: every target tries its neighbours' offsets (at distances ``steps``, all
        targets at once), then random sources within a radius halving from ``max_radius``
        (``None``: the whole level) to 1."""
        ty, tx = self.target_y, self.target_x
        h, w = self.height, self.width
        for _ in range(sweeps):
            for step in steps:
                for dy, dx in ((step, 0), (-step, 0), (0, step), (0, -step)):
                    ny = np.clip(ty - dy, 0, h - 1)
                    nx = np.clip(tx - dx, 0, w - 1)
                    self._try(self.nnf_y[ny, nx] + dy, self.nnf_x[ny, nx] + dx)
            radius = max(h, w) if max_radius is None else min(max_radius, max(h, w))
            while radius >= 1:
                self._try(
                    self.nnf_y[ty, tx] + self.rng.integers(-radius, radius + 1, ty.size),
                    self.nnf_x[ty, tx] + self.rng.integers(-radius, radius + 1, tx.size),
                )
                radius //= 2

    def vote(self, radius: int, refresh: bool = True) -> None:
        """Sets every hole pixel to the mean of what the patches within ``radius`` of it
        propose, weighted by patch similarity (Wexler et al., section 3.2). ``refresh``
        recomputes the patch distances, which only a following search needs."""
        scale = float(np.percentile(self.dist, 75)) if self.dist.size else 0.0
        weight = np.exp(-self.dist / (2 * scale)).astype(np.float32) if scale > 0 else np.ones_like(self.dist)
        h, w = self.height, self.width
        weights = np.zeros((h, w), np.float32)
        weights[self.target_y, self.target_x] = weight
        source = self._flat(self.nnf_y, self.nnf_x)
        # Gather per hole pixel from the patch centres around it: no scatter needed. Every
        # in-image centre within PATCH_RADIUS of a hole pixel is a target.
        hy, hx = np.nonzero(self.hole)
        acc = np.zeros((hy.size, 4), np.float32)
        wsum = np.zeros(hy.size, np.float32)
        for dy, dx, tap in zip(self.tap_dy, self.tap_dx, self.taps):
            if max(abs(dy), abs(dx)) > radius:
                continue
            cy, cx = hy - dy, hx - dx
            inside = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
            cy, cx = np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)
            wt = np.where(inside, weights[cy, cx], 0)
            acc += self.pixels[source[cy, cx] + tap] * wt[:, None]
            wsum += wt
        voted = wsum > 0
        self.image[hy[voted], hx[voted]] = acc[voted] / wsum[voted, None]
        if refresh:
            self._refresh()


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Returns ``mask`` dilated by a square of side ``2 * radius + 1``."""
    d = 2 * radius + 1
    counts = np.pad(mask.astype(np.int32), ((radius + 1, radius), (radius + 1, radius))).cumsum(0).cumsum(1)
    return (counts[d:, d:] - counts[:-d, d:] - counts[d:, :-d] + counts[:-d, :-d]) > 0


def _halve(image: np.ndarray, hole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Halves ``image`` by averaging known pixels; a coarse pixel is hole if any of its fine
    pixels is, so every coarse source is made of known pixels only."""
    h, w = hole.shape
    ph, pw = h + h % 2, w + w % 2
    img = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    msk = np.pad(hole, ((0, ph - h), (0, pw - w)), mode="edge")
    known = (~msk).astype(np.float32)
    count = known.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    total = (img * known[..., None]).reshape(ph // 2, 2, pw // 2, 2, -1).sum(axis=(1, 3))
    coarse = np.where(count[..., None] > 0, total / np.maximum(count, 1)[..., None], 0)
    return coarse.astype(np.float32), msk.reshape(ph // 2, 2, pw // 2, 2).any(axis=(1, 3))


def _push_pull(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Returns float32 ``image`` with ``hole`` filled by push-pull interpolation, a smooth
    surface from the hole's edge; mid grey where nothing is known."""
    out = image.astype(np.float32)
    if hole.all():
        out[...] = 127.5
        return out
    known = (~hole).astype(np.float32)
    levels = [(out * known[..., None], known)]
    while max(levels[-1][1].shape) > 1:
        value, weight = levels[-1]
        h, w = weight.shape
        ph, pw = h + h % 2, w + w % 2
        value = np.pad(value, ((0, ph - h), (0, pw - w), (0, 0)))
        weight = np.pad(weight, ((0, ph - h), (0, pw - w)))
        levels.append(
            (
                value.reshape(ph // 2, 2, pw // 2, 2, -1).sum(axis=(1, 3)),
                weight.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3)),
            )
        )
    value, weight = levels[-1]
    estimate = value / np.maximum(weight, 1e-6)[..., None]
    for value, weight in reversed(levels[:-1]):
        h, w = weight.shape
        up = _blur3(np.repeat(np.repeat(estimate, 2, axis=0), 2, axis=1)[:h, :w])
        alpha = np.minimum(weight, 1.0)[..., None]
        estimate = alpha * value / np.maximum(weight, 1e-6)[..., None] + (1 - alpha) * up
    out[hole] = estimate[hole]
    return out


def _blur3(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def _harmonic_fill(image: np.ndarray, hole: np.ndarray, sweeps: int = HARMONIC_SWEEPS) -> np.ndarray:
    """Returns float32 ``image`` with ``hole`` filled by the membrane: the harmonic function
    (Laplace's equation) taking the known pixels' values at the hole's edge, with no flux
    across the image border; mid grey where nothing is known.

    Solved coarse to fine: the hole is solved at half size (recursively), scaled up, and
    relaxed by ``sweeps`` red-black SOR sweeps (``HARMONIC_SWEEPS`` at the coarser scales);
    the coarsest start is push-pull.
    """
    out = image.astype(np.float32)
    if not hole.any():
        return out
    if hole.all():
        out[...] = 127.5
        return out
    height, width = hole.shape
    smaller, smaller_hole = _halve(out, hole) if min(height, width) >= 8 else (None, None)
    if smaller_hole is None or smaller_hole.all() or int(hole.sum()) <= 64:
        guess = _push_pull(out, hole)
    else:
        coarse = _harmonic_fill(smaller, smaller_hole)
        guess = out
        up = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)[:height, :width]
        guess[hole] = up[hole]
    return _relax(guess, hole, sweeps)


def _relax(image: np.ndarray, hole: np.ndarray, sweeps: int) -> np.ndarray:
    """Red-black successive over-relaxation of Laplace's equation on the hole's pixels,
    in place; neighbours outside the image are left out (no flux across the border)."""
    height, width = hole.shape
    flat = image.reshape(-1, 3)
    ys, xs = np.nonzero(hole)
    here = ys * width + xs
    neighbours = np.stack([here - width, here + width, here - 1, here + 1], axis=1)
    inside = np.stack([ys > 0, ys < height - 1, xs > 0, xs < width - 1], axis=1)
    neighbours = np.where(inside, neighbours, here[:, None])
    weights = inside.astype(np.float32)
    colours = [np.flatnonzero((ys + xs) % 2 == parity) for parity in (0, 1)]
    groups = [
        (here[c], neighbours[c], weights[c][..., None], 1.0 / weights[c].sum(axis=1, keepdims=True))
        for c in colours
        if c.size
    ]
    for _ in range(sweeps):
        for index, around, weight, inverse in groups:
            mean = (flat[around] * weight).sum(axis=1) * inverse
            flat[index] += HARMONIC_OVERRELAX * (mean - flat[index])
    return image


def _blur_in_hole(difference: np.ndarray, hole: np.ndarray, sigma: float) -> np.ndarray:
    """Returns ``difference`` zeroed outside ``hole`` and blurred by a Gaussian of ``sigma``
    pixels, edge-padded at the image border; computed only around the hole."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma)).astype(np.float32)
    kernel /= kernel.sum()
    rows = np.flatnonzero(hole.any(axis=1))
    cols = np.flatnonzero(hole.any(axis=0))
    top, left = max(0, rows[0] - radius), max(0, cols[0] - radius)
    bottom, right = min(hole.shape[0], rows[-1] + 1 + radius), min(hole.shape[1], cols[-1] + 1 + radius)
    box = (slice(top, bottom), slice(left, right))
    inside = np.where(hole[box][..., None], difference[box], 0).astype(np.float32)
    h, w = inside.shape[:2]
    padded = np.pad(inside, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    blurred = sum(k * padded[i : i + h] for i, k in enumerate(kernel))
    padded = np.pad(blurred, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    blurred = sum(k * padded[:, i : i + w] for i, k in enumerate(kernel))
    out = np.zeros_like(difference, dtype=np.float32)
    out[box] = blurred
    return out
