"""Loading: ``ModelRegistry``, the table of every installed model, builds diffusers pipelines
and ControlNets from them on the CPU, without any network; ``dtype_for`` picks their dtype.

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

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from genfill.protocol import ControlType, ErrorCode

from .detect import _read_json
from .discover import hf_hub_cache, hf_snapshot, scan_folder, scan_hf_cache
from .model import (
    CONFIGS_DIR,
    TOKENIZER_PULL_COMMAND,
    TOKENIZER_REPO,
    Architecture,
    LocalModel,
    ModelError,
    Source,
)

logger = logging.getLogger("genfill.registry")


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
