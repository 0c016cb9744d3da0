"""Where a batch of jobs runs: the seam between the scheduler and the engines.

The scheduler (``genfill_server.scheduler``) owns the queues, the batching and the answers; a
``Runner`` turns one batch of jobs into results. ``LocalRunner`` loads the engines in this
process (``EngineSet``) and runs ``pipeline.prepare_fill`` → ``engines.base.run_batch`` →
``pipeline.finish_fill`` in threads. ``genfill_server.pool.RayRunner`` sends the same jobs to
Ray Serve replicas that run the same three steps (``genfill serve --ray``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from .engines import EngineSet
from .engines.base import DeviceKind, Engine, StepCallback, run_batch
from .jobs import FairQueue, Job
from .pipeline import PipelineResult, PreparedFill, finish_fill, prepare_fill

Finisher = Callable[[], PipelineResult]
"""Makes a job's result once its engine is done with it; blocking, run off the event loop."""
Outcome = Finisher | BaseException
"""Per job of a batch: what makes its result, or the exception that ended it."""
FailJob = Callable[[Job, BaseException], None]


class Runner(Protocol):
    """What the scheduler needs to run jobs."""

    def worker_devices(self, kind: DeviceKind, devices: Sequence[str]) -> list[str]:
        """One entry per worker of lane ``kind``: the device it runs on. ``devices`` are the
        configured accelerator devices (``ServerConfig.devices``)."""
        ...

    def loaded(self, name: str, device: str, model: str | None) -> Engine | None:
        """The engine if it is loaded in this process, for the scheduler's own batching;
        ``None`` batches nothing here."""
        ...

    async def next_job(self, queue: FairQueue) -> Job:
        """Takes the next job a worker runs from ``queue``, in its fair order; a runner with
        limited room takes only jobs it has room for, so the others keep their turn."""
        ...

    def release(self, job: Job) -> None:
        """``job``, taken by ``next_job``, will not be run (it was cancelled first)."""
        ...

    async def run(
        self, jobs: Sequence[Job], device: str, on_steps: Sequence[StepCallback], fail: FailJob
    ) -> list[tuple[Job, Outcome]]:
        """Runs jobs of one batch key as one batch. A job that fails before the batch runs
        may be handed to ``fail`` at once, and is then left out of what is returned."""
        ...

    def recover(self, name: str) -> None:
        """After a failure of engine ``name``: the next job gets a fresh instance."""
        ...

    def health(self) -> dict | None:
        """What ``GET /v1/health`` adds for this runner; ``None``: nothing."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


_REMOTE_WORKERS = 4
"""Remote engines wait on the network, not on a device: this many of their jobs run at once."""
_CPU_DEVICE = "cpu"
REMOTE_DEVICE = "remote"


class LocalRunner:
    """Runs engines in this process, one instance per device, loaded on first use."""

    def __init__(self, engines: EngineSet) -> None:
        self.engines = engines

    def worker_devices(self, kind: DeviceKind, devices: Sequence[str]) -> list[str]:
        if kind is DeviceKind.GPU:
            return list(devices)
        if kind is DeviceKind.CPU:
            return [_CPU_DEVICE]
        return [REMOTE_DEVICE] * _REMOTE_WORKERS

    def loaded(self, name: str, device: str, model: str | None) -> Engine | None:
        return self.engines.loaded(name, device, model)

    async def next_job(self, queue: FairQueue) -> Job:
        return await queue.get()

    def release(self, job: Job) -> None:
        pass

    async def run(
        self, jobs: Sequence[Job], device: str, on_steps: Sequence[StepCallback], fail: FailJob
    ) -> list[tuple[Job, Outcome]]:
        first = jobs[0]
        try:
            # Off the event loop: a first load reads gigabytes and may compile for minutes.
            engine = await asyncio.to_thread(self.engines.get, first.engine_name, device, first.request.model)
        except Exception as exc:  # noqa: BLE001 - every engine failure must reach the client as a code
            for job in jobs:
                fail(job, exc)
            return []
        prepared = await _prepare_all(engine, jobs)
        ready: list[tuple[Job, PreparedFill, StepCallback]] = []
        for job, item, on_step in zip(jobs, prepared, on_steps, strict=True):
            if isinstance(item, BaseException):
                fail(job, item)
            else:
                ready.append((job, item, on_step))
        if not ready:
            return []
        try:
            generated = await asyncio.to_thread(
                run_batch, engine, [item.job for _, item, _ in ready], [on_step for _, _, on_step in ready]
            )
        except Exception as exc:  # noqa: BLE001 - every engine failure must reach the client as a code
            generated = [exc] * len(ready)
        return [
            (job, outcome if isinstance(outcome, BaseException) else _finisher(engine, item, outcome))
            for (job, item, _), outcome in zip(ready, generated, strict=True)
        ]

    def recover(self, name: str) -> None:
        self.engines.recover(name)

    def health(self) -> dict | None:
        return None

    async def start(self) -> None:
        self.engines.load_default()

    async def close(self) -> None:
        self.engines.close()


async def _prepare_all(engine: Engine, jobs: Sequence[Job]) -> list[PreparedFill | BaseException]:
    def prepare(job: Job) -> PreparedFill:
        return prepare_fill(engine, job.request, job.canvas, job.selection, job.seeds, job.references)

    if len(jobs) == 1:
        try:
            return [await asyncio.to_thread(prepare, jobs[0])]
        except Exception as exc:  # noqa: BLE001 - handed to the job
            return [exc]
    return await asyncio.gather(*(asyncio.to_thread(prepare, job) for job in jobs), return_exceptions=True)


def _finisher(engine: Engine, item: PreparedFill, generated) -> Finisher:
    return lambda: finish_fill(engine, item, generated)
