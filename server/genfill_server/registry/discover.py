"""Where models are looked for, without reading any weights or calling the Hub.

Three places hold models, and the registry looks in all of them:

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

What each thing found is, is ``detect``'s question.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from .detect import inspect_diffusers_folder, inspect_single_file
from .model import CHECKPOINT_SUFFIXES, CONFIGS_DIR, LocalModel, Source

logger = logging.getLogger("genfill.registry")


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
