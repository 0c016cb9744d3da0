"""A pool of engine replicas on Ray Serve (``genfill serve --ray ADDRESS``).

The websocket server stays the ingress: the gate, sessions, uploads, the fair queue, job ids,
cancel and answers are ``GenfillServer``'s and the scheduler's as without Ray. Only the run
path changes: ``RayRunner`` is a ``runners.Runner`` that sends each job to a Serve deployment
through its ``DeploymentHandle`` instead of loading the engine here.

- One deployment (and one Serve application) per (engine, model), created on the first job
  for it, or with ``models_per_replica`` one per engine whose replicas multiplex its models:
  ``num_replicas`` replicas or an ``autoscaling_config``, a GPU each on machines with GPUs
  (``ray_actor_options={"num_gpus": 1}``), none on CPU-only clusters.
- A replica runs what ``LocalRunner`` runs, the same code on the same inputs: results are
  bit-identical to the single-process server's for the same request and seed.
- Batching happens on the replica (``@serve.batch``): jobs that arrive within
  ``PoolConfig.batch_wait_s`` are grouped by ``pipeline.batch_key``, the scheduler's key, and
  each group runs as one engine batch, so same-shape jobs of several clients share a batch.
- Progress and previews stream back (``handle.options(stream=True)``). A cancel cancels the
  stream; the replica sets the job's flag, which its ``on_step`` reads at the next step.
- Images go to the object store once: ``ObjectCache`` keys each array by its sha256 and
  hands the same ``ObjectRef`` to every job that uses it.
- A replica that dies mid-job gives that job ``engine_failed``; one that dies before the job
  started on it is retried once, on whichever replica Serve picks. A pool that cannot be
  reached gives ``engine_unavailable`` and shows in ``GET /v1/health``; the ingress stays up.

Ray is imported by ``genfill_server.pool.ray_serve`` only, and that only by ``make_runner``
(``--ray``); this module is free of it, so a server without a pool never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engines import EngineSet
    from .ray_serve import RayRunner

__all__ = ["PoolConfig", "make_runner"]


@dataclass(frozen=True)
class PoolConfig:
    """How the ingress uses a Ray cluster.

    Attributes:
        address: ``"auto"`` starts a Ray instance on this machine for this server (and stops
            it with the server); anything else is the address of a running cluster, as
            ``ray.init(address=...)`` takes it (``"127.0.0.1:6379"``, ``"ray://host:10001"``).
        replicas: replicas per deployment, where ``autoscaling`` is ``None``.
        autoscaling: Serve's ``autoscaling_config`` (``min_replicas``, ``max_replicas``,
            ``target_ongoing_requests``...); ``None`` keeps ``replicas`` fixed.
        num_gpus: GPUs a replica of a GPU engine takes; ``None``: 1 where the cluster has
            GPUs, else 0. CPU engines (classic) never take one.
        num_cpus: CPUs a replica takes (Ray's scheduling unit, not a thread count).
        batch_wait_s: how long a replica waits for more jobs to batch with the first.
        max_batch_images: images per replica batch, at most; an engine's own
            ``max_batch_images`` is kept where it is smaller.
        in_flight: workers a lane of the ingress has, so the most jobs of that lane in the
            pool at once. A deployment is given no more jobs than it has room for
            (``RayRunner.room``); the others wait their turn in the fair queue.
        init_options: more ``ray.init`` arguments for ``address="auto"`` (``num_cpus``,
            ``object_store_memory``...).
        object_cache_bytes: bytes of images the ingress keeps in the object store; ``None``
            disables the limit.
        models_per_replica: ``None``: one deployment per (engine, model). A number: one
            deployment per engine that holds models, whose replicas each keep up to that many
            of its models loaded and evict the least recently used (``@serve.multiplexed``);
            Serve sends a model's jobs to a replica that holds it until that replica has a
            batch in hand, then loads the model on another. For many checkpoints on few GPUs.
        deploy_timeout_s: how long a job waits for its deployment's replicas to start (they
            load the model first) before it is answered ``engine_unavailable``; the deployment
            goes on starting for the next job. A cluster without room for the replicas (CPUs,
            GPUs) would otherwise keep the job waiting for ever.
    """

    address: str = "auto"
    replicas: int = 1
    autoscaling: dict | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    batch_wait_s: float = 0.05
    max_batch_images: int = 8
    in_flight: int = 8
    init_options: dict = field(default_factory=dict)
    object_cache_bytes: int | None = 256 * 2**20
    models_per_replica: int | None = None
    deploy_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {self.replicas}")
        if self.in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {self.in_flight}")
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be at least 1, not {self.max_batch_images}")
        if self.models_per_replica is not None and self.models_per_replica < 1:
            raise ValueError(f"models_per_replica must be at least 1, not {self.models_per_replica}")


def make_runner(engines: EngineSet, config: PoolConfig) -> RayRunner:
    """The runner that sends ``engines``' jobs to a Ray Serve pool; imports Ray.

    Raises:
        ImportError: ``ray[serve]`` is not installed (``pip install 'genfill[pool]'``).
    """
    try:
        from .ray_serve import RayRunner
    except ImportError as exc:
        raise ImportError("a Ray pool needs ray[serve]: pip install 'genfill[pool]'") from exc
    return RayRunner(engines, config)
