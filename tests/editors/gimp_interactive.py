"""Runs inside GIMP 3 with its window (gimp-3.0 under Xvfb, python-fu-eval batch), for
tests/test_gimp.py: opens an image in a display, selects, and calls the Fill procedure the
way the menu does (run mode INTERACTIVE), once per entry of the job's ``fills``. The test
presses the dialog's buttons from outside (xdotool); this script records what came of it.
"""
import json
import os
import traceback

from gi.repository import Gegl, Gimp

job = json.load(open(os.environ["GENFILL_CI_JOB"], encoding="utf-8"))
out = {"runs": []}


def save():
    with open(job["out"], "w", encoding="utf-8") as file:
        json.dump(out, file, indent=1)


try:
    width, height = job["width"], job["height"]
    image = Gimp.Image.new(width, height, Gimp.ImageBaseType.RGB)
    layer = Gimp.Layer.new(image, "photo", width, height, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    image.insert_layer(layer, None, 0)
    buffer = layer.get_buffer()
    with open(job["image"], "rb") as file:
        buffer.set(Gegl.Rectangle.new(0, 0, width, height), "R'G'B'A u8", file.read())
    buffer.flush()
    Gimp.Display.new(image)
    image.select_rectangle(Gimp.ChannelOps.REPLACE, *job["selection"])
    procedure = Gimp.get_pdb().lookup_procedure("python-fu-genfill-fill")
    for index in range(job["fills"]):
        selected = image.get_selected_layers()
        config = procedure.create_config()
        config.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
        config.set_property("image", image)
        config.set_core_object_array("drawables", selected)
        config.set_property("prompt", job["prompts"][index])
        with open(job["out"] + f".dialog-{index}", "w") as marker:
            marker.write("open")
        result = procedure.run(config)
        run = {"status": result.index(0).value_nick, "selected": [item.get_name() for item in selected]}
        if result.length() > 1:
            error = result.index(1)
            run["message"] = error if isinstance(error, str) else getattr(error, "message", str(error))
        run["groups"] = [
            {"name": top.get_name(), "children": [[c.get_name(), c.get_visible()] for c in top.get_children()]}
            for top in image.get_layers() if top.is_group()
        ]
        out["runs"].append(run)
        save()
    if job.get("cancel"):
        # A large job, cancelled from the dialog while it runs.
        big = job["cancel"]
        image = Gimp.Image.new(big["width"], big["height"], Gimp.ImageBaseType.RGB)
        layer = Gimp.Layer.new(image, "big", big["width"], big["height"], Gimp.ImageType.RGBA_IMAGE, 100.0,
                               Gimp.LayerMode.NORMAL)
        image.insert_layer(layer, None, 0)
        buffer = layer.get_buffer()
        with open(big["image"], "rb") as file:
            buffer.set(Gegl.Rectangle.new(0, 0, big["width"], big["height"]), "R'G'B'A u8", file.read())
        buffer.flush()
        Gimp.Display.new(image)
        image.select_rectangle(Gimp.ChannelOps.REPLACE, *big["selection"])
        config = procedure.create_config()
        config.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
        config.set_property("image", image)
        config.set_core_object_array("drawables", [layer])
        config.set_property("variations", 8)
        with open(job["out"] + f".dialog-{job['fills']}", "w") as marker:
            marker.write("open")
        result = procedure.run(config)
        out["cancelled_run"] = {"status": result.index(0).value_nick,
                                "layers": [item.get_name() for item in image.get_layers()]}
except Exception:  # noqa: BLE001 - reported to the test
    out["exception"] = traceback.format_exc()
save()
