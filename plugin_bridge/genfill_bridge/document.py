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
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .client import JobEvent, JobResult, ServerConnection, Trace
from .errors import NoSelection
from .frames import GRAY8, RGBA8, encode_frame, frame_image_id, is_all_zero
from .geometry import Box, Size, region_to_send
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
        return PreparedFill(options, options.request(image, None, None), frames, canvas, whole)
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
    return PreparedFill(options, request, frames, canvas, region)


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
