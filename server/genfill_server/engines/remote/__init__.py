"""Cloud engines: OpenAI image edits (``openai``), Black Forest Labs Flux fill and expand
(``bfl``) and Google Vertex AI Imagen edit (``imagen``), behind the same engine contract as
the local ones.

Off by default: each provider offers its engine only when the server's configuration names it
(``genfill serve --remote openai,bfl``, or ``enabled = true`` in the remote config file), so no
image leaves the machine unless the user asked for it. The fill pipeline sends an engine only
the context crop at the engine's band and composites what comes back exactly as for a local
engine: outside the selection the canvas stays bit-identical.

``_common`` holds what the three share: settings and keys (``RemoteSettings``), one job's
requests with deadlines, bounded retries and typed errors (``Call``), cancel, and the
per-provider concurrency limit. Each provider is one self-contained file.
"""

from collections.abc import Mapping
from typing import Any

from ._common import RemoteSettings, Secret, load_remote_config

__all__ = ["BUILTIN", "RemoteSettings", "Secret", "check_remote_config", "load_remote_config"]

BUILTIN = ("openai", "bfl", "imagen")


def check_remote_config(remote: Mapping[str, Mapping[str, Any]], known: Mapping[str, Any] = ()) -> None:
    """Reads each switched-on built-in provider's settings as its engine will.

    Args:
        remote: ``load_remote_config``'s answer.
        known: the providers installed (``discover_providers()``): a name switched on must be
            one of them.

    Raises:
        ValueError: an unknown provider, or a provider's bad setting or missing key.
    """
    import importlib

    for name, table in remote.items():
        if name not in BUILTIN and name not in known:
            raise ValueError(f"no cloud provider is named {name!r}; genfill has: {', '.join(BUILTIN)}")
        if name in BUILTIN:
            importlib.import_module(f"{__name__}.{name}").settings_from(table)
