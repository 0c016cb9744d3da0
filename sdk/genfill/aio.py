"""``AsyncClient``: the asyncio client, on ``websockets.asyncio.client``.

It only moves bytes; ``genfill.session.ClientSession`` decides what they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from . import session as core
from .errors import ConnectionClosed, GenfillError, ProtocolError, error_for_code
from .images import ImageInput
from .protocol import Error, ImageStatus, Limits
from .transport import (
    ConnectionSettings,
    http_get_json,
    map_connect_error,
    map_http_error,
)


class AsyncJob:
    """A submitted job. Iterate it for events, await ``result()``, or ``cancel()`` it."""

    def __init__(self, client: AsyncClient, state: core.JobState) -> None:
        self._client = client
        self.state = state
        self.job_id = state.job_id
        self._events: asyncio.Queue[core.JobEvent] = asyncio.Queue()
        self._done = asyncio.Event()

    def _push(self, events: list[core.JobEvent]) -> None:
        for event in events:
            self._events.put_nowait(event)
        if self.state.finished:
            self._done.set()

    async def __aiter__(self) -> AsyncIterator[core.JobEvent]:
        """Yields events until the job's terminal event (included). Safe to cancel."""
        while True:
            event = await self._events.get()
            yield event
            if event.kind in ("result", "error", "cancelled"):
                return

    async def result(self, timeout_s: float | None = None) -> core.FillResult:
        """Waits for the job and returns its result, or raises its error.

        Cancelling this coroutine stops waiting; the job itself goes on (use ``cancel()``).
        """
        try:
            await asyncio.wait_for(self._done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"job {self.job_id} did not finish within {timeout_s} s") from None
        return self.state.outcome()

    async def cancel(self) -> None:
        """Asks the server to stop the job; ``result()`` then raises ``JobCancelled``."""
        if not self.state.finished:
            await self._client._send(core.ClientSession.cancel_message(self.job_id))


class AsyncClient:
    """Talks to a genfill server from asyncio code.

    Args:
        url: ``ws://host:port``; ``None`` reads the running server's state file.
        token: the server's token; ``None`` reads it from the state file.
        state_file: where to read url and token; ``None`` means the default path.
        open_timeout_s: how long to wait for the connection and the server's hello.

    Use as ``async with AsyncClient() as client: result = await client.fill(image, mask)``.
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
        self._reader: asyncio.Task[None] | None = None
        self._jobs: dict[str, AsyncJob] = {}
        self._status_waiters: list[asyncio.Future[ImageStatus]] = []
        self._send_lock: asyncio.Lock | None = None
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

    def __enter__(self) -> None:
        raise TypeError("AsyncClient is asynchronous: use 'async with AsyncClient()', or the sync Client")

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ always raises
        pass

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Opens the websocket and reads the server's hello."""
        if self._ws is not None:
            return
        settings = self._settings
        try:
            self._ws = await connect(settings.url, **settings.websocket_options())
            hello = await asyncio.wait_for(self._ws.recv(), settings.open_timeout_s)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise map_connect_error(exc, settings.url) from exc
        self._session.receive_hello(hello)
        self._send_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read_loop(), name="genfill-reader")

    async def aclose(self) -> None:
        """Closes the connection; jobs still running on it are cancelled by the server."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._ws = None
        self._reader = None

    async def _send(self, data: str | bytes) -> None:
        if self._ws is None or self._send_lock is None:
            raise RuntimeError("AsyncClient is not connected: use 'async with AsyncClient()' or await connect()")
        if self._closed_error is not None:
            raise self._closed_error
        try:
            async with self._send_lock:
                await self._ws.send(data)
        except websockets.exceptions.ConnectionClosed as exc:
            raise ConnectionClosed(f"connection to {self.url} closed: {exc}") from exc

    async def _read_loop(self) -> None:
        assert self._ws is not None
        error: GenfillError
        try:
            async for data in self._ws:
                if isinstance(data, bytes):
                    self._session.receive_binary(data)
                    continue
                state, message, events = self._session.receive_text(data)
                if isinstance(message, ImageStatus) and self._status_waiters:
                    self._status_waiters.pop(0).set_result(message)
                elif isinstance(message, Error) and message.job_id is None and self._status_waiters:
                    self._status_waiters.pop(0).set_exception(error_for_code(message.code, message.message))
                elif state is not None and state.job_id in self._jobs:
                    self._jobs[state.job_id]._push(events)
                    if state.finished:
                        self._jobs.pop(state.job_id, None)
            error = ConnectionClosed(f"server at {self.url} closed the connection")
        except websockets.exceptions.ConnectionClosed as exc:
            error = ConnectionClosed(f"connection to {self.url} lost: {exc}")
        except ProtocolError as exc:
            error = exc
            await self._ws.close(code=1002, reason="protocol error")
        self._closed_error = error
        for state, events in self._session.fail_all(error):
            job = self._jobs.pop(state.job_id, None)
            if job is not None:
                job._push(events)
        for waiter in self._status_waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._status_waiters.clear()

    async def submit(self, prepared: core.PreparedJob) -> AsyncJob:
        """Uploads what the server lacks and submits a prepared job."""
        unknown = self._session.unknown_images(prepared)
        status = None
        if unknown:
            waiter: asyncio.Future[ImageStatus] = asyncio.get_running_loop().create_future()
            self._status_waiters.append(waiter)
            await self._send(core.ClientSession.has_images_message(unknown))
            status = await waiter
        state = self._session.start(prepared)
        job = AsyncJob(self, state)
        self._jobs[state.job_id] = job
        try:
            for frame in self._session.frames_to_upload(prepared, status):
                await self._send(frame)
            await self._send(prepared.submit_message())
        except BaseException:
            self._jobs.pop(state.job_id, None)
            self._session.jobs.pop(state.job_id, None)
            raise
        return job

    async def submit_fill(self, image: ImageInput, mask: ImageInput, prompt: str = "", **options: Any) -> AsyncJob:
        """Submits a fill and returns its job handle at once (see ``fill`` for the options)."""
        return await self.submit(self._session.prepare_fill(image, mask, prompt, **options))

    async def submit_expand(self, image: ImageInput, **options: Any) -> AsyncJob:
        return await self.submit(self._session.prepare_expand(image, **options))

    async def fill(
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
        job = await self.submit_fill(image, mask, prompt, **options)
        return await self._finish(job, on_progress, timeout_s)

    async def expand(
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
        job = await self.submit_expand(
            image, left=left, right=right, top=top, bottom=bottom, prompt=prompt, **options
        )
        return await self._finish(job, on_progress, timeout_s)

    async def _finish(self, job: AsyncJob, on_progress, timeout_s: float | None) -> core.FillResult:
        if on_progress is not None:
            async with asyncio.timeout(timeout_s):
                async for event in job:
                    on_progress(event)
        return await job.result(timeout_s)

    async def health(self) -> dict:
        async with httpx.AsyncClient(timeout=self._settings.open_timeout_s) as http:
            try:
                response = await http.get(self._settings.http_url("/v1/health"))
            except httpx.HTTPError as exc:
                raise map_http_error(exc, self.url) from exc
        return http_get_json(response)

    async def models(self) -> dict:
        async with httpx.AsyncClient(timeout=self._settings.open_timeout_s) as http:
            try:
                response = await http.get(self._settings.http_url("/v1/models"), headers=self._settings.auth_headers())
            except httpx.HTTPError as exc:
                raise map_http_error(exc, self.url) from exc
        return http_get_json(response)
