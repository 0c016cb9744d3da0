"""Scenarios run inside real Krita by ``kritarunner`` (no window), for tests/test_krita.py.

    kritarunner -s krita_logic -f main SCENARIO JOB_JSON

``JOB_JSON`` names a JSON file with the server's url and token, the input image (raw RGBA),
the selection and where to write results. kritarunner always exits 0, so every outcome,
errors included, goes to ``out``. The installed plug-in package must be on ``PYTHONPATH``.
"""

import json
import os
import sys
import time
import traceback

from krita import InfoObject, Krita, Selection
from PyQt5.QtCore import QEventLoop, QTimer


def main(args):
    scenario, job_path = args[0], args[1]
    with open(job_path, encoding="utf-8") as file:
        job = json.load(file)
    out = {"scenario": scenario, "python": sys.version.split()[0]}
    try:
        SCENARIOS[scenario](job, out)
    except Exception:  # noqa: BLE001 - reported to the test
        out["exception"] = traceback.format_exc()
    with open(job["out"], "w", encoding="utf-8") as file:
        json.dump(out, file, indent=1)


def make_document(job, depth="U8"):
    width, height = job["width"], job["height"]
    document = Krita.instance().createDocument(width, height, "genfill test", "RGBA", depth, "", 72.0)
    document.setBatchmode(True)
    layer = [node for node in document.topLevelNodes() if node.type() == "paintlayer"][0]
    if depth == "U8":
        from genfill_krita.genfill_bridge.frames import swap_red_blue

        with open(job["image"], "rb") as file:
            layer.setPixelData(swap_red_blue(file.read()), 0, 0, width, height)
    document.waitForDone()
    document.refreshProjection()
    if job.get("selection"):
        selection = Selection()
        selection.select(*job["selection"], 255)
        document.setSelection(selection)
    return document, layer


def run_controller(document, layer, options, settings, on_progress=None, timeout_s=120):
    from genfill_krita.controller import FillController

    controller = FillController()
    loop = QEventLoop()
    outcome = {}

    def finished(ok, text):
        outcome.update(ok=ok, text=text)
        loop.quit()

    def progress(step, total):
        outcome.setdefault("progress", []).append([step, total])
        if on_progress is not None:
            on_progress(controller, step, total)

    controller.finished.connect(finished)
    controller.progress.connect(progress)
    started = controller.start(document, options, settings, node=layer)
    outcome["started"] = started
    if started:
        QTimer.singleShot(timeout_s * 1000, loop.quit)
        loop.exec_()
    outcome.setdefault("ok", None)
    return controller, outcome


def describe_layers(document):
    groups = []
    for node in document.topLevelNodes():
        if node.type() != "grouplayer":
            continue
        children = []
        for child in node.childNodes():
            bounds = child.bounds()
            children.append(
                {"name": child.name(), "type": child.type(), "visible": child.visible(),
                 "bounds": [bounds.x(), bounds.y(), bounds.width(), bounds.height()]}
            )
        groups.append({"name": node.name(), "children": children})
    return groups


def scenario_fill(job, out):
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings
    from genfill_krita.genfill_bridge.frames import swap_red_blue

    document, layer = make_document(job)
    options = FillOptions(prompt=job["prompt"], variations=job["variations"], seed=job["seed"])
    settings = ServerSettings(url=job["url"], token=job["token"])
    controller, outcome = run_controller(document, layer, options, settings)
    out.update(outcome)
    out["groups"] = describe_layers(document)
    x, y, width, height = job["selection"]
    group = controller.last_group
    dumps = []
    if group is not None:
        for index, child in enumerate(group.childNodes()):
            path = os.path.join(job["workdir"], f"variation-{index}.rgba")
            with open(path, "wb") as file:
                file.write(swap_red_blue(bytes(child.pixelData(0, 0, job["width"], job["height"]))))
            dumps.append(path)
    out["variation_dumps"] = dumps
    document.waitForDone()
    out["exported"] = document.exportImage(job["export"], InfoObject())
    out["export"] = job["export"]
    document.close()


def scenario_expand(job, out):
    from genfill_krita.genfill_bridge import FillOptions, Margins, ServerSettings

    document, layer = make_document(job)
    options = FillOptions(mode="expand", expand=Margins(**job["margins"]), variations=1, seed=1)
    controller, outcome = run_controller(document, layer, options, ServerSettings(url=job["url"], token=job["token"]))
    out.update(outcome)
    out["size"] = [document.width(), document.height()]
    out["groups"] = describe_layers(document)
    document.waitForDone()
    out["exported"] = document.exportImage(job["export"], InfoObject())
    out["export"] = job["export"]
    document.close()


def scenario_cancel(job, out):
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings

    document, layer = make_document(job)
    options = FillOptions(variations=8, seed=2)

    def cancel_on_first_step(controller, step, total):
        controller.cancel()

    _, outcome = run_controller(
        document, layer, options, ServerSettings(url=job["url"], token=job["token"]), on_progress=cancel_on_first_step
    )
    out.update(outcome)
    out["groups"] = describe_layers(document)
    document.close()


def scenario_refused(job, out):
    """Starts fills that must be refused: the message is what the painter reads."""
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings

    settings = ServerSettings(url=job["url"], token=job["token"])
    document, layer = make_document(job, depth=job.get("depth", "U8"))
    if job.get("clear_selection"):
        document.setSelection(None)
    _, outcome = run_controller(document, layer, FillOptions(variations=1), settings)
    out.update(outcome)
    out["groups"] = describe_layers(document)
    document.close()


def scenario_import_zip(job, out):
    """Krita's own 'Import Python Plugin from File' logic, on the zip genfill builds."""
    sys.path.insert(0, "/usr/share/krita/pykrita")
    from plugin_importer.plugin_importer import PluginImporter

    importer = PluginImporter(job["zip"], job["resources"], lambda plugin: True)
    out["imported"] = [plugin["name"] for plugin in importer.import_all()]
    sys.path.insert(0, os.path.join(job["resources"], "pykrita"))
    import genfill_krita
    from genfill_krita.adapter import KritaDocument  # noqa: F401 - the imported copy must load

    out["module"] = genfill_krita.__file__


def _wait_for(controller, start, timeout_s=120):
    """Runs ``start()`` (a ``controller.start`` call) and waits for ``finished``."""
    loop = QEventLoop()
    outcome = {}

    def finished(ok, text):
        outcome.update(ok=ok, text=text)
        loop.quit()

    controller.finished.connect(finished)
    try:
        if start():
            QTimer.singleShot(timeout_s * 1000, loop.quit)
            loop.exec_()
    finally:
        controller.finished.disconnect(finished)
    return outcome


def _variation_pixels(node, box):
    from genfill_krita.genfill_bridge.frames import swap_red_blue

    return swap_red_blue(bytes(node.pixelData(*box)))


def scenario_staging(job, out):
    """The strip's buttons through the code they call: show, Again with seed, Regenerate,
    Apply (as a layer and flattened), Discard, then the parameters after save and reopen."""
    from genfill_krita.controller import FillController
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings
    from genfill_krita.staging import layer_id, read_records, record_of

    document, layer = make_document(job)
    settings = ServerSettings(url=job["url"], token=job["token"])
    controller = FillController()
    staging = controller.staging
    box = job["selection"]
    first = _wait_for(controller, lambda: controller.start(
        document, FillOptions(prompt="sea\nat dusk", variations=3, seed=5), settings, node=layer))
    out["first"] = first
    out["strip"] = {"thumbnails": len(staging.thumbnails), "seeds": [r.seed for r in staging.records],
                    "sizes": [[icon.availableSizes()[0].width(), icon.availableSizes()[0].height()] for icon in staging.thumbnails]}
    first_group = staging.group
    staging.show(2)
    out["shown_visibility"] = [node.visible() for node in first_group.childNodes()]
    third = _variation_pixels(first_group.childNodes()[2], box)

    options, source = staging.again(same_seed=True, variations=3)
    out["again_options"] = {"seed": options.seed, "variations": options.variations, "prompt": options.prompt,
                            "source": source.name()}
    again = _wait_for(controller, lambda: controller.start(document, options, settings, node=source))
    out["again"] = again
    again_group = staging.group
    out["again_seeds"] = [r.seed for r in staging.records]
    out["again_same_pixels"] = _variation_pixels(again_group.childNodes()[0], box) == third

    options, source = staging.again(same_seed=False, variations=2)
    regenerate = _wait_for(controller, lambda: controller.start(document, options, settings, node=source,
                                                                 replaces=staging.group))
    out["regenerate"] = regenerate
    out["regenerate_seeds"] = [r.seed for r in staging.records]
    out["groups_after_regenerate"] = describe_layers(document)

    records = read_records(document)
    out["records"] = {node.name(): [records[layer_id(node)].prompt, records[layer_id(node)].seed,
                                    list(records[layer_id(node)].box), records[layer_id(node)].engine]
                      for group in document.topLevelNodes() if group.type() == "grouplayer"
                      for node in group.childNodes() if layer_id(node) in records}
    staging.show(1)
    staging.apply(False)
    out["groups_after_apply_layer"] = describe_layers(document)

    path = os.path.join(job["workdir"], "staged.kra")
    out["saved"] = document.saveAs(path)
    document.waitForDone()
    document.close()
    reopened = Krita.instance().openDocument(path)
    reopened.setBatchmode(True)
    groups = [node for node in reopened.topLevelNodes() if node.type() == "grouplayer"]
    out["reopened"] = []
    for group in groups:
        record = record_of(reopened, group)
        out["reopened"].append(None if record is None else [record.prompt, record.seed, list(record.box), record.mode])
    # "From this layer", after reopening: the record's request with its seed gives the same pixels.
    kept = groups[0].childNodes()[0]
    record = record_of(reopened, kept)
    from genfill_krita.staging import find_layer

    source = find_layer(reopened, record.source_layer)
    out["reopened_source"] = source.name() if source is not None else None
    repeat = _wait_for(controller, lambda: controller.start(reopened, record.options(seed=record.seed, variations=1),
                                                           settings, node=source))
    out["repeat"] = repeat
    out["repeat_same_pixels"] = _variation_pixels(staging.group.childNodes()[0], box) == _variation_pixels(kept, box)
    staging.discard()
    out["groups_after_discard"] = [g["name"] for g in describe_layers(reopened)]
    before = bytes(source.pixelData(*box))
    staging_group = groups[0]
    # Flatten, with an earlier result active: the new group lands above that result, and
    # Apply flattened merges the kept variation into the layer the fill read, not the result.
    flatten = _wait_for(controller, lambda: controller.start(reopened, record.options(seed=None, variations=2),
                                                            settings, node=staging_group))
    out["flatten"] = flatten
    out["flatten_order"] = [node.name() for node in reopened.topLevelNodes() if node.type() != "selectionmask"]
    staging.apply(True)
    reopened.waitForDone()
    out["groups_after_flatten"] = [g["name"] for g in describe_layers(reopened)]
    flattened = [n for n in reopened.topLevelNodes() if n.type() == "paintlayer"]
    out["flattened_changed"] = bool(flattened) and bytes(flattened[0].pixelData(*box)) != before
    out["after_flatten_order"] = [node.name() for node in reopened.topLevelNodes() if node.type() != "selectionmask"]
    out["staging_group_still_there"] = staging_group.name()
    reopened.close()


def scenario_group_source(job, out):
    """A painter's own group active (not a fill's result): read as it looks, its projection."""
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings

    document, layer = make_document(job)
    group = document.createGroupLayer("painting")
    copy = layer.duplicate()
    group.addChildNode(copy, None)
    document.rootNode().addChildNode(group, layer)
    layer.setVisible(False)
    document.waitForDone()
    out["pixel_data_of_group"] = len(bytes(group.pixelData(0, 0, 4, 4)))
    _, outcome = run_controller(document, group, FillOptions(variations=1, seed=4),
                                ServerSettings(url=job["url"], token=job["token"]))
    out.update(outcome)
    out["groups"] = describe_layers(document)
    document.close()


def scenario_previews(job, out):
    """A diffusion job: the controller hands on the engine's preview images as they come."""
    from genfill_krita.controller import FillController
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings

    document, layer = make_document(job)
    controller = FillController()
    previews = []
    controller.preview.connect(lambda rgba, width, height: previews.append([len(rgba), width, height]))
    options = FillOptions(prompt="a window", model=job["model"], steps=job["steps"], variations=1, seed=3)
    out.update(_wait_for(controller, lambda: controller.start(
        document, options, ServerSettings(url=job["url"], token=job["token"]), node=layer)))
    out["previews"] = previews
    out["groups"] = describe_layers(document)
    document.close()


def scenario_cloud(job, out):
    """Several fills in one Krita start, each on a fresh document: ``job["runs"]`` names each
    run's ``FillOptions`` (``expand`` as a dict of margins). Then the docker's Model drop-down
    as it fills from the server's catalogue."""
    from genfill_krita.genfill_bridge import FillOptions, Margins, ServerSettings, fetch_catalogue

    settings = ServerSettings(url=job["url"], token=job["token"])
    out["runs"] = {}
    for run in job["runs"]:
        options = dict(run["options"])
        if "expand" in options:
            options["expand"] = Margins(**options["expand"])
        document, layer = make_document(job)
        _, outcome = run_controller(document, layer, FillOptions(**options), settings)
        outcome["groups"] = describe_layers(document)
        outcome["size"] = [document.width(), document.height()]
        document.waitForDone()
        outcome["export"] = os.path.join(job["workdir"], run["name"] + ".png")
        outcome["exported"] = document.exportImage(outcome["export"], InfoObject())
        document.close()
        out["runs"][run["name"]] = outcome
    catalogue = fetch_catalogue(settings)
    try:
        from genfill_krita.docker import GenfillDocker

        docker = GenfillDocker()
        docker._fill_catalogue(catalogue)
        out["model_labels"] = [[docker.model.itemText(i), docker.model.itemData(i)] for i in range(docker.model.count())]
        out["engine_labels"] = [[docker.engine.itemText(i), docker.engine.itemData(i)] for i in range(docker.engine.count())]
        out["labels_from"] = "docker"
    except Exception:  # noqa: BLE001 - no docker without Krita's window: the function it calls
        from genfill_krita.genfill_bridge.catalogue import model_label

        out["docker_exception"] = traceback.format_exc()
        out["model_labels"] = [[model_label(model), model["name"]] for model in catalogue["models"]]
        out["labels_from"] = "model_label"


def _layer_names(document):
    return [[node.name(), node.type()] for node in document.topLevelNodes() if node.type() != "selectionmask"]


def scenario_preview_layer(job, out):
    """A diffusion job, twice: the "genfill preview" layer while it runs (where, what pixels),
    and the layer list after the result and after a cancel."""
    from genfill_krita.controller import FillController
    from genfill_krita.genfill_bridge import FillOptions, ServerSettings
    from genfill_krita.genfill_bridge.frames import swap_red_blue
    from genfill_krita.preview import PREVIEW_LAYER_NAME

    document, layer = make_document(job)
    settings = ServerSettings(url=job["url"], token=job["token"])
    controller = FillController()
    out["before"] = _layer_names(document)
    seen = []
    received = []
    controller.preview.connect(lambda rgba, width, height: received.append(1))

    def shown():
        # What the canvas holds right after a repaint, and the preview it was painted from.
        document.waitForDone()
        preview = controller.preview_layer
        node = [n for n in document.topLevelNodes() if n.name() == PREVIEW_LAYER_NAME]
        box = preview.box
        bounds = node[0].bounds() if node else None
        entry = {"layers": _layer_names(document), "box": list(box), "repaints": preview.repaints, "t": time.monotonic(),
                 "bounds": [bounds.x(), bounds.y(), bounds.width(), bounds.height()] if bounds else None,
                 "visible": node[0].visible() if node else None}
        if len(seen) < 3 and node:
            index = len(seen)
            pixels = os.path.join(job["workdir"], f"preview-layer-{index}.rgba")
            with open(pixels, "wb") as file:
                file.write(swap_red_blue(bytes(node[0].pixelData(*box))))
            entry["pixels"] = pixels
        seen.append(entry)

    controller.preview_layer.shown.connect(shown)
    # The preview each repaint was made from: the newest one that reached the layer.
    original_update = controller.preview_layer.update
    previews = []

    def update(rgba, width, height, box):
        path = os.path.join(job["workdir"], f"preview-{len(previews)}.rgba")
        with open(path, "wb") as file:
            file.write(rgba)
        previews.append([path, width, height, list(box) if box else None])
        original_update(rgba, width, height, box)

    controller.preview_layer.update = update
    options = FillOptions(prompt="a window", model=job["model"], steps=job["steps"], variations=job.get("variations", 2), seed=3)
    out["fill"] = _wait_for(controller, lambda: controller.start(document, options, settings, node=layer))
    out["seen"] = seen
    out["received"] = len(received)
    out["previews"] = previews
    document.waitForDone()
    out["after_result"] = _layer_names(document)
    out["result_children"] = [[c.name(), [c.bounds().x(), c.bounds().y(), c.bounds().width(), c.bounds().height()]]
                              for c in controller.last_group.childNodes()] if controller.last_group else None

    # Cancelled once the layer shows a preview.
    before_cancel = _layer_names(document)
    out["before_cancel"] = before_cancel
    cancel_seen = []

    def cancel_on_show():
        cancel_seen.append(_layer_names(document))
        controller.cancel()

    controller.preview_layer.shown.disconnect(shown)
    controller.preview_layer.shown.connect(cancel_on_show)
    options = FillOptions(prompt="a door", model=job["model"], steps=job["cancel_steps"], variations=1, seed=4)
    out["cancel"] = _wait_for(controller, lambda: controller.start(document, options, settings, node=layer))
    document.waitForDone()
    out["cancel_seen"] = cancel_seen
    out["after_cancel"] = _layer_names(document)
    path = os.path.join(job["workdir"], "after.kra")
    out["saved"] = document.saveAs(path)
    document.waitForDone()
    document.close()
    reopened = Krita.instance().openDocument(path)
    out["reopened"] = _layer_names(reopened)
    reopened.close()


SCENARIOS = {
    "cloud": scenario_cloud,
    "preview_layer": scenario_preview_layer,
    "previews": scenario_previews,
    "group_source": scenario_group_source,
    "staging": scenario_staging,
    "fill": scenario_fill,
    "expand": scenario_expand,
    "cancel": scenario_cancel,
    "refused": scenario_refused,
    "import_zip": scenario_import_zip,
}
