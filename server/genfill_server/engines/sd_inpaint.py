"""Stable Diffusion 1.5 / 2.x and SDXL inpainting, with our own denoising loop.

diffusers' inpaint pipelines binarize the mask, have no cancel and decode previews only
through the VAE. This engine takes the components of an already built pipeline
(``StableDiffusionInpaintPipeline``, ``StableDiffusionPipeline``, and their XL twins) and runs
the loop itself:

- **Differential denoising** keeps soft masks soft (Levin & Fried, "Differential Diffusion",
  2023). With ``m`` in [0, 1] the denoise mask at latent resolution and ``N`` steps, a latent
  cell takes part in step ``i`` only when ``m > 1 - (i + 1) / N``; before each step every
  other cell is reset to the original latents noised to that step's level. A cell of mask
  ``m`` is therefore denoised for its last ``m * N`` steps, like an img2img of strength ``m``:
  a gradient selection gives a gradient of change. Cells with ``m == 0`` end as the
  original latents exactly.
- **9-channel inpainting checkpoints** additionally see the mask and the masked image, as they
  were trained to; **ordinary 4-channel checkpoints** rely on the blend alone (img2img-style
  latent blending), so any SD model can fill.
- **Variations** run as one batch, one ``torch.Generator`` per seed: the starting noise and
  any ancestral noise of variation ``i`` depend on its seed only, so variation ``i`` equals a
  single run with that seed (to float rounding of batched kernels).
- **Progress and cancel**: ``on_step`` is called after every denoising step, with a preview
  every few steps from the latent-to-RGB projection; when it raises ``JobCancelledError`` the
  loop stops at once (no further UNet call) and the tensors are freed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from genfill.protocol import ErrorCode

from .base import EngineError, EngineJob, StepCallback
from .latent_preview import preview_due, preview_rgb
from .prefill import prefill

logger = logging.getLogger("genfill.engines.sd_inpaint")

__all__ = ["SCHEDULERS", "SDInpaintEngine", "make_scheduler"]

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
"""Scheduler names a request may ask for (``FillRequest.scheduler``)."""


def make_scheduler(name: str, config: Any):
    """A fresh scheduler of kind ``name`` built from a model's own scheduler ``config``, so
    its training betas and prediction type (epsilon or v for SD2-768) carry over.

    Raises:
        EngineError: ``invalid_request`` for an unknown name.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    raise EngineError(ErrorCode.INVALID_REQUEST, f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


@dataclass(frozen=True)
class Defaults:
    """Generation defaults of a model family; a request's ``None`` takes these."""

    steps: int
    guidance: float
    scheduler: str
    strength_by_mode: dict[str, float]


_STRENGTH = {"fill": 1.0, "expand": 1.0, "add": 1.0, "remove": 1.0}
DEFAULTS = {
    "sd15": Defaults(steps=25, guidance=7.5, scheduler="dpmpp_2m_karras", strength_by_mode=_STRENGTH),
    "sdxl": Defaults(steps=30, guidance=5.0, scheduler="dpmpp_2m_karras", strength_by_mode=_STRENGTH),
}


def default_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA (bf16 where the caller asks), fp32 elsewhere: CPU half is slow and lossy."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


@dataclass
class _Batch:
    """Per-run tensors shared by every chunk of variations."""

    x0: torch.Tensor  # (1, C, h, w) original latents, in the denoiser's space
    m: torch.Tensor  # (1, 1, h, w) denoise mask in [0, 1]
    inpaint_cond: torch.Tensor | None  # (1, 1 + C, h, w) mask and masked-image latents
    embeds: torch.Tensor  # (2 or 1, L, D): negative first when guiding
    added: dict[str, torch.Tensor] | None  # SDXL micro-conditioning, batch as embeds
    guidance: float
    scheduler_name: str
    steps: int
    strength: float


class SDInpaintEngine:
    """The ``Engine`` for SD 1.5/2.x and SDXL checkpoints, inpainting or ordinary.

    Args:
        pipeline_factory: returns a built diffusers pipeline whose components this engine
            drives: ``StableDiffusionInpaintPipeline`` or ``StableDiffusionPipeline`` (SD 1.x,
            2.x) or ``StableDiffusionXLInpaintPipeline`` / ``StableDiffusionXLPipeline``. It is
            called once, by ``load()``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: weights' dtype; ``None`` means fp16 on CUDA and fp32 on the CPU.
        offload: model CPU offload (``enable_model_cpu_offload``) for small GPUs; CUDA only.
        name: the engine name the server announces.
        native_size: overrides the side read from the model (``unet.config.sample_size *
            vae_scale_factor``: 512 for SD1.5, 768 for SD2-768, 1024 for SDXL).
        max_batch: the most variations denoised in one batch; ``None`` means all at once.
            A batch that runs out of GPU memory is retried in halves.
    """

    needs_colour_match = True

    def __init__(
        self,
        pipeline_factory: Callable[[], Any],
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
        name: str = "sd_inpaint",
        native_size: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        if offload and not str(device).startswith("cuda"):
            raise ValueError(f"offload needs a CUDA device, got {device!r}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.name = name
        self.device = str(device)
        self.dtype = dtype or default_dtype(self.device)
        if not self.device.startswith("cuda"):
            self.dtype = torch.float32
        self.offload = offload
        self.max_batch = max_batch
        self.native_size = native_size
        self._factory = pipeline_factory
        self.pipeline: Any = None
        self.family = "sd15"

    # Engine protocol

    def load(self) -> None:
        pipe = self._factory()
        self.family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        pipe.to(dtype=self.dtype)
        vae = pipe.vae
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # SDXL's VAE overflows in fp16 (diffusers' ``force_upcast``).
            vae.to(dtype=torch.float32)
        if self.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self.pipeline = pipe
        if self.native_size is None:
            self.native_size = int(pipe.unet.config.sample_size) * self.vae_scale_factor
        self._load_extra()

    def close(self) -> None:
        self.pipeline = None
        self._close_extra()
        _empty_cache(self.device)

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns one ``(H, W, 3)`` uint8 RGB image per seed, the size of ``job.image``.

        ``job.options`` holds ``FillRequest`` fields; ``None`` values take the model's
        defaults (SD1.5: 25 steps, guidance 7.5; SDXL: 30 steps, guidance 5.0; DPM++ 2M
        Karras; strength 1.0 in every mode).

        Raises:
            EngineError: ``invalid_request`` for an unknown scheduler or control type,
                ``weights_not_installed`` for a control whose weights are missing,
                ``out_of_memory`` when even one variation does not fit.
            JobCancelledError: from ``on_step``; nothing is returned.
        """
        if self.pipeline is None:
            raise RuntimeError(f"engine {self.name} is not loaded")
        image = np.ascontiguousarray(job.image[:, :, :3])
        height, width = image.shape[:2]
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {width}x{height} is not a multiple of {factor}")
        seeds = [int(seed) for seed in job.seeds]
        if not seeds:
            raise ValueError("job has no seeds")
        options = job.options
        mode = str(options.get("mode") or "fill")
        prefilled = prefill(image, np.asarray(job.selection), mode)
        with torch.inference_mode():
            batch = self._prepare(job, prefilled, options, mode)
            control = self._prepare_control(job, image, options)
            results: list[np.ndarray] = []
            limit = self.max_batch or len(seeds)
            done = 0
            chunks_run = 0
            try:
                while done < len(seeds):
                    chunk = seeds[done : done + limit]
                    chunk_count = chunks_run + _chunks(len(seeds) - done, limit)
                    try:
                        results += self._denoise(batch, control, chunk, chunks_run, chunk_count, on_step)
                    except torch.cuda.OutOfMemoryError:
                        _empty_cache(self.device)
                        if len(chunk) == 1:
                            raise EngineError(
                                ErrorCode.OUT_OF_MEMORY,
                                "the GPU ran out of memory for one image; try a smaller selection or --offload",
                            ) from None
                        limit = max(1, len(chunk) // 2)
                        logger.warning("out of memory at batch %d; retrying with %d", len(chunk), limit)
                        continue
                    done += len(chunk)
                    chunks_run += 1
            finally:
                del batch, control
                if hasattr(self.pipeline, "maybe_free_model_hooks"):
                    self.pipeline.maybe_free_model_hooks()
                _empty_cache(self.device)
        return results

    # Model facts

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def is_inpaint_model(self) -> bool:
        """True for 9-channel UNets (latents + mask + masked-image latents)."""
        return int(self.pipeline.unet.config.in_channels) == 9

    @property
    def defaults(self) -> Defaults:
        return DEFAULTS[self.family]

    @property
    def _exec_device(self) -> torch.device:
        return torch.device(getattr(self.pipeline, "_execution_device", None) or self.device)

    # Steps of a run

    def _prepare(self, job: EngineJob, prefilled: np.ndarray, options: dict, mode: str) -> _Batch:
        defaults = self.defaults
        steps = int(options.get("steps") or defaults.steps)
        guidance = defaults.guidance if options.get("guidance") is None else float(options["guidance"])
        strength = defaults.strength_by_mode.get(mode, 1.0) if options.get("strength") is None else float(options["strength"])
        scheduler_name = str(options.get("scheduler") or defaults.scheduler)
        if scheduler_name not in SCHEDULERS:
            make_scheduler(scheduler_name, None)  # raises the request error
        device = self._exec_device
        pixels = _to_pixels(prefilled, device)
        x0 = self._encode(pixels)
        latent_size = x0.shape[-2:]
        mask_px = torch.from_numpy(np.asarray(job.denoise_mask, dtype=np.float32) / 255.0)[None, None].to(device)
        m = torch.nn.functional.interpolate(mask_px, size=latent_size, mode="area").to(x0.dtype)
        inpaint_cond = None
        if self.is_inpaint_model:
            # As the model was trained: a hard mask, and the image with the masked part blanked.
            hard = (mask_px >= 0.5).to(pixels.dtype)
            masked_latents = self._encode(pixels * (1 - hard))
            mask_latent = torch.nn.functional.interpolate(hard, size=latent_size).to(x0.dtype)
            inpaint_cond = torch.cat([mask_latent, masked_latents], dim=1)
        do_cfg = guidance > 1.0
        embeds, added = self._encode_prompt(
            str(options.get("prompt") or ""), str(options.get("negative_prompt") or ""), do_cfg, prefilled.shape[:2]
        )
        return _Batch(x0, m, inpaint_cond, embeds, added, guidance, scheduler_name, steps, strength)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    def _decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        decoded = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        array = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()) for image in array]

    def _encode_prompt(
        self, prompt: str, negative: str, do_cfg: bool, size: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        pipe = self.pipeline
        device = self._exec_device
        if self.family == "sd15":
            positive, negative_embeds = pipe.encode_prompt(
                prompt, device, 1, do_cfg, negative_prompt=negative or None
            )
            embeds = torch.cat([negative_embeds, positive]) if do_cfg else positive
            return embeds.to(self.dtype), None
        positive, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative or None,
        )
        height, width = size
        time_ids = self._time_ids(height, width, aesthetic=6.0)
        if do_cfg:
            embeds = torch.cat([negative_embeds, positive])
            text_embeds = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([self._time_ids(height, width, aesthetic=2.5), time_ids])
        else:
            embeds, text_embeds = positive, pooled
        added = {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids.to(device, self.dtype)}
        return embeds.to(self.dtype), added

    def _time_ids(self, height: int, width: int, *, aesthetic: float) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop origin and target size; a refiner-
        style UNet (5 numbers) takes an aesthetic score instead of the target size."""
        unet = self.pipeline.unet
        expected = unet.add_embedding.linear_1.in_features
        pooled_dim = expected - 6 * unet.config.addition_time_embed_dim
        values = [height, width, 0, 0, height, width]
        if pooled_dim != self.pipeline.text_encoder_2.config.projection_dim:
            values = [height, width, 0, 0, aesthetic]
        return torch.tensor([values], dtype=torch.float32)

    def _denoise(
        self,
        batch: _Batch,
        control: Any,
        seeds: list[int],
        chunk_index: int,
        chunk_count: int,
        on_step: StepCallback,
    ) -> list[np.ndarray]:
        device = self._exec_device
        scheduler = make_scheduler(batch.scheduler_name, self.pipeline.scheduler.config)
        scheduler.set_timesteps(batch.steps, device=device)
        init_steps = min(max(int(batch.steps * batch.strength), 1), batch.steps)
        start = (batch.steps - init_steps) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        total_steps = len(timesteps)
        size = len(seeds)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        shape = tuple(batch.x0.shape[1:])
        noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        noise = noise.to(device, self.dtype)
        x0 = batch.x0.expand(size, -1, -1, -1)
        if batch.strength >= 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(size))
        guiding = batch.guidance > 1.0
        copies = 2 if guiding else 1
        embeds = batch.embeds.repeat_interleave(size, dim=0)
        added = None
        if batch.added is not None:
            added = {key: value.repeat_interleave(size, dim=0) for key, value in batch.added.items()}
        inpaint_cond = None
        if batch.inpaint_cond is not None:
            inpaint_cond = batch.inpaint_cond.expand(size * copies, -1, -1, -1)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        try:
            for i, t in enumerate(timesteps):
                active = (batch.m > 1.0 - (i + 1) / total_steps).to(latents.dtype)
                if not bool(active.all()):
                    noised = scheduler.add_noise(x0, noise, t.reshape(1).repeat(size))
                    latents = active * latents + (1 - active) * noised
                model_in = torch.cat([latents] * copies) if guiding else latents
                model_in = scheduler.scale_model_input(model_in, t)
                residuals = self._control_residuals(control, i, total_steps, model_in, t, embeds, added, size)
                if inpaint_cond is not None:
                    model_in = torch.cat([model_in, inpaint_cond], dim=1)
                unet_kwargs: dict[str, Any] = {"encoder_hidden_states": embeds, "return_dict": False}
                if added is not None:
                    unet_kwargs["added_cond_kwargs"] = added
                if residuals is not None:
                    unet_kwargs["down_block_additional_residuals"] = residuals[0]
                    unet_kwargs["mid_block_additional_residual"] = residuals[1]
                noise_pred = self.pipeline.unet(model_in, t, **unet_kwargs)[0]
                if guiding:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + batch.guidance * (cond - uncond)
                out = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
                latents = out.prev_sample
                preview = None
                if preview_due(i + 1, total_steps):
                    x0_pred = getattr(out, "pred_original_sample", None)
                    source = latents if x0_pred is None else x0_pred
                    preview = preview_rgb(source[0].float().cpu().numpy(), self.family)
                # Progress counts the steps of every chunk of variations.
                on_step(chunk_index * total_steps + i + 1, chunk_count * total_steps, preview)
            keep = (batch.m > 0).to(latents.dtype)
            latents = keep * latents + (1 - keep) * x0
            return self._decode(latents)
        finally:
            del latents, noise

    # Hooks for the ControlNet engine

    def _load_extra(self) -> None:
        pass

    def _close_extra(self) -> None:
        pass

    def _prepare_control(self, job: EngineJob, image: np.ndarray, options: dict) -> Any:
        if options.get("control"):
            raise EngineError(
                ErrorCode.INVALID_REQUEST, f"engine {self.name!r} takes no control inputs; use a ControlNet engine"
            )
        return None

    def _control_residuals(
        self,
        control: Any,
        step: int,
        total: int,
        model_in: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
        size: int,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        return None


def _chunks(total: int, size: int) -> int:
    return -(-total // size)


def _to_pixels(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float32 in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    return (tensor / 127.5 - 1.0).to(device)


def _empty_cache(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
