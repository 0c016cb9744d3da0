"""What a model on disk is: a diffusers folder read from its configs, a single-file
checkpoint from its tensor names and shapes, a ControlNet from either and its name. Nothing
here reads weights."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from genfill.protocol import ControlType

from .model import CONFIGS_DIR, Architecture, LocalModel, Source

logger = logging.getLogger("genfill.registry")


# What a diffusers folder is


_PIPELINE_ARCHITECTURES = (
    ("StableDiffusionXL", Architecture.SDXL),
    ("StableDiffusion3", Architecture.SD3),
    ("Flux", Architecture.FLUX),
    ("StableDiffusion", Architecture.SD15),  # SD2 is told apart below, by its UNet
)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _vae_scale(folder: Path) -> int:
    vae = _read_json(folder / "vae" / "config.json") or {}
    return 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def _has_weights(component: Path) -> bool:
    return component.is_dir() and any(
        name.endswith((".safetensors", ".bin")) for name in os.listdir(component)
    )


def _is_sd2_unet(unet: Mapping[str, Any]) -> bool:
    # SD2's UNet attends to OpenCLIP-H's 1024-wide hidden states through linear projections;
    # SD1.5's attends to CLIP-L's 768 through 1x1 convolutions.
    return unet.get("cross_attention_dim") == 1024 or (
        bool(unet.get("use_linear_projection")) and unet.get("addition_embed_type") is None
    )


def inspect_diffusers_folder(folder: Path, *, name: str, source: Source) -> LocalModel | None:
    """Reads a diffusers folder's configs (never its weights). ``None`` when it is neither a
    supported pipeline nor a ControlNet, or its weights are missing (an interrupted download)."""
    index = _read_json(folder / "model_index.json")
    if index is None:
        config = _read_json(folder / "config.json")
        if config is not None and config.get("_class_name") == "ControlNetModel":
            return _inspect_controlnet_folder(folder, config, name=name, source=source)
        return None
    class_name = str(index.get("_class_name", ""))
    architecture = next((arch for prefix, arch in _PIPELINE_ARCHITECTURES if class_name.startswith(prefix)), None)
    if architecture is None or "ControlNet" in class_name or "Upscale" in class_name:
        logger.info("skipping %s: pipeline %s is not one genfill runs", folder, class_name or "(unnamed)")
        return None
    components = tuple(key for key, value in index.items() if not key.startswith("_") and isinstance(value, list) and value[0])
    denoiser = "transformer" if architecture in (Architecture.SD3, Architecture.FLUX) else "unet"
    config = _read_json(folder / denoiser / "config.json")
    if config is None or not _has_weights(folder / denoiser):
        logger.warning("skipping %s: %s/ has no config or weights (incomplete download?)", folder, denoiser)
        return None
    if architecture is Architecture.SDXL and "text_encoder" not in components:
        logger.info("skipping %s: SDXL refiners cannot fill on their own", folder)
        return None
    scale = _vae_scale(folder)
    if architecture is Architecture.FLUX:
        # Flux Fill's transformer reads packed latents, mask and masked image: 384 channels
        # against 64 for the text-to-image models.
        inpaint = "FluxFill" in class_name or config.get("in_channels") == 384
        native_size = 128 * scale
    elif architecture is Architecture.SD3:
        inpaint = False
        native_size = int(config.get("sample_size", 128)) * scale
    else:
        if architecture is Architecture.SD15 and _is_sd2_unet(config):
            architecture = Architecture.SD2
        inpaint = config.get("in_channels") == 9
        native_size = int(config.get("sample_size", 64)) * scale
    return LocalModel(
        name=name,
        path=folder,
        source=source,
        architecture=architecture,
        inpaint=inpaint,
        native_size=native_size,
        components=components,
    )


def control_types_from_name(name: str) -> tuple[ControlType, ...]:
    """The control types a ControlNet serves, read from its name the way A1111 and ComfyUI
    users name them (``control_v11p_sd15_canny``, ``controlnet-depth-sdxl-1.0``)."""
    lowered = name.lower()
    found: list[ControlType] = []
    for pattern, types in _CONTROL_NAME_PATTERNS:
        if re.search(pattern, lowered):
            found.extend(t for t in types if t not in found)
    return tuple(found)


_CONTROL_NAME_PATTERNS: tuple[tuple[str, tuple[ControlType, ...]], ...] = (
    (r"canny", (ControlType.CANNY,)),
    (r"depth", (ControlType.DEPTH,)),
    (r"openpose|[^a-z]pose", (ControlType.POSE,)),
    # lineart_standard is a preprocessor whose output the lineart ControlNet reads.
    (r"lineart(?!_?anime)", (ControlType.LINEART, ControlType.LINEART_STANDARD)),
    (r"softedge|hed", (ControlType.HED,)),
    (r"mlsd", (ControlType.MLSD,)),
    (r"scribble", (ControlType.SCRIBBLE,)),
    (r"shuffle", (ControlType.SHUFFLE,)),
    (r"inpaint", (ControlType.INPAINT,)),
)


def _controlnet_architecture(config: Mapping[str, Any]) -> Architecture:
    if config.get("addition_embed_type") == "text_time" or config.get("cross_attention_dim") == 2048:
        return Architecture.SDXL
    if _is_sd2_unet(config):
        return Architecture.SD2
    return Architecture.SD15


_NATIVE_SIZE = {
    Architecture.SD15: 512,
    Architecture.SD2: 768,
    Architecture.SDXL: 1024,
    Architecture.SD3: 1024,
    Architecture.FLUX: 1024,
}


def _inspect_controlnet_folder(folder: Path, config: Mapping[str, Any], *, name: str, source: Source) -> LocalModel | None:
    control = control_types_from_name(name)
    if not control:
        logger.warning(
            "skipping ControlNet %s: its name says no control type (rename it to include canny, depth, "
            "openpose, lineart, softedge, mlsd, scribble, shuffle or inpaint)",
            folder,
        )
        return None
    if not _has_weights(folder):
        logger.warning("skipping ControlNet %s: no weights (incomplete download?)", folder)
        return None
    architecture = _controlnet_architecture(config)
    return LocalModel(
        name=name,
        path=folder,
        source=source,
        architecture=architecture,
        inpaint=ControlType.INPAINT in control,
        native_size=_NATIVE_SIZE[architecture],
        kind="controlnet",
        control=control,
    )


# What a single file is


def read_checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without reading its tensors.

    ``.safetensors``: the JSON header only (the first 8 bytes give its length). ``.ckpt`` and
    ``.pth``: ``torch.load`` with ``weights_only=True`` (no code runs from the pickle) and
    ``mmap=True`` (tensor data stays on disk).

    Raises:
        ValueError: the file is not a readable checkpoint.
    """
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > 100 * 2**20:
                    raise ValueError(f"{path.name}: safetensors header of {length} bytes is implausible")
                header = json.loads(file.read(length))
        except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path.name} is not a readable safetensors file") from exc
        return {key: tuple(value["shape"]) for key, value in header.items() if key != "__metadata__"}
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Checkpoints saved before torch 1.6 are not zip files and cannot be mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles fail in many ways; none is ours to show
        raise ValueError(f"{path.name} is not a readable checkpoint") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds no state dict")
    return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}


@dataclass(frozen=True)
class CheckpointKind:
    """What ``detect_checkpoint`` found in a state dict."""

    architecture: Architecture
    inpaint: bool
    kind: Literal["pipeline", "controlnet"] = "pipeline"
    has_text_encoder: bool = True


_UNET = "model.diffusion_model."
_SD3_KEYS = ("joint_blocks.0.context_block.adaLN_modulation.1.bias",)
_FLUX_KEYS = ("double_blocks.0.img_attn.norm.key_norm.scale",)


def _find(shapes: Mapping[str, tuple[int, ...]], suffixes: Sequence[str]) -> tuple[str, tuple[int, ...]] | None:
    for suffix in suffixes:
        for prefix in ("", _UNET):
            if prefix + suffix in shapes:
                return prefix + suffix, shapes[prefix + suffix]
    return None


def detect_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointKind | None:
    """Tells a single-file checkpoint's architecture from its tensor names and shapes.

    Args:
        shapes: tensor name -> shape, as ``read_checkpoint_shapes`` returns.

    Returns:
        ``None`` for anything that is not an SD1.5/SD2/SDXL/SD3/Flux model or a ControlNet for
        SD1.5/SD2 (LoRAs, VAEs, embeddings, upscalers...).

    The rules, in order:

    - ``control_model.*`` or ``input_hint_block.*``: a ControlNet; SD2 when its attention
      reads 1024-wide context.
    - ``joint_blocks.*``: SD3 (MMDiT). ``double_blocks.*``: Flux; Fill when ``img_in`` takes
      384 channels (packed latents + mask + masked image) instead of 64.
    - ``model.diffusion_model.*`` (an LDM UNet): SDXL when it has ``label_emb`` (the size and
      crop conditioning) or ``conditioner.embedders.*``; SD2 when it has OpenCLIP
      (``cond_stage_model.model.*``) or 1024-wide cross-attention; else SD1.5. Inpainting when
      ``input_blocks.0.0.weight`` takes 9 channels (latents, mask, masked image) instead of 4.
    """
    keys = shapes.keys()
    if any(key.startswith(("control_model.", "input_hint_block.")) for key in keys):
        prefix = "control_model." if any(key.startswith("control_model.") for key in keys) else ""
        context = _cross_attention_width(shapes, prefix)
        if f"{prefix}label_emb.0.0.weight" in shapes:
            return CheckpointKind(Architecture.SDXL, False, "controlnet", False)
        architecture = Architecture.SD2 if context == 1024 else Architecture.SD15
        return CheckpointKind(architecture, False, "controlnet", False)
    if _find(shapes, _SD3_KEYS):
        has_text = any(key.startswith("text_encoders.") for key in keys)
        return CheckpointKind(Architecture.SD3, False, has_text_encoder=has_text)
    if _find(shapes, _FLUX_KEYS):
        img_in = _find(shapes, ("img_in.weight",))
        inpaint = img_in is not None and img_in[1][1] == 384
        return CheckpointKind(Architecture.FLUX, inpaint, has_text_encoder=False)
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return None
    inpaint = conv_in[1] == 9
    if conv_in[1] not in (4, 9):
        return None  # instruct-pix2pix (8), the x4 upscaler (7): not fill models
    if _UNET + "label_emb.0.0.weight" in shapes or any(key.startswith("conditioner.embedders.") for key in keys):
        if not any(key.startswith("conditioner.embedders.0.transformer.") for key in keys) and any(
            key.startswith("conditioner.embedders.0.model.") for key in keys
        ):
            return None  # the SDXL refiner: OpenCLIP-G alone, cannot fill on its own
        has_text = any(key.startswith("conditioner.embedders.1.") for key in keys)
        return CheckpointKind(Architecture.SDXL, inpaint, has_text_encoder=has_text)
    if any(key.startswith("cond_stage_model.model.") for key in keys) or _cross_attention_width(shapes, _UNET) == 1024:
        has_text = any(key.startswith("cond_stage_model.model.") for key in keys)
        return CheckpointKind(Architecture.SD2, inpaint, has_text_encoder=has_text)
    has_text = any(key.startswith("cond_stage_model.transformer.") for key in keys)
    return CheckpointKind(Architecture.SD15, inpaint, has_text_encoder=has_text)


def _cross_attention_width(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def _sidecar_prediction_type(path: Path) -> str | None:
    """A1111's convention: ``model.yaml`` next to ``model.safetensors`` is its LDM config, and
    ``parameterization: "v"`` there marks a v-prediction model (SD2 768-v and its fine-tunes)."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8", errors="replace")
    match = re.search(r"parameterization:\s*[\"']?(\w+)", text)
    if match is None:
        return "epsilon"
    return "v_prediction" if match.group(1) == "v" else "epsilon"


def inspect_single_file(path: Path, *, name: str | None = None, configs_dir: Path = CONFIGS_DIR) -> LocalModel | None:
    """Reads a checkpoint's tensor names and shapes (not its tensors) and says what it is.
    ``None`` for files that are not a supported model (see ``detect_checkpoint``)."""
    try:
        shapes = read_checkpoint_shapes(path)
    except ValueError as exc:
        logger.warning("skipping %s: %s", path, exc)
        return None
    found = detect_checkpoint(shapes)
    if found is None:
        logger.info("skipping %s: not a model genfill runs (LoRA, VAE, embedding or another family)", path)
        return None
    name = name or path.stem
    control: tuple[ControlType, ...] = ()
    if found.kind == "controlnet":
        control = control_types_from_name(name)
        if not control:
            logger.warning("skipping ControlNet %s: its name says no control type", path)
            return None
    model = LocalModel(
        name=name,
        path=path,
        source=Source.SINGLE_FILE,
        architecture=found.architecture,
        inpaint=found.inpaint or ControlType.INPAINT in control,
        native_size=_NATIVE_SIZE[found.architecture],
        kind=found.kind,
        control=control,
        prediction_type=_sidecar_prediction_type(path),
    )
    config_dir = configs_dir / model.config_name
    if found.architecture in (Architecture.SD3, Architecture.FLUX):
        return model
    if not (config_dir / ("config.json" if found.kind == "controlnet" else "model_index.json")).is_file():
        logger.warning("skipping %s: genfill ships no %s config for it", path, model.config_name)
        return None
    native_size = _config_native_size(config_dir, model)
    return replace(model, native_size=native_size)


def _config_native_size(config_dir: Path, model: LocalModel) -> int:
    if model.kind == "controlnet":
        return model.native_size
    unet = _read_json(config_dir / "unet" / "config.json") or {}
    size = int(unet.get("sample_size", model.native_size // 8)) * _vae_scale(config_dir)
    if model.architecture is Architecture.SD2 and not model.inpaint and model.prediction_type == "epsilon":
        # SD2 512-base is the epsilon model; the shipped SD2 config is the 768-v one.
        return 512
    return size
