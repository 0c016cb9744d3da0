"""Server overhead on the CPU: where a fill's time goes outside the denoising loop.

Runs here, without a GPU. Two parts, at the GPU benchmark's sizes (a 256² selection in a 512²
canvas for an engine of native size 512, a 512² selection in a 1024² canvas for 1024):

1. ``stages``: each CPU step of a job, called directly and timed (median of ``--reps``): the
   SDK's frame encoding, the server's upload decode, ``prepare_fill`` (crop, resize, masks,
   and the engine's pre-fill beside them; ``prefill_alone`` is that pre-fill's own cost),
   the engine's host-side preparation (pixels to a tensor, masks to tensors), its
   host-side finish (decoded tensor to uint8 arrays), ``finish_fill`` (colour match, layer),
   the result frame and the client's decode and composite.
2. ``e2e``: a real server (``BackgroundServer``) and the SDK's ``Client`` over loopback, with
   an engine that waits ``--engine-ms`` (without the GIL, as a thread waiting on the GPU
   does) and returns its input, so end to end minus the engine's ``run`` is the whole
   overhead: transfer, queueing, thread hops and the stages above, less what overlaps the
   engine's wait.

``--profile`` prints a cProfile of the stages (top functions by cumulative time)::

    python benchmarks/overhead.py [--reps 20] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("genfill") is None:
    for _folder in ("plugin_bridge", "server", "sdk"):
        sys.path.insert(0, str(_REPO / _folder))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(_REPO / "benchmarks"))
from gpu import PROMPT, canvas_and_mask  # noqa: E402

CASES = {"512": (512, 256, 512), "1024": (1024, 512, 1024)}  # canvas, selection, native size


class EchoEngine:
    """Returns its input image once per seed: the cheapest engine, so only overhead is left.
    Colour matching runs as for a diffusion engine."""

    def __init__(self, native_size: int, busy_s: float = 0.0) -> None:
        from genfill_server.engines.base import EngineCapabilities, EngineDefaults

        self.busy_s = busy_s
        self.name = "echo"
        self.capabilities = EngineCapabilities(
            prompt=True, options=frozenset({"steps"}), native_size=native_size, uses_prefill=True, needs_colour_match=True
        )
        self.defaults = EngineDefaults(steps=20)
        self.runs: list[float] = []

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, job, on_step):
        started = time.perf_counter()
        if job.prefilled is not None:
            job.prefilled.result()  # as a diffusion engine waits for it before encoding
        on_step(1, 1, None)
        # Stands for the GPU's work: the thread waits without the GIL, as on a CUDA sync.
        time.sleep(self.busy_s)
        images = [np.array(job.image) for _ in job.seeds]
        self.runs.append(time.perf_counter() - started)
        return images


def _median_ms(function, reps: int) -> float:
    function()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def stages(case: str, reps: int) -> dict[str, float]:
    import torch
    from genfill.images import array_from_frame, frame_from_array
    from genfill.protocol import FillRequest, ImageFormat, Limits, decode_frame
    from genfill.session import ClientSession
    from genfill_server.engines import sd_inpaint
    from genfill_server.engines.prefill import prefill
    from genfill_server.images import decode_upload
    from genfill_server.pipeline import finish_fill, prepare_fill

    size, selection_px, native = CASES[case]
    canvas, mask = canvas_and_mask(size, selection_px)
    engine = EchoEngine(native)
    out: dict[str, float] = {}
    session = ClientSession()
    out["sdk_prepare"] = _median_ms(lambda: session.prepare_fill(canvas, mask, PROMPT, steps=20, variations=1), reps)
    image_frame = frame_from_array(canvas)
    mask_frame = frame_from_array(mask, ImageFormat.GRAY8)
    limits = Limits()
    out["upload_decode"] = _median_ms(lambda: (decode_upload(image_frame, limits), decode_upload(mask_frame, limits)), reps)
    request = FillRequest(image="a" * 64, mask="b" * 64, prompt=PROMPT, steps=20, scheduler="dpmpp_2m_karras")
    # With the pre-fill it starts beside the masks, as a diffusion engine would wait for it.
    out["prepare_fill"] = _median_ms(lambda: prepare_fill(engine, request, canvas, mask, [1]).job.prefilled.result(), reps)
    prepared = prepare_fill(engine, request, canvas, mask, [1])
    job = prepared.job
    image = np.ascontiguousarray(job.image[:, :, :3])
    # Already inside prepare_fill: its cost alone, not added to the total.
    prefill_alone = _median_ms(lambda: prefill(image, job.selection, "fill"), reps)
    prefilled = prefill(image, job.selection, "fill")
    out["engine_to_tensors"] = _median_ms(
        lambda: (
            sd_inpaint._to_pixels(prefilled, torch.device("cpu")),
            torch.from_numpy(np.asarray(job.denoise_mask, dtype=np.float32) / 255.0)[None, None],
        ),
        reps,
    )
    decoded = torch.rand(1, 3, *image.shape[:2]) * 2 - 1

    def to_uint8():
        array = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [np.ascontiguousarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]

    out["engine_to_uint8"] = _median_ms(to_uint8, reps)
    generated = [np.ascontiguousarray(np.flip(job.image, 0))]
    out["finish_fill"] = _median_ms(lambda: finish_fill(engine, prepared, generated), reps)
    result = finish_fill(engine, prepared, generated)
    out["result_frame"] = _median_ms(lambda: [frame_from_array(layer) for layer in result.layers], reps)
    frame = frame_from_array(result.layers[0])
    from genfill import fill

    def client_decode():
        header, payload = decode_frame(frame)
        return array_from_frame(header, payload)

    out["client_decode"] = _median_ms(client_decode, reps)
    out["client_composite"] = _median_ms(lambda: fill.composite(canvas, result.layers[0], result.box), reps)
    out["total"] = sum(out.values())
    out["prefill_alone"] = prefill_alone
    return out


def e2e(case: str, reps: int, busy_s: float = 0.0) -> dict[str, float]:
    from genfill import Client
    from genfill_server.app import ServerConfig
    from genfill_server.background import BackgroundServer
    from genfill_server.engines import EngineSet, EngineSpec

    size, selection_px, native = CASES[case]
    canvas, mask = canvas_and_mask(size, selection_px)
    engine = EchoEngine(native, busy_s)
    spec = EngineSpec("echo", lambda device, model: engine, engine.capabilities)
    engines = EngineSet({"echo": spec}, "echo")
    totals = []
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as server:
        with Client(server.url, token=server.token) as client:
            for index in range(reps + 2):
                started = time.perf_counter()
                client.fill(canvas, mask, PROMPT, seed=index, variations=1, steps=20)
                totals.append(time.perf_counter() - started)
    totals, runs = totals[2:], engine.runs[2:]
    return {
        "e2e": 1000 * statistics.median(totals),
        "engine_run": 1000 * statistics.median(runs),
        "overhead": 1000 * statistics.median(t - r for t, r in zip(totals, runs)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cases", default="512,1024")
    parser.add_argument("--engine-ms", type=float, default=300.0,
                        help="how long the stand-in engine waits, as a GPU would work, in each run")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for case in args.cases.split(","):
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
        timings = stages(case, args.reps)
        if args.profile:
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())
        ends = e2e(case, args.reps, args.engine_ms / 1000)
        print(f"case {case}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + " (ms)")
        print(f"case {case} e2e (echo engine): " + ", ".join(f"{k} {v:.1f}" for k, v in ends.items()) + " (ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
