"""The classic engine: content-aware fill from the image itself, needing no model weights.

The fill is PatchMatch completion (Barnes et al., "PatchMatch", SIGGRAPH 2009; Wexler,
Shechtman and Irani, "Space-Time Completion of Video", PAMI 2007) whose low frequencies are
replaced by a membrane's, in four stages:

1. *Context*: only a box around the hole takes part, the hole's bounding box grown by half its
   longer side. Nearby sources are the relevant ones; on the benchmark in
   ``benchmarks/classic_quality.py`` the crop raises PSNR and texture kept over a search of
   the whole image, and it makes small holes in large images cheap.
2. *Completion at working scale*: the context is halved until it has at most
   ``WORK_PIXELS`` pixels, and PyPatchMatch fills the hole there. Its multi-scale
   expectation-maximisation continues regular textures (bricks, stripes) where the
   vectorised numpy completion we measured against it smeared them. At half scale its
   ``7 x 7`` patches see twice as far, which scored higher PSNR than full scale, in half the
   time.
3. *Refinement*: for contexts larger than the working scale, a nearest-neighbour field (NNF)
   is searched for the working-scale fill, then scaled up an octave at a time. Intermediate
   octaves are voted from their sources and refined by a local PatchMatch search; the finest
   copies every hole pixel from the full-resolution source its NNF points at, which keeps
   the sources' detail (texture kept 0.85 on the benchmark, against 0.78 with a search).
4. *Frequency split*: PSNR is ruled by the low frequencies, where a copied patch is often
   wrong but a smooth fill from the hole's edge is close; texture lives in the high ones.
   The fill's low band, a Gaussian of ``LOW_BAND_SIGMA`` pixels, is replaced by that of the
   membrane (the harmonic fill: Laplace's equation with the edge as boundary). On the
   benchmark the membrane alone scores 16.7 dB and keeps 0.13 of the texture, the patches
   15.8 dB and 0.87; a split at 4 px scores 16.2 dB but washes out structure a few tens of
   pixels across (a brick wall's courses fade to a haze), so the split sits at 12 px:
   16.05 dB, 0.87, with the courses kept.

Vocabulary: the *hole* is the set of pixels to replace; *targets* are the centres of patches
that overlap the hole (the hole grown by the patch radius); *sources* are the centres of
patches with no hole pixel, the only ones that may be copied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from genfill.protocol import ErrorCode

from .base import DeviceKind, EngineCapabilities, EngineDefaults, EngineError, EngineJob, StepCallback

WORK_PIXELS = 80_000
"""The context is halved until it has at most this many pixels before PyPatchMatch runs: at
512 px every benchmark context is halved once, and PyPatchMatch takes about 0.3 s."""

PATCHMATCH_RADIUS = 3
"""PyPatchMatch compares ``7 x 7`` patches; its examples use 3, and 2 and 4 measured worse."""

CONTEXT_MARGIN = 0.5
"""The context box is the hole's bounding box grown by this fraction of its longer side ..."""

MIN_CONTEXT_MARGIN_PX = 32
"""... and by at least this many pixels."""

PATCH_RADIUS = 2
"""The refinement compares ``(2 * PATCH_RADIUS + 1)``-pixel square patches."""

REFINE_SWEEPS = 1
"""PatchMatch sweeps (propagation, then random search within 4 px) per intermediate octave."""

REFINE_SEARCH_TARGETS = 200_000
"""Octaves with more target patches than this take the scaled-up NNF without searching it,
which keeps a 15% hole in a 2048 x 2048 image within a few seconds."""

COARSE_SWEEPS = 2
"""PatchMatch sweeps that find, at the working scale, where PyPatchMatch's fill came from (its
NNF is not exposed); 3 scored 0.03 dB lower after the split and kept less texture (0.83)."""

LOW_BAND_SIGMA = 12.0
"""The fill's low band, a Gaussian of this many pixels, comes from the membrane, the rest from
the patches. On the benchmark 3 px gave 16.25 dB and texture 0.83, 4 px 16.20 dB and 0.85,
5 px 16.16 dB and 0.85, 6 px 16.13 dB and 0.86."""

LOW_BAND_WEIGHT = 1.0
"""Weight of the membrane in the low band (1: all of it; 0.75 and 0.5 scored lower)."""

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


class Box(NamedTuple):
    x: int
    y: int
    width: int
    height: int


def content_aware_fill(
    image: np.ndarray,
    hole: np.ndarray,
    *,
    seed: int,
    on_step: ProgressCallback | None = None,
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

    box = context_box(hole)
    crop = (slice(box.y, box.y + box.height), slice(box.x, box.x + box.width))
    filled = _fill_context(image[crop], hole[crop], np.random.default_rng(seed), seed, report)
    region = out[crop]
    region[hole[crop]] = filled[hole[crop]]
    return out


def context_box(hole: np.ndarray) -> Box:
    """Returns the part of the image the fill looks at: the hole's bounding box grown by
    ``CONTEXT_MARGIN`` of its longer side (at least ``MIN_CONTEXT_MARGIN_PX``), clipped to
    the image. ``hole`` must have at least one ``True`` pixel."""
    rows = np.flatnonzero(hole.any(axis=1))
    cols = np.flatnonzero(hole.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    margin = max(MIN_CONTEXT_MARGIN_PX, round(CONTEXT_MARGIN * max(bottom - top, right - left)))
    height, width = hole.shape
    top, left = max(0, top - margin), max(0, left - margin)
    bottom, right = min(height, bottom + margin), min(width, right + margin)
    return Box(int(left), int(top), int(right - left), int(bottom - top))


def _ignore_step(step: int, total: int, preview: np.ndarray | None) -> None:
    pass


class ClassicEngine:
    """The ``Engine`` for content-aware fill; needs no weights and runs on the CPU."""

    name = "classic"
    capabilities = EngineCapabilities(prompt=False, device_kind=DeviceKind.CPU, needs_colour_match=True)
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
        if not hole.any():
            raise EngineError(ErrorCode.EMPTY_SELECTION, "the selection is empty: there is nothing to fill")
        seeds = list(job.seeds)
        results: list[np.ndarray] = []
        for index, seed in enumerate(seeds):

            def report(step: int, total: int, preview: np.ndarray | None, index: int = index) -> None:
                on_step(index * total + step, len(seeds) * total, preview)

            results.append(content_aware_fill(job.image, hole, seed=seed, on_step=report))
        return results


def _fill_context(
    image: np.ndarray, hole: np.ndarray, rng: np.random.Generator, seed: int, report: ProgressCallback
) -> np.ndarray:
    """Returns the context ``image`` with ``hole`` filled, ``(h, w, 3)`` uint8."""
    images = [image.astype(np.float32)]
    holes = [hole]
    while images[-1].shape[0] * images[-1].shape[1] > WORK_PIXELS:
        smaller, smaller_hole = _halve(images[-1], holes[-1])
        images.append(smaller)
        holes.append(smaller_hole)
    octaves = len(images) - 1
    total = 4 + octaves
    report(1, total, None)

    if _source_count(holes[-1]) < MIN_SOURCES:
        filled = _harmonic_fill(images[0], holes[0])
        report(total, total, None)
        return np.clip(np.rint(filled), 0, 255).astype(np.uint8)

    work = np.clip(np.rint(images[-1]), 0, 255).astype(np.uint8)
    work = _patchmatch(work, holes[-1], seed).astype(np.float32)
    report(2, total, None)
    if octaves:
        level = _Level(work, holes[-1], rng)
        level.start_random()
        level.search(sweeps=COARSE_SWEEPS)
        report(3, total, None)
        for octave in reversed(range(octaves)):
            finer = _Level(images[octave], holes[octave], rng)
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

    # Low band from the membrane, high band from the copied patches.
    smooth = _harmonic_fill(images[0], holes[0], HARMONIC_TOP_SWEEPS)
    work = work + LOW_BAND_WEIGHT * _blur_in_hole(smooth - work, holes[0], LOW_BAND_SIGMA)
    report(total, total, None)
    return np.clip(np.rint(work), 0, 255).astype(np.uint8)


def _patchmatch(image: np.ndarray, hole: np.ndarray, seed: int) -> np.ndarray:
    import patchmatch

    with _patchmatch_lock:
        patchmatch.set_random_seed(seed)
        return patchmatch.inpaint(image, hole.astype(np.uint8), patch_size=PATCHMATCH_RADIUS)


def _source_count(hole: np.ndarray) -> int:
    return int((~_grow(hole, PATCHMATCH_RADIUS)).sum())


class _Level:
    """Image, hole and NNF of one scale, in edge-padded flat coordinates.

    Pixels are packed as 4 float32 (RGB and a zero) viewed as one complex128, so a single 1-D
    ``np.take`` gathers whole patches: about twice as fast as row fancy-indexing.
    """

    def __init__(self, image: np.ndarray, hole: np.ndarray, rng: np.random.Generator):
        self.rng = rng
        self.hole = hole
        self.height, self.width = hole.shape
        r = PATCH_RADIUS
        self.padded_width = self.width + 2 * r
        targets = _grow(hole, r)
        self.target_y, self.target_x = np.nonzero(targets)
        self.target_flat = self._flat(self.target_y, self.target_x)
        self.valid = ~targets
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
