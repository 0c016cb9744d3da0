"""``Client``: the blocking client, on ``websockets.sync.client``.

A reader thread feeds every frame to the shared ``ClientSession``, which routes what it means
to the queue of the call waiting for it; calls block on their own queue with a deadline. Only
moving bytes and waiting happen here: ``genfill.session`` decides, for both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import websockets
from websockets.sync.client import ClientConnection, connect

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

# websockets 17.1 deprecates calling the sync connect() outside a ``with`` unless
# ``legacy=True`` is passed; older releases hand unknown keywords to
# socket.create_connection, which raises TypeError. The connection here outlives the call
# (close() ends it), so pass the flag exactly where it exists.
_LEGACY: dict[str, Any] = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def _shut_down(ws: ClientConnection, stalled: threading.Event) -> None:
    stalled.set()
    with contextlib.suppress(OSError):
        ws.socket.shutdown(socket.SHUT_RDWR)


def _refuse_inside_event_loop(method: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"Client.{method}() blocks, and this thread runs an event loop: use AsyncClient here")


class Job(core.JobHandle):
    """A submitted job. Iterate it for events, call ``result()``, or ``cancel()`` it."""

    def __init__(self, client: Client, prepared: core.PreparedJob) -> None:
        super().__init__(client, prepared, queue.SimpleQueue(), threading.Event())

    def __iter__(self) -> Iterator[core.JobEvent]:
        return self.events()

    def events(self, timeout_s: float | None = None) -> Iterator[core.JobEvent]:
        """Yields events until the job's terminal event (included).

        Args:
            timeout_s: the most seconds to wait for the terminal event, counted from this
                call; ``None`` means the client's ``job_timeout_s`` (600 s unless set).

        Raises:
            Timeout: the job did not end in time (it goes on: ``cancel()`` stops it).
        """
        _refuse_inside_event_loop("events")
        return self._events_by(Deadline(timeout_or(timeout_s, self._client._settings.job_timeout_s)))

    def _events_by(self, deadline: Deadline) -> Iterator[core.JobEvent]:
        while True:
            try:
                event = self._events.get(timeout=deadline.remaining_s())
            except queue.Empty:
                raise deadline.expired(f"job {self.job_id} did not finish") from None
            yield event
            if event.kind in core.TERMINAL_KINDS:
                return

    def result(self, timeout_s: float | None = None) -> core.FillResult:
        """Blocks until the job ends and returns its result, or raises its error.

        Args:
            timeout_s: the most seconds to wait; ``None`` means the client's ``job_timeout_s``.

        Raises:
            Timeout: the job did not end in time (it goes on: ``cancel()`` stops it).
            JobFailed, JobCancelled, EngineUnavailable, Unsupported, ConnectionClosed: the
                job's own error.
        """
        _refuse_inside_event_loop("result")
        return self._result_by(Deadline(timeout_or(timeout_s, self._client._settings.job_timeout_s)))

    def _result_by(self, deadline: Deadline) -> core.FillResult:
        if not self._done.wait(deadline.remaining_s()):
            raise deadline.expired(f"job {self.job_id} did not finish")
        return self.state.outcome()

    def cancel(self) -> None:
        """Asks the server to stop the job; ``result()`` then raises ``JobCancelled``.

        Raises:
            ConnectionClosed: the connection has ended.
        """
        if not self.state.finished:
            self._client._send(core.ClientSession.cancel_message(self.job_id))


class Client(BaseClient):
    """Talks to a genfill server from ordinary (blocking) code.

    Connects on first use (or on ``with``/``connect()``); one client may be shared by several
    threads, each call blocking only its own thread. Every wait has a deadline; the defaults
    below apply where a call's ``timeout_s`` is ``None``.

    Args:
        url: ``ws://host:port``; ``None`` reads the running server's state file.
        token: the server's token; ``None`` reads it from the state file.
        state_file: where to read url and token; ``None`` means the default path.
        open_timeout_s: seconds to connect and get the server's hello (default 10).
        reply_timeout_s: seconds for one answer (``has_images``, closing, ``health``,
            ``models``) and for the server to take one frame we send (default 30).
        job_timeout_s: seconds a job may take from submit to result (default 600).

    Raises:
        ConnectError: no url given and no running server's state file found.
        InvalidInput: the url or a timeout is malformed.

    Use as ``with Client() as client: result = client.fill(image, mask)``.
    """

    def _init_io(self) -> None:
        self._ws: ClientConnection | None = None
        self._reader: threading.Thread | None = None
        # One lock for the session: the reader thread and calling threads both touch it.
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> None:
        raise TypeError("Client blocks: use 'with Client()', or 'async with AsyncClient()' in async code")

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - __aenter__ always raises
        pass

    def connect(self, timeout_s: float | None = None) -> Hello:
        """Opens the websocket and reads the server's hello, unless already connected.

        Every other call connects by itself when needed; this only makes it happen now.

        Args:
            timeout_s: seconds for the connection and the hello; ``None`` means the client's
                ``open_timeout_s``.

        Returns:
            The server's hello.

        Raises:
            ConnectError: nothing listens at the url or it refused the handshake.
            AuthenticationError: the token was refused.
            ConnectTimeout: no hello in time.
            ProtocolError: the server speaks another major protocol version.
            ConnectionClosed: this client was closed.
        """
        _refuse_inside_event_loop("connect")
        with self._connect_lock:
            if (hello := self._session.ready()) is not None:
                return hello
            settings = self._settings
            deadline = Deadline(timeout_or(timeout_s, settings.open_timeout_s))
            try:
                ws = connect(settings.url, open_timeout=deadline.seconds, **_LEGACY, **settings.websocket_options())
            except CONNECT_ERRORS as exc:
                raise map_connect_error(exc, settings.url, deadline.seconds) from exc
            try:
                hello = self._session.receive_hello(ws.recv(timeout=deadline.remaining_s()))
            except BaseException as exc:
                ws.close()
                if isinstance(exc, CONNECT_ERRORS) and not isinstance(exc, GenfillError):
                    raise map_connect_error(exc, settings.url, deadline.seconds) from exc
                raise
            self._ws = ws
            self._reader = threading.Thread(target=self._read_loop, args=(ws,), name="genfill-reader", daemon=True)
            self._reader.start()
            return hello

    def close(self, timeout_s: float | None = None) -> None:
        """Closes the connection; jobs still running on it are cancelled by the server.

        Jobs still waited on here end with ``ConnectionClosed``; later calls raise it.

        Args:
            timeout_s: seconds to wait for the server to acknowledge the close; ``None``
                means the client's ``reply_timeout_s``. Past it the socket is dropped.
        """
        seconds = timeout_or(timeout_s, self._settings.reply_timeout_s)
        with self._connect_lock:
            ws, reader = self._ws, self._reader
            with self._lock:
                self._session.connection_lost(ConnectionClosed(f"the client for {self.url} was closed"))
        if ws is not None:
            ws.close_timeout = seconds
            ws.close()
        if reader is not None and reader is not threading.current_thread():
            reader.join(seconds)

    def _connection(self) -> ClientConnection:
        if self._ws is None:
            self.connect()
        assert self._ws is not None
        return self._ws

    def _send(self, data: str | bytes) -> None:
        ws = self._connection()
        seconds = self._settings.reply_timeout_s
        # websockets' sync send has no timeout: against a server that stops reading it blocks
        # in sendall once the socket buffers are full. Shutting the socket down ends it.
        stalled = threading.Event()
        watchdog = threading.Timer(seconds, _shut_down, (ws, stalled))
        watchdog.daemon = True
        watchdog.start()
        try:
            ws.send(data)
        except websockets.exceptions.ConnectionClosed as exc:
            if stalled.is_set():
                raise Timeout(f"the server at {self.url} took no data for {seconds:g} s", code="timeout") from exc
            raise self._session.closed or connection_error(exc, self.url) from exc
        finally:
            watchdog.cancel()

    def _read_loop(self, ws: ClientConnection) -> None:
        ended: BaseException | None = None
        try:
            for data in ws:
                with self._lock:
                    self._session.receive(data)
        except (websockets.exceptions.ConnectionClosed, ProtocolError) as exc:
            ended = exc
        if isinstance(ended, ProtocolError):
            ws.close(code=1002, reason="protocol error")
        with self._lock:
            self._session.connection_lost(connection_error(ended, self.url))

    def _images_present(self, prepared: core.PreparedJob, timeout_s: float | None) -> ImageStatus | None:
        answers: queue.SimpleQueue[ImageStatus | GenfillError] = queue.SimpleQueue()
        self._connection()
        with self._lock:
            message = self._session.begin(prepared, answers.put)
        if message is None:
            return None
        deadline = Deadline(timeout_or(timeout_s, self._settings.reply_timeout_s))
        self._send(message)
        try:
            return core.status_or_raise(answers.get(timeout=deadline.remaining_s()))
        except queue.Empty:
            raise deadline.expired("the server did not answer has_images") from None

    def submit(self, prepared: core.PreparedJob, *, timeout_s: float | None = None) -> Job:
        """Uploads what the server lacks and submits a prepared job.

        Args:
            prepared: from ``ClientSession.prepare_fill`` or ``prepare_expand``.
            timeout_s: seconds to wait for the server's answer to ``has_images``; ``None``
                means the client's ``reply_timeout_s``.

        Raises:
            Unsupported: the request needs a feature this server lacks (nothing is sent).
            Timeout, ConnectionClosed, and what ``connect`` raises.
        """
        _refuse_inside_event_loop("submit")
        status = self._images_present(prepared, timeout_s)
        job = Job(self, prepared)
        with self._lock:
            job.state = self._session.start(prepared, job._push)
            frames = self._session.frames_to_upload(prepared, status)
        try:
            for frame in frames:
                self._send(frame)
            self._send(prepared.submit_message())
        except BaseException:
            with self._lock:
                self._session.abandon(prepared.job_id)
            raise
        return job

    def submit_fill(self, image: ImageInput, mask: ImageInput, prompt: str = "", **options: Any) -> Job:
        """Submits a fill and returns its job handle at once (see ``fill`` for the options)."""
        self._connection()
        return self.submit(self._session.prepare_fill(image, mask, prompt, **options))

    def submit_expand(self, image: ImageInput, **options: Any) -> Job:
        """Submits an expand and returns its job handle at once (see ``expand``)."""
        self._connection()
        return self.submit(self._session.prepare_expand(image, **options))

    def fill(
        self, image: ImageInput, mask: ImageInput, prompt: str = "", *, on_progress: core.OnProgress = None,
        timeout_s: float | None = None, **options: Any
    ) -> core.FillResult:
        """Fills the selected part of ``image`` and returns the variations.

        Args:
            image: the canvas: PIL image, ``(H, W[, 3|4])`` uint8 array or path.
            mask: the selection, same size: 0 keeps, 255 replaces, soft values blend.
            prompt: what to paint; empty fills from the surroundings.
            on_progress: ``None`` or a callable taking each ``JobEvent``.
            timeout_s: seconds the job may take; ``None`` means the client's
                ``job_timeout_s`` (600 s unless set). On timeout the job is cancelled.
            **options: the ``FillRequest`` fields: ``mode``, ``engine``, ``model``,
                ``variations`` (default 3), ``seed``, ``steps``, ``strength``, ``guidance``,
                ``negative_prompt``, ``scheduler``, ``grow_px``, ``feather_px``, ``blend_px``,
                ``control``, ``references`` (a list of ``ImageReference`` or dicts of its
                fields whose ``image`` may be pixels; needs the server's ``references``
                feature); and ``job_id``, ``result_format``, ``upload_format``.

        Raises:
            InvalidInput: a bad image, mask or option, before anything is sent.
            Unsupported: ``references`` given and the server does not offer them.
            Timeout, JobFailed, EngineUnavailable, JobCancelled, LimitExceeded,
            ConnectionClosed, GenfillError (an error code this SDK does not know).
        """
        deadline = Deadline(timeout_or(timeout_s, self._settings.job_timeout_s))
        job = self.submit_fill(image, mask, prompt, **options)
        return self._finish(job, on_progress, deadline)

    def expand(
        self, image: ImageInput, *, on_progress: core.OnProgress = None, timeout_s: float | None = None, **options: Any
    ) -> core.FillResult:
        """Grows the canvas by ``left``, ``right``, ``top`` and ``bottom`` (pixels, default 0)
        and fills the new area; the original pixels stay unchanged. Other options, errors and
        ``timeout_s`` as for ``fill``."""
        deadline = Deadline(timeout_or(timeout_s, self._settings.job_timeout_s))
        job = self.submit_expand(image, **options)
        return self._finish(job, on_progress, deadline)

    def _finish(self, job: Job, on_progress: core.OnProgress, deadline: Deadline) -> core.FillResult:
        try:
            if on_progress is not None:
                for event in job._events_by(deadline):
                    on_progress(event)
            return job._result_by(deadline)
        except Timeout:
            # The caller stopped waiting: the server should stop working on it too.
            with contextlib.suppress(GenfillError):
                job.cancel()
            raise

    def health(self, timeout_s: float | None = None) -> dict:
        """The server's ``/v1/health`` answer; needs no websocket.

        Args:
            timeout_s: seconds for the request; ``None`` means the client's ``reply_timeout_s``.

        Raises:
            ConnectError, Timeout, AuthenticationError, ProtocolError.
        """
        return self._get("/v1/health", {}, timeout_s)

    def models(self, timeout_s: float | None = None) -> dict:
        """The server's ``/v1/models`` catalogue (engines, models, default engine). Args and
        errors as for ``health``."""
        return self._get("/v1/models", self._settings.auth_headers(), timeout_s)

    def _get(self, path: str, headers: dict[str, str], timeout_s: float | None) -> dict:
        seconds = timeout_or(timeout_s, self._settings.reply_timeout_s)
        try:
            response = httpx.get(self._settings.http_url(path), headers=headers, timeout=seconds)
        except HTTP_ERRORS as exc:
            raise map_http_error(exc, self.url, seconds) from exc
        return http_get_json(response)
