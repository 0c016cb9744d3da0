"""Connection settings and error mapping shared by ``Client`` and ``AsyncClient``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets

from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    GenfillError,
    InvalidInput,
    ProtocolError,
    Timeout,
)
from .protocol import Hello, Limits
from .state import default_state_path, read_state

# Frames are raw pixels or already-compressed PNG: permessage-deflate only burns CPU on them
# (a 64 MiB message was 10x slower with it), so it is off on both sides.
COMPRESSION = None


DEFAULT_OPEN_TIMEOUT_S = 10.0
DEFAULT_REPLY_TIMEOUT_S = 30.0
DEFAULT_JOB_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the server is and how long each kind of wait may take, in seconds.

    ``open_timeout_s``: connecting plus the server's hello. ``reply_timeout_s``: one answer
    (``has_images``, closing, the HTTP endpoints) and the server taking one frame sent. ``job_timeout_s``: a job, from submit to
    its result. Each is a positive number: no wait is unbounded.
    """

    url: str
    token: str | None
    open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S
    reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S
    job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S

    @classmethod
    def resolve(
        cls,
        url: str | None,
        token: str | None,
        state_file: str | Path | None,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
    ) -> ConnectionSettings:
        """Fills in url and token from the server's state file where they are not given.

        Raises:
            ConnectError: no url given and no state file, or the state file is unreadable.
            InvalidInput: the url is not ``ws://`` or ``wss://``, or a timeout is not positive.
        """
        for name, value in (("open_timeout_s", open_timeout_s), ("reply_timeout_s", reply_timeout_s), ("job_timeout_s", job_timeout_s)):
            positive_seconds(value, name)
        if url is not None:
            url = _checked_url(url)
        if token is not None and not isinstance(token, str):
            raise InvalidInput(f"token must be a string, got {type(token).__name__}")
        if url is None or token is None:
            path = Path(state_file) if state_file else default_state_path()
            try:
                state = read_state(path)
            except FileNotFoundError:
                if url is None:
                    raise ConnectError(
                        f"no running genfill server found (no state file at {path}): start one with 'genfill serve'"
                    ) from None
                state = None
            # A folder, a file of another shape, one we may not read: all mean no usable server.
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConnectError(f"the server state file {path} is unreadable: {exc}") from exc
            # A state file written by hand can hold anything its JSON allows.
            if state is not None and not (isinstance(state.url, str) and isinstance(state.token, str)):  # type: ignore[redundant-expr]
                raise ConnectError(f"the server state file {path} is unreadable: url and token must be strings")
            if state is not None:
                if url is None:
                    url = state.url
                if token is None and _same_server(url, state.url):
                    token = state.token
        return cls(_checked_url(url), token, open_timeout_s, reply_timeout_s, job_timeout_s)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def websocket_options(self) -> dict:
        return {
            "additional_headers": self.auth_headers(),
            "compression": COMPRESSION,
            # The server announces its own limit in hello; ours only bounds what we accept.
            "max_size": Limits().max_message_bytes * 2,
            "close_timeout": self.reply_timeout_s,
            "user_agent_header": "genfill-sdk",
            "logger": _RedactingLogger(logging.getLogger("websockets.client")),
        }

    def http_url(self, path: str) -> str:
        parts = urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        return urlunsplit((scheme, parts.netloc, path, "", ""))


class BaseClient:
    """What ``Client`` and ``AsyncClient`` share: settings, the session and what it knows.

    The arguments are documented on ``genfill.Client``; subclasses set up their I/O in
    ``_init_io``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        state_file: str | None = None,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
    ) -> None:
        from .session import ClientSession

        self._settings = ConnectionSettings.resolve(
            url, token, state_file, open_timeout_s, reply_timeout_s, job_timeout_s
        )
        self._session = ClientSession()
        self._init_io()

    def _init_io(self) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return self._settings.url

    @property
    def limits(self) -> Limits:
        """The server's limits once connected; the protocol's defaults before."""
        return self._session.limits

    @property
    def hello(self) -> Hello | None:
        """The server's hello; ``None`` until the first call connects."""
        return self._session.hello


class _RedactingLogger(logging.LoggerAdapter):
    """websockets logs every handshake header at DEBUG level; the token must not reach a log."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level) and len(args) == 2 and str(args[0]).lower() == "authorization":
            args = (args[0], "[redacted]")
        super().log(level, msg, *args, **kwargs)


def _checked_url(url: object) -> str:
    """``url`` without a trailing slash, once it is a ``ws://`` or ``wss://`` url with a host
    and a valid port."""
    if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
        raise InvalidInput(f"url must start with ws:// or wss://, got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
        if not parts.hostname:
            raise ValueError("it names no host")
        parts.hostname.encode("idna")
    except (ValueError, UnicodeError) as exc:
        raise InvalidInput(f"url {url!r} is not a valid websocket url: {exc}") from exc
    return url.rstrip("/")


def _same_server(url: str, state_url: str) -> bool:
    return urlsplit(url).netloc == urlsplit(state_url).netloc


class Deadline:
    """The end of a wait that starts now and may last ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining_s(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self, what: str) -> Timeout:
        return Timeout(f"{what} within {self.seconds:g} s", code="timeout")


def positive_seconds(value: object, name: str = "timeout_s") -> float:
    """``value`` as seconds; refuses what is not a positive, finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise InvalidInput(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def timeout_or(timeout_s: float | None, default_s: float) -> float:
    """A call's ``timeout_s``: ``None`` means the client's default for that wait."""
    return default_s if timeout_s is None else positive_seconds(timeout_s)


def connection_error(exc: BaseException | None, url: str) -> GenfillError:
    """Why a read loop ended: ``None`` for a clean close by the server, else what it raised."""
    if isinstance(exc, GenfillError):
        return exc
    if isinstance(exc, websockets.exceptions.ConnectionClosed):
        return ConnectionClosed(f"connection to {url} lost: {exc}")
    return ConnectionClosed(f"server at {url} closed the connection")


CONNECT_ERRORS = (OSError, TimeoutError, ValueError, websockets.exceptions.WebSocketException)
"""What websockets and the OS raise while a connection opens; ``map_connect_error`` maps them."""


def map_connect_error(exc: BaseException, url: str, timeout_s: float | None = None) -> GenfillError:
    """Turns what websockets or the OS raised while connecting into a genfill exception."""
    if isinstance(exc, websockets.exceptions.InvalidStatus):
        status = exc.response.status_code
        if status in (401, 403):
            reason = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            return AuthenticationError(
                f"server at {url} refused the connection ({status}): {reason or 'token wrong or missing'}",
                code="unauthorized",
            )
        return ConnectError(f"server at {url} refused the websocket handshake with HTTP {status}")
    if isinstance(exc, TimeoutError):
        within = f" within {timeout_s:g} s" if timeout_s is not None else " in time"
        return ConnectTimeout(f"server at {url} did not answer{within}: is it a genfill server?", code="timeout")
    if isinstance(exc, websockets.exceptions.ConnectionClosed):
        return ConnectError(f"server at {url} closed the connection before its hello: {exc}")
    if isinstance(exc, OSError):
        return ConnectError(f"no genfill server at {url} ({exc.__class__.__name__}): is 'genfill serve' running?")
    return ConnectError(f"cannot connect to {url}: {exc}")


HTTP_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError)
"""What httpx raises for a request that got no usable answer; ``map_http_error`` maps them."""


def map_http_error(exc: Exception, url: str, timeout_s: float | None = None) -> GenfillError:
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"HTTP request to {url} got no answer within {timeout_s:g} s", code="timeout")
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(f"no genfill server at {url}: is 'genfill serve' running?")
    return ConnectError(f"HTTP request to {url} failed: {exc}")


def http_get_json(response: httpx.Response) -> dict:
    if response.status_code in (401, 403):
        raise AuthenticationError(f"server refused the request ({response.status_code})", code="unauthorized")
    if response.status_code != 200:
        raise ProtocolError(f"server answered HTTP {response.status_code}")
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("server answered with invalid JSON") from exc
    if not isinstance(body, dict):
        raise ProtocolError("server answered with JSON that is not an object")
    return body
