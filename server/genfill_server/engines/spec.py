"""What a provider hands the server for each engine it can make (``EngineSpec``), and what a
provider is given to decide (``ProviderContext``). Nothing here loads a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genfill.protocol import Mode, ModelInfo

from ..registry import ModelRegistry
from .base import Engine, EngineCapabilities


@dataclass(frozen=True)
class EngineSpec:
    """How to make one engine: ``factory(device, model)`` returns an unloaded ``Engine``.

    Attributes:
        capabilities: what the engine takes; for a request naming no model, those of its
            first model.
        models: the models it serves, as ``hello`` lists them; empty for an engine that
            needs none.
        model_capabilities: per model name, where a model changes them (native size,
            control types); a model not listed has ``capabilities``.
        needs_model: it holds model weights: one such engine is loaded per device at a time.
        lane_workers: for a remote engine, ``None``: its jobs wait in the shared remote lane.
            A number: they wait in a lane of their own with that many workers (its provider's
            limit), so a provider that is slow or at its limit never holds up another
            engine's jobs. Other device kinds always use their kind's lane.
        preferred_for: modes this engine serves when a request names neither engine nor model
            (ahead of the server's default engine).
    """

    name: str
    factory: Callable[[str, str | None], Engine]
    capabilities: EngineCapabilities
    description: str = ""
    models: tuple[ModelInfo, ...] = ()
    model_capabilities: Mapping[str, EngineCapabilities] = field(default_factory=dict)
    needs_model: bool = False
    lane_workers: int | None = None
    preferred_for: frozenset[Mode] = frozenset()

    def capabilities_for(self, model: str | None) -> EngineCapabilities:
        return self.model_capabilities.get(model, self.capabilities) if model is not None else self.capabilities


@dataclass(frozen=True)
class ProviderContext:
    """What a provider may look at: the models found on this machine and the server's settings."""

    registry: ModelRegistry
    offload: bool = False
    remote: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The remote (cloud) providers switched on (``genfill serve --remote``, or a config file's
    ``enabled``), each with its settings table, possibly empty. A remote provider whose name is
    not here offers nothing: no image leaves the machine unless the user asked for it."""


Provider = Callable[[ProviderContext], Iterable[EngineSpec]]
