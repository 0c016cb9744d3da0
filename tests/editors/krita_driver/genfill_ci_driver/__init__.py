"""Test harness plug-in for tests/test_krita.py, installed only in a test HOME.

Once Krita's window exists it plays what a painter does: open an image, select, set the
genfill docker's options, trigger the Tools > Scripts > Generative Fill action, wait, export,
undo, export again. It writes what happened to the JSON file named by ``$GENFILL_CI_JOB``'s
``out`` and leaves with ``os._exit`` (``QApplication.quit`` crashes Krita 5.1 here).
"""

import faulthandler
import json
import os
import sys
import traceback

from krita import Extension, InfoObject, Krita, Selection
from PyQt5.QtCore import QEventLoop, QTimer


def _wait(ms):
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec_()


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


def _play(job, out):
    from genfill_krita.extension import ACTION_ID, find_docker
    from genfill_krita.genfill_bridge.frames import swap_red_blue

    app = Krita.instance()
    window = app.activeWindow()
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
    _wait(300)

    _step(job, out, "docker")
    docker = find_docker(window)
    out["docker_found"] = docker is not None
    docker.url.setText(job["url"])
    docker.token.setText(job["token"])
    docker.prompt.setText(job["prompt"])
    docker.variations.setValue(job["variations"])
    docker.seed.setValue(job["seed"])
    loop = QEventLoop()
    finished = {}

    def on_finished(ok, text):
        finished.update(ok=ok, text=text)
        loop.quit()

    docker.controller.finished.connect(on_finished)
    action = app.action(ACTION_ID)
    out["action_found"] = action is not None
    _step(job, out, "action.trigger")
    # Krita's own hook opens a modal dialog for an exception in a slot, which would hang
    # this run; record the exception instead.
    sys.excepthook = lambda kind, value, tb: out.setdefault("slot_exceptions", []).append(
        "".join(traceback.format_exception(kind, value, tb))
    )
    action.trigger()
    _step(job, out, "triggered")
    if not finished:  # a refusal is reported at once, before any loop runs
        QTimer.singleShot(job.get("wait_ms", 120000), loop.quit)
        loop.exec_()
    out["status_after_wait"] = docker.status_label.text()
    out["busy_after_wait"] = docker.controller.busy
    out.update(finished)
    out["status_label"] = docker.status_label.text()
    document.waitForDone()
    out["groups_after_fill"] = _groups(document)
    _step(job, out, "exported")
    out["exported"] = document.exportImage(job["export"], InfoObject())

    _step(job, out, "app.action")
    app.action("edit_undo").trigger()
    _wait(500)
    document.waitForDone()
    out["groups_after_undo"] = _groups(document)
    _step(job, out, "exported_after_undo")
    out["exported_after_undo"] = document.exportImage(job["export_after_undo"], InfoObject())


def _run():
    job_path = os.environ["GENFILL_CI_JOB"]
    with open(job_path, encoding="utf-8") as file:
        job = json.load(file)
    out = {}
    code = 0
    # If Krita hangs, the test's timeout kills it; these stacks then say where it hung.
    stacks = open(job["out"] + ".stacks", "w", encoding="utf-8")
    faulthandler.dump_traceback_later(job.get("stacks_after_s", 200), file=stacks)
    try:
        _play(job, out)
    except Exception:  # noqa: BLE001 - reported to the test
        out["exception"] = traceback.format_exc()
        code = 3
    with open(job["out"], "w", encoding="utf-8") as file:
        json.dump(out, file, indent=1)
    os._exit(code)


class CiDriver(Extension):
    def setup(self):
        if os.environ.get("GENFILL_CI_JOB"):
            Krita.instance().notifier().windowCreated.connect(lambda: QTimer.singleShot(1000, _run))

    def createActions(self, window):  # noqa: N802 - Krita's name
        pass


Krita.instance().addExtension(CiDriver(Krita.instance()))
