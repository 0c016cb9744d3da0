"""``Client``: the blocking client, on ``websockets.sync.client``.

A reader thread receives frames and feeds them to the shared ``ClientSession``; calls block
until their job's events arrive. It only moves bytes; ``genfill.session`` decides what they mean.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import websockets
from websockets.sync.client import ClientConnection, connect

from . import session as core
from .errors import ConnectionClosed, GenfillError, ProtocolError, error_for_code
from .images import ImageInput
from .protocol import Error, ImageStatus, Limits
from .transport import ConnectionSettings, http_get_json, map_connect_error, map_http_error


def _refuse_inside_event_loop(method: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"Client.{method}() blocks, and this thread runs an event loop: use AsyncClient here")


class Job:
    """A submitted job. Iterate it for events, call ``result()``, or ``cancel()`` it."""

    def __init__(self, client: Client, state: core.JobState) -> None:
        self._client = client
        self.state = state
        self.job_id = state.job_id
        self._events: queue.SimpleQueue[core.JobEvent] = queue.SimpleQueue()
        self._done = threading.Event()

    def _push(self, events: list[core.JobEvent]) -> None:
        for event in events:
            self._events.put(event)
        if self.state.finished:
            self._done.set()

    def __iter__(self) -> Iterator[core.JobEvent]:
        """Yields events until the job's terminal event (included)."""
        while True:
            event = self._events.get()
            yield event
            if event.kind in ("result", "error", "cancelled"):
                return

    def result(self, timeout_s: float | None = None) -> core.FillResult:
        """Blocks until the job ends and returns its result, or raises its error."""
        _refuse_inside_event_loop("result")
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"job {self.job_id} did not finish within {timeout_s} s")
        return self.state.outcome()

    def cancel(self) -> None:
        """Asks the server to stop the job; ``result()`` then raises ``JobCancelled``."""
        if not self.state.finished:
            self._client._send(core.ClientSession.cancel_message(self.job_id))


class Client:
    """Talks to a genfill server from ordinary (blocking) code.

    Args:
        url: ``ws://host:port``; ``None`` reads the running server's state file.
        token: the server's token; ``None`` reads it from the state file.
        state_file: where to read url and token; ``None`` means the default path.
        open_timeout_s: how long to wait for the connection and the server's hello.

    Use as ``with Client() as client: result = client.fill(image, mask)``. One client may be
    shared by several threads; each call blocks only its own thread.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        state_file: str | None = None,
        open_timeout_s: float = 10.0,
    ) -> None:
        self._settings = ConnectionSettings.resolve(url, token, state_file, open_timeout_s)
        self._session = core.ClientSession()
        self._ws: ClientConnection | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._status_waiters: list[queue.SimpleQueue[ImageStatus | GenfillError]] = []
        self._closed_error: GenfillError | None = None

    @property
    def url(self) -> str:
        return self._settings.url

    @property
    def limits(self) -> Limits:
        return self._session.limits

    @property
    def hello(self):
        return self._session.hello

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> None:
        raise TypeError("Client blocks: use 'with Client()', or 'async with AsyncClient()' in async code")

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - __aenter__ always raises
        pass

    def connect(self) -> None:
        """Opens the websocket and reads the server's hello."""
        _refuse_inside_event_loop("connect")
        if self._ws is not None:
            return
        settings = self._settings
        try:
            # The connection outlives this call (closed by close()), hence no context manager.
            self._ws = connect(settings.url, legacy=True, **settings.websocket_options())
            hello = self._ws.recv(timeout=settings.open_timeout_s)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise map_connect_error(exc, settings.url) from exc
        self._session.receive_hello(hello)
        self._reader = threading.Thread(target=self._read_loop, name="genfill-reader", daemon=True)
        self._reader.start()

    def close(self) -> None:
        """Closes the connection; jobs still running on it are cancelled by the server."""
        if self._ws is not None:
            self._ws.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join()
        self._ws = None
        self._reader = None

    def _send(self, data: str | bytes) -> None:
        if self._ws is None:
            raise RuntimeError("Client is not connected: use 'with Client()' or call connect()")
        if self._closed_error is not None:
            raise self._closed_error
        try:
            self._ws.send(data)
        except websockets.exceptions.ConnectionClosed as exc:
            raise ConnectionClosed(f"connection to {self.url} closed: {exc}") from exc

    def _read_loop(self) -> None:
        assert self._ws is not None
        error: GenfillError
        try:
            for data in self._ws:
                with self._lock:
                    if isinstance(data, bytes):
                        self._session.receive_binary(data)
                        continue
                    state, message, events = self._session.receive_text(data)
                    if isinstance(message, ImageStatus) and self._status_waiters:
                        self._status_waiters.pop(0).put(message)
                    elif isinstance(message, Error) and message.job_id is None and self._status_waiters:
                        self._status_waiters.pop(0).put(error_for_code(message.code, message.message))
                    elif state is not None and state.job_id in self._jobs:
                        self._jobs[state.job_id]._push(events)
                        if state.finished:
                            self._jobs.pop(state.job_id, None)
            error = ConnectionClosed(f"server at {self.url} closed the connection")
        except websockets.exceptions.ConnectionClosed as exc:
            error = ConnectionClosed(f"connection to {self.url} lost: {exc}")
        except ProtocolError as exc:
            error = exc
            self._ws.close(code=1002, reason="protocol error")
        with self._lock:
            self._closed_error = error
            for state, events in self._session.fail_all(error):
                job = self._jobs.pop(state.job_id, None)
                if job is not None:
                    job._push(events)
            for waiter in self._status_waiters:
                waiter.put(error)
            self._status_waiters.clear()

    def submit(self, prepared: core.PreparedJob) -> Job:
        """Uploads what the server lacks and submits a prepared job."""
        _refuse_inside_event_loop("submit")
        unknown = self._session.unknown_images(prepared)
        status = None
        if unknown:
            waiter: queue.SimpleQueue[ImageStatus | GenfillError] = queue.SimpleQueue()
            with self._lock:
                if self._closed_error is not None:
                    raise self._closed_error
                self._status_waiters.append(waiter)
            self._send(core.ClientSession.has_images_message(unknown))
            answer = waiter.get()
            if isinstance(answer, GenfillError):
                raise answer
            status = answer
        with self._lock:
            state = self._session.start(prepared)
            job = Job(self, state)
            self._jobs[state.job_id] = job
        try:
            for frame in self._session.frames_to_upload(prepared, status):
                self._send(frame)
            self._send(prepared.submit_message())
        except BaseException:
            with self._lock:
                self._jobs.pop(state.job_id, None)
                self._session.jobs.pop(state.job_id, None)
            raise
        return job

    def submit_fill(self, image: ImageInput, mask: ImageInput, prompt: str = "", **options: Any) -> Job:
        """Submits a fill and returns its job handle at once (see ``fill`` for the options)."""
        return self.submit(self._session.prepare_fill(image, mask, prompt, **options))

    def submit_expand(self, image: ImageInput, **options: Any) -> Job:
        return self.submit(self._session.prepare_expand(image, **options))

    def fill(
        self, image: ImageInput, mask: ImageInput, prompt: str = "", *, on_progress=None, timeout_s=None, **options: Any
    ) -> core.FillResult:
        """Fills the selected part of ``image`` and returns the variations.

        Args:
            image: the canvas: PIL image, ``(H, W[, 3|4])`` uint8 array or path.
            mask: the selection, same size: 0 keeps, 255 replaces, soft values blend.
            prompt: what to paint; empty fills from the surroundings.
            on_progress: ``None`` or a callable taking each ``JobEvent``.
            timeout_s: ``None`` waits as long as the job takes.
            **options: the ``FillRequest`` fields: ``mode``, ``engine``, ``model``,
                ``variations`` (default 3), ``seed``, ``steps``, ``strength``, ``guidance``,
                ``negative_prompt``, ``scheduler``, ``grow_px``, ``feather_px``, ``blend_px``,
                ``control``; and ``job_id``, ``result_format``, ``upload_format``.

        Raises:
            JobFailed, EngineUnavailable, JobCancelled, LimitExceeded, ConnectionClosed.
        """
        job = self.submit_fill(image, mask, prompt, **options)
        return self._finish(job, on_progress, timeout_s)

    def expand(
        self,
        image: ImageInput,
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        prompt: str = "",
        on_progress=None,
        timeout_s=None,
        **options: Any,
    ) -> core.FillResult:
        """Grows the canvas by the margins (pixels) and fills the new area; the original pixels
        stay unchanged. Options as for ``fill``."""
        job = self.submit_expand(image, left=left, right=right, top=top, bottom=bottom, prompt=prompt, **options)
        return self._finish(job, on_progress, timeout_s)

    def _finish(self, job: Job, on_progress, timeout_s: float | None) -> core.FillResult:
        if on_progress is not None:
            for event in job:
                on_progress(event)
        return job.result(timeout_s)

    def health(self) -> dict:
        try:
            response = httpx.get(self._settings.http_url("/v1/health"), timeout=self._settings.open_timeout_s)
        except httpx.HTTPError as exc:
            raise map_http_error(exc, self.url) from exc
        return http_get_json(response)

    def models(self) -> dict:
        try:
            response = httpx.get(
                self._settings.http_url("/v1/models"),
                headers=self._settings.auth_headers(),
                timeout=self._settings.open_timeout_s,
            )
        except httpx.HTTPError as exc:
            raise map_http_error(exc, self.url) from exc
        return http_get_json(response)
