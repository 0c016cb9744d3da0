"""Text conditioning for SD 1.5/2.x and SDXL: prompt embeddings, SDXL's micro-conditioning,
and a small cache of both per engine."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["Conditioning", "PromptCache", "encode_prompt", "time_ids"]

Conditioning = tuple[torch.Tensor, dict[str, torch.Tensor] | None]
"""``(embeds, added)``: the text embeddings ``(2 or 1, L, D)``, negative first when guiding,
and for SDXL the ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) batched alike;
``None`` for SD 1.5/2.x."""


def encode_prompt(
    pipe: Any,
    family: str,
    prompt: str,
    negative: str,
    do_cfg: bool,
    size: tuple[int, int],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Conditioning:
    """The conditioning for one prompt, from ``pipe``'s text encoders.

    Args:
        pipe: a built SD or SDXL diffusers pipeline.
        family: ``"sd15"`` (SD 1.x and 2.x) or ``"sdxl"``.
        prompt: the prompt.
        negative: the negative prompt; ``""`` for none.
        do_cfg: whether the loop guides (the negative embeddings are then included).
        size: ``(height, width)`` of the image in pixels, for SDXL's micro-conditioning.
        device: where the embeddings are made.
        dtype: what they are cast to.
    """
    if family == "sd15":
        positive, negative_embeds = pipe.encode_prompt(
            prompt, device, 1, do_cfg, negative_prompt=negative or None
        )
        embeds = torch.cat([negative_embeds, positive]) if do_cfg else positive
        return embeds.to(dtype), None
    positive, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=do_cfg,
        negative_prompt=negative or None,
    )
    height, width = size
    ids = time_ids(pipe, height, width, aesthetic=6.0)
    if do_cfg:
        embeds = torch.cat([negative_embeds, positive])
        text_embeds = torch.cat([negative_pooled, pooled])
        ids = torch.cat([time_ids(pipe, height, width, aesthetic=2.5), ids])
    else:
        embeds, text_embeds = positive, pooled
    added = {"text_embeds": text_embeds.to(dtype), "time_ids": ids.to(device, dtype)}
    return embeds.to(dtype), added


def time_ids(pipe: Any, height: int, width: int, *, aesthetic: float) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop origin and target size; a refiner-
    style UNet (5 numbers) takes an aesthetic score instead of the target size."""
    unet = pipe.unet
    expected = unet.add_embedding.linear_1.in_features
    pooled_dim = expected - 6 * unet.config.addition_time_embed_dim
    values = [height, width, 0, 0, height, width]
    if pooled_dim != pipe.text_encoder_2.config.projection_dim:
        values = [height, width, 0, 0, aesthetic]
    return torch.tensor([values], dtype=torch.float32)


class PromptCache:
    """The last ``size`` conditionings by key, safe to share between threads: artists repeat
    prompts, and SDXL's two text encoders cost tens of milliseconds a job."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Conditioning] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, encode: Callable[[], Conditioning]) -> Conditioning:
        """The entry for ``key``, or ``encode()``'s result, kept. ``encode`` runs outside the
        lock, so a thread that needs another prompt does not wait for it."""
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                return cached
        encoded = encode()
        with self._lock:
            self._entries[key] = encoded
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return encoded

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
