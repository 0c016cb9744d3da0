"""ControlNet inpainting for SD 1.5 and SDXL, on the SD inpaint engine's denoising loop.

Each control in a request (``FillRequest.control``) adds a ControlNet's residuals to the UNet
for the steps between its ``start`` and ``end`` fractions, scaled by its ``strength``; several
controls add up, as in diffusers' ``MultiControlNetModel``.

Control images come from one of two places:

- the request: ``job.options.control[i].image`` is then an ``(H, W, 3)`` (or ``(H, W)``)
  uint8 numpy array that the server decoded from the uploaded image and the fill pipeline
  cropped and scaled like ``job.image``; an array of another size is resized to the job's
  size, so it must show the same area as ``job.image``;
- a ``controlnet_aux`` preprocessor run on ``job.image``. ``canny``, ``lineart_standard`` and
  ``shuffle`` need no weights. ``depth``, ``pose``, ``hed``, ``scribble``, ``lineart`` and
  ``mlsd`` need the ``lllyasviel/Annotators`` files, found in a local folder or the local
  Hugging Face cache, never downloaded; without them the job fails with
  ``weights_not_installed`` naming the files. ``inpaint`` needs no preprocessor: its control
  image is the image with the selection blanked (ControlNet 1.1 inpaint's convention).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from genfill.protocol import ControlType, ErrorCode

from .base import EngineError, EngineJob, EngineOptions
from .graphs import GraphedStep
from .prefill import PREFILL_SEED
from .sd_inpaint import SDInpaintEngine

__all__ = ["ANNOTATOR_FILES", "ANNOTATORS_REPO", "ControlNetEngine", "control_image"]

ANNOTATORS_REPO = "lllyasviel/Annotators"
ANNOTATOR_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "depth": ("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "pose": ("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
    "hed": ("HEDdetector", ("ControlNetHED.pth",)),
    "scribble": ("HEDdetector", ("ControlNetHED.pth",)),
    "lineart": ("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "mlsd": ("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
}
"""Preprocessors that need weights: the ``controlnet_aux`` class and the files it loads from
``lllyasviel/Annotators``."""

CANNY_THRESHOLDS = (100, 200)
_GLOBAL_RANDOM = threading.Lock()


def _resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    # A copy: the array PIL hands out is read-only, and torch.from_numpy warns of it.
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _as_rgb(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise EngineError(ErrorCode.IMAGE_INVALID, "a control image must be 8-bit")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise EngineError(ErrorCode.IMAGE_INVALID, f"a control image must be RGB, gray or RGBA, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def find_annotators(kind: str, folder: str | os.PathLike | None) -> str | None:
    """The local folder holding every file ``kind``'s preprocessor needs, or ``None``.

    Looks in ``folder`` first, then in the local Hugging Face cache (offline lookups only).
    """
    files = ANNOTATOR_FILES[kind][1]
    if folder is not None and all(os.path.isfile(os.path.join(folder, name)) for name in files):
        return os.fspath(folder)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return None
    paths = [try_to_load_from_cache(ANNOTATORS_REPO, name) for name in files]
    if all(isinstance(path, str) and os.path.isfile(path) for path in paths):
        return os.path.dirname(paths[0])
    return None


def control_image(
    kind: str,
    image: np.ndarray,
    *,
    selection: np.ndarray | None = None,
    annotators_dir: str | os.PathLike | None = None,
    detectors: dict[str, Any] | None = None,
) -> np.ndarray:
    """Derives a control image from ``image`` with ``kind``'s preprocessor.

    Args:
        kind: a ``ControlType`` value.
        image: ``(H, W, 3)`` uint8 RGB.
        selection: ``(H, W)`` uint8; used by ``inpaint`` only.
        annotators_dir: a local folder with ``lllyasviel/Annotators`` files.
        detectors: a cache of loaded detectors, filled on use.

    Returns:
        ``(H, W, 3)`` uint8 RGB control image.

    Raises:
        EngineError: ``weights_not_installed`` when the preprocessor's weights are not
            local; ``invalid_request`` for an unknown kind.
    """
    height, width = image.shape[:2]
    resolution = max(height, width)
    if kind == "inpaint":
        out = image.copy()
        if selection is not None:
            # Shown black here; the engine feeds these pixels as -1, the value ControlNet 1.1
            # inpaint was trained to read as "to be filled".
            out[np.asarray(selection) >= 128] = 0
        return out
    if kind == "canny":
        from controlnet_aux import CannyDetector

        low, high = CANNY_THRESHOLDS
        result = CannyDetector()(image, low, high, detect_resolution=resolution, image_resolution=resolution, output_type="np")
    elif kind == "lineart_standard":
        from controlnet_aux import LineartStandardDetector

        result = LineartStandardDetector()(image, detect_resolution=resolution, output_type="np")
    elif kind == "shuffle":
        from controlnet_aux import ContentShuffleDetector

        # The shuffle draws from numpy's global generator: seed it, and put it back after.
        with _GLOBAL_RANDOM:
            state = np.random.get_state()
            np.random.seed(PREFILL_SEED)
            try:
                result = ContentShuffleDetector()(
                    image, detect_resolution=resolution, image_resolution=resolution, output_type="np"
                )
            finally:
                np.random.set_state(state)
    elif kind in ANNOTATOR_FILES:
        class_name, files = ANNOTATOR_FILES[kind]
        cache = detectors if detectors is not None else {}
        detector = cache.get(class_name)
        if detector is None:
            folder = find_annotators(kind, annotators_dir)
            if folder is None:
                raise EngineError(
                    ErrorCode.WEIGHTS_NOT_INSTALLED,
                    f"the '{kind}' preprocessor needs {', '.join(files)} from {ANNOTATORS_REPO}, which is not "
                    f"installed: run `genfill models pull {ANNOTATORS_REPO}` on a machine with internet access, "
                    f"or send your own control image with the request",
                )
            import controlnet_aux

            detector = getattr(controlnet_aux, class_name).from_pretrained(folder)
            cache[class_name] = detector
        extra = {"scribble": True} if kind == "scribble" else {}
        result = detector(image, detect_resolution=resolution, image_resolution=resolution, output_type="np", **extra)
    else:
        raise EngineError(ErrorCode.INVALID_REQUEST, f"unknown control type {kind!r}")
    return _resize_rgb(_as_rgb(result), height, width)


@dataclass
class _Control:
    kind: str  # the ControlNet is the engine's of this type (``_controlnet``)
    cond: torch.Tensor  # (1, 3, H, W) in [0, 1]; ``inpaint`` marks masked pixels with -1
    strength: float
    start: float
    end: float


class ControlNetEngine(SDInpaintEngine):
    """The ``Engine`` for ControlNet inpainting on SD 1.5 and SDXL checkpoints.

    Args:
        pipeline_factory: as ``SDInpaintEngine``: returns the base SD or SDXL pipeline
            (inpainting or ordinary); its UNet, VAE and text encoders are used.
        controlnets: control type (``"canny"``, ``"depth"``...) -> a callable returning a
            ``diffusers.ControlNetModel`` matching the base model, called on first use.
            A request for a type without an entry fails with ``weights_not_installed``.
        annotators_dir: a local folder with ``lllyasviel/Annotators`` files for the
            preprocessors that need weights; the local HF cache is searched too.
        device, dtype, offload, name, native_size, max_batch, cuda_graphs, compiler: as
            ``SDInpaintEngine``; the graphs setting covers the ControlNets' steps too.
    """

    # Its jobs' shapes depend on their control inputs, and a load that compiled the plain
    # inpaint shapes would only add minutes: it runs uncompiled graphs.
    _warm_up_at_load = False
    capabilities = SDInpaintEngine.capabilities.refined(
        options=SDInpaintEngine.capabilities.options | {"control"}, control_types=frozenset(ControlType)
    )
    """The class's; an instance lists only the control types it has ControlNets for."""

    def __init__(
        self,
        pipeline_factory: Callable[[], Any],
        controlnets: Mapping[str, Callable[[], Any]],
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
        name: str = "controlnet",
        native_size: int | None = None,
        max_batch: int | None = None,
        annotators_dir: str | os.PathLike | None = None,
        cuda_graphs: bool | None = None,
        compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None | str = "auto",
    ) -> None:
        super().__init__(
            pipeline_factory, device=device, dtype=dtype, offload=offload, name=name,
            native_size=native_size, max_batch=max_batch, cuda_graphs=cuda_graphs, compiler=compiler,
        )
        self._controlnet_factories = dict(controlnets)
        self.capabilities = self.capabilities.refined(
            control_types=frozenset(ControlType(kind) for kind in self._controlnet_factories)
        )
        self._controlnets: dict[str, Any] = {}
        # Run eagerly, a ControlNet's few hundred kernel launches a step kept the GPU waiting
        # on the CPU; replayed from a CUDA graph per control type and shape, as the UNet is.
        self.control_runner = GraphedStep(self._control_forward, enabled=self.step_runner.enabled, name="ControlNet")
        self._detectors: dict[str, Any] = {}
        self.annotators_dir = annotators_dir

    @property
    def control_types(self) -> tuple[str, ...]:
        return tuple(self._controlnet_factories)

    @property
    def runners(self) -> tuple[GraphedStep, ...]:
        return (*super().runners, self.control_runner)

    def _close_extra(self) -> None:
        self._controlnets.clear()
        self._detectors.clear()

    def _controlnet(self, kind: str) -> Any:
        model = self._controlnets.get(kind)
        if model is not None:
            return model
        factory = self._controlnet_factories.get(kind)
        if factory is None:
            raise EngineError(
                ErrorCode.WEIGHTS_NOT_INSTALLED,
                f"no '{kind}' ControlNet is installed for this model; install one "
                f"(e.g. lllyasviel/control_v11p_sd15_{kind} for SD 1.5) or use one of: "
                f"{', '.join(self._controlnet_factories) or 'none'}",
            )
        model = factory().to(dtype=self.dtype)
        model.eval()
        if self.offload:
            from accelerate import cpu_offload_with_hook

            model, _ = cpu_offload_with_hook(model, self.device)
        else:
            model.to(self.device)
        self._controlnets[kind] = model
        return model

    def _prepare_control(self, job: EngineJob, image: np.ndarray, options: EngineOptions) -> list[_Control]:
        controls = options.control
        if not controls:
            raise EngineError(ErrorCode.INVALID_REQUEST, f"engine {self.name!r} needs at least one control input")
        height, width = image.shape[:2]
        prepared = []
        for entry in controls:
            kind = str(entry.type)
            self._controlnet(kind)  # loaded now, or the request fails before any work
            if entry.image is not None:
                rgb = _resize_rgb(_as_rgb(entry.image), height, width)
            else:
                rgb = control_image(
                    kind, image, selection=job.selection, annotators_dir=self.annotators_dir, detectors=self._detectors
                )
            cond = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
            if kind == "inpaint":
                hard = torch.from_numpy(np.asarray(job.selection) >= 128)[None, None]
                cond = torch.where(hard.expand_as(cond), torch.full_like(cond, -1.0), cond)
            prepared.append(
                _Control(
                    kind=kind,
                    cond=cond.to(self._exec_device, self.dtype),
                    strength=float(entry.strength),
                    start=float(entry.start),
                    end=float(entry.end),
                )
            )
        return prepared

    def _control_forward(
        self,
        kind: str,
        latents: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        cond: torch.Tensor,
        strength: float,
        added: dict[str, torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ControlNet evaluation: its down-block and mid-block residuals. Named by
        ``kind``, not passed, so a graph's key is the control type and not the module."""
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": embeds,
            "controlnet_cond": cond,
            "conditioning_scale": strength,
            "guess_mode": False,
            "return_dict": False,
        }
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        down, mid = self._controlnets[kind](latents, t, **kwargs)
        return list(down), mid

    def _control_residuals(self, control, step, total, model_in, t, embeds, added, size):
        down_sum = mid_sum = None
        latents_in = model_in[:, :4]
        fraction_start, fraction_end = step / total, (step + 1) / total
        for item in control:
            if fraction_end <= item.start or fraction_start >= item.end or item.strength == 0:
                continue
            cond = item.cond.expand(latents_in.shape[0], -1, -1, -1)
            down, mid = self.control_runner(item.kind, latents_in, t, embeds, cond, item.strength, added)
            if down_sum is None:
                down_sum, mid_sum = list(down), mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        if down_sum is None:
            return None
        return down_sum, mid_sum
