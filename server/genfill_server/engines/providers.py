"""genfill's own engine providers, registered under the ``genfill.engines`` entry-point group
exactly as a third-party package registers its engines (see ``genfill_server.engines``).

A provider is a callable ``provider(context) -> Iterable[EngineSpec]``: it looks at what is
installed (``context.registry``) and names the engines it can make, without loading any.
Engine modules are imported only when an engine is built, so a server without the diffusion
extra still starts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from genfill.protocol import ControlType, Mode, ModelInfo

from ..registry import Architecture, LocalModel, ModelRegistry, dtype_for
from .base import DeviceKind, Engine, EngineCapabilities
from .spec import EngineSpec, ProviderContext

_ALL_MODES = (Mode.FILL, Mode.REMOVE, Mode.EXPAND, Mode.ADD)

_DIFFUSION_OPTIONS = frozenset({"negative_prompt", "steps", "strength", "guidance", "scheduler"})


def classic(context: ProviderContext) -> Iterator[EngineSpec]:
    """The weights-free content-aware fill: always there."""
    from .classic import ClassicEngine

    yield EngineSpec(
        name="classic",
        factory=lambda device, model: ClassicEngine(),
        capabilities=ClassicEngine.capabilities,
        description="content-aware fill from the image itself; needs no model weights",
    )


def lama(context: ProviderContext) -> Iterator[EngineSpec]:
    """Learned removal, where a LaMa weights file lies in a models folder."""
    from .lama import LamaEngine, find_weights

    weights = find_weights(list(context.registry.model_dirs))
    if weights is not None:
        yield EngineSpec(
            name="lama",
            factory=lambda device, model: LamaEngine(weights, device=device),
            capabilities=LamaEngine.capabilities,
            description=f"LaMa learned object removal ({weights.name}); no prompt",
            # Learned removal beats a copy-based fill wherever its weights are installed.
            preferred_for=frozenset({Mode.REMOVE}),
        )


@dataclass(frozen=True)
class _Family:
    """A diffusion engine and the architectures it runs."""

    name: str
    architectures: tuple[Architecture, ...]
    module: str
    class_name: str
    description: str
    capabilities: EngineCapabilities


_GPU = EngineCapabilities(prompt=True, options=_DIFFUSION_OPTIONS, device_kind=DeviceKind.GPU)
_FAMILIES = (
    _Family(
        "sd_inpaint",
        (Architecture.SD15, Architecture.SD2, Architecture.SDXL),
        "sd_inpaint",
        "SDInpaintEngine",
        "Stable Diffusion 1.5, 2 and SDXL inpainting (inpaint and ordinary checkpoints)",
        _GPU.refined(batching=True, uses_prefill=True),
    ),
    _Family(
        "sd3_inpaint", (Architecture.SD3,), "sd3_inpaint", "SD3InpaintEngine", "Stable Diffusion 3 / 3.5 inpainting", _GPU
    ),
    _Family(
        "flux_fill",
        (Architecture.FLUX,),
        "flux_fill",
        "FluxFillEngine",
        "Flux.1 Fill",
        _GPU.refined(options=_DIFFUSION_OPTIONS - {"negative_prompt"}),
    ),
)
"""Each family's capabilities repeat its engine class's (checked by a test), so that listing
them imports neither torch nor diffusers."""


def diffusion(context: ProviderContext) -> Iterator[EngineSpec]:
    """One engine per diffusion family that has an installed model."""
    for family in _FAMILIES:
        spec = _diffusion_spec(family, context.registry, context.offload)
        if spec is not None:
            yield spec


def controlnet(context: ProviderContext) -> Iterator[EngineSpec]:
    """The ``controlnet`` engine, where a ControlNet matches an installed base model."""
    spec = _controlnet_spec(context.registry, context.offload)
    if spec is not None:
        yield spec


def _model_info(model: LocalModel, engine: str, control: list[ControlType] | None = None) -> ModelInfo:
    return ModelInfo(
        name=model.name,
        engine=engine,
        architecture=str(model.architecture),
        inpaint=model.inpaint,
        native_size=model.native_size,
        source=str(model.source),
        modes=list(_ALL_MODES),
        control=control or [],
    )


def _diffusion_spec(family: _Family, registry: ModelRegistry, offload: bool) -> EngineSpec | None:
    models = sorted(
        (m for m in registry.models.values() if m.architecture in family.architectures),
        # Dedicated inpainting weights first: they are what a request naming no model gets.
        key=lambda m: (not m.inpaint, m.name),
    )
    if not models or importlib.util.find_spec(f"{__package__}.{family.module}") is None:
        return None
    by_name = {m.name: m for m in models}

    def factory(device: str, model_name: str | None) -> Engine:
        model = by_name[model_name] if model_name is not None else models[0]
        module = importlib.import_module(f"{__package__}.{family.module}")
        engine_class = getattr(module, family.class_name)
        dtype = dtype_for(model.architecture, device)
        return _construct(
            engine_class,
            lambda: registry.load(model, dtype=dtype),
            device=device,
            dtype=dtype,
            offload=offload and device.startswith("cuda"),
            name=family.name,
        )

    return EngineSpec(
        name=family.name,
        factory=factory,
        capabilities=family.capabilities.refined(native_size=models[0].native_size),
        description=family.description,
        models=tuple(_model_info(m, family.name) for m in models),
        model_capabilities={m.name: family.capabilities.refined(native_size=m.native_size) for m in models},
        needs_model=True,
    )


_CONTROLNET_ARCHITECTURES = (Architecture.SD15, Architecture.SD2, Architecture.SDXL)
_CONTROLNET = _FAMILIES[0].capabilities.refined(options=_DIFFUSION_OPTIONS | {"control"})


def _controlnet_spec(registry: ModelRegistry, offload: bool) -> EngineSpec | None:
    """Every SD1.5/SD2/SDXL base model for which a ControlNet of its architecture is
    installed, listing the control types it can take."""
    if importlib.util.find_spec(f"{__package__}.controlnet") is None:
        return None
    models = sorted(
        (
            m for m in registry.models.values()
            if m.architecture in _CONTROLNET_ARCHITECTURES and registry.controlnets_for(m.architecture)
        ),
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
            str(kind): functools.partial(
                registry.load_controlnet, registry.controlnet_for(model.architecture, kind), dtype=dtype
            )
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

    def capabilities(model: LocalModel) -> EngineCapabilities:
        return _CONTROLNET.refined(native_size=model.native_size, control_types=frozenset(control_types(model)))

    return EngineSpec(
        name="controlnet",
        factory=factory,
        capabilities=_CONTROLNET.refined(
            native_size=models[0].native_size,
            control_types=frozenset(t for m in models for t in control_types(m)),
        ),
        description="SD 1.5, 2 and SDXL inpainting guided by ControlNets (canny, depth, pose, lineart...)",
        models=tuple(_model_info(m, "controlnet", control_types(m)) for m in models),
        model_capabilities={m.name: capabilities(m) for m in models},
        needs_model=True,
    )


def _construct(engine_class: Callable[..., Engine], pipeline_factory, **options) -> Engine:
    accepted = inspect.signature(engine_class).parameters
    return engine_class(pipeline_factory, **{k: v for k, v in options.items() if k in accepted})
