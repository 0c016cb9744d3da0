"""The contract every engine implements, and the typed inputs it receives.

An engine turns one prepared context crop into N generated images. It knows nothing about
sockets, queues or the canvas: the fill pipeline (``genfill_server.pipeline``) crops, scales,
pre-fills and composites around it, through ``genfill.fill``.

What an engine can do is declared, never probed: ``EngineCapabilities`` says which modes,
options, reference roles and control types it takes, whether it uses the prompt, where it
runs and whether it batches; ``EngineDefaults`` says what a request's ``None`` means. The
server checks a request against the capabilities before it queues it, and resolves the
defaults once into ``EngineOptions``, so an engine reads plain, typed values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import numpy as np
from genfill import protocol
from genfill.protocol import ControlType, ErrorCode, FillRequest, Mode, ReferenceRole, Scheduler

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
    or its string value); the message reaches the client, so it carries no internals.

    An engine raises ``EngineError(ErrorCode.OUT_OF_MEMORY, ...)`` for its own out-of-memory
    condition (``torch_errors`` does it for torch engines); the server then drops and reloads
    that engine."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(ErrorCode(code), message)


class DeviceKind(StrEnum):
    """Where an engine's work runs; the server gives each kind its own workers, so a job of
    one kind never waits behind a job of another."""

    GPU = "gpu"
    """On an accelerator (or, without one, on the configured device): one job at a time a device."""
    CPU = "cpu"
    """On the host's cores, beside the accelerator's work."""
    REMOTE = "remote"
    """On another machine; several jobs wait on the network at once."""


GATED_OPTIONS = ("negative_prompt", "steps", "strength", "guidance", "scheduler", "control")
"""``FillRequest`` fields that only some engines honour. A request that sets one (not ``None``,
not empty) for an engine whose ``EngineCapabilities.options`` lacks it is refused with
``unsupported``. Every other field (image, mask, mode, seed, variations, masks' widths...)
means the same to every engine; the prompt is accepted by all and warned about where unused."""


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine takes. Declared by the engine class (``capabilities``), refined per model
    by its provider (``native_size``, ``control_types``), announced in ``hello``.

    Attributes:
        modes: the modes it runs.
        prompt: whether it uses the prompt. One that does not still accepts a prompt, and the
            result carries a ``prompt_ignored`` warning.
        soft_masks: whether grey selection values blend; ``False``: binarized.
        options: the ``GATED_OPTIONS`` it honours.
        reference_roles: the roles of ``FillRequest.references`` it takes.
        control_types: ControlNet types it can use (only with ``"control"`` in ``options``).
        max_variations: the most variations one job may ask.
        native_size: side of the model's native square resolution in pixels; ``None``: any
            size works and the pipeline does not rescale.
        device_kind: where it runs (``DeviceKind``).
        batching: it has ``run_many`` and ``batch_key``: same-shape jobs share one batch.
        max_batch_images: the most images one ``run_many`` batch holds.
        uses_prefill: the pipeline starts ``prefill.prefill`` for it while making the masks.
        needs_colour_match: its images are colour matched to the context before compositing.
        reproducible: the same request and seed give the same pixels again. A provider that
            takes no seed is not; its results carry a ``seed_not_reproducible`` warning.
    """

    modes: frozenset[Mode] = frozenset(Mode)
    prompt: bool = False
    soft_masks: bool = True
    options: frozenset[str] = frozenset()
    reference_roles: frozenset[ReferenceRole] = frozenset()
    control_types: frozenset[ControlType] = frozenset()
    max_variations: int = 8
    native_size: int | None = None
    device_kind: DeviceKind = DeviceKind.CPU
    batching: bool = False
    max_batch_images: int = 8
    uses_prefill: bool = False
    needs_colour_match: bool = True
    reproducible: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.options) - set(GATED_OPTIONS)
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; known: {', '.join(GATED_OPTIONS)}")
        if self.control_types and "control" not in self.options:
            raise ValueError("control_types need 'control' in options")

    def refined(self, **changes: Any) -> EngineCapabilities:
        return replace(self, **changes)

    def wire(self) -> protocol.EngineCapabilities:
        return protocol.EngineCapabilities(
            modes=[mode for mode in Mode if mode in self.modes],
            prompt=self.prompt,
            soft_masks=self.soft_masks,
            options=[name for name in GATED_OPTIONS if name in self.options],
            reference_roles=[role for role in ReferenceRole if role in self.reference_roles],
            control_types=[kind for kind in ControlType if kind in self.control_types],
            max_variations=self.max_variations,
            native_size=self.native_size,
            device_kind=str(self.device_kind),
            reproducible=self.reproducible,
        )

    def check(self, engine: str, request: FillRequest) -> list[protocol.ResultWarning]:
        """Refuses what ``request`` asks that this engine cannot do; returns the warnings for
        what it accepts but ignores.

        Raises:
            RequestError: ``invalid_request`` for a mode it does not run, ``unsupported``
                naming the first option, reference role or control type it cannot honour,
                ``limit_exceeded`` for too many variations.
        """
        if request.mode not in self.modes:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"engine {engine!r} does not do mode '{request.mode}'")
        for name in GATED_OPTIONS:
            value = getattr(request, name)
            if value not in (None, "", []) and name not in self.options:
                raise RequestError(
                    ErrorCode.UNSUPPORTED,
                    f"engine {engine!r} does not take the option {name!r}; leave it unset"
                    + (" or pick a ControlNet engine" if name == "control" else ""),
                )
        for reference in request.references:
            if reference.role is ReferenceRole.CONTROL and "control" not in self.options:
                raise RequestError(
                    ErrorCode.UNSUPPORTED,
                    f"engine {engine!r} takes no control images; pick a ControlNet engine",
                )
            if reference.role is not ReferenceRole.CONTROL and reference.role not in self.reference_roles:
                raise RequestError(
                    ErrorCode.UNSUPPORTED, f"engine {engine!r} does not take references of role '{reference.role}'"
                )
        wanted = [c.type for c in request.control] + [
            r.control_type for r in request.references if r.control_type is not None
        ]
        for kind in wanted:
            if kind not in self.control_types:
                # An engine that takes control inputs lacks only the weights for this type.
                raise RequestError(
                    ErrorCode.WEIGHTS_NOT_INSTALLED,
                    f"no '{kind}' ControlNet is installed for engine {engine!r}; put one (e.g. a control_v11 "
                    f"{kind} model) in a models folder, or use one of: "
                    f"{', '.join(sorted(self.control_types)) or 'none'}",
                )
        if request.variations > self.max_variations:
            raise RequestError(
                ErrorCode.LIMIT_EXCEEDED,
                f"variations={request.variations} is over the {engine} engine's limit of {self.max_variations}: "
                f"ask for {self.max_variations} or fewer",
            )
        warnings = []
        if not self.prompt and request.prompt.strip():
            warnings.append(
                protocol.ResultWarning(
                    code="prompt_ignored",
                    message=f"the {engine} engine fills from the image alone and ignored the prompt; "
                    "pick a diffusion engine to use it",
                )
            )
        if not self.reproducible:
            warnings.append(
                protocol.ResultWarning(
                    code="seed_not_reproducible",
                    message=f"the {engine} engine takes no seed: the recorded seeds will not give these images again",
                )
            )
        return warnings


@dataclass(frozen=True)
class EngineDefaults:
    """What a request's ``None`` means for a model: ``None`` here means the engine has no such
    setting."""

    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    strength_by_mode: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet input: its type, how strongly and over which part of the denoising it
    acts, and its image (``(H, W, 3)`` RGB or ``(H, W)`` gray uint8, cropped and scaled like
    the job's image), or ``None`` where the engine derives one from the image."""

    type: ControlType | str
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    image: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EngineReference:
    """An extra image of a role other than ``control``.

    ``image`` is uint8, ``(H, W, 3)`` RGB or ``(H, W)`` gray: cropped and scaled like the
    job's image when the request's ``crop`` was ``context``, as uploaded for ``whole``.
    """

    role: ReferenceRole
    image: np.ndarray = field(compare=False)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class EngineOptions:
    """A request's generation options with the engine's defaults filled in (``resolve``)."""

    mode: Mode = Mode.FILL
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    strength: float | None = None
    guidance: float | None = None
    scheduler: str | None = None
    control: tuple[ControlSpec, ...] = ()
    references: tuple[EngineReference, ...] = ()

    @classmethod
    def resolve(
        cls,
        defaults: EngineDefaults,
        *,
        mode: Mode | str = Mode.FILL,
        prompt: str = "",
        negative_prompt: str = "",
        steps: int | None = None,
        strength: float | None = None,
        guidance: float | None = None,
        scheduler: Scheduler | str | None = None,
        control: Sequence[ControlSpec | Mapping[str, Any]] = (),
        references: Sequence[EngineReference] = (),
    ) -> EngineOptions:
        """The options for one job: each ``None`` takes ``defaults``' value. A ``control``
        entry may be given as a mapping of ``ControlSpec`` fields."""
        mode = Mode(mode)
        specs = tuple(entry if isinstance(entry, ControlSpec) else ControlSpec(**entry) for entry in control)
        if strength is None and defaults.strength_by_mode:
            strength = defaults.strength_by_mode.get(str(mode), 1.0)
        return cls(
            mode=mode,
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            steps=defaults.steps if steps is None else int(steps),
            strength=None if strength is None else float(strength),
            guidance=defaults.guidance if guidance is None else float(guidance),
            scheduler=defaults.scheduler if scheduler is None else str(scheduler),
            control=specs,
            references=tuple(references),
        )

    @classmethod
    def of(cls, **fields: Any) -> EngineOptions:
        """Options as given, nothing filled in: for calling an engine directly (tests,
        benchmarks); an engine treats what is left ``None`` as its default."""
        return cls.resolve(EngineDefaults(), **fields)


@dataclass(frozen=True)
class EngineJob:
    """One prepared unit of work for an engine.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB context crop, already scaled to the engine's band. Not
            pre-filled: engines that need it pre-fill from ``selection`` and ``options.mode``.
        selection: ``(H, W)`` uint8 selection in the crop, 0 keeps, 255 replaces, soft between.
        denoise_mask: ``(H, W)`` uint8 mask of where the engine may change pixels (the
            selection grown and feathered); 255 wherever ``selection`` is 255.
        seeds: one seed per variation; ``len(seeds)`` images are returned.
        options: the resolved generation options; its control and reference images are
            cropped and scaled like ``image``.
        prefilled: ``prefill.prefill(image, selection, options.mode)``, started by the
            pipeline while it made the masks, for engines whose capabilities say
            ``uses_prefill``; ``None`` where the engine pre-fills for itself.
    """

    image: np.ndarray
    selection: np.ndarray
    denoise_mask: np.ndarray
    seeds: Sequence[int]
    options: EngineOptions = field(default_factory=EngineOptions)
    prefilled: Future | None = None


@runtime_checkable
class Engine(Protocol):
    """What the server needs from an engine. ``run`` is blocking and runs off the event loop.

    Engines that batch (``capabilities.batching``) also have
    ``batch_key(work_size, options) -> tuple | None`` and
    ``run_many(jobs, on_steps) -> list[list[np.ndarray] | BaseException]``.
    """

    name: str
    capabilities: EngineCapabilities
    """What it takes; ``capabilities.native_size`` is final once ``load`` returned."""
    defaults: EngineDefaults
    """What a request's ``None`` means; final once ``load`` returned."""

    def load(self) -> None: ...

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns ``len(job.seeds)`` ``(H, W, 3)`` uint8 RGB images the size of ``job.image``."""
        ...

    def close(self) -> None: ...


def run_batch(
    engine: Engine, jobs: Sequence[EngineJob], on_steps: Sequence[StepCallback]
) -> list[list[np.ndarray] | BaseException]:
    """Runs jobs that share a batch key: several through ``run_many`` where the engine
    batches, else each with ``run`` (a job alone always: it may be one that cannot batch).
    Returns per job its images or the exception that ended it."""
    if len(jobs) > 1 and engine.capabilities.batching:
        return engine.run_many(jobs, on_steps)  # type: ignore[attr-defined]
    outcomes: list[list[np.ndarray] | BaseException] = []
    for job, on_step in zip(jobs, on_steps, strict=True):
        try:
            outcomes.append(engine.run(job, on_step))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller, job by job
            outcomes.append(exc)
    return outcomes


@contextlib.contextmanager
def torch_errors(hint: str = "try fewer variations or a smaller selection") -> Iterator[None]:
    """Maps torch's out-of-memory error to ``EngineError(out_of_memory)`` for torch engines;
    other errors pass unchanged. Imports torch only if it is already imported."""
    try:
        yield
    except Exception as exc:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            raise EngineError(ErrorCode.OUT_OF_MEMORY, f"the engine ran out of memory: {hint}") from exc
        raise
