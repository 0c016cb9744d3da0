"""The genfill server: a websocket app on one port, with two plain HTTP endpoints.

- ``GET /v1/health``: liveness, no token needed.
- ``GET /v1/models``: engines and models, token needed.
- websocket on ``/`` (or ``/v1/ws``): the protocol of ``genfill.protocol``, token needed.

Every request passes the same gate first (``_gate``): the Host header must name this server
(DNS rebinding), an Origin header must be allow-listed (``Origin: null`` never is), and, except
for health, ``Authorization: Bearer <token>`` must match, compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from genfill import __version__
from genfill.images import frame_from_array
from genfill.protocol import (
    MAX_SEED,
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Cancelled,
    EngineInfo,
    Error,
    ErrorCode,
    HasImages,
    Hello,
    ImageFormat,
    ImageStatus,
    Limits,
    Mode,
    Progress,
    Result,
    Submit,
    Uploaded,
    Variation,
    WireBox,
    frame_image_id,
    is_valid_job_id,
    parse_client_message,
)
from genfill.state import ServerState, remove_state, write_state
from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .engines import EngineSet
from .engines.base import JobCancelledError
from .errors import RequestError
from .images import ImageStore, decode_upload
from .jobs import ClientHandle, FairQueue, Job
from .pipeline import batch_key, finish_fill, prepare_canvas, prepare_fill, run_fill

logger = logging.getLogger("genfill.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
_PREVIEW_EVERY_S = 0.25
_FINISHED_JOBS_KEPT = 16
# A client that sent a message or got a result this recently may be about to submit (an
# upload comes before its submit, a script submits its next job on the last one's result).
_RECENTLY_ACTIVE_S = 1.0
# Replays answer a retried job id; past this many bytes of kept results the oldest go first.
_FINISHED_BYTES_KEPT = 64 * 2**20


@dataclass
class ServerConfig:
    """How a server runs. ``token=None`` makes a random one per launch."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    state_file: Path | None = None
    write_state_file: bool = True
    limits: Limits = field(default_factory=Limits)
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    max_outbox_bytes: int | None = 128 * 2**20
    """Bytes of answers that may wait for one client before it is cut off (see
    ``ClientHandle``); one result is always delivered whole. ``None`` disables the limit."""
    batching: bool = True
    """Run queued jobs that an engine can batch (same model, size, steps, scheduler, guidance,
    strength) in one engine batch (``run_many``)."""
    batch_wait_s: float = 0.05
    """How long a worker waits for more jobs to batch with the one it took, and only while
    some client is likely to submit soon (one about to submit would otherwise miss the batch
    and wait for the whole of it): one whose last jobs are being answered, or one without a
    job that sent something or was answered within the last second. The wait runs from the
    last answer sent, so clients that submit again as soon as they are answered meet in one
    batch; an idle connection delays nothing."""


class _RedactingLogger(logging.LoggerAdapter):
    """The logger handed to websockets, which logs every request header at DEBUG level,
    ``Authorization`` included: header values and the token never reach a log."""

    def __init__(self, logger: logging.Logger, secret: str) -> None:
        super().__init__(logger, {})
        self._secret = secret

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if self.isEnabledFor(level):
            if msg == "< %s: %s" and len(args) == 2 and str(args[0]).lower() == "authorization":
                args = (args[0], "[redacted]")
            msg = self._redact(msg)
            args = tuple(self._redact(arg) for arg in args)
        super().log(level, msg, *args, **kwargs)

    def _redact(self, value: object) -> object:
        if isinstance(value, str) and self._secret in value:
            return value.replace(self._secret, "[redacted]")
        return value


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
class _ClientState:
    handle: ClientHandle
    rate: _RateLimiter
    jobs: dict[str, Job] = field(default_factory=dict)
    finished: OrderedDict[str, tuple[str, list[str | bytes]]] = field(default_factory=OrderedDict)
    """Recently finished jobs: request fingerprint and the frames that answered it, replayed
    when a client retries a job id it already got an answer for."""
    last_active: float = field(default_factory=time.monotonic)
    """When it last sent a message or was sent a result (``time.monotonic``)."""


class GenfillServer:
    """Owns the listening socket, the queue, the workers and the engines.

    Use ``async with GenfillServer(config, engines) as server`` (or ``start()``/``stop()``);
    ``server.url`` and ``server.token`` are set once it listens.
    """

    def __init__(self, config: ServerConfig, engines: EngineSet) -> None:
        self.config = config
        self.engines = engines
        self.token = config.token or secrets.token_urlsafe(32)
        self.limits = config.limits
        self.images = ImageStore(config.limits)
        self.queue = FairQueue()
        self._clients: dict[int, _ClientState] = {}
        self._next_client_id = 0
        self._server: Server | None = None
        self._workers: list[asyncio.Task] = []
        self._closing: set[asyncio.Task] = set()
        self._allowed_hosts: set[str] = set()
        self._state_path: Path | None = None
        self.port: int | None = None
        self.stopping = False

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"ws://{host}:{self.port}"

    async def __aenter__(self) -> GenfillServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        self._server = await serve(
            self._handle_connection,
            config.host,
            config.port,
            process_request=self._gate,
            compression=None,
            max_size=config.limits.max_message_bytes,
            # Bounded send buffers: a client that stops reading cannot make the server hold
            # more than a few frames for it.
            write_limit=2**20,
            server_header=f"genfill/{__version__}",
            logger=_RedactingLogger(logging.getLogger("websockets.server"), self.token),
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._allowed_hosts = self._hosts_for(config.host, self.port) | set(config.allowed_hosts)
        self.engines.load_default()
        for device in config.devices:
            self._workers.append(asyncio.create_task(self._worker(device), name=f"genfill-worker-{device}"))
        if config.write_state_file:
            self._state_path = write_state(
                ServerState(url=self.url, token=self.token, pid=os.getpid(), version=__version__), config.state_file
            )
        logger.info("genfill %s listening on %s", __version__, self.url)

    async def stop(self, reason: str = "server shutting down") -> None:
        """Stops accepting, tells connected clients why, ends the workers."""
        self.stopping = True
        for client in list(self._clients.values()):
            for job in list(client.jobs.values()):
                job.cancel_requested.set()
                # Said per job, so a client knows which of its jobs will never finish.
                client.handle.send(
                    Error(code=ErrorCode.SHUTTING_DOWN, message=f"{reason}: the job did not finish", job_id=job.job_id)
                    .model_dump_json()
                )
        if self._server is not None:
            self._server.close(close_connections=False)
            await self._drain_outboxes(timeout_s=2.0)
            # Concurrently: a client that never answers the close handshake must not delay the others.
            await asyncio.gather(
                *(connection.close(code=1001, reason=reason) for connection in list(self._server.connections)),
                return_exceptions=True,
            )
            await self._server.wait_closed()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self.engines.close()
        if self._state_path is not None:
            remove_state(self._state_path, self.token)
            self._state_path = None

    async def _drain_outboxes(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            client.handle.pending_bytes and client.handle.connected for client in self._clients.values()
        ):
            await asyncio.sleep(0.01)

    @staticmethod
    def _hosts_for(host: str, port: int) -> set[str]:
        if host in ("0.0.0.0", "::", ""):
            return set()
        names = {host, f"[{host}]"} | (set(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else set())
        return {f"{name}:{port}" for name in names}

    # HTTP gate and endpoints

    def _gate(self, connection: ServerConnection, request: Request) -> Response | None:
        # websockets hands over any method it parsed; every endpoint here is a GET.
        if request.method != "GET":
            return connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served\n")
        headers = request.headers
        host = headers.get("Host", "")
        if self._allowed_hosts and host.lower() not in self._allowed_hosts:
            return connection.respond(HTTPStatus.FORBIDDEN, "host not allowed\n")
        origin = headers.get("Origin")
        if origin is not None and origin not in self.config.allowed_origins:
            return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        path = request.path.split("?", 1)[0]
        if path == "/v1/health":
            return self._json(
                connection,
                {"status": "ok", "version": __version__, "protocol_version": PROTOCOL_VERSION},
            )
        if not self._authorized(headers.get("Authorization", "")):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "token missing or wrong\n")
        if path == "/v1/models":
            return self._json(connection, self.engines.catalogue())
        if path not in ("/", "/v1/ws"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.stopping:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        return None

    def _authorized(self, authorization: str) -> bool:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token.encode())

    @staticmethod
    def _json(connection: ServerConnection, payload: dict) -> Response:
        response = connection.respond(HTTPStatus.OK, json.dumps(payload))
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    # Websocket connections

    def _hello(self) -> Hello:
        catalogue = self.engines.catalogue()
        return Hello(
            server_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            engines=[EngineInfo(**info) for info in catalogue["engines"]],
            models=catalogue["models"],
            default_engine=self.engines.default_name,
            limits=self.limits,
        )

    async def _handle_connection(self, websocket: ServerConnection) -> None:
        self._next_client_id += 1
        handle = ClientHandle(
            self._next_client_id,
            self.config.max_outbox_bytes,
            on_overflow=lambda: self._cut_off(websocket, handle),
        )
        client = _ClientState(handle, _RateLimiter(self.limits.max_messages_per_second))
        self._clients[handle.client_id] = client
        writer = asyncio.create_task(self._write_loop(websocket, handle))
        try:
            handle.send(self._hello().model_dump_json())
            async for data in websocket:
                if not handle.connected:
                    break
                client.last_active = time.monotonic()
                try:
                    if not client.rate.allow():
                        raise RequestError(ErrorCode.RATE_LIMITED, "too many messages: slow down")
                    if isinstance(data, bytes):
                        await self._on_upload(client, data)
                    else:
                        self._on_text(client, data)
                except RequestError as exc:
                    handle.send(Error(code=exc.code, message=exc.message, job_id=_job_id_of(data)).model_dump_json())
        except ConnectionClosed:
            pass
        finally:
            handle.connected = False
            for job in list(client.jobs.values()):
                self._cancel(client, job, notify=False)
            self.images.release_client(handle.client_id)
            del self._clients[handle.client_id]
            writer.cancel()

    async def _write_loop(self, websocket: ServerConnection, handle: ClientHandle) -> None:
        try:
            while True:
                item = await handle.next_frame()
                await websocket.send(item)
        except ConnectionClosed:
            handle.connected = False

    def _cut_off(self, websocket: ServerConnection, handle: ClientHandle) -> None:
        """Closes the connection of a client whose outbox overflowed: it stopped reading."""
        logger.warning("client %d is not reading its messages: closing its connection", handle.client_id)
        # The close frame waits behind the unread data; websockets aborts the TCP connection
        # after its close timeout, which ends the handler and cancels the client's jobs.
        task = asyncio.get_running_loop().create_task(
            websocket.close(code=1008, reason="client is not reading its messages")
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _on_upload(self, client: _ClientState, frame: bytes) -> None:
        # Decoding a large PNG takes long enough to stall every other client.
        if len(frame) > 2**20:
            image = await asyncio.to_thread(decode_upload, frame, self.limits)
        else:
            image = decode_upload(frame, self.limits)
        self.images.add(image, client.handle.client_id)
        height, width = image.array.shape[:2]
        client.handle.send(Uploaded(image_id=image.image_id, width=width, height=height).model_dump_json())

    def _on_text(self, client: _ClientState, data: str) -> None:
        try:
            message = parse_client_message(data)
        except ValidationError as exc:
            raise _validation_error(exc, data) from None
        if isinstance(message, HasImages):
            present = [i for i in message.image_ids if self.images.claim(i, client.handle.client_id)]
            missing = [i for i in message.image_ids if i not in present]
            client.handle.send(ImageStatus(present=present, missing=missing).model_dump_json())
        elif isinstance(message, Submit):
            self._submit(client, message)
        elif isinstance(message, Cancel):
            job = client.jobs.get(message.job_id)
            if job is None:
                raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job {message.job_id!r} is queued or running")
            self._cancel(client, job, notify=True)

    def _submit(self, client: _ClientState, submit: Submit) -> None:
        if self.stopping:
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        request = submit.request
        fingerprint = submit.model_dump_json(exclude={"previews"})
        running = client.jobs.get(submit.job_id)
        if running is not None:
            if running.submit.model_dump_json(exclude={"previews"}) != fingerprint:
                raise RequestError(ErrorCode.JOB_ID_IN_USE, f"job id {submit.job_id!r} is in use by another request")
            client.handle.send(
                Accepted(job_id=submit.job_id, queue_position=self.queue.position(running), duplicate=True).model_dump_json()
            )
            return
        if submit.job_id in client.finished:
            kept_fingerprint, frames = client.finished[submit.job_id]
            if kept_fingerprint != fingerprint:
                raise RequestError(ErrorCode.JOB_ID_IN_USE, f"job id {submit.job_id!r} was used by another request")
            client.handle.send_all(frames)
            return
        self._check_limits(request)
        if self.queue.count(client.handle.client_id) >= self.limits.max_queued_jobs_per_client:
            raise RequestError(
                ErrorCode.QUEUE_FULL,
                f"{self.limits.max_queued_jobs_per_client} jobs already queued: wait for one to finish",
            )
        engine_name = self.engines.resolve(request)
        client_id = client.handle.client_id
        image = self.images.get(request.image, client_id).array
        mask = self.images.get(request.mask, client_id).array if request.mask else None
        if request.mode is Mode.EXPAND and request.expand is not None:
            self._check_expanded_size(image, request.expand)
        canvas, selection = prepare_canvas(request, image, mask)
        if request.mode is not Mode.EXPAND and not selection.any():
            raise RequestError(ErrorCode.EMPTY_SELECTION, "the selection is empty: nothing to fill")
        base_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [(base_seed + index) % (MAX_SEED + 1) for index in range(request.variations)]
        control_images = [self._control_image(control.image, canvas, client_id) for control in request.control]
        job = Job(submit.job_id, client.handle, submit, canvas, selection, seeds, engine_name, control_images=control_images)
        client.jobs[job.job_id] = job
        position = self.queue.put(job)
        client.handle.send(Accepted(job_id=job.job_id, queue_position=position).model_dump_json())

    def _control_image(self, image_id: str | None, canvas: np.ndarray, client_id: int) -> np.ndarray | None:
        if image_id is None:
            return None
        control = self.images.get(image_id, client_id).array
        if control.shape[:2] != canvas.shape[:2]:
            raise RequestError(
                ErrorCode.SIZE_MISMATCH,
                f"control image is {control.shape[1]}x{control.shape[0]} but the canvas is "
                f"{canvas.shape[1]}x{canvas.shape[0]}",
            )
        return control

    def _check_limits(self, request) -> None:
        limits = self.limits
        if request.variations > limits.max_variations:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"variations={request.variations} is over the limit of {limits.max_variations}")
        if request.steps is not None and request.steps > limits.max_steps:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"steps={request.steps} is over the limit of {limits.max_steps}")
        if len(request.prompt) > limits.max_prompt_chars or len(request.negative_prompt) > limits.max_prompt_chars:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"prompt is over the limit of {limits.max_prompt_chars} characters")

    def _check_expanded_size(self, image: np.ndarray, margins) -> None:
        # The grown canvas is allocated before any engine runs: a 1x1 image with 16k margins
        # would be a 4 GiB array.
        height, width = image.shape[:2]
        width += margins.left + margins.right
        height += margins.top + margins.bottom
        limits = self.limits
        if width > limits.max_image_side or height > limits.max_image_side or width * height > limits.max_image_pixels:
            raise RequestError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"the expanded canvas of {width}x{height} pixels is over the limit of {limits.max_image_pixels} "
                f"pixels ({limits.max_image_side} a side)",
            )

    def _cancel(self, client: _ClientState, job: Job, *, notify: bool) -> None:
        if job.state == "queued" and self.queue.remove(job):
            job.state = "finished"
            client.jobs.pop(job.job_id, None)
            if notify:
                client.handle.send(Cancelled(job_id=job.job_id).model_dump_json())
            return
        # Running: the worker sees the flag at the next step and answers ``cancelled``.
        job.cancel_requested.set()

    # Workers

    async def _worker(self, device: str) -> None:
        # The answers of the last engine batch (colour match, layers, frames) are made while
        # the worker takes and runs the next one; at most one batch is being answered at a
        # time, so answers keep their order and what waits for them stays bounded.
        answering: asyncio.Task | None = None
        try:
            while True:
                job = await self.queue.get()
                if job.cancel_requested.is_set():
                    self._finish(job, [Cancelled(job_id=job.job_id).model_dump_json()])
                    continue
                job.state = "running"
                batch = await self._batch_mates(job, device) if self.config.batching else [job]
                if len(batch) == 1:
                    frames = await self._run(job, device)
                    if answering is not None:
                        await answering
                        answering = None
                    self._finish(job, frames)
                else:
                    answers = await self._run_batch(batch, device)
                    if answering is not None:
                        await answering
                    answering = asyncio.create_task(answers) if answers is not None else None
        finally:
            if answering is not None and not answering.done():
                answering.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await answering

    def _batch_key(self, job: Job, engine) -> tuple | None:
        if job.batch_key_engine is not engine:
            job.batch_key = batch_key(engine, job.request, job.selection)
            job.batch_key_engine = engine
        return job.batch_key

    async def _batch_mates(self, job: Job, device: str) -> list[Job]:
        """``job`` and the queued jobs that can share its engine batch, taken from the queue
        in its fair order; waits up to ``batch_wait_s`` for clients that may submit soon."""
        request = job.request
        engine = self.engines.loaded(job.engine_name, device, request.model)
        if engine is None or not hasattr(engine, "run_many"):
            return [job]
        key = self._batch_key(job, engine)
        if key is None:
            return [job]
        room = [int(getattr(engine, "max_batch_images", 8)) - len(job.seeds)]

        def matches(other: Job) -> bool:
            if other.cancel_requested.is_set() or len(other.seeds) > room[0]:
                return False
            if other.engine_name != job.engine_name or other.request.model != request.model:
                return False
            if self._batch_key(other, engine) != key:
                return False
            room[0] -= len(other.seeds)
            return True

        batch = [job]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_wait_s
        while True:
            batch += self.queue.take(matches, limit=room[0])
            if room[0] <= 0:
                break
            now = time.monotonic()
            being_answered = any(other.state == "answering" for other in self._jobs_in_flight())
            if being_answered:
                deadline = loop.time() + self.config.batch_wait_s
            if loop.time() >= deadline or not any(self._may_submit_soon(client, now) for client in self._clients.values()):
                break
            await asyncio.sleep(0.002)
        for other in batch[1:]:
            other.state = "running"
        return batch

    def _jobs_in_flight(self) -> Iterator[Job]:
        for client in self._clients.values():
            yield from client.jobs.values()

    @staticmethod
    def _may_submit_soon(client: _ClientState, now: float) -> bool:
        """The rule of ``ServerConfig.batch_wait_s``: connected, nothing queued or running,
        and either its jobs are being answered or it was active a moment ago."""
        if not client.handle.connected:
            return False
        states = [job.state for job in client.jobs.values()]
        if "queued" in states or "running" in states:
            return False
        return bool(states) or now - client.last_active < _RECENTLY_ACTIVE_S

    async def _run_batch(self, jobs: list[Job], device: str) -> Coroutine[Any, Any, None] | None:
        """Runs jobs of one batch key in one engine batch. Returns what answers them (each
        job is answered as soon as its own result is ready), for the worker to run while the
        next batch starts; ``None`` when every job was answered already."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            # Off the event loop: a first load reads gigabytes and may compile for minutes.
            engine = await asyncio.to_thread(self.engines.get, jobs[0].engine_name, device, jobs[0].request.model)
        except Exception as exc:  # noqa: BLE001 - as in _run
            for job in jobs:
                self._finish(job, [self._engine_failure(job, exc)])
            return None

        def prepare(job: Job):
            return prepare_fill(engine, job.request, job.canvas, job.selection, job.seeds, job.control_images)

        prepared = await asyncio.gather(*(asyncio.to_thread(prepare, job) for job in jobs), return_exceptions=True)
        ready: list[tuple[Job, object]] = []
        for job, item in zip(jobs, prepared):
            if isinstance(item, BaseException):
                self._finish(job, self._failure_frames(job, item))
            else:
                ready.append((job, item))
        if not ready:
            return None
        on_steps = [self._step_callback(job, loop, answer_cancel=True) for job, _ in ready]
        try:
            outcomes = await asyncio.to_thread(engine.run_many, [item.job for _, item in ready], on_steps)
        except Exception as exc:  # noqa: BLE001 - every engine failure must reach the client as a code
            outcomes = [exc] * len(ready)
        for job, _ in ready:
            if job.state == "running":
                job.state = "answering"

        async def frames_of(job: Job, item, outcome) -> list[str | bytes]:
            if isinstance(outcome, BaseException):
                return self._failure_frames(job, outcome)
            try:
                result = await asyncio.to_thread(finish_fill, engine, item, outcome)
                return await self._result_frames(job, result, started)
            except Exception as exc:  # noqa: BLE001
                return self._failure_frames(job, exc)

        async def answer(job: Job, item, outcome) -> None:
            frames = await frames_of(job, item, outcome)
            if job.state != "finished":  # a cancelled job was answered at once
                self._finish(job, frames)

        async def answer_all() -> None:
            done = await asyncio.gather(
                *(answer(job, item, outcome) for (job, item), outcome in zip(ready, outcomes)), return_exceptions=True
            )
            for (job, _), failure in zip(ready, done):
                if isinstance(failure, Exception):
                    logger.error("answering job %s failed", job.job_id, exc_info=failure)

        return answer_all()

    def _failure_frames(self, job: Job, exc: BaseException) -> list[str | bytes]:
        if isinstance(exc, JobCancelledError):
            return [Cancelled(job_id=job.job_id).model_dump_json()]
        if isinstance(exc, RequestError):
            return [Error(code=exc.code, message=exc.message, job_id=job.job_id).model_dump_json()]
        return [self._engine_failure(job, exc)]

    def _finish(self, job: Job, frames: list[str | bytes]) -> None:
        job.state = "finished"
        job.client.send_all(frames)
        client = self._clients.get(job.client.client_id)
        if client is None:
            return
        client.last_active = time.monotonic()
        client.jobs.pop(job.job_id, None)
        if isinstance(frames[-1], str) and '"type":"result"' in frames[-1]:
            client.finished[job.job_id] = (job.submit.model_dump_json(exclude={"previews"}), frames)
            while len(client.finished) > 1 and (
                len(client.finished) > _FINISHED_JOBS_KEPT
                or sum(len(frame) for _, kept in client.finished.values() for frame in kept) > _FINISHED_BYTES_KEPT
            ):
                client.finished.popitem(last=False)

    def _step_callback(self, job: Job, loop: asyncio.AbstractEventLoop, *, answer_cancel: bool = False):
        """The engine's ``on_step`` for ``job``: progress and previews to its client, and
        ``JobCancelledError`` once it is cancelled. With ``answer_cancel`` (a job in a batch,
        whose batch goes on) the client is answered ``cancelled`` at once."""
        last_preview = [0.0]

        def on_step(step: int, total: int, preview: np.ndarray | None) -> None:
            if job.cancel_requested.is_set():
                if answer_cancel:
                    loop.call_soon_threadsafe(self._finish, job, [Cancelled(job_id=job.job_id).model_dump_json()])
                raise JobCancelledError(job.job_id)
            frames: list[str | bytes] = []
            preview_id = None
            now = time.perf_counter()
            if preview is not None and job.submit.previews and now - last_preview[0] >= _PREVIEW_EVERY_S:
                last_preview[0] = now
                rgba = np.dstack([preview, np.full(preview.shape[:2], 255, np.uint8)])
                frame = frame_from_array(rgba)
                preview_id = frame_image_id(frame)
                frames.append(frame)
            frames.append(Progress(job_id=job.job_id, step=step, total=max(total, 1), preview=preview_id).model_dump_json())
            loop.call_soon_threadsafe(job.client.send_progress, frames)

        return on_step

    async def _run(self, job: Job, device: str) -> list[str | bytes]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        on_step = self._step_callback(job, loop)
        try:
            engine = await asyncio.to_thread(self.engines.get, job.engine_name, device, job.request.model)
            result = await asyncio.to_thread(
                run_fill, engine, job.request, job.canvas, job.selection, job.seeds, on_step, job.control_images
            )
            return await self._result_frames(job, result, started)
        except JobCancelledError:
            return [Cancelled(job_id=job.job_id).model_dump_json()]
        except RequestError as exc:
            return [Error(code=exc.code, message=exc.message, job_id=job.job_id).model_dump_json()]
        except Exception as exc:  # noqa: BLE001 - every engine failure must reach the client as a code
            return [self._engine_failure(job, exc)]

    async def _result_frames(self, job: Job, result, started: float) -> list[str | bytes]:
        fmt = ImageFormat(job.submit.result_format)
        frames: list[str | bytes] = await asyncio.to_thread(
            lambda: [frame_from_array(layer, fmt) for layer in result.layers]
        )
        region = job.request.region
        box = result.box
        if region is not None:
            box = box._replace(x=box.x + region.x, y=box.y + region.y)
        message = Result(
            job_id=job.job_id,
            box=WireBox(**box._asdict()),
            variations=[Variation(image=frame_image_id(frame), seed=seed) for frame, seed in zip(frames, job.seeds)],
            engine=job.engine_name,
            model=job.request.model,
            seconds=round(time.perf_counter() - started, 4),
        )
        return [*frames, message.model_dump_json()]

    def _engine_failure(self, job: Job, exc: Exception) -> str:
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            logger.warning("job %s ran out of memory on engine %s", job.job_id, job.engine_name)
            self.engines.recover(job.engine_name)
            return Error(
                code=ErrorCode.OUT_OF_MEMORY,
                message="the engine ran out of memory: try fewer variations or a smaller selection",
                job_id=job.job_id,
            ).model_dump_json()
        logger.exception("job %s failed in engine %s", job.job_id, job.engine_name)
        self.engines.recover(job.engine_name)
        return Error(
            code=ErrorCode.ENGINE_FAILED, message=f"the {job.engine_name} engine failed on this job", job_id=job.job_id
        ).model_dump_json()


def _job_id_of(data: str | bytes) -> str | None:
    if isinstance(data, bytes) or len(data) > 1_000_000:
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):  # deeply nested arrays exhaust the parser's stack
        return None
    job_id = parsed.get("job_id") if isinstance(parsed, dict) else None
    return job_id if is_valid_job_id(job_id) else None


def _validation_error(exc: ValidationError, data: str) -> RequestError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "json_invalid":
        return RequestError(ErrorCode.BAD_MESSAGE, "message is not valid JSON")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return RequestError(ErrorCode.BAD_MESSAGE, "message has no known 'type'")
    if where.startswith("submit.request"):
        return RequestError(ErrorCode.INVALID_REQUEST, f"invalid {where.removeprefix('submit.')}: {first['msg']}")
    return RequestError(ErrorCode.BAD_MESSAGE, f"invalid {where}: {first['msg']}")
