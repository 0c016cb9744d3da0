"""The schedulers SD 1.5/2.x and SDXL requests may ask for, keyed by ``genfill.protocol.Scheduler``.

Each is built from a model's own scheduler config, so its training betas and prediction type
carry over. ``noise_coefficients`` and ``strength_timesteps`` are what the denoising loop
(``denoise``) needs of a scheduler beyond diffusers' ``step``.
"""

from __future__ import annotations

from typing import Any

import torch
from genfill.protocol import ErrorCode, Scheduler

from .base import EngineError

__all__ = ["SCHEDULERS", "make_scheduler", "noise_coefficients", "strength_timesteps"]

_KINDS: dict[Scheduler, tuple[str, dict[str, Any]]] = {
    Scheduler.DDIM: ("DDIMScheduler", {"set_alpha_to_one": False}),
    Scheduler.EULER: ("EulerDiscreteScheduler", {}),
    Scheduler.EULER_ANCESTRAL: ("EulerAncestralDiscreteScheduler", {}),
    Scheduler.DPMPP_2M: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Scheduler.DPMPP_2M_KARRAS: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    Scheduler.UNIPC: ("UniPCMultistepScheduler", {}),
}
"""Per scheduler, the diffusers class and what ``from_config`` overrides in the model's config."""

SCHEDULERS: tuple[Scheduler, ...] = tuple(Scheduler)
"""Scheduler names a request may ask for (``FillRequest.scheduler``): every
``protocol.Scheduler``, whose values compare equal to the plain strings."""


def make_scheduler(name: Scheduler | str, config: Any):
    """A fresh scheduler of kind ``name`` built from a model's own scheduler ``config``, so
    its training betas and prediction type (epsilon or v for SD2-768) carry over.

    Args:
        name: a ``protocol.Scheduler`` or its value (``"dpmpp_2m_karras"``...).
        config: the model's scheduler config (``pipeline.scheduler.config``).

    Raises:
        EngineError: ``invalid_request`` for an unknown name.
    """
    try:
        class_name, overrides = _KINDS[Scheduler(name)]
    except ValueError:
        raise EngineError(
            ErrorCode.INVALID_REQUEST, f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}"
        ) from None
    import diffusers

    return getattr(diffusers, class_name).from_config(config, **overrides)


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


def strength_timesteps(scheduler: Any, steps: int, strength: float, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sets ``scheduler`` up for ``steps`` steps of which the last ``strength`` fraction run
    (at least one), as img2img does. Returns the timesteps left to run and the index of the
    first of them in ``scheduler.timesteps``."""
    scheduler.set_timesteps(steps, device=device)
    init_steps = min(max(int(steps * strength), 1), steps)
    start = (steps - init_steps) * scheduler.order
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps, start
