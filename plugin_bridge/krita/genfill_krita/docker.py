"""The Generative Fill docker: options, Fill and Cancel, progress and plain-word status.

Everything sits in a scroll area: a docker shares its column with other dockers, and a
layout squeezed below its widgets' minimum sizes draws them as slivers (Krita's dock area
does not stop it). The engines and models come from the server on their own: when the
docker starts, when the address or token changes, after every fill, and every
``CATALOGUE_REFRESH_S`` while the docker is visible, so a model added to the server shows
up without a Refresh.
"""

from __future__ import annotations

import json
import threading

from krita import DockWidget, Krita
from PyQt5.QtCore import QSize, Qt, QTimer, pyqtSignal
from PyQt5.QtGui import QImage, QPixmap
from PyQt5.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .controller import FillController
from .genfill_bridge import MODES, BridgeError, FillOptions, Margins, ServerSettings, fetch_catalogue
from .genfill_bridge.catalogue import engine_label, model_label
from .genfill_bridge.metadata import remember_prompt
from .staging import find_layer, record_of

SETTINGS_GROUP = "genfill"
DOCKER_ID = "genfill_docker"
CATALOGUE_REFRESH_S = 30
_DEFAULT = "(server default)"


class GenfillDocker(DockWidget):
    _catalogue = pyqtSignal(object, object, bool)

    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("Generative Fill")
        self.controller = FillController(self)
        self._catalogue_key = None
        self._catalogue_busy = False

        content = QWidget()
        layout = QVBoxLayout(content)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("what to paint (empty: continue the surroundings)")
        self.prompt.setTabChangesFocus(True)
        self.prompt.setFixedHeight(self.prompt.fontMetrics().lineSpacing() * 3 + 12)
        self.history = QComboBox()
        self.history.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.history.setMinimumContentsLength(6)
        self.history.setToolTip("The last 20 prompts")
        self._history = _read_history()
        self._show_history()
        self.negative_prompt = QLineEdit()
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.source = QComboBox()
        self.source.addItem("Active layer", "layer")
        self.source.addItem("Visible image", "visible")
        self.engine = QComboBox()
        self.model = QComboBox()
        for combo in (self.mode, self.source, self.engine, self.model):
            # A long model name must not widen the docker past its column.
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(6)
        self.refresh_button = QToolButton()
        self.refresh_button.setText("Refresh")
        self.refresh_button.setIcon(Krita.instance().icon("view-refresh"))
        self.refresh_button.setToolButtonStyle(Qt.ToolButtonIconOnly)
        self.refresh_button.setMinimumWidth(26)
        self.refresh_button.setToolTip("Ask the server for its engines and models again")
        engine_row = QHBoxLayout()
        engine_row.setContentsMargins(0, 0, 0, 0)
        engine_row.addWidget(self.engine, 1)
        engine_row.addWidget(self.refresh_button)
        self.strength = QDoubleSpinBox()
        self.strength.setRange(0.0, 1.0)
        self.strength.setSingleStep(0.05)
        self.strength.setSpecialValueText(_DEFAULT)  # 0.0 shows as "server default"
        self.variations = QSpinBox()
        self.variations.setRange(1, 8)
        self.variations.setValue(3)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        # Two by two: four spin boxes in one row need more width than a docker column has.
        self.margins = {side: QSpinBox() for side in ("left", "right", "top", "bottom")}
        self.margin_widget = QWidget()
        margin_grid = QGridLayout(self.margin_widget)
        margin_grid.setContentsMargins(0, 0, 0, 0)
        for index, (side, box) in enumerate(self.margins.items()):
            box.setRange(0, 16384)
            box.setSuffix(" px")
            box.setMinimumWidth(64)
            label = QLabel(side.title())
            label.setMinimumWidth(32)
            label.setBuddy(box)
            margin_grid.addWidget(label, index // 2, 2 * (index % 2))
            margin_grid.addWidget(box, index // 2, 2 * (index % 2) + 1)
        margin_grid.setColumnStretch(1, 1)
        margin_grid.setColumnStretch(3, 1)
        form.addRow("Prompt", self.prompt)
        form.addRow("Recent", self.history)
        form.addRow("Negative", self.negative_prompt)
        form.addRow("Mode", self.mode)
        # Label above, grid below, across both columns: a docker column is about 260 px wide.
        form.addRow(QLabel("Expand by"))
        form.addRow(self.margin_widget)
        form.addRow("Source", self.source)
        form.addRow("Engine", engine_row)
        form.addRow("Model", self.model)
        form.addRow("Strength", self.strength)
        form.addRow("Variations", self.variations)
        form.addRow("Seed", self.seed)
        layout.addLayout(form)

        buttons = QHBoxLayout()
        self.fill_button = QPushButton("Fill")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.fill_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("Select an area and press Fill.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        # Wrapped text grows downwards; it never asks the row above to give up width.
        self.status_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Minimum)
        layout.addWidget(self.status_label)

        self.result_group = QGroupBox("Result")
        result_layout = QVBoxLayout(self.result_group)
        self.strip = QListWidget()
        self.strip.setViewMode(QListView.IconMode)
        self.strip.setFlow(QListView.LeftToRight)
        self.strip.setWrapping(False)
        self.strip.setIconSize(QSize(72, 72))
        self.strip.setFixedHeight(104)
        self.strip.setMovement(QListView.Static)
        self.preview_label = QLabel()
        self.preview_label.setAlignment(Qt.AlignCenter)
        self.preview_label.setToolTip("What the engine has so far")
        self.preview_label.hide()
        result_layout.addWidget(self.preview_label)
        result_layout.addWidget(self.strip)
        self.apply_button = QPushButton("Apply")
        self.apply_as = QComboBox()
        self.apply_as.addItem("as a layer", False)
        self.apply_as.addItem("flattened", True)
        self.apply_as.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.apply_as.setMinimumContentsLength(6)
        self.discard_button = QPushButton("Discard")
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("The same request with new seeds; replaces these variations")
        self.again_button = QPushButton("Again with seed")
        self.again_button.setToolTip("The shown variation's request and seed, once more")
        self.from_layer_button = QPushButton("From this layer")
        self.from_layer_button.setToolTip("Fill again with the parameters kept in the active result layer")
        # Two narrow columns: the docker column is about 260 px wide.
        buttons_grid = QGridLayout()
        buttons_grid.addWidget(self.apply_button, 0, 0)
        buttons_grid.addWidget(self.apply_as, 0, 1)
        buttons_grid.addWidget(self.discard_button, 1, 0)
        buttons_grid.addWidget(self.regenerate_button, 1, 1)
        buttons_grid.addWidget(self.again_button, 2, 0, 1, 2)
        buttons_grid.addWidget(self.from_layer_button, 3, 0, 1, 2)
        result_layout.addLayout(buttons_grid)
        layout.addWidget(self.result_group)

        self.server_group = QGroupBox("Server")
        server_form = QFormLayout(self.server_group)
        self.url = QLineEdit(_read("url"))
        self.url.setPlaceholderText("from the running server's state file")
        self.token = QLineEdit(_read("token"))
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setPlaceholderText("from the running server's state file")
        server_form.addRow("Address", self.url)
        server_form.addRow("Token", self.token)
        layout.addWidget(self.server_group)
        layout.addStretch(1)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        # Tall enough for the options and Fill: the dock column then gives the docker room.
        scroll.setMinimumHeight(360)
        scroll.setWidget(content)
        self.setWidget(scroll)

        self.fill_button.clicked.connect(self.fill)
        self.history.activated.connect(self._history_picked)
        staging = self.controller.staging
        staging.changed.connect(self._show_staging)
        self.strip.currentRowChanged.connect(lambda row: row >= 0 and staging.show(row))
        self.apply_button.clicked.connect(lambda: staging.apply(self.apply_as.currentData()))
        self.discard_button.clicked.connect(staging.discard)
        self.regenerate_button.clicked.connect(lambda: self.again(same_seed=False))
        self.again_button.clicked.connect(lambda: self.again(same_seed=True))
        self.from_layer_button.clicked.connect(self.from_layer)
        self.cancel_button.clicked.connect(self.controller.cancel)
        self.refresh_button.clicked.connect(self.refresh_catalogue)
        self.mode.currentTextChanged.connect(self._mode_changed)
        self.url.editingFinished.connect(self._server_edited)
        self.token.editingFinished.connect(self._server_edited)
        self.controller.started.connect(self._started)
        self.controller.progress.connect(self._progress)
        self.controller.preview.connect(self._show_preview)
        self.controller.status.connect(self.status_label.setText)
        self.controller.finished.connect(self._finished)
        self._catalogue.connect(self._show_catalogue)
        self._mode_changed(self.mode.currentText())
        self._fill_catalogue(None)
        self._show_staging()
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._refresh_if_visible)
        self._timer.start(CATALOGUE_REFRESH_S * 1000)
        # An undo or a deleted layer can take the strip's variations away: empty it then.
        self._staging_timer = QTimer(self)
        self._staging_timer.timeout.connect(self._check_staging)
        self._staging_timer.start(1000)
        QTimer.singleShot(0, lambda: self.refresh_catalogue(quiet=True))

    def canvasChanged(self, canvas) -> None:  # noqa: N802 - Krita's name
        pass

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        """Closing the docker cancels its job and takes the preview layer off the canvas."""
        self.controller.cancel()
        self.controller.end_preview()
        super().closeEvent(event)

    def settings(self) -> ServerSettings:
        return ServerSettings(url=self.url.text().strip(), token=self.token.text().strip())

    def options(self) -> FillOptions:
        """The options as set; raises ``ValueError`` for an invalid combination."""
        mode = self.mode.currentText()
        margins = Margins(**{side: box.value() for side, box in self.margins.items()}) if mode == "expand" else Margins()
        return FillOptions(
            prompt=self.prompt.toPlainText().strip(),
            negative_prompt=self.negative_prompt.text(),
            mode=mode,
            engine=self.engine.currentData() or None,
            model=self.model.currentData() or None,
            strength=self.strength.value() or None,
            variations=self.variations.value(),
            seed=None if self.seed.value() < 0 else self.seed.value(),
            source=self.source.currentData(),
            expand=margins,
        )

    def fill(self) -> bool:
        """Starts a fill of the active document with the docker's options."""
        try:
            options = self.options()
        except ValueError as exc:
            self._finished(False, str(exc))
            return False
        self._remember(options.prompt)
        return self.controller.start(Krita.instance().activeDocument(), options, self.settings())

    def again(self, *, same_seed: bool) -> bool:
        """Regenerate (new seeds, replacing the strip's variations) or "Again with seed"."""
        staging = self.controller.staging
        if not staging.active:
            self._finished(False, "Nothing to run again: fill first.")
            return False
        options, source = staging.again(same_seed=same_seed, variations=self.variations.value())
        # Where the strip's group is: Regenerate takes its place, Again goes on top of it.
        return self.controller.start(staging.document, options, self.settings(), node=source,
                                     replaces=None if same_seed else staging.group, above=staging.group)

    def from_layer(self) -> bool:
        """Fills again with the parameters kept in the active layer (new seeds; the seed is
        kept when Seed is not "random")."""
        document = Krita.instance().activeDocument()
        record = record_of(document, document.activeNode()) if document is not None else None
        if record is None:
            self._finished(False, "The active layer has no genfill parameters: pick a layer a fill made.")
            return False
        seed = None if self.seed.value() < 0 else record.seed
        options = record.options(seed=seed, variations=1 if seed is not None else self.variations.value())
        self._show_record(record)
        source = find_layer(document, record.source_layer) if record.source_layer else None
        active = document.activeNode()
        parent = active.parentNode()
        # On top of the result it came from: its group when the active layer is a variation.
        in_group = parent is not None and parent.uniqueId() != document.rootNode().uniqueId()
        return self.controller.start(document, options, self.settings(), node=source,
                                     above=parent if in_group else active)
    def refresh_catalogue(self, quiet: bool = False) -> None:
        """Asks the server for its engines and models on a worker thread. ``quiet``: keep the
        status line unless the list changed (automatic refreshes must not hide a result)."""
        if self._catalogue_busy:
            return
        self._catalogue_busy = True
        settings = self.settings()
        if not quiet:
            self.status_label.setText("Asking the server for its engines and models...")

        def work() -> None:
            try:
                self._catalogue.emit(fetch_catalogue(settings), None, quiet)
            except (BridgeError, ValueError) as exc:
                self._catalogue.emit(None, exc, quiet)
            except Exception as exc:  # noqa: BLE001 - a thread must not die silently
                self._catalogue.emit(None, BridgeError(f"Unexpected error asking the server: {exc!r}"), quiet)

        threading.Thread(target=work, name="genfill-catalogue", daemon=True).start()

    def _refresh_if_visible(self) -> None:
        if self.isVisible() and not self.controller.busy:
            self.refresh_catalogue(quiet=True)

    def _server_edited(self) -> None:
        _write("url", self.url.text())
        _write("token", self.token.text())
        self.refresh_catalogue()

    def _show_catalogue(self, catalogue, error, quiet: bool) -> None:
        self._catalogue_busy = False
        if error is not None:
            if not quiet or self._catalogue_key is not None:
                self.status_label.setText(str(error))
            self._catalogue_key = None
            return
        key = (
            tuple(engine["name"] for engine in catalogue["engines"] if engine.get("available", True)),
            tuple((model["name"], model["engine"]) for model in catalogue["models"]),
            catalogue["default_engine"],
        )
        if quiet and key == self._catalogue_key:
            return
        self._catalogue_key = key
        self._fill_catalogue(catalogue)
        count = len(catalogue["models"])
        if not self.controller.busy:
            self.status_label.setText(
                f"Server {catalogue['server_version']}: default engine {catalogue['default_engine']}, "
                f"{count} model(s) installed. Select an area and press Fill."
            )

    def _fill_catalogue(self, catalogue) -> None:
        engine, model = self.engine.currentData(), self.model.currentData()
        self.engine.clear()
        self.model.clear()
        default_engine = catalogue["default_engine"] if catalogue else None
        self.engine.addItem(f"{_DEFAULT}: {engine_label(catalogue, default_engine)}" if default_engine else _DEFAULT, "")
        self.model.addItem(_DEFAULT, "")
        if catalogue is not None:
            for item in catalogue["engines"]:
                if item.get("available", True):
                    self.engine.addItem(engine_label(catalogue, item["name"]), item["name"])
            for item in catalogue["models"]:
                self.model.addItem(model_label(item), item["name"])
        # Keep what the painter picked, while the server still offers it.
        self.engine.setCurrentIndex(max(self.engine.findData(engine), 0) if engine else 0)
        self.model.setCurrentIndex(max(self.model.findData(model), 0) if model else 0)

    def _remember(self, prompt: str) -> None:
        self._history = remember_prompt(self._history, prompt)
        Krita.instance().writeSetting(SETTINGS_GROUP, "prompt_history", json.dumps(self._history))
        self._show_history()

    def _show_history(self) -> None:
        self.history.clear()
        self.history.addItem("(recent prompts)" if self._history else "(no prompts yet)", "")
        for prompt in self._history:
            self.history.addItem(" ".join(prompt.split())[:80], prompt)

    def _history_picked(self, index: int) -> None:
        prompt = self.history.itemData(index)
        if prompt:
            self.prompt.setPlainText(prompt)

    def _show_record(self, record) -> None:
        self.prompt.setPlainText(record.prompt)
        self.negative_prompt.setText(record.negative_prompt)
        self.mode.setCurrentText(record.mode)

    def _check_staging(self) -> None:
        if self.strip.count() and not self.controller.staging.active:
            self._show_staging()

    def _show_staging(self) -> None:
        staging = self.controller.staging
        self.strip.blockSignals(True)
        self.strip.clear()
        for index, (icon, record) in enumerate(zip(staging.thumbnails, staging.records)):
            item = QListWidgetItem(icon, f"{index + 1}")
            item.setToolTip(record.describe())
            self.strip.addItem(item)
        if staging.active:
            self.strip.setCurrentRow(staging.shown)
        self.strip.blockSignals(False)
        for button in (self.apply_button, self.apply_as, self.discard_button, self.regenerate_button, self.again_button):
            button.setEnabled(staging.active)

    def _show_preview(self, rgba: bytes, width: int, height: int) -> None:
        image = QImage(rgba, width, height, width * 4, QImage.Format_RGBA8888).copy()
        self.preview_label.setPixmap(QPixmap.fromImage(image.scaled(200, 120, Qt.KeepAspectRatio, Qt.SmoothTransformation)))
        self.preview_label.show()

    def _mode_changed(self, mode: str) -> None:
        self.margin_widget.setEnabled(mode == "expand")

    def _started(self) -> None:
        self.fill_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy until the first progress message

    def _progress(self, step: int, total: int) -> None:
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(step)

    def _finished(self, ok: bool, text: str) -> None:
        self.preview_label.hide()
        self.fill_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if ok else 0)
        self.status_label.setText(text)
        if ok:
            self.refresh_catalogue(quiet=True)


def _read_history() -> list[str]:
    try:
        history = json.loads(_read("prompt_history") or "[]")
    except ValueError:
        return []
    return [item for item in history if isinstance(item, str)] if isinstance(history, list) else []


def _read(key: str) -> str:
    return Krita.instance().readSetting(SETTINGS_GROUP, key, "")


def _write(key: str, value: str) -> None:
    Krita.instance().writeSetting(SETTINGS_GROUP, key, value.strip())
