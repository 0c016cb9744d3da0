"""The SDK's I/O-free core: builds requests, folds server messages into job state.

``Client`` and ``AsyncClient`` only move bytes between a websocket and a ``ClientSession``;
every decision (what to upload, what a message means for a job, which exception to raise)
is made here, once, so the two clients cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import ValidationError

from . import fill
from .errors import GenfillError, JobCancelled, LimitExceeded, ProtocolError, error_for_code
from .fill import Box, Size
from .images import ImageInput, array_from_frame, frame_from_array, to_mask, to_rgba
from .protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Cancelled,
    Error,
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
    Result,
    Submit,
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


def _box(wire: WireBox) -> Box:
    return Box(wire.x, wire.y, wire.width, wire.height)


class ClientSession:
    """The state of one connection: the server's hello, images it holds, jobs in flight.

    Feed it every frame received (``receive_text``, ``receive_binary``); ask it what to send.
    """

    def __init__(self) -> None:
        self.hello: Hello | None = None
        self.jobs: dict[str, JobState] = {}
        self._server_images: set[str] = set()
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self.frames_uploaded = 0
        """Image frames sent on this connection; the same image is never sent twice."""

    @property
    def limits(self) -> Limits:
        return self.hello.limits if self.hello else Limits()

    def receive_hello(self, data: str | bytes) -> Hello:
        """Parses the server's first message. Raises ``ProtocolError`` for anything else."""
        if isinstance(data, bytes):
            raise ProtocolError("server sent binary data before its hello")
        try:
            message = parse_server_message(data)
        except ValidationError as exc:
            raise ProtocolError(f"server's first message is not a valid hello: {exc.errors()[0]['msg']}") from exc
        if isinstance(message, Error):
            raise error_for_code(message.code, message.message)
        if not isinstance(message, Hello):
            raise ProtocolError(f"expected hello, got {message.type}")
        if message.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"server speaks protocol {message.protocol_version}, this SDK speaks {PROTOCOL_VERSION}: "
                "install matching versions of genfill"
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
        sent (``region`` tells the server where it sits).

        Raises:
            ValueError: image and mask sizes differ, the mask is empty, or an option is invalid.
            LimitExceeded: an upload is larger than the server accepts.
        """
        # Arrays already in the wire's shape are read in place: a full-canvas copy of an 8192²
        # canvas costs more than cropping and sending the part around the selection. The
        # result composites onto ``image`` as it is when ``composite`` is called.
        canvas = _rgba_in_place(image)
        selection = _mask_in_place(mask)
        if selection.shape != canvas.shape[:2]:
            raise ValueError(
                f"mask is {selection.shape[1]}x{selection.shape[0]}, image is {canvas.shape[1]}x{canvas.shape[0]}"
            )
        if Mode(mode) is Mode.EXPAND:
            raise ValueError("mode 'expand' grows the canvas: use expand(image, left=..., right=...)")
        region = _region_to_send(selection)
        sent_image = canvas[region.slices] if region.size != _size_of(canvas) else canvas
        sent_mask = selection[region.slices] if region.size != _size_of(canvas) else selection
        frames: dict[str, bytes] = {}
        image_ref = self._add_frame(frames, sent_image, ImageFormat(upload_format))
        mask_ref = self._add_frame(frames, sent_mask, ImageFormat.PNG if upload_format == "png" else ImageFormat.GRAY8)
        if "control" in options:
            options["control"] = self._control_inputs(options["control"], frames, _size_of(canvas), region, upload_format)
        request = self._request(
            image=image_ref,
            mask=mask_ref,
            region=None if region.size == _size_of(canvas) else WireBox(**region._asdict()),
            prompt=prompt,
            mode=mode,
            **options,
        )
        return PreparedJob(job_id or uuid.uuid4().hex, request, frames, canvas, result_format, previews)

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
        """Validates an expand (outpaint) request: the canvas grows by the margins in pixels."""
        canvas = to_rgba(image)
        frames: dict[str, bytes] = {}
        image_ref = self._add_frame(frames, canvas, ImageFormat(upload_format))
        if "control" in options:
            grown = Size(canvas.shape[1] + left + right, canvas.shape[0] + top + bottom)
            whole = Box(0, 0, grown.width, grown.height)
            options["control"] = self._control_inputs(options["control"], frames, grown, whole, upload_format)
        request = self._request(
            image=image_ref,
            prompt=prompt,
            mode=Mode.EXPAND,
            expand=Margins(left=left, right=right, top=top, bottom=bottom),
            **options,
        )
        return PreparedJob(job_id or uuid.uuid4().hex, request, frames, canvas, result_format, previews)

    def _control_inputs(
        self, controls: Any, frames: dict[str, bytes], canvas: Size, region: Box, upload_format: str
    ) -> list[dict]:
        """Turns ``control`` options into wire form, uploading any control image given.

        Each entry is a ``ControlInput``, a control type name, or a dict of ``ControlInput``
        fields whose ``image`` may be a PIL image, array or path the size of the canvas.
        """
        wire = []
        for control in controls:
            if isinstance(control, str):
                control = {"type": control}
            elif hasattr(control, "model_dump"):
                control = control.model_dump()
            else:
                control = dict(control)
            image = control.get("image")
            if image is not None and not isinstance(image, str):
                rgba = to_rgba(image)
                if _size_of(rgba) != canvas:
                    raise ValueError(
                        f"control image is {rgba.shape[1]}x{rgba.shape[0]}, the canvas is {canvas.width}x{canvas.height}"
                    )
                if region.size != canvas:
                    rgba = rgba[region.slices]
                control["image"] = self._add_frame(frames, rgba, ImageFormat(upload_format))
            wire.append(control)
        return wire

    def _request(self, **fields: Any) -> FillRequest:
        fields = {name: value for name, value in fields.items() if value is not None}
        try:
            request = FillRequest(**fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"invalid {where}: {first['msg']} (got {first.get('input')!r})") from exc
        limits = self.limits
        if request.variations > limits.max_variations:
            raise LimitExceeded(f"variations={request.variations} is over the server's limit of {limits.max_variations}")
        if request.steps is not None and request.steps > limits.max_steps:
            raise LimitExceeded(f"steps={request.steps} is over the server's limit of {limits.max_steps}")
        return request

    def _add_frame(self, frames: dict[str, bytes], array: np.ndarray, fmt: ImageFormat) -> str:
        limits = self.limits
        height, width = array.shape[:2]
        if width * height > limits.max_image_pixels:
            raise LimitExceeded(
                f"image of {width}x{height} pixels is over the server's limit of {limits.max_image_pixels} pixels"
            )
        frame = frame_from_array(array, fmt)
        if len(frame) > limits.max_message_bytes:
            raise LimitExceeded(
                f"image frame of {len(frame)} bytes is over the server's limit of {limits.max_message_bytes} bytes"
            )
        # The frame was just built here: its header's hash is the payload's, no need to check.
        image_ref = frame_image_id(frame)
        frames[image_ref] = frame
        return image_ref

    def unknown_images(self, prepared: PreparedJob) -> list[str]:
        """Ids this connection has not yet seen the server hold."""
        return [image_ref for image_ref in prepared.frames if image_ref not in self._server_images]

    @staticmethod
    def has_images_message(image_ids: list[str]) -> str:
        return HasImages(image_ids=image_ids).model_dump_json()

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

    def start(self, prepared: PreparedJob) -> JobState:
        if prepared.job_id in self.jobs and not self.jobs[prepared.job_id].finished:
            raise ValueError(f"job id {prepared.job_id!r} is already in flight on this connection")
        state = JobState(prepared)
        self.jobs[prepared.job_id] = state
        return state

    @staticmethod
    def cancel_message(job_id: str) -> str:
        return Cancel(job_id=job_id).model_dump_json()

    def receive_binary(self, data: bytes) -> None:
        """Holds a decoded image until the message that uses it arrives."""
        try:
            header, payload = decode_frame(data)
        except FrameError as exc:
            raise ProtocolError(f"server sent a bad binary frame: {exc}") from exc
        self._frames[header.image_id] = array_from_frame(header, payload)
        while len(self._frames) > _MAX_HELD_FRAMES:
            self._frames.popitem(last=False)

    def receive_text(self, data: str) -> tuple[JobState | None, Any, list[JobEvent]]:
        """Parses a server message and applies it to its job.

        Returns the job it concerns (``None`` for connection-level messages), the message and
        the job events it made.
        """
        try:
            message = parse_server_message(data)
        except ValidationError as exc:
            raise ProtocolError(f"server sent an invalid message: {exc.errors()[0]['msg']}") from exc
        if isinstance(message, Uploaded):
            self._server_images.add(message.image_id)
        if isinstance(message, ImageStatus):
            self._server_images.update(message.present)
        job_id = getattr(message, "job_id", None)
        state = self.jobs.get(job_id) if job_id else None
        if state is None:
            return None, message, []
        events = state.handle(message, self._frames)
        if state.finished:
            # A finished job's images were taken; drop its record so a long-lived connection
            # does not grow with every job.
            self.jobs.pop(state.job_id, None)
        return state, message, events

    def fail_all(self, error: GenfillError) -> list[tuple[JobState, list[JobEvent]]]:
        """Ends every job in flight, e.g. when the connection drops."""
        failed = [(state, state.fail(error)) for state in self.jobs.values()]
        self.jobs.clear()
        return failed


def _rgba_in_place(image: ImageInput) -> np.ndarray:
    """``image`` itself when it is an ``(H, W, 4)`` uint8 array, else ``to_rgba(image)``."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 4:
        return image
    return to_rgba(image)


def _mask_in_place(mask: ImageInput) -> np.ndarray:
    """``mask`` itself when it is an ``(H, W)`` uint8 array, else ``to_mask(mask)``."""
    if isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.ndim == 2:
        return mask
    return to_mask(mask)


def _size_of(array: np.ndarray) -> Size:
    return Size(array.shape[1], array.shape[0])


def _region_to_send(selection: np.ndarray) -> Box:
    canvas = _size_of(selection)
    whole = Box(0, 0, canvas.width, canvas.height)
    try:
        region = fill.context_box(selection, native_size=_CROP_NATIVE_SIZE)
    except fill.EmptyMaskError:
        raise ValueError("the mask selects nothing: paint the area to fill in white") from None
    # Cropping pays only when it saves most of the upload.
    if region.width * region.height * 2 > canvas.width * canvas.height:
        return whole
    return region
