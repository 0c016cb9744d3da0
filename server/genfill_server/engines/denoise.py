"""The denoising loop of the SD 1.5/2.x and SDXL engines (``sd_inpaint``, ``controlnet``).

One call denoises the rows of one or more jobs together (``Part``), each job's prepared
tensors (``Batch``) expanded to its variations, with differential denoising: before step
``i`` of ``N`` every latent cell whose denoise mask ``m`` is not above ``1 - (i + 1) / N`` is
reset to the original latents noised to that step's level, so a cell of mask ``m`` is
denoised for its last ``m * N`` steps and a cell of ``m == 0`` ends as the original latents
exactly. The engine hands in what the loop needs of it: the step to call (the UNet and the
guidance combine, graphed or not), the decoder, and for ControlNets their residuals.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import JobCancelledError, StepCallback
from .latent_preview import preview_due, preview_rgb
from .schedulers import noise_coefficients, strength_timesteps

__all__ = ["Batch", "ControlResiduals", "Part", "denoise"]

_BATCHED_DECODE_LATENT_PIXELS = 8 * 64 * 64
"""``denoise`` decodes every job's latents in one decoder call up to this many latent pixels
in all (eight 512x512 images at SD's factor of 8); larger batches decode job by job."""


@dataclass
class Batch:
    """One job's prepared tensors, shared by every chunk of its variations."""

    x0: torch.Tensor  # (1, C, h, w) original latents, in the denoiser's space
    m: torch.Tensor  # (1, 1, h, w) denoise mask in [0, 1]
    inpaint_cond: torch.Tensor | None  # (1, 1 + C, h, w) mask and masked-image latents
    embeds: torch.Tensor  # (2 or 1, L, D): negative first when guiding
    added: dict[str, torch.Tensor] | None  # SDXL micro-conditioning, batch as embeds
    guidance: float
    scheduler_name: str
    steps: int
    strength: float
    m_host: torch.Tensor | None = None  # ``m`` on the CPU, to decide each step without a sync

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one denoising batch."""
        return (tuple(self.x0.shape[1:]), self.x0.dtype, self.inpaint_cond is not None, tuple(self.embeds.shape[1:]),
                self.added is None, self.guidance, self.scheduler_name, self.steps, self.strength)


@dataclass
class Part:
    """The rows of one job (or one chunk of its variations) in a denoising batch."""

    batch: Batch
    seeds: list[int]
    on_step: StepCallback
    chunk_index: int = 0
    chunk_count: int = 1
    images: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None


ControlResiduals = Callable[..., "tuple[list[torch.Tensor], torch.Tensor] | None"]
"""``(step, total, model_in, t, embeds, added, rows) -> (down, mid)``: a ControlNet's
residuals for the UNet at step ``step`` of ``total``, for ``rows`` latent rows; ``None``
where no control acts at that step (``SDInpaintEngine._control_residuals``, bound to the
job's prepared controls)."""


def denoise(
    parts: list[Part],
    scheduler: Any,
    *,
    step: Callable[..., torch.Tensor],
    decode: Callable[[torch.Tensor], list[np.ndarray]],
    control_residuals: ControlResiduals | None,
    device: torch.device,
    dtype: torch.dtype,
    family: str,
) -> None:
    """Denoises every part's rows in one batch; fills each part's ``images`` or ``error``.

    ``JobCancelledError`` from a part's ``on_step`` ends that part (no more callbacks, its
    rows discarded); the loop stops, before its next UNet call, once no part is left.

    Args:
        parts: the jobs' rows; every part's ``batch`` has the same ``batch_key()``.
        scheduler: a fresh scheduler of the parts' kind (``schedulers.make_scheduler``); the
            loop sets its timesteps.
        step: ``(scaled, t, inpaint_cond, embeds, added, residuals, guidance) -> noise_pred``,
            the UNet and the guidance combine (``SDInpaintEngine.step_runner``).
        decode: latents ``(B, C, h, w)`` -> ``B`` ``(H, W, 3)`` uint8 RGB images.
        control_residuals: ControlNet residuals per step; ``None`` runs the UNet alone.
        device: where the loop's tensors live.
        dtype: the denoiser's dtype.
        family: ``"sd15"`` or ``"sdxl"``, for the latent-to-RGB previews.
    """
    first = parts[0].batch
    timesteps, start = strength_timesteps(scheduler, first.steps, first.strength, device)
    total_steps = len(timesteps)
    timesteps_host = scheduler.timesteps.cpu()
    seeds = [seed for part in parts for seed in part.seeds]
    counts = [len(part.seeds) for part in parts]
    size = len(seeds)
    offsets = np.cumsum([0, *counts]).tolist()
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    shape = tuple(first.x0.shape[1:])
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    noise = noise.to(device, dtype)

    def rows(tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].expand(counts[0], *tensors[0].shape[1:])
        return torch.cat([t.expand(n, *t.shape[1:]) for t, n in zip(tensors, counts)])

    x0 = rows([part.batch.x0 for part in parts])
    m = rows([part.batch.m for part in parts])
    m_host = [part.batch.m_host for part in parts]
    if first.strength >= 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(size))
    guiding = first.guidance > 1.0
    guidance = torch.tensor(first.guidance, device=device, dtype=dtype) if guiding else None
    if guiding:
        embeds = torch.cat([rows([p.batch.embeds[:1] for p in parts]), rows([p.batch.embeds[1:] for p in parts])])
    else:
        embeds = rows([p.batch.embeds for p in parts]).contiguous()
    added = None
    if first.added is not None:
        added = {}
        for key in first.added:
            if guiding:
                added[key] = torch.cat([
                    rows([p.batch.added[key][:1] for p in parts]), rows([p.batch.added[key][1:] for p in parts])
                ])
            else:
                added[key] = rows([p.batch.added[key] for p in parts]).contiguous()
    inpaint_cond = None
    if first.inpaint_cond is not None:
        cond_rows = rows([part.batch.inpaint_cond for part in parts])
        inpaint_cond = torch.cat([cond_rows, cond_rows]) if guiding else cond_rows.contiguous()
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    live = list(range(len(parts)))
    try:
        for i, t in enumerate(timesteps):
            threshold = 1.0 - (i + 1) / total_steps
            if not all(bool((host > threshold).all()) for host in m_host if host is not None):
                active = (m > threshold).to(latents.dtype)
                keep_scale, noise_scale = noise_coefficients(
                    scheduler, timesteps_host[start + i].reshape(1), timesteps_host
                )
                noised = x0 * keep_scale + noise * noise_scale
                latents = active * latents + (1 - active) * noised
            scaled = scheduler.scale_model_input(latents, t)
            residuals = None
            if control_residuals is not None:
                model_in = torch.cat([scaled, scaled]) if guiding else scaled
                residuals = control_residuals(i, total_steps, model_in, t, embeds, added, size)
            noise_pred = step(scaled, t, inpaint_cond, embeds, added, residuals, guidance)
            out = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
            latents = out.prev_sample
            previews: list[np.ndarray | None] = [None] * len(parts)
            if preview_due(i + 1, total_steps):
                x0_pred = getattr(out, "pred_original_sample", None)
                source = latents if x0_pred is None else x0_pred
                firsts = source[[offsets[index] for index in live]].float().cpu().numpy()
                for index, latent in zip(live, firsts):
                    previews[index] = preview_rgb(latent, family)
            for index in list(live):
                part = parts[index]
                try:
                    # Progress counts the steps of every chunk of variations.
                    part.on_step(part.chunk_index * total_steps + i + 1, part.chunk_count * total_steps, previews[index])
                except JobCancelledError as exc:
                    part.error = exc
                    live.remove(index)
            if not live:
                return
        keep = (m > 0).to(latents.dtype)
        latents = keep * latents + (1 - keep) * x0
        live_rows = sum(counts[index] for index in live)
        if len(live) > 1 and live_rows * latents.shape[-1] * latents.shape[-2] <= _BATCHED_DECODE_LATENT_PIXELS:
            # One decoder call and one copy to the host for every job of the batch.
            if len(live) == len(parts):
                images = decode(latents)
            else:
                rows_of = [torch.arange(offsets[index], offsets[index + 1]) for index in live]
                images = decode(latents[torch.cat(rows_of).to(latents.device)])
            start = 0
            for index in live:
                parts[index].images = images[start : start + counts[index]]
                start += counts[index]
        else:
            for index in live:
                parts[index].images = decode(latents[offsets[index] : offsets[index + 1]])
    finally:
        del latents, noise
