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

from ._common import RemoteSettings, Secret, load_remote_config

__all__ = ["RemoteSettings", "Secret", "load_remote_config"]
