"""The interface every engine implements.

An engine turns one prepared context crop into N generated images. It knows nothing about
sockets, queues or the canvas: the fill pipeline (``genfill_server.pipeline``) crops, scales,
pre-fills and composites around it, through ``genfill.fill``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from genfill.protocol import ErrorCode

from ..errors import RequestError

StepCallback = Callable[[int, int, "np.ndarray | None"], None]
"""Called as ``on_step(step, total, preview)`` after every unit of work.

``preview`` is ``None`` or a small ``(h, w, 3)`` uint8 RGB image. The callback raises
``JobCancelledError`` to stop the engine; engines let it propagate.
"""


class JobCancelledError(Exception):
    """Raised by a step callback when the job was cancelled; engines must not swallow it."""


class EngineError(RequestError):
    """An engine could not run a job. ``code`` is a stable protocol error code (``ErrorCode``
    or its string value); the message reaches the client, so it carries no internals."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(ErrorCode(code), message)


@dataclass(frozen=True)
class EngineJob:
    """One prepared unit of work for an engine.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB context crop, already scaled to the engine's band. Not
            pre-filled: engines that need it pre-fill from ``selection`` and ``options["mode"]``.
        selection: ``(H, W)`` uint8 selection in the crop, 0 keeps, 255 replaces, soft between.
        denoise_mask: ``(H, W)`` uint8 mask of where the engine may change pixels (the
            selection grown and feathered); 255 wherever ``selection`` is 255.
        seeds: one seed per variation; ``len(seeds)`` images are returned.
        options: the request's generation options (prompt, steps, strength, ...), as a dict of
            the protocol's ``FillRequest`` fields. ``options["control"][i]["image"]`` is
            ``None`` or the request's control image as a uint8 array cropped and scaled like
            ``image`` (``(H, W, 3)`` RGB or ``(H, W)`` gray).
        prefilled: ``prefill.prefill(image, selection, options["mode"])``, started by the
            pipeline while it made the masks, for engines whose ``uses_prefill`` is true;
            ``None`` where the engine pre-fills for itself.
    """

    image: np.ndarray
    selection: np.ndarray
    denoise_mask: np.ndarray
    seeds: Sequence[int]
    options: dict[str, Any] = field(default_factory=dict)
    prefilled: Future | None = None


@runtime_checkable
class Engine(Protocol):
    """What the server needs from an engine. ``run`` is blocking and runs off the event loop."""

    name: str
    native_size: int | None
    """Side of the model's native square resolution in pixels; ``None`` means any size
    works and the pipeline does not rescale."""

    def load(self) -> None: ...

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns ``len(job.seeds)`` ``(H, W, 3)`` uint8 RGB images the size of ``job.image``."""
        ...

    def close(self) -> None: ...
