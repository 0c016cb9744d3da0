"""The fill pipeline around an engine: crop, scale, mask, run, match, composite.

Vocabulary as in ``genfill.fill``. Everything here is numpy on arrays; the engine is the only
part that may touch a GPU. Outside the selection the result layers are fully transparent, so
the composite there is the input, bit for bit, whatever the engine returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from genfill import fill
from genfill.fill import Box, Size
from genfill.images import to_mask
from genfill.protocol import ErrorCode, FillRequest, ImageReference, Mode, ReferenceRole

from .engines.base import ControlSpec, Engine, EngineJob, EngineOptions, EngineReference, StepCallback
from .engines.prefill import prefill
from .errors import RequestError


@dataclass(frozen=True)
class PipelineResult:
    """Layers the size of ``box``, ``(h, w, 4)`` uint8 RGBA, in the coordinates of the canvas
    the client sent (the grown canvas for ``expand``)."""

    box: Box
    layers: list[np.ndarray]


@dataclass(frozen=True)
class MaskDefaults:
    grow_px: int
    feather_px: int
    blend_px: int


def mask_defaults(context: Size) -> MaskDefaults:
    """Mask widths scale with the context: a few pixels at 512, proportionally more above."""
    side = max(context.width, context.height)
    return MaskDefaults(
        grow_px=max(2, side // 64),
        feather_px=max(2, side // 64),
        blend_px=max(1, side // 128),
    )


def prepare_canvas(
    request: FillRequest, image: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the ``(H, W, 4)`` RGBA canvas and ``(H, W)`` selection a request works on.

    Raises:
        RequestError: ``size_mismatch``, ``empty_selection`` or ``invalid_request``.
    """
    if image.ndim == 2:
        image = np.dstack([image, image, image, np.full_like(image, 255)])
    if request.mode is Mode.EXPAND:
        if request.expand is None:
            raise RequestError(ErrorCode.INVALID_REQUEST, "mode 'expand' needs expand margins")
        margins = request.expand
        return fill.expand_canvas(
            image, left=margins.left, right=margins.right, top=margins.top, bottom=margins.bottom
        )
    if request.expand is not None:
        raise RequestError(ErrorCode.INVALID_REQUEST, "expand margins are only for mode 'expand'")
    if mask is None:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"mode '{request.mode}' needs a mask")
    if mask.ndim == 3:
        mask = to_mask(mask)
    if mask.shape != image.shape[:2]:
        raise RequestError(
            ErrorCode.SIZE_MISMATCH,
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}",
        )
    return image, mask


@dataclass(frozen=True)
class PreparedFill:
    """A request made ready for its engine (``prepare_fill``), and what ``finish_fill``
    needs to turn the engine's images into layers."""

    job: EngineJob
    context: Box
    work_size: Size
    rgb: np.ndarray  # (h, w, 3) the context crop, canvas resolution
    local_selection: np.ndarray  # (h, w) the selection in the context crop
    blend_px: int
    early: Future = field(compare=False)
    """``_Early`` parts of ``finish_fill``, computed on a helper thread while the engine runs."""


@dataclass(frozen=True)
class _Early:
    """What ``finish_fill`` needs that does not depend on the engine's images."""

    alpha: np.ndarray | None  # None: nothing to change (finish_fill raises)
    changed: Box | None
    work_known: np.ndarray
    original_statistics: fill.ColourStatistics | None


_PARTS = max(2, min(4, os.cpu_count() or 1))
"""Colour work is split into up to this many row bands, one a thread: numpy releases the GIL
in its loops, and beyond four bands of a 512 px image the hand-overs cost what they save."""
_HELPERS = ThreadPoolExecutor(max_workers=_PARTS, thread_name_prefix="genfill-finish")
_SPLIT_PIXELS = 1 << 15
"""Colour work on fewer pixels than this a band stays on one thread: the hand-over would
cost more than it saves."""


def _early(needs_colour_match: bool, local_selection: np.ndarray, blend_px: int, job: EngineJob) -> _Early:
    alpha = fill.compositing_mask(local_selection, blend_px=blend_px)
    work_known = job.selection == 0
    try:
        changed = fill.mask_box(alpha)
    except fill.EmptyMaskError:
        return _Early(None, None, work_known, None)
    statistics = None
    if needs_colour_match and np.count_nonzero(work_known) >= fill._MIN_KNOWN_PIXELS:  # noqa: SLF001
        statistics = fill.colour_statistics(job.image, work_known)
    return _Early(alpha, changed, work_known, statistics)


References = Sequence[tuple[ImageReference, np.ndarray]]
"""A request's extra images, decoded: each reference with its image (``crop="context"``
ones the size of the canvas)."""


def engine_options(
    engine: Engine,
    request: FillRequest,
    control: Sequence[ControlSpec] | None = None,
    references: Sequence[EngineReference] = (),
) -> EngineOptions:
    """The request's generation options with ``engine``'s defaults filled in. ``control``
    ``None`` means the request's own control entries, without images."""
    if control is None:
        control = [ControlSpec(c.type, c.strength, c.start, c.end) for c in request.control if c.image is None]
    return EngineOptions.resolve(
        engine.defaults,
        mode=request.mode,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        strength=request.strength,
        guidance=request.guidance,
        scheduler=request.scheduler,
        control=control,
        references=references,
    )


def batch_key(engine: Engine, request: FillRequest, selection: np.ndarray) -> tuple | None:
    """The key under which ``engine`` can run this request in one batch with others
    (``run_many``), or ``None`` where it runs alone: an engine without batching, a request
    with control inputs or references, an empty selection."""
    capabilities = engine.capabilities
    if not capabilities.batching or request.control or request.references:
        return None
    try:
        context = fill.context_box(selection, native_size=capabilities.native_size)
    except fill.EmptyMaskError:
        return None
    work_size = context.size
    if capabilities.native_size is not None:
        work_size = fill.target_size(context.size, capabilities.native_size)
    key = engine.batch_key((work_size.height, work_size.width), engine_options(engine, request))  # type: ignore[attr-defined]
    return None if key is None else (work_size, key)


def run_fill(
    engine: Engine,
    request: FillRequest,
    canvas: np.ndarray,
    selection: np.ndarray,
    seeds: list[int],
    on_step: StepCallback,
    references: References = (),
) -> PipelineResult:
    """Runs one request through ``engine``; blocking.

    Args:
        canvas: ``(H, W, 4)`` uint8 RGBA, the image the client sent (grown, for expand).
        selection: ``(H, W)`` uint8, 0 keeps, 255 replaces.
        seeds: one per variation.
        references: the request's extra images (``References``); a ``control`` entry's own
            ``image`` is read only from here, as the server turned it into a reference.
    """
    prepared = prepare_fill(engine, request, canvas, selection, seeds, references)
    return finish_fill(engine, prepared, engine.run(prepared.job, on_step))


def prepare_fill(
    engine: Engine,
    request: FillRequest,
    canvas: np.ndarray,
    selection: np.ndarray,
    seeds: list[int],
    references: References = (),
) -> PreparedFill:
    """The first half of ``run_fill``: crops, scales and masks; arguments as there."""
    capabilities = engine.capabilities
    native_size = capabilities.native_size
    try:
        context = fill.context_box(selection, native_size=native_size)
    except fill.EmptyMaskError:
        raise RequestError(ErrorCode.EMPTY_SELECTION, "the selection is empty: nothing to fill") from None
    defaults = mask_defaults(context.size)
    grow_px = defaults.grow_px if request.grow_px is None else request.grow_px
    feather_px = defaults.feather_px if request.feather_px is None else request.feather_px
    # A grown canvas's new area is transparent: a soft edge there would leave a half-transparent
    # seam, and the old pixels stay as they are anyway.
    blend_px = 0 if request.mode is Mode.EXPAND else (defaults.blend_px if request.blend_px is None else request.blend_px)

    rgb = np.ascontiguousarray(fill.crop(canvas, context)[:, :, :3])
    local_selection = fill.crop(selection, context)
    work_size = context.size
    if native_size is not None:
        work_size = fill.target_size(context.size, native_size)
    work_rgb = fill.resize(rgb, work_size)
    work_selection = fill.resize(local_selection, work_size)
    control = [ControlSpec(c.type, c.strength, c.start, c.end) for c in request.control if c.image is None]
    extra: list[EngineReference] = []
    for reference, image in references:
        # Engines see every extra image as an array cropped and scaled like the image (or, for
        # ``crop="whole"``, as uploaded), never as an id.
        if image.ndim == 3:
            image = image[:, :, :3]
        if reference.cropped:
            image = fill.resize(np.ascontiguousarray(fill.crop(image, context)), work_size)
        image = np.ascontiguousarray(image)
        if reference.role is ReferenceRole.CONTROL:
            assert reference.control_type is not None  # ImageReference's validator
            control.append(ControlSpec(reference.control_type, reference.weight, reference.start, reference.end, image))
        else:
            extra.append(EngineReference(reference.role, image, reference.weight, reference.start, reference.end))
    options = engine_options(engine, request, control, extra)
    # The pre-fill and the masks each take milliseconds of numpy: side by side, the engine
    # starts sooner.
    prefilled = None
    if capabilities.uses_prefill:
        prefilled = _HELPERS.submit(prefill, work_rgb, work_selection, str(options.mode))
    job = EngineJob(
        image=work_rgb,
        selection=work_selection,
        denoise_mask=fill.denoise_mask(work_selection, grow_px=grow_px, feather_px=feather_px),
        seeds=list(seeds),
        options=options,
        prefilled=prefilled,
    )
    early = _HELPERS.submit(_early, capabilities.needs_colour_match, local_selection, blend_px, job)
    return PreparedFill(job, context, work_size, rgb, local_selection, blend_px, early)


def finish_fill(engine: Engine, prepared: PreparedFill, generated: list[np.ndarray]) -> PipelineResult:
    """The second half of ``run_fill``: colour match and layers from the engine's images.

    The colour transform is measured at the engine's working resolution, where the images
    are, and applied, at canvas resolution, to the part that becomes the layer only: the
    context around it can be many times larger. What does not depend on the images (the
    compositing mask, the original's colour statistics) was computed while the engine ran.
    """
    context, work_size = prepared.context, prepared.work_size
    if len(generated) != len(prepared.job.seeds):
        raise RuntimeError(f"engine {engine.name} returned {len(generated)} images for {len(prepared.job.seeds)} seeds")
    early = prepared.early.result()
    if early.alpha is None:
        raise RequestError(ErrorCode.EMPTY_SELECTION, "the selection is too faint to change any pixel")
    alpha, changed, work_known = early.alpha, early.changed, early.work_known
    layer_alpha = fill.crop(alpha, changed)
    layers = []
    for image in generated:
        if image.shape[:2] != (work_size.height, work_size.width):
            raise RuntimeError(f"engine {engine.name} returned {image.shape} for {work_size}")
        image = np.ascontiguousarray(image[:, :, :3])
        transform = None
        # Measured only for engines that need colour matching, where enough pixels are known.
        if early.original_statistics is not None:
            parts = _side_by_side(fill.colour_statistics, _row_bands(image, work_known))
            transform = fill.colour_transform(
                image,
                prepared.job.image,
                work_known,
                original_statistics=early.original_statistics,
                generated_statistics=fill.merge_statistics(parts),
            )
        if work_size != context.size:
            image = fill.resize(image, context.size)
        image = np.ascontiguousarray(image[changed.slices])
        if transform is not None:
            # Each pixel's colour depends on that pixel only: the bands join seamlessly.
            bands = _side_by_side(lambda part, transform=transform: fill.apply_colour_transform(part, transform), _row_bands(image))
            image = np.concatenate(bands) if len(bands) > 1 else bands[0]
        layers.append(fill.make_layer(image, layer_alpha))
    box = Box(context.x + changed.x, context.y + changed.y, changed.width, changed.height)
    return PipelineResult(box=box, layers=layers)


def _row_bands(*arrays: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """``arrays`` (all of one height) cut into up to ``_PARTS`` bands of rows, top to bottom,
    or the whole where a split would not pay."""
    height, width = arrays[0].shape[:2]
    parts = max(1, min(_PARTS, height * width // _SPLIT_PIXELS, height))
    edges = [height * index // parts for index in range(parts + 1)]
    return [tuple(array[top:bottom] for array in arrays) for top, bottom in zip(edges, edges[1:])]


def _side_by_side(function, parts: list[tuple[np.ndarray, ...]]) -> list:
    """``[function(*part) for part in parts]``, the first part on this thread and the others
    on the helpers meanwhile: numpy releases the GIL in its loops, so on several cores a
    colour conversion keeps a result waiting a fraction of the time."""
    pending = [_HELPERS.submit(function, *part) for part in parts[1:]]
    return [function(*parts[0])] + [future.result() for future in pending]
