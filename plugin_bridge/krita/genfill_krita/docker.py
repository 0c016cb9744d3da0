"""The Generative Fill docker: options, Fill and Cancel, progress and plain-word status."""

from __future__ import annotations

import threading

from krita import DockWidget, Krita
from PyQt5.QtCore import pyqtSignal
from PyQt5.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .controller import FillController
from .genfill_bridge import MODES, BridgeError, FillOptions, Margins, ServerSettings, fetch_catalogue

SETTINGS_GROUP = "genfill"
DOCKER_ID = "genfill_docker"
_DEFAULT = "(server default)"


class GenfillDocker(DockWidget):
    _catalogue = pyqtSignal(object, object)

    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("Generative Fill")
        self.controller = FillController(self)
        root = QWidget(self)
        layout = QVBoxLayout(root)
        form = QFormLayout()
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("what to paint (empty: continue the surroundings)")
        self.negative_prompt = QLineEdit()
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.source = QComboBox()
        self.source.addItem("Active layer", "layer")
        self.source.addItem("Visible image", "visible")
        self.engine = QComboBox()
        self.model = QComboBox()
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
        self.margins = {side: QSpinBox() for side in ("left", "right", "top", "bottom")}
        margin_row = QHBoxLayout()
        for side, box in self.margins.items():
            box.setRange(0, 16384)
            box.setPrefix(f"{side[0].upper()} ")
            margin_row.addWidget(box)
        self.margin_widget = QWidget()
        self.margin_widget.setLayout(margin_row)
        form.addRow("Prompt", self.prompt)
        form.addRow("Negative", self.negative_prompt)
        form.addRow("Mode", self.mode)
        form.addRow("Expand by (px)", self.margin_widget)
        form.addRow("Source", self.source)
        form.addRow("Engine", self.engine)
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
        layout.addWidget(self.status_label)

        server = QGroupBox("Server")
        server.setCheckable(True)
        server.setChecked(False)
        server_form = QFormLayout(server)
        self.url = QLineEdit(_read("url"))
        self.url.setPlaceholderText("from the running server's state file")
        self.token = QLineEdit(_read("token"))
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setPlaceholderText("from the running server's state file")
        self.refresh_button = QPushButton("Refresh engines and models")
        server_form.addRow("Address", self.url)
        server_form.addRow("Token", self.token)
        server_form.addRow(self.refresh_button)
        layout.addWidget(server)
        layout.addStretch(1)
        self.setWidget(root)

        self.fill_button.clicked.connect(self.fill)
        self.cancel_button.clicked.connect(self.controller.cancel)
        self.refresh_button.clicked.connect(self.refresh_catalogue)
        self.mode.currentTextChanged.connect(self._mode_changed)
        self.url.editingFinished.connect(lambda: _write("url", self.url.text()))
        self.token.editingFinished.connect(lambda: _write("token", self.token.text()))
        self.controller.started.connect(self._started)
        self.controller.progress.connect(self._progress)
        self.controller.status.connect(self.status_label.setText)
        self.controller.finished.connect(self._finished)
        self._catalogue.connect(self._show_catalogue)
        self._mode_changed(self.mode.currentText())
        self._show_catalogue(None, None)

    def canvasChanged(self, canvas) -> None:  # noqa: N802 - Krita's name
        pass

    def settings(self) -> ServerSettings:
        return ServerSettings(url=self.url.text().strip(), token=self.token.text().strip())

    def options(self) -> FillOptions:
        """The options as set; raises ``ValueError`` for an invalid combination."""
        mode = self.mode.currentText()
        margins = Margins(**{side: box.value() for side, box in self.margins.items()}) if mode == "expand" else Margins()
        return FillOptions(
            prompt=self.prompt.text(),
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
        return self.controller.start(Krita.instance().activeDocument(), options, self.settings())

    def refresh_catalogue(self) -> None:
        settings = self.settings()
        self.status_label.setText("Asking the server for its engines and models...")

        def work() -> None:
            try:
                self._catalogue.emit(fetch_catalogue(settings), None)
            except BridgeError as exc:
                self._catalogue.emit(None, exc)

        threading.Thread(target=work, name="genfill-catalogue", daemon=True).start()

    def _show_catalogue(self, catalogue, error) -> None:
        if error is not None:
            self.status_label.setText(str(error))
            return
        self.engine.clear()
        self.model.clear()
        self.engine.addItem(_DEFAULT, "")
        self.model.addItem(_DEFAULT, "")
        if catalogue is None:
            return
        for engine in catalogue["engines"]:
            if engine.get("available", True):
                self.engine.addItem(engine["name"], engine["name"])
        for model in catalogue["models"]:
            self.model.addItem(f"{model['name']} ({model['engine']})", model["name"])
        count = len(catalogue["models"])
        self.status_label.setText(
            f"Server {catalogue['server_version']}: default engine {catalogue['default_engine']}, "
            f"{count} model(s) installed."
        )

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
        self.fill_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if ok else 0)
        self.status_label.setText(text)


def _read(key: str) -> str:
    return Krita.instance().readSetting(SETTINGS_GROUP, key, "")


def _write(key: str, value: str) -> None:
    Krita.instance().writeSetting(SETTINGS_GROUP, key, value.strip())
