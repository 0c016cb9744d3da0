"""The Ray Serve side of the pool: the replica deployment and ``RayRunner``, the ingress's
runner. See ``genfill_server.pool`` for the design."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import ray
from genfill.fill import Box
from genfill.protocol import ErrorCode
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import RequestCancelledError

from ..engines import EngineSet
from ..engines.base import DeviceKind, Engine, JobCancelledError, StepCallback, run_batch
from ..errors import RequestError
from ..jobs import FairQueue, Job
from ..pipeline import PipelineResult, batch_key, finish_fill, prepare_fill
from ..runners import FailJob, Outcome
from . import PoolConfig

logger = logging.getLogger("genfill.pool")

_PREVIEW_EVERY_S = 0.25
"""As the scheduler's: a replica sends no more previews than the client would be sent."""
_CANCEL_POLL_S = 0.02
_PROBE_EVERY_S = 2.0
_PROBE_TIMEOUT_S = 10.0
_APP_PREFIX = "genfill-"
_DEFAULT_MODEL = "default"
"""The multiplexed model id of a request that names no model (the engine's default)."""


class PoolUnavailable(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.ENGINE_UNAVAILABLE, message)


class ReplicaFailed(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.ENGINE_FAILED, message)


class _NotStarted(Exception):
    """The replica went away before the job started on it: safe to send it again."""


# The replica


@dataclass
class _Item:
    """One job on a replica, between its stream and the batch that runs it."""

    payload: dict
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    last_preview: float = 0.0
    steps: int = 0
    """Steps the engine reported for this job."""

    def started(self, replica: str) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("started", replica))

    def on_step(self, step: int, total: int, preview: np.ndarray | None) -> None:
        self.steps = step
        if self.cancel.is_set():
            raise JobCancelledError(self.payload["job_id"])
        now = time.perf_counter()
        if preview is not None and self.payload["previews"] and now - self.last_preview >= _PREVIEW_EVERY_S:
            self.last_preview = now
        else:
            preview = None
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("progress", step, total, preview))


def _images_of(item: _Item) -> int:
    return len(item.payload["seeds"])


class _LoadedEngine:
    """One engine a replica holds. After a failure that may have left it half-built (see
    ``Scheduler._failure_frames``) it is built again before its next batch. Serve calls
    ``__del__`` when a multiplexing replica evicts it: it is closed then, which frees its
    memory, or once the batches still running on it end."""

    def __init__(self, spec, device: str, model: str | None) -> None:
        self.spec, self.device, self.model = spec, device, model
        self.on_close: Callable[[_LoadedEngine], None] | None = None
        self._closed = True  # until it has loaded: nothing to close
        self._users = 0
        self._evicted = False
        self._lock = threading.Lock()
        self.engine = self._load()
        self.broken = False
        self._closed = False

    def _load(self) -> Engine:
        engine = self.spec.factory(self.device, self.model)
        engine.load()
        return engine

    @contextlib.contextmanager
    def using(self) -> Iterator[Engine]:
        """The engine, ready to run a batch, and not closed until the batch is done."""
        with self._lock:
            self._users += 1
        try:
            if self.broken:
                with contextlib.suppress(Exception):
                    self.engine.close()
                self.engine = self._load()
                self.broken = False
            yield self.engine
        finally:
            with self._lock:
                self._users -= 1
                close = self._evicted and self._users == 0
            if close:
                self._close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            self._evicted = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self.engine.close()
        if self.on_close is not None:
            self.on_close(self)


def _model_id(model: str | None) -> str:
    """The multiplexed model id of ``model``: Serve's ids are non-empty strings."""
    return model if model is not None else _DEFAULT_MODEL


class EngineReplica:
    """A Serve replica of one engine: of one model loaded once, or, with
    ``models_per_replica``, of up to that many models loaded on demand and evicted least
    recently used first (``@serve.multiplexed``); and the batcher."""

    def __init__(
        self, spec, model: str | None, max_batch_images: int, batch_wait_s: float, models_per_replica: int | None = None
    ) -> None:
        gpus = ray.get_gpu_ids()
        self._name = ray.get_runtime_context().get_actor_name() or ""
        self.spec = spec
        self.device = "cuda" if gpus and spec.capabilities.device_kind is DeviceKind.GPU else "cpu"
        self._held: OrderedDict[str, _LoadedEngine] = OrderedDict()
        """The models this replica holds, least recently used first."""
        if models_per_replica is None:
            fixed = _LoadedEngine(spec, self.device, model)
            capabilities = fixed.engine.capabilities

            async def engine_for(model_id: str) -> _LoadedEngine:
                return fixed
        else:
            capabilities = spec.capabilities

            async def load(model_id: str) -> _LoadedEngine:
                model = None if model_id == _DEFAULT_MODEL else model_id
                loaded = await asyncio.to_thread(_LoadedEngine, spec, self.device, model)
                loaded.on_close = functools.partial(self._forget, model_id)
                self._held[model_id] = loaded
                return loaded

            # Applied here, not on the class, because the limit is the pool's setting;
            # Serve finds a multiplexed loader on the instance too.
            engine_for = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)
        self._engine_for = engine_for
        limit = max_batch_images
        if capabilities.batching:
            limit = min(limit, capabilities.max_batch_images)
        self._batched.set_max_batch_size(max(1, limit))
        self._batched.set_batch_wait_timeout_s(batch_wait_s)


    def _forget(self, model_id: str, loaded: _LoadedEngine) -> None:
        # A model evicted while in use closes late, perhaps after it was loaded again.
        if self._held.get(model_id) is loaded:
            del self._held[model_id]

    def loaded_models(self) -> list[str | None]:
        """The models this multiplexing replica holds, least recently used first."""
        return [None if model_id == _DEFAULT_MODEL else model_id for model_id in self._held]

    async def fill(self, payload: dict):
        """Streams ``("started", replica)`` once the job's batch begins (a job that waits for
        the batch before it has not started: if the replica dies, it can go to another one),
        ``("progress", step, total, preview)``... and one last ``("result", box, layers,
        batch_images)``, ``("error", code, message)``, ``("cancelled", steps)`` or
        ``("failed",)``; ``batch_images`` counts the images of the engine batch the job ran
        in, ``steps`` those it ran before it stopped."""
        item = _Item(payload, asyncio.Queue(), asyncio.get_running_loop())
        running = asyncio.ensure_future(self._batched(item))
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = asyncio.ensure_future(item.events.get())
                await asyncio.wait({getter, running}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not item.events.empty():
                    yield item.events.get_nowait()
                yield running.result()
                return
        except (asyncio.CancelledError, GeneratorExit):
            # The ingress cancelled the stream: the engine stops at its next step.
            item.cancel.set()
            raise
        finally:
            if getter is not None:
                getter.cancel()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=lambda items: sum(map(_images_of, items)))
    async def _batched(self, items: list[_Item]) -> list[tuple]:
        # Serve splits a batch by multiplexed model id; grouping here too keeps a batch of
        # one model whatever the caller set.
        by_model: dict[str | None, list[int]] = {}
        for index, item in enumerate(items):
            by_model.setdefault(item.payload["request"].model, []).append(index)
        answers: list[tuple | None] = [None] * len(items)
        for model, indices in by_model.items():
            group = [items[i] for i in indices]
            try:
                loaded = await self._engine_for(_model_id(model))
            except Exception as exc:  # noqa: BLE001 - answered per job
                outcomes = [self._failure(exc, item, None) for item in group]
            else:
                if _model_id(model) in self._held:
                    self._held.move_to_end(_model_id(model))
                outcomes = await asyncio.to_thread(self._run_items, loaded, group)
            for index, outcome in zip(indices, outcomes, strict=True):
                answers[index] = outcome
        return answers  # type: ignore[return-value]

    def _run_items(self, loaded: _LoadedEngine, items: list[_Item]) -> list[tuple]:
        for item in items:
            item.started(self._name)
        with loaded.using() as engine:
            return self._run_on(engine, loaded, items)

    def _run_on(self, engine: Engine, loaded: _LoadedEngine, items: list[_Item]) -> list[tuple]:
        answers: list[tuple | None] = [None] * len(items)
        prepared = {}
        for index, item in enumerate(items):
            payload = item.payload
            try:
                canvas, selection = ray.get([payload["canvas"], payload["selection"]])
                references = tuple(
                    (reference, np.array(image)) for reference, image in zip(
                        payload["references"], ray.get(list(payload["reference_images"])), strict=True
                    )
                )
                # Arrays from the object store are read-only; the engines may write.
                prepared[index] = prepare_fill(
                    engine, payload["request"], np.array(canvas), np.array(selection), payload["seeds"], references
                )
            except Exception as exc:  # noqa: BLE001 - answered per job
                answers[index] = self._failure(exc, items[index], loaded)
        groups: dict[object, list[int]] = {}
        for index in prepared:
            key = batch_key(engine, items[index].payload["request"], prepared[index].job.selection)
            groups.setdefault(("alone", index) if key is None else key, []).append(index)
        for indices in groups.values():
            try:
                outcomes = run_batch(engine, [prepared[i].job for i in indices], [items[i].on_step for i in indices])
            except Exception as exc:  # noqa: BLE001
                outcomes = [exc] * len(indices)
            images = sum(len(prepared[i].job.seeds) for i in indices)
            for index, outcome in zip(indices, outcomes, strict=True):
                try:
                    if isinstance(outcome, BaseException):
                        raise outcome
                    result = finish_fill(engine, prepared[index], outcome)
                    answers[index] = ("result", tuple(result.box), result.layers, images)
                except Exception as exc:  # noqa: BLE001
                    answers[index] = self._failure(exc, items[index], loaded)
        return answers  # type: ignore[return-value]

    def _failure(self, exc: BaseException, item: _Item, loaded: _LoadedEngine | None) -> tuple:
        """The answer to a job that failed with ``exc``; ``loaded`` is the engine it ran on
        (``None``: its model did not load)."""
        if isinstance(exc, JobCancelledError):
            return ("cancelled", item.steps)
        if isinstance(exc, RequestError):
            if exc.code == ErrorCode.OUT_OF_MEMORY and loaded is not None:
                loaded.broken = True
            return ("error", str(exc.code), exc.message)
        logger.error("a job failed in engine %s", self.spec.name, exc_info=exc)
        if loaded is not None:
            loaded.broken = True
        return ("failed",)


# The ingress


class RanJob(NamedTuple):
    """How a job ended on the pool: where, how many images its engine batch had (0 where it
    did not finish) and how many steps it ran (``None`` where the replica did not say)."""

    job_id: str
    replica: str
    outcome: str
    batch_images: int = 0
    steps: int | None = None


class ObjectCache:
    """Arrays in Ray's object store, put once per content (sha256 of shape, dtype and bytes)
    and kept while the cache holds their ``ObjectRef``; least recently used go first once
    ``max_bytes`` are held (``None``: no limit)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.puts = 0
        self._refs: OrderedDict[str, tuple[ray.ObjectRef, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, array: np.ndarray) -> ray.ObjectRef:
        digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).data)
        key = digest.hexdigest()
        with self._lock:
            kept = self._refs.get(key)
            if kept is not None:
                self._refs.move_to_end(key)
                return kept[0]
        ref = ray.put(array)
        with self._lock:
            self.puts += 1
            self._refs[key] = (ref, array.nbytes)
            self._bytes += array.nbytes
            while self.max_bytes is not None and self._bytes > self.max_bytes and len(self._refs) > 1:
                _, (_, size) = self._refs.popitem(last=False)
                self._bytes -= size
        return ref

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()
            self._bytes = 0


_MULTIPLEXED = object()
"""The model part of the deployment key of an engine whose replicas multiplex models."""


def app_name(engine: str, model: object) -> str:
    """The Serve application (and deployment) of one (engine, model), or of an engine whose
    replicas multiplex its models (``model`` is ``_MULTIPLEXED``)."""
    if model is _MULTIPLEXED:
        model_part = "multiplexed"
    else:
        model_part = re.sub(r"[^A-Za-z0-9_.-]+", "_", model) if isinstance(model, str) and model else "default"
    return f"{_APP_PREFIX}{engine}-{model_part}"


class RayRunner:
    """Runs jobs on Ray Serve replicas; see the module's docstring.

    Args:
        engines: the engines this server offers, as without Ray: their specs travel to the
            replicas, which load them there.
        config: the pool's settings.
    """

    def __init__(self, engines: EngineSet, config: PoolConfig) -> None:
        self.engines = engines
        self.config = config
        self.objects = ObjectCache(config.object_cache_bytes)
        self.replica_of: dict[str, str] = {}
        """The replica (Ray actor name) each running job was last seen on, by job id."""
        self.recent: deque[RanJob] = deque(maxlen=256)
        """The last jobs that ended on a replica, oldest first."""
        self.resent = 0
        """Jobs sent again because their replica went away before they started on it."""
        self._handles: dict[tuple[str, object], concurrent.futures.Future] = {}
        self._taken: dict[tuple[str, object], set[Job]] = {}
        """Jobs taken from the fair queue and not yet ended, by deployment."""
        self._room: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._started_ray = False
        self._status: dict = {"status": "starting", "address": config.address}
        self._probe: asyncio.Task | None = None

    # Runner

    def worker_devices(self, kind: DeviceKind, devices: Sequence[str]) -> list[str]:
        return [f"pool-{index}" for index in range(self.config.in_flight)]

    def loaded(self, name: str, device: str, model: str | None) -> Engine | None:
        return None  # batches form on the replicas, across every ingress worker's jobs

    def deployment_of(self, engine: str, model: str | None) -> tuple[str, object]:
        """The key of the deployment that runs ``engine`` with ``model``: one per (engine,
        model), or one per engine where its replicas multiplex models."""
        if self.config.models_per_replica is not None and self.engines.specs[engine].needs_model:
            return (engine, _MULTIPLEXED)
        return (engine, model)

    def room(self, engine: str, model: str | None) -> int:
        """Jobs a deployment is given at once: one a replica, or a batch a replica for an
        engine that batches. Jobs past that wait in the fair queue, not in Ray's, so that
        clients keep taking turns."""
        config = self.config
        replicas = config.replicas if config.autoscaling is None else int(config.autoscaling.get("max_replicas", 1))
        return max(1, replicas * self._batch_of(engine, *self.deployment_of(engine, model)[1:]))

    def _batch_of(self, engine: str, model: object) -> int:
        """Images one replica of the deployment for ``engine`` and ``model`` batches."""
        spec = self.engines.specs[engine]
        capabilities = spec.capabilities_for(model) if isinstance(model, str) else spec.capabilities
        return min(self.config.max_batch_images, capabilities.max_batch_images) if capabilities.batching else 1

    def _has_room(self, job: Job) -> bool:
        key = self.deployment_of(job.engine_name, job.request.model)
        return len(self._taken.get(key, ())) < self.room(job.engine_name, job.request.model)

    async def next_job(self, queue: FairQueue) -> Job:
        if self._room is None:
            self._room = asyncio.Event()
        while True:
            await queue.wait()
            taken = queue.take(self._has_room, 1)
            if taken:
                job = taken[0]
                self._taken.setdefault(self.deployment_of(job.engine_name, job.request.model), set()).add(job)
                return job
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                # Woken when a job ends; the timeout covers jobs queued meanwhile for another
                # deployment, which has room.
                await asyncio.wait_for(self._room.wait(), 0.05)

    def release(self, job: Job) -> None:
        self._taken.get(self.deployment_of(job.engine_name, job.request.model), set()).discard(job)
        if self._room is not None:
            self._room.set()

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)
        self._status = {"status": "ok", "address": self.config.address}
        self._probe = asyncio.create_task(self._probe_loop(), name="genfill-pool-probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await asyncio.to_thread(self._disconnect)

    def recover(self, name: str) -> None:
        pass  # a replica reloads its own engine after a failure; Serve restarts dead ones

    def health(self) -> dict | None:
        return {"pool": dict(self._status)}

    async def run(
        self, jobs: Sequence[Job], device: str, on_steps: Sequence[StepCallback], fail: FailJob
    ) -> list[tuple[Job, Outcome]]:
        outcomes = await asyncio.gather(*(self._run_one(job, on_step) for job, on_step in zip(jobs, on_steps, strict=True)))
        return list(zip(jobs, outcomes, strict=True))

    # Connecting

    def _connect(self) -> None:
        if not ray.is_initialized():
            if self.config.address == "auto":
                options = {"include_dashboard": False, **self.config.init_options}
                ray.init(address="local", **options)
                self._started_ray = True
            else:
                ray.init(address=self.config.address)
        # The ingress is the only way in: Serve's own HTTP proxy stays off.
        serve.start(proxy_location="Disabled")

    def _disconnect(self) -> None:
        self.objects.clear()
        with self._lock:
            # Deployments still starting too: one that can never start would wait on the
            # cluster for ever.
            names = [app_name(*key) for key in self._handles]
            self._handles.clear()
        if not ray.is_initialized():
            return
        for name in names:
            with contextlib.suppress(Exception):
                serve.delete(name)
        if self._started_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(_PROBE_EVERY_S)
            try:
                status = await asyncio.wait_for(asyncio.to_thread(self._probe_once), _PROBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure to reach Ray means the same
                status = {"status": "unavailable", "address": self.config.address, "reason": type(exc).__name__}
            if status["status"] != self._status.get("status"):
                logger.warning("the Ray pool at %s is %s", self.config.address, status["status"])
            self._status = status

    def _probe_once(self) -> dict:
        if not ray.is_initialized():
            return {"status": "unavailable", "address": self.config.address, "reason": "not connected"}
        applications = serve.status().applications
        deployments = {}
        for name, application in applications.items():
            if name.startswith(_APP_PREFIX):
                deployments[name] = {
                    "status": str(getattr(application.status, "value", application.status)).lower(),
                    "replicas": sum(
                        sum(deployment.replica_states.values()) for deployment in application.deployments.values()
                    ),
                }
        return {"status": "ok", "address": self.config.address, "deployments": deployments}

    async def _handle(self, engine: str, model: str | None):
        """The handle of the deployment that runs ``engine`` with ``model``, deployed on the
        first call for it; with the model's multiplexed id set where its replicas multiplex."""
        key = self.deployment_of(engine, model)
        with self._lock:
            deploying = self._handles.get(key)
            if deploying is None:
                # On its own thread: serve.run waits until the replicas run, which is never
                # on a cluster without room for them.
                deploying = self._handles[key] = concurrent.futures.Future()
                threading.Thread(
                    target=self._deploy_into, args=(deploying, *key), name=f"genfill-deploy-{engine}", daemon=True
                ).start()
        try:
            handle = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(deploying)), self.config.deploy_timeout_s)
        except TimeoutError:
            raise PoolUnavailable(
                f"the {engine} engine's replicas did not start within {self.config.deploy_timeout_s:g} s: "
                "the pool may lack the CPUs or GPUs they need"
            ) from None
        if key[1] is _MULTIPLEXED:
            # Serve routes each model's jobs to a replica that holds it, where one does.
            return handle.options(multiplexed_model_id=_model_id(model))
        return handle

    def _deploy_into(self, future: concurrent.futures.Future, engine: str, model: object) -> None:
        try:
            future.set_result(self._deploy(engine, model))
        except BaseException as exc:  # noqa: BLE001 - handed to every job waiting for it
            with self._lock:
                if self._handles.get((engine, model)) is future:
                    del self._handles[(engine, model)]  # the next job tries again
            future.set_exception(exc)

    def _deploy(self, engine: str, model: object):
        config = self.config
        spec = self.engines.specs[engine]
        num_gpus = 0.0
        if spec.capabilities.device_kind is DeviceKind.GPU:
            num_gpus = config.num_gpus if config.num_gpus is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
        name = app_name(engine, model)
        scale: dict = (
            {"autoscaling_config": config.autoscaling} if config.autoscaling is not None else {"num_replicas": config.replicas}
        )
        multiplexed = model is _MULTIPLEXED
        # Serve sends a model's jobs to a replica that holds it until that replica is full, and
        # only then loads the model on another: a multiplexed replica is full at one batch, so
        # a busy model spreads over the replicas instead of queueing on one.
        ongoing = self._batch_of(engine, model) if multiplexed else max(2 * config.max_batch_images, config.in_flight)
        deployment = serve.deployment(EngineReplica).options(
            name=name,
            ray_actor_options={"num_gpus": num_gpus, "num_cpus": config.num_cpus},
            max_ongoing_requests=ongoing,
            **scale,
        )
        logger.info("deploying %s (%s) on the Ray pool", name, scale)
        return serve.run(
            deployment.bind(
                spec,
                None if multiplexed else model,
                config.max_batch_images,
                config.batch_wait_s,
                config.models_per_replica if multiplexed else None,
            ),
            name=name,
            route_prefix=None,
        )

    # Running

    async def _run_one(self, job: Job, on_step: StepCallback) -> Outcome:
        try:
            return await self._run_taken(job, on_step)
        finally:
            self.release(job)

    async def _run_taken(self, job: Job, on_step: StepCallback) -> Outcome:
        if self._status.get("status") == "unavailable" or not ray.is_initialized():
            # Without a connection, Ray's next call would start a new local instance.
            return PoolUnavailable("the engine pool cannot be reached; try again once it is back")
        try:
            handle = await self._handle(job.engine_name, job.request.model)
            payload = await asyncio.to_thread(self._payload, job)
        except RequestError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - Ray's errors, mapped at this boundary
            logger.error("the Ray pool cannot take job %s", job.job_id, exc_info=exc)
            return _unavailable(exc)
        try:
            for attempt in range(2):
                try:
                    return await self._stream(job, handle, payload, on_step)
                except _NotStarted as exc:
                    if attempt == 1:
                        return ReplicaFailed(f"the {job.engine_name} engine's replicas stopped before the job started")
                    logger.warning("job %s: the replica went away before it started; sending it again", job.job_id, exc_info=exc.__cause__)
                    self.resent += 1
        finally:
            self.replica_of.pop(job.job_id, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _payload(self, job: Job) -> dict:
        return {
            "job_id": job.job_id,
            "request": job.request,
            "canvas": self.objects.put(job.canvas),
            "selection": self.objects.put(job.selection),
            "seeds": list(job.seeds),
            "references": [reference for reference, _ in job.references],
            "reference_images": [self.objects.put(image) for _, image in job.references],
            "previews": job.submit.previews,
        }

    async def _stream(self, job: Job, handle, payload: dict, on_step: StepCallback) -> Outcome:
        stream = handle.options(stream=True).fill.remote(payload)
        consume = asyncio.create_task(self._consume(job, stream, on_step))
        watch = asyncio.create_task(self._watch(job))
        try:
            await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done():
                return consume.result()
            # Cancelled, or the pool is gone: a stream of a lost cluster may never end, so
            # nothing here waits on it.
            with contextlib.suppress(Exception):
                stream.cancel()
            consume.cancel()
            await asyncio.wait({consume}, timeout=1.0)
            if watch.result() == "cancelled":
                return JobCancelledError(job.job_id)
            return PoolUnavailable("the engine pool went away during this job")
        finally:
            watch.cancel()
            if not consume.done():
                consume.cancel()

    async def _consume(self, job: Job, stream, on_step: StepCallback) -> Outcome:
        started = False
        try:
            async for event in stream:
                kind = event[0]
                if kind == "started":
                    started = True
                    self.replica_of[job.job_id] = event[1]
                elif kind == "progress":
                    try:
                        on_step(event[1], event[2], event[3])
                    except JobCancelledError as exc:
                        stream.cancel()
                        return exc
                else:
                    self.recent.append(
                        RanJob(
                            job.job_id,
                            self.replica_of.get(job.job_id, ""),
                            kind,
                            event[3] if kind == "result" else 0,
                            event[1] if kind == "cancelled" else None,
                        )
                    )
                    return _final(job, event)
            return ReplicaFailed(f"the {job.engine_name} engine's replica ended the job without an answer")
        except RequestCancelledError as exc:
            if job.cancel_requested.is_set():
                return JobCancelledError(job.job_id)
            return _unavailable(exc)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            if job.cancel_requested.is_set():
                return JobCancelledError(job.job_id)
            if not started:
                raise _NotStarted from exc
            logger.warning("job %s: its replica stopped mid-job", job.job_id, exc_info=exc)
            return ReplicaFailed(f"the {job.engine_name} engine's replica stopped during this job")
        except RayError as exc:
            if not started and "died" in str(exc).lower():
                raise _NotStarted from exc
            logger.error("job %s: the Ray pool failed", job.job_id, exc_info=exc)
            return _unavailable(exc)

    async def _watch(self, job: Job) -> str:
        """Returns once the job is cancelled (``"cancelled"``) or the pool is gone
        (``"unavailable"``), so that nothing waits on a replica that will never answer."""
        while True:
            if job.cancel_requested.is_set():
                return "cancelled"
            if self._status.get("status") == "unavailable":
                return "unavailable"
            await asyncio.sleep(_CANCEL_POLL_S)


def _final(job: Job, event: tuple) -> Outcome:
    kind = event[0]
    if kind == "result":
        result = PipelineResult(box=Box(*event[1]), layers=list(event[2]))
        return lambda: result
    if kind == "cancelled":
        return JobCancelledError(job.job_id)
    if kind == "error":
        return RequestError(ErrorCode(event[1]), event[2])
    return ReplicaFailed(f"the {job.engine_name} engine failed on this job")


def _unavailable(exc: BaseException) -> PoolUnavailable:
    error = PoolUnavailable("the engine pool cannot be reached; try again once it is back")
    error.__cause__ = exc
    return error
