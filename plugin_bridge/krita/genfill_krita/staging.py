"""The staging strip's state: the variations of the last fill, which one is shown, and what
Apply, Discard, Regenerate and "Again with seed" do to them. Main thread only.

Each variation layer's parameters are kept in the document (a ``genfill`` annotation, saved
in the .kra, keyed by layer id), so "From this layer" works after saving and reopening.
"""

from __future__ import annotations

from krita import Krita
from PyQt5.QtCore import QByteArray, QObject, pyqtSignal
from PyQt5.QtGui import QIcon, QImage, QPixmap

from .genfill_bridge.metadata import ANNOTATION_TYPE, FillRecord, from_json, to_json


def read_records(document) -> dict[str, FillRecord]:
    if ANNOTATION_TYPE not in document.annotationTypes():
        return {}
    return from_json(bytes(document.annotation(ANNOTATION_TYPE)))


def write_records(document, records: dict[str, FillRecord]) -> None:
    document.setAnnotation(ANNOTATION_TYPE, "genfill: the parameters of each result layer",
                           QByteArray(to_json(records).encode("utf-8")))


def layer_id(node) -> str:
    return node.uniqueId().toString()


def record_of(document, node) -> FillRecord | None:
    """The record of ``node``, or of a group's shown (else first) variation."""
    if node is None:
        return None
    records = read_records(document)
    if layer_id(node) in records:
        return records[layer_id(node)]
    if node.type() == "grouplayer":
        children = [child for child in node.childNodes() if layer_id(child) in records]
        shown = [child for child in children if child.visible()]
        if shown or children:
            return records[layer_id((shown or children)[0])]
    return None


def find_layer(document, wanted: str):
    """The node whose id is ``wanted`` anywhere in the document, or ``None``."""
    pending = list(document.topLevelNodes())
    while pending:
        node = pending.pop()
        if layer_id(node) == wanted:
            return node
        pending.extend(node.childNodes())
    return None


class Staging(QObject):
    """``changed`` fires whenever the strip must redraw (new result, shown, applied, gone)."""

    changed = pyqtSignal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.clear()

    def clear(self) -> None:
        self.document = None
        self.group = None
        self.layers = []
        self.records = []
        self.source = None
        self.thumbnails = []
        self.shown = 0

    @property
    def active(self) -> bool:
        """Whether there are variations to act on; not once their group is gone (undone,
        deleted, the document closed)."""
        if self.group is None:
            return False
        try:
            present = find_layer(self.document, layer_id(self.group)) is not None
        except Exception:  # noqa: BLE001 - a closed document's wrappers raise
            present = False
        if not present:
            self.clear()
        return present

    def stage(self, adapter, prepared, result) -> None:
        """Takes the layers ``apply`` just added and records what made each one."""
        document, group = adapter.document, adapter.inserted_group
        self.clear()
        self.document, self.group, self.source = document, group, adapter.node
        self.layers = list(group.childNodes())
        source_id = layer_id(adapter.node) if adapter.node is not None else ""
        records = read_records(document)
        for layer, variation in zip(self.layers, result.variations):
            record = FillRecord.of(prepared.options, engine=result.engine, model=result.model, seed=variation.seed,
                                   box=result.box, source_layer=source_id)
            records[layer_id(layer)] = record
            self.records.append(record)
            self.thumbnails.append(_thumbnail(variation.rgba, result.box.width, result.box.height))
        write_records(document, records)
        self.changed.emit()

    def show(self, index: int) -> None:
        """Shows variation ``index`` and hides the others."""
        if not self.active or not 0 <= index < len(self.layers):
            return
        for position, layer in enumerate(self.layers):
            layer.setVisible(position == index)
        self.shown = index
        self.document.refreshProjection()
        self.changed.emit()

    def apply(self, flatten: bool) -> None:
        """Keeps the shown variation: as the one layer of the group, or merged into the layer
        below the group (``flatten``). The others are deleted."""
        if not self.active:
            return
        for position, layer in enumerate(self.layers):
            if position != self.shown:
                layer.remove()
        if flatten:
            group = self.group
            source = self.source
            if source is not None and source.parentNode() is not None and _below(group) != layer_id(source):
                # The group sits above what was active (an earlier result, say): move a copy
                # right above the layer it was made from, so it merges into that layer.
                moved = group.duplicate()
                source.parentNode().addChildNode(moved, source)
                group.remove()
                group = moved
            group.mergeDown()
        self.document.waitForDone()
        self.document.refreshProjection()
        self.clear()
        self.changed.emit()

    def discard(self) -> None:
        if not self.active:
            return
        self.group.remove()
        self.document.waitForDone()
        self.document.refreshProjection()
        self.clear()
        self.changed.emit()

    def again(self, *, same_seed: bool, variations: int):
        """``(options, source layer)`` to run the shown variation's request again: with its
        seed (one variation), or with new seeds."""
        record = self.records[self.shown]
        if same_seed:
            return record.options(seed=record.seed, variations=1), self.source
        return record.options(seed=None, variations=variations), self.source


def _below(node) -> str:
    """The id of the sibling right below ``node``, or ``""``."""
    siblings = node.parentNode().childNodes() if node.parentNode() is not None else []
    ids = [layer_id(sibling) for sibling in siblings]
    index = ids.index(layer_id(node)) if layer_id(node) in ids else 0
    return ids[index - 1] if index > 0 else ""


def _thumbnail(rgba: bytes, width: int, height: int, size: int = 72) -> QIcon:
    image = QImage(rgba, width, height, width * 4, QImage.Format_RGBA8888).copy()
    return QIcon(QPixmap.fromImage(image.scaled(size, size, aspectRatioMode=1, transformMode=1)))


def active_document():
    return Krita.instance().activeDocument()
