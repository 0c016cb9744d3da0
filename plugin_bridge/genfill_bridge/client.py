"""A blocking connection to a genfill server, on the vendored ``websockets.sync.client``.

Threading model (the same in every editor): all calls on one ``ServerConnection`` happen on
one thread, which may be a worker thread (Krita: the docker stays responsive) or the main
thread (GIMP: a plug-in is its own process). The only call another thread may make is
``threading.Event.set()`` on the ``cancel`` event passed to ``run``: the connection's thread
polls it between frames and sends the ``cancel`` message itself, so two threads never send at
once (websockets' sync connection raises ``ConcurrencyError`` if they do).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from urllib.parse import urlsplit

from . import __version__, messages
from ._vendor.websockets import exceptions as ws_exceptions
from ._vendor.websockets.sync.client import ClientConnection, connect
from .errors import (
    BridgeError,
    ConnectionLost,
    JobCancelled,
    JobFailed,
    ProtocolMismatch,
    ServerNotRunning,
    ServerTimeout,
    TokenRejected,
)
from .frames import decode_frame
from .geometry import Box, Size
from .settings import ServerSettings

# The server announces its own limit in hello; ours only bounds what we accept back.
_MAX_RECEIVE_BYTES = 256 * 2**20
_POLL_S = 0.1
DEFAULT_OPEN_TIMEOUT_S = 10.0
DEFAULT_REPLY_TIMEOUT_S = 30.0
DEFAULT_JOB_TIMEOUT_S = 600.0

logger = logging.getLogger("genfill_bridge")

Trace = Callable[[str, "str | bytes"], None]
"""``trace(direction, frame)`` sees every frame, ``direction`` ``"send"`` or ``"recv"``."""


@dataclass(frozen=True)
class JobEvent:
    """``kind`` is ``accepted`` (``queue_position``) or ``progress`` (``step`` of ``total``,
    with a small RGBA ``preview`` of ``preview_size`` (width, height) when one came).
    ``preview_box`` is the canvas box the preview shows, scaled: ``document.run`` sets it
    (``None`` where it cannot tell)."""

    kind: str
    queue_position: int = 0
    step: int = 0
    total: int = 0
    preview: bytes | None = None
    preview_size: tuple[int, int] | None = None
    preview_box: Box | None = None


@dataclass(frozen=True)
class Variation:
    """One result layer: ``rgba`` is ``box.width * box.height * 4`` bytes, R, G, B, A, rows
    top to bottom, not premultiplied; alpha is 0 wherever the canvas must stay unchanged."""

    rgba: bytes
    seed: int


@dataclass(frozen=True)
class JobResult:
    """A finished job. ``warnings`` are sentences for the painter about what the engine
    accepted but did not honour (an ignored prompt); empty when there is nothing to say."""

    job_id: str
    box: Box
    variations: list[Variation]
    engine: str
    model: str | None
    seconds: float
    warnings: list[str] = field(default_factory=list)


class ServerConnection:
    """One websocket to a server. Use as a context manager; ``hello`` is the server's hello.

    Every wait has a deadline, so a server that hangs never hangs the editor.

    Args:
        url: ``ws://host:port``.
        token: the server's token; empty sends none.
        open_timeout_s: seconds to connect and get the hello (default 10).
        reply_timeout_s: seconds for one answer (``has_images``), for the server to take one
            frame, and for closing (default 30).
        trace: ``None``, or a callable that sees every frame.

    Raises (from ``open``):
        ServerNotRunning: nothing listens at the url, or it did not answer in time.
        TokenRejected: the server refused the token.
        ProtocolMismatch: the server speaks another major protocol version.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        trace: Trace | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.open_timeout_s = open_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.hello: dict = {}
        self.features: frozenset[str] = frozenset()
        """The features the server's hello offers (``genfill.protocol.Feature`` names)."""
        self._trace = trace
        self._ws: ClientConnection | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings, *, trace: Trace | None = None) -> ServerConnection:
        url, token = settings.resolve()
        return cls(url, token, open_timeout_s=settings.open_timeout_s, trace=trace)

    def __enter__(self) -> ServerConnection:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> dict:
        try:
            self._ws = connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
                # Frames are raw pixels: deflate costs CPU and saves little (the server has it off).
                compression=None,
                max_size=_MAX_RECEIVE_BYTES,
                open_timeout=self.open_timeout_s,
                close_timeout=self.reply_timeout_s,
                user_agent_header=f"genfill-bridge/{__version__}",
                # A proxy from the environment must not carry the token of a local server.
                proxy=None if _is_loopback(self.url) else True,
            )
        except ws_exceptions.InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise TokenRejected(
                    f"The genfill server at {self.url} refused the token. If you set a token in the "
                    "plug-in's settings, check it; else restart the server and try again."
                ) from exc
            raise ServerNotRunning(f"The server at {self.url} refused the connection (HTTP {status}).") from exc
        except (OSError, TimeoutError, ws_exceptions.WebSocketException) as exc:
            raise ServerNotRunning(
                f"The genfill server is not running at {self.url} ({_reason(exc)}). Start it with "
                "'genfill serve' and try again."
            ) from exc
        try:
            hello = messages.parse_server_message(self._recv(self.open_timeout_s, expect_text=True))
            if hello["type"] == "error":
                raise _server_error(hello, "The genfill server refused the connection")
            if hello["type"] != "hello":
                raise ProtocolMismatch(f"the server's first message is {hello['type']!r}, not hello")
            if hello["protocol_version"] != messages.PROTOCOL_VERSION:
                raise ProtocolMismatch(
                    f"The server speaks genfill protocol {hello['protocol_version']} and this plug-in "
                    f"speaks {messages.PROTOCOL_VERSION}: install matching versions (genfill plugin install)."
                )
        except BaseException:
            self.close()
            raise
        self.hello = hello
        self.features = messages.features(hello)
        return hello

    def close(self) -> None:
        """Closes the connection; a job still running on it is cancelled by the server."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def run(
        self,
        frames: dict[str, bytes],
        request: dict,
        *,
        canvas: Size,
        on_event: Callable[[JobEvent], None] | None = None,
        cancel: threading.Event | None = None,
        job_id: str | None = None,
        timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
        previews: bool = False,
    ) -> JobResult:
        """Uploads what the server lacks, submits ``request`` and waits for its result.

        Args:
            frames: the binary frames the request refers to, by image id.
            request: a ``FillRequest`` as a dict (``FillOptions.request``).
            canvas: the size of the canvas the result lands on (grown, for expand), to check
                the result's box against.
            on_event: called on this thread for ``accepted`` and each ``progress``.
            cancel: set from any thread to cancel; ``run`` then raises ``JobCancelled``.
            job_id: ``None`` makes a fresh one.
            timeout_s: seconds the whole job may take (default 600); past it the job is
                cancelled and ``ServerTimeout`` raised.

        Raises:
            JobCancelled, JobFailed, ConnectionLost, ServerTimeout, ProtocolMismatch, and
            ``BridgeError`` for an error code this bridge does not know.
        """
        job_id = job_id or uuid.uuid4().hex
        cancel = cancel or threading.Event()
        deadline = time.monotonic() + timeout_s
        self._send(messages.has_images(list(frames)))
        status = self._wait_for("image_status", cancel)
        if cancel.is_set():
            raise JobCancelled("Cancelled.")
        present = set(status["present"])
        for image_id, frame in frames.items():
            if image_id not in present:
                self._send(frame)
        self._send(messages.submit(job_id, request, previews=previews))
        received: dict[str, bytes] = {}
        sizes: dict[str, tuple[int, int]] = {}
        cancel_sent = False
        while True:
            if cancel.is_set() and not cancel_sent:
                self._send(messages.cancel(job_id))
                cancel_sent = True
            if time.monotonic() > deadline:
                if not cancel_sent:
                    try:
                        self._send(messages.cancel(job_id))
                    except BridgeError:
                        pass  # a server too wedged to take the cancel ends the job on disconnect
                raise ServerTimeout(f"The genfill server did not finish the fill within {timeout_s:g} s; it was asked to stop.")
            data = self._recv(_POLL_S)
            if data is None:
                continue
            if isinstance(data, bytes):
                frame = decode_frame(data)
                received[frame.image_id] = frame.payload
                sizes[frame.image_id] = (frame.width, frame.height)
                continue
            message = messages.parse_server_message(data)
            kind = message["type"]
            if not messages.is_known(message):
                logger.debug("skipping server message of unknown type %r", kind)
                continue
            if message.get("job_id") not in (job_id, None):
                continue
            if kind == "accepted":
                _notify(on_event, JobEvent("accepted", queue_position=message["queue_position"]))
            elif kind == "progress":
                preview = received.pop(message.get("preview") or "", None)
                _notify(on_event, JobEvent("progress", step=message["step"], total=message["total"], preview=preview,
                                           preview_size=sizes.get(message.get("preview") or "") if preview else None))
            elif kind == "result":
                return _result(message, received, canvas)
            elif kind == "cancelled":
                raise JobCancelled("Cancelled.")
            elif kind == "error":
                if message["code"] == "unknown_job" and cancel_sent:
                    continue  # the cancel crossed the job's end; its result or error follows
                if message["code"] == "shutting_down":
                    raise ConnectionLost(f"The genfill server at {self.url} was stopped during the job. Start it again and retry.")
                raise _server_error(message, "The genfill server could not fill")

    def _wait_for(self, kind: str, cancel: threading.Event) -> dict:
        deadline = time.monotonic() + self.reply_timeout_s
        while not cancel.is_set():
            if time.monotonic() > deadline:
                raise ServerTimeout(f"The genfill server at {self.url} did not answer within {self.reply_timeout_s:g} s.")
            data = self._recv(_POLL_S)
            if data is None or isinstance(data, bytes):
                continue
            message = messages.parse_server_message(data)
            if message["type"] == kind:
                return message
            if message["type"] == "error":
                raise _server_error(message, "The genfill server could not fill")
        return {"present": []}

    def _send(self, data: str | bytes) -> None:
        if self._ws is None:
            raise BridgeError("the connection is closed")
        if self._trace is not None:
            self._trace("send", data)
        # websockets' sync send has no timeout: against a server that stops reading it blocks
        # in sendall once the socket buffers are full. Shutting the socket down ends it.
        stalled = threading.Event()
        watchdog = threading.Timer(self.reply_timeout_s, _shut_down, (self._ws, stalled))
        watchdog.daemon = True
        watchdog.start()
        try:
            self._ws.send(data)
        except ws_exceptions.ConnectionClosed as exc:
            if stalled.is_set():
                raise ServerTimeout(
                    f"The genfill server at {self.url} stopped taking data for {self.reply_timeout_s:g} s. "
                    "Restart it and try again."
                ) from exc
            raise _lost(self.url) from exc
        finally:
            watchdog.cancel()

    def _recv(self, timeout_s: float, *, expect_text: bool = False) -> str | bytes | None:
        if self._ws is None:
            raise BridgeError("the connection is closed")
        try:
            data = self._ws.recv(timeout=timeout_s)
        except TimeoutError:
            if expect_text:
                raise ServerNotRunning(f"The server at {self.url} did not answer in time: is it a genfill server?") from None
            return None
        except ws_exceptions.ConnectionClosed as exc:
            raise _lost(self.url) from exc
        if self._trace is not None:
            self._trace("recv", data)
        return data


def fetch_catalogue(settings: ServerSettings) -> dict:
    """The server's engines, models, default engine and limits, as its hello lists them."""
    with ServerConnection.from_settings(settings) as connection:
        hello = connection.hello
    return {key: hello[key] for key in ("server_version", "engines", "models", "default_engine", "limits")}


def remote_host(catalogue: dict, *, engine: str | None = None, model: str | None = None) -> str | None:
    """The host a fill with ``engine``/``model`` would send the image to, or ``None`` where it
    stays on the server's machine; for the plug-ins' "the image leaves the machine" marker.

    ``catalogue`` is ``fetch_catalogue``'s (or a hello's); ``None`` for engine and model
    means what the server picks: its default engine's first model.
    """
    models = catalogue.get("models", [])
    if model is not None:
        chosen = [m for m in models if m.get("name") == model and (engine is None or m.get("engine") == engine)]
    else:
        name = engine or catalogue.get("default_engine")
        chosen = [m for m in models if m.get("engine") == name]
    for entry in chosen[:1]:
        if entry.get("remote"):
            return entry.get("host") or "another machine"
    return None


def _result(message: dict, received: dict[str, bytes], canvas: Size) -> JobResult:
    box = Box(**{key: int(message["box"][key]) for key in ("x", "y", "width", "height")})
    if box.width <= 0 or box.height <= 0 or not Box(0, 0, canvas.width, canvas.height).contains(box):
        raise ProtocolMismatch(f"the server's result box {tuple(box)} is not inside the {canvas.width}x{canvas.height} canvas")
    variations = []
    for variation in message["variations"]:
        # Two variations may be the same image (one frame, one id): read, do not take.
        payload = received.get(variation["image"])
        if payload is None:
            raise ProtocolMismatch("the server's result refers to an image it never sent")
        if len(payload) != box.width * box.height * 4:
            raise ProtocolMismatch("the server's result image does not match its box (was it PNG?)")
        variations.append(Variation(payload, int(variation["seed"])))
    return JobResult(
        job_id=message["job_id"],
        box=box,
        variations=variations,
        engine=message["engine"],
        model=message.get("model"),
        seconds=float(message.get("seconds", 0.0)),
        warnings=_warnings(message.get("warnings")),
    )


def _warnings(warnings: object) -> list[str]:
    # A newer server may add fields to a warning or send an odd entry: keep what reads as a
    # sentence, never fail a finished job over its warnings.
    if not isinstance(warnings, list):
        return []
    return [str(w["message"]) for w in warnings if isinstance(w, dict) and isinstance(w.get("message"), str)]


def _shut_down(ws: ClientConnection, stalled: threading.Event) -> None:
    stalled.set()
    try:
        ws.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _server_error(message: dict, context: str) -> BridgeError:
    """The error for a server ``error`` message; a code this bridge does not know (a newer
    server's) becomes the root ``BridgeError``, still with the server's words and code."""
    code = str(message["code"])
    cls = JobFailed if code in messages.ERROR_CODES else BridgeError
    return cls(f"{context}: {message['message']}", code=code)


def _notify(on_event: Callable[[JobEvent], None] | None, event: JobEvent) -> None:
    if on_event is not None:
        on_event(event)


def _lost(url: str) -> ConnectionLost:
    return ConnectionLost(
        f"The genfill server at {url} closed the connection (was it stopped?). Start it again and retry."
    )


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__

