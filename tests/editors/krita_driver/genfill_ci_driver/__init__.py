"""Test harness plug-in for tests/test_krita.py, installed only in a test HOME.

Once Krita's window exists it plays what a painter does: open an image, select, set the
genfill docker's options, trigger the Tools > Scripts > Generative Fill action (once per entry
of the job's ``fills``, the later ones with whatever layer the last fill left active, or the
layer the entry names), wait, export, undo each fill, export again. On the way it grabs the
docker and the window as PNGs and measures the docker's widgets. It writes what happened to
the JSON file named by ``$GENFILL_CI_JOB``'s ``out`` and leaves with ``os._exit``
(``QApplication.quit`` crashes Krita 5.1 here).

The scenario is a generator that yields how long to wait: each wait returns to Krita's main
event loop. A nested ``QEventLoop`` would not do: Krita's layer model (and so the active
layer) only catches up with new layers in the main loop, as it does for a painter.
"""

import faulthandler
import json
import os
import sys
import time
import traceback

from krita import Extension, InfoObject, Krita, Selection
from PyQt5.QtCore import QPoint, QTimer
from PyQt5.QtWidgets import QGroupBox, QScrollArea, QWidget


def _groups(document):
    return [
        {"name": node.name(), "children": [[c.name(), c.visible()] for c in node.childNodes()]}
        for node in document.topLevelNodes()
        if node.type() == "grouplayer"
    ]


def _step(job, out, name):
    # Written as it goes, so a run killed by its timeout still says how far it got.
    out.setdefault("steps", []).append(name)
    with open(job["out"] + ".partial", "w", encoding="utf-8") as file:
        json.dump(out, file, indent=1)


def _widgets(docker):
    """Every widget of the docker a painter can see, with its size and what it needs."""
    found = []
    for widget in docker.widget().findChildren(QWidget):
        if not widget.isVisibleTo(docker) or widget.parent() is None:
            continue
        if (type(widget).__name__ == "QWidget" and not widget.objectName()) or widget.objectName().startswith("qt_scrollarea") \
                or widget.parent().objectName().startswith("qt_scrollarea"):
            continue  # containers, and the scroll area's own scroll bars
        hint = widget.minimumSizeHint()
        text = ""
        for getter in ("text", "title", "currentText", "placeholderText"):
            if hasattr(widget, getter):
                try:
                    text = getattr(widget, getter)()
                except TypeError:
                    continue
                if text:
                    break
        found.append({"class": type(widget).__name__, "name": widget.objectName(), "text": str(text)[:60],
                      "width": widget.width(), "height": widget.height(),
                      "min_width": hint.width(), "min_height": hint.height()})
    return found


def _shots(job, out, docker, window, label):
    folder = job.get("screenshots")
    if not folder:
        return
    docker_png = os.path.join(folder, f"docker-{label}.png")
    window_png = os.path.join(folder, f"window-{label}.png")
    docker.grab().save(docker_png)
    window.qwindow().grab().save(window_png)
    out.setdefault("screenshots", []).extend([docker_png, window_png])
    scroll = docker.findChild(QScrollArea)
    if scroll is not None:  # the whole docker, as if it had all the height it wants
        content_png = os.path.join(folder, f"docker-content-{label}.png")
        scroll.widget().grab().save(content_png)
        out["screenshots"].append(content_png)


def _reachable(docker, widget):
    """Whether ``widget`` lies inside what the docker shows, after scrolling to it if it can."""
    scroll = docker.findChild(QScrollArea)
    if scroll is not None:
        scroll.ensureWidgetVisible(widget, 0, 0)
        top_left = widget.mapTo(scroll.viewport(), QPoint(0, 0))
        view = scroll.viewport().rect()
    else:
        top_left = widget.mapTo(docker, QPoint(0, 0))
        view = docker.rect()
    return {"top": top_left.y(), "bottom": top_left.y() + widget.height(), "view_height": view.height(),
            "inside": top_left.y() >= 0 and top_left.y() + widget.height() <= view.height()}


def _play(job, out):
    from genfill_krita.extension import ACTION_ID, find_docker
    from genfill_krita.genfill_bridge.frames import swap_red_blue

    app = Krita.instance()
    window = app.activeWindow()
    if job.get("window_size"):
        window.qwindow().showNormal()
        window.qwindow().resize(*job["window_size"])
    width, height = job["width"], job["height"]
    document = app.createDocument(width, height, "genfill ci", "RGBA", "U8", "", 72.0)
    window.addView(document)
    document.setBatchmode(True)
    layer = [n for n in document.topLevelNodes() if n.type() == "paintlayer"][0]
    with open(job["image"], "rb") as file:
        layer.setPixelData(swap_red_blue(file.read()), 0, 0, width, height)
    document.setActiveNode(layer)
    document.refreshProjection()
    selection = Selection()
    selection.select(*job["selection"], 255)
    document.setSelection(selection)
    yield 300

    _step(job, out, "docker")
    docker = find_docker(window)
    out["docker_found"] = docker is not None
    docker.show()
    docker.raise_()
    if job.get("url"):
        docker.url.setText(job["url"])
        docker.token.setText(job["token"])
    if job.get("wait_catalogue_ms"):
        # Nothing is pressed: the docker asks the server on its own.
        deadline = time.monotonic() + job["wait_catalogue_ms"] / 1000
        while docker.engine.count() <= 1 and time.monotonic() < deadline:
            yield 50
    out["engines"] = [docker.engine.itemText(i) for i in range(docker.engine.count())]
    out["models"] = [docker.model.itemText(i) for i in range(docker.model.count())]

    action = app.action(ACTION_ID)
    out["action_found"] = action is not None
    # Krita's own hook opens a modal dialog for an exception in a slot, which would hang
    # this run; record the exception instead.
    sys.excepthook = lambda kind, value, tb: out.setdefault("slot_exceptions", []).append(
        "".join(traceback.format_exception(kind, value, tb))
    )
    if job.get("preview"):
        yield from _play_preview(job, out, app, window, document, docker, action)
        return
    fills = job.get("fills") or [{"prompt": job["prompt"]}]
    out["fills"] = []
    for index, fill in enumerate(fills):
        record = {}
        out["fills"].append(record)
        if fill.get("activate") == "layer":
            document.setActiveNode(layer)
            yield 300
        active = document.activeNode()
        record["active"] = [active.name(), active.type()] if active is not None else None
        docker.prompt.setPlainText(fill.get("prompt", ""))
        docker.variations.setValue(fill.get("variations", job.get("variations", 1)))
        docker.seed.setValue(fill.get("seed", job.get("seed", -1)))
        finished = {}

        def on_finished(ok, text, finished=finished):
            finished.update(ok=ok, text=text)

        docker.controller.finished.connect(on_finished)
        _step(job, out, f"fill {index}: action.trigger")
        action.trigger()
        deadline = time.monotonic() + job.get("wait_ms", 120000) / 1000
        while not finished and time.monotonic() < deadline:
            yield 50
        docker.controller.finished.disconnect(on_finished)
        record.update(finished)
        record["status_label"] = docker.status_label.text()
        record["strip"] = docker.strip.count()
        record["history"] = [docker.history.itemText(i) for i in range(docker.history.count())]
        document.waitForDone()
        record["groups"] = _groups(document)
        if index == 0:
            out.update(finished)
            out["status_label"] = record["status_label"]
            out["groups_after_fill"] = record["groups"]
            _step(job, out, "exported")
            out["exported"] = document.exportImage(job["export"], InfoObject())
        yield 500
        _shots(job, out, docker, window, f"after-fill-{index + 1}")

    if job.get("measure"):
        docker.mode.setCurrentText("expand")
        docker.status_label.setText(job["measure"]["status"])
        yield 500
        out["widgets"] = _widgets(docker)
        [server] = [box for box in docker.findChildren(QGroupBox) if box.title() == "Server"]
        out["server_group"] = _reachable(docker, server)
        scroll = docker.findChild(QScrollArea)
        if scroll is not None:
            out["content_width"] = [scroll.widget().minimumSizeHint().width(), scroll.viewport().width()]
        yield 200
        _shots(job, out, docker, window, "expand-long-status")

    _step(job, out, "app.action")
    for _undo in range(job.get("undo", len(fills))):
        out.setdefault("undo_texts", []).append(app.action("edit_undo").text())
        app.action("edit_undo").trigger()
        yield 1000
        out.setdefault("groups_per_undo", []).append([g["name"] for g in _groups(document)])
    document.waitForDone()
    out["groups_after_undo"] = _groups(document)
    _step(job, out, "exported_after_undo")
    out["exported_after_undo"] = document.exportImage(job["export_after_undo"], InfoObject())
    yield 1500  # the docker notices the undone group on its own
    out["strip_after_undo"] = [docker.strip.count(), docker.controller.staging.active]

    if job.get("strip"):
        # The strip's buttons, clicked: a fill, show variation 2, Regenerate, Again with seed,
        # Apply (as a layer), From this layer on the kept layer, Discard.
        out["strip"] = strip = {}

        docker.mode.setCurrentText("fill")
        docker.prompt.setPlainText("waves")
        docker.variations.setValue(3)
        docker.seed.setValue(11)
        for button, name, waits in ((docker.fill_button, "fill", True), (None, "show", False),
                                    (docker.regenerate_button, "regenerate", True),
                                    (docker.again_button, "again", True), (docker.apply_button, "apply", False),
                                    (docker.from_layer_button, "from_layer", True),
                                    (docker.discard_button, "discard", False)):
            if name == "show":
                docker.strip.setCurrentRow(1)
                yield 300
                strip["show"] = {"visible": [c.visible() for c in docker.controller.staging.layers],
                                 "seeds": [r.seed for r in docker.controller.staging.records]}
                continue
            if name == "from_layer":
                kept = [n for n in document.topLevelNodes() if n.type() == "grouplayer"][-1]
                document.setActiveNode(kept.childNodes()[0])
                yield 500
                strip["from_layer_active"] = document.activeNode().name()
            finished = {}

            def on_finished(ok, text, finished=finished):
                finished.update(ok=ok, text=text)

            docker.controller.finished.connect(on_finished)
            button.click()
            deadline = time.monotonic() + 30
            while waits and not finished and time.monotonic() < deadline:
                yield 50
            docker.controller.finished.disconnect(on_finished)
            yield 300
            strip[name] = {**finished, "strip": docker.strip.count(), "groups": _groups(document),
                           "status": docker.status_label.text()}
        _shots(job, out, docker, window, "strip")


def _names(document):
    return [[n.name(), n.type(), n.visible()] for n in document.topLevelNodes() if n.type() != "selectionmask"]


def _play_preview(job, out, app, window, document, docker, action):
    """A diffusion fill from the menu action: the preview layer on the canvas (a screenshot
    of the whole screen while it shows), the result, undo across it; then a fill whose
    docker is closed while its preview shows."""
    import subprocess

    preview = job["preview"]
    docker.model.setCurrentIndex(max(docker.model.findData(preview["model"]), 0))
    out["model"] = docker.model.currentData()
    # Several variations: the job runs on for seconds after its first preview (a CPU model).
    docker.variations.setValue(preview.get("variations", 4))
    docker.seed.setValue(7)
    out["before"] = _names(document)
    for name in ("result", "closed"):
        record = out[name] = {}
        finished = {}

        def on_finished(ok, text, finished=finished):
            finished.update(ok=ok, text=text)

        docker.controller.finished.connect(on_finished)
        docker.prompt.setPlainText(name)
        _step(job, out, f"preview {name}: action.trigger")
        action.trigger()
        deadline = time.monotonic() + 120
        while not docker.controller.preview_layer.active and not finished and time.monotonic() < deadline:
            yield 50
        layer = docker.controller.preview_layer
        record["while"] = _names(document)
        record["box"] = list(layer.box) if layer.box is not None else None
        if name == "result":
            yield 1500  # the canvas repaints in Krita's main loop
            record["active_while"] = document.activeNode().name()
            shot = os.path.join(job["screenshots"], "canvas-with-preview-layer.png")
            grabbed = subprocess.run(["import", "-window", "root", shot], capture_output=True, timeout=30)
            record["screenshot"] = shot if grabbed.returncode == 0 else grabbed.stderr.decode()[-500:]
            record["still_running"] = not finished
        else:
            docker.close()
            yield 300
            record["after_close"] = _names(document)
            docker.show()
        while not finished and time.monotonic() < deadline:
            yield 50
        docker.controller.finished.disconnect(on_finished)
        yield 500
        document.waitForDone()
        record.update(finished)
        record["after"] = _names(document)
        record["active_after"] = document.activeNode().name()
        record["undo_text"] = app.action("edit_undo").text()
    # Undo, step by step, across the first fill's result: what each step brings back.
    out["undo"] = []
    for _undo in range(3):
        text = app.action("edit_undo").text()
        app.action("edit_undo").trigger()
        yield 800
        document.waitForDone()
        nodes = [n for n in document.topLevelNodes() if n.name() == "genfill preview"]
        out["undo"].append({"text": text, "layers": _names(document),
                            "preview_pixels": [any(bytes(n.pixelData(0, 0, job["width"], job["height"]))) for n in nodes]})


def _run():
    job_path = os.environ["GENFILL_CI_JOB"]
    with open(job_path, encoding="utf-8") as file:
        job = json.load(file)
    out = {}
    # If Krita hangs, the test's timeout kills it; these stacks then say where it hung.
    stacks = open(job["out"] + ".stacks", "w", encoding="utf-8")
    faulthandler.dump_traceback_later(job.get("stacks_after_s", 200), file=stacks)
    steps = _play(job, out)

    def finish(code):
        with open(job["out"], "w", encoding="utf-8") as file:
            json.dump(out, file, indent=1)
        os._exit(code)

    def advance():
        try:
            wait_ms = next(steps)
        except StopIteration:
            finish(0)
        except Exception:  # noqa: BLE001 - reported to the test
            out["exception"] = traceback.format_exc()
            finish(3)
        else:
            QTimer.singleShot(wait_ms, advance)

    advance()


class CiDriver(Extension):
    def setup(self):
        if os.environ.get("GENFILL_CI_JOB"):
            Krita.instance().notifier().windowCreated.connect(lambda: QTimer.singleShot(1000, _run))

    def createActions(self, window):  # noqa: N802 - Krita's name
        pass


Krita.instance().addExtension(CiDriver(Krita.instance()))
