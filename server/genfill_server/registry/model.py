"""What a local model is: its architecture, where it was found, and the error a missing or
unreadable one raises. The vocabulary is the package's (see ``genfill_server.registry``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from genfill.protocol import ControlType, ErrorCode

from ..errors import RequestError

CONFIGS_DIR = Path(__file__).parents[1] / "configs"
"""Diffusers config folders for single-file checkpoints, one per architecture variant
(``genfill_server/configs/``, shipped as package data)."""

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
