"""The Ray Serve pool against the single-process server: images/s by replica count, and what
the pool's ingress adds to each job.

Every configuration is the real server (``BackgroundServer``) driven by the SDK's ``Client``
over loopback, on the same jobs:

- ``latency``: one client, one job at a time (``--latency-jobs`` of them, after a warm-up),
  median seconds per job, for the classic engine and a diffusion model. The pool's figure
  minus the single-process server's is what the ingress adds: the object store, the handle
  call, the stream of progress and the result's way back.
- ``throughput``: ``--clients`` clients, each submitting ``--jobs`` jobs at once, for the
  diffusion model; images per second from the first submit to the last result.

Without ``--models-dir`` a tiny SD 1.5 inpaint model (``tests/tiny_models.py``) is built into a
temporary folder, which is what a CPU-only machine can run; on a GPU machine pass a real model
and ``--replicas`` up to one per GPU::

    python benchmarks/pool.py [--replicas 1,2] [--clients 4] [--jobs 4] [--steps 8] [--out pool.json]
    python benchmarks/pool.py --models-dir ~/models --model sd15-inpaint --size 512 --steps 20 --replicas 1,2,4,8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("genfill") is None:
    for _folder in ("plugin_bridge", "server", "sdk"):
        sys.path.insert(0, str(_REPO / _folder))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def canvas_and_mask(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    canvas[:, :, 3] = 255
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size * 3 // 4, size // 4 : size * 3 // 4] = 255
    return canvas, mask


def latency(server, jobs: int, **options) -> float:
    from genfill import Client

    canvas, mask = canvas_and_mask(options.pop("size"))
    with Client(server.url, token=server.token) as client:
        client.fill(canvas, mask, variations=1, seed=0, timeout_s=600, **options)  # warm-up (and deploy)
        times = []
        for seed in range(1, jobs + 1):
            started = time.perf_counter()
            client.fill(canvas, mask, variations=1, seed=seed, timeout_s=600, **options)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def throughput(server, clients: int, jobs: int, **options) -> float:
    from genfill import Client

    size = options.pop("size")
    connected = [Client(server.url, token=server.token) for _ in range(clients)]
    try:
        for index, client in enumerate(connected):
            canvas, mask = canvas_and_mask(size, seed=index)
            client.fill(canvas, mask, variations=1, seed=0, timeout_s=600, **options)
        ready = threading.Barrier(clients + 1)
        failures: list[BaseException] = []

        def run(index: int, client) -> None:
            canvas, mask = canvas_and_mask(size, seed=index)
            ready.wait()
            try:
                submitted = [client.submit_fill(canvas, mask, variations=1, seed=n, **options) for n in range(jobs)]
                for job in submitted:
                    job.result(timeout_s=600)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(index, client)) for index, client in enumerate(connected)]
        for thread in threads:
            thread.start()
        ready.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        for client in connected:
            client.close()
    if failures:
        raise failures[0]
    return clients * jobs / elapsed


def measure(name: str, server, args) -> dict:
    diffusion = {"model": args.model, "steps": args.steps, "size": args.size}
    figures = {
        "classic_latency_s": latency(server, args.latency_jobs, size=args.size),
        "diffusion_latency_s": latency(server, args.latency_jobs, **diffusion),
    }
    runner = server.server.scheduler.runner
    before = len(getattr(runner, "recent", ()))
    figures["images_per_s"] = throughput(server, args.clients, args.jobs, **diffusion)
    ran = list(getattr(runner, "recent", ()))[before:]
    if ran:
        # The throughput phase's jobs on the pool: how they spread and how big their batches were.
        figures["mean_batch_images"] = statistics.mean(job.batch_images for job in ran)
        figures["jobs_per_replica"] = sorted(
            sum(1 for job in ran if job.replica == replica) for replica in {job.replica for job in ran}
        )
    print(f"{name}: " + ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                                  for key, value in figures.items()), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None, help="default: a tiny SD 1.5 inpaint model, built here")
    parser.add_argument("--model", default="tiny-inpaint")
    parser.add_argument("--size", type=int, default=64, help="canvas side, px (the selection is its middle half)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts to measure")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=4, help="jobs each client submits at once")
    parser.add_argument("--latency-jobs", type=int, default=10)
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument(
        "--replica-cpus", type=float, default=0.5,
        help="CPUs each replica takes (Ray's unit; two deployments, classic and the model, share them)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from genfill_server.app import ServerConfig
    from genfill_server.background import BackgroundServer
    from genfill_server.engines import default_engines
    from genfill_server.pool import PoolConfig

    temporary = None
    models = args.models_dir
    if models is None:
        sys.path.insert(0, str(_REPO / "tests"))
        import tiny_models

        temporary = tempfile.TemporaryDirectory()
        models = Path(temporary.name)
        tiny_models.tiny_sd15_inpaint(vae_attention=False).save_pretrained(models / args.model)

    results: dict = {"args": {key: str(value) for key, value in vars(args).items()}, "runs": {}}
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as server:
        results["runs"]["single_process"] = measure("single process", server, args)
    for replicas in [int(value) for value in args.replicas.split(",")]:
        init = {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        if args.num_cpus is not None:
            init["num_cpus"] = args.num_cpus
        pool = PoolConfig(address="auto", replicas=replicas, num_cpus=args.replica_cpus, init_options=init)
        engines = default_engines(model_dirs=[models], hf_cache=False)
        with BackgroundServer(ServerConfig(write_state_file=False, pool=pool), engines) as server:
            results["runs"][f"pool_{replicas}"] = measure(f"pool, {replicas} replica(s)", server, args)
    single = results["runs"]["single_process"]
    for name, run in results["runs"].items():
        if name.startswith("pool_"):
            run["classic_added_ms"] = 1000 * (run["classic_latency_s"] - single["classic_latency_s"])
            run["diffusion_added_ms"] = 1000 * (run["diffusion_latency_s"] - single["diffusion_latency_s"])
            print(
                f"{name}: the ingress adds {run['classic_added_ms']:.1f} ms a classic job, "
                f"{run['diffusion_added_ms']:.1f} ms a diffusion job; "
                f"{run['images_per_s'] / single['images_per_s']:.2f}x the single process's images/s"
            )
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
