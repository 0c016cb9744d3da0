"""The Fill / Expand dialog of the GIMP plug-in, in GTK 3 widgets (GIMP 3's toolkit).

The drop-downs come from the server's ``/v1/models`` (with the token from the state file or
the plug-in's settings; the dialog has no token field). The dialog stays open while the job
runs: its Cancel then cancels the job on the server, and GIMP's progress bar shows the steps.

``FillDialog`` takes the dialog class: ``GimpUi.Dialog`` in the plug-in, ``Gtk.Dialog`` where
GIMP's UI library cannot start (a test without a GIMP core).
"""

import gi

gi.require_version("Gtk", "3.0")
from genfill_bridge.catalogue import choices  # noqa: E402
from gi.repository import Gtk  # noqa: E402

FILL_MODES = ("fill", "add", "remove")
SIDES = (("left", "_Left"), ("right", "Ri_ght"), ("top", "_Top"), ("bottom", "Botto_m"))


class FillDialog:
    """The dialog's widgets and what they say.

    Args:
        dialog_class: ``GimpUi.Dialog`` or ``Gtk.Dialog``.
        expand: the Expand dialog (margins) rather than the Fill one (mode).
        catalogue: the server's ``/v1/models`` answer, or ``None`` when it could not be read
            (``error`` then says why and the drop-downs offer the server's defaults only).
        initial: the last values (the procedure's config), by argument name.
        history: the last prompts, newest first, for the History drop-down.
    """

    def __init__(self, dialog_class, *, expand, catalogue, error=None, initial=None, history=()):
        initial = initial or {}
        self.expand = expand
        self.catalogue = catalogue
        self.dialog = dialog_class(title="Generative Expand" if expand else "Generative Fill")
        self.dialog.set_default_size(460, -1)
        self.dialog.add_button("_Cancel", Gtk.ResponseType.CANCEL)
        self.ok_button = self.dialog.add_button("E_xpand" if expand else "_Fill", Gtk.ResponseType.OK)
        self.dialog.set_default_response(Gtk.ResponseType.OK)
        grid = self.grid = Gtk.Grid(column_spacing=12, row_spacing=6, margin=12)
        self.dialog.get_content_area().add(grid)
        self._row = 0

        self.prompt = Gtk.TextView(wrap_mode=Gtk.WrapMode.WORD_CHAR, accepts_tab=False)
        self.prompt.get_buffer().set_text(initial.get("prompt") or "")
        scrolled = Gtk.ScrolledWindow(min_content_height=60, hexpand=True)
        scrolled.set_shadow_type(Gtk.ShadowType.IN)
        scrolled.add(self.prompt)
        self._add(grid, "_Prompt", scrolled, self.prompt)
        self.history = Gtk.ComboBoxText()
        self.history.append("", "(recent prompts)" if history else "(no prompts yet)")
        for prompt in history:
            self.history.append(prompt, " ".join(prompt.split())[:60])
        self.history.set_active(0)
        self.history.connect("changed", self._history_picked)
        self._add(grid, "_History", self.history)
        self.negative = Gtk.Entry(text=initial.get("negative-prompt") or "", activates_default=True)
        self._add(grid, "_Negative prompt", self.negative)
        self.mode = None
        self.margins = {}
        if expand:
            sides = Gtk.Grid(column_spacing=6, row_spacing=6)
            for index, (side, label) in enumerate(SIDES):
                spin = Gtk.SpinButton.new_with_range(0, 16384, 1)
                spin.set_value(initial.get(side) or 0)
                self.margins[side] = spin
                text = Gtk.Label.new_with_mnemonic(label)
                text.set_mnemonic_widget(spin)
                text.set_xalign(1.0)
                sides.attach(text, 2 * (index % 2), index // 2, 1, 1)
                sides.attach(spin, 2 * (index % 2) + 1, index // 2, 1, 1)
            self._add(grid, "Grow by (px)", sides)
        else:
            self.mode = Gtk.ComboBoxText()
            for mode in FILL_MODES:
                self.mode.append(mode, mode.title())
            self.mode.set_active_id(initial.get("mode") if initial.get("mode") in FILL_MODES else "fill")
            self.mode.connect("changed", lambda *_: self._fill_choices())
            self._add(grid, "_Mode", self.mode)
        self.engine = Gtk.ComboBoxText()
        self.engine.connect("changed", lambda *_: self._engine_changed())
        self._add(grid, "_Engine", self.engine)
        self.model = Gtk.ComboBoxText()
        self._add(grid, "M_odel", self.model)

        self.strength = Gtk.Scale.new_with_range(Gtk.Orientation.HORIZONTAL, 0.0, 1.0, 0.05)
        self.strength.set_digits(2)
        self.strength.set_hexpand(True)
        strength = initial.get("strength")
        self.strength.set_value(strength if strength is not None and strength >= 0 else 1.0)
        self.strength_default = Gtk.CheckButton.new_with_mnemonic("Server defa_ult")
        self.strength_default.set_active(strength is None or strength < 0)
        self.strength_default.connect("toggled", lambda *_: self._engine_changed())
        self.strength_row = Gtk.Box(spacing=6)
        self.strength_row.pack_start(self.strength, True, True, 0)
        self.strength_row.pack_start(self.strength_default, False, False, 0)
        self._add(grid, "_Strength", self.strength_row, self.strength)

        self.variations = Gtk.SpinButton.new_with_range(1, 8, 1)
        self.variations.set_value(initial.get("variations") or 3)
        self._add(grid, "_Variations", self.variations)
        seed = initial.get("seed")
        self.seed = Gtk.SpinButton.new_with_range(0, 2**31 - 1, 1)
        self.seed.set_value(seed if seed is not None and seed >= 0 else 0)
        self.seed.set_hexpand(True)
        self.seed_random = Gtk.CheckButton.new_with_mnemonic("_Random")
        self.seed_random.set_active(seed is None or seed < 0)
        self.seed_random.connect("toggled", lambda *_: self.seed.set_sensitive(not self.seed_random.get_active()))
        seed_row = Gtk.Box(spacing=6)
        seed_row.pack_start(self.seed, True, True, 0)
        seed_row.pack_start(self.seed_random, False, False, 0)
        self._add(grid, "See_d", seed_row, self.seed)
        self.seed.set_sensitive(not self.seed_random.get_active())
        self.visible = Gtk.CheckButton.new_with_mnemonic("Use the visi_ble image, not the layer")
        self.visible.set_active(bool(initial.get("visible")))
        grid.attach(self.visible, 1, self._row, 1, 1)
        self._row += 1
        self.status = Gtk.Label(label=error or "", wrap=True, xalign=0.0, max_width_chars=50, selectable=True)
        grid.attach(self.status, 0, self._row, 2, 1)
        self._row += 1
        self._wanted = {"engine": initial.get("engine") or "", "model": initial.get("model") or ""}
        self._fill_choices()
        self.dialog.show_all()

    def _history_picked(self, combo):
        prompt = combo.get_active_id()
        if prompt:
            self.prompt.get_buffer().set_text(prompt)

    def _add(self, grid, label, widget, mnemonic_widget=None):
        text = Gtk.Label.new_with_mnemonic(label) if "_" in label else Gtk.Label(label=label)
        if "_" in label:
            text.set_mnemonic_widget(mnemonic_widget or widget)
        text.set_xalign(1.0)
        text.set_valign(Gtk.Align.START if isinstance(widget, Gtk.ScrolledWindow) else Gtk.Align.CENTER)
        grid.attach(text, 0, self._row, 1, 1)
        grid.attach(widget, 1, self._row, 1, 1)
        self._row += 1

    @property
    def mode_name(self):
        return "expand" if self.expand else (self.mode.get_active_id() or "fill")

    def _fill_choices(self):
        catalogue = self.catalogue or {"engines": [], "models": [], "default_engine": ""}
        self.choices = choices(catalogue, self.mode_name)
        for combo, entries, key in ((self.engine, self.choices.engines, "engine"), (self.model, self.choices.models, "model")):
            current = combo.get_active_id() if combo.get_active_id() is not None else self._wanted[key]
            combo.remove_all()
            for label, value in entries:
                combo.append(value, label)
            if not combo.set_active_id(current):
                combo.set_active(0)
        self._engine_changed()

    def _engine_changed(self):
        engine = self.engine.get_active_id() or self.choices.default_engine
        honours_strength = engine in self.choices.strength_engines
        self.strength_default.set_sensitive(honours_strength)
        self.strength.set_sensitive(honours_strength and not self.strength_default.get_active())
        notes = []
        if self.catalogue is not None and engine and engine not in self.choices.prompt_engines:
            notes.append(f"The {engine} engine fills from the image alone: it ignores the prompt.")
        if self.catalogue is not None and engine and not honours_strength:
            notes.append(f"The {engine} engine sets its own strength.")
        if self.catalogue is not None:
            self.status.set_text(" ".join(notes))

    def values(self):
        """The dialog's values by the procedure's argument names (to keep in its config)."""
        buffer = self.prompt.get_buffer()
        values = {
            "prompt": buffer.get_text(buffer.get_start_iter(), buffer.get_end_iter(), False),
            "negative-prompt": self.negative.get_text(),
            "engine": self.engine.get_active_id() or "",
            "model": self.model.get_active_id() or "",
            "strength": -1.0 if self.strength_default.get_active() or not self.strength.get_sensitive() else self.strength.get_value(),
            "variations": int(self.variations.get_value()),
            "seed": -1 if self.seed_random.get_active() else int(self.seed.get_value()),
            "visible": self.visible.get_active(),
        }
        if self.expand:
            values.update({side: int(spin.get_value()) for side, spin in self.margins.items()})
        else:
            values["mode"] = self.mode_name
        return values

    def running(self, running):
        """While the job runs only Cancel stays live: it cancels the job."""
        self.ok_button.set_sensitive(not running)
        for widget in self.grid.get_children():
            widget.set_sensitive(not running or widget is self.status)

    def say(self, text):
        self.status.set_text(text)
