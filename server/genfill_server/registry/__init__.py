"""Local diffusion models: finding them, telling what they are, loading them. Nothing here
reaches the network except ``pull``, which runs only when a user asks for a download.

Vocabulary: a *model* is what a request names; its ``architecture`` is one of ``sd15``,
``sd2``, ``sdxl``, ``sd3``, ``flux``; ``inpaint`` means dedicated inpainting weights (a
9-channel UNet, or Flux Fill); a *control provider* is a ControlNet for one architecture.

The modules, by job:

- ``model``: what a model is (``Architecture``, ``Source``, ``LocalModel``, ``ModelError``)
  and where the shipped single-file configs are (``CONFIGS_DIR``);
- ``discover``: where to look (the HF cache, configured folders) and the scans of both;
- ``detect``: what a diffusers folder, a single-file checkpoint or a ControlNet is;
- ``load``: ``ModelRegistry``, which holds what was found and loads pipelines and
  ControlNets from it, and ``dtype_for``;
- ``pull``: explicit downloads, and the listing ``genfill models`` prints.
"""

from .detect import (
    CheckpointKind,
    control_types_from_name,
    detect_checkpoint,
    inspect_diffusers_folder,
    inspect_single_file,
    read_checkpoint_shapes,
)
from .discover import hf_hub_cache, hf_snapshot, scan_folder, scan_hf_cache
from .load import ModelRegistry, dtype_for
from .model import CONFIGS_DIR, Architecture, LocalModel, ModelError, Source
from .pull import PullError, describe, pull

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
