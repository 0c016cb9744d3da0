"""The genfill wire protocol: every message the server and its clients exchange.

This is the only module that both the server and the SDK import. Anything that changes the
pixels of a result belongs in ``FillRequest``; a retried request with the same seed gives the
same pixels.

One websocket per client. Control messages are JSON text frames whose ``type`` field names
the model below. Pixels travel as binary frames (never base64 in JSON): a fixed 48-byte
header (see ``FrameHeader``) followed by the payload. Images are content-addressed by the
sha256 of their payload, so a client asks ``has_images`` before uploading and never sends the
same layer twice.

A job's life, as the client sees it::

    submit -> accepted -> progress* -> result | error | cancelled

Binary frames a result refers to are always sent before the ``result`` message itself.

How the protocol grows without breaking anyone:

- ``PROTOCOL_VERSION`` changes only for a change an older peer cannot survive. Everything
  additive is a *feature* the server lists in ``hello.features`` (``Feature``); a client uses
  what the server offers and the server answers ``unsupported`` to a request for what it lacks.
- Clients read server messages leniently: unknown fields are ignored, a message of an unknown
  ``type`` parses as ``UnknownMessage`` (to be skipped), an unknown error code is kept as its
  string, unknown enum values in lists are dropped.
- The server reads client messages strictly: an unknown field is refused with
  ``invalid_request`` / ``bad_message``, so a typo never silently changes a result.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from enum import StrEnum
from typing import Annotated, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

PROTOCOL_VERSION = 1
"""The major version: a client refuses a server of another major version. Additions are
features (``Feature``), never a new version."""

JOB_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
ImageId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the payload, hex")]
JobId = Annotated[
    str,
    Field(pattern=JOB_ID_PATTERN, description="chosen by the client, unique per client"),
]
MAX_SEED = 2**32 - 1


class Mode(StrEnum):
    """What the selection is for; decides the pre-fill and the defaults."""

    FILL = "fill"
    EXPAND = "expand"
    ADD = "add"
    REMOVE = "remove"


class ImageFormat(StrEnum):
    RGBA8 = "rgba8"
    GRAY8 = "gray8"
    PNG = "png"


class Scheduler(StrEnum):
    DDIM = "ddim"
    EULER = "euler"
    EULER_ANCESTRAL = "euler_a"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    UNIPC = "unipc"


class ControlType(StrEnum):
    CANNY = "canny"
    LINEART_STANDARD = "lineart_standard"
    SHUFFLE = "shuffle"
    LINEART = "lineart"
    DEPTH = "depth"
    POSE = "pose"
    HED = "hed"
    MLSD = "mlsd"
    SCRIBBLE = "scribble"
    INPAINT = "inpaint"


class Feature(StrEnum):
    """Additions a server may offer, listed in ``hello.features``. A client checks for one
    before using it; clients ignore names they do not know."""

    REFERENCES = "references"
    """``FillRequest.references``: extra images by role (``ReferenceRole``)."""
    WARNINGS = "warnings"
    """``result.warnings``: what the engine accepted but could not honour (an ignored prompt)."""
    CAPABILITIES = "capabilities"
    """``hello.engines[].capabilities``: what each engine takes."""
    REGIONS = "regions"
    REMOTE_ENGINES = "remote_engines"
    FRAMES = "frames"


class ReferenceRole(StrEnum):
    """What an extra image of a request is for."""

    CONTROL = "control"
    """ControlNet guidance of type ``control_type`` (an edge map, a depth map...)."""
    REFERENCE = "reference"
    """A style or content reference (IP-Adapter, an edit model's reference image)."""
    REGION_MASK = "region_mask"
    """A gray mask of where a region's conditioning applies."""
    INIT = "init"
    """Pixels to start from instead of the canvas's own in the selection."""


class ErrorCode(StrEnum):
    """Stable error codes. Clients map them to exception classes; never rename one."""

    BAD_MESSAGE = "bad_message"
    LIMIT_EXCEEDED = "limit_exceeded"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_INVALID = "image_invalid"
    UNKNOWN_IMAGE = "unknown_image"
    SIZE_MISMATCH = "size_mismatch"
    EMPTY_SELECTION = "empty_selection"
    INVALID_REQUEST = "invalid_request"
    JOB_ID_IN_USE = "job_id_in_use"
    UNKNOWN_JOB = "unknown_job"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    MODEL_NOT_FOUND = "model_not_found"
    WEIGHTS_NOT_INSTALLED = "weights_not_installed"
    OUT_OF_MEMORY = "out_of_memory"
    ENGINE_FAILED = "engine_failed"
    SHUTTING_DOWN = "shutting_down"
    UNSUPPORTED = "unsupported"
    """The request asks for a feature, option or reference role the server or engine lacks."""
    REMOTE_AUTH_FAILED = "remote_auth_failed"
    """A cloud provider refused the server's API key or token (its 401 or 403)."""
    REMOTE_QUOTA_EXCEEDED = "remote_quota_exceeded"
    """The cloud account is out of credits or quota (402, or a quota 429)."""
    MODERATED = "moderated"
    """A cloud provider's safety system refused the prompt, the image or its own result."""
    REMOTE_UNAVAILABLE = "remote_unavailable"
    """A cloud provider could not be reached or kept failing (network down, 5xx after retries)."""
    REMOTE_TIMEOUT = "remote_timeout"
    """A cloud provider did not answer within the job's deadline."""


class _Message(BaseModel):
    """A message a client sends: read strictly by the server."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _ServerMessage(BaseModel):
    """A message the server sends: read leniently by clients (unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


def _known_values(enum: type[StrEnum]):
    """A list validator that drops values a newer server may send and this client lacks."""

    def keep(values: object) -> object:
        if not isinstance(values, list):
            return values
        known = {member.value for member in enum}
        return [value for value in values if not isinstance(value, str) or value in known]

    return BeforeValidator(keep)


_KnownModes = Annotated[list[Mode], _known_values(Mode)]
_KnownControlTypes = Annotated[list[ControlType], _known_values(ControlType)]
_KnownRoles = Annotated[list[ReferenceRole], _known_values(ReferenceRole)]


class WireBox(_Message):
    """A rectangle in canvas pixels; ``genfill.fill.Box`` is its in-memory twin."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Margins(_Message):
    """How far to grow the canvas on each side when expanding, in pixels."""

    left: int = Field(0, ge=0, le=16384)
    right: int = Field(0, ge=0, le=16384)
    top: int = Field(0, ge=0, le=16384)
    bottom: int = Field(0, ge=0, le=16384)

    @property
    def is_empty(self) -> bool:
        return not (self.left or self.right or self.top or self.bottom)


class ControlInput(_Message):
    """ControlNet guidance. ``image`` is a ready control image; without it the server derives
    one from the canvas with the preprocessor named by ``type``."""

    type: ControlType
    strength: float = Field(1.0, ge=0.0, le=2.0)
    image: ImageId | None = None
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)


class ImageReference(_Message):
    """One extra image a request carries, by role.

    Attributes:
        image: the uploaded image's id.
        role: what it is for (``ReferenceRole``).
        weight: how strongly it acts, 0 to 2; for ``control`` the ControlNet's strength.
        crop: ``context`` for an image the size of the canvas, cropped and scaled with the
            canvas's context box (control maps, region masks, init images); ``whole`` for an
            image of any size used as it is (a reference picture). ``None`` takes the role's
            default: ``whole`` for ``reference``, ``context`` for the others.
        control_type: the ControlNet this image guides; required for ``control``, refused
            for the other roles.
        start, end: the part of the denoising (0 to 1) it acts on.
    """

    image: ImageId
    role: ReferenceRole
    weight: float = Field(1.0, ge=0.0, le=2.0)
    crop: Literal["context", "whole"] | None = None
    control_type: ControlType | None = None
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_role_fields(self) -> ImageReference:
        if self.role is ReferenceRole.CONTROL and self.control_type is None:
            raise ValueError("a control reference needs control_type (canny, depth, ...)")
        if self.role is not ReferenceRole.CONTROL and self.control_type is not None:
            raise ValueError(f"control_type is only for role 'control', not '{self.role}'")
        if self.start > self.end:
            raise ValueError(f"start={self.start} is after end={self.end}")
        return self

    @property
    def cropped(self) -> bool:
        """Whether the image is cut with the canvas's context box (see ``crop``)."""
        crop = self.crop or ("whole" if self.role is ReferenceRole.REFERENCE else "context")
        return crop == "context"


class Limits(_ServerMessage):
    """Limits the server enforces, announced in ``hello``. Over a limit a client gets a
    ``limit_exceeded``-family error; the connection and the server stay up."""

    max_message_bytes: int = Field(80 * 2**20, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_image_side: int = Field(16384, gt=0)
    max_queued_jobs_per_client: int = Field(16, gt=0)
    max_variations: int = Field(8, gt=0)
    max_steps: int = Field(150, gt=0)
    max_prompt_chars: int = Field(4000, gt=0)
    max_held_upload_bytes_per_client: int = Field(512 * 2**20, gt=0)
    max_messages_per_second: float = Field(200.0, gt=0)


class FillRequest(_Message):
    """Everything that decides the pixels of a fill.

    ``image`` is RGBA (or RGB/gray, promoted to RGBA) and ``mask`` an 8-bit selection of the same
    size: 0 keeps a pixel, 255 replaces it, values between replace it partly. When the client
    sends only the part of a larger canvas around the selection, ``region`` says where that part
    sits, so the result's box comes back in canvas coordinates. ``None`` in a generation option
    means "the engine's default for this model and mode".
    """

    image: ImageId
    mask: ImageId | None = None
    region: WireBox | None = None
    prompt: str = ""
    negative_prompt: str = ""
    mode: Mode = Mode.FILL
    engine: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=256)
    variations: int = Field(3, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    strength: float | None = Field(None, ge=0.0, le=1.0)
    guidance: float | None = Field(None, ge=0.0, le=30.0)
    scheduler: Scheduler | None = None
    grow_px: int | None = Field(None, ge=0, le=512)
    feather_px: int | None = Field(None, ge=0, le=512)
    blend_px: int | None = Field(None, ge=0, le=512)
    expand: Margins | None = None
    control: list[ControlInput] = Field(default_factory=list, max_length=4)
    references: list[ImageReference] = Field(default_factory=list, max_length=8)
    """Extra images by role; needs the server's ``references`` feature. A ``control`` entry
    here and a ``ControlInput`` with an ``image`` are the same thing: the server reads both."""

    @field_validator("expand")
    @classmethod
    def _expand_not_empty(cls, value: Margins | None) -> Margins | None:
        if value is not None and value.is_empty:
            raise ValueError("expand margins are all 0: grow at least one side")
        return value


# Client -> server


class HasImages(_Message):
    type: Literal["has_images"] = "has_images"
    image_ids: list[ImageId] = Field(max_length=64)


class Submit(_Message):
    """Start a job. Re-sending a ``job_id`` already in use never starts a second job: the
    server answers ``accepted`` again (``duplicate``) while the same request is pending or
    running, and ``job_id_in_use`` for a different request."""

    type: Literal["submit"] = "submit"
    job_id: JobId
    request: FillRequest
    result_format: Literal["rgba8", "png"] = "rgba8"
    previews: bool = True


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    job_id: JobId


ClientMessage = Annotated[HasImages | Submit | Cancel, Field(discriminator="type")]


# Server -> client


class EngineCapabilities(_ServerMessage):
    """What an engine takes, as ``hello`` lists it (feature ``capabilities``).

    Attributes:
        modes: the modes it runs.
        prompt: whether it uses the prompt; an engine that does not accepts one and says so
            in ``result.warnings``.
        soft_masks: whether grey selection values blend (``False``: binarized).
        options: the ``FillRequest`` generation options it honours (``steps``, ``guidance``,
            ``strength``, ``scheduler``, ``negative_prompt``, ``control``...); any other
            one set on a request is refused with ``unsupported``.
        reference_roles: the ``references`` roles it takes.
        control_types: the ControlNet types it can use.
        max_variations: the most variations one job may ask of it.
        native_size: the side of its native resolution in pixels; ``None``: any size.
        device_kind: ``gpu``, ``cpu`` or ``remote``.
    """

    modes: _KnownModes
    prompt: bool
    soft_masks: bool = True
    options: list[str] = Field(default_factory=list)
    reference_roles: _KnownRoles = Field(default_factory=list)
    control_types: _KnownControlTypes = Field(default_factory=list)
    max_variations: int = 8
    native_size: int | None = None
    device_kind: str = "cpu"


class EngineInfo(_ServerMessage):
    name: str
    available: bool
    modes: _KnownModes
    description: str = ""
    capabilities: EngineCapabilities | None = None


class ModelInfo(_ServerMessage):
    name: str
    engine: str
    architecture: str
    inpaint: bool
    native_size: int
    source: str = Field(description="where it was found: hf_cache, folder or single_file")
    modes: _KnownModes
    control: _KnownControlTypes = Field(default_factory=list)
    remote: bool = False
    """The model runs at a cloud provider: the context crop of the image leaves this machine."""
    host: str | None = None
    """For a remote model, the host its requests go to (``api.openai.com``); ``None`` for local ones."""


class Hello(_ServerMessage):
    type: Literal["hello"] = "hello"
    server_version: str
    protocol_version: int
    engines: list[EngineInfo]
    models: list[ModelInfo]
    default_engine: str
    limits: Limits
    features: list[str] = Field(default_factory=list)
    """The ``Feature`` names this server offers; an open set (clients skip unknown names)."""

    def offers(self, feature: Feature | str) -> bool:
        return str(feature) in self.features


class ImageStatus(_ServerMessage):
    type: Literal["image_status"] = "image_status"
    present: list[ImageId]
    missing: list[ImageId]


class Uploaded(_ServerMessage):
    type: Literal["uploaded"] = "uploaded"
    image_id: ImageId
    width: int
    height: int


class Accepted(_ServerMessage):
    type: Literal["accepted"] = "accepted"
    job_id: JobId
    queue_position: int = Field(ge=0, description="jobs ahead of this one; 0 runs next")
    duplicate: bool = False


class Progress(_ServerMessage):
    type: Literal["progress"] = "progress"
    job_id: JobId
    step: int = Field(ge=0)
    total: int = Field(ge=1)
    preview: ImageId | None = None


class Variation(_ServerMessage):
    image: ImageId
    seed: int


class ResultWarning(_ServerMessage):
    """Something a job asked for that its engine accepted but did not honour.

    ``code`` is a stable name (``prompt_ignored``, ...), an open set; ``message`` a sentence for
    the user."""

    code: str
    message: str


class Result(_ServerMessage):
    """A finished job. Each variation's image is an RGBA layer the size of ``box``, to be
    placed at ``box``'s offset in the canvas; its alpha is 0 wherever the canvas must stay
    unchanged. For ``expand`` the box is in the grown canvas, whose origin is the old one's
    moved by (``left``, ``top``)."""

    type: Literal["result"] = "result"
    job_id: JobId
    box: WireBox
    variations: list[Variation]
    engine: str
    model: str | None = None
    seconds: float = 0.0
    warnings: list[ResultWarning] = Field(default_factory=list)


class Error(_ServerMessage):
    type: Literal["error"] = "error"
    code: str = Field(description="an ErrorCode value; an open set, so clients keep codes they do not know")
    message: str
    job_id: str | None = None


class Cancelled(_ServerMessage):
    type: Literal["cancelled"] = "cancelled"
    job_id: JobId


ServerMessage = Annotated[
    Hello | ImageStatus | Uploaded | Accepted | Progress | Result | Error | Cancelled,
    Field(discriminator="type"),
]

client_message_adapter: TypeAdapter[HasImages | Submit | Cancel] = TypeAdapter(ClientMessage)
server_message_adapter: TypeAdapter[
    Hello | ImageStatus | Uploaded | Accepted | Progress | Result | Error | Cancelled
] = TypeAdapter(ServerMessage)


def parse_client_message(data: str | bytes) -> HasImages | Submit | Cancel:
    """Parses one JSON text frame from a client. Raises ``pydantic.ValidationError``."""
    return client_message_adapter.validate_json(data)


class UnknownMessage(NamedTuple):
    """A server message of a ``type`` this client does not know: a newer server's addition,
    to be skipped."""

    type: str
    job_id: str | None = None


_KNOWN_SERVER_TYPES = frozenset(
    model.model_fields["type"].default for model in (Hello, ImageStatus, Uploaded, Accepted, Progress, Result, Error, Cancelled)
)


def parse_server_message(
    data: str | bytes,
) -> Hello | ImageStatus | Uploaded | Accepted | Progress | Result | Error | Cancelled | UnknownMessage:
    """Parses one JSON text frame from the server, leniently (see the module docstring).

    Returns ``UnknownMessage`` for a JSON object whose ``type`` this client does not know.

    Raises:
        pydantic.ValidationError: not JSON, no ``type``, or a known message that lacks a field
            or has one of the wrong kind.
    """
    try:
        return server_message_adapter.validate_json(data)
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "union_tag_invalid":
            raise
        message = json.loads(data)
        kind = message.get("type")
        if not isinstance(kind, str) or kind in _KNOWN_SERVER_TYPES:
            raise
        job_id = message.get("job_id")
        return UnknownMessage(kind, job_id if isinstance(job_id, str) else None)


def json_schema() -> dict:
    """The JSON schema of both directions, as ``genfill schema`` prints it."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"genfill protocol v{PROTOCOL_VERSION}",
        "client_to_server": client_message_adapter.json_schema(),
        "server_to_client": server_message_adapter.json_schema(),
        "fill_request": FillRequest.model_json_schema(),
    }


# Binary frames

FRAME_MAGIC = b"GFIM"
_FORMAT_CODES = {ImageFormat.RGBA8: 0, ImageFormat.GRAY8: 1, ImageFormat.PNG: 2}
_FORMATS_BY_CODE = {code: fmt for fmt, code in _FORMAT_CODES.items()}
_HEADER = struct.Struct(">4sBBHII32s")
FRAME_HEADER_BYTES = _HEADER.size  # 48
_BYTES_PER_PIXEL = {ImageFormat.RGBA8: 4, ImageFormat.GRAY8: 1}


class FrameError(ValueError):
    """A binary frame is malformed: bad magic, unknown format, or a header that lies."""


class FrameHeader(NamedTuple):
    """The 48-byte header of a binary image frame, big-endian::

        magic "GFIM" | format u8 | flags u8 | reserved u16 | width u32 | height u32 | sha256[32]

    ``sha256`` is the digest of the payload that follows and doubles as the image id. For raw
    formats the payload is exactly ``width * height * channels`` bytes, rows top to bottom; for
    PNG ``width`` and ``height`` repeat the PNG's own header.
    """

    format: ImageFormat
    width: int
    height: int
    image_id: str


def image_id(payload: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(payload).hexdigest()


def encode_frame(fmt: ImageFormat, width: int, height: int, payload: bytes) -> bytes:
    """Builds a binary frame; the image id is the payload's sha256."""
    expected = _BYTES_PER_PIXEL.get(fmt)
    if expected is not None and len(payload) != width * height * expected:
        raise FrameError(f"{fmt} payload is {len(payload)} bytes, expected {width}x{height}x{expected}")
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(FRAME_MAGIC, _FORMAT_CODES[fmt], 0, 0, width, height, digest) + payload


def frame_image_id(frame: bytes | bytearray | memoryview) -> str:
    """The image id of a frame built by ``encode_frame``, read from its header unchecked."""
    return bytes(memoryview(frame)[FRAME_HEADER_BYTES - 32 : FRAME_HEADER_BYTES]).hex()


def decode_frame(frame: bytes | bytearray | memoryview) -> tuple[FrameHeader, memoryview]:
    """Splits and checks a binary frame. Raises ``FrameError`` if the header lies."""
    view = memoryview(frame)
    if len(view) < FRAME_HEADER_BYTES:
        raise FrameError(f"binary frame of {len(view)} bytes is shorter than its header")
    magic, code, _flags, _reserved, width, height, digest = _HEADER.unpack_from(view)
    if magic != FRAME_MAGIC:
        raise FrameError("binary frame does not start with GFIM")
    fmt = _FORMATS_BY_CODE.get(code)
    if fmt is None:
        raise FrameError(f"unknown image format code {code}")
    if width == 0 or height == 0:
        raise FrameError(f"image size {width}x{height} is empty")
    payload = view[FRAME_HEADER_BYTES:]
    expected = _BYTES_PER_PIXEL.get(fmt)
    if expected is not None and len(payload) != width * height * expected:
        raise FrameError(
            f"header says {width}x{height} {fmt} ({width * height * expected} bytes), "
            f"payload is {len(payload)} bytes"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise FrameError("payload does not match the sha256 in the frame header")
    return FrameHeader(fmt, width, height, digest.hex()), payload


_JOB_ID = re.compile(JOB_ID_PATTERN)


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and _JOB_ID.match(value) is not None
