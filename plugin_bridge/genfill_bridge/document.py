"""The editor-facing side of the bridge: a ``Document`` the adapters implement, and the three
steps every plug-in runs.

1. ``prepare(document, options)`` reads the selection and pixels (on the editor's main thread:
   editor APIs are not thread-safe) and decides what to send.
2. ``run(prepared, settings, ...)`` talks to the server; it touches no editor API, so Krita runs
   it on a worker thread and GIMP on its main thread.
3. ``apply(document, prepared, result)`` hands the variations back to the editor (main thread).

Coordinates are canvas pixels, origin top-left. Pixels are ``bytes``: RGBA (``R, G, B, A``,
8 bits each, not premultiplied) or gray (1 byte), rows top to bottom, no padding.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .client import JobEvent, JobResult, ServerConnection, Trace
from .errors import NoSelection
from .frames import GRAY8, RGBA8, encode_frame, frame_image_id, is_all_zero
from .geometry import Box, Size, context_box, region_to_send
from .messages import FillOptions, Margins
from .settings import ServerSettings


class Document(abc.ABC):
    """What the bridge needs from an editor's open image."""

    @abc.abstractmethod
    def size(self) -> Size:
        """The canvas size in pixels."""

    @abc.abstractmethod
    def check_supported(self) -> None:
        """Raises ``UnsupportedDocument`` (with what to do) when the colour model or depth
        cannot be sent as 8-bit RGBA and results cannot be pasted back."""

    @abc.abstractmethod
    def selection_bounds(self) -> Box | None:
        """The selection's bounding box clipped to the canvas; ``None`` when nothing is selected."""

    @abc.abstractmethod
    def selection_pixels(self, box: Box) -> bytes:
        """The selection inside ``box``: 1 byte a pixel, 0 unselected .. 255 fully selected."""

    @abc.abstractmethod
    def pixels(self, box: Box, source: str) -> bytes:
        """RGBA bytes of ``box``: of the active layer (``source="layer"``) or of the visible
        image (``"visible"``). Outside the layer's content pixels are transparent."""

    @abc.abstractmethod
    def insert_results(self, name: str, box: Box, layers: list[bytes], grow: Margins | None) -> None:
        """Adds one layer per variation at ``box``, first visible and the others hidden, as
        one undoable step named ``name``. With ``grow``, first grows the canvas by those
        margins (the old origin moves to ``(grow.left, grow.top)``); ``box`` is in the grown
        canvas."""


@dataclass(frozen=True)
class PreparedFill:
    """What ``run`` sends: the request and its frames, plus what ``apply`` needs."""

    options: FillOptions
    request: dict
    frames: dict[str, bytes]
    canvas: Size
    region: Box
    mask_box: Box | None = None
    """The selection's box (for expand: the new area's, on the grown canvas)."""

    @property
    def result_canvas(self) -> Size:
        margins = self.options.expand
        return Size(self.canvas.width + margins.left + margins.right, self.canvas.height + margins.top + margins.bottom)

    @property
    def upload_bytes(self) -> int:
        return sum(len(frame) for frame in self.frames.values())


def prepare(document: Document, options: FillOptions) -> PreparedFill:
    """Reads what the fill needs from the document.

    For ``fill``, ``add`` and ``remove`` only the region around the selection is read and sent
    (see ``geometry.region_to_send``); for ``expand`` the whole canvas.

    Raises:
        UnsupportedDocument: from ``document.check_supported``.
        NoSelection: nothing is selected (not for ``expand``).
    """
    document.check_supported()
    canvas = document.size()
    whole = Box(0, 0, canvas.width, canvas.height)
    frames: dict[str, bytes] = {}
    if options.mode == "expand":
        image = _add(frames, RGBA8, whole, document.pixels(whole, options.source))
        return PreparedFill(options, options.request(image, None, None), frames, canvas, whole,
                            _new_area(canvas, options.expand))
    bounds = document.selection_bounds()
    if bounds is None or bounds.width <= 0 or bounds.height <= 0:
        raise NoSelection(_NO_SELECTION)
    region = region_to_send(bounds, canvas)
    selection = document.selection_pixels(region)
    if is_all_zero(selection):
        raise NoSelection(_NO_SELECTION)
    image = _add(frames, RGBA8, region, document.pixels(region, options.source))
    mask = _add(frames, GRAY8, region, selection)
    request = options.request(image, mask, None if region == whole else tuple(region))
    return PreparedFill(options, request, frames, canvas, region, bounds)


def preview_box(prepared: PreparedFill, native_size: int | None) -> Box | None:
    """The box on the canvas as it is now (before an expand grows it) that the engine's
    previews show: the engine's context box, computed as the server does (``context_box``
    of the selection inside the region sent, at the engine's native size). Previews cover
    that whole box, scaled down, not just the selection: the result box (the selection's)
    is only known once the result is in. ``None`` without a selection box."""
    mask = prepared.mask_box
    if mask is None:
        return None
    if prepared.options.mode == "expand":
        grown = prepared.result_canvas
        box = context_box(mask, grown, native_size=native_size)
        margins = prepared.options.expand
        return Box(box.x - margins.left, box.y - margins.top, box.width, box.height)
    region = prepared.region
    local = Box(mask.x - region.x, mask.y - region.y, mask.width, mask.height)
    box = context_box(local, region.size, native_size=native_size)
    return Box(box.x + region.x, box.y + region.y, box.width, box.height)


def native_size_for(hello: dict, request: dict) -> int | None:
    """The native size the server's engine works at for ``request``, from its hello: the
    named model's, else the engine's (the named one, the model's, or the default)."""
    models = {model.get("name"): model for model in hello.get("models") or [] if isinstance(model, dict)}
    model = models.get(request.get("model"))
    if model is not None and isinstance(model.get("native_size"), int):
        return model["native_size"]
    name = request.get("engine") or (model or {}).get("engine") or hello.get("default_engine")
    for engine in hello.get("engines") or []:
        if isinstance(engine, dict) and engine.get("name") == name:
            size = (engine.get("capabilities") or {}).get("native_size")
            return size if isinstance(size, int) else None
    return None


def _new_area(canvas: Size, margins: Margins) -> Box | None:
    """The bounding box of the bands an expand adds, on the grown canvas; ``None`` for none."""
    left, right, top, bottom = margins.left, margins.right, margins.top, margins.bottom
    if not (left or right or top or bottom):
        return None
    width, height = canvas.width + left + right, canvas.height + top + bottom
    x0 = 0 if (left or top or bottom) else left + canvas.width
    x1 = width if (right or top or bottom) else left
    y0 = 0 if (top or left or right) else top + canvas.height
    y1 = height if (bottom or left or right) else top
    return Box(x0, y0, x1 - x0, y1 - y0)


def run(
    prepared: PreparedFill,
    settings: ServerSettings,
    *,
    on_event: Callable[[JobEvent], None] | None = None,
    cancel: threading.Event | None = None,
    trace: Trace | None = None,
    previews: bool = False,
) -> JobResult:
    """Connects, runs the job, disconnects. Safe on any thread; see ``client`` for cancel.
    With ``previews``, progress events carry the engine's preview images where it makes them.

    Raises:
        ServerNotRunning, TokenRejected, ConnectionLost, ProtocolMismatch, JobFailed, JobCancelled.
    """
    with ServerConnection.from_settings(settings, trace=trace) as connection:
        if previews and on_event is not None:
            box = preview_box(prepared, native_size_for(connection.hello, prepared.request))
            forward = on_event

            def on_event(event: JobEvent) -> None:
                forward(dataclasses.replace(event, preview_box=box) if event.preview is not None else event)

        return connection.run(
            prepared.frames, prepared.request, canvas=prepared.result_canvas, on_event=on_event, cancel=cancel,
            previews=previews,
        )


def apply(document: Document, prepared: PreparedFill, result: JobResult) -> str:
    """Inserts the variations into the document and returns the group's name."""
    name = group_name(prepared.options)
    grow = prepared.options.expand if prepared.options.mode == "expand" else None
    document.insert_results(name, result.box, [variation.rgba for variation in result.variations], grow)
    return name


def result_warnings(result: JobResult) -> list[str]:
    """What the server says it could not honour (the classic engine ignores the prompt), as
    sentences to show next to the result; ``[]`` when it says nothing."""
    return [_sentence(text) for text in result.warnings if text.strip()]


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def group_name(options: FillOptions) -> str:
    """The layer group's name: the prompt, shortened, or the mode when there is none."""
    prompt = " ".join(options.prompt.split())
    if not prompt:
        return f"genfill {options.mode}"
    return prompt if len(prompt) <= 60 else prompt[:59] + "…"


def _add(frames: dict[str, bytes], fmt: str, box: Box, payload: bytes) -> str:
    frame = encode_frame(fmt, box.width, box.height, payload)
    image_id = frame_image_id(frame)
    frames[image_id] = frame
    return image_id


_NO_SELECTION = "Nothing is selected: select the area to fill first, then press Fill."
