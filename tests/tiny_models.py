"""Tiny random-weight diffusers pipelines for tests, built from configs in code.

The diffusers test suite builds its pipelines the same way (``get_dummy_components``), but
fetches its tokenizers from the Hub; these build theirs from a vocabulary written here, so
nothing is ever downloaded. Every builder seeds each component, so the same call gives the
same weights, and returns a float32 model in eval mode on the CPU whose ``save_pretrained``
writes a folder that ``from_pretrained`` loads back.

Sizes are chosen for speed, not realism: UNets have ``block_out_channels=(32, 64)`` and a VAE
with two blocks (a scale factor of 2), so a 64x64 image is a 32x32 latent. The native size
an engine reads from these configs (``unet.config.sample_size * vae_scale_factor``) is 64
for the SD1.5 and SDXL builders and 32 for SD3.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3InpaintPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "clip_text_config",
    "tiny_clip_tokenizer",
    "tiny_flux_fill",
    "tiny_sd15",
    "tiny_sd15_controlnet",
    "tiny_sd15_inpaint",
    "tiny_sd3_inpaint",
    "tiny_sdxl",
    "tiny_sdxl_controlnet",
    "tiny_sdxl_inpaint",
    "tiny_t5_tokenizer",
]

CLIP_MAX_LENGTH = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A handful of merges, so common prompt words become one or two tokens as they would with a
# real vocabulary; everything else falls back to single bytes.
_MERGES = ["t h", "th e</w>", "i n", "o n", "e r", "a n", "r e", "c a", "ca t</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table every byte-level BPE (GPT-2, CLIP) uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in _MERGES] + [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}, list(_MERGES)


def tiny_clip_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with a 523-token vocabulary, built without any download.

    Args:
        path: a folder to write ``vocab.json`` and ``merges.txt`` into (the files an original
            CLIP tokenizer folder holds); the tokenizer is then built from those files.
            ``None`` builds it from memory.
    """
    vocab, merges = _clip_vocab()
    if path is not None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    pairs = [tuple(merge.split(" ")) for merge in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=CLIP_MAX_LENGTH)


def clip_text_config(*, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    """A two-layer CLIP text encoder config matching ``tiny_clip_tokenizer``'s special ids."""
    vocab, _ = _clip_vocab()
    return CLIPTextConfig(
        bos_token_id=vocab[_BOS],
        eos_token_id=vocab[_EOS],
        pad_token_id=vocab[_EOS],
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over lowercase letters, digits and a few pieces."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("▁" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(w, -1.0) for w in ("▁a", "▁the", "▁of", "▁and", "▁cat", "▁dog", "▁sky")]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5_encoder(seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _sd_scheduler() -> PNDMScheduler:
    # Stable Diffusion 1.5's own scheduler config; engines replace it by the requested one.
    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )


def _vae(seed: int, *, latent_channels: int = 4, attention: bool = True, **extra) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        sample_size=64,
        mid_block_add_attention=attention,
        **extra,
    )


def _sd15_unet(seed: int, in_channels: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _init_zero_convs(controlnet: ControlNetModel) -> None:
    """ControlNet's output convolutions (and its conditioning embedding's last one) start at
    zero, which would make a random ControlNet ignore its control image; give them weights so
    tests can see the control image change the result."""

    def init(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.1)
            module.bias.data.fill_(0.1)

    controlnet.controlnet_down_blocks.apply(init)
    controlnet.controlnet_mid_block.apply(init)
    controlnet.controlnet_cond_embedding.conv_out.apply(init)


def _ready(module):
    module.to(device="cpu", dtype=torch.float32)
    if hasattr(module, "set_progress_bar_config"):
        module.set_progress_bar_config(disable=True)
    for component in getattr(module, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def _sd15_components(seed: int, in_channels: int, vae_attention: bool) -> dict:
    unet = _sd15_unet(seed, in_channels)
    vae = _vae(seed, attention=vae_attention)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
        "scheduler": _sd_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def tiny_sd15_inpaint(seed: int = 0, *, vae_attention: bool = True) -> StableDiffusionInpaintPipeline:
    """An SD1.5-shaped inpainting pipeline: 9-channel UNet (latents, mask, masked image).

    ``vae_attention=False`` drops the attention of the VAE's middle block. A trained VAE is
    nearly local, a random one's attention spreads every latent over the whole image; tests
    about *where* pixels change want the local one.
    """
    return _ready(StableDiffusionInpaintPipeline(**_sd15_components(seed, 9, vae_attention)))


def tiny_sd15(seed: int = 0, *, vae_attention: bool = True) -> StableDiffusionPipeline:
    """An SD1.5-shaped ordinary (text-to-image) pipeline: 4-channel UNet. ``vae_attention``
    as in ``tiny_sd15_inpaint``."""
    return _ready(StableDiffusionPipeline(**_sd15_components(seed, 4, vae_attention)))


def tiny_sd15_controlnet(seed: int = 0) -> ControlNetModel:
    """A ControlNet for ``tiny_sd15`` / ``tiny_sd15_inpaint`` (control image at pixel size)."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        # One stride-2 step: the conditioning image is downsampled by the VAE's factor of 2.
        conditioning_embedding_out_channels=(16, 32),
    )
    _init_zero_convs(controlnet)
    return _ready(controlnet)


_SDXL_TIME_EMBED_DIM = 8
_SDXL_TEXT_EMBEDS_DIM = 32


def _sdxl_unet_kwargs() -> dict:
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        # Six micro-conditioning numbers (original size, crop, target size) plus the pooled text.
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_TEXT_EMBEDS_DIM,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def _sdxl_components(seed: int, in_channels: int) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **_sdxl_unet_kwargs(),
    )
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config())
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(projection_dim=_SDXL_TEXT_EMBEDS_DIM))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": scheduler,
    }


def tiny_sdxl_inpaint(seed: int = 0) -> StableDiffusionXLInpaintPipeline:
    """An SDXL-shaped inpainting pipeline: two CLIP encoders, 9-channel UNet."""
    return _ready(StableDiffusionXLInpaintPipeline(**_sdxl_components(seed, in_channels=9), requires_aesthetics_score=False))


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped ordinary pipeline: 4-channel UNet."""
    return _ready(StableDiffusionXLPipeline(**_sdxl_components(seed, in_channels=4)))


def tiny_sdxl_controlnet(seed: int = 0) -> ControlNetModel:
    """A ControlNet for ``tiny_sdxl`` / ``tiny_sdxl_inpaint``."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel(
        in_channels=4,
        conditioning_embedding_out_channels=(16, 32),
        **_sdxl_unet_kwargs(),
    )
    _init_zero_convs(controlnet)
    return _ready(controlnet)


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """The one-block VAE (scale 1) of the tiny SD3 and Flux pipelines; seed torch first."""
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_inpaint(seed: int = 0) -> StableDiffusion3InpaintPipeline:
    """An SD3-shaped inpainting pipeline: MMDiT transformer, two CLIP encoders and T5."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=16,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config())
    torch.manual_seed(seed)
    vae = _flow_vae(latent_channels=16)
    pipe = StableDiffusion3InpaintPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return _ready(pipe)


def tiny_flux_fill(seed: int = 0) -> FluxFillPipeline:
    """A Flux-Fill-shaped pipeline: one-block VAE (scale 1) with 2 latent channels, so the
    transformer sees 2*4 packed latents + 2*4 packed masked-image latents + 4 packed mask
    channels = 20 input channels."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=20,
        out_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config())
    torch.manual_seed(seed)
    vae = _flow_vae(latent_channels=2)
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    return _ready(pipe)
