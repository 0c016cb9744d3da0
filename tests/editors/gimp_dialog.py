"""Runs in the GIMP 3 chroot's Python under Xvfb, for tests/test_gimp.py: builds the plug-in's
Fill and Expand dialogs (Gtk.Dialog standing in for GimpUi.Dialog, which needs a running GIMP
core), reads what a painter would see, grabs each as a PNG, and writes it all to ``out``.

    python3 gimp_dialog.py PLUGIN_FOLDER JOB_JSON
"""
import json
import sys
import traceback

sys.path.insert(0, sys.argv[1])

import gi  # noqa: E402

gi.require_version("Gtk", "3.0")
gi.require_version("Gdk", "3.0")
from gi.repository import Gdk, Gtk  # noqa: E402


def settle():
    for _ in range(200):
        while Gtk.events_pending():
            Gtk.main_iteration_do(False)


def walk(widget):
    yield widget
    if isinstance(widget, Gtk.Container):
        for child in widget.get_children():
            yield from walk(child)


def describe(dialog, path):
    found = {"entries": [], "mnemonics": [], "labels": []}
    for widget in walk(dialog.dialog):
        if isinstance(widget, Gtk.Label):
            key = widget.get_mnemonic_keyval()
            found["labels"].append(widget.get_text())
            if key != Gdk.KEY_VoidSymbol:
                found["mnemonics"].append([widget.get_text(), Gdk.keyval_name(Gdk.keyval_to_lower(key))])
        if isinstance(widget, Gtk.Entry) and not isinstance(widget, Gtk.SpinButton):
            found["entries"].append({"visible_text": widget.get_visibility()})
    model = dialog.engine.get_model()
    found["engines"] = [[row[0], row[1]] for row in model]
    found["models"] = [[row[0], row[1]] for row in dialog.model.get_model()]
    found["strength_default"] = dialog.strength_default.get_active()
    found["strength_sensitive"] = dialog.strength.get_sensitive()
    found["seed_random"] = dialog.seed_random.get_active()
    found["seed_sensitive"] = dialog.seed.get_sensitive()
    found["status"] = dialog.status.get_text()
    found["values"] = dialog.values()
    window = dialog.dialog.get_window()
    pixbuf = Gdk.pixbuf_get_from_window(window, 0, 0, window.get_width(), window.get_height())
    pixbuf.savev(path, "png", [], [])
    found["screenshot"] = path
    return found


def main():
    job = json.load(open(sys.argv[2], encoding="utf-8"))
    out = {}
    try:
        import genfill_bridge as gb
        from genfill_bridge.catalogue import fetch_models
        from genfill_dialog import FillDialog

        catalogue = fetch_models(gb.ServerSettings())  # url and token from the state file
        fill = FillDialog(Gtk.Dialog, expand=False, catalogue=catalogue,
                          initial={"prompt": "a red door\nwith brass handles", "seed": -1, "strength": -1.0},
                          history=["a red door\nwith brass handles", "an old oak"])
        settle()
        out["fill"] = describe(fill, job["fill_png"])
        out["history"] = [row[0] for row in fill.history.get_model()]
        fill.history.set_active(2)
        settle()
        out["prompt_from_history"] = fill.values()["prompt"]
        fill.seed_random.set_active(False)
        fill.seed.set_value(42)
        settle()
        out["fill_after_seed"] = fill.values()
        fill.dialog.destroy()
        expand = FillDialog(Gtk.Dialog, expand=True, catalogue=catalogue, initial={"left": 16})
        settle()
        out["expand"] = describe(expand, job["expand_png"])
        expand.dialog.destroy()
        offline = FillDialog(Gtk.Dialog, expand=False, catalogue=None, error="The genfill server is not running.")
        settle()
        out["offline"] = describe(offline, job["offline_png"])
    except Exception:  # noqa: BLE001 - reported to the test
        out["exception"] = traceback.format_exc()
    json.dump(out, open(job["out"], "w", encoding="utf-8"), indent=1)


main()
