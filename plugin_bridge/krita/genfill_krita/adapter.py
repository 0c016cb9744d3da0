"""Krita's side of the bridge's ``Document``: a Krita ``Document`` read and written through
the libkis Python API. Call it on Krita's main thread only.

Byte layouts (Krita 5, RGBA/U8): ``Node.pixelData`` and ``Document.pixelData`` give B, G, R, A
per pixel; ``Selection.pixelData`` gives 1 byte a pixel. Other depths (U16, F16, F32) and
models (GRAYA, CMYKA, LABA, XYZA) have other layouts; this adapter refuses them with a message
saying how to convert, rather than guessing.
"""

from __future__ import annotations

from krita import Krita

from .genfill_bridge import Box, Document, DocumentError, Margins, Size, UnsupportedDocument
from .genfill_bridge.frames import swap_red_blue

_PAINTABLE = ("paintlayer", "grouplayer", "filelayer", "filterlayer", "filllayer", "clonelayer", "vectorlayer")


class KritaDocument(Document):
    """Wraps a Krita document and the layer to read (``None``: the active layer); the result
    group goes above ``above`` (``None``: above the layer read)."""

    def __init__(self, document, node=None, above=None) -> None:
        self.document = document
        self.node = node if node is not None else document.activeNode()
        self.above = above if above is not None else self.node
        self.inserted_group = None

    def size(self) -> Size:
        return Size(self.document.width(), self.document.height())

    def check_supported(self) -> None:
        for what, item in (("This document", self.document), ("The active layer", self.node)):
            if item is None:
                continue
            model, depth = item.colorModel(), item.colorDepth()
            if (model, depth) != ("RGBA", "U8"):
                raise UnsupportedDocument(
                    f"{what} is {_describe(model, depth)}; genfill works on 8-bit RGBA. Convert it with "
                    "Image > Convert Image Color Space (RGB/Alpha, 8-bit integer/channel), fill, and "
                    "convert back if you need to."
                )

    def selection_bounds(self) -> Box | None:
        selection = self.document.selection()
        if selection is None or selection.width() <= 0 or selection.height() <= 0:
            return None
        x0, y0 = max(selection.x(), 0), max(selection.y(), 0)
        x1 = min(selection.x() + selection.width(), self.document.width())
        y1 = min(selection.y() + selection.height(), self.document.height())
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1 - x0, y1 - y0)

    def selection_pixels(self, box: Box) -> bytes:
        selection = self.document.selection()
        return bytes(selection.pixelData(box.x, box.y, box.width, box.height))

    def pixels(self, box: Box, source: str) -> bytes:
        self.document.waitForDone()
        expected = box.width * box.height * 4
        if source == "visible" or self.node is None or self.node.type() not in _PAINTABLE:
            self.document.refreshProjection()
            data = bytes(self.document.pixelData(box.x, box.y, box.width, box.height))
        else:
            node = self.node
            # A group (like the one the last fill added), a file or a filter layer has no
            # pixels of its own: Node.pixelData answers b"", its projection holds what it shows.
            data = b"" if node.type() == "grouplayer" else bytes(node.pixelData(box.x, box.y, box.width, box.height))
            if len(data) != expected:
                data = bytes(node.projectionPixelData(box.x, box.y, box.width, box.height))
        if len(data) != expected:
            name = self.node.name() if self.node is not None else "the image"
            raise DocumentError(
                f"Krita gives no pixels for the layer '{name}': pick a paint layer in the Layers docker, "
                "or set Source to 'Visible image', and press Fill again."
            )
        return swap_red_blue(data)

    def insert_results(self, name: str, box: Box, layers: list[bytes], grow: Margins | None) -> None:
        document = self.document
        if grow is not None:
            # resizeImage takes the new canvas rectangle in the old canvas's coordinates.
            document.resizeImage(
                -grow.left, -grow.top, document.width() + grow.left + grow.right, document.height() + grow.top + grow.bottom
            )
            document.waitForDone()
        group = document.createGroupLayer(name)
        # The layers are filled before the group enters the image: adding the group is then the
        # one undo step, and undoing it takes every variation with it.
        below = None
        for index, rgba in enumerate(layers):
            layer = document.createNode(f"{name} - variation {index + 1}", "paintlayer")
            layer.setPixelData(swap_red_blue(rgba), box.x, box.y, box.width, box.height)
            layer.setVisible(index == 0)
            group.addChildNode(layer, below)
            below = layer
        above = self.above
        placed = above is not None and above.parentNode() is not None
        (above.parentNode() if placed else document.rootNode()).addChildNode(group, above if placed else None)
        document.waitForDone()
        document.refreshProjection()
        self.inserted_group = group


def active_document():
    return Krita.instance().activeDocument()


def _describe(model: str, depth: str) -> str:
    models = {"RGBA": "RGB", "GRAYA": "grayscale", "CMYKA": "CMYK", "LABA": "L*a*b*", "XYZA": "XYZ", "YCbCrA": "YCbCr"}
    depths = {"U8": "8-bit", "U16": "16-bit integer", "F16": "16-bit float", "F32": "32-bit float"}
    return f"{depths.get(depth, depth)} {models.get(model, model)}"
