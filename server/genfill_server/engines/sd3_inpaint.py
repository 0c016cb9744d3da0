"""Stable Diffusion 3 / 3.5 inpainting through diffusers' ``StableDiffusion3InpaintPipeline``.

Flow-matching models are wrapped rather than re-looped: the pipeline runs, and its
``callback_on_step_end`` does what diffusers leaves out:

- progress and cancel after every transformer call (``on_step`` may raise
  ``JobCancelledError``; the pipeline stops there and the exception propagates);
- differential denoising, so soft masks stay soft: the pipeline gets the selection's whole
  extent as its (binary) mask, and after each step every latent cell whose mask value ``m``
  is not above ``1 - (i + 2) / N`` is reset to the original latents noised to the next
  step's level, ``(1 - sigma) * x0 + sigma * noise``; a cell of mask ``m`` is thereby
  denoised for its last ``m * N`` steps (see ``sd_inpaint`` for the idea);
- previews from the latents by the family's latent-to-RGB projection.

Variations are one batched call with one generator per seed, so variation ``i`` depends on
its seed only. Only the flow-matching Euler scheduler these models ship with is offered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from genfill.protocol import ErrorCode

from .base import DeviceKind, EngineCapabilities, EngineDefaults, EngineError, EngineJob, StepCallback, torch_errors
from .latent_preview import preview_due, preview_rgb
from .prefill import prefill
from .sd_inpaint import _empty_cache

__all__ = ["FlowFillEngine", "SD3InpaintEngine"]


class FlowFillEngine:
    """What the SD3 and Flux Fill engines share; subclasses say how to call their pipeline."""

    family = "sd3"
    default_steps = 28
    default_guidance = 7.0
    capabilities = EngineCapabilities(
        prompt=True,
        options=frozenset({"negative_prompt", "steps", "strength", "guidance", "scheduler"}),
        device_kind=DeviceKind.GPU,
        needs_colour_match=True,
    )

    def __init__(
        self,
        pipeline_factory: Callable[[], Any],
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
        name: str,
        native_size: int | None = None,
    ) -> None:
        if offload and not str(device).startswith("cuda"):
            raise ValueError(f"offload needs a CUDA device, got {device!r}")
        self.name = name
        self.device = str(device)
        cuda = self.device.startswith("cuda")
        self.dtype = (dtype or torch.bfloat16) if cuda else torch.float32
        self.offload = offload
        self.native_size = native_size
        self.capabilities = type(self).capabilities.refined(native_size=native_size)
        self._factory = pipeline_factory
        self.pipeline: Any = None

    @torch_errors()
    def load(self) -> None:
        pipe = self._factory()
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dtype=self.dtype)
        if self.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self.pipeline = pipe
        if self.native_size is None:
            self.native_size = self._model_native_size()
        self.capabilities = self.capabilities.refined(native_size=self.native_size)

    def close(self) -> None:
        self.pipeline = None
        _empty_cache(self.device)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def defaults(self) -> EngineDefaults:
        return EngineDefaults(
            steps=self.default_steps,
            guidance=self.default_guidance,
            scheduler="euler",
            strength_by_mode={"fill": 1.0, "expand": 1.0, "add": 1.0, "remove": 1.0},
        )

    def _model_native_size(self) -> int:
        return int(self.pipeline.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.pipeline.transformer.config.patch_size)

    @torch_errors()
    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns one ``(H, W, 3)`` uint8 RGB image per seed, the size of ``job.image``.

        Raises:
            EngineError: ``invalid_request`` for a scheduler other than ``euler``.
            JobCancelledError: from ``on_step``.
        """
        if self.pipeline is None:
            raise RuntimeError(f"engine {self.name} is not loaded")
        options = job.options
        scheduler = options.scheduler
        if scheduler is not None and str(scheduler) != "euler":
            raise EngineError(
                ErrorCode.INVALID_REQUEST, f"engine {self.name!r} runs the flow-matching Euler scheduler only ('euler')"
            )
        # The transformer works on patches of ``size_multiple`` pixels (16 for SD3 and Flux);
        # the fill pipeline snaps to 8, so pad by edge replication and crop the result.
        out_height, out_width = job.image.shape[:2]
        multiple = self.size_multiple
        pad = ((0, -out_height % multiple), (0, -out_width % multiple))
        image = np.pad(np.ascontiguousarray(job.image[:, :, :3]), pad + ((0, 0),), mode="edge")
        selection = np.pad(np.asarray(job.selection), pad, mode="edge")
        denoise_mask = np.pad(np.asarray(job.denoise_mask), pad, mode="edge")
        height, width = image.shape[:2]
        seeds = [int(seed) for seed in job.seeds]
        mode = str(options.mode)
        prefilled = prefill(image, selection, mode)
        pipe = self.pipeline
        device = torch.device(getattr(pipe, "_execution_device", None) or self.device)
        with torch.inference_mode():
            x0 = self._encode(prefilled, device)
            m = torch.from_numpy(denoise_mask.astype(np.float32) / 255.0)[None, None].to(device)
            m = torch.nn.functional.interpolate(m, size=x0.shape[-2:], mode="area")
            noise = torch.stack(
                [torch.randn(x0.shape[1:], generator=torch.Generator("cpu").manual_seed(seed + 1)) for seed in seeds]
            ).to(device, x0.dtype)
            x0_b, m_b, noise_b = (self._to_model_layout(t, height, width) for t in (x0, m.expand_as(x0), noise))
            x0_b = x0_b.expand_as(noise_b)

            def callback(pipeline, i, t, tensors):
                latents = tensors["latents"]
                total = pipeline._num_timesteps
                scheduler_ = pipeline.scheduler
                sigma = scheduler_.sigmas[scheduler_.step_index].to(latents.device, latents.dtype)
                inactive = (m_b <= 1.0 - (i + 2) / total).to(latents.dtype)
                if i + 1 == total:
                    inactive = (m_b <= 0).to(latents.dtype)
                noised = (1 - sigma) * x0_b + sigma * noise_b
                latents = inactive * noised.to(latents.dtype) + (1 - inactive) * latents
                preview = None
                if preview_due(i + 1, total):
                    preview = preview_rgb(self._preview_latents(latents, height, width)[0].float().cpu().numpy(), self.family)
                on_step(i + 1, total, preview)
                return {"latents": latents}

            hard = (denoise_mask > 0).astype(np.uint8) * 255
            try:
                output = self._call(
                    prefilled, hard, options, mode, seeds, height, width, callback
                )
            finally:
                # The callback's closure holds x0_b and noise_b too: rebinding them frees the
                # tensors, where ``del`` would leave it with names that no longer exist.
                del x0, noise
                x0_b = noise_b = None
                pipe.maybe_free_model_hooks()
                _empty_cache(self.device)
        images = np.clip(np.rint(np.asarray(output) * 255), 0, 255).astype(np.uint8)
        return [np.ascontiguousarray(images[i, :out_height, :out_width]) for i in range(len(seeds))]

    def _encode(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        vae = self.pipeline.vae
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1.0
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def _to_model_layout(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def _preview_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def _call(self, image, mask, options, mode, seeds, height, width, callback):
        raise NotImplementedError

    def _common_arguments(self, image, mask, options, seeds, height, width, callback) -> dict[str, Any]:
        """The pipeline arguments both families take, for ``_call``."""
        from PIL import Image

        count = len(seeds)
        return {
            "prompt": [options.prompt] * count,
            # One copy per variation, so each generator draws its own VAE sample and noise
            # exactly as in a single-variation run.
            "image": [Image.fromarray(image)] * count,
            "mask_image": [Image.fromarray(mask)] * count,
            "height": height,
            "width": width,
            "strength": 1.0 if options.strength is None else float(options.strength),
            "num_inference_steps": int(options.steps or self.default_steps),
            "guidance_scale": self.default_guidance if options.guidance is None else float(options.guidance),
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "output_type": "np",
            "callback_on_step_end": callback,
            "callback_on_step_end_tensor_inputs": ["latents"],
        }


class SD3InpaintEngine(FlowFillEngine):
    """The ``Engine`` for SD3 / SD3.5 checkpoints (``StableDiffusion3InpaintPipeline``).

    Args:
        pipeline_factory: returns a built ``StableDiffusion3InpaintPipeline``; called by
            ``load()``.
        device: ``"cpu"``, ``"cuda"``...
        dtype: ``None`` means bf16 on CUDA; the CPU always runs fp32.
        offload: model CPU offload, CUDA only.
        name: the engine name the server announces.
        native_size: overrides ``transformer.config.sample_size * vae_scale_factor`` (1024).

    Defaults: 28 steps, guidance 7.0, strength 1.0 in every mode.
    """

    family = "sd3"

    def __init__(self, pipeline_factory, *, device="cpu", dtype=None, offload=False, name="sd3_inpaint", native_size=None):
        super().__init__(pipeline_factory, device=device, dtype=dtype, offload=offload, name=name, native_size=native_size)

    def _call(self, image, mask, options, mode, seeds, height, width, callback):
        count = len(seeds)
        return self.pipeline(
            **self._common_arguments(image, mask, options, seeds, height, width, callback),
            negative_prompt=[options.negative_prompt] * count,
        ).images
