"""The GIMP 3 plug-in in real GIMP 3.0 (Debian trixie chroot) against the real genfill server.

``gimp-console-3.0`` runs a batch script that calls the plug-in's PDB procedures the way a
script would (non-interactive, same arguments as the dialog). The plug-in is installed by
``genfill plugin install gimp`` into the run's own HOME inside the chroot. The chroot shares
the host's network, so the server on 127.0.0.1 is reachable from it.

Provision with ``tests/editors/provision.sh`` (builds the chroot once per machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from genfill import Client
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "editors"))
import harness  # noqa: E402

CHROOT = harness.GIMP_CHROOT
WIDTH, HEIGHT = 301, 203
SELECTION = (0, 120, 37, 83)  # odd-sized, touching the left and bottom edges


@pytest.fixture(scope="module", autouse=True)
def gimp_installed():
    harness.require(f"GIMP 3 (chroot at {CHROOT})", (CHROOT / "usr/bin/gimp-console-3.0").exists())
    if not os.path.ismount(CHROOT / "proc"):
        subprocess.run(["mount", "-t", "proc", "proc", str(CHROOT / "proc")], check=True)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(ServerConfig(write_state_file=False)) as background:
        yield background


class ChrootDir:
    """A folder inside the chroot: ``host`` is its path here, ``inside`` the path GIMP sees."""

    def __init__(self) -> None:
        self.inside = Path("/tmp") / f"genfill-test-{uuid.uuid4().hex[:12]}"
        self.host = CHROOT / self.inside.relative_to("/")
        self.host.mkdir(parents=True)

    def to_inside(self, path: Path) -> str:
        return str(Path("/") / path.relative_to(CHROOT))


@pytest.fixture(scope="module")
def template_home():
    """A HOME where GIMP has started once with the plug-in installed (and registered it)."""
    folder = ChrootDir()
    home = folder.host / "home"
    _install(home)
    _gimp(folder, home, "print('warm')", timeout_s=180)
    assert (home / ".config/GIMP/3.0/pluginrc").exists(), "GIMP did not start"
    yield folder, home
    shutil.rmtree(folder.host, ignore_errors=True)


@pytest.fixture
def workdir(template_home):
    folder = ChrootDir()
    shutil.copytree(template_home[1], folder.host / "home", symlinks=True)
    yield folder
    shutil.rmtree(folder.host, ignore_errors=True)


def _install(home: Path) -> None:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    subprocess.run([sys.executable, "-m", "genfill_server", "plugin", "install", "gimp"], env=env, check=True,
                   capture_output=True, text=True)
    script = home / ".config/GIMP/3.0/plug-ins/genfill/genfill.py"
    assert os.access(script, os.X_OK)


def _gimp(folder: ChrootDir, home: Path, code: str, *, timeout_s: int = 180, **env: str):
    inside_home = folder.to_inside(home)
    environment = {"HOME": inside_home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                   "XDG_CONFIG_HOME": f"{inside_home}/.config", "XDG_CACHE_HOME": f"{inside_home}/.cache",
                   "XDG_DATA_HOME": f"{inside_home}/.local/share", "XDG_RUNTIME_DIR": f"{inside_home}/.runtime",
                   "GEGL_SWAP": f"{inside_home}/swap", **env}
    (home / ".runtime").mkdir(mode=0o700, exist_ok=True)
    command = ["chroot", str(CHROOT), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()),
               "gimp-console-3.0", "-i", "--batch-interpreter=python-fu-eval", "-b", code, "--quit"]
    return harness.run(command, env={"PATH": os.environ["PATH"]}, timeout_s=timeout_s)


def _photo() -> np.ndarray:
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([(x * 2 + y) % 256, y * 255 // (HEIGHT - 1), 255 - x * 255 // (WIDTH - 1)], axis=2)
    rgb = np.clip(rgb + rng.integers(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    return np.dstack([rgb, np.full((HEIGHT, WIDTH), 255, np.uint8)])


def _mask(selection=SELECTION) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    x, y, w, h = selection
    mask[y : y + h, x : x + w] = 255
    return mask


def _batch(workdir: ChrootDir, procedure: str, args: dict, *, image: np.ndarray | None = None, on_start=None, **job) -> dict:
    image = _photo() if image is None else image
    image.tofile(workdir.host / "in.rgba")
    job = {"width": image.shape[1], "height": image.shape[0], "image": str(workdir.inside / "in.rgba"),
           "selection": list(SELECTION), "procedure": procedure, "args": args, "workdir": str(workdir.inside),
           "out": str(workdir.inside / "out.json"), "export": str(workdir.inside / "export.png"), **job}
    (workdir.host / "job.json").write_text(json.dumps(job))
    shutil.copy(harness.ROOT / "tests/editors/gimp_batch.py", workdir.host / "batch.py")
    code = f"exec(open('{workdir.inside / 'batch.py'}').read())"
    if on_start is not None:
        threading.Thread(target=on_start, daemon=True).start()
    result = _gimp(workdir, workdir.host / "home", code, GENFILL_CI_JOB=str(workdir.inside / "job.json"))
    out_path = workdir.host / "out.json"
    assert out_path.exists(), f"GIMP wrote no result (rc {result.returncode}):\n{result.stderr[-4000:]}"
    out = json.loads(out_path.read_text())
    assert "exception" not in out, out["exception"]
    out["_stderr"] = result.stderr[-3000:]
    out["_host"] = lambda inside: CHROOT / Path(inside).relative_to("/")
    return out


def test_fill_from_the_pdb_adds_layers_at_the_selection(server, workdir):
    args = {"prompt": "moss", "variations": 2, "seed": 21, "server-url": server.url, "server-token": server.token}
    out = _batch(workdir, "python-fu-genfill-fill", args)
    assert out["procedure_found"]
    assert out["status"] == "success", out.get("message")
    assert "classic engine fills from the image alone and ignored the prompt" in out["_stderr"], out["_stderr"]
    [group] = out["groups"]
    assert group["name"] == "moss"
    assert [child["visible"] for child in group["children"]] == [True, False]

    canvas, mask = _photo(), _mask()
    with Client(server.url, token=server.token) as client:
        expected = client.fill(canvas, mask, "moss", variations=2, seed=21)
    for child, array in zip(group["children"], expected.arrays):
        assert child["box"] == list(SELECTION) == list(expected.box)
        x, y, w, h = child["box"]
        layer = np.fromfile(out["_host"](child["dump"]), np.uint8).reshape(h, w, 4)
        assert np.array_equal(layer, array), "the layer differs from what the server returned"

    exported = np.asarray(Image.open(out["_host"](str(workdir.inside / "export.png"))).convert("RGBA"))
    assert exported.shape == canvas.shape
    assert np.array_equal(exported[mask == 0], canvas[mask == 0]), "pixels outside the selection changed"
    assert not np.array_equal(exported[mask > 0], canvas[mask > 0]), "the selection was not filled"


def test_result_layers_keep_their_parameters_in_the_xcf(server, workdir):
    from genfill_bridge.metadata import from_json

    args = {"prompt": "moss\non stone", "variations": 2, "seed": 21, "server-url": server.url, "server-token": server.token}
    out = _batch(workdir, "python-fu-genfill-fill", args, xcf=str(workdir.inside / "saved.xcf"), export=None,
                 again={"same-seed": True, "server-url": server.url, "server-token": server.token})
    assert out["status"] == "success", out.get("message")
    [group] = out["groups"]
    records = [from_json(child["parameters"])["layer"] for child in group["children"]]
    assert [record.seed for record in records] == [21, 22]
    for record in records:
        assert (record.prompt, record.mode, record.engine, tuple(record.box), record.source_layer) == (
            "moss\non stone", "fill", "classic", SELECTION, "photo")
    assert out["xcf_saved"] is True
    assert out["reopened_parameters"] == [child["parameters"] for child in group["children"]]
    # Again from This Layer, on the reopened file, with the second variation's seed: the same layer.
    assert out["again_status"] == "success", out.get("again_message")
    assert out["again_groups"] == [["moss on stone #1", 1], ["moss on stone", 2]]
    assert out["again_box"] == list(SELECTION) and out["again_same_pixels"] is True
    assert from_json(out["again_parameters"])["layer"].seed == 22


def test_expand_from_the_pdb_grows_the_canvas(server, workdir):
    args = {"left": 0, "right": 9, "top": 4, "bottom": 0, "variations": 1, "seed": 3,
            "server-url": server.url, "server-token": server.token}
    out = _batch(workdir, "python-fu-genfill-expand", args, selection=None)
    assert out["status"] == "success", out.get("message") or out["_stderr"]
    assert out["size"] == [WIDTH + 9, HEIGHT + 4]
    exported = np.asarray(Image.open(out["_host"](str(workdir.inside / "export.png"))).convert("RGBA"))
    assert np.array_equal(exported[4:, :WIDTH], _photo()), "the original pixels moved or changed"
    assert exported[:4, :, 3].all() and exported[:, WIDTH:, 3].all(), "the new area was not filled"


def test_stopped_server_is_said_plainly(workdir):
    with BackgroundServer(ServerConfig(write_state_file=False)) as stopped:
        url, token = stopped.url, stopped.token
    started = time.monotonic()
    out = _batch(workdir, "python-fu-genfill-fill", {"server-url": url, "server-token": token}, export=None)
    assert time.monotonic() - started < 60
    assert out["status"] == "execution-error"
    assert "not running" in out["message"] and "genfill serve" in out["message"]
    assert out["groups"] == []


def test_no_selection_is_said_plainly(server, workdir):
    out = _batch(workdir, "python-fu-genfill-fill", {"server-url": server.url, "server-token": server.token},
                 selection=None, export=None)
    assert out["status"] == "execution-error" and "Nothing is selected" in out["message"]


def test_indexed_images_are_refused_with_what_to_do(server, workdir):
    out = _batch(workdir, "python-fu-genfill-fill", {"server-url": server.url, "server-token": server.token},
                 indexed=True, export=None)
    assert out["status"] in ("execution-error", "calling-error")
    assert "indexed" in (out.get("message") or "").lower(), out.get("message")
    assert out["groups"] == []


def test_cancel_ends_the_job_on_the_server(server, workdir):
    """GIMP's progress Cancel ends a plug-in's process; the server must then drop its job."""
    big = np.dstack([np.random.default_rng(1).integers(0, 255, (700, 900, 3), np.uint8), np.full((700, 900), 255, np.uint8)])
    args = {"variations": 8, "seed": 4, "server-url": server.url, "server-token": server.token}
    marker = str(workdir.inside / "home")
    killed = []

    def kill_plugin_when_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(part.endswith(b"genfill/genfill.py") for part in cmdline) and any(marker.encode() in part for part in cmdline):
                    time.sleep(2.0)  # upload done, the job is running on the server
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(time.monotonic())
                    return
            time.sleep(0.05)

    out = _batch(workdir, "python-fu-genfill-fill", args, image=big, selection=[50, 50, 800, 600],
                 on_start=kill_plugin_when_running, export=None)
    assert killed, "the plug-in process never appeared"
    assert out["status"] != "success" and out["groups"] == []
    # The server's one worker is free again: a small job runs at once.
    with Client(server.url, token=server.token) as client:
        started = time.monotonic()
        client.fill(_photo(), _mask(), variations=1)
        assert time.monotonic() - started < 5


def test_menu_entries_are_registered_in_the_running_gimp(workdir):
    """Filters > Generative > Fill... / Expand... as GIMP itself registered them (its PDB)."""
    out = workdir.inside / "menus.json"
    code = (
        "import json; from gi.repository import Gimp; pdb = Gimp.get_pdb(); "
        f"json.dump({{n: [list(pdb.lookup_procedure(n).get_menu_paths()), pdb.lookup_procedure(n).get_menu_label()] "
        f"for n in ('python-fu-genfill-fill', 'python-fu-genfill-expand', 'python-fu-genfill-again')}}, open('{out}', 'w'))"
    )
    result = _gimp(workdir, workdir.host / "home", code)
    host = workdir.host / "menus.json"
    assert host.exists(), f"GIMP wrote no menus (rc {result.returncode}):\n{result.stderr[-3000:]}"
    menus = json.loads(host.read_text())
    assert menus == {
        "python-fu-genfill-fill": [["<Image>/Filters/Generative"], "_Fill..."],
        "python-fu-genfill-expand": [["<Image>/Filters/Generative"], "_Expand..."],
        "python-fu-genfill-again": [["<Image>/Filters/Generative"], "_Again from This Layer"],
    }
    assert "menu_label != NULL" not in result.stderr
    pluginrc = (workdir.host / "home/.config/GIMP/3.0/pluginrc").read_bytes()  # holds icon PNGs
    assert pluginrc.count(b'"<Image>/Filters/Generative"') == 3, "pluginrc records no menu path"


@pytest.fixture(scope="module")
def xvfb_tcp():
    """An X server the chroot reaches over TCP on 127.0.0.1 (it shares the host's network)."""
    read, write = os.pipe()
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-listen", "tcp", "-ac"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        display = pipe.readline().strip()
    assert display, "Xvfb did not report a display"
    yield f"127.0.0.1:{display}"
    process.terminate()
    process.wait(10)


def test_dialog_offers_the_servers_engines_without_a_token_field(server, workdir, xvfb_tcp, tmp_path_factory):
    from genfill.state import ServerState, write_state

    harness.require("Xvfb", bool(shutil.which("Xvfb")))
    screenshots = harness.screenshot_folder("gimp-dialog")
    state = write_state(ServerState(url=server.url, token=server.token, pid=os.getpid(), version="test"),
                        workdir.host / "server.json")
    shutil.copy(harness.ROOT / "tests/editors/gimp_dialog.py", workdir.host / "dialog.py")
    job = {name: str(workdir.inside / f"{name}.png") for name in ("fill_png", "expand_png", "offline_png")}
    job["out"] = str(workdir.inside / "dialog.json")
    (workdir.host / "job.json").write_text(json.dumps(job))
    plugin = workdir.inside / "home/.config/GIMP/3.0/plug-ins/genfill"
    home = workdir.inside / "home"
    command = ["chroot", str(CHROOT), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", f"HOME={home}",
               f"DISPLAY={xvfb_tcp}", f"GENFILL_STATE_FILE={workdir.to_inside(state)}", f"XDG_RUNTIME_DIR={home}/.runtime",
               "python3", str(workdir.inside / "dialog.py"), str(plugin), str(workdir.inside / "job.json")]
    (workdir.host / "home/.runtime").mkdir(mode=0o700, exist_ok=True)
    result = harness.run(command, env={"PATH": os.environ["PATH"]}, timeout_s=60)
    out_path = workdir.host / "dialog.json"
    assert out_path.exists(), f"the dialog script wrote nothing (rc {result.returncode}):\n{result.stderr[-3000:]}"
    out = json.loads(out_path.read_text())
    assert "exception" not in out, out["exception"]
    for name in ("fill", "expand", "offline"):
        shutil.copy(CHROOT / Path(out[name]["screenshot"]).relative_to("/"), screenshots / f"dialog-{name}.png")
    print(f"screenshots in {screenshots}")

    fill = out["fill"]
    assert fill["engines"] == [["Server default (classic)", ""], ["classic", "classic"]]
    assert fill["models"][0] == ["Engine default", ""]
    assert fill["entries"] == [{"visible_text": True}], "a hidden (token) entry or a stray entry is in the dialog"
    keys = [key for _, key in fill["mnemonics"]]
    assert len(keys) == len(set(keys)), f"duplicate mnemonics: {fill['mnemonics']}"
    assert {"p", "h", "n", "m", "e", "o", "s", "v", "d", "r", "f", "c"} <= set(keys)
    assert out["history"] == ["(recent prompts)", "a red door with brass handles", "an old oak"]
    assert out["prompt_from_history"] == "an old oak"
    assert fill["strength_default"] is True and fill["strength_sensitive"] is False
    assert fill["seed_random"] is True and fill["seed_sensitive"] is False
    assert "ignores the prompt" in fill["status"]
    assert fill["values"]["prompt"] == "a red door\nwith brass handles"
    assert fill["values"]["seed"] == -1 and fill["values"]["strength"] == -1.0 and fill["values"]["mode"] == "fill"
    assert out["fill_after_seed"]["seed"] == 42

    expand = out["expand"]
    keys = [key for _, key in expand["mnemonics"]]
    assert len(keys) == len(set(keys)), f"duplicate mnemonics: {expand['mnemonics']}"
    assert expand["values"]["left"] == 16 and "mode" not in expand["values"]
    assert out["offline"]["status"] == "The genfill server is not running."
    assert out["offline"]["engines"] == [["Server default", ""]]
    for name in ("fill", "expand", "offline"):
        assert Image.open(screenshots / f"dialog-{name}.png").size[0] > 200


def _press(xvfb_display: str, title: str, keys: list[str], screenshot: Path, deadline_s: float = 90) -> bool:
    """Waits for a window titled ``title``, grabs the screen, and types ``keys`` into it."""
    env = {**os.environ, "DISPLAY": xvfb_display}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = subprocess.run(["xdotool", "search", "--name", f"^{title}$"], capture_output=True, text=True, env=env)
        windows = found.stdout.split()
        if windows:
            time.sleep(1.5)  # drawn, drop-downs filled
            subprocess.run(["import", "-window", "root", str(screenshot)], env=env, capture_output=True, timeout=30)
            for key in keys:
                if key.startswith("sleep "):
                    time.sleep(float(key.split()[1]))
                    continue
                if key == "shot":
                    running = screenshot.with_name(screenshot.stem + "-running.png")
                    subprocess.run(["import", "-window", "root", str(running)], env=env, capture_output=True, timeout=30)
                    continue
                subprocess.run(["xdotool", "key", "--window", windows[-1], key], env=env, capture_output=True, timeout=10)
                time.sleep(0.3)
            return True
        time.sleep(0.3)
    return False


def test_menu_fill_runs_the_dialog_twice_in_a_row_in_gimps_window(server, workdir, xvfb_tcp, tmp_path_factory):
    """GIMP with its window: Fill as the menu runs it (interactive), the dialog answered with
    its own mnemonic (Alt+F), twice in a row on the same image."""
    from genfill.state import ServerState, write_state

    for tool in ("xdotool", "import"):
        harness.require(tool, bool(shutil.which(tool)))
    screenshots = harness.screenshot_folder("gimp-window")
    state = write_state(ServerState(url=server.url, token=server.token, pid=os.getpid(), version="test"),
                        workdir.host / "server.json")
    _photo().tofile(workdir.host / "in.rgba")
    big = np.dstack([np.random.default_rng(1).integers(0, 255, (1100, 1400, 3), np.uint8), np.full((1100, 1400), 255, np.uint8)])
    big.tofile(workdir.host / "big.rgba")
    job = {"width": WIDTH, "height": HEIGHT, "image": str(workdir.inside / "in.rgba"), "selection": list(SELECTION),
           "fills": 2, "prompts": ["moss", "moss"], "out": str(workdir.inside / "interactive.json"),
           "cancel": {"width": 1400, "height": 1100, "image": str(workdir.inside / "big.rgba"), "selection": [100, 100, 1200, 900]}}
    (workdir.host / "job.json").write_text(json.dumps(job))
    shutil.copy(harness.ROOT / "tests/editors/gimp_interactive.py", workdir.host / "interactive.py")
    home = workdir.inside / "home"
    environment = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "DISPLAY": xvfb_tcp,
                   "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache",
                   "XDG_DATA_HOME": f"{home}/.local/share", "XDG_RUNTIME_DIR": f"{home}/.runtime",
                   "GEGL_SWAP": f"{home}/swap", "GENFILL_STATE_FILE": workdir.to_inside(state),
                   "GENFILL_CI_JOB": str(workdir.inside / "job.json")}
    (workdir.host / "home/.runtime").mkdir(mode=0o700, exist_ok=True)
    code = f"exec(open('{workdir.inside / 'interactive.py'}').read())"
    command = ["chroot", str(CHROOT), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()),
               "gimp-3.0", "--no-splash", "--batch-interpreter=python-fu-eval", "-b", code, "--quit"]
    pressed = []

    def answer_dialogs() -> None:
        for index in range(job["fills"] + 1):
            marker = workdir.host / f"interactive.json.dialog-{index}"
            deadline = time.monotonic() + 120
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            # The last dialog: Fill, then its Cancel (Alt+C) while the job runs.
            keys = ["alt+f"] if index < job["fills"] else ["alt+f", "sleep 0.5", "shot", "alt+c"]
            pressed.append(_press(xvfb_tcp, "Generative Fill", keys, screenshots / f"dialog-{index + 1}.png"))

    presser = threading.Thread(target=answer_dialogs, daemon=True)
    presser.start()
    result = harness.run(command, env={"PATH": os.environ["PATH"]}, timeout_s=240)
    presser.join(10)
    print(f"screenshots in {screenshots}")
    out_path = workdir.host / "interactive.json"
    assert out_path.exists(), f"GIMP wrote nothing (rc {result.returncode}):\n{result.stderr[-3000:]}"
    out = json.loads(out_path.read_text())
    assert "exception" not in out, out["exception"]
    assert pressed == [True, True, True], f"the dialog did not appear: {pressed}\n{result.stderr[-3000:]}"
    history = json.loads((workdir.host / "home/.config/GIMP/3.0/genfill-prompts.json").read_text())
    assert history == ["moss"], "the dialog did not remember its prompt"
    first, second = out["runs"]
    assert first["status"] == "success", first.get("message")
    assert second["status"] == "success", second.get("message")
    assert second["selected"] == ["moss"], "the first fill did not leave its group selected"
    # Two groups side by side, the new one on top (GIMP numbers its name), three variations each.
    assert [group["name"] for group in second["groups"]] == ["moss #1", "moss"]
    for group in second["groups"]:
        assert [visible for _, visible in group["children"]] == [True, False, False]
    # The dialog's Cancel during the job: nothing added, and the server's worker is free again.
    assert out["cancelled_run"] == {"status": "cancel", "layers": ["big"]}
    with Client(server.url, token=server.token) as client:
        started = time.monotonic()
        client.fill(_photo(), _mask(), variations=1)
        assert time.monotonic() - started < 5
