"""Where the server is: the plug-in's settings, else the running server's state file.

The state file rules are those of ``genfill.state`` (repeated here: the bridge cannot import
the SDK): ``$GENFILL_STATE_FILE``, else the per-user state folder + ``genfill/server.json``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ServerNotRunning

STATE_FILE_ENV = "GENFILL_STATE_FILE"


def default_state_path() -> Path:
    """Linux: ``$XDG_STATE_HOME`` or ``~/.local/state``; macOS: ``~/Library/Application Support``;
    Windows: ``%LOCALAPPDATA%``; then ``genfill/server.json``."""
    override = os.environ.get(STATE_FILE_ENV)
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "genfill" / "server.json"


@dataclass(frozen=True)
class ServerSettings:
    """What the plug-in's settings say. Empty ``url`` or ``token`` means "read the state file"."""

    url: str = ""
    token: str = ""
    state_file: str = ""
    open_timeout_s: float = 10.0

    def resolve(self) -> tuple[str, str]:
        """Returns ``(url, token)``.

        Raises:
            ServerNotRunning: no url is set and no server has written a state file.
        """
        url, token = self.url.strip(), self.token.strip()
        if not url or not token:
            path = Path(self.state_file) if self.state_file else default_state_path()
            state = _read_state(path)
            if state is None and not url:
                raise ServerNotRunning(
                    "The genfill server is not running (it has written no state file at "
                    f"{path}). Start it with 'genfill serve', or set its address and token in the "
                    "plug-in's settings."
                )
            if state is not None:
                if not url:
                    url = state["url"]
                # A token belongs to one server: never send the local one to another machine.
                if not token and urlsplit(url).netloc == urlsplit(state["url"]).netloc:
                    token = state["token"]
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"the server address must start with ws:// or wss://, got {url!r}")
        return url.rstrip("/"), token


def _read_state(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServerNotRunning(f"The genfill server's state file {path} cannot be read ({exc}): restart the server.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not isinstance(data.get("token"), str):
        raise ServerNotRunning(f"The genfill server's state file {path} is damaged: restart the server.")
    return data
