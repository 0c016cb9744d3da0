"""The SDK's I/O-free core: builds requests, folds server messages into job state.

``Client`` and ``AsyncClient`` only move bytes between a websocket and a ``ClientSession``
and wait with deadlines; every decision (what to upload, whether the server offers what a
request needs, what a message means for a job, which waiting call gets it, which exception
to raise) is made here, once, so the two clients cannot drift apart.

The path of one reply: the client's reader hands a frame to ``ClientSession.receive``; the
session parses it (skipping types it does not know), folds it into the job's ``JobState``
with ``JobState.handle`` and gives the resulting ``JobEvent`` objects to the sink the
waiting call registered with ``start`` (for ``image_status``: with ``begin``). When the
connection ends, ``connection_lost`` ends every job and wait with the reason.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from . import fill
from .errors import (
    GenfillError,
    InvalidInput,
    JobCancelled,
    LimitExceeded,
    ProtocolError,
    Unsupported,
    error_for_code,
)
from .fill import Box, Size
from .images import ImageInput, array_from_frame, frame_from_array, to_mask, to_rgba
from .protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Cancelled,
    Error,
    Feature,
    FillRequest,
    FrameError,
    HasImages,
    Hello,
    ImageFormat,
    ImageStatus,
    Limits,
    Margins,
    Mode,
    Progress,
    ReferenceRole,
    Result,
    ResultWarning,
    Submit,
    UnknownMessage,
    Uploaded,
    WireBox,
    decode_frame,
    frame_image_id,
    parse_server_message,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

# The context the server needs around a selection is at most the largest model's native size
# plus a margin; sending only that is what keeps an 8k canvas as cheap as a 1k one.
_CROP_NATIVE_SIZE = 1024
_MAX_HELD_FRAMES = 64
TERMINAL_KINDS = frozenset({"result", "error", "cancelled"})

logger = logging.getLogger("genfill")
_Model = TypeVar("_Model", bound=BaseModel)


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened to a job, as ``Job`` iteration yields it.

    ``kind`` is ``accepted`` (``queue_position`` set), ``progress`` (``step``, ``total`` and,
    every few steps, ``preview``: a small RGB uint8 array), or one of the terminal kinds
    ``result``, ``error`` and ``cancelled``.
    """

    kind: Literal["accepted", "progress", "result", "error", "cancelled"]
    job_id: str
    queue_position: int | None = None
    step: int | None = None
    total: int | None = None
    preview: np.ndarray | None = None


@dataclass
class FillResult:
    """The variations of one finished job.

    Attributes:
        arrays: one ``(box.height, box.width, 4)`` uint8 RGBA layer per variation; alpha is 0
            wherever the canvas stays unchanged.
        box: where the layers go, in the coordinates of the result canvas.
        seeds: the seed of each variation; resubmitting with ``seed=seeds[i], variations=1``
            reproduces variation ``i``.
        canvas_size: the size of the result canvas (larger than the input after ``expand``).
        warnings: what the engine accepted but did not honour (an ignored prompt), each a
            ``ResultWarning`` with a stable ``code`` and a ``message`` for the user; empty when
            everything was honoured or the server predates the ``warnings`` feature.
    """

    job_id: str
    arrays: list[np.ndarray]
    box: Box
    seeds: list[int]
    canvas_size: Size
    engine: str
    model: str | None
    seconds: float
    _base_canvas: np.ndarray = field(repr=False)
    warnings: list[ResultWarning] = field(default_factory=list)

    @property
    def images(self) -> list[PILImage.Image]:
        """The layers as RGBA PIL images, each the size of ``box``."""
        from PIL import Image

        return [Image.fromarray(array, "RGBA") for array in self.arrays]

    def composite_array(self, index: int = 0) -> np.ndarray:
        """The whole result canvas with variation ``index`` applied, ``(H, W, 4)`` uint8 RGBA."""
        return fill.composite(self._base_canvas, self.arrays[index], self.box)

    def composite(self, index: int = 0) -> PILImage.Image:
        """The whole result canvas with variation ``index`` applied, as an RGBA PIL image."""
        from PIL import Image

        return Image.fromarray(self.composite_array(index), "RGBA")


@dataclass
class PreparedJob:
    """A validated request plus the frames it needs on the server."""

    job_id: str
    request: FillRequest
    frames: dict[str, bytes]
    base_canvas: np.ndarray
    result_format: Literal["rgba8", "png"] = "rgba8"
    previews: bool = True

    def submit_message(self) -> str:
        return Submit(
            job_id=self.job_id, request=self.request, result_format=self.result_format, previews=self.previews
        ).model_dump_json()


class JobState:
    """Where one job stands, updated by ``handle`` from the server's messages."""

    def __init__(self, prepared: PreparedJob) -> None:
        self.prepared = prepared
        self.job_id = prepared.job_id
        self.status: Literal["submitted", "queued", "running", "done", "failed", "cancelled"] = "submitted"
        self.step = 0
        self.total = 0
        self.result: FillResult | None = None
        self.error: GenfillError | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def handle(self, message: Any, frames: dict[str, np.ndarray]) -> list[JobEvent]:
        """Applies one server message addressed to this job and returns the events it makes.

        ``frames`` holds decoded images received so far, by id; the ones this message uses are
        taken out of it.
        """
        if self.finished:
            return []
        if isinstance(message, Accepted):
            self.status = "queued"
            return [JobEvent("accepted", self.job_id, queue_position=message.queue_position)]
        if isinstance(message, Progress):
            self.status = "running"
            self.step, self.total = message.step, message.total
            preview = frames.pop(message.preview, None) if message.preview else None
            if preview is not None and preview.ndim == 3:
                preview = preview[:, :, :3]
            return [JobEvent("progress", self.job_id, step=message.step, total=message.total, preview=preview)]
        if isinstance(message, Result):
            missing = [v.image for v in message.variations if v.image not in frames]
            if missing:
                self._fail(ProtocolError(f"result refers to {len(missing)} image(s) never received", job_id=self.job_id))
                return [JobEvent("error", self.job_id)]
            base = self.prepared.base_canvas
            if self.prepared.request.expand is not None:
                margins = self.prepared.request.expand
                base, _ = fill.expand_canvas(
                    base, left=margins.left, right=margins.right, top=margins.top, bottom=margins.bottom
                )
            # Identical variations share one image id, and so one frame.
            arrays = [frames[v.image] for v in message.variations]
            for variation in message.variations:
                frames.pop(variation.image, None)
            self.result = FillResult(
                job_id=self.job_id,
                arrays=arrays,
                box=_box(message.box),
                seeds=[v.seed for v in message.variations],
                canvas_size=Size(base.shape[1], base.shape[0]),
                engine=message.engine,
                model=message.model,
                seconds=message.seconds,
                _base_canvas=base,
                warnings=list(message.warnings),
            )
            self.status = "done"
            return [JobEvent("result", self.job_id)]
        if isinstance(message, Cancelled):
            self.status = "cancelled"
            self.error = JobCancelled(f"job {self.job_id} was cancelled", code="cancelled", job_id=self.job_id)
            return [JobEvent("cancelled", self.job_id)]
        if isinstance(message, Error):
            self._fail(error_for_code(message.code, message.message, job_id=self.job_id))
            return [JobEvent("error", self.job_id)]
        return []

    def fail(self, error: GenfillError) -> list[JobEvent]:
        """Ends the job from the client's side (connection lost, protocol broken)."""
        if self.finished:
            return []
        self._fail(error)
        return [JobEvent("error", self.job_id)]

    def _fail(self, error: GenfillError) -> None:
        self.status = "failed"
        self.error = error

    def outcome(self) -> FillResult:
        """The result of a finished job; raises the job's error if it has none."""
        if self.result is not None:
            return self.result
        if self.error is not None:
            raise self.error
        raise RuntimeError(f"job {self.job_id} has not finished")


class JobHandle:
    """What ``Job`` and ``AsyncJob`` share: the job's state and where its events queue up.

    ``events`` is a ``queue.SimpleQueue`` or an ``asyncio.Queue``, ``done`` a
    ``threading.Event`` or an ``asyncio.Event``; the session calls ``_push`` with each event.
    """

    state: JobState

    def __init__(self, client: Any, prepared: PreparedJob, events: Any, done: Any) -> None:
        self._client = client
        self.job_id = prepared.job_id
        self._events = events
        self._done = done

    def _push(self, event: JobEvent) -> None:
        self._events.put_nowait(event)
        if event.kind in TERMINAL_KINDS:
            self._done.set()


def _box(wire: WireBox) -> Box:
    return Box(wire.x, wire.y, wire.width, wire.height)


EventSink = Callable[[JobEvent], None]
"""Where a job's events go: the waiting client's queue."""
OnProgress = Callable[[JobEvent], None] | None
"""A callable taking each ``JobEvent`` of a job, or ``None``."""
StatusSink = Callable[["ImageStatus | GenfillError"], None]
"""Where the answer to one ``has_images`` goes: the server's ``image_status``, or the error
that ended the wait."""


class ClientSession:
    """The state of one connection: the server's hello, images it holds, jobs in flight, and
    which waiting call each reply belongs to.

    Feed it every frame received (``receive``) and tell it when the connection ends
    (``connection_lost``); it folds each message into its job and hands the resulting events
    to the sink the waiting call registered (``start``, ``begin``). ``Client`` and
    ``AsyncClient`` only move bytes and wait; they differ in nothing decided here. Not
    thread-safe: the sync client calls it under one lock.
    """

    def __init__(self) -> None:
        self.hello: Hello | None = None
        self.jobs: dict[str, JobState] = {}
        self.closed: GenfillError | None = None
        """Why the connection ended, once it has; every later call raises it."""
        self.frames_uploaded = 0
        """Image frames sent on this connection; the same image is never sent twice."""
        self._sinks: dict[str, EventSink] = {}
        # The server answers has_images in order, so answers go to waiters in order. A waiter
        # that gave up stays queued and takes its own late answer, keeping the rest aligned.
        self._status_sinks: deque[StatusSink] = deque()
        self._server_images: set[str] = set()
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def limits(self) -> Limits:
        return self.hello.limits if self.hello else Limits()

    def ready(self) -> Hello | None:
        """The server's hello once connected, ``None`` while a connection is still to open.

        Raises:
            GenfillError: the error that ended the connection (``ConnectionClosed`` after
                ``close``); a client does not reconnect by itself.
        """
        if self.closed is not None:
            raise self.closed
        return self.hello

    def receive_hello(self, data: str | bytes) -> Hello:
        """Parses the server's first message.

        Raises:
            ProtocolError: it is not a hello, or the server speaks another major protocol
                version (features within a version are negotiated, see ``Hello.features``).
            GenfillError: the server refused the connection with an error message.
        """
        if isinstance(data, bytes):
            raise ProtocolError("server sent binary data before its hello")
        try:
            message = parse_server_message(data)
        except (ValidationError, ValueError) as exc:
            raise ProtocolError(f"server's first message is not a valid hello: {_first_error(exc)}") from exc
        if isinstance(message, Error):
            raise error_for_code(message.code, message.message)
        if not isinstance(message, Hello):
            raise ProtocolError(f"expected hello, got {message.type}")
        if message.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"server speaks protocol {message.protocol_version}, this SDK speaks {PROTOCOL_VERSION}: "
                "install matching major versions of genfill"
            )
        self.hello = message
        return message

    def prepare_fill(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str = "",
        *,
        mode: Mode | str = Mode.FILL,
        job_id: str | None = None,
        result_format: Literal["rgba8", "png"] = "rgba8",
        upload_format: Literal["rgba8", "png"] = "rgba8",
        previews: bool = True,
        **options: Any,
    ) -> PreparedJob:
        """Validates a fill request and encodes what it uploads.

        When the selection covers a small part of a large canvas, only the context around it is
        sent (``region`` tells the server where it sits); ``control`` and ``references`` images
        the size of the canvas are cut with the same region.

        Raises:
            InvalidInput: image and mask sizes differ, the mask is empty, an image cannot be
                read, or an option is invalid (also a ``ValueError``).
            LimitExceeded: an upload is larger than the server accepts.
        """
        with _user_input():
            # Arrays already in the wire's shape are read in place: a full-canvas copy of an
            # 8192² canvas costs more than cropping and sending the part around the selection.
            # The result composites onto ``image`` as it is when ``composite`` is called.
            # Only the context around the selection is sent, so a canvas file may be larger
            # than the server's limit; four times it is where decoding one stops being sane.
            max_pixels = self.limits.max_image_pixels * 4
            canvas = _rgba_in_place(image, max_pixels)
            selection = _mask_in_place(mask, max_pixels)
            if selection.shape != canvas.shape[:2]:
                raise InvalidInput(
                    f"mask is {selection.shape[1]}x{selection.shape[0]}, image is {canvas.shape[1]}x{canvas.shape[0]}"
                )
            if Mode(mode) is Mode.EXPAND:
                raise InvalidInput("mode 'expand' grows the canvas: use expand(image, left=..., right=...)")
            region = _region_to_send(selection)
            sent_image = canvas[region.slices] if region.size != _size_of(canvas) else canvas
            sent_mask = selection[region.slices] if region.size != _size_of(canvas) else selection
            frames: dict[str, bytes] = {}
            image_ref = self._add_frame(frames, sent_image, ImageFormat(upload_format))
            mask_ref = self._add_frame(frames, sent_mask, _gray_format(upload_format))
            self._extra_images(options, frames, _size_of(canvas), region, upload_format)
            request = self._request(
                image=image_ref,
                mask=mask_ref,
                region=None if region.size == _size_of(canvas) else WireBox(**region._asdict()),
                prompt=prompt,
                mode=mode,
                **options,
            )
            return self._prepared(job_id, request, frames, canvas, result_format, previews)

    def prepare_expand(
        self,
        image: ImageInput,
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        prompt: str = "",
        job_id: str | None = None,
        result_format: Literal["rgba8", "png"] = "rgba8",
        upload_format: Literal["rgba8", "png"] = "rgba8",
        previews: bool = True,
        **options: Any,
    ) -> PreparedJob:
        """Validates an expand (outpaint) request: the canvas grows by the margins in pixels.

        ``control`` and ``references`` images cropped with the canvas are the size of the
        grown canvas. Raises as ``prepare_fill`` does.
        """
        with _user_input():
            canvas = to_rgba(image, max_pixels=self.limits.max_image_pixels)
            frames: dict[str, bytes] = {}
            image_ref = self._add_frame(frames, canvas, ImageFormat(upload_format))
            margins = _validated(Margins, left=left, right=right, top=top, bottom=bottom)
            grown = Size(canvas.shape[1] + margins.left + margins.right, canvas.shape[0] + margins.top + margins.bottom)
            self._extra_images(options, frames, grown, Box(0, 0, grown.width, grown.height), upload_format)
            request = self._request(image=image_ref, prompt=prompt, mode=Mode.EXPAND, expand=margins, **options)
            return self._prepared(job_id, request, frames, canvas, result_format, previews)

    def _prepared(
        self,
        job_id: str | None,
        request: FillRequest,
        frames: dict[str, bytes],
        canvas: np.ndarray,
        result_format: Literal["rgba8", "png"],
        previews: bool,
    ) -> PreparedJob:
        job_id = uuid.uuid4().hex if job_id is None else job_id
        # Built once here so a bad job id, result format or previews flag is refused before
        # anything is sent, not by the server after the upload.
        _validated(Submit, job_id=job_id, request=request, result_format=result_format, previews=previews)
        return PreparedJob(job_id, request, frames, canvas, result_format, previews)

    def _extra_images(self, options: dict[str, Any], frames: dict[str, bytes], canvas: Size, region: Box, upload_format: str) -> None:
        if options.get("control") is not None:
            options["control"] = self._control_inputs(options["control"], frames, canvas, region, upload_format)
        if options.get("references") is not None:
            options["references"] = self._reference_inputs(options["references"], frames, canvas, region, upload_format)

    def _control_inputs(
        self, controls: Any, frames: dict[str, bytes], canvas: Size, region: Box, upload_format: str
    ) -> list[dict]:
        """Turns ``control`` options into wire form, uploading any control image given.

        Each entry is a ``ControlInput``, a control type name, or a dict of ``ControlInput``
        fields whose ``image`` may be a PIL image, array or path the size of the canvas.
        """
        wire = []
        for control in _entries(controls, "control"):
            if isinstance(control, str):
                control = {"type": control}
            image = control.get("image")
            if image is not None and not isinstance(image, str):
                rgba = self._fit_to_canvas(to_rgba(image), canvas, region, "control image")
                control["image"] = self._add_frame(frames, rgba, ImageFormat(upload_format))
            wire.append(control)
        return wire

    def _reference_inputs(
        self, references: Any, frames: dict[str, bytes], canvas: Size, region: Box, upload_format: str
    ) -> list[dict]:
        """Turns ``references`` into wire form, uploading each image given as pixels.

        Each entry is an ``ImageReference`` or a dict of its fields whose ``image`` is an
        uploaded image id, or a PIL image, array or path: the size of the canvas when the
        reference is cropped with the canvas (``crop="context"``, the default for every role
        but ``reference``), any size for ``crop="whole"``. A ``region_mask`` is sent as gray.
        """
        wire = []
        for reference in _entries(references, "reference"):
            if isinstance(reference, str):
                raise InvalidInput(f"a reference is a dict of ImageReference fields, got the string {reference!r}")
            image = reference.get("image")
            if image is not None and not isinstance(image, str):
                role = ReferenceRole(reference.get("role"))
                gray = role is ReferenceRole.REGION_MASK
                pixels = to_mask(image) if gray else to_rgba(image)
                crop = reference.get("crop") or ("whole" if role is ReferenceRole.REFERENCE else "context")
                if crop == "context":
                    pixels = self._fit_to_canvas(pixels, canvas, region, f"{role} image")
                fmt = _gray_format(upload_format) if gray else ImageFormat(upload_format)
                reference["image"] = self._add_frame(frames, pixels, fmt)
            wire.append(reference)
        return wire

    @staticmethod
    def _fit_to_canvas(pixels: np.ndarray, canvas: Size, region: Box, what: str) -> np.ndarray:
        if _size_of(pixels) != canvas:
            raise InvalidInput(
                f"{what} is {pixels.shape[1]}x{pixels.shape[0]}, the canvas is {canvas.width}x{canvas.height}"
            )
        return pixels[region.slices] if region.size != canvas else pixels

    def _request(self, **fields: Any) -> FillRequest:
        request = _validated(FillRequest, **{name: value for name, value in fields.items() if value is not None})
        limits = self.limits
        if request.variations > limits.max_variations:
            raise LimitExceeded(f"variations={request.variations} is over the server's limit of {limits.max_variations}")
        if request.steps is not None and request.steps > limits.max_steps:
            raise LimitExceeded(f"steps={request.steps} is over the server's limit of {limits.max_steps}")
        if len(request.prompt) > limits.max_prompt_chars or len(request.negative_prompt) > limits.max_prompt_chars:
            raise LimitExceeded(f"the prompt is over the server's limit of {limits.max_prompt_chars} characters")
        return request

    def _add_frame(self, frames: dict[str, bytes], array: np.ndarray, fmt: ImageFormat) -> str:
        limits = self.limits
        height, width = array.shape[:2]
        if width * height > limits.max_image_pixels:
            raise LimitExceeded(
                f"image of {width}x{height} pixels is over the server's limit of {limits.max_image_pixels} pixels"
            )
        if max(width, height) > limits.max_image_side:
            raise LimitExceeded(f"image of {width}x{height} pixels is over the server's limit of {limits.max_image_side} a side")
        frame = frame_from_array(array, fmt)
        if len(frame) > limits.max_message_bytes:
            raise LimitExceeded(
                f"image frame of {len(frame)} bytes is over the server's limit of {limits.max_message_bytes} bytes"
            )
        # The frame was just built here: its header's hash is the payload's, no need to check.
        image_ref = frame_image_id(frame)
        frames[image_ref] = frame
        return image_ref

    def begin(self, prepared: PreparedJob, on_status: StatusSink) -> str | None:
        """Checks that ``prepared`` can be sent on this connection, before anything is.

        Returns the ``has_images`` message to send, whose answer goes to ``on_status``, or
        ``None`` when the server is known to hold every image (then ``on_status`` is unused).

        Raises:
            ConnectionClosed (or the error that ended the connection): it has ended.
            Unsupported: the request needs a feature the server's hello does not offer.
            InvalidInput: a job with this id is already in flight on this connection.
        """
        if self.closed is not None:
            raise self.closed
        if prepared.request.references and not (self.hello is not None and self.hello.offers(Feature.REFERENCES)):
            raise Unsupported(
                "this server does not take references (its hello does not offer the 'references' feature): "
                "update the genfill server, or leave references out",
                code="unsupported",
            )
        if prepared.job_id in self.jobs:
            raise InvalidInput(f"job id {prepared.job_id!r} is already in flight on this connection")
        unknown = [image_ref for image_ref in prepared.frames if image_ref not in self._server_images]
        if not unknown:
            return None
        self._status_sinks.append(on_status)
        return HasImages(image_ids=unknown).model_dump_json()

    def frames_to_upload(self, prepared: PreparedJob, status: ImageStatus | None) -> list[bytes]:
        """The frames the server lacks, given its answer to ``has_images`` (``None``: not asked)."""
        present = set(status.present) if status else set()
        self._server_images.update(present)
        frames = [frame for image_ref, frame in prepared.frames.items() if image_ref not in self._server_images]
        # Counted as sent from here: the same job's mask and image may share an id, and a
        # second job on this connection must not upload what the first one just did.
        self._server_images.update(prepared.frames)
        self.frames_uploaded += len(frames)
        return frames

    def start(self, prepared: PreparedJob, on_event: EventSink) -> JobState:
        """Records a job about to be submitted; its events go to ``on_event``.

        Raises what ``begin`` raises.
        """
        if self.closed is not None:
            raise self.closed
        if prepared.job_id in self.jobs:
            raise InvalidInput(f"job id {prepared.job_id!r} is already in flight on this connection")
        state = JobState(prepared)
        self.jobs[prepared.job_id] = state
        self._sinks[prepared.job_id] = on_event
        return state

    def abandon(self, job_id: str) -> None:
        """Forgets a job whose submit never went out."""
        self.jobs.pop(job_id, None)
        self._sinks.pop(job_id, None)

    @staticmethod
    def cancel_message(job_id: str) -> str:
        return Cancel(job_id=job_id).model_dump_json()

    def receive(self, data: str | bytes) -> None:
        """Applies one frame from the server and delivers what it means to the waiting sinks.

        Raises:
            ProtocolError: the frame is malformed; the connection should close with 1002,
                then ``connection_lost`` ends what waits on it.
        """
        if isinstance(data, bytes):
            self._receive_binary(data)
            return
        try:
            message = parse_server_message(data)
        except (ValidationError, ValueError) as exc:
            raise ProtocolError(f"server sent an invalid message: {_first_error(exc)}") from exc
        if isinstance(message, UnknownMessage):
            # A newer server's addition (protocol.py: clients skip types they do not know).
            logger.debug("skipping server message of unknown type %r", message.type)
            return
        if isinstance(message, Uploaded):
            self._server_images.add(message.image_id)
        if isinstance(message, ImageStatus):
            self._server_images.update(message.present)
            if self._status_sinks:
                self._status_sinks.popleft()(message)
            return
        job_id = getattr(message, "job_id", None)
        if isinstance(message, Error) and job_id is None:
            if self._status_sinks:
                self._status_sinks.popleft()(error_for_code(message.code, message.message))
            else:
                logger.debug("server error %s with nothing waiting: %s", message.code, message.message)
            return
        state = self.jobs.get(job_id) if job_id else None
        if state is None:
            return
        events = state.handle(message, self._frames)
        sink = self._sinks[state.job_id]
        if state.finished:
            # A finished job's images were taken; drop its record so a long-lived connection
            # does not grow with every job.
            self.abandon(state.job_id)
        for event in events:
            sink(event)

    def _receive_binary(self, data: bytes) -> None:
        try:
            header, payload = decode_frame(data)
            array = array_from_frame(header, payload)
        except (FrameError, InvalidInput) as exc:
            raise ProtocolError(f"server sent a bad binary frame: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a PNG payload Pillow cannot decode
            raise ProtocolError(f"server sent an image frame that does not decode: {exc}") from exc
        self._frames[header.image_id] = array
        while len(self._frames) > _MAX_HELD_FRAMES:
            self._frames.popitem(last=False)

    def connection_lost(self, error: GenfillError) -> None:
        """Ends every job and wait on this connection with ``error``; later calls raise it."""
        if self.closed is None:
            self.closed = error
        for job_id, state in list(self.jobs.items()):
            sink = self._sinks[job_id]
            events = state.fail(error)
            self.abandon(job_id)
            for event in events:
                sink(event)
        while self._status_sinks:
            self._status_sinks.popleft()(error)


def status_or_raise(answer: ImageStatus | GenfillError) -> ImageStatus:
    """What a ``StatusSink`` received: the server's answer, or the error that ended the wait."""
    if isinstance(answer, GenfillError):
        raise answer
    return answer


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return exc.errors()[0]["msg"]
    return str(exc)


def _validated(model: type[_Model], /, **fields: Any) -> _Model:
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise InvalidInput(f"invalid {where}: {first['msg']} (got {_short(first.get('input'))})") from exc


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entries(value: Any, what: str) -> list[Any]:
    """``control`` or ``references`` entries as dicts (or strings), whatever the caller passed."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise InvalidInput(f"{what}s must be a list, got {type(value).__name__}")
    entries: list[Any] = []
    for entry in value:
        if isinstance(entry, str):
            entries.append(entry)
        elif isinstance(entry, BaseModel):
            entries.append(entry.model_dump())
        elif isinstance(entry, dict):
            entries.append(dict(entry))
        else:
            raise InvalidInput(f"each {what} is a dict or a {what} model, got {type(entry).__name__}")
    return entries


def _gray_format(upload_format: str) -> ImageFormat:
    return ImageFormat.PNG if upload_format == "png" else ImageFormat.GRAY8


@contextmanager
def _user_input() -> Iterator[None]:
    """Turns what validating the caller's arguments raised into ``InvalidInput``."""
    try:
        yield
    except GenfillError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidInput(str(exc)) from exc


def _rgba_in_place(image: ImageInput, max_pixels: int) -> np.ndarray:
    """``image`` itself when it is an ``(H, W, 4)`` uint8 array, else ``to_rgba(image)``."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4 and image.size:
        return image
    return to_rgba(image, max_pixels=max_pixels)


def _mask_in_place(mask: ImageInput, max_pixels: int) -> np.ndarray:
    """``mask`` itself when it is an ``(H, W)`` uint8 array, else ``to_mask(mask)``."""
    if isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.ndim == 2 and mask.size:
        return mask
    return to_mask(mask, max_pixels=max_pixels)


def _size_of(array: np.ndarray) -> Size:
    return Size(array.shape[1], array.shape[0])


def _region_to_send(selection: np.ndarray) -> Box:
    canvas = _size_of(selection)
    whole = Box(0, 0, canvas.width, canvas.height)
    try:
        region = fill.context_box(selection, native_size=_CROP_NATIVE_SIZE)
    except fill.EmptyMaskError:
        raise InvalidInput("the mask selects nothing: paint the area to fill in white") from None
    # Cropping pays only when it saves most of the upload.
    if region.width * region.height * 2 > canvas.width * canvas.height:
        return whole
    return region
