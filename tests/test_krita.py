"""The Krita plug-in in real Krita 5 against the real genfill server (classic engine).

- ``kritarunner`` (no window) runs the plug-in's controller and adapter: fill, expand, cancel,
  refusals, and Krita's own zip importer on the zip genfill builds.
- Full ``krita`` under Xvfb loads the plug-in the way a user gets it (installed by
  ``genfill plugin install krita`` into the test's HOME, enabled in kritarc), and a harness
  plug-in triggers its menu action, then undoes.

Each editor run gets its own HOME copied from a warmed template and runs under ``timeout``.
Provision with ``tests/editors/provision.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from genfill import Client
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "editors"))
import harness  # noqa: E402

EDITORS = harness.ROOT / "tests" / "editors"
WIDTH, HEIGHT = 301, 203
# Odd-sized, touching the right and top edges.
SELECTION = (250, 0, 51, 37)


@pytest.fixture(scope="module", autouse=True)
def krita_installed():
    harness.require("Krita 5 (kritarunner, krita) and Xvfb",
                    all(shutil.which(tool) for tool in ("kritarunner", "krita", "Xvfb")))


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(ServerConfig(write_state_file=False)) as background:
        yield background


@pytest.fixture(scope="module")
def template_home(tmp_path_factory):
    """A HOME where Krita has built its resource database once (13-19 s cold, ~1 s after)."""
    home = tmp_path_factory.mktemp("krita-home-template")
    warm = home.parent / "warm_krita.py"
    warm.write_text("def main(args):\n    open(args[0], 'w').write('warm')\n")
    done = home.parent / "warm.out"
    result = harness.run(
        ["kritarunner", "-s", "warm_krita", "-f", "main", str(done)],
        env=harness.clean_env(home, PYTHONPATH=str(warm.parent), QT_QPA_PLATFORM="offscreen"),
        timeout_s=180,
    )
    assert done.exists(), f"kritarunner did not start:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return home


def _photo() -> np.ndarray:
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1), (x * 3 + y) % 256], axis=2)
    rgb = np.clip(rgb + rng.integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)
    return np.dstack([rgb, np.full((HEIGHT, WIDTH), 255, np.uint8)])


def _selection_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    x, y, w, h = SELECTION
    mask[y : y + h, x : x + w] = 255
    return mask


def _install(home: Path) -> Path:
    """``genfill plugin install krita`` with this HOME: the default per-user folders."""
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_CONFIG_HOME": str(home / ".config")}
    subprocess.run([sys.executable, "-m", "genfill_server", "plugin", "install", "krita"], env=env, check=True,
                   capture_output=True, text=True)
    pykrita = home / ".local/share/krita/pykrita"
    assert (pykrita / "genfill_krita.desktop").is_file()
    assert "enable_genfill_krita=true" in (home / ".config/kritarc").read_text()
    return pykrita


def _kritarunner(scenario: str, job: dict, tmp_path: Path, template_home: Path) -> dict:
    home = harness.copy_home(template_home, tmp_path / "home")
    pykrita = _install(home)
    image = tmp_path / "in.rgba"
    _photo().tofile(image)
    job = {"width": WIDTH, "height": HEIGHT, "image": str(image), "selection": list(SELECTION),
           "workdir": str(tmp_path), "out": str(tmp_path / "out.json"), "export": str(tmp_path / "export.png"), **job}
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    env = harness.clean_env(home, PYTHONPATH=f"{pykrita}:{EDITORS}", QT_QPA_PLATFORM="offscreen")
    result = harness.run(["kritarunner", "-s", "krita_logic", "-f", "main", scenario, str(job_path)], env=env, timeout_s=240)
    out_path = Path(job["out"])
    assert out_path.exists(), f"kritarunner wrote no result (rc {result.returncode}):\n{result.stderr[-4000:]}"
    out = json.loads(out_path.read_text())
    assert "exception" not in out, out["exception"]
    return out


def test_fill_adds_variation_layers_at_the_selection(server, tmp_path, template_home):
    out = _kritarunner("fill", {"url": server.url, "token": server.token, "prompt": "sea", "variations": 3, "seed": 5},
                       tmp_path, template_home)
    assert out["python"].startswith("3.")
    assert out["ok"] is True, out["text"]
    assert out["text"].startswith("The classic engine fills from the image alone and ignored the prompt"), out["text"]
    assert out["progress"] and out["progress"][-1][0] == out["progress"][-1][1]
    [group] = out["groups"]
    assert group["name"] == "sea"
    assert [child["visible"] for child in group["children"]] == [True, False, False]
    for child in group["children"]:
        assert child["type"] == "paintlayer"
        assert child["bounds"] == list(SELECTION)  # the exact box: Krita crops bounds to content

    # The layers hold exactly what the server returns for this request (the SDK asks the same).
    canvas, mask = _photo(), _selection_mask()
    with Client(server.url, token=server.token) as client:
        expected = client.fill(canvas, mask, "sea", variations=3, seed=5)
    assert tuple(expected.box) == SELECTION
    x, y, w, h = SELECTION
    for dump, array in zip(out["variation_dumps"], expected.arrays):
        layer = np.fromfile(dump, np.uint8).reshape(HEIGHT, WIDTH, 4)
        assert np.array_equal(layer[y : y + h, x : x + w], array)
        assert not layer[mask == 0].any()

    exported = np.asarray(Image.open(out["export"]).convert("RGBA"))
    assert exported.shape == canvas.shape
    assert np.array_equal(exported[mask == 0], canvas[mask == 0]), "pixels outside the selection changed"
    assert not np.array_equal(exported[mask > 0], canvas[mask > 0]), "the selection was not filled"


def test_expand_grows_the_canvas(server, tmp_path, template_home):
    out = _kritarunner("expand", {"url": server.url, "token": server.token, "margins": {"left": 7, "bottom": 5}},
                       tmp_path, template_home)
    assert out["ok"] is True, out["text"]
    assert out["size"] == [WIDTH + 7, HEIGHT + 5]
    exported = np.asarray(Image.open(out["export"]).convert("RGBA"))
    assert exported.shape == (HEIGHT + 5, WIDTH + 7, 4)
    assert np.array_equal(exported[0:HEIGHT, 7:], _photo()), "the original pixels moved or changed"
    assert exported[:, :7, 3].all() and exported[HEIGHT:, :, 3].all(), "the new area was not filled"


def test_cancel_leaves_the_document_unchanged(server, tmp_path, template_home):
    out = _kritarunner("cancel", {"url": server.url, "token": server.token, "selection": [0, 0, 260, 190]},
                       tmp_path, template_home)
    assert out["ok"] is False and out["text"] == "Cancelled."
    assert out["groups"] == []


def test_stopped_server_is_said_plainly(tmp_path, template_home):
    with BackgroundServer(ServerConfig(write_state_file=False)) as stopped:
        url, token = stopped.url, stopped.token
    out = _kritarunner("refused", {"url": url, "token": token}, tmp_path, template_home)
    assert out["ok"] is False
    assert "not running" in out["text"] and "genfill serve" in out["text"]


def test_wrong_token_is_said_plainly(server, tmp_path, template_home):
    out = _kritarunner("refused", {"url": server.url, "token": "wrong"}, tmp_path, template_home)
    assert out["ok"] is False and "refused the token" in out["text"]


def test_no_selection_is_said_plainly(server, tmp_path, template_home):
    out = _kritarunner("refused", {"url": server.url, "token": server.token, "clear_selection": True},
                       tmp_path, template_home)
    assert out["started"] is False and "Nothing is selected" in out["text"]


def test_16_bit_documents_are_refused_with_what_to_do(server, tmp_path, template_home):
    out = _kritarunner("refused", {"url": server.url, "token": server.token, "depth": "U16"}, tmp_path, template_home)
    assert out["started"] is False
    assert "16-bit integer RGB" in out["text"] and "Convert Image Color Space" in out["text"]
    assert out["groups"] == []


def test_zip_imports_through_kritas_importer(tmp_path, template_home):
    from genfill_bridge.install import build_krita_zip

    archive = build_krita_zip(tmp_path / "genfill_krita.zip")
    resources = tmp_path / "resources"
    resources.mkdir()
    out = _kritarunner("import_zip", {"zip": str(archive), "resources": str(resources)}, tmp_path, template_home)
    assert out["imported"] == ["genfill_krita"]
    assert out["module"].startswith(str(resources / "pykrita" / "genfill_krita"))
    assert (resources / "pykrita/genfill_krita/genfill_bridge/_vendor/websockets/LICENSE").is_file()


@pytest.fixture(scope="module")
def xvfb():
    read, write = os.pipe()
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        display = pipe.readline().strip()
    assert display, "Xvfb did not report a display"
    yield f":{display}"
    process.terminate()
    process.wait(10)


def _full_krita(tmp_path: Path, template_home: Path, display: str, job: dict, env: dict | None = None) -> dict:
    """Runs full Krita with the plug-in installed as a user gets it and the driver plug-in
    playing ``job``; returns what the driver wrote."""
    home = harness.copy_home(template_home, tmp_path / "home")
    pykrita = _install(home)
    shutil.copy(EDITORS / "krita_driver/genfill_ci_driver.desktop", pykrita)
    shutil.copytree(EDITORS / "krita_driver/genfill_ci_driver", pykrita / "genfill_ci_driver")
    from genfill_bridge.install import enable_in_kritarc

    enable_in_kritarc(home / ".config/kritarc", "genfill_ci_driver")
    image = tmp_path / "in.rgba"
    _photo().tofile(image)
    job = {"width": WIDTH, "height": HEIGHT, "image": str(image), "selection": list(SELECTION),
           "out": str(tmp_path / "out.json"), "export": str(tmp_path / "filled.png"),
           "export_after_undo": str(tmp_path / "undone.png"), "wait_ms": 120000, "stacks_after_s": 200, **job}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = harness.clean_env(home, DISPLAY=display, GENFILL_CI_JOB=str(tmp_path / "job.json"), **(env or {}))
    out_path = tmp_path / "out.json"
    partial = Path(str(out_path) + ".partial")
    # Krita 5.1 under Xvfb now and then exits during start-up, before any plug-in code runs
    # (about one run in eight here). That start, and only that, is tried once more.
    for _attempt in range(2):
        result = harness.run(["krita", "--nosplash"], env=env, timeout_s=int(os.environ.get("GENFILL_KRITA_TIMEOUT_S", "240")))
        if out_path.exists() or partial.exists():
            break
    progress = partial.read_text() if partial.exists() else "(it never started)"
    assert out_path.exists(), (
        f"krita did not finish the scenario (rc {result.returncode}); it got to {progress}\n"
        f"stderr:\n{result.stderr[-3000:]}"
    )
    out = json.loads(out_path.read_text())
    assert "exception" not in out, out["exception"]
    assert "slot_exceptions" not in out, out["slot_exceptions"][0]
    out["_job"] = job
    return out


LONG_STATUS = ("The genfill server could not fill: this is a long status line that wraps over several lines "
               "of the docker, the way a real warning or error does, and must not squeeze anything else.")


@pytest.fixture(scope="module")
def painter_session(server, template_home, xvfb, tmp_path_factory):
    """One full-Krita session as a painter has it: the server found through its state file,
    two Fills in a row from the menu action (the second with the group the first left
    active), screenshots and widget sizes of the docker in a 1000 px high window."""
    from genfill.state import ServerState, write_state

    tmp_path = harness.screenshot_folder("krita-painter-session")  # kept: out.json explains a failure
    screenshots = harness.screenshot_folder("krita")
    state = write_state(ServerState(url=server.url, token=server.token, pid=os.getpid(), version="test"),
                        tmp_path / "server.json")
    job = {"fills": [{"prompt": "a calm sea", "variations": 2, "seed": 9}, {"prompt": "rocks", "variations": 1, "seed": 3}],
           "wait_catalogue_ms": 15000, "window_size": [1280, 1000], "screenshots": str(screenshots),
           "measure": {"status": LONG_STATUS}, "undo": 1, "strip": True}
    try:
        out = _full_krita(tmp_path, template_home, xvfb, job, env={"GENFILL_STATE_FILE": str(state)})
    finally:
        shutil.rmtree(tmp_path / "home", ignore_errors=True)  # Krita's HOME: 170 MB
    print(f"screenshots in {screenshots}")
    return out


def test_full_krita_menu_action_fills_and_undo_removes(painter_session):
    out = painter_session
    job = out["_job"]
    assert out["docker_found"] and out["action_found"]
    assert out["ok"] is True, out["text"]
    assert out["groups_after_fill"] == [
        {"name": "a calm sea", "children": [["a calm sea - variation 1", True], ["a calm sea - variation 2", False]]}
    ]
    canvas, mask = _photo(), _selection_mask()
    filled = np.asarray(Image.open(job["export"]).convert("RGBA"))
    assert np.array_equal(filled[mask == 0], canvas[mask == 0])
    assert not np.array_equal(filled[mask > 0], canvas[mask > 0])
    # One undo takes the last fill away, all of it, and leaves the first one as it was.
    assert out["undo_texts"] == ["Undo Add Layer"]
    assert out["groups_after_undo"] == out["groups_after_fill"]
    assert np.array_equal(np.asarray(Image.open(job["export_after_undo"]).convert("RGBA")), filled)


def test_ignored_prompt_is_said_in_the_status_line(painter_session):
    first = painter_session["fills"][0]
    assert first["status_label"].startswith("The classic engine fills from the image alone and ignored the prompt"), first
    assert "Added 2 layer(s)" in first["status_label"]


def test_second_fill_with_the_new_group_active_fills_again(painter_session):
    first, second = painter_session["fills"]
    assert first["ok"] is True, first["text"]
    assert second["active"] == ["a calm sea", "grouplayer"]
    assert second["ok"] is True, second["text"]
    # Above the group that was active (bottom first), so the new result is what shows.
    assert [group["name"] for group in second["groups"]] == ["a calm sea", "rocks"]
    # The group is a result: the layer it was made from is read, not its transparent patch.
    assert "Read the layer 'Background', which the fill 'a calm sea' was made from." in second["status_label"]
    assert first["strip"] == 2 and second["strip"] == 1, "the staging strip does not show the variations"
    assert second["history"][1:3] == ["rocks", "a calm sea"], second["history"]
    [rocks] = [group for group in second["groups"] if group["name"] == "rocks"]
    assert rocks["children"] == [["rocks - variation 1", True]]


def test_docker_lists_the_servers_engines_and_models_without_a_refresh(painter_session, server):
    with Client(server.url, token=server.token) as client:
        hello = client.hello
    available = [engine.name for engine in hello.engines if engine.available]
    assert available, "the test server offers no engine"
    for name in available:
        assert name in painter_session["engines"], painter_session["engines"]


def test_docker_widgets_keep_usable_sizes_in_a_1000_px_window(painter_session):
    widgets = painter_session["widgets"]
    assert len(widgets) > 20, widgets
    narrow = [w for w in widgets if w["width"] < 24]
    assert not narrow, f"widgets narrower than 24 px: {narrow}"
    squeezed = [w for w in widgets if w["height"] < min(w["min_height"], 16) or w["width"] < min(w["min_width"], 40)]
    assert not squeezed, f"widgets squeezed below their minimum size: {squeezed}"
    spins = [w for w in widgets if w["text"].startswith(("L ", "R ", "T ", "B ")) or w["class"] == "QSpinBox"]
    assert spins and all(w["width"] >= 60 for w in spins), spins
    assert painter_session["server_group"]["inside"], f"the Server group is clipped: {painter_session['server_group']}"
    needed, shown = painter_session["content_width"]
    assert needed <= shown, f"the docker needs {needed} px across and has {shown}: its left or right is cut off"
    for path in painter_session["screenshots"]:
        assert Image.open(path).size[0] > 100


def test_staging_strip_regenerate_apply_and_parameters_after_reopen(server, tmp_path, template_home):
    out = _kritarunner("staging", {"url": server.url, "token": server.token}, tmp_path, template_home)
    assert out["first"]["ok"] is True, out["first"]["text"]
    assert out["strip"]["thumbnails"] == 3 and out["strip"]["seeds"] == [5, 6, 7]
    assert all(max(size) == 72 for size in out["strip"]["sizes"]), out["strip"]["sizes"]
    assert out["shown_visibility"] == [False, False, True]
    # Again with seed: the shown variation's request and seed, one layer, the same pixels.
    assert out["again_options"] == {"seed": 7, "variations": 1, "prompt": "sea\nat dusk", "source": "Background"}
    assert out["again"]["ok"] is True and out["again_seeds"] == [7] and out["again_same_pixels"] is True
    # Regenerate: new seeds, and the variations it replaces are gone.
    assert out["regenerate"]["ok"] is True
    assert len(out["regenerate_seeds"]) == 2 and 7 not in out["regenerate_seeds"]
    assert [g["name"] for g in out["groups_after_regenerate"]] == ["sea at dusk", "sea at dusk"]
    prompts = {prompt for prompt, _seed, _box, _engine in out["records"].values()}
    assert prompts == {"sea\nat dusk"}
    assert all(box == list(SELECTION) and engine == "classic" for _p, _s, box, engine in out["records"].values())
    # Apply as a layer: the shown variation stays, alone in its group.
    regenerated = out["groups_after_apply_layer"][0]
    assert len(regenerated["children"]) == 1
    # Saved and reopened: the parameters are still there, and they reproduce the layer.
    assert out["saved"] is True
    assert sorted(record[1] for record in out["reopened"]) == sorted([7, out["regenerate_seeds"][1]])
    assert all(record[0] == "sea\nat dusk" and record[3] == "fill" for record in out["reopened"])
    assert out["reopened_source"] == "Background"
    assert out["repeat"]["ok"] is True and out["repeat_same_pixels"] is True
    assert out["groups_after_discard"] == ["sea at dusk", "sea at dusk"]
    assert out["flatten"]["ok"] is True, out["flatten"]["text"]
    assert out["flatten_order"] == ["Background", "sea at dusk", "sea at dusk", "sea at dusk"]
    assert out["groups_after_flatten"] == ["sea at dusk", "sea at dusk"] and out["flattened_changed"] is True
    assert out["after_flatten_order"] == ["Background", "sea at dusk", "sea at dusk"]


def test_a_group_layer_is_read_as_it_looks(server, tmp_path, template_home):
    out = _kritarunner("group_source", {"url": server.url, "token": server.token}, tmp_path, template_home)
    assert out["pixel_data_of_group"] == 0, "Krita gives a group's pixels now: the projection path is untested"
    assert out["ok"] is True, out["text"]
    assert [group["name"] for group in out["groups"]] == ["painting", "genfill fill"]  # bottom first


@pytest.fixture(scope="module")
def diffusion_server(tmp_path_factory):
    """A server with a tiny random-weight SD 1.5 inpainting model (runs on the CPU)."""
    from genfill_server.engines import default_engines

    import tiny_models

    models = tmp_path_factory.mktemp("models")
    tiny_models.tiny_sd15_inpaint(vae_attention=False).save_pretrained(models / "tiny-inpaint")
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def test_previews_reach_the_docker_while_the_job_runs(diffusion_server, tmp_path, template_home):
    out = _kritarunner("previews", {"url": diffusion_server.url, "token": diffusion_server.token,
                                    "model": "tiny-inpaint", "steps": 4}, tmp_path, template_home)
    assert out["ok"] is True, out["text"]
    assert out["previews"], "no preview image reached the controller"
    for size, width, height in out["previews"]:
        assert width > 0 and height > 0 and size == width * height * 4
    assert [group["name"] for group in out["groups"]] == ["a window"]


def test_strip_buttons_in_the_docker(painter_session):
    """The docker's own buttons, clicked in full Krita after an undo took the last fill away."""
    assert painter_session["strip_after_undo"] == [0, False], "the strip still shows an undone fill"
    strip = painter_session["strip"]
    assert strip["fill"]["ok"] is True and strip["fill"]["strip"] == 3
    assert strip["show"] == {"visible": [False, True, False], "seeds": [11, 12, 13]}
    waves = lambda step: [g for g in strip[step]["groups"] if g["name"] == "waves"]  # noqa: E731
    assert strip["regenerate"]["ok"] is True and strip["regenerate"]["strip"] == 3
    assert len(waves("regenerate")) == 1, "Regenerate did not replace the variations"
    assert strip["again"]["ok"] is True and strip["again"]["strip"] == 1
    assert [len(g["children"]) for g in waves("again")] == [3, 1]
    assert strip["apply"]["strip"] == 0 and [len(g["children"]) for g in waves("apply")] == [3, 1]
    assert strip["from_layer_active"].startswith("waves - variation")
    assert strip["from_layer"]["ok"] is True, strip["from_layer"]
    assert [len(g["children"]) for g in waves("from_layer")] == [3, 1, 1], "From this layer did not go on top"
    assert strip["discard"]["strip"] == 0 and len(waves("discard")) == 2


def _preview_box(server, model: str) -> tuple[int, int, int, int]:
    """The box the engine's previews picture: its context box, as the server computes it."""
    from genfill.fill import context_box

    with Client(server.url, token=server.token) as client:
        [native] = [m.native_size for m in client.hello.models if m.name == model]
    return tuple(context_box(_selection_mask(), native_size=native))


def test_preview_layer_shows_previews_at_the_box_and_goes_with_the_job(diffusion_server, tmp_path, template_home):
    out = _kritarunner("preview_layer", {"url": diffusion_server.url, "token": diffusion_server.token,
                                         "model": "tiny-inpaint", "steps": 16, "cancel_steps": 100},
                       tmp_path, template_home)
    assert out["fill"]["ok"] is True, out["fill"]["text"]
    before = out["before"]
    assert before == [["Background", "paintlayer"]]
    seen = out["seen"]
    assert seen, "no preview reached the canvas"
    box = _preview_box(diffusion_server, "tiny-inpaint")
    for entry in seen:
        # Right above the source layer, for as long as the job runs, at the previews' box.
        assert entry["layers"] == before + [["genfill preview", "paintlayer"]], entry
        assert tuple(entry["box"]) == box and entry["visible"] is True
        # Masked by the selection: what shows is what the result will replace.
        assert entry["bounds"] == list(SELECTION)
    # Throttled: never two repaints within the interval, never more repaints than previews.
    assert len(seen) <= out["received"]
    assert all(b["t"] - a["t"] >= 0.2 for a, b in zip(seen, seen[1:])), [e["t"] for e in seen]

    # The first repaint is the first preview, scaled to the box (the same pixels, within
    # what two smooth scalers differ by).
    path, width, height, preview_box = out["previews"][0]
    assert tuple(preview_box) == box
    x, y, w, h = box
    preview = np.fromfile(path, np.uint8).reshape(height, width, 4)
    expected = np.asarray(Image.fromarray(preview).resize((w, h), Image.BILINEAR)).astype(int)
    layer = np.fromfile(seen[0]["pixels"], np.uint8).reshape(h, w, 4).astype(int)
    inside = _selection_mask()[y : y + h, x : x + w] > 0
    assert (layer[inside][:, 3] == 255).all() and (layer[~inside][:, 3] == 0).all()
    difference = np.abs(layer[inside][:, :3] - expected[inside][:, :3])
    assert difference.mean() < 12, difference.mean()

    # After the result: the layers as they were, plus the result group; no preview left.
    assert out["after_result"] == before + [["a window", "grouplayer"]]
    assert [bounds for _name, bounds in out["result_children"]] == [list(SELECTION)] * 2

    # Cancelled while a preview shows: gone too, and the document is as before the job. The
    # layer goes where the result would: right above the layer read (the job names it).
    [background, *rest] = out["before_cancel"]
    assert out["cancel_seen"] and out["cancel_seen"][0] == [background, ["genfill preview", "paintlayer"], *rest]
    assert out["cancel"]["ok"] is False and out["cancel"]["text"] == "Cancelled."
    assert out["after_cancel"] == out["before_cancel"] == out["after_result"]
    # Never in the saved file.
    assert out["saved"] is True and out["reopened"] == out["after_result"]


def test_full_krita_preview_layer_from_the_menu_action(diffusion_server, template_home, xvfb):
    """Full Krita, the docker's Fill action with a diffusion model: the preview layer shows on
    the canvas (a screenshot of the screen is kept), the result replaces it, and closing the
    docker mid-job cancels the job and takes the layer away."""
    from genfill.state import ServerState, write_state

    tmp_path = harness.screenshot_folder("krita-preview-session")
    screenshots = harness.screenshot_folder("krita-preview")
    state = write_state(ServerState(url=diffusion_server.url, token=diffusion_server.token, pid=os.getpid(),
                                    version="test"), tmp_path / "server.json")
    job = {"wait_catalogue_ms": 15000, "screenshots": str(screenshots), "preview": {"model": "tiny-inpaint"}}
    try:
        out = _full_krita(tmp_path, template_home, xvfb, job, env={"GENFILL_STATE_FILE": str(state)})
    finally:
        shutil.rmtree(tmp_path / "home", ignore_errors=True)
    print(f"screenshots in {screenshots}")
    assert out["model"] == "tiny-inpaint", out.get("model")
    before = out["before"]
    preview = ["genfill preview", "paintlayer", True]
    result, closed = out["result"], out["closed"]
    assert result["while"] == before + [preview], result
    assert tuple(result["box"]) == _preview_box(diffusion_server, "tiny-inpaint")
    assert result["still_running"] is True, "the job ended before the screenshot: make it longer"
    # The painter's layer stays the active one: a stroke during the job never lands on the preview.
    assert result["active_while"] == "Background"
    assert Path(result["screenshot"]).is_file(), result["screenshot"]
    assert result["ok"] is True, result["text"]
    assert result["after"] == before + [["result", "grouplayer", True]]
    assert result["undo_text"] == "Undo Add Layer"
    # Closing the docker mid-job: cancelled, the layer gone at once.
    assert closed["while"][-1] == preview, closed
    assert preview not in closed["after_close"]
    assert closed["ok"] is False and closed["text"] == "Cancelled."
    assert closed["after"] == result["after"]
    assert closed["active_after"] == "result"  # as the first fill left it
    # Krita puts the layer's arrival and removal in the undo history; undoing back across
    # them brings back an empty, hidden layer only, never a stale preview.
    for step in out["undo"]:
        assert not any(step["preview_pixels"]), step
        assert all(visible is False for name, _type, visible in step["layers"] if name == "genfill preview"), step
    assert out["undo"][-1]["layers"] == before, out["undo"]
