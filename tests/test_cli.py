"""The ``genfill`` command and the samples, run as a user would: as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import brick_image, rect_mask

ROOT = Path(__file__).resolve().parents[1]


def genfill(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genfill_server", *args],
        capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy(),
    )


def write_inputs(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    canvas = brick_image(96, 64)[:, :, :3]
    mask = rect_mask(96, 64, (70, 40, 26, 24))
    Image.fromarray(canvas).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png", canvas, mask


def test_schema_prints_json():
    completed = genfill("schema")
    assert completed.returncode == 0, completed.stderr
    schema = json.loads(completed.stdout)
    assert {"client_to_server", "server_to_client", "fill_request"} <= schema.keys()


def test_fill_local_writes_every_variation(tmp_path):
    image, mask_path, canvas, mask = write_inputs(tmp_path)
    completed = genfill("fill", str(image), "--mask", str(mask_path), "--local", "--variations", "2",
                        "--seed", "3", "-o", str(tmp_path / "out.png"))
    assert completed.returncode == 0, completed.stderr
    for name in ("out.png", "out-1.png"):
        filled = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        np.testing.assert_array_equal(filled[mask == 0], canvas[mask == 0])
        assert not np.array_equal(filled[mask > 0], canvas[mask > 0])
    assert "seeds 3, 4" in completed.stdout


def test_serve_fill_models_and_clean_shutdown(tmp_path):
    state_file = tmp_path / "state" / "server.json"
    env = {**os.environ, "GENFILL_STATE_FILE": str(state_file), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "genfill_server", "serve", "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not state_file.exists():
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "server did not write its state file"
            time.sleep(0.1)
        models = genfill("models", env=env)
        assert models.returncode == 0, models.stderr
        assert "default engine: classic" in models.stdout
        assert "ignores the prompt; takes no options; runs on cpu" in models.stdout
        image, mask_path, canvas, mask = write_inputs(tmp_path)
        filled = genfill("fill", str(image), "--mask", str(mask_path), "--variations", "1",
                         "-o", str(tmp_path / "out.png"), env=env)
        assert filled.returncode == 0, filled.stderr
        result = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
        np.testing.assert_array_equal(result[mask == 0], canvas[mask == 0])
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "shutting down" in output
    assert not state_file.exists()


def test_fill_without_a_server_says_so(tmp_path):
    image, mask_path, _, _ = write_inputs(tmp_path)
    env = {**os.environ, "GENFILL_STATE_FILE": str(tmp_path / "none.json")}
    completed = genfill("fill", str(image), "--mask", str(mask_path), env=env)
    assert completed.returncode == 1
    assert "genfill serve" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_fill_hole_sample_runs(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "samples" / "fill_hole.py"), "--local", "--variations", "1", "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    before = np.asarray(Image.open(tmp_path / "before.png"))
    after = np.asarray(Image.open(tmp_path / "after-0.png").convert("RGB"))
    hole = np.all(before == (255, 0, 255), axis=2)
    assert hole.sum() > 1000
    np.testing.assert_array_equal(after[~hole], before[~hole])
    assert not np.any(np.all(after[hole] == (255, 0, 255), axis=1))


def test_expand_local_grows_the_canvas_and_keeps_the_original(tmp_path):
    canvas = brick_image(64, 48)[:, :, :3]
    Image.fromarray(canvas).save(tmp_path / "in.png")
    completed = genfill("expand", str(tmp_path / "in.png"), "--left", "16", "--bottom", "8", "--local",
                        "--variations", "1", "-o", str(tmp_path / "wide.png"))
    assert completed.returncode == 0, completed.stderr
    wide = np.asarray(Image.open(tmp_path / "wide.png").convert("RGBA"))
    assert wide.shape == (56, 80, 4)
    np.testing.assert_array_equal(wide[:48, 16:, :3], canvas)
    # The new strips are filled, opaque, not left transparent.
    assert (wide[:, :16, 3] == 255).all() and (wide[48:, :, 3] == 255).all()
    assert "wrote" in completed.stdout


def test_expand_needs_a_margin(tmp_path):
    Image.fromarray(brick_image(32, 32)[:, :, :3]).save(tmp_path / "in.png")
    completed = genfill("expand", str(tmp_path / "in.png"), "--local")
    assert completed.returncode == 1
    assert "genfill:" in completed.stderr and "Traceback" not in completed.stderr
