"""genfill's editor bridge: what the Krita and GIMP plug-ins share.

Standard library plus the vendored pure-Python ``websockets`` only, so it runs in the Python
an editor embeds (Krita 5: 3.10/3.11, GIMP 3: 3.13) without numpy, PIL or pydantic. The
plug-ins implement ``Document`` and call ``prepare``, ``run`` and ``apply``; every decision
about what to send and what an answer means is made here.
"""

__version__ = "0.1.0"

from .client import JobEvent, JobResult, ServerConnection, Variation, fetch_catalogue, remote_host  # noqa: E402
from .document import (  # noqa: E402
    Document,
    PreparedFill,
    apply,
    group_name,
    native_size_for,
    prepare,
    preview_box,
    result_warnings,
    run,
)
from .errors import (  # noqa: E402
    BridgeError,
    ConnectionLost,
    DocumentError,
    JobCancelled,
    JobFailed,
    NoSelection,
    ProtocolMismatch,
    ServerNotRunning,
    TokenRejected,
    UnsupportedDocument,
)
from .geometry import Box, Size, context_box, region_to_send  # noqa: E402
from .messages import MODES, FillOptions, Margins  # noqa: E402
from .settings import ServerSettings, default_state_path  # noqa: E402

__all__ = [
    "Box",
    "BridgeError",
    "ConnectionLost",
    "Document",
    "DocumentError",
    "FillOptions",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "JobResult",
    "MODES",
    "Margins",
    "NoSelection",
    "PreparedFill",
    "ProtocolMismatch",
    "ServerConnection",
    "ServerNotRunning",
    "ServerSettings",
    "Size",
    "TokenRejected",
    "UnsupportedDocument",
    "Variation",
    "apply",
    "context_box",
    "default_state_path",
    "fetch_catalogue",
    "group_name",
    "native_size_for",
    "prepare",
    "preview_box",
    "region_to_send",
    "remote_host",
    "result_warnings",
    "run",
]
