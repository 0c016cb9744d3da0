"""Connection settings and error mapping shared by ``Client`` and ``AsyncClient``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets

from .errors import AuthenticationError, ConnectError, GenfillError, ProtocolError
from .protocol import Limits
from .state import default_state_path, read_state

# Frames are raw pixels or already-compressed PNG: permessage-deflate only burns CPU on them
# (a 64 MiB message was 10x slower with it), so it is off on both sides.
COMPRESSION = None


@dataclass(frozen=True)
class ConnectionSettings:
    url: str
    token: str | None
    open_timeout_s: float

    @classmethod
    def resolve(
        cls, url: str | None, token: str | None, state_file: str | Path | None, open_timeout_s: float
    ) -> ConnectionSettings:
        """Fills in url and token from the server's state file where they are not given."""
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
            except (ValueError, KeyError) as exc:
                raise ConnectError(f"the server state file {path} is unreadable: {exc}") from exc
            if state is not None:
                if url is None:
                    url = state.url
                if token is None and _same_server(url, state.url):
                    token = state.token
        assert url is not None, "the state file gave one, or ConnectError was raised"
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
        return cls(url.rstrip("/"), token, open_timeout_s)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def websocket_options(self) -> dict:
        return {
            "additional_headers": self.auth_headers(),
            "compression": COMPRESSION,
            # The server announces its own limit in hello; ours only bounds what we accept.
            "max_size": Limits().max_message_bytes * 2,
            "open_timeout": self.open_timeout_s,
            "user_agent_header": "genfill-sdk",
            "logger": _RedactingLogger(logging.getLogger("websockets.client")),
        }

    def http_url(self, path: str) -> str:
        parts = urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        return urlunsplit((scheme, parts.netloc, path, "", ""))


class _RedactingLogger(logging.LoggerAdapter):
    """websockets logs every handshake header at DEBUG level; the token must not reach a log."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level) and len(args) == 2 and str(args[0]).lower() == "authorization":
            args = (args[0], "[redacted]")
        super().log(level, msg, *args, **kwargs)


def _same_server(url: str, state_url: str) -> bool:
    return urlsplit(url).netloc == urlsplit(state_url).netloc


def map_connect_error(exc: BaseException, url: str) -> GenfillError:
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
    if isinstance(exc, (ConnectionRefusedError, OSError)):
        return ConnectError(f"no genfill server at {url} ({exc.__class__.__name__}): is 'genfill serve' running?")
    if isinstance(exc, TimeoutError):
        return ConnectError(f"server at {url} did not answer in time")
    return ConnectError(f"cannot connect to {url}: {exc}")


def map_http_error(exc: httpx.HTTPError, url: str) -> GenfillError:
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(f"no genfill server at {url}: is 'genfill serve' running?")
    return ConnectError(f"HTTP request to {url} failed: {exc}")


def http_get_json(response: httpx.Response) -> dict:
    if response.status_code in (401, 403):
        raise AuthenticationError(f"server refused the request ({response.status_code})", code="unauthorized")
    if response.status_code != 200:
        raise ProtocolError(f"server answered HTTP {response.status_code}")
    try:
        return response.json()
    except json.JSONDecodeError as exc:
        raise ProtocolError("server answered with invalid JSON") from exc
