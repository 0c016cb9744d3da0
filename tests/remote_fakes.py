"""Local fakes of the cloud providers' public HTTP APIs, for the remote engine tests.

Each fake is a threaded ``http.server`` on 127.0.0.1 port 0, written from the providers'
public API shapes (OpenAI ``/v1/images/edits``, Black Forest Labs ``/v1/flux-pro-1.0-fill``,
``-expand`` and ``get_result``, Vertex AI Imagen ``:predict``). It checks what a real service
checks (key, field names, image and mask sizes), records every request, and answers with
images, partial-image streams, polling sequences, or whatever a test queued in ``script``.
Nothing here reaches the network; every wait is bounded.

Answers the fakes paint: the edit area as the provider saw it in the mask, in ``FAKE_COLOUR``,
the rest of the image unchanged, so a test can tell the mask's polarity from the answer too.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

FAKE_COLOUR = (40, 200, 90)
WAIT_BOUND_S = 20.0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    file_names: list[str] = field(default_factory=list)

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | list | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunks: Iterable[bytes] | None = None
    """Written one by one with a flush between: a server-sent event stream."""
    delay_s: float = 0.0
    hold: threading.Event | None = None
    """Waits (bounded) for this event before answering: a slow provider."""


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image).copy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def painted(image: np.ndarray, edit: np.ndarray) -> np.ndarray:
    out = image[..., :3].copy()
    out[edit] = FAKE_COLOUR
    return out


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: connecting is refused (network down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeProvider:
    """The HTTP server; ``answer(request)`` is the provider's behaviour, ``script`` queues
    replies that take precedence, one a request, for the paths they match."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.script: deque[tuple[str, Reply]] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed_early = 0
        self._epoch = 0
        self._lock = threading.Lock()
        self.holds: list[threading.Event] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self)

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        for hold in self.holds:
            hold.set()
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.script.clear()
            self.max_in_flight = 0
            self.closed_early = 0
            # Requests of earlier tests still being answered no longer count.
            self.in_flight = 0
            self._epoch += 1

    def queue(self, path_part: str, *replies: Reply) -> None:
        for reply in replies:
            self.script.append((path_part, reply))

    def hold(self) -> threading.Event:
        event = threading.Event()
        self.holds.append(event)
        return event

    def answer(self, request: Request) -> Reply:  # pragma: no cover - overridden
        return Reply(404, {"error": "not found"})

    def _scripted(self, request: Request) -> Reply | None:
        with self._lock:
            for index, (part, reply) in enumerate(self.script):
                if part in request.path:
                    del self.script[index]
                    return reply
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = Request(
            handler.command, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in handler.headers.items()}, body
        )
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if part.get_filename() is not None:
                    request.files[name] = payload
                    request.file_names.append(name)
                else:
                    request.fields[name] = payload.decode()
        with self._lock:
            epoch = self._epoch
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self._scripted(request) or self.answer(request)
            if reply.hold is not None and not self._wait_unless_closed(handler, reply.hold):
                with self._lock:
                    self.closed_early += 1
                return
            if reply.delay_s:
                time.sleep(reply.delay_s)
            self._write(handler, reply)
        except (BrokenPipeError, ConnectionResetError):
            with self._lock:
                self.closed_early += 1
        finally:
            with self._lock:
                if epoch == self._epoch:
                    self.in_flight -= 1

    @staticmethod
    def _wait_unless_closed(handler: BaseHTTPRequestHandler, hold: threading.Event) -> bool:
        """Waits for ``hold``; ``False`` as soon as the client closes the connection instead."""
        connection = handler.connection
        deadline = time.monotonic() + WAIT_BOUND_S
        while not hold.wait(0.02):
            if time.monotonic() > deadline:
                return True
            readable, _, _ = select.select([connection], [], [], 0)
            if readable:
                try:
                    if connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
        return True

    @staticmethod
    def _write(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        body = reply.body
        content_type = "application/json"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, bytes) and body.startswith(b"\x89PNG"):
            content_type = "image/png"
        handler.send_response(reply.status)
        headers = {"Content-Type": content_type, **reply.headers}
        if reply.chunks is not None:
            headers["Content-Type"] = "text/event-stream"
        for name, value in headers.items():
            handler.send_header(name, value)
        if reply.chunks is None:
            handler.send_header("Content-Length", str(len(body or b"")))
        handler.end_headers()
        if reply.chunks is not None:
            for chunk in reply.chunks:
                handler.wfile.write(chunk)
                handler.wfile.flush()
        elif body:
            handler.wfile.write(body)


def error(status: int, message: str = "error", code: str | None = None, **headers: str) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, headers)


# OpenAI


class FakeOpenAI(FakeProvider):
    """``POST /v1/images/edits``, as https://platform.openai.com/docs/api-reference/images/createEdit."""

    SIZES = frozenset({"1024x1024", "1536x1024", "1024x1536", "auto"})

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.partial_delay_s = 0.0

    def answer(self, request: Request) -> Reply:
        if request.path != "/v1/images/edits" or request.method != "POST":
            return error(404, "unknown path")
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return error(401, f"Incorrect API key provided: {request.headers.get('authorization', '')[7:12]}***", "invalid_api_key")
        fields, files = request.fields, request.files
        for name in ("prompt",):
            if not fields.get(name):
                return error(400, f"Missing required parameter: '{name}'.")
        images = [files[name] for name in request.file_names if name in ("image", "image[]")]
        if not images:
            return error(400, "Missing required parameter: 'image'.")
        if fields.get("size", "auto") not in self.SIZES:
            return error(400, f"Invalid size {fields['size']!r}")
        image = decode_png(images[0])
        edit = np.zeros(image.shape[:2], bool)
        if "mask" in files:
            mask = decode_png(files["mask"])
            if mask.ndim != 3 or mask.shape[2] != 4 or mask.shape[:2] != image.shape[:2]:
                return error(400, "Invalid mask image format - mask must be a PNG with an alpha channel, the size of the image")
            edit = mask[..., 3] == 0
        if fields.get("size", "auto") != "auto":
            width, height = (int(v) for v in fields["size"].split("x"))
            if (width, height) != (image.shape[1], image.shape[0]):
                return error(400, "image and size differ")
        n = int(fields.get("n", "1"))
        result = png(painted(image, edit))
        if fields.get("stream") == "true":
            partials = int(fields.get("partial_images", "0"))

            def events():
                for index in range(partials):
                    if self.partial_delay_s:
                        time.sleep(self.partial_delay_s)
                    yield _sse("image_edit.partial_image", {
                        "type": "image_edit.partial_image", "b64_json": b64(png(image[..., :3])),
                        "partial_image_index": index, "size": fields.get("size"), "quality": "high",
                        "background": "opaque", "output_format": "png", "created_at": int(time.time()),
                    })
                yield _sse("image_edit.completed", {
                    "type": "image_edit.completed", "b64_json": b64(result), "size": fields.get("size"),
                    "quality": "high", "background": "opaque", "output_format": "png", "created_at": int(time.time()),
                    "usage": {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50},
                })

            return Reply(200, chunks=events())
        return Reply(200, {"created": int(time.time()), "data": [{"b64_json": b64(result)} for _ in range(n)]})


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def openai_sse(*events: tuple[str, dict]) -> Reply:
    return Reply(200, chunks=[_sse(name, data) for name, data in events])


# Black Forest Labs


class FakeBFL(FakeProvider):
    """``POST /v1/flux-pro-1.0-fill`` and ``-expand``, ``GET /v1/get_result?id=``, and the
    signed delivery URL of ``result.sample``, as https://docs.bfl.ai."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.pending_polls = 2
        self.tasks: dict[str, dict] = {}
        self.final_status = "Ready"
        self.polling_host: str | None = None
        self.active = 0
        self.max_active = 0
        """Tasks made and not yet finished: what BFL's "active tasks" limit counts."""
        self._ids = itertools.count()

    def reset(self) -> None:
        super().reset()
        self.tasks.clear()
        self.pending_polls = 2
        self.final_status = "Ready"
        self.polling_host = None
        self.active = self.max_active = 0

    def answer(self, request: Request) -> Reply:
        path = request.path
        if path.startswith("/delivery/"):
            task = self.tasks.get(path.rsplit("/", 1)[1].removesuffix(".png"))
            return Reply(200, task["png"]) if task else Reply(404, {"detail": "Not Found"})
        if request.headers.get("x-key") != self.key:
            return Reply(403, {"detail": "Not authenticated - Invalid Authentication"})
        if path in ("/v1/flux-pro-1.0-fill", "/v1/flux-pro-1.0-expand") and request.method == "POST":
            body = request.json()
            if "image" not in body:
                return Reply(422, {"detail": [{"loc": ["body", "image"], "msg": "Field required", "type": "missing"}]})
            image = decode_png(base64.b64decode(body["image"], validate=True))
            if path.endswith("fill"):
                edit = np.zeros(image.shape[:2], bool)
                if "mask" in body:
                    mask = decode_png(base64.b64decode(body["mask"], validate=True))
                    if mask.shape[:2] != image.shape[:2]:
                        return Reply(422, {"detail": "mask and image differ in size"})
                    edit = (mask if mask.ndim == 2 else mask[..., 0]) >= 128
                out = painted(image, edit)
            else:
                top, bottom, left, right = (int(body.get(k, 0)) for k in ("top", "bottom", "left", "right"))
                out = np.empty((image.shape[0] + top + bottom, image.shape[1] + left + right, 3), np.uint8)
                out[:] = FAKE_COLOUR
                out[top : top + image.shape[0], left : left + image.shape[1]] = image[..., :3]
            with self._lock:  # submits arrive side by side
                task_id = f"task-{next(self._ids)}"
                self.tasks[task_id] = {"polls": 0, "png": png(out), "body": body, "path": path}
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            host = self.polling_host or self.url
            return Reply(200, {"id": task_id, "polling_url": f"{host}/v1/get_result?id={task_id}"})
        if path == "/v1/get_result":
            task = self.tasks.get((request.query.get("id") or [""])[0])
            if task is None:
                return Reply(200, {"id": None, "status": "Task not found", "result": None})
            with self._lock:
                task["polls"] += 1
                polls = task["polls"]
                if polls == self.pending_polls + 1:
                    self.active -= 1
            if polls <= self.pending_polls:
                return Reply(200, {"id": "x", "status": "Pending", "result": None, "progress": task["polls"] / (self.pending_polls + 1)})
            if self.final_status != "Ready":
                return Reply(200, {"id": "x", "status": self.final_status, "result": None, "details": {"reason": "because"}})
            task_id = request.query["id"][0]
            sample = f"{self.url}/delivery/{task_id}.png"
            return Reply(200, {"id": task_id, "status": "Ready", "result": {"sample": sample, "seed": task["body"].get("seed")}})
        return Reply(404, {"detail": "Not Found"})


# Google Vertex AI Imagen


class FakeImagen(FakeProvider):
    """``POST /v1/projects/P/locations/L/publishers/google/models/M:predict``, as
    https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/imagen-api-edit."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.filtered = 0
        """Images the safety filter removes from every answer..."""
        self.filter_plan: deque[int] = deque()
        """...or from the next answers, one number an answer, while any are left."""

    def answer(self, request: Request) -> Reply:
        if not (request.path.startswith("/v1/projects/") and request.path.endswith(":predict")):
            return Reply(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
        if request.headers.get("authorization") != f"Bearer {self.token}":
            message = "Request had invalid authentication credentials."
            return Reply(401, {"error": {"code": 401, "message": message, "status": "UNAUTHENTICATED"}})
        body = request.json()
        try:
            instance = body["instances"][0]
            references = {ref["referenceType"]: ref for ref in instance["referenceImages"]}
            raw = decode_png(base64.b64decode(references["REFERENCE_TYPE_RAW"]["referenceImage"]["bytesBase64Encoded"], validate=True))
            mask_ref = references["REFERENCE_TYPE_MASK"]
            assert mask_ref["maskImageConfig"]["maskMode"] == "MASK_MODE_USER_PROVIDED"
            mask = decode_png(base64.b64decode(mask_ref["referenceImage"]["bytesBase64Encoded"], validate=True))
            parameters = body["parameters"]
            count = int(parameters.get("sampleCount", 4))
            assert parameters["editMode"] in ("EDIT_MODE_INPAINT_INSERTION", "EDIT_MODE_INPAINT_REMOVAL", "EDIT_MODE_OUTPAINT")
        except (KeyError, AssertionError, ValueError, TypeError) as exc:
            return Reply(400, {"error": {"code": 400, "message": f"Invalid request: {exc!r}", "status": "INVALID_ARGUMENT"}})
        if mask.shape[:2] != raw.shape[:2]:
            return Reply(400, {"error": {"code": 400, "message": "mask size differs", "status": "INVALID_ARGUMENT"}})
        edit = (mask if mask.ndim == 2 else mask[..., 0]) != 0
        out = b64(png(painted(raw, edit)))
        filtered = self.filter_plan.popleft() if self.filter_plan else self.filtered
        kept = max(0, count - filtered)
        predictions = [{"bytesBase64Encoded": out, "mimeType": "image/png"} for _ in range(kept)]
        return Reply(200, {"predictions": predictions} if predictions else {})


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


# Running an engine through the real fill pipeline, without a server


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGBA gradient with noise: every pixel differs from its neighbours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=2)
    rgb = np.clip(base + rng.integers(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
    return np.dstack([rgb, np.full((height, width), 255, np.uint8)])


def selection_of(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    selection = np.zeros((height, width), np.uint8)
    selection[y : y + h, x : x + w] = 255
    return selection


def run_engine(engine, *, size=(96, 80), box=(30, 20, 24, 18), variations=1, on_step=None, **request):
    """Runs ``engine`` on a photo through ``pipeline.run_fill``; returns the result, the canvas
    and the selection."""
    from genfill.protocol import FillRequest
    from genfill_server.pipeline import prepare_canvas, run_fill

    width, height = size
    canvas = photo(width, height)
    selection = selection_of(width, height, box)
    fill_request = FillRequest(image="a" * 64, mask="b" * 64, variations=variations, **request)
    canvas, selection = prepare_canvas(fill_request, canvas, selection)
    seeds = list(range(7, 7 + variations))
    result = run_fill(engine, fill_request, canvas, selection, seeds, on_step or (lambda *args: None))
    return result, canvas, selection


def assert_outside_unchanged(result, canvas: np.ndarray, selection: np.ndarray) -> None:
    """Every layer is transparent outside the selection, so the composite keeps the canvas
    there bit for bit."""
    from genfill import fill

    for layer in result.layers:
        composite = fill.composite(canvas, layer, result.box)
        outside = selection == 0
        np.testing.assert_array_equal(composite[outside], canvas[outside])


# A real server with all three cloud providers on, for the editor tests


CLOUD_MODELS = {"openai": "gpt-image-1", "bfl": "flux-pro-1.0-fill", "imagen": "imagen-3.0-capability-001"}


def provider_engines(module, key: str, **table):
    """The engines of a server with classic and one cloud provider (``module``: one of
    ``engines.remote.openai``, ``bfl``, ``imagen``), its key read from an environment variable
    as a user's would be; ``table`` is the provider's settings."""
    from genfill_server.engines import default_engines, providers

    name = module.NAME
    variable = f"GENFILL_TEST_{name.upper()}_KEY"
    os.environ[variable] = key
    try:
        return default_engines(
            hf_cache=False,
            providers={"classic": providers.classic, name: module.provide},
            remote={name: {"api_key_env": variable, **table}},
        )
    finally:
        del os.environ[variable]


@contextlib.contextmanager
def cloud_server(keys: dict[str, str]):
    """A ``BackgroundServer`` whose cloud engines (``openai``, ``bfl``, ``imagen``) each talk
    to their fake; yields ``(server, {provider: fake})``. ``keys``: each provider's key."""
    from genfill_server.app import ServerConfig
    from genfill_server.background import BackgroundServer
    from genfill_server.engines import default_engines, providers
    from genfill_server.engines.remote import bfl, imagen, openai

    fast = {"retries": 1, "backoff_s": 0.01, "request_timeout_s": 10.0, "deadline_s": 60.0, "native_size": 256}
    with FakeOpenAI(keys["openai"]) as fake_openai, FakeBFL(keys["bfl"]) as fake_bfl, \
            FakeImagen(keys["imagen"]) as fake_imagen:
        fake_bfl.pending_polls = 1
        fakes = {"openai": fake_openai, "bfl": fake_bfl, "imagen": fake_imagen}
        variables = {name: f"GENFILL_TEST_{name.upper()}_KEY" for name in fakes}
        os.environ.update({variables[name]: keys[name] for name in fakes})
        try:
            engines = default_engines(
                hf_cache=False,
                providers={"classic": providers.classic, "openai": openai.provide, "bfl": bfl.provide,
                           "imagen": imagen.provide},
                remote={
                    "openai": {"base_url": fake_openai.url, "api_key_env": variables["openai"], **fast},
                    "bfl": {"base_url": fake_bfl.url, "api_key_env": variables["bfl"], "poll_interval_s": 0.01, **fast},
                    "imagen": {"base_url": fake_imagen.url, "api_key_env": variables["imagen"], "project": "studio-42",
                               **fast},
                },
            )
        finally:
            for variable in variables.values():
                del os.environ[variable]
        with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
            yield running, fakes
