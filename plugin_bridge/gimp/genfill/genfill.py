#!/usr/bin/env python3
"""genfill for GIMP 3: Filters > Generative > Fill / Expand.

Two PDB procedures, usable from scripts with the same arguments the dialog shows:

- ``python-fu-genfill-fill``: fills the selection of the image (from the active layer or the
  visible image) through a genfill server;
- ``python-fu-genfill-expand``: grows the canvas by the given margins and fills the new area.

Results come back as new layers at the exact offset, one per variation in a layer group named
after the prompt (the first shown, the others hidden), all inside one undo group.

From the menu (interactive) the plug-in shows its own dialog (``genfill_dialog``): engines
and models from the server, and the job runs on a thread while the dialog stays open, so its
Cancel cancels the job on the server. From a script (non-interactive) the bridge's blocking
client runs on GIMP's main thread; ending the plug-in's process closes the connection, and
the server then cancels the job.
"""

import dataclasses
import json
import os
import queue
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gi  # noqa: E402

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
import genfill_bridge as gb  # noqa: E402
from gi.repository import Gegl, Gimp, GLib, GObject  # noqa: E402

FILL = "python-fu-genfill-fill"
EXPAND = "python-fu-genfill-expand"
AGAIN = "python-fu-genfill-again"
_RGBA = "R'G'B'A u8"


class GimpDocument(gb.Document):
    """A GIMP image and the drawable to read, through GEGL buffers.

    GEGL converts on the way in and out, so RGB and grayscale images of any precision work:
    the bridge always sees 8-bit RGBA. Indexed images are refused.
    """

    def __init__(self, image, drawable, above=None):
        self.image = image
        self.drawable = drawable
        self.above = above if above is not None else drawable
        self.inserted = []

    def size(self):
        return gb.Size(self.image.get_width(), self.image.get_height())

    def check_supported(self):
        if self.image.get_base_type() == Gimp.ImageBaseType.INDEXED:
            raise gb.UnsupportedDocument(
                "This image is indexed; genfill works on RGB and grayscale images. "
                "Convert it with Image > Mode > RGB and try again."
            )

    def selection_bounds(self):
        bounds = Gimp.Selection.bounds(self.image)
        non_empty, x1, y1, x2, y2 = bounds[-5:]
        if not non_empty or x2 <= x1 or y2 <= y1:
            return None
        return gb.Box(x1, y1, x2 - x1, y2 - y1)

    def selection_pixels(self, box):
        buffer = self.image.get_selection().get_buffer()
        return bytes(buffer.get(_rect(box), 1.0, "Y u8", Gegl.AbyssPolicy.NONE))

    def pixels(self, box, source):
        if source == "visible" or self.drawable is None:
            visible = Gimp.Layer.new_from_visible(self.image, self.image, "genfill visible")
            try:
                return bytes(visible.get_buffer().get(_rect(box), 1.0, _RGBA, Gegl.AbyssPolicy.NONE))
            finally:
                visible.delete()
        # A drawable's buffer is in its own coordinates; outside it pixels are transparent.
        _, offset_x, offset_y = self.drawable.get_offsets()
        local = gb.Box(box.x - offset_x, box.y - offset_y, box.width, box.height)
        return bytes(self.drawable.get_buffer().get(_rect(local), 1.0, _RGBA, Gegl.AbyssPolicy.NONE))

    def insert_results(self, name, box, layers, grow):
        image = self.image
        image.undo_group_start()
        try:
            if grow is not None:
                image.resize(
                    image.get_width() + grow.left + grow.right,
                    image.get_height() + grow.top + grow.bottom,
                    grow.left,
                    grow.top,
                )
            kind = Gimp.ImageType.GRAYA_IMAGE if image.get_base_type() == Gimp.ImageBaseType.GRAY else Gimp.ImageType.RGBA_IMAGE
            group = Gimp.GroupLayer.new(image, name)
            parent = self.above.get_parent() if self.above is not None else None
            position = image.get_item_position(self.above) if self.above is not None else 0
            image.insert_layer(group, parent, position)
            for index, rgba in enumerate(layers):
                layer = Gimp.Layer.new(
                    image, f"{name} - variation {index + 1}", box.width, box.height, kind, 100.0, Gimp.LayerMode.NORMAL
                )
                image.insert_layer(layer, group, index)
                buffer = layer.get_buffer()
                buffer.set(Gegl.Rectangle.new(0, 0, box.width, box.height), _RGBA, rgba)
                buffer.flush()
                layer.set_offsets(box.x, box.y)
                layer.set_visible(index == 0)
                layer.update(0, 0, box.width, box.height)
                self.inserted.append(layer)
            # GIMP would leave the last variation (hidden, inside the group) selected; the group
            # is what the painter sees, as in Krita, and a next Fill reads it as it looks.
            image.set_selected_layers([group])
        finally:
            image.undo_group_end()
        Gimp.displays_flush()


def keep_parameters(document, prepared, result):
    """Attaches each variation's parameters to its layer as a persistent parasite (saved in
    the .xcf), the JSON of ``genfill_bridge.metadata``."""
    from genfill_bridge.metadata import ANNOTATION_TYPE, FillRecord, to_json

    source = document.drawable.get_name() if document.drawable is not None else ""
    for layer, variation in zip(document.inserted, result.variations):
        record = FillRecord.of(prepared.options, engine=result.engine, model=result.model, seed=variation.seed,
                               box=result.box, source_layer=source)
        data = to_json({"layer": record}).encode("utf-8")
        layer.attach_parasite(Gimp.Parasite.new(ANNOTATION_TYPE, Gimp.PARASITE_PERSISTENT | Gimp.PARASITE_UNDOABLE, data))


def _rect(box):
    return Gegl.Rectangle.new(box.x, box.y, box.width, box.height)


def _options(config, mode):
    strength = config.get_property("strength")
    seed = config.get_property("seed")
    margins = gb.Margins()
    if mode == "expand":
        margins = gb.Margins(*(config.get_property(side) for side in ("left", "right", "top", "bottom")))
    return gb.FillOptions(
        # GIMP hands an unset string argument over as None.
        prompt=config.get_property("prompt") or "",
        negative_prompt=config.get_property("negative-prompt") or "",
        mode=mode,
        engine=config.get_property("engine") or None,
        model=config.get_property("model") or None,
        strength=None if strength < 0 else strength,
        variations=config.get_property("variations"),
        seed=None if seed < 0 else seed,
        source="visible" if config.get_property("visible") else "layer",
        expand=margins,
    )


ARGUMENTS = ("prompt", "negative-prompt", "mode", "left", "right", "top", "bottom", "engine", "model", "strength",
             "variations", "seed", "visible")


def _run(procedure, run_mode, image, drawables, config, data):
    is_expand = procedure.get_name() == EXPAND
    drawable = drawables[0] if drawables else None
    settings = gb.ServerSettings(
        url=config.get_property("server-url") or "", token=config.get_property("server-token") or ""
    )
    document = GimpDocument(image, *_source_layer(image, drawable))
    if run_mode == Gimp.RunMode.INTERACTIVE:
        return _run_dialog(procedure, config, document, settings, is_expand)
    mode = "expand" if is_expand else (config.get_property("mode") or "fill")
    try:
        options = _options(config, mode)
    except Exception as exc:  # noqa: BLE001 - GIMP must get a message, not a crash
        return _failed(procedure, exc, interactive=False)
    return _fill_with_progress(procedure, document, options, settings, interactive=False)


def _fill_with_progress(procedure, document, options, settings, *, interactive: bool, before=None):
    """Fills ``document`` without a dialog, progress in GIMP's bar, and keeps the result's
    parameters on its layer; ``before`` (if any) runs first, inside the same error handling."""
    try:
        if before is not None:
            before()
        Gimp.progress_init("Generative fill: connecting to the genfill server")
        prepared = gb.prepare(document, options)
        result = gb.run(prepared, settings, on_event=_show_progress)
        name = gb.apply(document, prepared, result)
        keep_parameters(document, prepared, result)
    except gb.JobCancelled:
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    except Exception as exc:  # noqa: BLE001 - GIMP must get a message, not a crash
        return _failed(procedure, exc, interactive=interactive)
    finally:
        Gimp.progress_end()
    _done(name, result)
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def _run_dialog(procedure, config, document, settings, is_expand):
    """The dialog, then the job with the dialog still open: its Cancel cancels the job."""
    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    from genfill_bridge.catalogue import fetch_models
    from genfill_dialog import FillDialog
    from gi.repository import GimpUi, Gtk

    GimpUi.init(procedure.get_name())
    try:
        catalogue, error = fetch_models(settings), None
    except (gb.BridgeError, ValueError) as exc:
        catalogue, error = None, str(exc)
    names = [name for name in ARGUMENTS if procedure.find_argument(name) is not None]
    dialog = FillDialog(GimpUi.Dialog, expand=is_expand, catalogue=catalogue, error=error,
                        initial={name: config.get_property(name) for name in names}, history=_read_history())
    try:
        while True:
            if dialog.dialog.run() != Gtk.ResponseType.OK:
                return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
            for name, value in dialog.values().items():
                if name in names:
                    config.set_property(name, value)  # GIMP keeps them as the next run's values
            try:
                prepared = gb.prepare(document, _options(config, "expand" if is_expand else config.get_property("mode")))
                break
            except (gb.BridgeError, ValueError) as exc:
                dialog.say(str(exc))  # e.g. nothing selected: fix it, press Fill again
        cancel = threading.Event()
        dialog.running(True)
        dialog.say("Filling...")
        stop = (Gtk.ResponseType.CANCEL, Gtk.ResponseType.DELETE_EVENT)
        dialog.dialog.connect("response", lambda _dialog, response: response in stop and cancel.set())
        Gimp.progress_init("Generative fill: connecting to the genfill server")
        events, outcome = queue.Queue(), {}

        def work():
            try:
                outcome["result"] = gb.run(prepared, settings, on_event=events.put, cancel=cancel)
            except Exception as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        # The job runs on a thread; GIMP's and GTK's calls stay on this one.
        worker = threading.Thread(target=work, name="genfill-fill", daemon=True)
        worker.start()
        while worker.is_alive() or not events.empty():
            while Gtk.events_pending():
                Gtk.main_iteration_do(False)
            try:
                _show_progress(events.get(timeout=0.02))
            except queue.Empty:
                pass
        Gimp.progress_end()
        error = outcome.get("error")
        if isinstance(error, gb.JobCancelled):
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
        if error is not None:
            return _failed(procedure, error, interactive=True)
        try:
            name = gb.apply(document, prepared, outcome["result"])
            keep_parameters(document, prepared, outcome["result"])
        except Exception as exc:  # noqa: BLE001 - GIMP must get a message, not a crash
            return _failed(procedure, exc, interactive=True)
        _done(name, outcome["result"])
        _write_history(prepared.options.prompt)
        return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    finally:
        dialog.dialog.destroy()


def _history_path():
    return os.path.join(Gimp.directory(), "genfill-prompts.json")


def _read_history():
    try:
        with open(_history_path(), encoding="utf-8") as file:
            history = json.load(file)
    except (OSError, ValueError):
        return []
    return [item for item in history if isinstance(item, str)] if isinstance(history, list) else []


def _write_history(prompt):
    from genfill_bridge.metadata import remember_prompt

    try:
        with open(_history_path(), "w", encoding="utf-8") as file:
            json.dump(remember_prompt(_read_history(), prompt), file)
    except OSError:
        pass  # a history that cannot be kept must not fail the fill


def _failed(procedure, exc, *, interactive):
    message = str(exc) if isinstance(exc, (gb.BridgeError, ValueError)) else f"Unexpected error in the genfill plug-in: {exc!r}"
    if interactive:
        Gimp.message(message)
    return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(message))


def _done(name, result):
    # A prompt the engine ignored (classic) must not pass silently: GIMP shows a message in
    # its status bar or error console; a batch run prints it.
    for warning in gb.result_warnings(result):
        Gimp.message(f"Generative fill: {warning}")
    Gimp.progress_set_text(f"Generative fill: added '{name}'")


def _show_progress(event):
    if event.kind == "accepted":
        Gimp.progress_set_text(
            "Generative fill" if event.queue_position == 0 else f"Generative fill: {event.queue_position} job(s) ahead"
        )
        Gimp.progress_pulse()
    elif event.kind == "progress":
        Gimp.progress_update(event.step / event.total)


class GenfillPlugIn(Gimp.PlugIn):
    def do_set_i18n(self, procname):
        return False

    def do_query_procedures(self):
        return [FILL, EXPAND, AGAIN]

    def do_create_procedure(self, name):
        Gegl.init(None)
        if name == AGAIN:
            return self._again_procedure(name)
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, _run, None)
        procedure.set_image_types("RGB*, GRAY*")
        procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        procedure.set_attribution("genfill", "genfill", "2025")
        flags = GObject.ParamFlags.READWRITE
        if name == FILL:
            procedure.set_menu_label("_Fill...")
            procedure.set_documentation(
                "Fill the selection with a genfill server",
                "Sends the selection and the pixels around it to a genfill server and adds each "
                "variation it returns as a layer at the selection, in a group named after the prompt.",
                name,
            )
        else:
            procedure.set_menu_label("_Expand...")
            procedure.set_documentation(
                "Grow the canvas and fill the new area with a genfill server",
                "Grows the canvas by the margins and adds each variation the server returns as a layer.",
                name,
            )
        # After the label: GIMP refuses a menu path for a procedure that has no label yet.
        procedure.add_menu_path("<Image>/Filters/Generative")
        procedure.add_string_argument("prompt", "_Prompt", "What to paint; empty continues the surroundings", "", flags)
        procedure.add_string_argument("negative-prompt", "_Negative prompt", "What not to paint", "", flags)
        if name == FILL:
            procedure.add_string_argument("mode", "_Mode", "fill, add or remove", "fill", flags)
        else:
            for side in ("left", "right", "top", "bottom"):
                procedure.add_int_argument(side, f"{side.title()} (px)", f"Pixels to add on the {side}", 0, 16384, 0, flags)
        procedure.add_string_argument("engine", "_Engine", "Engine name; empty: the server's default", "", flags)
        procedure.add_string_argument("model", "Mo_del", "Model name; empty: the engine's default", "", flags)
        procedure.add_double_argument("strength", "_Strength", "0..1; -1: the server's default", -1.0, 1.0, -1.0, flags)
        procedure.add_int_argument("variations", "_Variations", "Layers to add", 1, 8, 3, flags)
        procedure.add_int_argument("seed", "S_eed", "-1: random", -1, 2**31 - 1, -1, flags)
        procedure.add_boolean_argument("visible", "Use the _visible image", "Send the visible image, not the layer", False, flags)
        procedure.add_string_argument("server-url", "Server _address", "ws://host:port; empty: the running server's state file", "", flags)
        procedure.add_string_argument("server-token", "Server _token", "Empty: the running server's state file", "", flags)
        return procedure


    def _again_procedure(self, name):
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, _run_again, None)
        procedure.set_image_types("RGB*, GRAY*")
        procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        procedure.set_attribution("genfill", "genfill", "2025")
        procedure.set_menu_label("_Again from This Layer")
        procedure.set_documentation(
            "Fill again with the parameters kept in a genfill result layer",
            "Reads the genfill parameters of the selected layer (or of its group's shown variation) "
            "and runs that request again, with new seeds or the layer's own seed.",
            name,
        )
        procedure.add_menu_path("<Image>/Filters/Generative")
        flags = GObject.ParamFlags.READWRITE
        procedure.add_boolean_argument("same-seed", "Same _seed", "Repeat the layer's seed (one variation)", False, flags)
        procedure.add_int_argument("variations", "_Variations", "Layers to add with new seeds", 1, 8, 3, flags)
        procedure.add_string_argument("server-url", "Server _address", "ws://host:port; empty: the running server's state file", "", flags)
        procedure.add_string_argument("server-token", "Server _token", "Empty: the running server's state file", "", flags)
        return procedure


def _top_of(layer):
    """The variation's group when ``layer`` is a variation in one, else ``layer``."""
    parent = layer.get_parent()
    return parent if parent is not None and record_of(layer) is not None else layer


def _source_layer(image, drawable):
    """``(layer to read, layer to put the result above)``. A result of an earlier fill stands
    for the layer it was made from: its group holds only the filled patch, and read as it is
    the engine would see transparent surroundings. The new group goes on top of the result."""
    if drawable is None or not isinstance(drawable, Gimp.Layer):
        return drawable, None
    record = record_of(drawable)
    source = image.get_layer_by_name(record.source_layer) if record is not None and record.source_layer else None
    if source is None:
        return drawable, None
    return source, _top_of(drawable)


def record_of(layer):
    """The ``FillRecord`` kept on ``layer``, or on a group's shown (else first) variation."""
    from genfill_bridge.metadata import ANNOTATION_TYPE, from_json

    candidates = [layer]
    if layer.is_group():
        children = list(layer.get_children())
        candidates = [child for child in children if child.get_visible()] + children
    for candidate in candidates:
        parasite = candidate.get_parasite(ANNOTATION_TYPE)
        if parasite is not None:
            record = from_json(bytes(parasite.get_data())).get("layer")
            if record is not None:
                return record
    return None


def _run_again(procedure, run_mode, image, drawables, config, data):
    """Again from This Layer: the kept request once more, from the layer it was made from;
    with nothing selected, the kept box is selected first."""
    layer = drawables[0] if drawables else None
    record = record_of(layer) if layer is not None else None
    if record is None or record.mode == "expand":
        why = "comes from Expand, which this does not repeat" if record is not None else "has no genfill parameters"
        return _failed(procedure, gb.DocumentError(
            f"The selected layer {why}: select a layer a genfill fill made."),
            interactive=run_mode == Gimp.RunMode.INTERACTIVE)
    same_seed = config.get_property("same-seed")
    options = record.options(seed=record.seed if same_seed else None,
                             variations=1 if same_seed else config.get_property("variations"))
    source = image.get_layer_by_name(record.source_layer) if record.source_layer else None
    if source is None:
        options = dataclasses.replace(options, source="visible")
    settings = gb.ServerSettings(url=config.get_property("server-url") or "", token=config.get_property("server-token") or "")
    document = GimpDocument(image, source, above=_top_of(layer))

    def select_the_kept_box():
        if document.selection_bounds() is None:
            image.select_rectangle(Gimp.ChannelOps.REPLACE, *record.box)

    return _fill_with_progress(
        procedure, document, options, settings,
        interactive=run_mode == Gimp.RunMode.INTERACTIVE, before=select_the_kept_box,
    )


if __name__ == "__main__":
    Gimp.main(GenfillPlugIn.__gtype__, sys.argv)
