"""Stable Diffusion 1.5 / 2.x and SDXL inpainting, with our own denoising loop.

diffusers' inpaint pipelines binarize the mask, have no cancel and decode previews only
through the VAE. This engine takes the components of an already built pipeline
(``StableDiffusionInpaintPipeline``, ``StableDiffusionPipeline``, and their XL twins) and runs
the loop itself (``denoise``, with the schedulers of ``schedulers`` and the prompt
embeddings of ``conditioning``):

- **Differential denoising** keeps soft masks soft (Levin & Fried, "Differential Diffusion",
  2023). With ``m`` in [0, 1] the denoise mask at latent resolution and ``N`` steps, a latent
  cell takes part in step ``i`` only when ``m > 1 - (i + 1) / N``; before each step every
  other cell is reset to the original latents noised to that step's level. A cell of mask
  ``m`` is therefore denoised for its last ``m * N`` steps, like an img2img of strength ``m``:
  a gradient selection gives a gradient of change. Cells with ``m == 0`` end as the
  original latents exactly.
- **9-channel inpainting checkpoints** additionally see the mask and the masked image, as they
  were trained to; **ordinary 4-channel checkpoints** rely on the blend alone (img2img-style
  latent blending), so any SD model can fill.
- **Variations** run as one batch, one ``torch.Generator`` per seed: the starting noise and
  any ancestral noise of variation ``i`` depend on its seed only, so variation ``i`` equals a
  single run with that seed (to float rounding of batched kernels).
- **Progress and cancel**: ``on_step`` is called after every denoising step, with a preview
  every few steps from the latent-to-RGB projection; when it raises ``JobCancelledError`` the
  loop stops at once (no further UNet call) and the tensors are freed.
- **Speed on CUDA**: the UNet step (with the guidance combine) is captured as a CUDA graph per
  input shape (``graphs.GraphedStep``) and replayed, since an eager step is bound by Python's
  kernel launch rate; the CPU runs the same step function eagerly. At load, the UNet step
  and the VAE are compiled by TorchInductor for the commonest shapes (a job at the native
  size; at 512 px also a full batch of them), which takes minutes on a machine's first load
  and seconds from Inductor's cache after; other shapes run the plain graphs. The loop makes no host
  synchronisation except for previews. Prompt embeddings are cached per prompt.
- **Several jobs in one batch**: ``run_many`` denoises jobs that share size, steps,
  scheduler, strength and guidance together (prompts, seeds, masks and images differ per
  row); each job's images equal a run of that job alone to float rounding of batched kernels.
  A job whose ``on_step`` raises ``JobCancelledError`` gets no more callbacks and its rows are
  discarded; the batch stops once every job in it is cancelled.
- **VAE precision**: a VAE that asks for fp32 (SDXL's ``force_upcast``) runs in fp16 while its
  results are finite, which halves its memory and time; at the first overflow it is upcast to
  fp32 for good and the call is redone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from genfill.protocol import ErrorCode

from .base import (
    DeviceKind,
    EngineCapabilities,
    EngineDefaults,
    EngineError,
    EngineJob,
    EngineOptions,
    JobCancelledError,
    StepCallback,
    torch_errors,
)
from .conditioning import Conditioning, PromptCache, encode_prompt
from .denoise import Batch, Part, denoise
from .graphs import GraphedStep, compiler_for, graphs_enabled
from .prefill import prefill
from .schedulers import SCHEDULERS, make_scheduler, noise_coefficients

logger = logging.getLogger("genfill.engines.sd_inpaint")

# The scheduler names stay importable from here, where they were defined before
# ``schedulers`` held them.
__all__ = ["SCHEDULERS", "SDInpaintEngine", "make_scheduler", "noise_coefficients"]


_STRENGTH = {"fill": 1.0, "expand": 1.0, "add": 1.0, "remove": 1.0}
DEFAULTS = {
    "sd15": EngineDefaults(steps=25, guidance=7.5, scheduler="dpmpp_2m_karras", strength_by_mode=_STRENGTH),
    "sdxl": EngineDefaults(steps=30, guidance=5.0, scheduler="dpmpp_2m_karras", strength_by_mode=_STRENGTH),
}


_BATCHED_ENCODE_PIXELS = 768 * 768
"""Images up to this many pixels and their masked copies are VAE-encoded as one batch."""

_BATCHED_ENCODE_ROWS = 16
"""The most images one encoder call takes when ``run_many`` encodes several jobs together."""

_PREFILL_POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="genfill-prefill")


def default_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA (bf16 where the caller asks), fp32 elsewhere: CPU half is slow and lossy."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


class SDInpaintEngine:
    """The ``Engine`` for SD 1.5/2.x and SDXL checkpoints, inpainting or ordinary.

    Args:
        pipeline_factory: returns a built diffusers pipeline whose components this engine
            drives: ``StableDiffusionInpaintPipeline`` or ``StableDiffusionPipeline`` (SD 1.x,
            2.x) or ``StableDiffusionXLInpaintPipeline`` / ``StableDiffusionXLPipeline``. It is
            called once, by ``load()``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: weights' dtype; ``None`` means fp16 on CUDA and fp32 on the CPU.
        offload: model CPU offload (``enable_model_cpu_offload``) for small GPUs; CUDA only.
        name: the engine name the server announces.
        native_size: overrides the side read from the model (``unet.config.sample_size *
            vae_scale_factor``: 512 for SD1.5, 768 for SD2-768, 1024 for SDXL).
        max_batch: the most variations denoised in one batch; ``None`` means all at once.
            A batch that runs out of GPU memory is retried in halves.
        cuda_graphs: capture the UNet step as CUDA graphs; ``None`` means on CUDA without
            offload, unless ``GENFILL_CUDA_GRAPHS=0``.
        compiler: compiles the UNet step and the VAE for the commonest shapes at load
            (``graphs.GraphedStep``); ``"auto"`` means TorchInductor where CUDA graphs are used
            (``graphs.compiler_for``), ``None`` compiles nothing.
    """

    capabilities = EngineCapabilities(
        prompt=True,
        options=frozenset({"negative_prompt", "steps", "strength", "guidance", "scheduler"}),
        device_kind=DeviceKind.GPU,
        batching=True,
        max_batch_images=8,
        uses_prefill=True,
        needs_colour_match=True,
    )
    """The class's; ``load`` adds the model's ``native_size``. ``max_batch_images`` is the most
    images ``run_many`` is given at once by the server."""

    _PROMPT_CACHE_SIZE = 32

    def __init__(
        self,
        pipeline_factory: Callable[[], Any],
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
        name: str = "sd_inpaint",
        native_size: int | None = None,
        max_batch: int | None = None,
        cuda_graphs: bool | None = None,
        compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None | str = "auto",
    ) -> None:
        if offload and not str(device).startswith("cuda"):
            raise ValueError(f"offload needs a CUDA device, got {device!r}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.name = name
        self.device = str(device)
        self.dtype = dtype or default_dtype(self.device)
        if not self.device.startswith("cuda"):
            self.dtype = torch.float32
        self.offload = offload
        self.max_batch = max_batch
        self.native_size = native_size
        self.capabilities = type(self).capabilities.refined(native_size=native_size)
        self._factory = pipeline_factory
        self.pipeline: Any = None
        self.family = "sd15"
        use_graphs = graphs_enabled(self.device) and (not offload if cuda_graphs is None else bool(cuda_graphs))
        if compiler == "auto":
            compiler = compiler_for(self.device) if use_graphs else None
        self.step_runner = GraphedStep(self._unet_step, enabled=use_graphs, compiler=compiler, name="UNet step")
        # The VAE is bound by its convolutions, not by launches: compiled, but not graphed,
        # which would keep its large activations reserved per shape.
        self.encode_runner = GraphedStep(self._vae_encode, enabled=False, compiler=compiler, name="VAE encoder")
        self.decode_runner = GraphedStep(self._vae_decode, enabled=False, compiler=compiler, name="VAE decoder")
        self._check_vae = False
        self._prompts = PromptCache(self._PROMPT_CACHE_SIZE)
        self._schedulers: dict[str, Any] = {}

    # Engine protocol

    @torch_errors()
    def load(self) -> None:
        pipe = self._factory()
        self.family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        pipe.to(dtype=self.dtype)
        vae = pipe.vae
        # SDXL's VAE can overflow in fp16 (diffusers' ``force_upcast``): it runs in fp16 while
        # its results stay finite and is upcast at the first overflow (``_vae``).
        self._check_vae = self.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if self.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self.pipeline = pipe
        if self.native_size is None:
            self.native_size = int(pipe.unet.config.sample_size) * self.vae_scale_factor
        self.capabilities = self.capabilities.refined(native_size=self.native_size)
        self._load_extra()
        if self.step_runner.compiler is not None and self._warm_up_at_load:
            self._warm_up()

    _warm_up_at_load = True

    @property
    def runners(self) -> tuple[GraphedStep, ...]:
        return (self.step_runner, self.encode_runner, self.decode_runner)

    def _warm_up(self) -> None:
        """Compiles the commonest shapes (``graphs.GraphedStep.compiling``): a job at the
        native size with the default guidance and one variation, and, at 512 px and below, a
        full batch of such jobs (``run_many``: its UNet step, batched VAE encode and decode).
        Load takes that much longer once per machine; Inductor's cache makes later loads quick."""
        size = int(self.native_size)
        selection = np.zeros((size, size), np.uint8)
        selection[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        image = np.full((size, size, 3), 128, np.uint8)
        jobs = [
            EngineJob(image, selection, selection, [seed], EngineOptions.resolve(self.defaults, steps=2))
            for seed in range(self.capabilities.max_batch_images)
        ]

        def ignore(*_: Any) -> None:
            pass

        started = time.perf_counter()
        logger.info("%s: compiling for %dx%d (the first load on a machine takes minutes)", self.name, size, size)
        with contextlib.ExitStack() as stack:
            for runner in self.runners:
                stack.enter_context(runner.compiling())
            self.run(jobs[0], ignore)
            if size <= 512 and len(jobs) > 1:
                self.run_many(jobs, [ignore] * len(jobs))
        logger.info("%s: compiled in %.1f s", self.name, time.perf_counter() - started)

    def close(self) -> None:
        self.pipeline = None
        for runner in self.runners:
            runner.clear()
        self._prompts.clear()
        self._schedulers.clear()
        self._close_extra()
        _empty_cache(self.device)

    @torch_errors()
    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns one ``(H, W, 3)`` uint8 RGB image per seed, the size of ``job.image``.

        ``job.options`` holds ``FillRequest`` fields; ``None`` values take the model's
        defaults (SD1.5: 25 steps, guidance 7.5; SDXL: 30 steps, guidance 5.0; DPM++ 2M
        Karras; strength 1.0 in every mode).

        Raises:
            EngineError: ``invalid_request`` for an unknown scheduler or control type,
                ``weights_not_installed`` for a control whose weights are missing,
                ``out_of_memory`` when even one variation does not fit.
            JobCancelledError: from ``on_step``; nothing is returned.
        """
        self._check_loaded()
        seeds = self._seeds(job)
        with torch.inference_mode():
            try:
                batch = self._prepare_job(job)
                control = self._prepare_control(job, np.ascontiguousarray(job.image[:, :, :3]), job.options)
                results: list[np.ndarray] = []
                limit = self.max_batch or len(seeds)
                done = 0
                chunks_run = 0
                while done < len(seeds):
                    chunk = seeds[done : done + limit]
                    chunk_count = chunks_run + _chunks(len(seeds) - done, limit)
                    part = Part(batch, chunk, on_step, chunks_run, chunk_count)
                    try:
                        self._denoise([part], control)
                    except torch.cuda.OutOfMemoryError:
                        _empty_cache(self.device)
                        if len(chunk) == 1:
                            raise EngineError(
                                ErrorCode.OUT_OF_MEMORY,
                                "the GPU ran out of memory for one image; try a smaller selection or --offload",
                            ) from None
                        limit = max(1, len(chunk) // 2)
                        logger.warning("out of memory at batch %d; retrying with %d", len(chunk), limit)
                        continue
                    if part.error is not None:
                        raise part.error
                    results += part.images
                    done += len(chunk)
                    chunks_run += 1
            except JobCancelledError:
                _empty_cache(self.device)
                raise
            finally:
                if hasattr(self.pipeline, "maybe_free_model_hooks"):
                    self.pipeline.maybe_free_model_hooks()
        return results

    def batch_key(self, work_size: tuple[int, int], options: EngineOptions) -> tuple | None:
        """What jobs must share to run in one ``run_many`` batch: the working size ``(height,
        width)`` and the resolved options decide it. ``None`` for a job that runs alone (one
        with control inputs)."""
        if options.control:
            return None
        return (tuple(work_size), options.steps, options.guidance, options.scheduler, options.strength)

    @torch_errors()
    def run_many(
        self, jobs: Sequence[EngineJob], on_steps: Sequence[StepCallback]
    ) -> list[list[np.ndarray] | BaseException]:
        """Runs several jobs with equal ``batch_key`` in one denoising batch.

        Returns, per job, its images (as ``run`` would) or the exception that ended it
        (``JobCancelledError`` from its ``on_step``, a request error from its preparation).
        A batch that runs out of GPU memory is retried one job at a time.
        """
        self._check_loaded()
        outcomes: list[list[np.ndarray] | BaseException | None] = [None] * len(jobs)
        parts: list[tuple[int, Part]] = []
        with torch.inference_mode():
            try:
                for index, prepared in enumerate(self._prepare_jobs(jobs)):
                    if isinstance(prepared, BaseException):
                        outcomes[index] = prepared
                    else:
                        parts.append((index, Part(prepared, self._seeds(jobs[index]), on_steps[index])))
                keys = {part.batch.batch_key() for _, part in parts}
                if len(keys) > 1:
                    raise ValueError("run_many needs jobs of one batch key")
                limit = self.max_batch or self.capabilities.max_batch_images
                rows = sum(len(part.seeds) for _, part in parts)
                alone = rows > limit
                if parts and not alone:
                    try:
                        self._denoise([part for _, part in parts], None)
                    except torch.cuda.OutOfMemoryError:
                        _empty_cache(self.device)
                        logger.warning("out of memory for %d jobs in one batch; running them one by one", len(parts))
                        alone = True
                if alone:
                    for index, part in parts:
                        try:
                            outcomes[index] = self.run(jobs[index], part.on_step)
                        except (EngineError, JobCancelledError) as exc:
                            outcomes[index] = exc
                else:
                    for index, part in parts:
                        outcomes[index] = part.error if part.error is not None else part.images
            finally:
                if hasattr(self.pipeline, "maybe_free_model_hooks"):
                    self.pipeline.maybe_free_model_hooks()
        if any(isinstance(outcome, JobCancelledError) for outcome in outcomes):
            _empty_cache(self.device)
        return [outcome if outcome is not None else [] for outcome in outcomes]

    # Model facts

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def is_inpaint_model(self) -> bool:
        """True for 9-channel UNets (latents + mask + masked-image latents)."""
        return int(self.pipeline.unet.config.in_channels) == 9

    @property
    def defaults(self) -> EngineDefaults:
        return DEFAULTS[self.family]

    @property
    def _exec_device(self) -> torch.device:
        return torch.device(getattr(self.pipeline, "_execution_device", None) or self.device)

    def _fresh_scheduler(self, name: str) -> Any:
        """A new scheduler of kind ``name``: a copy of one built once per engine. Building one
        from a config takes milliseconds of Python (most for Karras sigmas) that the device
        would otherwise wait for at the start of every job."""
        template = self._schedulers.get(name)
        if template is None:
            template = self._schedulers[name] = make_scheduler(name, self.pipeline.scheduler.config)
        return copy.deepcopy(template)

    def _check_loaded(self) -> None:
        if self.pipeline is None:
            raise RuntimeError(f"engine {self.name} is not loaded")

    @staticmethod
    def _seeds(job: EngineJob) -> list[int]:
        seeds = [int(seed) for seed in job.seeds]
        if not seeds:
            raise ValueError("job has no seeds")
        return seeds

    # Steps of a run

    def _prepare_job(self, job: EngineJob) -> Batch:
        mode, prefilled = self._start_prefill(job)
        return self._prepare(job, prefilled.result(), job.options, mode)

    def _start_prefill(self, job: EngineJob) -> tuple[str, Future]:
        """Checks what a job asks before any work is done for it, and returns its mode and its
        pre-fill: the one the pipeline started, or one started here on a helper thread."""
        image = np.ascontiguousarray(job.image[:, :, :3])
        factor = self.vae_scale_factor
        if image.shape[0] % factor or image.shape[1] % factor:
            raise ValueError(f"image size {image.shape[1]}x{image.shape[0]} is not a multiple of {factor}")
        scheduler_name = str(job.options.scheduler or self.defaults.scheduler)
        if scheduler_name not in SCHEDULERS:
            make_scheduler(scheduler_name, None)  # raises the request error
        mode = str(job.options.mode)
        return mode, job.prefilled or _PREFILL_POOL.submit(prefill, image, np.asarray(job.selection), mode)

    def _prepare_jobs(self, jobs: Sequence[EngineJob]) -> list[Batch | BaseException]:
        """``_prepare_job`` for each job of a ``run_many`` batch, or the request error that
        ends it. The pre-fills (numpy) run side by side on helper threads, and the images
        of small jobs go through the VAE encoder in one batch instead of one call a job,
        so the device waits for neither."""
        outcomes: list[Batch | BaseException | None] = [None] * len(jobs)
        pending: list[tuple[int, EngineJob, str, Future]] = []
        for index, job in enumerate(jobs):
            try:
                if self.batch_key(np.shape(job.image)[:2], job.options) is None:
                    raise ValueError("jobs with control inputs run alone")
                self._seeds(job)
                pending.append((index, job, *self._start_prefill(job)))
            except (EngineError, ValueError) as exc:
                outcomes[index] = exc
        ready: list[tuple[int, EngineJob, str, np.ndarray]] = []
        for index, job, mode, future in pending:
            try:
                ready.append((index, job, mode, future.result()))
            except (EngineError, ValueError) as exc:
                outcomes[index] = exc
        latents: dict[int, torch.Tensor] = {}
        small = [item for item in ready if item[3].shape[0] * item[3].shape[1] <= _BATCHED_ENCODE_PIXELS]
        if len(small) > 1:
            latents = self._encode_many([(job, prefilled) for _, job, _, prefilled in small])
            latents = {small[i][0]: value for i, value in latents.items()}
        for index, job, mode, prefilled in ready:
            try:
                outcomes[index] = self._prepare(job, prefilled, job.options, mode, encoded=latents.get(index))
            except (EngineError, ValueError) as exc:
                outcomes[index] = exc
        return outcomes  # type: ignore[return-value]  # every index was set above

    def _encode_many(self, items: list[tuple[EngineJob, np.ndarray]]) -> dict[int, torch.Tensor]:
        """VAE latents of several same-size jobs in one encoder call (``_BATCHED_ENCODE_ROWS``
        images at most a call): per job ``(1 or 2, C, h, w)``, its image and, for inpainting
        models, its masked image, as ``_prepare`` would encode them one job at a time."""
        device = self._exec_device
        inpaint = self.is_inpaint_model
        rows: list[torch.Tensor] = []
        for job, prefilled in items:
            pixels = _to_pixels(prefilled, device)
            rows.append(pixels)
            if inpaint:
                mask_px = torch.from_numpy(np.asarray(job.denoise_mask, dtype=np.float32) / 255.0)[None, None].to(device)
                rows.append(pixels * (1 - (mask_px >= 0.5).to(pixels.dtype)))
        per_job = 2 if inpaint else 1
        encoded = torch.cat([
            self._encode(torch.cat(rows[start : start + _BATCHED_ENCODE_ROWS]))
            for start in range(0, len(rows), _BATCHED_ENCODE_ROWS)
        ])
        return {i: encoded[i * per_job : (i + 1) * per_job] for i in range(len(items))}

    def _prepare(
        self, job: EngineJob, prefilled: np.ndarray, options: EngineOptions, mode: str, encoded: torch.Tensor | None = None
    ) -> Batch:
        # Resolved by the pipeline (``EngineOptions.resolve``); the fallbacks serve a job
        # built with bare ``EngineOptions()``.
        defaults = self.defaults
        steps = int(options.steps or defaults.steps)
        guidance = defaults.guidance if options.guidance is None else float(options.guidance)
        strength = defaults.strength_by_mode.get(mode, 1.0) if options.strength is None else float(options.strength)
        scheduler_name = str(options.scheduler or defaults.scheduler)  # checked by _start_prefill
        device = self._exec_device
        pixels = _to_pixels(prefilled, device) if encoded is None else None
        mask_host = torch.from_numpy(np.asarray(job.denoise_mask, dtype=np.float32) / 255.0)[None, None]
        mask_px = mask_host.to(device)
        inpaint = self.is_inpaint_model
        if inpaint:
            # As the model was trained: a hard mask, and the image with the masked part blanked.
            # Small images go through the VAE in one batch; large ones one at a time, where the
            # encoder's activations, not its launches, are what counts.
            hard = (mask_px >= 0.5).to(torch.float32)
            if encoded is not None:
                x0, masked_latents = encoded[:1], encoded[1:]
            elif pixels.shape[-1] * pixels.shape[-2] <= _BATCHED_ENCODE_PIXELS:
                both = self._encode(torch.cat([pixels, pixels * (1 - hard)]))
                x0, masked_latents = both[:1], both[1:]
            else:
                x0 = self._encode(pixels)
                masked_latents = self._encode(pixels * (1 - hard))
        else:
            x0 = encoded if encoded is not None else self._encode(pixels)
        latent_size = x0.shape[-2:]
        m = torch.nn.functional.interpolate(mask_px, size=latent_size, mode="area").to(x0.dtype)
        # The same numbers on the CPU, so the loop decides which cells take part without a sync.
        m_host = torch.nn.functional.interpolate(mask_host, size=latent_size, mode="area").to(x0.dtype)
        inpaint_cond = None
        if inpaint:
            mask_latent = torch.nn.functional.interpolate(hard, size=latent_size).to(x0.dtype)
            inpaint_cond = torch.cat([mask_latent, masked_latents], dim=1)
        do_cfg = guidance > 1.0
        embeds, added = self._encode_prompt(
            options.prompt, options.negative_prompt, do_cfg, prefilled.shape[:2]
        )
        return Batch(x0, m, inpaint_cond, embeds, added, guidance, scheduler_name, steps, strength, m_host)

    def _vae(self, call: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """``call(vae)``, in fp16 while a VAE that asks for fp32 gives finite results; at its
        first overflow the VAE is upcast to fp32 for good and ``call`` is redone."""
        vae = self.pipeline.vae
        result = call(vae)
        if self._check_vae and not bool(torch.isfinite(result).all()):
            logger.warning("the VAE overflowed in fp16; running it in fp32 from now on")
            self._check_vae = False
            vae.to(dtype=torch.float32)
            result = call(vae)
        return result

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pipeline.vae.encode(pixels).latent_dist.mean

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline.vae.decode(latents).sample

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_config = self.pipeline.vae.config
        latents = self._vae(lambda vae: self.encode_runner(pixels.to(vae.dtype)))
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae_config.scaling_factor).to(self.dtype)

    def _decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        vae_config = self.pipeline.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        scaled = latents / vae_config.scaling_factor + shift
        decoded = self._vae(lambda vae: self.decode_runner(scaled.to(vae.dtype)))
        array = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        # Channels last on the device, so the host gets contiguous images in one copy.
        array = array.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return list(array)

    def _encode_prompt(
        self, prompt: str, negative: str, do_cfg: bool, size: tuple[int, int]
    ) -> Conditioning:
        """The prompt's embeddings (``conditioning.encode_prompt``), from this engine's cache."""
        key = (prompt, negative, do_cfg, tuple(size) if self.family == "sdxl" else None, self.dtype)
        return self._prompts.get(
            key,
            lambda: encode_prompt(
                self.pipeline, self.family, prompt, negative, do_cfg, size, device=self._exec_device, dtype=self.dtype
            ),
        )

    def _unet_step(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        inpaint_cond: torch.Tensor | None,
        embeds: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
        residuals: tuple[list[torch.Tensor], torch.Tensor] | None,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        """One UNet evaluation and the guidance combine: the part of a step that is captured
        as a CUDA graph. ``latents`` are the scheduler-scaled rows, once; ``guidance`` is
        ``None`` without classifier-free guidance, else a 0-d tensor."""
        model_in = torch.cat([latents, latents]) if guidance is not None else latents
        if inpaint_cond is not None:
            model_in = torch.cat([model_in, inpaint_cond], dim=1)
        unet_kwargs: dict[str, Any] = {"encoder_hidden_states": embeds, "return_dict": False}
        if added is not None:
            unet_kwargs["added_cond_kwargs"] = added
        if residuals is not None:
            unet_kwargs["down_block_additional_residuals"] = residuals[0]
            unet_kwargs["mid_block_additional_residual"] = residuals[1]
        noise_pred = self.pipeline.unet(model_in, t, **unet_kwargs)[0]
        if guidance is not None:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
        return noise_pred

    def _denoise(self, parts: list[Part], control: Any) -> None:
        """``denoise.denoise`` on this engine's UNet step, VAE decoder and a fresh scheduler of
        the parts' kind; ``control`` is what ``_prepare_control`` returned (``None``: none)."""
        first = parts[0].batch
        denoise(
            parts,
            self._fresh_scheduler(first.scheduler_name),
            step=self.step_runner,
            decode=self._decode,
            control_residuals=None if control is None else functools.partial(self._control_residuals, control),
            device=self._exec_device,
            dtype=self.dtype,
            family=self.family,
        )

    # Hooks for the ControlNet engine

    def _load_extra(self) -> None:
        pass

    def _close_extra(self) -> None:
        pass

    def _prepare_control(self, job: EngineJob, image: np.ndarray, options: EngineOptions) -> Any:
        if options.control:
            raise EngineError(
                ErrorCode.INVALID_REQUEST, f"engine {self.name!r} takes no control inputs; use a ControlNet engine"
            )
        return None

    def _control_residuals(
        self,
        control: Any,
        step: int,
        total: int,
        model_in: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
        size: int,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        return None


def _chunks(total: int, size: int) -> int:
    return -(-total // size)


def _to_pixels(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float32 in [-1, 1]. The bytes cross to the
    device as uint8, a quarter of the float32 size, and are converted there."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
    return tensor / 127.5 - 1.0


def _empty_cache(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
