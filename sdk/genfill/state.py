"""The server's state file: where a running server says its url and token.

The server writes it on start (readable by the user alone) and removes it on exit; the SDK,
the CLI and the editor plug-ins read it, so a local user never types a token. ``GENFILL_STATE_FILE``
overrides the path.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

STATE_FILE_ENV = "GENFILL_STATE_FILE"


def default_state_path() -> Path:
    """``$GENFILL_STATE_FILE``, else the platform's per-user state folder + ``genfill/server.json``.

    Linux: ``$XDG_STATE_HOME`` or ``~/.local/state``; macOS: ``~/Library/Application Support``;
    Windows: ``%LOCALAPPDATA%``.
    """
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
class ServerState:
    url: str
    token: str
    pid: int
    version: str


def read_state(path: Path | None = None) -> ServerState:
    """Reads the state file. Raises ``FileNotFoundError`` when no server has written one."""
    path = path or default_state_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    return ServerState(url=data["url"], token=data["token"], pid=int(data["pid"]), version=data["version"])


def write_state(state: ServerState, path: Path | None = None) -> Path:
    """Writes the state file atomically with mode 0600 and returns its path."""
    path = path or default_state_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    # Created 0600 from the start: a chmod after writing would leave a window where the token
    # is readable by other users.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump({"url": state.url, "token": state.token, "pid": state.pid, "version": state.version}, file)
    os.replace(temporary, path)
    return path


def remove_state(path: Path, token: str) -> None:
    """Removes the state file if it still holds ``token`` (a newer server may have replaced it)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass
