"""Runs one fill at a time for the docker and the menu action, without freezing Krita.

Threading (written down, as genfill's style asks): the bridge's blocking client runs on a
plain worker thread; it touches no Krita or Qt object. Reading the document (``prepare``) and
inserting the layers (``apply``) happen on Krita's main thread. The worker reports through
Qt signals of this ``QObject``, which lives on the main thread, so PyQt queues them across.
We chose this over driving asyncio from a Qt timer: the same blocking client then serves GIMP
(whose plug-ins are their own process and may block), and there is one code path to test.
Cancel sets a ``threading.Event`` the worker polls every 0.1 s. Previews go to the docker
(``preview``) and onto the canvas as a temporary layer (``preview_layer``, see ``preview``),
which goes before anything else when the job ends, however it ends.
"""

from __future__ import annotations

import threading

from PyQt5.QtCore import QObject, pyqtSignal

from .adapter import KritaDocument
from .genfill_bridge import BridgeError, FillOptions, JobCancelled, ServerSettings, apply, prepare, result_warnings, run
from .preview import PreviewLayer
from .staging import Staging, find_layer, record_of


class FillController(QObject):
    """``started``, then ``progress`` and ``status`` while it runs, then ``finished(ok, text)``."""

    started = pyqtSignal()
    progress = pyqtSignal(int, int)
    preview = pyqtSignal(bytes, int, int)
    status = pyqtSignal(str)
    finished = pyqtSignal(bool, str)
    _event = pyqtSignal(object)
    _done = pyqtSignal(object, object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._event.connect(self._on_event)
        self._done.connect(self._on_done)
        self._cancel: threading.Event | None = None
        self._job = None
        self.last_group = None
        self.staging = Staging(self)
        self.preview_layer = PreviewLayer(self)
        self._note = ""

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, document, options: FillOptions, settings: ServerSettings, node=None, replaces=None, above=None) -> bool:
        """Reads the document and starts the job; False (and ``finished``) if it cannot start.

        ``node`` is the layer to read (``None``: the active one); ``replaces`` a result group
        to delete once the new result is in (Regenerate); ``above`` the layer the new group
        goes above (``None``: the active one, or ``node``)."""
        if self.busy:
            self.status.emit("A fill is already running: wait for it or cancel it.")
            return False
        if document is None:
            self.finished.emit(False, "Open an image first.")
            return False
        active = node if node is not None else document.activeNode()
        node, note = _source_layer(document, active, options)
        # On top of what the painter has active, so a fill over an earlier result shows.
        adapter = KritaDocument(document, node, above=above if above is not None else active)
        try:
            prepared = prepare(adapter, options)
        except (BridgeError, ValueError) as exc:
            self.finished.emit(False, str(exc))
            return False
        if options.mode != "expand":  # an expand's new area is off the canvas until the result
            self.preview_layer.begin(document, adapter.above, prepared.region, adapter.selection_pixels(prepared.region))
        self._cancel = threading.Event()
        self._job = (adapter, prepared, replaces)
        self._note = note
        self.started.emit()
        self.status.emit(f"{note} Connecting to the genfill server..." if note else "Connecting to the genfill server...")
        threading.Thread(target=self._work, args=(prepared, settings, self._cancel), name="genfill-fill", daemon=True).start()
        return True

    def cancel(self) -> None:
        if self._cancel is not None and not self._cancel.is_set():
            self._cancel.set()
            self.status.emit("Cancelling...")

    def _work(self, prepared, settings: ServerSettings, cancel: threading.Event) -> None:
        try:
            result = run(prepared, settings, on_event=self._event.emit, cancel=cancel, previews=True)
        except BridgeError as exc:
            self._done.emit(None, exc)
        except Exception as exc:  # noqa: BLE001 - the docker must show something, never hang
            self._done.emit(None, BridgeError(f"Unexpected error in the genfill plug-in: {exc!r}"))
        else:
            self._done.emit(result, None)

    def _on_event(self, event) -> None:
        if event.kind == "accepted":
            ahead = event.queue_position
            self.status.emit("Filling..." if ahead == 0 else f"Waiting: {ahead} job(s) ahead on the server.")
        elif event.kind == "progress":
            self.status.emit("Filling...")
            self.progress.emit(event.step, event.total)
            if event.preview is not None and event.preview_size is not None:
                self.preview.emit(event.preview, *event.preview_size)
                self.preview_layer.update(event.preview, *event.preview_size, event.preview_box)

    def end_preview(self) -> None:
        """Takes the preview layer away (the docker calls it when it is closed)."""
        self.preview_layer.remove()

    def _on_done(self, result, error) -> None:
        self.preview_layer.remove()  # first: the layer list is then as it was, plus the result
        adapter, prepared, replaces = self._job
        self._job = None
        self._cancel = None
        if error is not None:
            self.finished.emit(False, "Cancelled." if isinstance(error, JobCancelled) else str(error))
            return
        try:
            name = apply(adapter, prepared, result)
        except Exception as exc:  # noqa: BLE001 - e.g. the document was closed meanwhile
            self.finished.emit(False, f"The fill finished but its layers could not be added: {exc}")
            return
        self.last_group = adapter.inserted_group
        if replaces is not None:
            replaces.remove()
        try:
            self.staging.stage(adapter, prepared, result)
        except Exception as exc:  # noqa: BLE001 - the layers are in; say what is missing
            self.status.emit(f"The layers are in, but their parameters could not be kept: {exc}")
        count = len(result.variations)
        shown = " Variation 1 is shown; the others are hidden in the group." if count > 1 else ""
        text = f"Added {count} layer(s) in group '{name}' ({result.seconds:.1f} s).{shown}"
        self.finished.emit(True, " ".join([*result_warnings(result), text, *([self._note] if self._note else [])]))


def _source_layer(document, node, options):
    """The layer to read: ``node``, except that a result of an earlier fill (its group or a
    variation, as Krita leaves active after the fill) stands for the layer that fill read.
    A result group alone holds only the filled patch: read as it is, the engine would see
    transparent surroundings and paint black. Returns ``(node, note for the status line)``."""
    if options.source != "layer" or node is None:
        return node, ""
    record = record_of(document, node)
    if record is None or not record.source_layer:
        return node, ""
    source = find_layer(document, record.source_layer)
    if source is None or source.uniqueId() == node.uniqueId():
        return node, ""
    return source, f"Read the layer '{source.name()}', which the fill '{node.name()}' was made from."
