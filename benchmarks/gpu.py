"""GPU benchmark: plain diffusers against genfill end to end, in one run on one card.

Command, from the repository root on a CUDA machine where torch, transformers, diffusers
0.42, pydantic and websockets import (nothing is downloaded; no genfill install needed)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out gpu.json 2>&1 | tee gpu.log

On this workplace's lent H100/H200 machines, which lack diffusers, pydantic and websockets,
carry their wheels in ``.whl/`` (see the device notes) and prefix the command with::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&

Smoke mode, which the test suite runs (``tests/test_benchmark_smoke.py``): tiny models on the
CPU, every workload once at small sizes. It checks that the harness works, not the speed::

    python3 benchmarks/gpu.py --smoke --out /tmp/smoke.json

What it does, in one process plus one server subprocess, on one card:

1. Builds full-size models with random weights from the published configs written below
   (SD1.5-inpaint UNet, VAE and CLIP-L text encoder; SDXL-inpaint with CLIP-L and OpenCLIP-bigG;
   an SD1.5 ControlNet), fp16, and saves them as diffusers folders under ``--models-dir``, where
   the genfill registry finds them (``--models-dir`` of ``genfill serve``). Speed does not depend
   on the weights' values. The tokenizer has a byte-level vocabulary of 514 tokens written in
   code: prompt length, not vocabulary, decides the text encoder's work, and it is padded to 77.
2. Starts a genfill server on 127.0.0.1 port 0 in a subprocess, serving those folders on the
   GPU. A wrapper around each engine's ``run`` (added here, not in the server) records its wall
   time, peak GPU memory and UNet calls to a JSON-lines file.
3. Measures each workload with plain diffusers (``StableDiffusionInpaintPipeline`` and its XL
   and ControlNet twins, fp16, defaults except the ones named) and with genfill through the SDK
   over the websocket (submit -> result received), alternating the two, with the same steps,
   guidance, strength 1.0 and scheduler (DPM++ 2M Karras, set explicitly on both sides):

   - ``sd15_512``: SD1.5 inpaint, 512x512 canvas, 256x256 selection, 20 steps, CFG 7.5;
   - ``sd15_512_nopreview``: the same with previews off, to price the latent previews;
   - ``sdxl_1024``: SDXL inpaint, 1024x1024, 512x512 selection, 30 steps, CFG 5.0. diffusers'
     SDXL inpaint default strength is 0.9999, which runs 29 steps; both sides run 1.0;
   - ``sd15_controlnet_512``: SD1.5 inpaint + inpaint ControlNet, 512x512, 20 steps;
   - ``concurrent_8``: 8 clients (``AsyncClient``), each submitting SD1.5 512x512 jobs back to
     back, images/s against plain diffusers running 8 images one after another;
   - ``canvas_1024`` / ``canvas_8192``: one 512x512 selection in the middle of a 1024x1024 and
     of an 8192x8192 canvas, SD1.5, end to end (the client's crop and upload included).

   - ``sd15_offload`` / ``sdxl_offload``: the SD1.5 and SDXL workloads through a second
     server started with model CPU offload (``default_engines(..., offload=True)``, as
     ``genfill serve --offload``), after the first one has stopped, with its caching allocator
     capped at 7.5 GiB (``torch.cuda.set_per_process_memory_fraction``) as on an 8 GB card:
     a job that needs more fails with out_of_memory. genfill only; reported with peak
     allocated and reserved GPU memory, and the CUDA graph replays (none: offload runs the
     UNet eagerly, since weights moving between devices cannot live in a captured graph).

   Plus ``unet_step``: one UNet forward at batch 2 (one CFG job) and 16 (eight), eager and
   replayed from a CUDA graph, and the VAE's share, to show where a job's time goes.
   A diffusion engine compiles its commonest shapes when it loads, during a workload's first
   (untimed) warm-up job; each engine run's record says how many of its calls ran compiled
   (``compiled_calls``: UNet step, VAE encoder, decoder). ``GENFILL_COMPILE=0`` measures
   without compiling.
4. Prints a table and writes JSON: per workload the median, min, max and every sample, peak GPU
   memory (``torch.cuda.max_memory_allocated``, per process), the ratio to the baseline and the
   server overhead (end to end minus the engine's ``run``, paired per job), and the card's name.

The single-job workloads are also timed against a second baseline, the compiled peer: the same
diffusers pipeline sped up as diffusers' own docs recommend (``PEER_RECIPE``: fused QKV,
channels_last, ``torch.compile(mode="reduce-overhead", fullgraph=True)`` for the UNet, the VAE
decoder and the ControlNet), compiled during the warm-up runs. Plain, peer and genfill alternate
job by job. The ratio to the peer is the headline figure.

Targets (issue 17): SD1.5 end to end <= 0.7x the compiled peer; SDXL <= 0.75x the compiled peer;
8 clients >= 6x plain diffusers' images/s; 8192 canvas <= 1.2x the 1024 one; server overhead
<= 5% of end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("genfill") is None:
    # Run from a checkout without installing: the packages live in sdk/ and server/.
    for _folder in ("plugin_bridge", "server", "sdk"):
        sys.path.insert(0, str(_REPO / _folder))

# Serving and loading never download; this makes any library call that would try fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Loading bars would bury the log the device run brings back.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402

# Published configs (diffusers folders of stable-diffusion-v1-5/stable-diffusion-inpainting,
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1 and lllyasviel/control_v11p_sd15_inpaint),
# as diffusers 0.42 reads them; keys left out take the classes' defaults.

SD15_INPAINT_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 9,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "upcast_attention": False,
    "use_linear_projection": False,
}

SDXL_INPAINT_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 9,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "upcast_attention": False,
    "use_linear_projection": True,
}

_VAE = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_VAE = {**_VAE, "sample_size": 512, "scaling_factor": 0.18215}
# SDXL's VAE overflows in fp16; diffusers (and genfill) decode it in fp32 ("force_upcast").
SDXL_VAE = {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14, SD1.5's text encoder and SDXL's first
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
OPENCLIP_BIGG_TEXT = {  # SDXL's second text encoder, with projection
    **CLIP_L_TEXT,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SD15_CONTROLNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "class_embed_type": None,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}

SD15_SCHEDULER = {  # PNDM, as published; both sides replace it by DPM++ 2M Karras
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SDXL_SCHEDULER = {  # Euler, as published
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

# Smoke sizes: the same block types and structure, 32-64 channels. VAEs keep 4 blocks (a
# scale factor of 8) and the UNets' sample size is 8, so the native size is 64 px.
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
              "projection_dim": 32, "vocab_size": 1000}
TINY = {
    "sd15_unet": {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                  "sample_size": 8},
    "sdxl_unet": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "attention_head_dim": (2, 4, 4),
                  "transformer_layers_per_block": (1, 1, 1), "cross_attention_dim": 64,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32,
                  "sample_size": 8},
    "vae": {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "sample_size": 64},
    "text": _TINY_TEXT,
    "controlnet": {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                   "conditioning_embedding_out_channels": (16, 16, 16, 16)},
}

SCHEDULER = "dpmpp_2m_karras"
PROMPT = "a weathered wooden bench in a park, late afternoon light"
NEGATIVE = "blurry, low quality"
MODEL_SD15 = "sd15-inpaint"
MODEL_SDXL = "sdxl-inpaint"
CONTROLNET_FOLDER = "control_v11p_sd15_inpaint"  # the name tells the registry its control type

PEER_WORKLOADS = ("sd15_512", "sd15_512_nopreview", "sdxl_1024", "sd15_controlnet_512")
"""The single-job workloads timed against the compiled peer as well as plain diffusers."""

TARGETS = {  # issue 17: against the compiled peer for single jobs, against eager for throughput
    "sd15_512": ("e2e/peer", "<=", 0.7),
    "sdxl_1024": ("e2e/peer", "<=", 0.75),
    "concurrent_8": ("img/s ratio", ">=", 6.0),
    "canvas_8192": ("8192/1024", "<=", 1.2),
}
OVERHEAD_TARGET = 0.05
OFFLOAD_CARD_GB = 7.5
"""The offload server's allocator cap: an 8 GB card less its CUDA context and the display."""


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: full for the GPU run, small for the smoke run."""

    sd15: int = 512
    sd15_selection: int = 256
    sdxl: int = 1024
    sdxl_selection: int = 512
    canvas_small: int = 1024
    canvas_large: int = 8192
    canvas_selection: int = 512
    sd15_steps: int = 20
    sdxl_steps: int = 30
    reps: int = 5
    sdxl_reps: int = 4
    warmup: int = 2
    clients: int = 8
    jobs_per_client: int = 2


FULL = Sizes()
SMOKE = Sizes(
    sd15=64, sd15_selection=32, sdxl=64, sdxl_selection=32, canvas_small=128, canvas_large=1024,
    canvas_selection=64, sd15_steps=2, sdxl_steps=2, reps=1, sdxl_reps=1, warmup=0, clients=2, jobs_per_client=1,
)


# Models


def clip_tokenizer():
    """A byte-level CLIP tokenizer whose vocabulary is the 256 byte symbols, their end-of-word
    forms and the two specials (514 tokens), built without any download."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _config(base: dict, tiny: dict | None, *, smoke: bool, **extra: Any) -> dict:
    return {**base, **(tiny if smoke and tiny else {}), **extra}


def build_models(folder: Path, *, smoke: bool, device: str) -> dict[str, Path]:
    """Builds and saves the three model folders with random weights; returns their paths.

    Weights are initialised on ``device`` (a GPU initialises 3.5 B parameters in seconds, a
    CPU takes minutes), stored fp16 on a GPU run and fp32 on the CPU.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    paths = {"sd15": folder / MODEL_SD15, "sdxl": folder / MODEL_SDXL, "controlnet": folder / CONTROLNET_FOLDER}
    marker = folder / ("built-smoke" if smoke else "built-full")
    if marker.is_file() and all((path / "model_index.json").is_file() or (path / "config.json").is_file() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)

    def make(factory, seed: int):
        torch.manual_seed(seed)
        with torch.device(device):
            module = factory()
        return module.to(dtype=dtype).eval()

    def text(config: dict, cls=CLIPTextModel):
        return lambda: cls(CLIPTextConfig(**_config(config, TINY["text"], smoke=smoke)))

    started = time.perf_counter()
    tokenizer = clip_tokenizer()
    sd15 = StableDiffusionInpaintPipeline(
        vae=make(lambda: AutoencoderKL(**_config(SD15_VAE, TINY["vae"], smoke=smoke)), 1),
        text_encoder=make(text(CLIP_L_TEXT), 2),
        tokenizer=tokenizer,
        unet=make(lambda: UNet2DConditionModel(**_config(SD15_INPAINT_UNET, TINY["sd15_unet"], smoke=smoke)), 3),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(sd15, paths["sd15"])
    del sd15
    controlnet = make(lambda: ControlNetModel(**_config(SD15_CONTROLNET, TINY["controlnet"], smoke=smoke)), 4)
    _save(controlnet, paths["controlnet"])
    del controlnet
    sdxl = StableDiffusionXLInpaintPipeline(
        vae=make(lambda: AutoencoderKL(**_config(SDXL_VAE, TINY["vae"], smoke=smoke)), 5),
        text_encoder=make(text(CLIP_L_TEXT), 6),
        text_encoder_2=make(text(OPENCLIP_BIGG_TEXT, CLIPTextModelWithProjection), 7),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=make(lambda: UNet2DConditionModel(**_config(SDXL_INPAINT_UNET, TINY["sdxl_unet"], smoke=smoke)), 8),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )
    _save(sdxl, paths["sdxl"])
    del sdxl
    _free(device)
    marker.write_text("ok\n", encoding="utf-8")
    log(f"built and saved the models in {time.perf_counter() - started:.1f} s under {folder}")
    return paths


def _save(model, path: Path) -> None:
    # Copied to the CPU first: safetensors writes from host memory either way.
    model.to("cpu")
    model.save_pretrained(path, safe_serialization=True)


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# The server subprocess


def serve(args: argparse.Namespace) -> int:
    """``--serve``: a genfill server over ``--models-dir`` whose engines record their runs."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from genfill_server.app import GenfillServer, ServerConfig
    from genfill_server.engines import default_engines

    # A diffusion engine as the default: the classic one would load (and need PyPatchMatch) at
    # start, and no workload here uses it.
    engines = default_engines([args.models_dir], hf_cache=False, default_engine="sd_inpaint", offload=args.offload)
    if args.memory_cap_gb and args.device.startswith("cuda"):
        import torch

        # The caching allocator refuses to hold more than this, as a card of that size would.
        index = torch.device(args.device).index
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), index)
    _record_engine_runs(engines, Path(args.timings), args.device)

    async def main() -> None:
        server = GenfillServer(ServerConfig(write_state_file=False, devices=(args.device,)), engines)
        await server.start()
        print(json.dumps({"url": server.url, "token": server.token, "engines": list(engines.specs)}), flush=True)
        # Stops when the benchmark closes our stdin (or dies).
        await asyncio.to_thread(sys.stdin.read)
        await server.stop()

    asyncio.run(main())
    return 0


def _record_engine_runs(engines, path: Path, device: str) -> None:
    """Wraps every engine the set hands out so each ``run`` appends one JSON line to ``path``:
    its wall time, peak GPU memory, UNet calls and the size it worked at."""
    import torch

    cuda = device.startswith("cuda")
    lock = threading.Lock()
    original_get = engines.get

    def get(name: str, dev: str, model: str | None = None):
        engine = original_get(name, dev, model)
        if getattr(engine, "_benchmark_wrapped", False):
            return engine
        run = engine.run
        calls = [0]
        unet = getattr(getattr(engine, "pipeline", None), "unet", None)
        if unet is not None:
            unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        step_runner = getattr(engine, "step_runner", None)
        runners = getattr(engine, "runners", ())

        def timed(call, jobs, *args):
            calls[0] = 0
            replays = getattr(step_runner, "replays", 0)
            compiled_before = [runner.compiled_calls for runner in runners]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            wall_start = time.time()
            started = time.perf_counter()
            outcome = call(jobs, *args)
            if cuda:
                torch.cuda.synchronize()
            many = isinstance(jobs, (list, tuple))
            images = sum(len(o) for o in outcome if isinstance(o, list)) if many else len(outcome)
            record = {
                "engine": name,
                "engine_s": time.perf_counter() - started,
                "started_at": wall_start,
                "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                "unet_calls": calls[0],
                "graph_replays": getattr(step_runner, "replays", 0) - replays,
                # Calls of the compiled UNet step, VAE encoder and decoder in this run.
                "compiled_calls": [runner.compiled_calls - b for runner, b in zip(runners, compiled_before)],
                "offload": bool(getattr(engine, "offload", False)),
                "work_px": list(np.shape((jobs[0] if many else jobs).image)[:2]),
                "images": images,
                "jobs": len(jobs) if many else 1,
            }
            with lock, open(path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            return outcome

        def timed_run(job, on_step):
            return timed(run, job, on_step)

        if hasattr(engine, "run_many"):
            run_many = engine.run_many
            engine.run_many = lambda jobs, on_steps: timed(run_many, list(jobs), on_steps)
        engine.run = timed_run
        engine._benchmark_wrapped = True
        return engine

    engines.get = get


class ServerProcess:
    """The ``--serve`` subprocess; ``records()`` reads what its engines wrote so far."""

    def __init__(self, models_dir: Path, device: str, work_dir: Path, *, offload: bool = False,
                 memory_cap_gb: float | None = None) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self.timings = work_dir / ("engine-runs-offload.jsonl" if offload else "engine-runs.jsonl")
        self.timings.unlink(missing_ok=True)
        self.timings.touch()
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--models-dir", str(models_dir),
                   "--device", device, "--timings", str(self.timings)]
        if offload:
            command.append("--offload")
        if memory_cap_gb:
            command += ["--memory-cap-gb", str(memory_cap_gb)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _readline(self.process, timeout_s=300)
        if not line:
            self.process.kill()
            raise RuntimeError(f"the server exited before listening (code {self.process.wait()})")
        hello = json.loads(line)
        self.url, self.token, self.engines = hello["url"], hello["token"], hello["engines"]
        log(f"genfill server on {self.url}, engines: {', '.join(self.engines)}")

    def records(self) -> list[dict]:
        with open(self.timings, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _readline(process: subprocess.Popen, timeout_s: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result else ""


# Inputs


def canvas_and_mask(size: int, selection: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``(size, size, 4)`` uint8 RGBA canvas of tiled noise and a centred square selection."""
    rng = np.random.default_rng(size)
    tile = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    reps = -(-size // 256)
    rgb = np.tile(tile, (reps, reps, 1))[:size, :size]
    canvas = np.empty((size, size, 4), np.uint8)
    canvas[:, :, :3] = rgb
    canvas[:, :, 3] = 255
    mask = np.zeros((size, size), np.uint8)
    start = (size - selection) // 2
    mask[start : start + selection, start : start + selection] = 255
    return canvas, mask


# Statistics and output


def summary(samples: list[float]) -> dict:
    samples = [float(s) for s in samples]
    if not samples:
        return {"n": 0}
    median = statistics.median(samples)
    return {
        "n": len(samples),
        "median": median,
        "min": min(samples),
        "max": max(samples),
        "spread": (max(samples) - min(samples)) / median if median else None,
        "samples": samples,
    }


def _quiet_libraries() -> None:
    """Only errors from diffusers and transformers: their per-load warnings and bars would
    bury the timings in the log."""
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _gb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**30, 3)


class Timer:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self) -> Timer:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started


# Plain diffusers, the baseline


PEER_RECIPE = (
    "fuse_qkv_projections, channels_last, torch.compile(unet and vae.decode, mode='reduce-overhead', "
    "fullgraph=True), torch.compile(controlnet, fullgraph=True)"
)
"""How the compiled peer speeds diffusers up: what diffusers' own guide to faster inference
recommends (docs: optimization/fp16, "torch.compile"), applied by a careful user."""


class Baseline:
    """Plain diffusers pipelines from the same folders, fp16 on the GPU, with the scheduler
    replaced by the one genfill runs (DPM++ 2M Karras).

    ``compiled=True`` is the compiled peer: the same pipeline after ``PEER_RECIPE``, compiled
    on its first calls (the workloads' untimed warm-up) for the one shape each workload runs.
    Its SDXL VAE stays in fp16 (``force_upcast`` off, as with the fp16-fixed SDXL VAE a careful
    user installs): diffusers would otherwise move the VAE between fp16 and fp32 on every call,
    which re-records the compiled decoder's CUDA graph each time. That makes the peer faster
    than the work genfill does (an fp32 decode), never slower. In smoke mode (CPU) the peer is
    traced with Dynamo's ``eager`` backend: the recipe and ``fullgraph`` are checked, not speed.
    """

    def __init__(self, device: str, *, compiled: bool = False) -> None:
        import torch

        self.device = device
        self.cuda = device.startswith("cuda")
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.compiled = compiled
        self.pipe = None
        self.calls = [0]

    def load(self, kind: str, paths: dict[str, Path]) -> None:
        import inspect

        import diffusers
        from diffusers import DPMSolverMultistepScheduler

        self.unload()
        if kind == "sdxl":
            pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(paths["sdxl"], dtype=self.dtype)
        else:
            pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
                paths["sd15"], dtype=self.dtype, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            if kind == "controlnet":
                controlnet = diffusers.ControlNetModel.from_pretrained(paths["controlnet"], dtype=self.dtype)
                cls = diffusers.StableDiffusionControlNetInpaintPipeline
                accepted = inspect.signature(cls).parameters
                components = {k: v for k, v in pipe.components.items() if k in accepted}
                pipe = cls(**components, controlnet=controlnet)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device)
        if self.compiled:
            self._compile(pipe)
        # On the compiled module's wrapper, outside the graph: counted on every call.
        pipe.unet.register_forward_pre_hook(lambda *_: self.calls.__setitem__(0, self.calls[0] + 1))
        self.pipe = pipe
        self.kind = kind

    def _compile(self, pipe) -> None:
        import torch

        # As in a process that serves one model: Dynamo keys its cache on the forward's code,
        # so the next model's UNet would otherwise recompile the last one's graph with
        # dynamic shapes.
        torch._dynamo.reset()
        backend = "inductor" if self.cuda else "eager"
        options: dict[str, Any] = {"mode": "reduce-overhead"} if self.cuda else {}
        for module in (pipe.unet, pipe.vae, getattr(pipe, "controlnet", None)):
            if module is None:
                continue
            if hasattr(module, "fuse_qkv_projections"):
                module.fuse_qkv_projections()
            module.to(memory_format=torch.channels_last)
        if getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.register_to_config(force_upcast=False)
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=backend, **options)
        pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, backend=backend, **options)
        if getattr(pipe, "controlnet", None) is not None:
            # Without CUDA graphs: the UNet's graph would overwrite the ControlNet's outputs,
            # which the pipeline still reads (torch refuses: "accessing tensor output of
            # CUDAGraphs that has been overwritten").
            pipe.controlnet = torch.compile(pipe.controlnet, fullgraph=True, backend=backend)

    def unload(self) -> None:
        self.pipe = None
        _free(self.device)

    def run(self, canvas: np.ndarray, mask: np.ndarray, *, steps: int, guidance: float, seed: int) -> dict:
        """One image; returns its wall time, peak GPU memory and UNet calls."""
        import torch
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(canvas[:, :, :3]))
        mask_image = Image.fromarray(mask)
        height, width = mask.shape
        kwargs: dict[str, Any] = {}
        if self.kind == "controlnet":
            # ControlNet 1.1 inpaint reads the image with the selection at -1 (diffusers' docs,
            # make_inpaint_condition); genfill's engine builds the same control input.
            control = torch.from_numpy(canvas[:, :, :3].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            control[:, :, mask >= 128] = -1.0
            kwargs["control_image"] = control
        self.calls[0] = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with Timer(self.cuda) as timer:
            self.pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                image=image,
                mask_image=mask_image,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                strength=1.0,
                generator=torch.Generator("cpu").manual_seed(seed),
                **kwargs,
            )
        return {
            "seconds": timer.seconds,
            "peak_bytes": torch.cuda.max_memory_allocated() if self.cuda else None,
            "unet_calls": self.calls[0],
            # What ran the UNet: diffusers' module, or torch.compile's wrapper of it.
            "unet_class": type(self.pipe.unet).__name__,
        }


# genfill end to end


def fill_options(model: str, steps: int, guidance: float, seed: int, **extra: Any) -> dict:
    return {
        "model": model,
        "steps": steps,
        "guidance": guidance,
        "scheduler": SCHEDULER,
        "variations": 1,
        "seed": seed,
        "negative_prompt": NEGATIVE,
        # The first job of a model loads it in the server; nothing else should come near this.
        "timeout_s": 600,
        **extra,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.smoke = args.smoke
        self.sizes = SMOKE if args.smoke else FULL
        if args.reps:
            self.sizes = Sizes(**{**self.sizes.__dict__, "reps": args.reps, "sdxl_reps": args.reps})
        self.device = "cpu" if args.smoke else args.device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke")
        self.cuda = self.device.startswith("cuda")
        self.results: dict[str, Any] = {
            "card": torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu",
            "device": self.device,
            "smoke": self.smoke,
            "versions": _versions(),
            "sizes": self.sizes.__dict__,
            "scheduler": SCHEDULER,
            "workloads": {},
        }
        self.out = Path(args.out)
        self.baseline = Baseline(self.device)
        self.peer = Baseline(self.device, compiled=True)
        self.results["peer_recipe"] = PEER_RECIPE
        self.started = time.perf_counter()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1), encoding="utf-8")

    def run(self) -> dict:
        wanted = set(self.args.workloads.split(",")) if self.args.workloads else None
        models_dir = Path(self.args.models_dir)
        paths = build_models(models_dir, smoke=self.smoke, device=self.device)
        server = ServerProcess(models_dir, self.device, self.out.parent)
        try:
            # In order of what the targets need, so a run cut short by --budget-s loses least.
            groups = [
                ("sd15", ["unet_step_sd15", "sd15_512", "concurrent_8", "canvas", "sd15_512_nopreview"]),
                ("sdxl", ["unet_step_sdxl", "sdxl_1024"]),
                ("controlnet", ["sd15_controlnet_512"]),
            ]
            for kind, names in groups:
                names = [n for n in names if wanted is None or n in wanted]
                if not names:
                    continue
                if self._out_of_time(kind):
                    continue
                try:
                    self.baseline.load(kind, paths)
                    if any(name in PEER_WORKLOADS for name in names):
                        self.peer.load(kind, paths)
                except Exception as exc:  # noqa: BLE001 - one broken group must not cost the others
                    self._failed(kind, exc)
                    self.baseline.unload()
                    self.peer.unload()
                    continue
                for name in names:
                    if self._out_of_time(name):
                        continue
                    try:
                        getattr(self, "w_" + name)(server)
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        self._failed(name, exc)
                    self.save()
                self.baseline.unload()
                self.peer.unload()
        finally:
            server.close()
        self.results["server_engine_runs"] = len(server.records())
        self.save()
        offload = [n for n in ("sd15_offload", "sdxl_offload") if wanted is None or n in wanted]
        if offload and not self._out_of_time("offload"):
            self._offload(models_dir, offload)
        return self.results

    # Model CPU offload, for 8 GB cards: a second server, started as ``genfill serve --offload``

    def _offload(self, models_dir: Path, names: list[str]) -> None:
        if not self.cuda:
            for name in names:
                self.results["workloads"][name] = {"skipped": "needs CUDA"}
            return
        cap = OFFLOAD_CARD_GB
        log(f"offload: a server with model CPU offload, its allocator capped at {cap} GiB")
        try:
            server = ServerProcess(models_dir, self.device, self.out.parent, offload=True, memory_cap_gb=cap)
        except Exception as exc:  # noqa: BLE001
            for name in names:
                self._failed(name, exc)
            return
        s = self.sizes
        try:
            for name in names:
                if self._out_of_time(name):
                    continue
                try:
                    if name == "sd15_offload":
                        self._genfill_only(server, name, model=MODEL_SD15, size=s.sd15, selection=s.sd15_selection,
                                           steps=s.sd15_steps, guidance=7.5, reps=max(1, s.reps - 2), cap=cap)
                    else:
                        self._genfill_only(server, name, model=MODEL_SDXL, size=s.sdxl, selection=s.sdxl_selection,
                                           steps=s.sdxl_steps, guidance=5.0, reps=max(1, s.sdxl_reps - 1), cap=cap)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    self._failed(name, exc)
                self.save()
        finally:
            server.close()

    def _genfill_only(self, server: ServerProcess, name: str, *, model: str, size: int, selection: int, steps: int,
                      guidance: float, reps: int, cap: float) -> None:
        from genfill import Client

        canvas, mask = canvas_and_mask(size, selection)
        log(f"{name}: {reps} runs")
        e2e, runs = [], []
        with Client(server.url, token=server.token, open_timeout_s=60) as client:
            for index in range(1 + reps):
                before = len(server.records())
                started = time.perf_counter()
                result = client.fill(canvas, mask, PROMPT, **fill_options(model, steps, guidance, 1000 + index))
                seconds = time.perf_counter() - started
                if index >= 1:
                    e2e.append(seconds)
                    runs.append(server.records()[before])
        self.results["workloads"][name] = {
            **self._genfill_side(e2e, runs, result.engine),
            "peak_reserved_gb_genfill": _gb(max(r.get("peak_reserved_bytes") or 0 for r in runs)),
            "memory_cap_gb": cap,
            "graph_replays": sum(r.get("graph_replays", 0) for r in runs),
            "offload": all(r.get("offload") for r in runs),
        }

    def _out_of_time(self, name: str) -> bool:
        budget = self.args.budget_s
        if budget is None or time.perf_counter() - self.started < budget:
            return False
        log(f"{name}: skipped, the {budget:.0f} s budget is spent")
        self.results["workloads"].setdefault(name, {"skipped": f"over the {budget:.0f} s budget"})
        return True

    def _failed(self, name: str, exc: BaseException) -> None:
        log(f"{name} FAILED: {exc!r}")
        traceback.print_exc()
        self.results["workloads"][name] = {"error": repr(exc)}

    # Paired single-job workloads

    def _single(self, server: ServerProcess, name: str, *, model: str, size: int, selection: int, steps: int,
                guidance: float, reps: int, **extra: Any) -> None:
        from genfill import Client

        canvas, mask = canvas_and_mask(size, selection)
        log(f"{name}: {reps} runs each, plain diffusers, the compiled peer and genfill alternating")
        base_runs, peer_runs, e2e, engine_runs = [], [], [], []
        with Client(server.url, token=server.token, open_timeout_s=60) as client:
            for index in range(self.sizes.warmup + reps):
                seed = 1000 + index
                base = self.baseline.run(canvas, mask, steps=steps, guidance=guidance, seed=seed)
                started = time.perf_counter()
                peer = self.peer.run(canvas, mask, steps=steps, guidance=guidance, seed=seed)
                if index == 0:
                    log(f"{name}: the compiled peer's first call (compiling) took {time.perf_counter() - started:.1f} s")
                before = len(server.records())
                started = time.perf_counter()
                result = client.fill(canvas, mask, PROMPT, **fill_options(model, steps, guidance, seed, **extra))
                seconds = time.perf_counter() - started
                runs = server.records()[before:]
                if len(runs) != 1:
                    raise RuntimeError(f"expected one engine run per job, the server recorded {len(runs)}")
                if index >= self.sizes.warmup:
                    base_runs.append(base)
                    peer_runs.append(peer)
                    e2e.append(seconds)
                    engine_runs.append(runs[0])
        self.results["workloads"][name] = self._pair(base_runs, peer_runs, e2e, engine_runs, result.engine)

    def _genfill_side(self, e2e: list[float], engine_runs: list[dict], engine: str) -> dict:
        """What every single-job workload reports of genfill: end to end, the engine's run,
        the overhead between them, peak memory, UNet calls and working size."""
        ours = summary(e2e)
        overhead = summary([total - run["engine_s"] for total, run in zip(e2e, engine_runs)])
        return {
            "genfill_e2e_s": ours,
            "genfill_engine_s": summary([r["engine_s"] for r in engine_runs]),
            "overhead_s": overhead,
            "overhead_fraction": overhead["median"] / ours["median"],
            "peak_gb_genfill": _gb(max((r["peak_bytes"] or 0) for r in engine_runs)) if self.cuda else None,
            "unet_calls_genfill": engine_runs[0]["unet_calls"],
            "work_px_genfill": engine_runs[0]["work_px"],
            "engine": engine,
        }

    def _pair(self, base_runs: list[dict], peer_runs: list[dict], e2e: list[float], engine_runs: list[dict],
              engine: str) -> dict:
        base = summary([r["seconds"] for r in base_runs])
        peer = summary([r["seconds"] for r in peer_runs])
        ours = self._genfill_side(e2e, engine_runs, engine)
        return {
            "plain_diffusers_s": base,
            "compiled_peer_s": peer,
            **ours,
            "ratio_e2e_to_plain": ours["genfill_e2e_s"]["median"] / base["median"],
            "ratio_engine_to_plain": ours["genfill_engine_s"]["median"] / base["median"],
            "ratio_e2e_to_peer": ours["genfill_e2e_s"]["median"] / peer["median"],
            "ratio_engine_to_peer": ours["genfill_engine_s"]["median"] / peer["median"],
            "peak_gb_plain": _gb(max((r["peak_bytes"] or 0) for r in base_runs)) if self.cuda else None,
            "peak_gb_peer": _gb(max((r["peak_bytes"] or 0) for r in peer_runs)) if self.cuda else None,
            "unet_calls_plain": base_runs[0]["unet_calls"],
            "unet_calls_peer": peer_runs[0]["unet_calls"],
            "unet_class_peer": peer_runs[0]["unet_class"],
        }

    def w_sd15_512(self, server: ServerProcess) -> None:
        s = self.sizes
        self._single(server, "sd15_512", model=MODEL_SD15, size=s.sd15, selection=s.sd15_selection,
                     steps=s.sd15_steps, guidance=7.5, reps=s.reps)

    def w_sd15_512_nopreview(self, server: ServerProcess) -> None:
        s = self.sizes
        self._single(server, "sd15_512_nopreview", model=MODEL_SD15, size=s.sd15, selection=s.sd15_selection,
                     steps=s.sd15_steps, guidance=7.5, reps=max(1, s.reps - 2), previews=False)

    def w_sd15_controlnet_512(self, server: ServerProcess) -> None:
        s = self.sizes
        self._single(server, "sd15_controlnet_512", model=MODEL_SD15, size=s.sd15, selection=s.sd15_selection,
                     steps=s.sd15_steps, guidance=7.5, reps=s.reps, control=[{"type": "inpaint"}])

    def w_sdxl_1024(self, server: ServerProcess) -> None:
        s = self.sizes
        self._single(server, "sdxl_1024", model=MODEL_SDXL, size=s.sdxl, selection=s.sdxl_selection,
                     steps=s.sdxl_steps, guidance=5.0, reps=s.sdxl_reps)

    # Throughput

    def w_concurrent_8(self, server: ServerProcess) -> None:
        s = self.sizes
        canvas, mask = canvas_and_mask(s.sd15, s.sd15_selection)
        count = s.clients
        log(f"concurrent_8: plain diffusers {count} images in a row, then {count} genfill clients")
        for seed in range(s.warmup):
            self.baseline.run(canvas, mask, steps=s.sd15_steps, guidance=7.5, seed=seed)
        base_runs = []
        with Timer(self.cuda) as plain:
            for seed in range(count):
                base_runs.append(self.baseline.run(canvas, mask, steps=s.sd15_steps, guidance=7.5, seed=seed))
        plain_rate = count / plain.seconds

        async def clients(timed_from: list[float]) -> tuple[float, list[float]]:
            from genfill import AsyncClient

            connected = [AsyncClient(server.url, token=server.token, open_timeout_s=60) for _ in range(count)]
            for client in connected:
                await client.connect()
            try:
                # Every client uploads its canvas once before the clock starts, as an editor
                # would have done for its first fill.
                await asyncio.gather(*(
                    client.fill(canvas, mask, PROMPT, **fill_options(MODEL_SD15, s.sd15_steps, 7.5, index))
                    for index, client in enumerate(connected)
                ))
                latencies: list[float] = []

                async def one_client(index: int, client) -> None:
                    for job in range(s.jobs_per_client):
                        started = time.perf_counter()
                        await client.fill(
                            canvas, mask, PROMPT,
                            **fill_options(MODEL_SD15, s.sd15_steps, 7.5, 100 * index + job),
                        )
                        latencies.append(time.perf_counter() - started)

                timed_from[0] = time.time()
                started = time.perf_counter()
                await asyncio.gather(*(one_client(i, c) for i, c in enumerate(connected)))
                return time.perf_counter() - started, latencies
            finally:
                for client in connected:
                    await client.aclose()

        before = len(server.records())
        timed_from = [0.0]
        wall, latencies = asyncio.run(clients(timed_from))
        # Engine runs of the timed part only (the warm-up round may have run in batches).
        runs = [r for r in server.records()[before:] if r["started_at"] >= timed_from[0]]
        images = count * s.jobs_per_client
        rate = images / wall
        busy = sum(r["engine_s"] for r in runs)
        self.results["workloads"]["concurrent_8"] = {
            "clients": count,
            "jobs_per_client": s.jobs_per_client,
            "plain_diffusers_images_per_s": plain_rate,
            "plain_diffusers_s": summary([r["seconds"] for r in base_runs]),
            "genfill_images_per_s": rate,
            "genfill_wall_s": wall,
            "genfill_latency_s": summary(latencies),
            "genfill_engine_s": summary([r["engine_s"] for r in runs]),
            "engine_busy_fraction": busy / wall,
            "overhead_fraction": 1 - busy / wall,
            "ratio_images_per_s": rate / plain_rate,
            "peak_gb_plain": _gb(max((r["peak_bytes"] or 0) for r in base_runs)) if self.cuda else None,
            "peak_gb_genfill": _gb(max((r["peak_bytes"] or 0) for r in runs)) if self.cuda and runs else None,
            "largest_engine_batch": max((r["images"] for r in runs), default=0),
            "compiled_step_calls": sum((r.get("compiled_calls") or [0])[0] for r in runs),
            "engine_batches": [r.get("jobs", 1) for r in runs],
        }

    # Canvas size

    def w_canvas(self, server: ServerProcess) -> None:
        from genfill import Client

        s = self.sizes
        results = {}
        with Client(server.url, token=server.token, open_timeout_s=60) as client:
            for size in (s.canvas_small, s.canvas_large):
                log(f"canvas: {s.canvas_selection}px selection in a {size}px canvas")
                canvas, mask = canvas_and_mask(size, s.canvas_selection)
                e2e, runs = [], []
                for index in range(s.warmup + s.reps):
                    before = len(server.records())
                    started = time.perf_counter()
                    client.fill(canvas, mask, PROMPT, **fill_options(MODEL_SD15, s.sd15_steps, 7.5, index))
                    seconds = time.perf_counter() - started
                    if index >= s.warmup:
                        e2e.append(seconds)
                        runs.append(server.records()[before])
                del canvas, mask
                ours = summary(e2e)
                overhead = summary([t - r["engine_s"] for t, r in zip(e2e, runs)])
                results[size] = {
                    "canvas_px": size,
                    "selection_px": s.canvas_selection,
                    "genfill_e2e_s": ours,
                    "genfill_engine_s": summary([r["engine_s"] for r in runs]),
                    "overhead_s": overhead,
                    "overhead_fraction": overhead["median"] / ours["median"],
                    "peak_gb_genfill": _gb(max((r["peak_bytes"] or 0) for r in runs)) if self.cuda else None,
                    "work_px_genfill": runs[0]["work_px"],
                }
        small, large = results[s.canvas_small], results[s.canvas_large]
        large["ratio_to_small_canvas"] = large["genfill_e2e_s"]["median"] / small["genfill_e2e_s"]["median"]
        self.results["workloads"]["canvas_1024"] = small
        self.results["workloads"]["canvas_8192"] = large

    # Where a step's time goes

    def w_unet_step_sd15(self, server: ServerProcess) -> None:
        self.results["workloads"]["unet_step_sd15"] = self._unet_steps(
            latent=self.sizes.sd15 // 8, batches=(2, 16), pixels=self.sizes.sd15
        )

    def w_unet_step_sdxl(self, server: ServerProcess) -> None:
        self.results["workloads"]["unet_step_sdxl"] = self._unet_steps(
            latent=self.sizes.sdxl // 8, batches=(2,), pixels=self.sizes.sdxl
        )

    def _unet_steps(self, *, latent: int, batches: tuple[int, ...], pixels: int) -> dict:
        """Milliseconds of one UNet forward, eager and replayed from a CUDA graph, and of one
        VAE encode and decode at the workload's size (in the VAE's own dtype)."""
        import torch

        if not self.cuda:
            return {"skipped": "needs CUDA"}
        pipe = self.baseline.pipe
        unet, vae = pipe.unet, pipe.vae
        out: dict[str, Any] = {"latent_px": latent}
        with torch.inference_mode():
            for batch in batches:
                inputs = _unet_inputs(unet, batch, latent, self.dtype_of(unet))
                eager = _time_ms(lambda inputs=inputs: unet(**inputs, return_dict=False), iters=10 if batch > 2 else 20)
                out[f"batch{batch}_eager_ms"] = eager
                try:
                    out[f"batch{batch}_graph_ms"], out[f"batch{batch}_graph_capture_s"] = _graph_ms(
                        lambda inputs=inputs: unet(**inputs, return_dict=False), iters=10 if batch > 2 else 20
                    )
                except Exception as exc:  # noqa: BLE001 - a model that cannot be captured is a finding
                    out[f"batch{batch}_graph_error"] = repr(exc)
                del inputs
            image = torch.randn(1, 3, pixels, pixels, device=self.device, dtype=vae.dtype)
            latents = torch.randn(1, 4, latent, latent, device=self.device, dtype=vae.dtype)
            out["vae_dtype"] = str(vae.dtype)
            out["vae_encode_ms"] = _time_ms(lambda: vae.encode(image).latent_dist.mean, iters=5)
            out["vae_decode_ms"] = _time_ms(lambda: vae.decode(latents).sample, iters=5)
            if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
                vae.to(torch.float32)
                out["vae_decode_fp32_ms"] = _time_ms(lambda: vae.decode(latents.float()).sample, iters=5)
                vae.to(torch.float16)
        self.results.setdefault("card_memory_gb", _gb(torch.cuda.get_device_properties(0).total_memory))
        _free(self.device)
        return out

    @staticmethod
    def dtype_of(module) -> Any:
        return next(module.parameters()).dtype


def _unet_inputs(unet, batch: int, latent: int, dtype) -> dict:
    import torch

    device = unet.device
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device, dtype=dtype),
        }
    return inputs


def _time_ms(function, *, iters: int) -> float:
    """Median milliseconds of ``function`` by CUDA events, after 3 warm-up calls."""
    import torch

    for _ in range(3):
        function()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(function) -> tuple[Any, Any, float]:
    """``function`` captured once as a CUDA graph after three warm-up calls on a side stream:
    returns its replay, its static output and the seconds the capture took."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            function()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    started = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()
    torch.cuda.synchronize()
    return graph.replay, output, time.perf_counter() - started


def _graph_ms(function, *, iters: int) -> tuple[float, float]:
    """Median milliseconds of replaying ``function`` captured as one CUDA graph, and the
    seconds the capture took."""
    replay, _, capture_s = capture_graph(function)
    return _time_ms(replay, iters=iters), capture_s


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "websockets", "pydantic", "numpy"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    with contextlib.suppress(Exception):
        import torch

        versions["cuda"] = torch.version.cuda
    return versions


# The table


def table(results: dict) -> str:
    w = results["workloads"]
    header = ("workload", "plain diffusers", "compiled peer", "genfill e2e", "engine", "overhead", "/plain", "/peer",
              "target", "peak GB plain/peer/genfill")
    rows: list[tuple[str, ...]] = [header]
    blank = ("",) * (len(header) - 2)

    def t(stats: dict | None) -> str:
        if not stats or not stats.get("n"):
            return "-"
        return f"{stats['median']:.3f}s [{stats['min']:.3f}-{stats['max']:.3f}]"

    def gb(value: float | None) -> str:
        return "-" if value is None else f"{value}"

    def verdict(name: str, value: float | None) -> str:
        if name not in TARGETS or value is None:
            return ""
        _, op, goal = TARGETS[name]
        met = value <= goal if op == "<=" else value >= goal
        return f"{op}{goal} {'met' if met else 'MISSED'}"

    def overhead(entry: dict) -> str:
        return f"{entry['overhead_s']['median']:.3f}s {100 * entry['overhead_fraction']:.1f}%"

    for name in PEER_WORKLOADS:
        entry = w.get(name)
        if entry is None:
            continue
        if "error" in entry:
            rows.append((name, "error: " + entry["error"][:60], *blank))
            continue
        to_peer = entry.get("ratio_e2e_to_peer")
        rows.append((
            name, t(entry["plain_diffusers_s"]), t(entry.get("compiled_peer_s")), t(entry["genfill_e2e_s"]),
            t(entry["genfill_engine_s"]), overhead(entry), f"{entry['ratio_e2e_to_plain']:.2f}x",
            "-" if to_peer is None else f"{to_peer:.2f}x", verdict(name, to_peer),
            " / ".join(gb(entry.get(k)) for k in ("peak_gb_plain", "peak_gb_peer", "peak_gb_genfill")),
        ))
    entry = w.get("concurrent_8")
    if entry is not None:
        if "error" in entry:
            rows.append(("concurrent_8", "error: " + entry["error"][:60], *blank))
        else:
            ratio = entry["ratio_images_per_s"]
            rows.append((
                f"concurrent_{entry['clients']} (img/s)", f"{entry['plain_diffusers_images_per_s']:.2f} img/s", "-",
                f"{entry['genfill_images_per_s']:.2f} img/s", f"busy {100 * entry['engine_busy_fraction']:.0f}%",
                f"{100 * entry['overhead_fraction']:.1f}%", f"{ratio:.2f}x", "-", verdict("concurrent_8", ratio),
                f"{gb(entry.get('peak_gb_plain'))} / - / {gb(entry.get('peak_gb_genfill'))}",
            ))
    for name in ("canvas_1024", "canvas_8192"):
        entry = w.get(name)
        if entry is None or "error" in entry:
            continue
        ratio = entry.get("ratio_to_small_canvas")
        rows.append((
            f"{name} ({entry['canvas_px']}px, {entry['selection_px']}px sel)", "-", "-", t(entry["genfill_e2e_s"]),
            t(entry["genfill_engine_s"]), overhead(entry), "" if ratio is None else f"{ratio:.2f}x 1024", "-",
            verdict("canvas_8192", ratio), f"- / - / {gb(entry.get('peak_gb_genfill'))}",
        ))
    for name in ("sd15_offload", "sdxl_offload"):
        entry = w.get(name)
        if entry is None or "skipped" in entry:
            continue
        if "error" in entry:
            rows.append((name, "error: " + entry["error"][:60], *blank))
            continue
        reference = w.get("sd15_512" if name == "sd15_offload" else "sdxl_1024", {}).get("genfill_e2e_s")
        ratio = entry["genfill_e2e_s"]["median"] / reference["median"] if reference and reference.get("n") else None
        fits = entry["peak_reserved_gb_genfill"] <= entry["memory_cap_gb"]
        rows.append((
            f"{name} (cap {entry['memory_cap_gb']} GiB)", "-", "-", t(entry["genfill_e2e_s"]),
            t(entry["genfill_engine_s"]), overhead(entry), "" if ratio is None else f"{ratio:.2f}x no-offload", "-",
            f"graphs {'off' if not entry['graph_replays'] else 'ON'}, {'fits' if fits else 'OVER'}",
            f"- / - / {entry['peak_gb_genfill']} (reserved {entry['peak_reserved_gb_genfill']})",
        ))
    if "canvas" in w and "error" in w["canvas"]:
        rows.append(("canvas", "error: " + w["canvas"]["error"][:60], *blank))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [f"card: {results['card']}  ({results['device']}, {'SMOKE, not a speed run' if results['smoke'] else 'fp16'})"]
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.append(f"overhead target: <= {100 * OVERHEAD_TARGET:.0f}% of end to end; /plain: genfill over plain diffusers "
                 "(times; img/s for throughput), /peer: genfill over the compiled peer (the headline)")
    lines.append(f"compiled peer: {results.get('peer_recipe', PEER_RECIPE)}")
    for name in ("unet_step_sd15", "unet_step_sdxl"):
        entry = w.get(name)
        if entry and "skipped" not in entry and "error" not in entry:
            parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()]
            lines.append(f"{name}: " + ", ".join(parts))
        elif entry:
            lines.append(f"{name}: {entry}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-benchmark.json", help="where to write the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the harness, not speed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--models-dir", default=None,
        help="where the models are built, or found from an earlier run (default: genfill-benchmark/ in the temp folder)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed runs per workload (default 5, SDXL 4)")
    parser.add_argument(
        "--workloads", default=None,
        help="comma-separated subset of unet_step_sd15, sd15_512, concurrent_8, canvas, sd15_512_nopreview, "
        "unet_step_sdxl, sdxl_1024, sd15_controlnet_512, sd15_offload, sdxl_offload",
    )
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="skip the workloads not yet started once this many seconds have passed (default: no limit)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-cap-gb", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet_libraries()
    if args.serve:
        return serve(args)
    if args.models_dir is None:
        args.models_dir = str(Path(tempfile.gettempdir()) / "genfill-benchmark" / ("models-smoke" if args.smoke else "models"))
    started = time.perf_counter()
    bench = Bench(args)
    results = bench.run()
    results["total_s"] = time.perf_counter() - started
    bench.save()
    print(table(results), flush=True)
    failed = [name for name, entry in results["workloads"].items() if isinstance(entry, dict) and "error" in entry]
    if failed:
        print(f"failed workloads: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
