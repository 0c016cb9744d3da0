"""The scheduler: lanes of fair queues, the workers that run them, batching, and the answers.

Every job enters the lane of its engine's device kind (``DeviceKind``): one lane for the
accelerator engines, served by one worker per configured device, one for CPU engines and one
for remote engines, so a job of one kind never waits behind a job of another. Within a lane,
clients take turns (``FairQueue``). A worker takes a job, adds the queued jobs that can share
its engine batch, and runs them as one; a job alone is a batch of one, on the same path.

The scheduler also keeps each client's recent answers, replayed when a client retries a job id
(the protocol's rule: a retry never starts a second job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from genfill.images import frame_from_array
from genfill.protocol import (
    Cancelled,
    Error,
    ErrorCode,
    ImageFormat,
    Progress,
    Result,
    Variation,
    WireBox,
    frame_image_id,
)

from .engines import EngineSet
from .engines.base import DeviceKind, Engine, JobCancelledError
from .errors import RequestError
from .jobs import ClientHandle, FairQueue, Job
from .pipeline import PipelineResult, batch_key
from .runners import REMOTE_DEVICE, LocalRunner, Outcome, Runner

logger = logging.getLogger("genfill.server")

_PREVIEW_EVERY_S = 0.25
_FINISHED_JOBS_KEPT = 16
# Replays answer a retried job id; past this many bytes of kept results the oldest go first.
_FINISHED_BYTES_KEPT = 64 * 2**20
# A client that sent a message or got a result this recently may be about to submit (an
# upload comes before its submit, a script submits its next job on the last one's result).
_RECENTLY_ACTIVE_S = 1.0


@dataclass
class ClientState:
    """What the server keeps for one connection."""

    handle: ClientHandle
    jobs: dict[str, Job] = field(default_factory=dict)
    finished: OrderedDict[str, tuple[str, list[str | bytes]]] = field(default_factory=OrderedDict)
    """Recently finished jobs: request fingerprint and the frames that answered it, replayed
    when a client retries a job id it already got an answer for."""
    last_active: float = field(default_factory=time.monotonic)
    """When it last sent a message or was sent a result (``time.monotonic``)."""


def fingerprint(job: Job) -> str:
    """What makes two submits of one job id the same request."""
    return job.submit.model_dump_json(exclude={"previews"})


class Scheduler:
    """Lanes, workers and answers.

    Args:
        engines: the engines jobs run on.
        devices: the accelerator lane's devices, one worker each (``"cpu"`` where there is none).
        batching: run jobs that an engine can batch together (``ServerConfig.batching``).
        batch_wait_s: see ``ServerConfig.batch_wait_s``.
        runner: where batches run; ``None`` means ``LocalRunner(engines)``, in this process.
    """

    def __init__(
        self,
        engines: EngineSet,
        devices: Iterable[str],
        *,
        batching: bool,
        batch_wait_s: float,
        runner: Runner | None = None,
    ) -> None:
        self.engines = engines
        self.runner: Runner = runner or LocalRunner(engines)
        self.devices = tuple(devices)
        self.batching = batching
        self.batch_wait_s = batch_wait_s
        self.clients: dict[int, ClientState] = {}
        self.lanes: dict[str, FairQueue] = {kind: FairQueue() for kind in DeviceKind}
        for lane in engines.own_lanes():
            self.lanes[lane] = FairQueue()
        self._workers: list[asyncio.Task] = []

    # Lanes and workers

    def start(self) -> None:
        workers = [(kind, device) for kind in DeviceKind for device in self.runner.worker_devices(kind, self.devices)]
        # A cloud provider's own lane: its workers wait on the network, as the remote lane's do.
        for lane, count in self.engines.own_lanes().items():
            workers += [(lane, REMOTE_DEVICE)] * count
        for kind, device in workers:
            self._workers.append(asyncio.create_task(self._worker(kind, device), name=f"genfill-worker-{kind}-{device}"))

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    def queued(self, client_id: int | None = None) -> int:
        """Jobs waiting in every lane; only ``client_id``'s where given."""
        if client_id is None:
            return sum(len(lane) for lane in self.lanes.values())
        return sum(lane.count(client_id) for lane in self.lanes.values())

    def enqueue(self, client: ClientState, job: Job) -> int:
        """Queues ``job`` in its lane and returns its position there."""
        client.jobs[job.job_id] = job
        return self.lanes[job.lane].put(job)

    def position(self, job: Job) -> int:
        return self.lanes[job.lane].position(job)

    def cancel(self, client: ClientState, job: Job, *, notify: bool) -> None:
        if job.state == "queued" and self.lanes[job.lane].remove(job):
            job.state = "finished"
            client.jobs.pop(job.job_id, None)
            if notify:
                client.handle.send(Cancelled(job_id=job.job_id).model_dump_json())
            return
        # Running: the worker sees the flag at the next step and answers ``cancelled``.
        job.cancel_requested.set()

    def replay(self, client: ClientState, job_id: str) -> tuple[str, list[str | bytes]] | None:
        """The fingerprint and answer of ``job_id`` if the client was answered it lately."""
        return client.finished.get(job_id)

    async def _worker(self, kind: str, device: str) -> None:
        # The answers of the last engine batch (colour match, layers, frames) are made while
        # the worker takes and runs the next one; at most one batch is being answered at a
        # time, so answers keep their order and what waits for them stays bounded.
        answering: asyncio.Task | None = None
        queue = self.lanes[kind]
        try:
            while True:
                job = await self.runner.next_job(queue)
                if job.cancel_requested.is_set():
                    self.runner.release(job)
                    self.finish(job, [Cancelled(job_id=job.job_id).model_dump_json()])
                    continue
                job.state = "running"
                batch = await self._batch_mates(job, queue, device) if self.batching else [job]
                answers = await self._run_batch(batch, device)
                if answering is not None:
                    await answering
                    answering = None
                if answers is not None:
                    if len(batch) == 1:
                        await answers
                    else:
                        answering = asyncio.create_task(answers)
        finally:
            if answering is not None and not answering.done():
                answering.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await answering

    # Batching

    def _batch_key(self, job: Job, engine: Engine) -> tuple | None:
        if job.batch_key_engine is not engine:
            job.batch_key = batch_key(engine, job.request, job.selection)
            job.batch_key_engine = engine
        return job.batch_key

    async def _batch_mates(self, job: Job, queue: FairQueue, device: str) -> list[Job]:
        """``job`` and the queued jobs that can share its engine batch, taken from the queue
        in its fair order; waits up to ``batch_wait_s`` for clients that may submit soon."""
        request = job.request
        engine = self.runner.loaded(job.engine_name, device, request.model)
        if engine is None or not engine.capabilities.batching:
            return [job]
        key = self._batch_key(job, engine)
        if key is None:
            return [job]
        room = [engine.capabilities.max_batch_images - len(job.seeds)]

        def matches(other: Job) -> bool:
            if other.cancel_requested.is_set() or len(other.seeds) > room[0]:
                return False
            if other.engine_name != job.engine_name or other.request.model != request.model:
                return False
            if self._batch_key(other, engine) != key:
                return False
            room[0] -= len(other.seeds)
            return True

        batch = [job]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while True:
            batch += queue.take(matches, limit=room[0])
            if room[0] <= 0:
                break
            now = time.monotonic()
            if any(other.state == "answering" for other in self._jobs_in_flight()):
                deadline = loop.time() + self.batch_wait_s
            if loop.time() >= deadline or not any(self._may_submit_soon(client, now) for client in self.clients.values()):
                break
            await asyncio.sleep(0.002)
        for other in batch[1:]:
            other.state = "running"
        return batch

    def _jobs_in_flight(self) -> Iterator[Job]:
        for client in self.clients.values():
            yield from client.jobs.values()

    @staticmethod
    def _may_submit_soon(client: ClientState, now: float) -> bool:
        """The rule of ``ServerConfig.batch_wait_s``: connected, nothing queued or running,
        and either its jobs are being answered or it was active a moment ago."""
        if not client.handle.connected:
            return False
        states = [job.state for job in client.jobs.values()]
        if "queued" in states or "running" in states:
            return False
        return bool(states) or now - client.last_active < _RECENTLY_ACTIVE_S

    # The run path

    async def _run_batch(self, jobs: list[Job], device: str) -> Coroutine[Any, Any, None] | None:
        """Runs jobs of one batch key in one engine batch (one job: a batch of one). Returns
        what answers them (each job is answered as soon as its own result is ready), for the
        worker to run while the next batch starts; ``None`` when every job was answered."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        def fail(job: Job, exc: BaseException) -> None:
            self.finish(job, self._failure_frames(job, exc))

        on_steps = [self._step_callback(job, loop) for job in jobs]
        ran = await self.runner.run(jobs, device, on_steps, fail)
        if not ran:
            return None
        for job, _ in ran:
            if job.state == "running":
                job.state = "answering"

        async def frames_of(job: Job, outcome: Outcome) -> list[str | bytes]:
            if isinstance(outcome, BaseException):
                return self._failure_frames(job, outcome)
            try:
                result = await asyncio.to_thread(outcome)
                return await self._result_frames(job, result, started)
            except Exception as exc:  # noqa: BLE001
                return self._failure_frames(job, exc)

        async def answer(job: Job, outcome: Outcome) -> None:
            frames = await frames_of(job, outcome)
            if job.state != "finished":  # a cancelled job was answered at once
                self.finish(job, frames)

        async def answer_all() -> None:
            done = await asyncio.gather(*(answer(job, outcome) for job, outcome in ran), return_exceptions=True)
            for (job, _), failure in zip(ran, done, strict=True):
                if isinstance(failure, Exception):
                    logger.error("answering job %s failed", job.job_id, exc_info=failure)

        return answer_all()

    def _step_callback(self, job: Job, loop: asyncio.AbstractEventLoop):
        """The engine's ``on_step`` for ``job``: progress and previews to its client, and
        ``JobCancelledError`` once it is cancelled. The client is answered ``cancelled`` at
        once: in a batch, the other jobs go on."""
        last_preview = [0.0]

        def on_step(step: int, total: int, preview: np.ndarray | None) -> None:
            if job.cancel_requested.is_set():
                loop.call_soon_threadsafe(self.finish, job, [Cancelled(job_id=job.job_id).model_dump_json()])
                raise JobCancelledError(job.job_id)
            frames: list[str | bytes] = []
            preview_id = None
            now = time.perf_counter()
            if preview is not None and job.submit.previews and now - last_preview[0] >= _PREVIEW_EVERY_S:
                last_preview[0] = now
                rgba = np.dstack([preview, np.full(preview.shape[:2], 255, np.uint8)])
                frame = frame_from_array(rgba)
                preview_id = frame_image_id(frame)
                frames.append(frame)
            frames.append(Progress(job_id=job.job_id, step=step, total=max(total, 1), preview=preview_id).model_dump_json())
            loop.call_soon_threadsafe(job.client.send_progress, frames)

        return on_step

    # Answers

    def finish(self, job: Job, frames: list[str | bytes]) -> None:
        """Sends a job's last frames and keeps them for a retry of its id; a job is finished once."""
        if job.state == "finished":
            return
        job.state = "finished"
        job.client.send_all(frames)
        client = self.clients.get(job.client.client_id)
        if client is None:
            return
        client.last_active = time.monotonic()
        client.jobs.pop(job.job_id, None)
        if isinstance(frames[-1], str) and '"type":"result"' in frames[-1]:
            client.finished[job.job_id] = (fingerprint(job), frames)
            while len(client.finished) > 1 and (
                len(client.finished) > _FINISHED_JOBS_KEPT
                or sum(len(frame) for _, kept in client.finished.values() for frame in kept) > _FINISHED_BYTES_KEPT
            ):
                client.finished.popitem(last=False)

    async def _result_frames(self, job: Job, result: PipelineResult, started: float) -> list[str | bytes]:
        fmt = ImageFormat(job.submit.result_format)
        frames: list[str | bytes] = await asyncio.to_thread(
            lambda: [frame_from_array(layer, fmt) for layer in result.layers]
        )
        region = job.request.region
        box = result.box
        if region is not None:
            box = box._replace(x=box.x + region.x, y=box.y + region.y)
        message = Result(
            job_id=job.job_id,
            box=WireBox(**box._asdict()),
            variations=[Variation(image=frame_image_id(frame), seed=seed) for frame, seed in zip(frames, job.seeds)],
            engine=job.engine_name,
            model=job.request.model,
            seconds=round(time.perf_counter() - started, 4),
            warnings=list(job.warnings),
        )
        return [*frames, message.model_dump_json()]

    def _failure_frames(self, job: Job, exc: BaseException) -> list[str | bytes]:
        if isinstance(exc, JobCancelledError):
            return [Cancelled(job_id=job.job_id).model_dump_json()]
        if isinstance(exc, RequestError):
            if exc.code == ErrorCode.OUT_OF_MEMORY:
                # What ran out of memory may have left the engine half-built: the next job
                # loads it afresh.
                logger.warning("job %s ran out of memory on engine %s", job.job_id, job.engine_name)
                self.runner.recover(job.engine_name)
            return [Error(code=exc.code, message=exc.message, job_id=job.job_id).model_dump_json()]
        logger.error("job %s failed in engine %s", job.job_id, job.engine_name, exc_info=exc)
        self.runner.recover(job.engine_name)
        return [
            Error(
                code=ErrorCode.ENGINE_FAILED, message=f"the {job.engine_name} engine failed on this job", job_id=job.job_id
            ).model_dump_json()
        ]
