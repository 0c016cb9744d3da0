"""GPU memory after a job whose client went away: back to where it was before the job.

Needs a CUDA device: run with ``pytest -m gpu tests/test_gpu_memory.py`` on a GPU machine.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from genfill import Client
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines

import tiny_models
from conftest import brick_image, rect_mask

pytestmark = pytest.mark.gpu


def test_gpu_memory_returns_after_a_client_disconnects_mid_job(tmp_path):
    import torch

    models = tmp_path / "models"
    tiny_models.tiny_sd15_inpaint(vae_attention=False).save_pretrained(models / "tiny")
    engines = default_engines(model_dirs=[models], hf_cache=False, default_engine="sd_inpaint")
    canvas, mask = brick_image(256, 256), rect_mask(256, 256, (40, 40, 150, 150))
    job_options = {"model": "tiny", "variations": 4, "seed": 1}
    config = ServerConfig(write_state_file=False, devices=("cuda",))
    with BackgroundServer(config, engines) as running:
        # Warm at the very shapes of the job below: model weights and a captured graph stay
        # loaded by design; what the job itself allocates must not.
        with Client(running.url, token=running.token) as client:
            client.fill(canvas, mask, steps=3, **job_options)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()

        leaver = Client(running.url, token=running.token)
        leaver.connect()
        job = leaver.submit_fill(canvas, mask, steps=150, **job_options)
        for event in job:
            if event.kind == "progress" and event.step >= 2:
                break
        during = torch.cuda.memory_allocated()
        leaver.close()

        deadline = time.monotonic() + 60
        while torch.cuda.memory_allocated() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        after = torch.cuda.memory_allocated()
        assert during > baseline, "the job allocated nothing: the check would prove nothing"
        assert after <= baseline, f"{after - baseline} bytes still held after the job was cancelled"

        with Client(running.url, token=running.token) as client:
            result = client.fill(canvas, mask, steps=3, **job_options)
        np.testing.assert_array_equal(result.composite_array(0)[mask == 0], canvas[mask == 0])
