"""The engines a server runs, one instance per device, created on first use.

``EngineSet`` is the server's only door to the engines: it names them, resolves which one a
request asks for, and loads, recovers and closes them. The websocket app never imports an
engine module itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from genfill.protocol import ErrorCode, FillRequest, Mode, ModelInfo

from ..errors import RequestError
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
        if name is None and request.model is not None:
            name = next((spec.name for spec in self.specs.values() if any(m.name == request.model for m in spec.models)), None)
            if name is None:
                raise RequestError(ErrorCode.MODEL_NOT_FOUND, f"no installed model is named {request.model!r}")
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
                engine = self.specs[name].factory(device, model)
                engine.load()
                self._instances[key] = engine
            return engine

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


def default_engines() -> EngineSet:
    """The engines this installation can run: the classic engine always."""
    from .classic import ClassicEngine

    classic = EngineSpec(
        name="classic",
        factory=lambda device, model: ClassicEngine(),
        modes=(Mode.FILL, Mode.REMOVE, Mode.EXPAND, Mode.ADD),
        description="content-aware fill from the image itself; needs no model weights",
    )
    return EngineSet(specs={"classic": classic}, default_name="classic")
