"""What the cloud engines share: settings and keys, one job's requests to a provider with
deadlines, bounded retries and typed errors, cancel, the per-provider limit, and images in
and out.

A job runs on a private event loop in the worker thread that called ``Engine.run``
(``run_job``): asyncio lets a cancel close the request in flight at once, which a blocking
socket read would not. A watcher calls the job's ``on_step`` every ``_CANCEL_POLL_S``; when it
raises ``JobCancelledError`` the job's task is cancelled, httpx closes the connection, and the
error propagates to the scheduler, which has answered the client ``cancelled`` already.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import io
import logging
import math
import os
import stat
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from genfill import __version__, fill
from genfill.fill import Size
from genfill.protocol import ErrorCode, Mode, ModelInfo
from PIL import Image

from ..base import EngineCapabilities, EngineDefaults, EngineError, JobCancelledError, StepCallback
from ..spec import EngineSpec, ProviderContext

logger = logging.getLogger("genfill.remote")

USER_AGENT = f"genfill/{__version__}"
_CANCEL_POLL_S = 0.2
"""How often a waiting job looks for a cancel (and reports that it is still running)."""
_SLOT_POLL_S = 0.05
_MAX_BACKOFF_S = 30.0
_MAX_RESULT_PIXELS = 64 * 2**20
"""A provider's image larger than this is refused before it is decoded (a decompression bomb
from a compromised or misconfigured endpoint must not take the server down)."""
_MAX_MESSAGE_CHARS = 300
PREVIEW_SIDE = 256
ALL_MODES = (Mode.FILL, Mode.REMOVE, Mode.EXPAND, Mode.ADD)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Secret:
    """An API key or token. Its ``repr`` and ``str`` never show it, so a settings object in a
    log line, a traceback or an error message does not leak it; ``reveal()`` is the only way
    to read it, where a request header is built."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class RemoteSettings:
    """One cloud provider's settings, from its table in the remote config file.

    Attributes:
        provider: the provider's name (``openai``, ``bfl``, ``imagen``).
        base_url: scheme and host (and port) requests go to, e.g. ``https://api.openai.com``.
        key: the API key or access token; ``None`` only where the provider has another way
            to authenticate (Imagen with Application Default Credentials).
        models: the provider's models this server offers; the first is the default.
        max_concurrent: tasks this server keeps at the provider at once (all jobs together);
            more wait in the server, cancellable.
        request_timeout_s: one HTTP request's connect and read timeout.
        deadline_s: a whole job, retries and polling included.
        retries: how often a 429, a 5xx or a failed connection is retried.
        backoff_s: the wait before the first retry, doubled each time (at most 30 s).
        max_retry_after_s: the longest ``Retry-After`` honoured; a provider asking for a
            longer wait fails the job at once with ``rate_limited``.
        poll_interval_s: between two polls of a provider's task (BFL).
        native_size: the side of the square band the pipeline scales the context crop to.
        trust_env: httpx reads proxy settings from the environment (``HTTPS_PROXY``...).
        options: the provider's own settings (quality, safety tolerance...), validated.
    """

    provider: str
    base_url: str
    key: Secret | None
    models: tuple[str, ...]
    max_concurrent: int = 2
    request_timeout_s: float = 120.0
    deadline_s: float = 300.0
    retries: int = 3
    backoff_s: float = 1.0
    max_retry_after_s: float = 30.0
    poll_interval_s: float = 1.0
    native_size: int = 1024
    trust_env: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc


Option = tuple[Any, Callable[[str, Any], Any]]
"""A provider option: its default, and a validator ``check(name, value) -> value``."""


def choice(*allowed: Any) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
        return value

    return check


def number(low: float, high: float, kind: type = float) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g}, not {value!r}")
        return kind(value)

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value


_COMMON: dict[str, Callable[[str, Any], Any]] = {
    "max_concurrent": number(1, 64, int),
    "request_timeout_s": number(0.01, 3600),
    "deadline_s": number(0.01, 24 * 3600),
    "retries": number(0, 10, int),
    "backoff_s": number(0, 60),
    "max_retry_after_s": number(0, 3600),
    "poll_interval_s": number(0.001, 60),
    "native_size": number(256, 2048, int),
    "trust_env": boolean,
}


def parse_settings(
    provider: str,
    table: Mapping[str, Any],
    *,
    base_url: str,
    key_env: str,
    models: tuple[str, ...],
    options: Mapping[str, Option] | None = None,
    key_required: bool = True,
    environ: Mapping[str, str] | None = None,
) -> RemoteSettings:
    """A provider's settings from its config table, with the key from the environment
    variable ``api_key_env`` (default ``key_env``) or the file ``api_key_file``, which must
    be readable by its owner only.

    Raises:
        ValueError: an unknown or invalid setting, a key in the table itself, a key file
            others can read, or no key where one is required; the message names the setting.
    """
    environ = os.environ if environ is None else environ
    table = dict(table)
    table.pop("enabled", None)
    if "api_key" in table:
        raise ValueError(
            f"{provider}: put the key in an environment variable (api_key_env) or a file only you can "
            "read (api_key_file), not in the config file"
        )
    options = options or {}
    known = {"base_url", "api_key_env", "api_key_file", "models", *_COMMON, *options}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{provider}: unknown setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    url = text(f"{provider}.base_url", table.pop("base_url", base_url)).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"{provider}.base_url must be scheme://host[:port], not {url!r}")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        # The key would cross the network in the clear.
        raise ValueError(f"{provider}.base_url must be https:// for a host other than this machine, not {url!r}")
    chosen = table.pop("models", list(models))
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, list) or not chosen or not all(isinstance(m, str) and m for m in chosen):
        raise ValueError(f"{provider}.models must be a list of model names, not {chosen!r}")
    env_name = table.pop("api_key_env", key_env)
    key = _read_key(provider, env_name, table.pop("api_key_file", None), environ)
    if key is None and key_required:
        raise ValueError(
            f"{provider}: no API key: set the environment variable {env_name} or api_key_file in the remote config"
        )
    common = {name: check(f"{provider}.{name}", table.pop(name)) for name, check in _COMMON.items() if name in table}
    resolved = {
        name: (check(f"{provider}.{name}", table[name]) if name in table else default)
        for name, (default, check) in options.items()
    }
    return RemoteSettings(provider, url, key, tuple(dict.fromkeys(chosen)), options=resolved, **common)


def _read_key(provider: str, env: Any, path: Any, environ: Mapping[str, str]) -> Secret | None:
    if path is not None:
        file = Path(text(f"{provider}.api_key_file", path)).expanduser()
        try:
            mode = file.stat().st_mode
        except OSError as exc:
            raise ValueError(f"{provider}.api_key_file {file}: {exc.strerror}") from None
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"{provider}.api_key_file {file} is readable by other users: chmod 600 {file}")
        value = file.read_text(encoding="utf-8").strip()
        if not value:
            raise ValueError(f"{provider}.api_key_file {file} is empty")
        return Secret(value)
    value = environ.get(text(f"{provider}.api_key_env", env), "").strip()
    return Secret(value) if value else None


def load_remote_config(path: Path | None, enabled: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The remote providers switched on and their settings tables (``ProviderContext.remote``).

    A provider is on when ``enabled`` names it (``--remote``) or its table in the TOML file
    at ``path`` says ``enabled = true``; every other table is ignored.

    Raises:
        ValueError: the file cannot be read or parsed, or a table is not a table.
    """
    tables: dict[str, Any] = {}
    if path is not None:
        try:
            tables = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"remote config {path}: {exc}") from None
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"remote config {path}: [{name}] must be a table")
        if "enabled" in table and not isinstance(table["enabled"], bool):
            raise ValueError(f"remote config {path}: {name}.enabled must be true or false")
    wanted = [*enabled, *(name for name, table in tables.items() if table.get("enabled"))]
    return {name: dict(tables.get(name, {})) for name in dict.fromkeys(wanted)}


class RemoteEngine:
    """What every cloud engine shares: its provider's settings and concurrency limit, the model
    it calls, and nothing to load (its key is first used by a job, so a start sends nothing).
    A subclass names itself, declares ``capabilities`` and implements ``run``."""

    name: str
    capabilities: EngineCapabilities
    defaults = EngineDefaults()

    def __init__(self, settings: RemoteSettings, limit: threading.Semaphore, model: str | None = None) -> None:
        self.settings = settings
        self.model = model or settings.models[0]
        self.capabilities = self.capabilities_for(settings)
        self._limit = limit

    @classmethod
    def capabilities_for(cls, settings: RemoteSettings) -> EngineCapabilities:
        """The class's capabilities at the configured native size."""
        return cls.capabilities.refined(native_size=settings.native_size)

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass


def offer(
    context: ProviderContext,
    engine_class: type[RemoteEngine],
    settings_from: Callable[[Mapping[str, Any]], RemoteSettings],
    *,
    description: str,
    architecture: str,
) -> Iterable[EngineSpec]:
    """A cloud provider's ``EngineSpec``, only where the server's configuration switched it on.

    ``description`` may name ``{host}``, the host the context crop is sent to.
    """
    name = engine_class.name
    if name not in context.remote:
        return
    settings = settings_from(context.remote[name])
    limit = threading.BoundedSemaphore(settings.max_concurrent)
    yield EngineSpec(
        name=name,
        factory=lambda device, model: engine_class(settings, limit, model),
        capabilities=engine_class.capabilities_for(settings),
        description=description.format(host=settings.host),
        models=tuple(model_info(settings, name, model, architecture) for model in settings.models),
        # Jobs past the limit wait in the provider's own lane, holding up no other engine.
        lane_workers=settings.max_concurrent,
    )


def model_info(settings: RemoteSettings, engine: str, name: str, architecture: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        engine=engine,
        architecture=architecture,
        inpaint=True,
        native_size=settings.native_size,
        source="remote",
        modes=list(ALL_MODES),
        remote=True,
        host=settings.host,
    )


# One job's requests


Classifier = Callable[["Call", httpx.Response, Any], "EngineError | None"]
"""A provider's own reading of an error answer (``classify(call, response, body)``): a moderation
refusal, a quota 429; ``None`` leaves it to the common rules."""


class Call:
    """One job's conversation with a provider; made by ``run_job``, one per job.

    ``step``/``total`` are what the watcher reports while the job waits; ``report`` reports
    progress (and a preview) at once and raises ``JobCancelledError`` once cancelled.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: RemoteSettings,
        limit: threading.Semaphore,
        on_step: StepCallback,
        auth_headers: Mapping[str, str],
        classify: Classifier | None,
    ) -> None:
        self.http = http
        self.settings = settings
        self.step = 0
        self.total = 1
        self._limit = limit
        self._on_step = on_step
        self._auth = dict(auth_headers)
        self._classify = classify
        self._deadline = time.monotonic() + settings.deadline_s

    def report(self, step: int | None = None, total: int | None = None, preview: np.ndarray | None = None) -> None:
        if total is not None:
            self.total = max(1, total)
        if step is not None:
            self.step = min(step, self.total)
        self._on_step(self.step, self.total, preview)

    @contextlib.asynccontextmanager
    async def slot(self):
        """Holds one of the provider's ``max_concurrent`` places for one task there. Waiting
        polls a thread semaphore, so jobs on every worker thread share it and a cancel (the
        watcher cancels this task) ends the wait at once."""
        while not self._limit.acquire(blocking=False):
            await asyncio.sleep(_SLOT_POLL_S)
        try:
            yield
        finally:
            self._limit.release()

    def remaining_s(self) -> float:
        return self._deadline - time.monotonic()

    async def request(
        self,
        method: str,
        url: str,
        *,
        stream: bool = False,
        authenticated: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Sends a request, retrying 429s (``Retry-After`` honoured up to
        ``max_retry_after_s``), 5xx answers and failed connections up to ``retries`` times
        with doubling waits, within the job's deadline. ``authenticated=False`` sends no key:
        for URLs the provider hands out (a result's download link).

        Returns:
            The 2xx/3xx response; read already unless ``stream`` (then the caller closes it).

        Raises:
            EngineError: with a ``remote_*``, ``rate_limited``, ``moderated`` or
                ``engine_failed`` code and a message that names the host, never the key.
        """
        settings = self.settings
        host = urlsplit(url).netloc or settings.host
        extra_headers = kwargs.pop("headers", {})
        attempt = 0
        while True:
            headers = {**(self._auth if authenticated else {}), **extra_headers}
            try:
                response = await self.http.send(self.http.build_request(method, url, headers=headers, **kwargs), stream=stream)
            except httpx.TimeoutException as exc:
                # Not retried: the provider may still be working on (and charging for) it.
                raise EngineError(
                    ErrorCode.REMOTE_TIMEOUT,
                    f"{host} did not answer within {settings.request_timeout_s:g} s; try again later",
                ) from exc
            except httpx.TransportError as exc:
                error = EngineError(
                    ErrorCode.REMOTE_UNAVAILABLE, f"cannot reach {host}: check this machine's network connection"
                )
                wait = self._backoff(attempt) if attempt < settings.retries else None
                await self._wait_or_raise(error, wait, f"{type(exc).__name__} from {host}", attempt, exc)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            error, wait = self._failure(response, host, attempt)
            await self._wait_or_raise(error, wait, f"{response.status_code} from {host}", attempt)
            attempt += 1

    async def _wait_or_raise(
        self, error: EngineError, wait: float | None, what: str, attempt: int, cause: BaseException | None = None
    ) -> None:
        if wait is None or wait > self.remaining_s():
            raise error from cause
        logger.info(
            "%s: %s; retrying in %.2f s (retry %d of %d)", self.settings.provider, what, wait, attempt + 1, self.settings.retries
        )
        await asyncio.sleep(wait)

    def _backoff(self, attempt: int) -> float:
        return min(_MAX_BACKOFF_S, self.settings.backoff_s * 2**attempt)

    def _failure(self, response: httpx.Response, host: str, attempt: int) -> tuple[EngineError, float | None]:
        """The error a failed answer means, and how long to wait before a retry (``None``: no
        retry)."""
        settings = self.settings
        status = response.status_code
        body = _json_or_none(response)
        if self._classify is not None:
            error = self._classify(self, response, body)
            if error is not None:
                return error, None
        retries_left = attempt < settings.retries
        if status in (401, 403):
            # Never the provider's message: OpenAI's quotes part of the key back.
            return EngineError(
                ErrorCode.REMOTE_AUTH_FAILED,
                f"{host} refused the {settings.provider} key ({status}): check the key in the server's configuration",
            ), None
        if status == 402:
            return EngineError(
                ErrorCode.REMOTE_QUOTA_EXCEEDED, f"the {settings.provider} account is out of credits ({host} answered 402)"
            ), None
        if status == 429:
            asked = retry_after_s(response)
            wait = self._backoff(attempt) if asked is None else asked
            if asked is not None and asked > settings.max_retry_after_s:
                return EngineError(
                    ErrorCode.RATE_LIMITED, f"{host} is rate limiting this server and asks to wait {asked:.0f} s; try again later"
                ), None
            error = EngineError(ErrorCode.RATE_LIMITED, f"{host} is rate limiting this server; try again in a minute")
            return error, wait if retries_left else None
        if status >= 500:
            asked = retry_after_s(response)
            wait = self._backoff(attempt) if asked is None else min(asked, settings.max_retry_after_s)
            error = EngineError(
                ErrorCode.REMOTE_UNAVAILABLE,
                f"{host} failed ({status}) {attempt + 1} time{'s' if attempt else ''}; try again later",
            )
            return error, wait if retries_left else None
        return EngineError(
            ErrorCode.ENGINE_FAILED,
            f"{settings.provider} refused the request ({status}): {self.provider_message(body, response)}",
        ), None

    def provider_message(self, body: Any, response: httpx.Response | None = None) -> str:
        """A provider's own words about an error, shortened, with the key blanked out."""
        message = None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict):
                message = error.get("message")
            elif isinstance(error, str):
                message = error
            elif "detail" in body:
                message = str(body["detail"])
            elif "message" in body:
                message = str(body["message"])
        if not message and response is not None:
            message = response.text
        return self.redact(str(message or "no details"))

    def redact(self, message: str) -> str:
        key = self.settings.key
        if key is not None and key.reveal():
            message = message.replace(key.reveal(), "***")
        message = " ".join(message.split())
        return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 1] + "…"

    def unexpected(self, what: str) -> EngineError:
        return EngineError(ErrorCode.ENGINE_FAILED, f"{self.settings.host} answered in an unexpected way ({what})")


def retry_after_s(response: httpx.Response) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, or ``Retry-After`` in seconds or as
    an HTTP date (RFC 9110 section 10.2.3); ``None`` when it asks none or cannot be read."""
    millis = response.headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            value = float(millis) / 1000
            if math.isfinite(value) and value >= 0:
                return value
    header = response.headers.get("retry-after")
    if header is None:
        return None
    header = header.strip()
    with contextlib.suppress(ValueError):
        value = float(header)
        return value if math.isfinite(value) and value >= 0 else None
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(header)
        return max(0.0, when.timestamp() - time.time())
    return None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def run_job(
    settings: RemoteSettings,
    limit: threading.Semaphore,
    on_step: StepCallback,
    work: Callable[[Call], Awaitable[list[np.ndarray]]],
    *,
    auth_headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
    classify: Classifier | None = None,
) -> list[np.ndarray]:
    """Runs ``work(call)`` on a private event loop in this thread; blocking.

    Raises:
        JobCancelledError: ``on_step`` raised it; the request in flight was closed.
        EngineError: what ``work`` raised, or ``remote_timeout`` past ``deadline_s``.
    """
    return asyncio.run(_run_job(settings, limit, on_step, work, auth_headers, classify))


async def _run_job(settings, limit, on_step, work, auth_headers, classify) -> list[np.ndarray]:
    if callable(auth_headers):
        auth_headers = await asyncio.to_thread(auth_headers)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=min(10.0, settings.request_timeout_s))
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=settings.trust_env, headers={"User-Agent": USER_AGENT}
    ) as http:
        call = Call(http, settings, limit, on_step, auth_headers, classify)
        main = asyncio.ensure_future(work(call))
        cancelled: list[JobCancelledError] = []

        async def watch() -> None:
            while not main.done():
                await asyncio.sleep(_CANCEL_POLL_S)
                try:
                    call.report()
                except JobCancelledError as exc:
                    cancelled.append(exc)
                    main.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            async with asyncio.timeout(settings.deadline_s):
                return await main
        except asyncio.CancelledError:
            if cancelled:
                raise cancelled[0] from None
            raise
        except TimeoutError as exc:
            raise EngineError(
                ErrorCode.REMOTE_TIMEOUT, f"{settings.host} did not finish within {settings.deadline_s:g} s; try again later"
            ) from exc
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def all_of(coroutines: Iterable[Awaitable[Any]]) -> list[Any]:
    """Runs coroutines side by side (a job's variations); the first to fail cancels the others
    and its error is raised as it is, not inside an ``ExceptionGroup``."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as failed:
        first = failed.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [task.result() for task in tasks]


# Images in and out


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def decode_b64(call: Call, data: Any, size: Size) -> np.ndarray:
    if not isinstance(data, str):
        raise call.unexpected("no image data")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise call.unexpected("image data that is not base64") from None
    return decode_image(call, raw, size)


def decode_image(call: Call, data: bytes, size: Size) -> np.ndarray:
    """A provider's image as ``(size.height, size.width, 3)`` uint8 RGB, resampled where the
    provider answered at another size (its own fixed sizes, multiples of 32...)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > _MAX_RESULT_PIXELS:
                raise call.unexpected(f"a {image.width}x{image.height} image")
            array = np.asarray(image.convert("RGB"))
    except EngineError:
        raise
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise call.unexpected("an image that does not decode") from None
    if array.shape[:2] != (size.height, size.width):
        array = fill.resize(array, size)
    return np.ascontiguousarray(array)


def preview_of(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[:2]
    scale = PREVIEW_SIDE / max(height, width)
    if scale >= 1:
        return array
    return fill.resize(array, Size(max(1, round(width * scale)), max(1, round(height * scale))))


def edit_area(denoise_mask: np.ndarray) -> np.ndarray:
    """Where a provider may change pixels: the denoise mask (the selection grown and
    feathered), binarized, since no provider takes soft masks. ``(H, W)`` bool."""
    return denoise_mask > 0


def size_of(image: np.ndarray) -> Size:
    return Size(image.shape[1], image.shape[0])


def same_origin(url: str, base_url: str, trusted_suffix: str | None = None) -> bool:
    """Whether ``url`` may be sent the key: on ``base_url``'s scheme and host, or on https at
    a host ending in ``trusted_suffix`` (a provider's regional hosts)."""
    parts, base = urlsplit(url), urlsplit(base_url)
    if (parts.scheme, parts.netloc) == (base.scheme, base.netloc):
        return True
    host = parts.hostname or ""
    return trusted_suffix is not None and parts.scheme == "https" and host.endswith(trusted_suffix)
