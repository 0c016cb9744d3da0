"""genfill: local, open generative fill. The SDK.

    from genfill import Client
    with Client() as client:                     # finds the running server by its state file
        result = client.fill("photo.png", "mask.png", prompt="a wooden bench")
        result.composite(0).save("filled.png")
"""

from .aio import AsyncClient, AsyncJob
from .client import Client, Job
from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    EngineUnavailable,
    GenfillError,
    InvalidInput,
    JobCancelled,
    JobError,
    JobFailed,
    LimitExceeded,
    ProtocolError,
    Timeout,
    Unsupported,
)
from .fill import Box, Size
from .protocol import (
    PROTOCOL_VERSION,
    ControlInput,
    ControlType,
    Feature,
    ImageReference,
    Mode,
    ReferenceRole,
    ResultWarning,
    Scheduler,
)
from .session import FillResult, JobEvent

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "Box",
    "Client",
    "ConnectError",
    "ConnectionClosed",
    "ConnectTimeout",
    "ControlInput",
    "ControlType",
    "Feature",
    "ImageReference",
    "ReferenceRole",
    "EngineUnavailable",
    "Unsupported",
    "FillResult",
    "GenfillError",
    "InvalidInput",
    "Job",
    "JobCancelled",
    "JobError",
    "JobEvent",
    "JobFailed",
    "LimitExceeded",
    "Mode",
    "ProtocolError",
    "ResultWarning",
    "Scheduler",
    "Size",
    "Timeout",
]
