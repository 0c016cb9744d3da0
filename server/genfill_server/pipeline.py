"""The fill pipeline around an engine: crop, scale, mask, run, match, composite.

Vocabulary as in ``genfill.fill``. Everything here is numpy on arrays; the engine is the only
part that may touch a GPU. Outside the selection the result layers are fully transparent, so
the composite there is the input, bit for bit, whatever the engine returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from genfill import fill
from genfill.fill import Box, Size
from genfill.protocol import ErrorCode, FillRequest, Mode

from .engines.base import Engine, EngineJob, StepCallback
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
        mask = mask[:, :, 3] if np.all(mask[:, :, :3] == mask[:1, :1, :3]) else mask[:, :, 0]
    if mask.shape != image.shape[:2]:
        raise RequestError(
            ErrorCode.SIZE_MISMATCH,
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}",
        )
    return image, mask


def run_fill(
    engine: Engine,
    request: FillRequest,
    canvas: np.ndarray,
    selection: np.ndarray,
    seeds: list[int],
    on_step: StepCallback,
    control_images: list[np.ndarray | None] | None = None,
) -> PipelineResult:
    """Runs one request through ``engine``; blocking.

    Args:
        canvas: ``(H, W, 4)`` uint8 RGBA, the image the client sent (grown, for expand).
        selection: ``(H, W)`` uint8, 0 keeps, 255 replaces.
        seeds: one per variation.
        control_images: one per ``request.control`` entry: a decoded control image the size of
            ``canvas`` (RGBA or gray uint8), or ``None`` where the engine derives one.
    """
    try:
        context = fill.context_box(selection, native_size=engine.native_size)
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
    if engine.native_size is not None:
        work_size = fill.target_size(context.size, engine.native_size)
    work_rgb = fill.resize(rgb, work_size)
    work_selection = fill.resize(local_selection, work_size)
    options = request.model_dump(exclude={"image", "mask", "region"})
    # Engines see control images as arrays cropped and scaled like the image, never as ids.
    for control, image in zip(options["control"], control_images or [None] * len(options["control"])):
        if image is not None:
            rgb_control = image if image.ndim == 2 else image[:, :, :3]
            control["image"] = fill.resize(np.ascontiguousarray(fill.crop(rgb_control, context)), work_size)
    job = EngineJob(
        image=work_rgb,
        selection=work_selection,
        denoise_mask=fill.denoise_mask(work_selection, grow_px=grow_px, feather_px=feather_px),
        seeds=list(seeds),
        options=options,
    )
    generated = engine.run(job, on_step)
    if len(generated) != len(seeds):
        raise RuntimeError(f"engine {engine.name} returned {len(generated)} images for {len(seeds)} seeds")

    alpha = fill.compositing_mask(local_selection, blend_px=blend_px)
    try:
        changed = fill.mask_box(alpha)
    except fill.EmptyMaskError:
        raise RequestError(ErrorCode.EMPTY_SELECTION, "the selection is too faint to change any pixel") from None
    known = local_selection == 0
    layers = []
    for image in generated:
        if image.shape[:2] != (work_size.height, work_size.width):
            raise RuntimeError(f"engine {engine.name} returned {image.shape} for {work_size}")
        image = fill.resize(np.ascontiguousarray(image[:, :, :3]), context.size)
        if getattr(engine, "needs_colour_match", True):
            image = fill.match_colour(image, rgb, known)
        layer = fill.make_layer(fill.crop(image, changed), fill.crop(alpha, changed))
        layers.append(layer)
    box = Box(context.x + changed.x, context.y + changed.y, changed.width, changed.height)
    return PipelineResult(box=box, layers=layers)
