"""The GPU benchmark's smoke mode: tiny models on the CPU through every workload, so the
harness keeps working between GPU runs. It checks the harness, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
WORKLOADS = (
    "sd15_512", "sd15_512_nopreview", "sdxl_1024", "sd15_controlnet_512", "concurrent_8", "canvas_1024", "canvas_8192",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("benchmark")
    out = folder / "smoke.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENFILL_STATE_FILE": str(folder / "state.json")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--models-dir", str(folder / "models")],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def test_every_workload_ran(smoke):
    results, _ = smoke
    assert results["smoke"] is True
    for name in WORKLOADS:
        entry = results["workloads"][name]
        assert "error" not in entry, (name, entry)
    assert results["workloads"]["unet_step_sd15"] == {"skipped": "needs CUDA"}


def test_both_sides_run_the_same_work(smoke):
    results, _ = smoke
    for name in ("sd15_512", "sdxl_1024", "sd15_controlnet_512"):
        entry = results["workloads"][name]
        # Same steps on both sides (with CFG in one batch, one UNet call a step), same size.
        assert entry["unet_calls_plain"] == entry["unet_calls_peer"] == entry["unet_calls_genfill"] == 2, (name, entry)
        assert entry["work_px_genfill"] == [64, 64]
        assert entry["unet_class_peer"] == "OptimizedModule", (name, entry)  # torch.compile's wrapper
        for key in ("plain_diffusers_s", "compiled_peer_s", "genfill_e2e_s", "genfill_engine_s"):
            assert entry[key]["n"] == 1 and entry[key]["median"] > 0
        assert entry["genfill_engine_s"]["median"] <= entry["genfill_e2e_s"]["median"]
    assert results["workloads"]["sd15_controlnet_512"]["engine"] == "controlnet"
    assert results["workloads"]["sdxl_1024"]["engine"] == "sd_inpaint"


def test_throughput_and_canvas_are_reported(smoke):
    results, table = smoke
    concurrent = results["workloads"]["concurrent_8"]
    assert concurrent["genfill_images_per_s"] > 0 and concurrent["plain_diffusers_images_per_s"] > 0
    assert concurrent["clients"] == 2
    large = results["workloads"]["canvas_8192"]
    assert large["canvas_px"] == 1024 and large["ratio_to_small_canvas"] > 0
    for row in ("card: cpu", "sd15_512 ", "sdxl_1024 ", "concurrent_2 ", "canvas_1024 (128px", "canvas_8192 (1024px"):
        assert row in table
