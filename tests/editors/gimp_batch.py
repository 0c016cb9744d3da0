"""Runs inside GIMP 3 (gimp-console, python-fu-eval batch) for tests/test_gimp.py.

Builds an image from the raw RGBA file the job names, selects, calls a genfill procedure
through the PDB exactly as a script would, and writes what happened to the job's ``out``.
"""
import json
import os
import sys
import traceback

from gi.repository import Gegl, Gimp, Gio


def one(job, out):
    """One procedure call on a new image; what happened goes to ``out``."""
    width, height = job["width"], job["height"]
    image = Gimp.Image.new(width, height, Gimp.ImageBaseType.RGB)
    layer = Gimp.Layer.new(image, "photo", width, height, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    image.insert_layer(layer, None, 0)
    buffer = layer.get_buffer()
    with open(job["image"], "rb") as file:
        buffer.set(Gegl.Rectangle.new(0, 0, width, height), "R'G'B'A u8", file.read())
    buffer.flush()
    if job.get("indexed"):
        image.convert_indexed(Gimp.ConvertDitherType.NONE, Gimp.ConvertPaletteType.GENERATE, 255, False, False, "")
    if job.get("selection"):
        image.select_rectangle(Gimp.ChannelOps.REPLACE, *job["selection"])
    procedure = Gimp.get_pdb().lookup_procedure(job["procedure"])
    out["procedure_found"] = procedure is not None
    config = procedure.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [layer])
    for key, value in job["args"].items():
        config.set_property(key, value)
    result = procedure.run(config)
    out["status"] = result.index(0).value_nick
    if result.length() > 1:
        error = result.index(1)
        out["message"] = error if isinstance(error, str) else getattr(error, "message", str(error))
    out["size"] = [image.get_width(), image.get_height()]
    groups = []
    for top in image.get_layers():
        if not top.is_group():
            continue
        children = []
        for index, child in enumerate(top.get_children()):
            _, x, y = child.get_offsets()
            w, h = child.get_width(), child.get_height()
            path = os.path.join(job["workdir"], job.get("tag", "") + f"variation-{index}.rgba")
            with open(path, "wb") as file:
                file.write(bytes(child.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, "R'G'B'A u8", Gegl.AbyssPolicy.NONE)))
            parasite = child.get_parasite("genfill")
            record = bytes(parasite.get_data()).decode() if parasite is not None else None
            children.append({"name": child.get_name(), "visible": child.get_visible(), "box": [x, y, w, h], "dump": path,
                             "parameters": record})
        groups.append({"name": top.get_name(), "children": children})
    out["groups"] = groups
    if job.get("xcf"):
        xcf = Gio.File.new_for_path(job["xcf"])
        out["xcf_saved"] = bool(Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, image, xcf, None))
        reopened = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, xcf)
        out["reopened_parameters"] = [
            bytes(child.get_parasite("genfill").get_data()).decode() if child.get_parasite("genfill") else None
            for top in reopened.get_layers() if top.is_group() for child in top.get_children()
        ]
        if job.get("again"):
            # Again from This Layer on the reopened file: the second variation, nothing selected.
            chosen = [top for top in reopened.get_layers() if top.is_group()][0].get_children()[1]
            Gimp.Selection.none(reopened)
            again = Gimp.get_pdb().lookup_procedure("python-fu-genfill-again")
            config = again.create_config()
            config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
            config.set_property("image", reopened)
            config.set_core_object_array("drawables", [chosen])
            for key, value in job["again"].items():
                config.set_property(key, value)
            result = again.run(config)
            out["again_status"] = result.index(0).value_nick
            if result.length() > 1:
                error = result.index(1)
                out["again_message"] = error if isinstance(error, str) else getattr(error, "message", str(error))
            w, h = chosen.get_width(), chosen.get_height()
            original = bytes(chosen.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, "R'G'B'A u8", Gegl.AbyssPolicy.NONE))
            groups = [top for top in reopened.get_layers() if top.is_group()]
            newest = groups[0]
            out["again_groups"] = [[g.get_name(), len(g.get_children())] for g in groups]
            made = newest.get_children()[0]
            out["again_box"] = [*made.get_offsets()[1:], made.get_width(), made.get_height()]
            out["again_same_pixels"] = bytes(made.get_buffer().get(
                Gegl.Rectangle.new(0, 0, made.get_width(), made.get_height()), 1.0, "R'G'B'A u8", Gegl.AbyssPolicy.NONE)) == original
            parasite = made.get_parasite("genfill")
            out["again_parameters"] = bytes(parasite.get_data()).decode() if parasite is not None else None
    if job.get("export"):
        out["exported"] = bool(Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(job["export"]), None))
        out["export_path"] = job["export"]


def labels(job, out):
    """The drop-down entries the plug-in's dialog shows, from the installed plug-in's own
    bridge: ``fetch_models`` and ``choices``, as ``genfill.py`` and ``genfill_dialog`` call them."""
    sys.path.insert(0, os.path.join(os.environ["XDG_CONFIG_HOME"], "GIMP", "3.0", "plug-ins", "genfill"))
    from genfill_bridge.catalogue import choices, fetch_models
    from genfill_bridge.settings import ServerSettings

    catalogue = fetch_models(ServerSettings(url=job["labels"]["server-url"], token=job["labels"]["server-token"]))
    out["choices"] = {mode: {"engines": choices(catalogue, mode).engines, "models": choices(catalogue, mode).models}
                      for mode in ("fill", "remove", "expand")}


job = json.load(open(os.environ["GENFILL_CI_JOB"], encoding="utf-8"))
out = {}
try:
    if job.get("runs"):
        # Several calls in one GIMP start, each on its own new image.
        out["runs"] = {}
        for run in job["runs"]:
            out["runs"][run["tag"]] = {}
            one({**job, **run}, out["runs"][run["tag"]])
    else:
        one(job, out)
    if job.get("labels"):
        labels(job, out)
except Exception:  # noqa: BLE001 - reported to the test
    out["exception"] = traceback.format_exc()
with open(job["out"], "w", encoding="utf-8") as file:
    json.dump(out, file, indent=1)
