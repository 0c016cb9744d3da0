"""The protocol's JSON messages as plain dicts, for Pythons without pydantic.

``genfill.protocol`` holds the authoritative models; this module builds the client messages
and checks the server's messages against the fields the bridge reads. ``tests/test_bridge.py``
validates both directions against the pydantic models, so the two cannot drift apart.

Server messages are read leniently, as ``genfill.protocol`` says clients must: fields the
bridge does not read are ignored, a message of a type it does not know is returned for the
caller to skip (``is_known``), and error codes are an open set (``ERROR_CODES`` lists those
this bridge knows).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolMismatch

PROTOCOL_VERSION = 1
"""The major protocol version: a server of another one is refused; additions within it are
features the server lists in ``hello["features"]``."""
MODES = ("fill", "expand", "add", "remove")
MAX_SEED = 2**32 - 1
_JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

# Fields the bridge reads from each server message; a message lacking one is a protocol
# mismatch, not a KeyError deep inside a plug-in.
SERVER_FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("server_version", "protocol_version", "engines", "models", "default_engine", "limits"),
    "image_status": ("present", "missing"),
    "uploaded": ("image_id", "width", "height"),
    "accepted": ("job_id", "queue_position"),
    "progress": ("job_id", "step", "total"),
    "result": ("job_id", "box", "variations", "engine"),
    "error": ("code", "message"),
    "cancelled": ("job_id",),
}

# genfill.protocol.ErrorCode, pinned by tests/test_bridge.py.
ERROR_CODES = frozenset(
    {
        "bad_message",
        "limit_exceeded",
        "rate_limited",
        "queue_full",
        "image_too_large",
        "image_invalid",
        "unknown_image",
        "size_mismatch",
        "empty_selection",
        "invalid_request",
        "job_id_in_use",
        "unknown_job",
        "engine_unavailable",
        "model_not_found",
        "weights_not_installed",
        "out_of_memory",
        "engine_failed",
        "shutting_down",
        "unsupported",
        "remote_auth_failed",
        "remote_quota_exceeded",
        "moderated",
        "remote_unavailable",
        "remote_timeout",
    }
)


@dataclass(frozen=True)
class Margins:
    """How far ``expand`` grows the canvas on each side, in pixels."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.left or self.right or self.top or self.bottom)


@dataclass(frozen=True)
class FillOptions:
    """What the painter chose. ``None`` means "the server's default for this model and mode".

    Attributes:
        mode: ``fill``, ``expand``, ``add`` or ``remove``.
        source: ``layer`` sends the active layer's pixels, ``visible`` the merged image.
        expand: the margins, for ``mode="expand"`` only.
    """

    prompt: str = ""
    negative_prompt: str = ""
    mode: str = "fill"
    engine: str | None = None
    model: str | None = None
    strength: float | None = None
    variations: int = 3
    seed: int | None = None
    steps: int | None = None
    source: str = "layer"
    expand: Margins = field(default_factory=Margins)

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.source not in ("layer", "visible"):
            raise ValueError(f"source must be 'layer' or 'visible', got {self.source!r}")
        if not isinstance(self.variations, int) or self.variations < 1:
            raise ValueError(f"variations must be an int >= 1, got {self.variations!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {self.seed!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength!r}")
        margins = (self.expand.left, self.expand.right, self.expand.top, self.expand.bottom)
        if any(not isinstance(m, int) or m < 0 for m in margins):
            raise ValueError(f"expand margins must be ints >= 0, got {margins}")
        if self.mode == "expand" and self.expand.is_empty:
            raise ValueError("mode 'expand' needs a margin: grow at least one side by 1 pixel or more")
        if self.mode != "expand" and not self.expand.is_empty:
            raise ValueError(f"expand margins are only for mode 'expand', not {self.mode!r}")

    def request(self, image: str, mask: str | None, region: tuple[int, int, int, int] | None) -> dict[str, Any]:
        """The ``FillRequest`` for these options, with ``None`` fields left out."""
        request: dict[str, Any] = {
            "image": image,
            "mask": mask,
            "region": None if region is None else dict(zip(("x", "y", "width", "height"), region)),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "mode": self.mode,
            "engine": self.engine or None,
            "model": self.model or None,
            "variations": self.variations,
            "seed": self.seed,
            "steps": self.steps,
            "strength": self.strength,
        }
        if self.mode == "expand":
            margins = self.expand
            request["expand"] = {"left": margins.left, "right": margins.right, "top": margins.top, "bottom": margins.bottom}
        return {name: value for name, value in request.items() if value is not None}


def has_images(image_ids: list[str]) -> str:
    return json.dumps({"type": "has_images", "image_ids": list(image_ids)})


def submit(job_id: str, request: dict[str, Any], *, result_format: str = "rgba8", previews: bool = False) -> str:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"job id must match {_JOB_ID.pattern}, got {job_id!r}")
    return json.dumps(
        {"type": "submit", "job_id": job_id, "request": request, "result_format": result_format, "previews": previews}
    )


def cancel(job_id: str) -> str:
    return json.dumps({"type": "cancel", "job_id": job_id})


def parse_server_message(text: str) -> dict[str, Any]:
    """Parses one JSON text frame from the server.

    Returns:
        The message as a dict. One of a type this bridge does not know (``is_known`` is
        false) is returned as it came, to be skipped.

    Raises:
        ProtocolMismatch: not a JSON object, no ``type``, or a field the bridge reads from a
            known type is missing.
    """
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolMismatch("the server sent a message that is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolMismatch("the server sent a message that is not a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolMismatch("the server sent a message without a type: update the plug-in")
    required = SERVER_FIELDS.get(kind)
    if required is None:
        return message
    missing = [name for name in required if name not in message]
    if missing:
        raise ProtocolMismatch(f"the server's {kind} message lacks {', '.join(missing)}: update the plug-in")
    return message


def is_known(message: dict[str, Any]) -> bool:
    """Whether this bridge knows the message's type; a newer server's additions are skipped."""
    return message.get("type") in SERVER_FIELDS


def features(hello: dict[str, Any]) -> frozenset[str]:
    """The feature names a hello offers; none for a server that predates features."""
    offered = hello.get("features")
    if not isinstance(offered, list):
        return frozenset()
    return frozenset(name for name in offered if isinstance(name, str))
