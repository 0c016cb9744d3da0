"""The engines a server runs, one instance per device, created on first use.

``EngineSet`` is the server's only door to the engines: it names them, resolves which one a
request asks for, and loads, recovers and closes them. The websocket app never imports an
engine module itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from genfill.protocol import ControlType, ErrorCode, FillRequest, Mode, ModelInfo

from ..errors import RequestError
from ..registry import Architecture, LocalModel, ModelRegistry, dtype_for
from .base import Engine

logger = logging.getLogger("genfill.engines")


@dataclass(frozen=True)
class EngineSpec:
    """How to make one engine: ``factory(device, model)`` returns an unloaded ``Engine``."""

    name: str
    factory: Callable[[str, str | None], Engine]
    modes: tuple[Mode, ...]
    description: str = ""
    models: tuple[ModelInfo, ...] = ()
    needs_model: bool = False


@dataclass
class EngineSet:
    specs: dict[str, EngineSpec]
    default_name: str
    _instances: dict[tuple[str, str, str | None], Engine] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def catalogue(self) -> dict:
        """Engines and models as ``hello`` and ``GET /v1/models`` list them."""
        return {
            "default_engine": self.default_name,
            "engines": [
                {"name": spec.name, "available": True, "modes": list(spec.modes), "description": spec.description}
                for spec in self.specs.values()
            ],
            "models": [model.model_dump(mode="json") for spec in self.specs.values() for model in spec.models],
        }

    def resolve(self, request: FillRequest) -> str:
        """The engine name a request runs on. Raises ``RequestError`` if it cannot run."""
        name = request.engine
        # --- issue 15: removal prefers learned removal where it is installed. ---
        if name is None and request.model is None and request.mode is Mode.REMOVE and "lama" in self.specs:
            name = "lama"
        # --- end issue 15 ---
        if name is None and request.model is not None:
            wanted = {control.type for control in request.control}
            serving = [spec for spec in self.specs.values() if any(m.name == request.model for m in spec.models)]
            # A model may be listed by several engines (plain and ControlNet); a request with
            # controls goes to one whose listing offers those control types.
            fitting = [
                spec for spec in serving
                if wanted <= {c for m in spec.models if m.name == request.model for c in m.control}
            ]
            if not serving:
                raise RequestError(ErrorCode.MODEL_NOT_FOUND, f"no installed model is named {request.model!r}")
            if wanted and not fitting:
                offered = {c for spec in serving for m in spec.models if m.name == request.model for c in m.control}
                missing = ", ".join(sorted(wanted - offered))
                raise RequestError(
                    ErrorCode.WEIGHTS_NOT_INSTALLED,
                    f"no {missing} ControlNet is installed for {request.model!r}: put one (e.g. a "
                    f"control_v11 {missing} model) in a models folder",
                )
            name = (fitting or serving)[0].name
        name = name or self.default_name
        spec = self.specs.get(name)
        if spec is None:
            raise RequestError(
                ErrorCode.ENGINE_UNAVAILABLE,
                f"engine {name!r} is not available; this server has: {', '.join(self.specs)}",
            )
        if request.mode not in spec.modes:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"engine {name!r} does not do mode '{request.mode}'")
        if request.model is not None and not any(m.name == request.model for m in spec.models):
            raise RequestError(ErrorCode.MODEL_NOT_FOUND, f"engine {name!r} has no model named {request.model!r}")
        return name

    def get(self, name: str, device: str, model: str | None = None) -> Engine:
        """The loaded engine for ``name`` on ``device``; blocking on first use (loads weights)."""
        key = (name, device, model)
        with self._lock:
            engine = self._instances.get(key)
            if engine is None:
                spec = self.specs[name]
                if spec.needs_model:
                    # One diffusion model per device: switching frees the previous one first,
                    # so a GPU never needs room for two.
                    self._close_instances(lambda other: other[1] == device and self.specs[other[0]].needs_model)
                engine = spec.factory(device, model)
                engine.load()
                self._instances[key] = engine
            return engine

    def loaded(self, name: str, device: str, model: str | None = None) -> Engine | None:
        """The engine for ``name`` on ``device`` if it is loaded already, else ``None``; never loads."""
        with self._lock:
            return self._instances.get((name, device, model))

    def _close_instances(self, which: Callable[[tuple[str, str, str | None]], bool]) -> None:
        for key in [key for key in self._instances if which(key)]:
            engine = self._instances.pop(key)
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - a broken engine may fail to close, too
                logger.exception("closing engine %s failed", key[0])

    def load_default(self) -> None:
        """Loads what is cheap to load at start; heavy engines load on their first job."""
        spec = self.specs[self.default_name]
        if not spec.needs_model:
            self.get(spec.name, "cpu")

    def recover(self, name: str) -> None:
        """Drops every instance of an engine after a failure; the next job loads it afresh."""
        with self._lock:
            for key in [key for key in self._instances if key[0] == name]:
                engine = self._instances.pop(key)
                try:
                    engine.close()
                except Exception:  # noqa: BLE001 - a broken engine may fail to close, too
                    logger.exception("closing engine %s failed", name)

    def close(self) -> None:
        for name in list(self.specs):
            self.recover(name)


def default_engines(
    model_dirs: Sequence[str | Path] = (),
    *,
    hf_cache: bool | Path = True,
    default_engine: str | None = None,
    offload: bool = False,
    registry: ModelRegistry | None = None,
) -> EngineSet:
    """The engines this installation can run: classic always, and one diffusion engine per
    family that has an installed model (see ``genfill_server.registry``).

    Args:
        model_dirs: folders of diffusers models or single-file checkpoints (``--models-dir``).
        hf_cache: search the Hugging Face cache (``True``: where the environment says;
            a path: that folder; ``False``: not at all).
        default_engine: the engine for requests naming neither engine nor model; ``None``
            keeps ``classic``, which needs no weights.
        offload: model CPU offload for GPUs too small to hold a whole pipeline.
        registry: an already scanned registry; overrides ``model_dirs`` and ``hf_cache``.

    Raises:
        ValueError: ``default_engine`` names an engine this installation does not have.
    """
    from .classic import ClassicEngine

    specs = {
        "classic": EngineSpec(
            name="classic",
            factory=lambda device, model: ClassicEngine(),
            modes=_ALL_MODES,
            description="content-aware fill from the image itself; needs no model weights",
        )
    }
    if registry is None:
        cache: Path | None | bool = None if hf_cache is True else hf_cache
        registry = ModelRegistry(model_dirs=[Path(d) for d in model_dirs], hf_cache=cache)
    for family in _FAMILIES:
        spec = _diffusion_spec(family, registry, offload)
        if spec is not None:
            specs[spec.name] = spec
    spec = _controlnet_spec(registry, offload)
    if spec is not None:
        specs[spec.name] = spec
    # --- issue 15: learned removal when a LaMa weights file lies in a models folder. ---
    from .lama import LamaEngine, find_weights

    lama_weights = find_weights(list(model_dirs))
    if lama_weights is not None:
        specs["lama"] = EngineSpec(
            name="lama",
            factory=lambda device, model: LamaEngine(lama_weights, device=device),
            modes=(Mode.REMOVE, Mode.FILL),
            description=f"LaMa learned object removal ({lama_weights.name}); no prompt",
        )
    # --- end issue 15 ---
    name = default_engine or "classic"
    if name not in specs:
        raise ValueError(f"default engine {name!r} is not available; this installation has: {', '.join(specs)}")
    return EngineSet(specs=specs, default_name=name)


_ALL_MODES = (Mode.FILL, Mode.REMOVE, Mode.EXPAND, Mode.ADD)


@dataclass(frozen=True)
class _Family:
    """A diffusion engine and the architectures it runs; its module is imported only when an
    engine is built, so a server without the diffusion extra still starts."""

    name: str
    architectures: tuple[Architecture, ...]
    module: str
    class_name: str
    description: str


_FAMILIES = (
    _Family(
        "sd_inpaint",
        (Architecture.SD15, Architecture.SD2, Architecture.SDXL),
        "sd_inpaint",
        "SDInpaintEngine",
        "Stable Diffusion 1.5, 2 and SDXL inpainting (inpaint and ordinary checkpoints)",
    ),
    _Family("sd3_inpaint", (Architecture.SD3,), "sd3_inpaint", "SD3InpaintEngine", "Stable Diffusion 3 / 3.5 inpainting"),
    _Family("flux_fill", (Architecture.FLUX,), "flux_fill", "FluxFillEngine", "Flux.1 Fill"),
)


def _diffusion_spec(family: _Family, registry: ModelRegistry, offload: bool) -> EngineSpec | None:
    models = sorted(
        (m for m in registry.models.values() if m.architecture in family.architectures),
        # Dedicated inpainting weights first: they are what a request naming no model gets.
        key=lambda m: (not m.inpaint, m.name),
    )
    if not models or importlib.util.find_spec(f"{__name__}.{family.module}") is None:
        return None
    by_name = {m.name: m for m in models}

    def factory(device: str, model_name: str | None) -> Engine:
        model = by_name[model_name] if model_name is not None else models[0]
        module = importlib.import_module(f"{__name__}.{family.module}")
        engine_class = getattr(module, family.class_name, None) or next(
            getattr(module, n) for n in getattr(module, "__all__", ()) if n.endswith("Engine")
        )
        dtype = dtype_for(model.architecture, device)
        return _construct(
            engine_class,
            lambda: registry.load(model, dtype=dtype),
            device=device,
            dtype=dtype,
            offload=offload and device.startswith("cuda"),
            name=family.name,
        )

    infos = tuple(
        ModelInfo(
            name=m.name,
            engine=family.name,
            architecture=str(m.architecture),
            inpaint=m.inpaint,
            native_size=m.native_size,
            source=str(m.source),
            modes=list(_ALL_MODES),
        )
        for m in models
    )
    return EngineSpec(
        name=family.name,
        factory=factory,
        modes=_ALL_MODES,
        description=family.description,
        models=infos,
        needs_model=True,
    )


_CONTROLNET_ARCHITECTURES = (Architecture.SD15, Architecture.SD2, Architecture.SDXL)


def _controlnet_spec(registry: ModelRegistry, offload: bool) -> EngineSpec | None:
    """The ``controlnet`` engine: every SD1.5/SD2/SDXL base model for which a ControlNet of its
    architecture is installed, listing the control types it can take."""
    if importlib.util.find_spec(f"{__name__}.controlnet") is None:
        return None
    models = sorted(
        (m for m in registry.models.values() if m.architecture in _CONTROLNET_ARCHITECTURES and registry.controlnets_for(m.architecture)),
        key=lambda m: (not m.inpaint, m.name),
    )
    if not models:
        return None
    by_name = {m.name: m for m in models}

    def control_types(model: LocalModel) -> list[ControlType]:
        found = {t for c in registry.controlnets_for(model.architecture) for t in c.control}
        return [t for t in ControlType if t in found]

    def factory(device: str, model_name: str | None) -> Engine:
        from .controlnet import ControlNetEngine

        model = by_name[model_name] if model_name is not None else models[0]
        dtype = dtype_for(model.architecture, device)
        controlnets = {
            str(kind): (lambda c=registry.controlnet_for(model.architecture, kind): registry.load_controlnet(c, dtype=dtype))
            for kind in control_types(model)
        }
        return ControlNetEngine(
            lambda: registry.load(model, dtype=dtype),
            controlnets,
            device=device,
            dtype=dtype,
            offload=offload and device.startswith("cuda"),
            name="controlnet",
        )

    infos = tuple(
        ModelInfo(
            name=m.name,
            engine="controlnet",
            architecture=str(m.architecture),
            inpaint=m.inpaint,
            native_size=m.native_size,
            source=str(m.source),
            modes=list(_ALL_MODES),
            control=control_types(m),
        )
        for m in models
    )
    return EngineSpec(
        name="controlnet",
        factory=factory,
        modes=_ALL_MODES,
        description="SD 1.5, 2 and SDXL inpainting guided by ControlNets (canny, depth, pose, lineart...)",
        models=infos,
        needs_model=True,
    )


def _construct(engine_class, pipeline_factory, **options) -> Engine:
    accepted = inspect.signature(engine_class).parameters
    return engine_class(pipeline_factory, **{k: v for k, v in options.items() if k in accepted})
