"""On a CUDA machine: the SD engine's CUDA-graph step against its eager step, full size.

Loads the SD1.5-inpaint and SDXL-inpaint folders that ``benchmarks/gpu.py`` built (random
weights; ``--models-dir``, default as there), runs one job through the engine eagerly and with
CUDA graphs, and prints the largest and mean pixel difference and both engine times; then
several jobs alone against the same jobs in one ``run_many`` batch::

    python3 benchmarks/graph_check.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
for _folder in ("server", "sdk"):
    sys.path.insert(0, str(_REPO / _folder))

import numpy as np  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "genfill-benchmark" / "models"))
    args = parser.parse_args()
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
    from genfill import fill
    from genfill_server.engines.base import EngineJob, EngineOptions
    from genfill_server.engines.sd_inpaint import SDInpaintEngine

    def ignore(*_):
        pass

    for name, cls, size, steps in (
        ("sd15-inpaint", StableDiffusionInpaintPipeline, 512, 20),
        ("sdxl-inpaint", StableDiffusionXLInpaintPipeline, 1024, 30),
    ):
        pipe = cls.from_pretrained(Path(args.models_dir) / name, torch_dtype=torch.float16)
        rng = np.random.default_rng(0)
        selection = np.zeros((size, size), np.uint8)
        selection[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255

        # Bound as defaults so that job() keeps this iteration's values (bugbear B023).
        def job(
            seed: int, prompt: str = "a bench in a park", *, rng=rng, size=size, selection=selection, steps=steps
        ) -> EngineJob:
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            return EngineJob(image, selection, fill.denoise_mask(selection, grow_px=8, feather_px=8), [seed],
                             EngineOptions.of(prompt=prompt, negative_prompt="blurry", steps=steps,
                                              scheduler="dpmpp_2m_karras"))

        engines = {}
        for graphs in (False, True):
            engine = SDInpaintEngine(lambda pipe=pipe: pipe, device="cuda", cuda_graphs=graphs)
            engine.load()
            engines[graphs] = engine
        one = job(1)
        out = {}
        for graphs, engine in engines.items():
            engine.run(one, ignore)
            engine.run(one, ignore)
            torch.cuda.synchronize()
            started = time.perf_counter()
            out[graphs] = engine.run(one, ignore)[0]
            torch.cuda.synchronize()
            print(f"{name}: graphs={graphs} engine run {time.perf_counter() - started:.3f} s", flush=True)
        difference = np.abs(out[False].astype(int) - out[True].astype(int))
        print(f"{name}: graph vs eager pixels: max {difference.max()}, mean {difference.mean():.4f}", flush=True)
        if name.startswith("sd15"):
            jobs = [job(10 + index, prompt=f"prompt {index}") for index in range(8)]
            engine = engines[True]
            alone = [engine.run(j, ignore)[0] for j in jobs]
            engine.run_many(jobs, [ignore] * len(jobs))
            torch.cuda.synchronize()
            started = time.perf_counter()
            together = engine.run_many(jobs, [ignore] * len(jobs))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            worst = max(np.abs(a.astype(int) - b[0].astype(int)).max() for a, b in zip(alone, together))
            mean = np.mean([np.abs(a.astype(int) - b[0].astype(int)).mean() for a, b in zip(alone, together)])
            print(f"{name}: run_many of 8 jobs {seconds:.3f} s ({8 / seconds:.2f} img/s); batched vs alone "
                  f"pixels: max {worst}, mean {mean:.4f}", flush=True)
        del engines, pipe
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
