"""Local diffusion models: finding them, telling what they are, loading them. No network.

Three places hold models, and the registry looks in all of them without ever calling the Hub:

- the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``): ``models--ORG--NAME/snapshots/REV/``, the revision that
  ``refs/main`` names, or the newest snapshot when there is no ref. A snapshot with a
  ``model_index.json`` is a pipeline, one with a ControlNet ``config.json`` is a ControlNet,
  and one with neither is searched for single-file checkpoints at its top level;
- configured folders (``--models-dir``): a diffusers folder itself, or a parent folder whose
  children (one level down) are diffusers folders or single-file checkpoints;
- single ``.safetensors`` / ``.ckpt`` / ``.pth`` checkpoints in the A1111/Civitai layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` or
  ``conditioner.embedders.*``), and ControlNet checkpoints (``control_model.*``).

Vocabulary: a *model* is what a request names; its ``architecture`` is one of ``sd15``,
``sd2``, ``sdxl``, ``sd3``, ``flux``; ``inpaint`` means dedicated inpainting weights (a
9-channel UNet, or Flux Fill); a *control provider* is a ControlNet for one architecture.

Single files are loaded with diffusers' ``from_single_file``, always with ``config=`` set to a
diffusers config folder shipped in this package (``configs/<architecture>[-inpaint]/``) and
``local_files_only=True``, so diffusers never reaches for its default Hub repos. What a single
file cannot provide:

- a tokenizer: A1111 checkpoints carry none. The CLIP byte-level BPE vocabulary is the same
  for SD1.5, SD2, SDXL, SD3 and Flux (only the padding token differs), so any local CLIP
  tokenizer serves: first one dropped into the shipped config folder
  (``configs/<arch>/tokenizer/vocab.json`` and ``merges.txt``), then one from an installed
  diffusers model of the same family, then from any installed model, then the
  ``openai/clip-vit-large-patch14`` tokenizer in the HF cache. With none, loading fails with
  ``weights_not_installed`` naming the command that fetches the 2 MB of tokenizer files;
- for SD3 and Flux, text encoders, T5 tokenizer and VAE: those single files are read for their
  transformer only, and the other components come from an installed diffusers model of the
  same family (the file replaces that model's transformer).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from genfill.protocol import ControlType, ErrorCode

from .errors import RequestError

logger = logging.getLogger("genfill.registry")

CONFIGS_DIR = Path(__file__).with_name("configs")
"""Diffusers config folders for single-file checkpoints, one per architecture variant."""

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pth")
TOKENIZER_REPO = "openai/clip-vit-large-patch14"
TOKENIZER_PULL_COMMAND = f"genfill models pull {TOKENIZER_REPO} --tokenizer"


class Architecture(StrEnum):
    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"


class Source(StrEnum):
    HF_CACHE = "hf_cache"
    FOLDER = "folder"
    SINGLE_FILE = "single_file"


class ModelError(RequestError):
    """A model cannot be found, read or loaded. The message names what to install or fix and
    carries no internals (it reaches clients)."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(ErrorCode(code), message)


@dataclass(frozen=True)
class LocalModel:
    """One model on this machine.

    Attributes:
        name: what requests call it: ``ORG/NAME`` for the HF cache (``ORG/NAME/FILE`` for a
            single file inside a cached repo), the folder name or the file stem otherwise.
        path: the diffusers folder (snapshot) or the checkpoint file.
        kind: ``"pipeline"`` for a base model, ``"controlnet"`` for a control provider.
        native_size: side of the square the model was trained at, in pixels.
        control: for ControlNets, the control types it serves (from its name).
        prediction_type: for single files, the scheduler's prediction type (``None``: the
            shipped config's).
        components: for diffusers pipelines, the component names its ``model_index.json``
            lists (``text_encoder_3`` tells SD3 with T5 from SD3 without).
    """

    name: str
    path: Path
    source: Source
    architecture: Architecture
    inpaint: bool
    native_size: int
    kind: Literal["pipeline", "controlnet"] = "pipeline"
    control: tuple[ControlType, ...] = ()
    prediction_type: str | None = None
    components: tuple[str, ...] = ()

    @property
    def config_name(self) -> str:
        """The shipped config folder a single file of this kind loads with."""
        if self.kind == "controlnet":
            return f"controlnet-{self.architecture}"
        return f"{self.architecture}-inpaint" if self.inpaint else str(self.architecture)


# Where to look


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time (tests and
    users may change ``HF_HUB_CACHE``/``HF_HOME`` after ``huggingface_hub`` was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot folder a cached repo resolves to offline: ``refs/main``'s revision, else the
    most recently written snapshot. ``None`` when the repo has no snapshot."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        if (snapshots / revision).is_dir():
            return snapshots / revision
    if not snapshots.is_dir():
        return None
    candidates = [path for path in snapshots.iterdir() if path.is_dir()]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


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


# Scanning


def scan_hf_cache(cache_dir: Path | None = None, *, configs_dir: Path = CONFIGS_DIR) -> list[LocalModel]:
    """Models in the Hugging Face cache; reads configs and checkpoint headers only."""
    cache_dir = hf_hub_cache() if cache_dir is None else cache_dir
    if not cache_dir.is_dir():
        return []
    found: list[LocalModel] = []
    for repo_dir in sorted(cache_dir.glob("models--*")):
        parts = repo_dir.name.split("--")[1:]
        if not parts:
            continue
        repo_id = "/".join(parts)
        snapshot = hf_snapshot(repo_dir)
        if snapshot is None:
            continue
        model = inspect_diffusers_folder(snapshot, name=repo_id, source=Source.HF_CACHE)
        if model is not None:
            found.append(model)
            continue
        if (snapshot / "model_index.json").exists() or (snapshot / "config.json").exists():
            continue
        for file in sorted(snapshot.iterdir()):
            if file.suffix in CHECKPOINT_SUFFIXES and file.is_file():
                single = inspect_single_file(file, name=f"{repo_id}/{file.stem}", configs_dir=configs_dir)
                if single is not None:
                    found.append(replace(single, source=Source.HF_CACHE))
    return found


def scan_folder(folder: Path, *, configs_dir: Path = CONFIGS_DIR) -> list[LocalModel]:
    """A diffusers folder, a checkpoint file, or a parent folder of those (one level down)."""
    folder = folder.expanduser()
    if folder.is_file():
        model = inspect_single_file(folder, configs_dir=configs_dir) if folder.suffix in CHECKPOINT_SUFFIXES else None
        return [model] if model else []
    if not folder.is_dir():
        logger.warning("models folder %s does not exist", folder)
        return []
    itself = inspect_diffusers_folder(folder, name=folder.name, source=Source.FOLDER)
    if itself is not None:
        return [itself]
    found: list[LocalModel] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            model = inspect_diffusers_folder(child, name=child.name, source=Source.FOLDER)
        elif child.suffix in CHECKPOINT_SUFFIXES:
            model = inspect_single_file(child, configs_dir=configs_dir)
        else:
            continue
        if model is not None:
            found.append(model)
    return found


@dataclass
class ModelRegistry:
    """Every model this server can use: base models and control providers, by unique name.

    Args:
        model_dirs: configured folders (see ``scan_folder``), searched before the cache.
        hf_cache: the HF cache folder; ``None`` reads the environment, ``False`` skips it.
        configs_dir: where the single-file config folders are (tests point it at tiny ones).
    """

    model_dirs: Sequence[Path] = ()
    hf_cache: Path | None | Literal[False] = None
    configs_dir: Path = CONFIGS_DIR
    models: dict[str, LocalModel] = field(default_factory=dict)
    controlnets: dict[str, LocalModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_dirs = tuple(Path(folder) for folder in self.model_dirs)
        self.refresh()

    def refresh(self) -> None:
        found: list[LocalModel] = []
        for folder in self.model_dirs:
            found.extend(scan_folder(folder, configs_dir=self.configs_dir))
        if self.hf_cache is not False:
            found.extend(scan_hf_cache(self.hf_cache, configs_dir=self.configs_dir))
        self.models, self.controlnets = {}, {}
        for model in found:
            table = self.controlnets if model.kind == "controlnet" else self.models
            name = model.name
            if name in self.models or name in self.controlnets:
                suffix = 2
                while f"{name}-{suffix}" in self.models or f"{name}-{suffix}" in self.controlnets:
                    suffix += 1
                logger.warning("two models are named %s; the one at %s is %s-%d", name, model.path, name, suffix)
                model = replace(model, name=f"{name}-{suffix}")
            table[model.name] = model

    def __iter__(self):
        return iter([*self.models.values(), *self.controlnets.values()])

    def get(self, name: str) -> LocalModel:
        model = self.models.get(name)
        if model is None:
            raise ModelError(ErrorCode.MODEL_NOT_FOUND, f"no installed model is named {name!r}")
        return model

    def controlnets_for(self, architecture: Architecture) -> list[LocalModel]:
        return [c for c in self.controlnets.values() if c.architecture is architecture]

    def controlnet_for(self, architecture: Architecture, control: ControlType) -> LocalModel:
        """The installed ControlNet for an architecture and control type (first by name).

        Raises:
            ModelError: ``weights_not_installed`` when there is none.
        """
        for candidate in sorted(self.controlnets_for(architecture), key=lambda c: c.name):
            if control in candidate.control:
                return candidate
        raise ModelError(
            ErrorCode.WEIGHTS_NOT_INSTALLED,
            f"no {control} ControlNet for {architecture} is installed: put one in a models folder "
            f"or the Hugging Face cache (genfill models pull ORG/NAME)",
        )

    # Loading

    def load(
        self,
        model: LocalModel | str,
        pipeline_class: type | str | None = None,
        *,
        dtype=None,
        controlnet=None,
    ):
        """Builds ``pipeline_class`` from a model on disk, on the CPU, without any network.

        Args:
            model: the model or its name.
            pipeline_class: a diffusers pipeline class, or its name in ``diffusers``; ``None``
                takes the class the model's ``model_index.json`` names (for single files, the
                shipped config's).
            dtype: the weights' dtype; ``None`` keeps float32.
            controlnet: a loaded ``ControlNetModel`` (or ``MultiControlNetModel``) for
                ControlNet pipelines.

        Raises:
            ModelError: the model is missing, incomplete, or needs a tokenizer or base model
                that is not installed.
        """
        import diffusers

        model = self.get(model) if isinstance(model, str) else model
        if pipeline_class is None:
            index_dir = model.path if model.path.is_dir() else self.configs_dir / model.config_name
            if model.architecture in (Architecture.SD3, Architecture.FLUX) and not model.path.is_dir():
                index_dir = self._base_for(model).path
            pipeline_class = (_read_json(index_dir / "model_index.json") or {}).get("_class_name", "DiffusionPipeline")
        if isinstance(pipeline_class, str):
            pipeline_class = getattr(diffusers, pipeline_class)
        extra: dict[str, Any] = {}
        if controlnet is not None:
            extra["controlnet"] = controlnet
        if "safety_checker" in _init_parameters(pipeline_class):
            # A fill tool that blacks out a painter's selection is broken; A1111, IOPaint and
            # ComfyUI run without the checker too.
            extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        try:
            if model.source is not Source.SINGLE_FILE and model.path.is_dir():
                return self._load_folder(model, pipeline_class, dtype, extra)
            if model.architecture in (Architecture.SD3, Architecture.FLUX):
                return self._load_transformer_file(model, pipeline_class, dtype, extra)
            return self._load_single_file(model, pipeline_class, dtype, extra)
        except ModelError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            logger.exception("loading %s from %s failed", model.name, model.path)
            raise ModelError(
                ErrorCode.ENGINE_FAILED, f"model {model.name!r} could not be loaded; the server log says why"
            ) from exc

    def load_controlnet(self, controlnet: LocalModel, *, dtype=None):
        """A ``ControlNetModel`` from a folder or a single file (with the shipped config)."""
        from diffusers import ControlNetModel

        try:
            if controlnet.path.is_dir():
                return ControlNetModel.from_pretrained(controlnet.path, dtype=dtype, local_files_only=True)
            config_dir = self.configs_dir / controlnet.config_name
            return ControlNetModel.from_single_file(
                str(controlnet.path), config=str(config_dir), local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            logger.exception("loading ControlNet %s failed", controlnet.name)
            raise ModelError(
                ErrorCode.ENGINE_FAILED, f"ControlNet {controlnet.name!r} could not be loaded; the server log says why"
            ) from exc

    def _load_folder(self, model: LocalModel, pipeline_class, dtype, extra):
        kwargs = dict(extra)
        for name in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            if name in kwargs and name not in model.components and name != "requires_safety_checker":
                kwargs.pop(name)
        variant = _variant(model.path)
        return pipeline_class.from_pretrained(
            model.path, dtype=dtype, local_files_only=True, variant=variant, **kwargs
        )

    def _load_single_file(self, model: LocalModel, pipeline_class, dtype, extra):
        config_dir = self.configs_dir / model.config_name
        kwargs = dict(extra)
        kwargs.update(self.tokenizers_for(model, config_dir))
        kwargs["scheduler"] = self._scheduler(config_dir, model.prediction_type)
        return pipeline_class.from_single_file(
            str(model.path), config=str(config_dir), local_files_only=True, dtype=dtype, **kwargs
        )

    def _load_transformer_file(self, model: LocalModel, pipeline_class, dtype, extra):
        import diffusers

        base = self._base_for(model)
        transformer_class = diffusers.SD3Transformer2DModel if model.architecture is Architecture.SD3 else diffusers.FluxTransformer2DModel
        transformer = transformer_class.from_single_file(
            str(model.path), config=str(base.path), subfolder="transformer", local_files_only=True, dtype=dtype
        )
        kwargs = {k: v for k, v in extra.items() if k in _init_parameters(pipeline_class)}
        return pipeline_class.from_pretrained(
            base.path, transformer=transformer, dtype=dtype, local_files_only=True, variant=_variant(base.path), **kwargs
        )

    def _base_for(self, model: LocalModel) -> LocalModel:
        """An installed diffusers model whose text encoders, tokenizers and VAE a transformer-only
        single file of the same family can use."""
        candidates = [
            m for m in self.models.values()
            if m.architecture is model.architecture and m.source is not Source.SINGLE_FILE and m.path.is_dir()
        ]
        candidates.sort(key=lambda m: (m.inpaint != model.inpaint, m.name))
        if candidates:
            return candidates[0]
        example = {
            Architecture.SD3: "stabilityai/stable-diffusion-3.5-medium",
            Architecture.FLUX: "black-forest-labs/FLUX.1-Fill-dev",
        }[model.architecture]
        raise ModelError(
            ErrorCode.WEIGHTS_NOT_INSTALLED,
            f"{model.name!r} holds only the {model.architecture} transformer; its text encoders and VAE come from "
            f"an installed diffusers {model.architecture} model, and there is none: run `genfill models pull {example}`",
        )

    @staticmethod
    def _scheduler(config_dir: Path, prediction_type: str | None):
        import diffusers

        config = _read_json(config_dir / "scheduler" / "scheduler_config.json") or {}
        scheduler_class = getattr(diffusers, config.get("_class_name", "PNDMScheduler"))
        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        return scheduler_class.from_config(config, **overrides)

    # Tokenizers

    def tokenizers_for(self, model: LocalModel, config_dir: Path) -> dict[str, Any]:
        """CLIP tokenizers for a single-file checkpoint, which carries none (see the module
        docstring for the search order).

        Raises:
            ModelError: ``weights_not_installed``, naming the command that installs one.
        """
        from transformers import CLIPTokenizer

        index = _read_json(config_dir / "model_index.json") or {}
        result: dict[str, Any] = {}
        for slot in ("tokenizer", "tokenizer_2"):
            if slot not in index:
                continue
            encoder = _read_json(config_dir / slot.replace("tokenizer", "text_encoder") / "config.json") or {}
            vocab_size = int(encoder.get("vocab_size", 49408))
            source = self._find_clip_tokenizer(model.architecture, config_dir, slot, vocab_size)
            if source is None:
                raise ModelError(
                    ErrorCode.WEIGHTS_NOT_INSTALLED,
                    f"single-file checkpoints carry no tokenizer and none is installed: run `{TOKENIZER_PULL_COMMAND}` "
                    f"(about 2 MB) or install any diffusers {model.architecture} model",
                )
            pad = _PAD_TOKENS.get((model.architecture, slot), "<|endoftext|>")
            tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
            if pad in tokenizer.get_vocab() and tokenizer.pad_token != pad:
                tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True, pad_token=pad)
            result[slot] = tokenizer
        return result

    def _find_clip_tokenizer(self, architecture: Architecture, config_dir: Path, slot: str, vocab_size: int) -> Path | None:
        candidates: list[Path] = [config_dir / slot, config_dir / "tokenizer"]
        local = [m for m in self.models.values() if m.path.is_dir()]
        local.sort(key=lambda m: m.architecture is not architecture)
        for other in local:
            candidates += [other.path / slot, other.path / "tokenizer"]
        if self.hf_cache is not False:
            repo = (self.hf_cache or hf_hub_cache()) / ("models--" + TOKENIZER_REPO.replace("/", "--"))
            snapshot = hf_snapshot(repo) if repo.is_dir() else None
            if snapshot is not None:
                candidates.append(snapshot)
        for candidate in candidates:
            size = _clip_vocabulary_size(candidate)
            if size is not None and size <= vocab_size:
                return candidate
        return None


def _clip_vocabulary_size(folder: Path) -> int | None:
    """The vocabulary size of a CLIP tokenizer folder: ``vocab.json`` + ``merges.txt`` (as
    released) or a byte-level BPE ``tokenizer.json`` (as transformers 5 saves one); ``None``
    when the folder holds no CLIP tokenizer."""
    config = _read_json(folder / "tokenizer_config.json") or {}
    if "CLIP" not in str(config.get("tokenizer_class", "CLIPTokenizer")):
        return None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        return len(vocab) if vocab else None
    model = (_read_json(folder / "tokenizer.json") or {}).get("model") or {}
    if model.get("type") == "BPE" and isinstance(model.get("vocab"), dict):
        return len(model["vocab"])
    return None


_PAD_TOKENS = {
    # OpenCLIP pads with "!" (id 0); OpenAI's CLIP with its end-of-text token.
    (Architecture.SD2, "tokenizer"): "!",
    (Architecture.SDXL, "tokenizer_2"): "!",
}


def _init_parameters(pipeline_class) -> set[str]:
    import inspect

    return set(inspect.signature(pipeline_class.__init__).parameters)


def _variant(folder: Path) -> str | None:
    """``"fp16"`` when the denoiser's weights exist only as the fp16 variant (repos fetched with
    ``variant="fp16"``); ``None`` loads the plain files."""
    for denoiser in ("unet", "transformer"):
        component = folder / denoiser
        if not component.is_dir():
            continue
        names = os.listdir(component)
        plain = any(re.fullmatch(r"[\w-]+?(-\d+-of-\d+)?\.(safetensors|bin)", n) and ".fp16" not in n for n in names)
        fp16 = any(".fp16." in n for n in names)
        return "fp16" if fp16 and not plain else None
    return None


# Device placement


def dtype_for(architecture: Architecture | str, device: str):
    """float32 on the CPU; on a GPU bfloat16 for Flux (fp16 overflows its activations) and
    float16 for the rest."""
    import torch

    if not device.startswith(("cuda", "xpu", "mps")):
        return torch.float32
    return torch.bfloat16 if Architecture(architecture) is Architecture.FLUX else torch.float16


# Explicit downloads


class PullError(Exception):
    """``genfill models pull`` could not download; the message is one line for the user."""


def pull(repo_id: str, *, tokenizer_only: bool = False, cache_dir: Path | None = None) -> Path:
    """Downloads a diffusers model (or only its tokenizer files) into the HF cache.

    The only function in genfill that reaches the network, and only when a user runs
    ``genfill models pull``.

    Raises:
        PullError: offline, unknown repo, gated repo, or any transfer failure.
    """
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id) or ".." in repo_id:
        raise PullError(f"{repo_id!r} is not a Hugging Face repo id (ORG/NAME)")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise PullError(f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it on a machine with internet access")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as exc:
        raise PullError("downloading needs huggingface_hub: pip install 'genfill[diffusion]'") from exc
    patterns = (
        ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer/*", "tokenizer_2/*"]
        if tokenizer_only
        else None
    )
    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns, etag_timeout=10)
    except GatedRepoError as exc:
        raise PullError(f"{repo_id} is gated: accept its licence on huggingface.co and run `hf auth login` first") from exc
    except RepositoryNotFoundError as exc:
        raise PullError(f"{repo_id} does not exist on the Hugging Face Hub (or needs a login)") from exc
    except Exception as exc:  # noqa: BLE001 - network, disk and hub failures all end the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PullError(f"cannot download {repo_id}: {reason[:200]}") from exc
    return Path(path)


def describe(models: Iterable[LocalModel]) -> list[str]:
    """One line per model, as ``genfill models`` prints them without a server."""
    lines = []
    for model in models:
        what = "controlnet " + ",".join(model.control) if model.kind == "controlnet" else (
            "inpaint" if model.inpaint else "base"
        )
        lines.append(f"{model.name}  {model.architecture} {what}  {model.native_size}px  {model.source}  {model.path}")
    return lines


__all__ = [
    "CONFIGS_DIR",
    "Architecture",
    "CheckpointKind",
    "LocalModel",
    "ModelError",
    "ModelRegistry",
    "PullError",
    "Source",
    "control_types_from_name",
    "describe",
    "detect_checkpoint",
    "dtype_for",
    "hf_hub_cache",
    "hf_snapshot",
    "inspect_diffusers_folder",
    "inspect_single_file",
    "pull",
    "read_checkpoint_shapes",
    "scan_folder",
    "scan_hf_cache",
]
