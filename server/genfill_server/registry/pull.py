"""Explicit downloads (``genfill models pull``) and the one-line listing ``genfill models``
prints. ``pull`` is the only code in genfill that reaches the network."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from .model import LocalModel


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
