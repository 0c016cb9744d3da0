"""``AsyncClient``: the asyncio client, on ``websockets.asyncio.client``.

A reader task feeds every frame to the shared ``ClientSession``, which routes what it means
to the queue of the coroutine waiting for it. Only moving bytes and waiting happen here:
``genfill.session`` decides, for both clients. Arguments, defaults, results and errors are
those of the blocking ``genfill.Client``; each method here says only what differs.
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
from .errors import ConnectionClosed, GenfillError, ProtocolError, Timeout
from .images import ImageInput
from .protocol import Hello, ImageStatus
from .transport import (
    CONNECT_ERRORS,
    HTTP_ERRORS,
    BaseClient,
    Deadline,
    connection_error,
    http_get_json,
    map_connect_error,
    map_http_error,
    timeout_or,
)


class AsyncJob(core.JobHandle):
    """A submitted job. Iterate it (``async for``) for events, await ``result()``, or
    ``cancel()`` it."""

    def __init__(self, client: AsyncClient, prepared: core.PreparedJob) -> None:
        super().__init__(client, prepared, asyncio.Queue(), asyncio.Event())

    def __aiter__(self) -> AsyncIterator[core.JobEvent]:
        return self.events()

    def events(self, timeout_s: float | None = None) -> AsyncIterator[core.JobEvent]:
        """As ``Job.events``. Safe to cancel: no event is lost, a new iteration goes on."""
        return self._events_by(Deadline(timeout_or(timeout_s, self._client._settings.job_timeout_s)))

    async def _events_by(self, deadline: Deadline) -> AsyncIterator[core.JobEvent]:
        while True:
            try:
                event = await asyncio.wait_for(self._events.get(), deadline.remaining_s())
            except TimeoutError:
                raise deadline.expired(f"job {self.job_id} did not finish") from None
            yield event
            if event.kind in core.TERMINAL_KINDS:
                return

    async def result(self, timeout_s: float | None = None) -> core.FillResult:
        """As ``Job.result``. Safe to cancel: it stops waiting, the job goes on (``cancel()``)."""
        return await self._result_by(Deadline(timeout_or(timeout_s, self._client._settings.job_timeout_s)))

    async def _result_by(self, deadline: Deadline) -> core.FillResult:
        try:
            await asyncio.wait_for(self._done.wait(), deadline.remaining_s())
        except TimeoutError:
            raise deadline.expired(f"job {self.job_id} did not finish") from None
        return self.state.outcome()

    async def cancel(self) -> None:
        """As ``Job.cancel``. Safe to cancel: the cancel message is sent whole or not at all."""
        if not self.state.finished:
            await self._client._send(core.ClientSession.cancel_message(self.job_id))


class AsyncClient(BaseClient):
    """Talks to a genfill server from asyncio code; arguments as for ``genfill.Client``.

    Connects on the first awaited call (or on ``async with``/``await connect()``). Use as
    ``async with AsyncClient() as client: result = await client.fill(image, mask)``.
    """

    def _init_io(self) -> None:
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()

    def __enter__(self) -> None:
        raise TypeError("AsyncClient is asynchronous: use 'async with AsyncClient()', or the sync Client")

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ always raises
        pass

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self, timeout_s: float | None = None) -> Hello:
        """As ``Client.connect``. Safe to cancel: a half-open connection is closed."""
        async with self._connect_lock:
            if (hello := self._session.ready()) is not None:
                return hello
            settings = self._settings
            deadline = Deadline(timeout_or(timeout_s, settings.open_timeout_s))
            try:
                ws = await connect(settings.url, open_timeout=deadline.seconds, **settings.websocket_options())
            except CONNECT_ERRORS as exc:
                raise map_connect_error(exc, settings.url, deadline.seconds) from exc
            try:
                hello = self._session.receive_hello(await asyncio.wait_for(ws.recv(), deadline.remaining_s()))
            except BaseException as exc:
                await ws.close()
                if isinstance(exc, CONNECT_ERRORS) and not isinstance(exc, GenfillError):
                    raise map_connect_error(exc, settings.url, deadline.seconds) from exc
                raise
            self._ws = ws
            self._reader = asyncio.create_task(self._read_loop(ws), name="genfill-reader")
            return hello

    async def aclose(self, timeout_s: float | None = None) -> None:
        """As ``Client.close``. Safe to cancel: jobs and waits have already ended; the socket
        closes when websockets gives up on the closing handshake."""
        seconds = timeout_or(timeout_s, self._settings.reply_timeout_s)
        ws, reader = self._ws, self._reader
        self._session.connection_lost(ConnectionClosed(f"the client for {self.url} was closed"))
        if ws is not None:
            ws.close_timeout = seconds
            await ws.close()
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(reader, seconds)

    async def _connection(self) -> ClientConnection:
        if self._ws is None:
            await self.connect()
        assert self._ws is not None
        return self._ws

    async def _send(self, data: str | bytes) -> None:
        ws = await self._connection()
        seconds = self._settings.reply_timeout_s
        try:
            # send waits for the write buffer to drain, without a timeout of its own.
            await asyncio.wait_for(ws.send(data), seconds)
        except TimeoutError:
            ws.transport.abort()
            raise Timeout(f"the server at {self.url} took no data for {seconds:g} s", code="timeout") from None
        except websockets.exceptions.ConnectionClosed as exc:
            raise self._session.closed or connection_error(exc, self.url) from exc

    async def _read_loop(self, ws: ClientConnection) -> None:
        ended: BaseException | None = None
        try:
            async for data in ws:
                self._session.receive(data)
        except (websockets.exceptions.ConnectionClosed, ProtocolError) as exc:
            ended = exc
        if isinstance(ended, ProtocolError):
            await ws.close(code=1002, reason="protocol error")
        self._session.connection_lost(connection_error(ended, self.url))

    async def _images_present(self, prepared: core.PreparedJob, timeout_s: float | None) -> ImageStatus | None:
        answers: asyncio.Queue[ImageStatus | GenfillError] = asyncio.Queue()
        await self._connection()
        message = self._session.begin(prepared, answers.put_nowait)
        if message is None:
            return None
        deadline = Deadline(timeout_or(timeout_s, self._settings.reply_timeout_s))
        await self._send(message)
        try:
            return core.status_or_raise(await asyncio.wait_for(answers.get(), deadline.remaining_s()))
        except TimeoutError:
            raise deadline.expired("the server did not answer has_images") from None

    async def submit(self, prepared: core.PreparedJob, *, timeout_s: float | None = None) -> AsyncJob:
        """As ``Client.submit``. Cancelling it before it returns leaves the job unsubmitted or,
        once the submit message is out, running without a handle."""
        status = await self._images_present(prepared, timeout_s)
        job = AsyncJob(self, prepared)
        job.state = self._session.start(prepared, job._push)
        frames = self._session.frames_to_upload(prepared, status)
        try:
            for frame in frames:
                await self._send(frame)
            await self._send(prepared.submit_message())
        except BaseException:
            self._session.abandon(prepared.job_id)
            raise
        return job

    async def submit_fill(self, image: ImageInput, mask: ImageInput, prompt: str = "", **options: Any) -> AsyncJob:
        """As ``Client.submit_fill``."""
        await self._connection()
        return await self.submit(self._session.prepare_fill(image, mask, prompt, **options))

    async def submit_expand(self, image: ImageInput, **options: Any) -> AsyncJob:
        """As ``Client.submit_expand``."""
        await self._connection()
        return await self.submit(self._session.prepare_expand(image, **options))

    async def fill(
        self, image: ImageInput, mask: ImageInput, prompt: str = "", *, on_progress: core.OnProgress = None,
        timeout_s: float | None = None, **options: Any
    ) -> core.FillResult:
        """As ``Client.fill``. Cancelling it cancels the job on the server."""
        deadline = Deadline(timeout_or(timeout_s, self._settings.job_timeout_s))
        job = await self.submit_fill(image, mask, prompt, **options)
        return await self._finish(job, on_progress, deadline)

    async def expand(
        self, image: ImageInput, *, on_progress: core.OnProgress = None, timeout_s: float | None = None, **options: Any
    ) -> core.FillResult:
        """As ``Client.expand``. Cancelling it cancels the job on the server."""
        deadline = Deadline(timeout_or(timeout_s, self._settings.job_timeout_s))
        job = await self.submit_expand(image, **options)
        return await self._finish(job, on_progress, deadline)

    async def _finish(
        self, job: AsyncJob, on_progress: core.OnProgress, deadline: Deadline
    ) -> core.FillResult:
        try:
            if on_progress is not None:
                async for event in job._events_by(deadline):
                    on_progress(event)
            return await job._result_by(deadline)
        except (Timeout, asyncio.CancelledError):
            # The caller stopped waiting: the server should stop working on it too.
            with contextlib.suppress(GenfillError):
                await job.cancel()
            raise

    async def health(self, timeout_s: float | None = None) -> dict:
        """As ``Client.health``. Safe to cancel."""
        return await self._get("/v1/health", {}, timeout_s)

    async def models(self, timeout_s: float | None = None) -> dict:
        """As ``Client.models``. Safe to cancel."""
        return await self._get("/v1/models", self._settings.auth_headers(), timeout_s)

    async def _get(self, path: str, headers: dict[str, str], timeout_s: float | None) -> dict:
        seconds = timeout_or(timeout_s, self._settings.reply_timeout_s)
        async with httpx.AsyncClient(timeout=seconds) as http:
            try:
                response = await http.get(self._settings.http_url(path), headers=headers)
            except HTTP_ERRORS as exc:
                raise map_http_error(exc, self.url, seconds) from exc
        return http_get_json(response)
