"""One connection's protocol, without I/O: a client's frames in, what to do about them out.

``ServerSession`` parses and checks each message (strictly: an unknown field is refused),
admits a submit to an engine, resolves its images once, and answers. It never awaits and
never touches a socket: it sends through the connection's ``ClientHandle`` outbox and hands
jobs to the ``Scheduler``. The transport (``genfill_server.app``) feeds it frames.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import numpy as np
from genfill.protocol import (
    MAX_SEED,
    Accepted,
    Cancel,
    ControlInput,
    Error,
    ErrorCode,
    FillRequest,
    HasImages,
    ImageReference,
    ImageStatus,
    Limits,
    Mode,
    ReferenceRole,
    Submit,
    Uploaded,
    is_valid_job_id,
    parse_client_message,
)
from pydantic import ValidationError

from .engines import EngineSet
from .errors import RequestError
from .images import ImageStore, StoredImage, decode_upload
from .jobs import Job
from .pipeline import prepare_canvas
from .scheduler import ClientState, Scheduler, fingerprint


class _RateLimiter:
    """Token bucket: ``rate`` messages a second, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class SessionContext:
    """What every session of one server shares."""

    engines: EngineSet
    images: ImageStore
    scheduler: Scheduler
    limits: Limits
    stopping: bool = False


class ServerSession:
    """The protocol of one connection. Feed it ``receive_text``/``receive_upload``; every
    ``RequestError`` they raise is answered with ``error`` (see ``answer_error``)."""

    def __init__(self, state: ClientState, context: SessionContext) -> None:
        self.state = state
        self.context = context
        self._rate = _RateLimiter(context.limits.max_messages_per_second)

    @property
    def client_id(self) -> int:
        return self.state.handle.client_id

    def check_rate(self) -> None:
        """Counts one received message. Raises ``RequestError`` (``rate_limited``) past the limit."""
        self.state.last_active = time.monotonic()
        if not self._rate.allow():
            raise RequestError(ErrorCode.RATE_LIMITED, "too many messages: slow down")

    def answer_error(self, exc: RequestError, data: str | bytes) -> None:
        self.state.handle.send(Error(code=exc.code, message=exc.message, job_id=_job_id_of(data)).model_dump_json())

    @staticmethod
    def decode(frame: bytes, limits: Limits) -> StoredImage:
        """Decodes an upload; pure and thread-safe, so a large one can run off the event loop."""
        return decode_upload(frame, limits)

    def receive_upload(self, image: StoredImage) -> None:
        self.context.images.add(image, self.client_id)
        height, width = image.array.shape[:2]
        self.state.handle.send(Uploaded(image_id=image.image_id, width=width, height=height).model_dump_json())

    def receive_text(self, data: str) -> None:
        try:
            message = parse_client_message(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if isinstance(message, HasImages):
            images = self.context.images
            present = [i for i in message.image_ids if images.claim(i, self.client_id)]
            missing = [i for i in message.image_ids if i not in present]
            self.state.handle.send(ImageStatus(present=present, missing=missing).model_dump_json())
        elif isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Cancel):
            job = self.state.jobs.get(message.job_id)
            if job is None:
                raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job {message.job_id!r} is queued or running")
            self.context.scheduler.cancel(self.state, job, notify=True)

    def close(self) -> None:
        """The connection is gone: its jobs are cancelled and its images released."""
        self.state.handle.connected = False
        for job in list(self.state.jobs.values()):
            self.context.scheduler.cancel(self.state, job, notify=False)
        self.context.images.release_client(self.client_id)

    # Submit

    def _submit(self, submit: Submit) -> None:
        context, state = self.context, self.state
        if context.stopping:
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        scheduler = context.scheduler
        submitted = submit.model_dump_json(exclude={"previews"})
        running = state.jobs.get(submit.job_id)
        if running is not None:
            if fingerprint(running) != submitted:
                raise RequestError(ErrorCode.JOB_ID_IN_USE, f"job id {submit.job_id!r} is in use by another request")
            state.handle.send(
                Accepted(job_id=submit.job_id, queue_position=scheduler.position(running), duplicate=True).model_dump_json()
            )
            return
        replay = scheduler.replay(state, submit.job_id)
        if replay is not None:
            kept, frames = replay
            if kept != submitted:
                raise RequestError(ErrorCode.JOB_ID_IN_USE, f"job id {submit.job_id!r} was used by another request")
            state.handle.send_all(frames)
            return
        request = submit.request
        limits = context.limits
        _check_limits(request, limits)
        if scheduler.queued(self.client_id) >= limits.max_queued_jobs_per_client:
            raise RequestError(
                ErrorCode.QUEUE_FULL,
                f"{limits.max_queued_jobs_per_client} jobs already queued: wait for one to finish",
            )
        admission = context.engines.admit(request)
        image = self._image(request.image)
        mask = self._image(request.mask) if request.mask else None
        if request.mode is Mode.EXPAND and request.expand is not None:
            _check_expanded_size(image, request.expand, limits)
        canvas, selection = prepare_canvas(request, image, mask)
        if request.mode is not Mode.EXPAND and not selection.any():
            raise RequestError(ErrorCode.EMPTY_SELECTION, "the selection is empty: nothing to fill")
        base_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [(base_seed + index) % (MAX_SEED + 1) for index in range(request.variations)]
        job = Job(
            submit.job_id,
            state.handle,
            submit,
            canvas,
            selection,
            seeds,
            admission.engine,
            lane=admission.lane or admission.capabilities.device_kind,
            references=self._references(request, canvas),
            warnings=admission.warnings,
        )
        position = scheduler.enqueue(state, job)
        state.handle.send(Accepted(job_id=job.job_id, queue_position=position).model_dump_json())

    def _image(self, image_id: str) -> np.ndarray:
        return self.context.images.get(image_id, self.client_id).array

    def _references(self, request: FillRequest, canvas: np.ndarray) -> tuple[tuple[ImageReference, np.ndarray], ...]:
        """Every extra image of ``request``, decoded once: its ``references`` and the images of
        its ``control`` entries, which are control references by another name."""
        wanted = [_as_reference(control) for control in request.control if control.image is not None]
        resolved = []
        for reference in [*wanted, *request.references]:
            array = self._image(reference.image)
            if reference.cropped and array.shape[:2] != canvas.shape[:2]:
                raise RequestError(
                    ErrorCode.SIZE_MISMATCH,
                    f"{reference.role} image is {array.shape[1]}x{array.shape[0]} but the canvas is "
                    f"{canvas.shape[1]}x{canvas.shape[0]}",
                )
            resolved.append((reference, array))
        return tuple(resolved)


def _as_reference(control: ControlInput) -> ImageReference:
    assert control.image is not None
    return ImageReference(
        image=control.image,
        role=ReferenceRole.CONTROL,
        weight=control.strength,
        control_type=control.type,
        start=min(control.start, control.end),
        end=control.end,
    )


def _check_limits(request: FillRequest, limits: Limits) -> None:
    if request.variations > limits.max_variations:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"variations={request.variations} is over the limit of {limits.max_variations}")
    if request.steps is not None and request.steps > limits.max_steps:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"steps={request.steps} is over the limit of {limits.max_steps}")
    if len(request.prompt) > limits.max_prompt_chars or len(request.negative_prompt) > limits.max_prompt_chars:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"prompt is over the limit of {limits.max_prompt_chars} characters")


def _check_expanded_size(image: np.ndarray, margins, limits: Limits) -> None:
    # The grown canvas is allocated before any engine runs: a 1x1 image with 16k margins
    # would be a 4 GiB array.
    height, width = image.shape[:2]
    width += margins.left + margins.right
    height += margins.top + margins.bottom
    if width > limits.max_image_side or height > limits.max_image_side or width * height > limits.max_image_pixels:
        raise RequestError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the expanded canvas of {width}x{height} pixels is over the limit of {limits.max_image_pixels} "
            f"pixels ({limits.max_image_side} a side)",
        )


def _job_id_of(data: str | bytes) -> str | None:
    if isinstance(data, bytes) or len(data) > 1_000_000:
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):  # deeply nested arrays exhaust the parser's stack
        return None
    job_id = parsed.get("job_id") if isinstance(parsed, dict) else None
    return job_id if is_valid_job_id(job_id) else None


def _validation_error(exc: ValidationError) -> RequestError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "json_invalid":
        return RequestError(ErrorCode.BAD_MESSAGE, "message is not valid JSON")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return RequestError(ErrorCode.BAD_MESSAGE, "message has no known 'type'")
    if where.startswith("submit.request"):
        return RequestError(ErrorCode.INVALID_REQUEST, f"invalid {where.removeprefix('submit.')}: {first['msg']}")
    return RequestError(ErrorCode.BAD_MESSAGE, f"invalid {where}: {first['msg']}")
