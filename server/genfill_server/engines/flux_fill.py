"""FLUX.1 Fill through diffusers' ``FluxFillPipeline``.

Flux Fill is guidance-distilled (no negative prompt, no classifier-free guidance batch; its
``guidance`` is an input of the model, 30 by default) and sees the masked image and the mask
as extra channels. Progress, cancel, previews and differential denoising of soft masks work
as in ``sd3_inpaint``; the only difference is Flux's packed latent layout
(``(B, h/2 * w/2, 4C)``), into which the original latents, the noise and the mask are packed
the same way.
"""

from __future__ import annotations

import torch

from .sd3_inpaint import FlowFillEngine

__all__ = ["FluxFillEngine"]


class FluxFillEngine(FlowFillEngine):
    """The ``Engine`` for FLUX.1 Fill checkpoints (``FluxFillPipeline``).

    Args:
        pipeline_factory: returns a built ``FluxFillPipeline``; called by ``load()``.
        device: ``"cpu"``, ``"cuda"``...
        dtype: ``None`` means bf16 on CUDA; the CPU always runs fp32.
        offload: model CPU offload, CUDA only.
        name: the engine name the server announces.
        native_size: ``None`` reads the VAE config's ``sample_size`` (1024 for FLUX.1 Fill,
            about one megapixel); the transformer config names none.
        max_sequence_length: T5 tokens of the prompt (512 for FLUX.1-dev Fill).

    Defaults: 28 steps, guidance 30, strength 1.0 in every mode.
    """

    family = "flux"
    default_steps = 28
    default_guidance = 30.0
    # Flux Fill has no negative prompt.
    capabilities = FlowFillEngine.capabilities.refined(
        options=FlowFillEngine.capabilities.options - {"negative_prompt"}
    )

    def __init__(
        self,
        pipeline_factory,
        *,
        device="cpu",
        dtype=None,
        offload=False,
        name="flux_fill",
        native_size=None,
        max_sequence_length: int = 512,
    ):
        super().__init__(pipeline_factory, device=device, dtype=dtype, offload=offload, name=name, native_size=native_size)
        self.max_sequence_length = max_sequence_length

    def _model_native_size(self) -> int:
        return int(getattr(self.pipeline.vae.config, "sample_size", None) or 1024)

    @property
    def size_multiple(self) -> int:
        # Latents are packed in 2x2 cells.
        return self.vae_scale_factor * 2

    def _to_model_layout(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, channels, h, w = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, h, w)

    def _preview_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)

    def _call(self, image, mask, options, mode, seeds, height, width, callback):
        return self.pipeline(
            **self._common_arguments(image, mask, options, seeds, height, width, callback),
            max_sequence_length=self.max_sequence_length,
        ).images
