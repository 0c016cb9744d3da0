"""Stable Diffusion 1.5 / 2.x and SDXL inpainting, with our own denoising loop.

diffusers' inpaint pipelines binarize the mask, have no cancel and decode previews only
through the VAE. This engine takes the components of an already built pipeline
(``StableDiffusionInpaintPipeline``, ``StableDiffusionPipeline``, and their XL twins) and runs
the loop itself:

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
import inspect
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
from .graphs import GraphedStep, compiler_for, graphs_enabled
from .latent_preview import preview_due, preview_rgb
from .prefill import prefill

logger = logging.getLogger("genfill.engines.sd_inpaint")

__all__ = ["SCHEDULERS", "SDInpaintEngine", "make_scheduler", "noise_coefficients"]

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
"""Scheduler names a request may ask for (``FillRequest.scheduler``)."""


def make_scheduler(name: str, config: Any):
    """A fresh scheduler of kind ``name`` built from a model's own scheduler ``config``, so
    its training betas and prediction type (epsilon or v for SD2-768) carry over.

    Raises:
        EngineError: ``invalid_request`` for an unknown name.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    raise EngineError(ErrorCode.INVALID_REQUEST, f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def noise_coefficients(scheduler: Any, timestep: torch.Tensor, timesteps_host: torch.Tensor) -> tuple[float, float]:
    """``(a, b)`` such that ``scheduler.add_noise(x0, noise, timestep)`` is ``a * x0 + b *
    noise`` in the scheduler's present state (it is linear in both for every scheduler
    here). ``timestep`` is a 1-element host tensor and ``timesteps_host`` a host copy of
    ``scheduler.timesteps``, which stands in for them meanwhile: worked out on the host, the
    coefficients never wait for the device, where ``add_noise`` on device tensors copies the
    schedule across, and so waits for the device, at every call."""
    one, zero = torch.ones(1), torch.zeros(1)
    timesteps = scheduler.timesteps
    scheduler.timesteps = timesteps_host
    try:
        return float(scheduler.add_noise(one, zero, timestep)), float(scheduler.add_noise(zero, one, timestep))
    finally:
        scheduler.timesteps = timesteps


_STRENGTH = {"fill": 1.0, "expand": 1.0, "add": 1.0, "remove": 1.0}
DEFAULTS = {
    "sd15": EngineDefaults(steps=25, guidance=7.5, scheduler="dpmpp_2m_karras", strength_by_mode=_STRENGTH),
    "sdxl": EngineDefaults(steps=30, guidance=5.0, scheduler="dpmpp_2m_karras", strength_by_mode=_STRENGTH),
}


_BATCHED_ENCODE_PIXELS = 768 * 768
"""Images up to this many pixels and their masked copies are VAE-encoded as one batch."""

_BATCHED_ENCODE_ROWS = 16
"""The most images one encoder call takes when ``run_many`` encodes several jobs together."""

_BATCHED_DECODE_LATENT_PIXELS = 8 * 64 * 64
"""``run_many`` decodes every job's latents in one decoder call up to this many latent
pixels in all (eight 512x512 images at SD's factor of 8); larger batches decode job by job."""

_PREFILL_POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="genfill-prefill")


def default_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA (bf16 where the caller asks), fp32 elsewhere: CPU half is slow and lossy."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


@dataclass
class _Batch:
    """One job's prepared tensors, shared by every chunk of its variations."""

    x0: torch.Tensor  # (1, C, h, w) original latents, in the denoiser's space
    m: torch.Tensor  # (1, 1, h, w) denoise mask in [0, 1]
    inpaint_cond: torch.Tensor | None  # (1, 1 + C, h, w) mask and masked-image latents
    embeds: torch.Tensor  # (2 or 1, L, D): negative first when guiding
    added: dict[str, torch.Tensor] | None  # SDXL micro-conditioning, batch as embeds
    guidance: float
    scheduler_name: str
    steps: int
    strength: float
    m_host: torch.Tensor | None = None  # ``m`` on the CPU, to decide each step without a sync

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one denoising batch."""
        return (tuple(self.x0.shape[1:]), self.x0.dtype, self.inpaint_cond is not None, tuple(self.embeds.shape[1:]),
                self.added is None, self.guidance, self.scheduler_name, self.steps, self.strength)


@dataclass
class _Part:
    """The rows of one job (or one chunk of its variations) in a denoising batch."""

    batch: _Batch
    seeds: list[int]
    on_step: StepCallback
    chunk_index: int = 0
    chunk_count: int = 1
    images: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None


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
        self._prompts: OrderedDict[tuple, tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = OrderedDict()
        self._schedulers: dict[str, Any] = {}
        self._prompt_lock = threading.Lock()

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
                    part = _Part(batch, chunk, on_step, chunks_run, chunk_count)
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
        parts: list[tuple[int, _Part]] = []
        with torch.inference_mode():
            try:
                for index, prepared in enumerate(self._prepare_jobs(jobs)):
                    if isinstance(prepared, BaseException):
                        outcomes[index] = prepared
                    else:
                        parts.append((index, _Part(prepared, self._seeds(jobs[index]), on_steps[index])))
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

    def _prepare_job(self, job: EngineJob) -> _Batch:
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

    def _prepare_jobs(self, jobs: Sequence[EngineJob]) -> list[_Batch | BaseException]:
        """``_prepare_job`` for each job of a ``run_many`` batch, or the request error that
        ends it. The pre-fills (numpy) run side by side on helper threads, and the images
        of small jobs go through the VAE encoder in one batch instead of one call a job,
        so the device waits for neither."""
        outcomes: list[_Batch | BaseException | None] = [None] * len(jobs)
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
    ) -> _Batch:
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
        return _Batch(x0, m, inpaint_cond, embeds, added, guidance, scheduler_name, steps, strength, m_host)

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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The prompt's embeddings, from a small cache: artists repeat prompts, and SDXL's two
        text encoders cost tens of milliseconds a job."""
        key = (prompt, negative, do_cfg, tuple(size) if self.family == "sdxl" else None, self.dtype)
        with self._prompt_lock:
            cached = self._prompts.get(key)
            if cached is not None:
                self._prompts.move_to_end(key)
                return cached
        encoded = self._encode_prompt_uncached(prompt, negative, do_cfg, size)
        with self._prompt_lock:
            self._prompts[key] = encoded
            while len(self._prompts) > self._PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        return encoded

    def _encode_prompt_uncached(
        self, prompt: str, negative: str, do_cfg: bool, size: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        pipe = self.pipeline
        device = self._exec_device
        if self.family == "sd15":
            positive, negative_embeds = pipe.encode_prompt(
                prompt, device, 1, do_cfg, negative_prompt=negative or None
            )
            embeds = torch.cat([negative_embeds, positive]) if do_cfg else positive
            return embeds.to(self.dtype), None
        positive, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative or None,
        )
        height, width = size
        time_ids = self._time_ids(height, width, aesthetic=6.0)
        if do_cfg:
            embeds = torch.cat([negative_embeds, positive])
            text_embeds = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([self._time_ids(height, width, aesthetic=2.5), time_ids])
        else:
            embeds, text_embeds = positive, pooled
        added = {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids.to(device, self.dtype)}
        return embeds.to(self.dtype), added

    def _time_ids(self, height: int, width: int, *, aesthetic: float) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop origin and target size; a refiner-
        style UNet (5 numbers) takes an aesthetic score instead of the target size."""
        unet = self.pipeline.unet
        expected = unet.add_embedding.linear_1.in_features
        pooled_dim = expected - 6 * unet.config.addition_time_embed_dim
        values = [height, width, 0, 0, height, width]
        if pooled_dim != self.pipeline.text_encoder_2.config.projection_dim:
            values = [height, width, 0, 0, aesthetic]
        return torch.tensor([values], dtype=torch.float32)

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

    def _denoise(self, parts: list[_Part], control: Any) -> None:
        """Denoises every part's rows in one batch; fills each part's ``images`` or ``error``.

        ``JobCancelledError`` from a part's ``on_step`` ends that part (no more callbacks, its
        rows discarded); the loop stops, before its next UNet call, once no part is left.
        """
        device = self._exec_device
        first = parts[0].batch
        scheduler = self._fresh_scheduler(first.scheduler_name)
        scheduler.set_timesteps(first.steps, device=device)
        init_steps = min(max(int(first.steps * first.strength), 1), first.steps)
        start = (first.steps - init_steps) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        total_steps = len(timesteps)
        timesteps_host = scheduler.timesteps.cpu()
        seeds = [seed for part in parts for seed in part.seeds]
        counts = [len(part.seeds) for part in parts]
        size = len(seeds)
        offsets = np.cumsum([0, *counts]).tolist()
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        shape = tuple(first.x0.shape[1:])
        noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        noise = noise.to(device, self.dtype)

        def rows(tensors: list[torch.Tensor]) -> torch.Tensor:
            if len(tensors) == 1:
                return tensors[0].expand(counts[0], *tensors[0].shape[1:])
            return torch.cat([t.expand(n, *t.shape[1:]) for t, n in zip(tensors, counts)])

        x0 = rows([part.batch.x0 for part in parts])
        m = rows([part.batch.m for part in parts])
        m_host = [part.batch.m_host for part in parts]
        if first.strength >= 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(size))
        guiding = first.guidance > 1.0
        guidance = torch.tensor(first.guidance, device=device, dtype=self.dtype) if guiding else None
        if guiding:
            embeds = torch.cat([rows([p.batch.embeds[:1] for p in parts]), rows([p.batch.embeds[1:] for p in parts])])
        else:
            embeds = rows([p.batch.embeds for p in parts]).contiguous()
        added = None
        if first.added is not None:
            added = {}
            for key in first.added:
                if guiding:
                    added[key] = torch.cat([
                        rows([p.batch.added[key][:1] for p in parts]), rows([p.batch.added[key][1:] for p in parts])
                    ])
                else:
                    added[key] = rows([p.batch.added[key] for p in parts]).contiguous()
        inpaint_cond = None
        if first.inpaint_cond is not None:
            cond_rows = rows([part.batch.inpaint_cond for part in parts])
            inpaint_cond = torch.cat([cond_rows, cond_rows]) if guiding else cond_rows.contiguous()
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        live = list(range(len(parts)))
        try:
            for i, t in enumerate(timesteps):
                threshold = 1.0 - (i + 1) / total_steps
                if not all(bool((host > threshold).all()) for host in m_host if host is not None):
                    active = (m > threshold).to(latents.dtype)
                    keep_scale, noise_scale = noise_coefficients(
                        scheduler, timesteps_host[start + i].reshape(1), timesteps_host
                    )
                    noised = x0 * keep_scale + noise * noise_scale
                    latents = active * latents + (1 - active) * noised
                scaled = scheduler.scale_model_input(latents, t)
                residuals = None
                if control is not None:
                    model_in = torch.cat([scaled, scaled]) if guiding else scaled
                    residuals = self._control_residuals(control, i, total_steps, model_in, t, embeds, added, size)
                noise_pred = self.step_runner(scaled, t, inpaint_cond, embeds, added, residuals, guidance)
                out = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
                latents = out.prev_sample
                previews: list[np.ndarray | None] = [None] * len(parts)
                if preview_due(i + 1, total_steps):
                    x0_pred = getattr(out, "pred_original_sample", None)
                    source = latents if x0_pred is None else x0_pred
                    firsts = source[[offsets[index] for index in live]].float().cpu().numpy()
                    for index, latent in zip(live, firsts):
                        previews[index] = preview_rgb(latent, self.family)
                for index in list(live):
                    part = parts[index]
                    try:
                        # Progress counts the steps of every chunk of variations.
                        part.on_step(part.chunk_index * total_steps + i + 1, part.chunk_count * total_steps, previews[index])
                    except JobCancelledError as exc:
                        part.error = exc
                        live.remove(index)
                if not live:
                    return
            keep = (m > 0).to(latents.dtype)
            latents = keep * latents + (1 - keep) * x0
            live_rows = sum(counts[index] for index in live)
            if len(live) > 1 and live_rows * latents.shape[-1] * latents.shape[-2] <= _BATCHED_DECODE_LATENT_PIXELS:
                # One decoder call and one copy to the host for every job of the batch.
                if len(live) == len(parts):
                    images = self._decode(latents)
                else:
                    rows_of = [torch.arange(offsets[index], offsets[index + 1]) for index in live]
                    images = self._decode(latents[torch.cat(rows_of).to(latents.device)])
                start = 0
                for index in live:
                    parts[index].images = images[start : start + counts[index]]
                    start += counts[index]
            else:
                for index in live:
                    parts[index].images = self._decode(latents[offsets[index] : offsets[index + 1]])
        finally:
            del latents, noise

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
