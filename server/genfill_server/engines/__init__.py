"""The engines a server runs, one instance per device, created on first use.

``EngineSet`` is the server's only door to the engines: it names them, admits a request to
one (checking it against the engine's declared capabilities), and loads, recovers and closes
them. The websocket app never imports an engine module itself.

Engines come from *providers* registered under the ``genfill.engines`` entry-point group, in
a package's ``pyproject.toml``::

    [project.entry-points."genfill.engines"]
    my_engine = "my_package.genfill_provider:provide"

where ``provide(context: ProviderContext) -> Iterable[EngineSpec]`` (see ``spec.py``).
genfill's own engines register the same way (``providers.py``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genfill.protocol import EngineInfo, ErrorCode, FillRequest, Mode, ModelInfo, ResultWarning

from ..errors import RequestError
from ..registry import ModelRegistry
from .base import DeviceKind, Engine, EngineCapabilities
from .spec import EngineSpec, Provider, ProviderContext

__all__ = ["Admission", "EngineSet", "EngineSpec", "ProviderContext", "default_engines", "discover_providers"]

logger = logging.getLogger("genfill.engines")


@dataclass(frozen=True)
class Admission:
    """A request admitted to an engine: its name, what it takes for the request's model, and
    the warnings its result will carry."""

    engine: str
    capabilities: EngineCapabilities
    warnings: tuple[ResultWarning, ...] = ()
    lane: str = ""
    """The lane its job waits in (``EngineSet.lane_of``)."""


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
            "engines": [info.model_dump(mode="json") for info in self.engine_infos()],
            "models": [model.model_dump(mode="json") for model in self.model_infos()],
        }

    def model_infos(self) -> list[ModelInfo]:
        return [model for spec in self.specs.values() for model in spec.models]

    def engine_infos(self) -> list[EngineInfo]:
        return [
            EngineInfo(
                name=spec.name,
                available=True,
                modes=[mode for mode in Mode if mode in spec.capabilities.modes],
                description=spec.description,
                capabilities=spec.capabilities.wire(),
            )
            for spec in self.specs.values()
        ]

    def admit(self, request: FillRequest) -> Admission:
        """The engine a request runs on, checked against what it declares it takes.

        Raises:
            RequestError: no such engine or model (``engine_unavailable``,
                ``model_not_found``, ``weights_not_installed``), or the engine cannot honour
                something the request asks (``invalid_request``, ``unsupported``).
        """
        name = self.resolve(request)
        capabilities = self.specs[name].capabilities_for(request.model)
        return Admission(name, capabilities, tuple(capabilities.check(name, request)), self.lane_of(name, capabilities))

    def lane_of(self, name: str, capabilities: EngineCapabilities | None = None) -> str:
        """The lane an engine's jobs wait in: a remote engine's own (``EngineSpec.lane_workers``),
        named ``"remote:<engine>"``, or its device kind's."""
        spec = self.specs[name]
        kind = (capabilities or spec.capabilities).device_kind
        return f"{kind}:{name}" if spec.lane_workers and kind is DeviceKind.REMOTE else str(kind)

    def own_lanes(self) -> dict[str, int]:
        """The remote engines' own lanes and their worker counts."""
        return {
            self.lane_of(name): spec.lane_workers
            for name, spec in self.specs.items()
            if spec.lane_workers and spec.capabilities.device_kind is DeviceKind.REMOTE
        }

    def resolve(self, request: FillRequest) -> str:
        """The engine name a request runs on. Raises ``RequestError`` if it cannot run."""
        name = request.engine
        if name is None and request.model is None:
            name = next((spec.name for spec in self.specs.values() if request.mode in spec.preferred_for), None)
        if name is None and request.model is not None:
            wanted = {control.type for control in request.control} | {
                r.control_type for r in request.references if r.control_type is not None
            }
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


ENTRY_POINT_GROUP = "genfill.engines"

BUILTIN_PROVIDERS = {
    "classic": "genfill_server.engines.providers:classic",
    "diffusion": "genfill_server.engines.providers:diffusion",
    "controlnet": "genfill_server.engines.providers:controlnet",
    "lama": "genfill_server.engines.providers:lama",
    "openai": "genfill_server.engines.remote.openai:provide",
    "bfl": "genfill_server.engines.remote.bfl:provide",
    "imagen": "genfill_server.engines.remote.imagen:provide",
}
"""genfill's own providers, as its ``pyproject.toml`` registers them (a test keeps the two
equal); used as they are when genfill runs from a source tree that was never installed."""


def discover_providers() -> dict[str, Provider]:
    """The providers of every installed package, genfill's own first, by entry-point name.

    A provider that fails to import is logged and left out: one broken plug-in package must not
    keep the server from starting.
    """
    found = {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for name, value in BUILTIN_PROVIDERS.items():
        if name not in found:
            found[name] = importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP)
    ordered = [*BUILTIN_PROVIDERS, *sorted(set(found) - set(BUILTIN_PROVIDERS))]
    providers: dict[str, Provider] = {}
    for name in ordered:
        try:
            providers[name] = found[name].load()
        except Exception:  # noqa: BLE001 - a third-party package's import error is not ours to raise
            logger.exception("engine provider %r (%s) failed to load; its engines are left out", name, found[name].value)
    return providers


def default_engines(
    model_dirs: Sequence[str | Path] = (),
    *,
    hf_cache: bool | Path = True,
    default_engine: str | None = None,
    offload: bool = False,
    registry: ModelRegistry | None = None,
    providers: dict[str, Provider] | None = None,
    remote: Mapping[str, Mapping[str, Any]] | None = None,
) -> EngineSet:
    """The engines this installation can run: classic always, one diffusion engine per family
    that has an installed model (see ``genfill_server.registry``), and whatever installed
    packages provide.

    Args:
        model_dirs: folders of diffusers models or single-file checkpoints (``--models-dir``).
        hf_cache: search the Hugging Face cache (``True``: where the environment says;
            a path: that folder; ``False``: not at all).
        default_engine: the engine for requests naming neither engine nor model; ``None``
            keeps ``classic``, which needs no weights.
        offload: model CPU offload for GPUs too small to hold a whole pipeline.
        registry: an already scanned registry; overrides ``model_dirs`` and ``hf_cache``.
        providers: the providers to ask, by name; ``None`` means ``discover_providers()``.
        remote: the cloud providers switched on, with their settings (``ProviderContext.remote``);
            ``None``: none.

    Raises:
        ValueError: ``default_engine`` names an engine this installation does not have.
    """
    if registry is None:
        cache: Path | None | bool = None if hf_cache is True else hf_cache
        registry = ModelRegistry(model_dirs=[Path(d) for d in model_dirs], hf_cache=cache)
    context = ProviderContext(registry=registry, offload=offload, remote=dict(remote or {}))
    specs: dict[str, EngineSpec] = {}
    for provider_name, provider in (discover_providers() if providers is None else providers).items():
        try:
            offered = list(provider(context))
        except Exception:  # noqa: BLE001 - as in discover_providers
            logger.exception("engine provider %r failed; its engines are left out", provider_name)
            continue
        for spec in offered:
            if spec.name in specs:
                logger.warning("engine %r of provider %r is already provided; ignoring it", spec.name, provider_name)
                continue
            specs[spec.name] = spec
    name = default_engine or "classic"
    if name not in specs:
        raise ValueError(f"default engine {name!r} is not available; this installation has: {', '.join(specs)}")
    return EngineSet(specs=specs, default_name=name)
