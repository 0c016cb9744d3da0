"""On a CUDA machine: what each speed lever does to the UNet step and the VAE, full size.

Builds the SD1.5-inpaint and SDXL-inpaint UNets and VAEs of ``benchmarks/gpu.py`` with random
weights on the GPU (nothing saved, nothing downloaded) and times, in one process on one card,
each variant against the plain one, with the largest relative difference of its output::

    python3 benchmarks/levers.py [--only sd15] --out levers.json

Variants, applied cumulatively in this order, so each row shows what one more lever adds:

- ``plain``: NCHW, ``torch.backends.cudnn.benchmark`` off, diffusers' default attention;
- ``cudnn_benchmark``: cuDNN picks its convolution algorithm per shape by timing them;
- ``channels_last``: weights and inputs in NHWC, the layout Hopper's tensor cores read;
- ``fused_qkv``: one projection for query, key and value (``fuse_qkv_projections``);
- ``cudnn_attention``: PyTorch's attention on cuDNN's kernel instead of its flash kernel.

``--engine`` also times the SD engine's ``run`` for one SD1.5 job at 20 and at 2 steps, so the
cost of a step and the fixed cost of a job (encode, decode, pre-fill, copies) separate.

The UNet step is timed replayed from a CUDA graph (as the engines run it); the VAE eagerly
and from a graph, at batch 1 and at the concurrent benchmark's batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "benchmarks"))

from gpu import (  # noqa: E402
    SD15_INPAINT_UNET,
    SD15_VAE,
    SDXL_INPAINT_UNET,
    SDXL_VAE,
    _time_ms,
    _unet_inputs,
    capture_graph,
)


def graphed(function):
    """``function`` captured once as a CUDA graph; returns (replay, static output)."""
    replay, output, _ = capture_graph(function)
    return replay, output


def rel_diff(output, reference) -> float:
    output, reference = output.double(), reference.double()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


def apply(lever: str, module, torch) -> None:
    if lever == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = True
    elif lever == "channels_last":
        module.to(memory_format=torch.channels_last)
    elif lever == "fused_qkv":
        if hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()


def _fp16_model(model_class, config: dict, *, seed: int):
    """A diffusers model of ``config`` with random weights drawn from ``seed`` on the GPU,
    in fp16 and eval mode: the same weights for every lever measured on it."""
    import torch

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = model_class(**config)
    return model.to(torch.float16).eval()


def unet_levers(name: str, config: dict, latent: int, batches: tuple[int, ...], out: dict) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.backends.cudnn.benchmark = False
    unet = _fp16_model(UNet2DConditionModel, config, seed=0)
    inputs = {batch: _unet_inputs(unet, batch, latent, torch.float16) for batch in batches}
    reference = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for lever in ("plain", "cudnn_benchmark", "channels_last", "fused_qkv", "cudnn_attention"):
        apply(lever, unet, torch)
        def attention(lever=lever):
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if lever == "cudnn_attention" else contextlib.nullcontext()

        for batch in batches:
            key = f"{name}_unet_b{batch}"
            args = dict(inputs[batch])
            if lever != "plain" and lever != "cudnn_benchmark":
                args["sample"] = args["sample"].contiguous(memory_format=torch.channels_last)
            try:
                with torch.inference_mode(), attention():
                    replay, output = graphed(lambda unet=unet, args=args: unet(**args, return_dict=False)[0])
                    ms = _time_ms(replay, iters=20 if batch <= 2 else 10)
            except Exception as exc:  # noqa: BLE001 - a lever that fails is a finding
                print(f"{key} {lever}: failed: {exc!r}", flush=True)
                out.setdefault(key, {})[lever] = {"error": repr(exc)}
                continue
            if lever == "plain":
                reference[batch] = output.clone()
            row = {"ms": round(ms, 2), "rel_diff": rel_diff(output, reference[batch])}
            out.setdefault(key, {})[lever] = row
            print(f"{key:22s} {lever:16s} {ms:8.2f} ms  rel diff {row['rel_diff']:.2e}", flush=True)
            del replay, output
    del unet
    torch.cuda.empty_cache()


def vae_levers(name: str, config: dict, pixels: int, batches: tuple[int, ...], out: dict) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.backends.cudnn.benchmark = False
    vae = _fp16_model(AutoencoderKL, config, seed=1)
    latent = pixels // 8
    reference = {}
    for lever in ("plain", "cudnn_benchmark", "channels_last"):
        apply(lever, vae, torch)
        for batch in batches:
            torch.manual_seed(2)
            image = torch.rand(batch, 3, pixels, pixels, device="cuda", dtype=torch.float16) * 2 - 1
            latents = torch.randn(batch, 4, latent, latent, device="cuda", dtype=torch.float16)
            if lever == "channels_last":
                image = image.contiguous(memory_format=torch.channels_last)
                latents = latents.contiguous(memory_format=torch.channels_last)
            for part, call in (
                ("encode", lambda vae=vae, image=image: vae.encode(image).latent_dist.mean),
                ("decode", lambda vae=vae, latents=latents: vae.decode(latents).sample),
            ):
                key = f"{name}_vae_{part}_b{batch}"
                with torch.inference_mode():
                    eager = _time_ms(call, iters=5)
                    output = call()
                    try:
                        replay, _ = graphed(call)
                        graph = _time_ms(replay, iters=5)
                        del replay
                    except Exception as exc:  # noqa: BLE001 - a failed capture is a finding
                        graph = float("nan")
                        print(f"{key} {lever}: capture failed: {exc!r}", flush=True)
                if lever == "plain":
                    reference[key] = output.clone()
                row = {"eager_ms": round(eager, 2), "graph_ms": round(graph, 2), "rel_diff": rel_diff(output, reference[key])}
                out.setdefault(key, {})[lever] = row
                print(f"{key:22s} {lever:16s} eager {eager:8.2f} ms  graph {graph:8.2f} ms  rel diff {row['rel_diff']:.2e}", flush=True)
            del image, latents
            torch.cuda.empty_cache()
    del vae
    torch.cuda.empty_cache()


def compiled_levers(out: dict, only: str | None, batches: tuple[int, ...] = (2, 16), flags: tuple[str, ...] = ()) -> None:
    """The UNet step (and the VAE decoder) compiled by TorchInductor and then replayed from a
    CUDA graph, against the plain graph: compile time per shape, cold and from Inductor's
    cache, step time and relative difference. With ``flags`` (boolean options of
    ``torch._inductor.config``), each UNet is compiled once more with them set, in the same
    process, for a side-by-side ``flags_graph_ms``."""
    import torch
    import torch._dynamo
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch.backends.cudnn.benchmark = False
    cases = []
    if only in (None, "sd15"):
        cases += [("sd15", SD15_INPAINT_UNET, 64, batch, False) for batch in batches]
    if only in (None, "sdxl"):
        cases += [("sdxl", SDXL_INPAINT_UNET, 128, 2, False)]
    models = {}
    cache_checked = False
    for name, config, latent, batch, channels_last in cases:
        key = f"{name}_unet_b{batch}" + ("_cl" if channels_last else "")
        try:
            if name not in models:
                models[name] = _fp16_model(UNet2DConditionModel, config, seed=0)
            unet = models[name]
            unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            args = _unet_inputs(unet, batch, latent, torch.float16)
            if channels_last:
                args["sample"] = args["sample"].contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                replay, reference = graphed(lambda unet=unet, args=args: unet(**args, return_dict=False)[0])
                plain_ms = _time_ms(replay, iters=10)
                reference = reference.clone()
                del replay
                row = {"plain_graph_ms": round(plain_ms, 2)}
                for attempt in ("cold",) if cache_checked else ("cold", "cached"):
                    torch._dynamo.reset()
                    compiled = torch.compile(unet, dynamic=False)
                    started = time.perf_counter()
                    compiled(**args, return_dict=False)
                    torch.cuda.synchronize()
                    row[f"compile_{attempt}_s"] = round(time.perf_counter() - started, 1)
                replay, output = graphed(lambda compiled=compiled, args=args: compiled(**args, return_dict=False)[0])
                row["compiled_graph_ms"] = round(_time_ms(replay, iters=10), 2)
                row["rel_diff"] = rel_diff(output, reference)
                cache_checked = True
                del replay, output
                if flags:
                    import torch._inductor.config as inductor_config

                    torch._dynamo.reset()
                    with inductor_config.patch({flag: True for flag in flags}):
                        compiled = torch.compile(unet, dynamic=False)
                        started = time.perf_counter()
                        compiled(**args, return_dict=False)
                        torch.cuda.synchronize()
                        row["flags_compile_s"] = round(time.perf_counter() - started, 1)
                        replay, output = graphed(lambda compiled=compiled, args=args: compiled(**args, return_dict=False)[0])
                    row["flags_graph_ms"] = round(_time_ms(replay, iters=10), 2)
                    row["flags_rel_diff"] = rel_diff(output, reference)
                    del replay, output
        except Exception as exc:  # noqa: BLE001 - a lever that fails is a finding
            row = {"error": repr(exc)[:500]}
        out[f"compiled_{key}"] = row
        print(f"compiled {key}: {row}", flush=True)
        torch._dynamo.reset()
    models.clear()
    torch.cuda.empty_cache()
    for name, config, pixels in ((("sd15", SD15_VAE, 512),) if only != "sdxl" else ()) + (
        (("sdxl", SDXL_VAE, 1024),) if only != "sd15" else ()
    ):
        key = f"{name}_vae_decode_b1"
        try:
            vae = _fp16_model(AutoencoderKL, config, seed=1)
            latents = torch.randn(1, 4, pixels // 8, pixels // 8, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                replay, reference = graphed(lambda vae=vae, latents=latents: vae.decode(latents).sample)
                row = {"plain_graph_ms": round(_time_ms(replay, iters=5), 2)}
                reference = reference.clone()
                del replay
                decoder = torch.compile(vae.decoder, dynamic=False)
                original = vae.decoder
                vae.decoder = decoder
                started = time.perf_counter()
                vae.decode(latents)
                torch.cuda.synchronize()
                row["compile_cold_s"] = round(time.perf_counter() - started, 1)
                replay, output = graphed(lambda vae=vae, latents=latents: vae.decode(latents).sample)
                row["compiled_graph_ms"] = round(_time_ms(replay, iters=5), 2)
                row["rel_diff"] = rel_diff(output, reference)
                vae.decoder = original
                del replay, output
            del vae
        except Exception as exc:  # noqa: BLE001
            row = {"error": repr(exc)[:500]}
        out[f"compiled_{key}"] = row
        print(f"compiled {key}: {row}", flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def engine_costs(out: dict) -> None:
    """The SD engine's ``run`` for one SD1.5 512x512 job at 20 and 2 steps (median of 5)."""
    import tempfile

    import numpy as np
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from genfill import fill
    from genfill_server.engines.base import EngineJob, EngineOptions
    from genfill_server.engines.sd_inpaint import SDInpaintEngine

    from gpu import build_models

    paths = build_models(Path(tempfile.gettempdir()) / "genfill-levers", smoke=False, device="cuda")
    engine = SDInpaintEngine(
        lambda: StableDiffusionInpaintPipeline.from_pretrained(paths["sd15"], torch_dtype=torch.float16), device="cuda"
    )
    engine.load()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    selection = np.zeros((512, 512), np.uint8)
    selection[128:384, 128:384] = 255
    denoise = fill.denoise_mask(selection, grow_px=8, feather_px=8)
    times = {}
    for steps in (20, 2, 20, 2):
        job = EngineJob(image, selection, denoise, [1], EngineOptions.of(
            prompt="a bench in a park", steps=steps, guidance=7.5, scheduler="dpmpp_2m_karras", strength=1.0, mode="fill"
        ))
        samples = []
        for _ in range(6):
            torch.cuda.synchronize()
            started = time.perf_counter()
            engine.run(job, lambda *a: None)
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - started) * 1000)
        times.setdefault(steps, []).extend(samples[1:])
    t20, t2 = statistics.median(times[20]), statistics.median(times[2])
    per_step = (t20 - t2) / 18
    out["engine_sd15"] = {"run_20_ms": round(t20, 1), "run_2_ms": round(t2, 1), "per_step_ms": round(per_step, 2),
                          "fixed_ms": round(t2 - 2 * per_step, 1)}
    print("engine_sd15", out["engine_sd15"], flush=True)
    del engine
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="levers.json")
    parser.add_argument("--only", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--engine", action="store_true", help="also time the SD engine's run")
    parser.add_argument("--compiled", action="store_true", help="only the TorchInductor variants")
    parser.add_argument("--batches", default="2,16", help="SD1.5 UNet batches for --compiled")
    parser.add_argument("--flags", default="",
                        help="with --compiled: comma-separated torch._inductor.config options to try on as well, "
                             "e.g. conv_1x1_as_mm,coordinate_descent_tuning")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("levers.py needs a CUDA device", file=sys.stderr)
        return 2
    out: dict = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    started = time.perf_counter()
    if args.compiled:
        flags = tuple(flag for flag in args.flags.split(",") if flag)
        out["inductor_flags"] = list(flags)
        compiled_levers(out, args.only, tuple(int(b) for b in args.batches.split(",")), flags)
        Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
        return 0
    if args.engine:
        engine_costs(out)
    if args.only in (None, "sd15"):
        unet_levers("sd15", SD15_INPAINT_UNET, 64, (2, 16), out)
        vae_levers("sd15", SD15_VAE, 512, (1, 8), out)
    if args.only in (None, "sdxl"):
        unet_levers("sdxl", SDXL_INPAINT_UNET, 128, (2,), out)
        vae_levers("sdxl", SDXL_VAE, 1024, (1,), out)
    out["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"card: {out['card']}, {out['total_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
