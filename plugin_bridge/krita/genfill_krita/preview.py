"""The temporary "genfill preview" layer: while a job runs, the engine's latest preview on the
canvas, where the result will land. Main thread only.

- Where: the preview covers the engine's context box (``genfill_bridge.preview_box``: the box
  the server crops, computed from the selection, the region sent and the engine's native
  size), scaled up to it, and masked by the selection as it was when Fill was pressed, so it
  shows what the result layers will replace and the untouched image around it stays as it
  is. The result's own box (the selection's) is only known with the result, and previews
  picture the whole context box, so that box is the one they map onto exactly.
- Which layer: a paint layer named ``PREVIEW_LAYER_NAME`` right above the layer the result
  group goes above, so it shows over the source layer.
- How often: at most one repaint every ``REPAINT_INTERVAL_MS``; a preview that comes sooner
  waits, and only the newest waiting one is painted.
- Gone: ``remove`` runs when the job ends (result, error, cancel) and when the docker is
  closed. Krita's scripting API has no way to add or remove a layer outside the undo
  history, so the layer's arrival and removal are two undo steps ("Add Layer", "Remove
  Layer") below the result. Before removing it the layer is emptied and hidden: undoing
  past the result brings back an empty, hidden layer, never a stale preview. There is no
  hook before Krita saves: a save while a job runs keeps the preview in that file (the next
  save, after the job, does not).
- Expand: the new area is outside the canvas until the result grows it, so previews of an
  expand show in the docker only.
"""

from __future__ import annotations

import time

from PyQt5.QtCore import QObject, QRect, Qt, QTimer, pyqtSignal
from PyQt5.QtGui import QImage, QPainter

PREVIEW_LAYER_NAME = "genfill preview"
REPAINT_INTERVAL_MS = 250


class PreviewLayer(QObject):
    """``shown`` fires after the layer shows a new preview."""

    shown = pyqtSignal()

    def __init__(self, parent=None, interval_ms: int = REPAINT_INTERVAL_MS) -> None:
        super().__init__(parent)
        self.interval_ms = interval_ms
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._paint)
        self._reset()

    def _reset(self) -> None:
        self.document = None
        self.node = None
        self.box = None
        self.repaints = 0
        self._above = None
        self._mask = None
        self._region = None
        self._pending = None
        self._last = 0.0

    @property
    def active(self) -> bool:
        return self.node is not None

    def begin(self, document, above, region, selection: bytes) -> None:
        """Previews of the next job go into ``document`` above ``above``; ``selection`` is
        the selection's bytes (1 a pixel) over ``region``, the box the bridge sent."""
        self.remove()
        self.document = document
        self._above = above
        self._region = region
        self._mask = QImage(selection, region.width, region.height, region.width, QImage.Format_Alpha8).copy()

    def update(self, rgba: bytes, width: int, height: int, box) -> None:
        """Shows this preview (``width`` x ``height`` RGBA) scaled to ``box``, now or, if the
        last repaint was less than ``interval_ms`` ago, when that time is up."""
        if self.document is None or box is None or width <= 0 or height <= 0:
            return
        self._pending = (rgba, width, height, box)
        if self._timer.isActive():
            return
        wait_ms = int(self.interval_ms - (time.monotonic() - self._last) * 1000)
        if wait_ms <= 0:
            self._paint()
        else:
            self._timer.start(wait_ms)

    def _paint(self) -> None:
        if self._pending is None or self.document is None:
            return
        rgba, width, height, box = self._pending
        self._pending = None
        bgra = self._pixels(rgba, width, height, box)
        if self.node is not None and tuple(box) != tuple(self.box):
            self._clear()
        if self.node is None:
            document = self.document
            node = document.createNode(PREVIEW_LAYER_NAME, "paintlayer")
            node.setPixelData(bgra, box.x, box.y, box.width, box.height)
            above = self._above
            placed = above is not None and above.parentNode() is not None
            active = document.activeNode()
            (above.parentNode() if placed else document.rootNode()).addChildNode(node, above if placed else None)
            self.node = node
            # Krita makes a new layer the active one once its layer model catches up (in the
            # main loop): a stroke painted during the job would land on the preview. Give the
            # painter's layer back, now and after that.
            if active is not None:
                self._keep_active(document, active)
                for delay_ms in (0, 100):
                    QTimer.singleShot(delay_ms, lambda: self._keep_active(document, active))
        else:
            self.node.setPixelData(bgra, box.x, box.y, box.width, box.height)
        self.box = box
        self.document.refreshProjection()
        self._last = time.monotonic()
        self.repaints += 1
        self.shown.emit()

    def _keep_active(self, document, active) -> None:
        if self.document is not document or self.node is None:
            return
        current = document.activeNode()
        if current is None or current.uniqueId() == self.node.uniqueId():
            document.setActiveNode(active)

    def _pixels(self, rgba: bytes, width: int, height: int, box) -> bytes:
        """The preview scaled to ``box``, masked by the selection, as Krita's B, G, R, A."""
        image = QImage(rgba, width, height, width * 4, QImage.Format_RGBA8888)
        image = image.scaled(box.width, box.height, Qt.IgnoreAspectRatio, Qt.SmoothTransformation)
        image = image.convertToFormat(QImage.Format_ARGB32_Premultiplied)
        region = self._region
        mask = self._mask.copy(QRect(box.x - region.x, box.y - region.y, box.width, box.height))
        painter = QPainter(image)
        painter.setCompositionMode(QPainter.CompositionMode_DestinationIn)
        painter.drawImage(0, 0, mask)
        painter.end()
        # ARGB32 is B, G, R, A in memory on little-endian machines (all Krita runs on); each
        # row is width * 4 bytes, no padding.
        image = image.convertToFormat(QImage.Format_ARGB32)
        bits = image.constBits()
        bits.setsize(image.byteCount())
        return bytes(bits)

    def _clear(self) -> None:
        """Empties and hides the layer, then takes it out of the document."""
        node, box = self.node, self.box
        self.node = None
        if node is None:
            return
        try:
            if box is not None:
                node.setPixelData(bytes(box.width * box.height * 4), box.x, box.y, box.width, box.height)
            node.setVisible(False)
            node.remove()
            self.document.waitForDone()
            self.document.refreshProjection()
        except Exception:  # noqa: BLE001 - the document may be closed: its layers went with it
            pass

    def remove(self) -> None:
        """Ends the preview: no layer left behind, nothing waiting to be painted."""
        self._timer.stop()
        self._clear()
        self._reset()
