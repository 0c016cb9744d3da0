"""What a server offers, read from its ``GET /v1/models`` (token needed), for dialogs.

The websocket hello lists the same; this one HTTP request is cheaper for a dialog that only
fills its drop-downs, and works from a GTK main loop without a websocket.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .client import _is_loopback, remote_host
from .errors import ServerNotRunning, TokenRejected
from .settings import ServerSettings


@dataclass(frozen=True)
class Choices:
    """Drop-down entries, as ``(label, value)``; the value ``""`` means "the server's default".

    Attributes:
        engines: the available engines, the default first.
        models: every model, with its engine in the label.
        prompt_engines: the engines that use the prompt (an engine that does not says so).
        strength_engines: the engines that honour ``strength``.
    """

    default_engine: str
    engines: list[tuple[str, str]]
    models: list[tuple[str, str]]
    prompt_engines: frozenset[str]
    strength_engines: frozenset[str]


def model_label(model: dict) -> str:
    """A model's drop-down label: its name and engine, and, for a cloud model, the host the
    image is sent to, so a painter sees before filling that it leaves the machine."""
    label = f"{model['name']} ({model.get('engine', '?')})"
    if model.get("remote"):
        label += f" - image sent to {model.get('host') or 'another machine'}"
    return label


def engine_label(catalogue: dict, name: str) -> str:
    """An engine's drop-down label: its name, and, for a cloud engine, the host the image is
    sent to (picking the engine with its default model sends it just as picking a model does)."""
    host = remote_host(catalogue, engine=name)
    return f"{name} - image sent to {host}" if host else name


def models_url(ws_url: str) -> str:
    """``ws://host:port`` -> ``http://host:port/v1/models`` (``wss`` -> ``https``)."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"the server address must start with ws:// or wss://, got {ws_url!r}")
    return urlunsplit((scheme, parts.netloc, "/v1/models", "", ""))


def fetch_models(settings: ServerSettings, *, timeout_s: float = 5.0) -> dict:
    """The server's ``/v1/models`` answer: ``default_engine``, ``engines``, ``models``.

    Raises:
        ServerNotRunning: no answer, or not a genfill server.
        TokenRejected: the server refused the token.
    """
    url, token = settings.resolve()
    request = urllib.request.Request(models_url(url), headers={"Authorization": f"Bearer {token}"})
    # A proxy from the environment must not carry the token of a local server.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(url) else []
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout_s) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise TokenRejected(f"The genfill server at {url} refused the token: restart the server and try again.") from exc
        raise ServerNotRunning(f"The server at {url} answered HTTP {exc.code}: is it a genfill server?") from exc
    except (OSError, ValueError) as exc:
        raise ServerNotRunning(
            f"The genfill server is not running at {url} ({getattr(exc, 'reason', exc)}). Start it with "
            "'genfill serve' and try again."
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("engines"), list) or not isinstance(data.get("models"), list):
        raise ServerNotRunning(f"The server at {url} did not list engines and models: is it a genfill server?")
    return data


def choices(catalogue: dict, mode: str) -> Choices:
    """The drop-down entries for ``mode`` from a ``/v1/models`` answer (or a hello)."""
    default = str(catalogue.get("default_engine") or "")
    engines = [(f"Server default ({engine_label(catalogue, default)})" if default else "Server default", "")]
    prompt_engines, strength_engines = set(), set()
    for engine in catalogue["engines"]:
        name = engine.get("name")
        if not isinstance(name, str) or not engine.get("available", True) or mode not in engine.get("modes", [mode]):
            continue
        engines.append((engine_label(catalogue, name), name))
        capabilities = engine.get("capabilities") or {}
        if capabilities.get("prompt", True):
            prompt_engines.add(name)
        if "strength" in capabilities.get("options", ["strength"]):
            strength_engines.add(name)
    models = [("Engine default", "")]
    for model in catalogue["models"]:
        if isinstance(model.get("name"), str) and mode in model.get("modes", [mode]):
            models.append((model_label(model), model["name"]))
    return Choices(default, engines, models, frozenset(prompt_engines), frozenset(strength_engines))
