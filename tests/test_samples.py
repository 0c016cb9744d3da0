"""The samples run as a user would run them: subprocesses with --local."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_models
from conftest import brick_image, rect_mask

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def run_sample(name: str, *args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, str(SAMPLES / name), *args], capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr
    return completed


@pytest.mark.parametrize("name", ["fill_hole.py", "expand_to_16x9.py", "remove_object.py", "canny_fill.py"])
def test_every_sample_has_help(name):
    assert "--local" in run_sample(name, "--help").stdout


def test_expand_folder_to_16x9(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    tall, square = brick_image(60, 90)[:, :, :3], brick_image(64, 64, seed=1)[:, :, :3]
    Image.fromarray(tall).save(folder / "tall.png")
    Image.fromarray(square).save(folder / "square.jpg")
    run_sample("expand_to_16x9.py", str(folder), "-o", str(tmp_path / "wide"), "--local")
    wide = np.asarray(Image.open(tmp_path / "wide" / "tall.png").convert("RGB"))
    assert wide.shape == (90, 160, 3)
    np.testing.assert_array_equal(wide[:, 50:110], tall)
    assert np.asarray(Image.open(tmp_path / "wide" / "square.png")).shape[:2] == (64, 114)


def test_remove_object(tmp_path):
    canvas = brick_image(96, 72)[:, :, :3]
    mask = rect_mask(96, 72, (30, 20, 25, 19))
    canvas[mask > 0] = (20, 200, 30)  # the "object"
    Image.fromarray(canvas).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    run_sample("remove_object.py", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
               "-o", str(tmp_path / "clean.png"), "--local")
    clean = np.asarray(Image.open(tmp_path / "clean.png").convert("RGB"))
    np.testing.assert_array_equal(clean[mask == 0], canvas[mask == 0])
    green = (clean[:, :, 1] > 150) & (clean[:, :, 0] < 60)
    assert not green[mask > 0].any(), "the object is still there"


def test_canny_fill_with_a_tiny_model(tmp_path):
    models = tmp_path / "models"
    tiny_models.tiny_sd15_inpaint(vae_attention=False).save_pretrained(models / "tiny-inpaint")
    tiny_models.tiny_sd15_controlnet().save_pretrained(models / "control_v11p_sd15_canny")
    canvas = brick_image(64, 64)[:, :, :3]
    mask = rect_mask(64, 64, (16, 16, 32, 32))
    edges = np.zeros((64, 64), np.uint8)
    edges[:, ::8] = 255
    for name, array in (("in.png", canvas), ("mask.png", mask), ("edges.png", edges)):
        Image.fromarray(array).save(tmp_path / name)
    completed = run_sample(
        "canny_fill.py", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "shelf",
        "--edges", str(tmp_path / "edges.png"), "--variations", "2", "--steps", "2", "--seed", "4",
        "-o", str(tmp_path / "out.png"), "--local", "--models-dir", str(models),
    )
    assert "seed 5" in completed.stdout
    for name in ("out.png", "out-1.png"):
        result = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        np.testing.assert_array_equal(result[mask == 0], canvas[mask == 0])
