"""The engine pool on Ray Serve (``genfill serve --ray``): the real server on 127.0.0.1 port 0,
a local Ray instance (2 CPUs) with two CPU replicas per engine, the classic engine and a tiny
diffusion model, driven by both SDK clients."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from genfill import Client, EngineUnavailable, JobCancelled, JobFailed
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines

import tiny_models
from conftest import brick_image, rect_mask

INPAINT = "tiny-inpaint"


def test_a_server_without_a_pool_never_imports_ray(tmp_path):
    # In a fresh interpreter: this test module's own fixtures import Ray.
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path.parent)!r})
from genfill import Client
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
import numpy as np
canvas = np.full((32, 32, 4), 200, np.uint8)
mask = np.zeros((32, 32), np.uint8)
mask[8:20, 8:20] = 255
with BackgroundServer(ServerConfig(write_state_file=False)) as server:
    with Client(server.url, token=server.token) as client:
        client.fill(canvas, mask, variations=1, seed=1)
        health = client.health()
assert "pool" not in health, health
assert "ray" not in sys.modules and "genfill_server.pool.ray_serve" not in sys.modules
print("no ray")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no ray" in done.stdout



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tiny_models.tiny_sd15_inpaint(vae_attention=False).save_pretrained(folder / INPAINT)
    return folder


@pytest.fixture(scope="module")
def pool(models):
    pytest.importorskip("ray.serve", reason="the pool needs genfill[pool] (tests/run.sh installs it)")
    from genfill_server.pool import PoolConfig

    config = PoolConfig(
        address="auto",
        replicas=2,
        # Two deployments of two replicas on a 2-CPU instance.
        num_cpus=0.5,
        batch_wait_s=0.2,
        init_options={"num_cpus": 2, "object_store_memory": 300 * 2**20, "_node_ip_address": "127.0.0.1"},
    )
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(ServerConfig(write_state_file=False, pool=config), engines) as running:
        with Client(running.url, token=running.token) as client:
            # Deploys both applications before the timed scenarios.
            canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 16, 16))
            client.fill(canvas, mask, variations=1, seed=1, timeout_s=180)
            client.fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=1, timeout_s=180)
        yield running
    import ray

    assert not ray.is_initialized()  # the server stopped the instance it started


@pytest.fixture(scope="module")
def single(models):
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def runner_of(server):
    return server.server.scheduler.runner


def wait_for_steps(job, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while job.state.step < 1:
        assert time.monotonic() < deadline, "the job never reported a step"
        time.sleep(0.01)


def connect(server, kind: str):
    from conftest import BlockingAsyncClient

    if kind == "sync":
        return Client(server.url, token=server.token)
    return BlockingAsyncClient(server.url, server.token)


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "request_",
    [
        {"variations": 2, "seed": 11},
        {"model": INPAINT, "variations": 2, "steps": 3, "seed": 21, "prompt": "a window"},
        {"model": INPAINT, "mode": "remove", "variations": 1, "steps": 2, "seed": 5},
    ],
    ids=["classic", "inpaint", "inpaint-remove"],
)
def test_results_are_bit_identical_to_the_single_process_server(pool, single, kind, request_):
    canvas = brick_image(96, 80, seed=3)
    mask = rect_mask(96, 80, (60, 50, 36, 30))
    options = dict(request_)
    prompt = options.pop("prompt", "")
    with connect(single, kind) as client:
        expected = client.fill(canvas, mask, prompt, timeout_s=120, **options)
    with connect(pool, kind) as client:
        got = client.fill(canvas, mask, prompt, timeout_s=120, **options)
    assert (got.engine, got.seeds, got.box) == (expected.engine, expected.seeds, expected.box)
    for ours, theirs in zip(got.arrays, expected.arrays, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_progress_and_previews_stream_back(pool):
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 40, 40))
    events = []
    with Client(pool.url, token=pool.token) as client:
        client.fill(canvas, mask, model=INPAINT, variations=1, steps=6, seed=2, on_progress=events.append, timeout_s=120)
    progress = [event for event in events if event.kind == "progress"]
    assert [event.step for event in progress][-1] == 6
    assert any(event.preview is not None for event in progress)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_images_go_to_the_object_store_once(pool):
    runner = runner_of(pool)
    canvas, mask = brick_image(64, 64, seed=9), rect_mask(64, 64, (4, 4, 30, 12))
    with Client(pool.url, token=pool.token) as client:
        client.fill(canvas, mask, variations=1, seed=1)
        puts = runner.objects.puts
        client.fill(canvas, mask, variations=1, seed=2)
        client.fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=2)
    assert runner.objects.puts == puts


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_jobs_of_several_clients_spread_over_both_replicas(pool):
    runner = runner_of(pool)
    canvas = brick_image(64, 64, seed=4)
    results: dict[int, list] = {}

    def client_thread(index: int) -> None:
        mask = rect_mask(64, 64, (4 + index, 4, 24, 24))
        with Client(pool.url, token=pool.token) as client:
            jobs = [client.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=4, seed=index * 10 + n)
                    for n in range(2)]
            results[index] = [job.result(timeout_s=120) for job in jobs]

    before = len(runner.recent)
    threads = [threading.Thread(target=client_thread, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(results) == [0, 1, 2, 3]
    ran = list(runner.recent)[before:]
    assert len(ran) == 8 and {job.outcome for job in ran} == {"result"}
    assert len({job.replica for job in ran}) == 2


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_same_shape_jobs_of_several_clients_share_a_replica_batch(pool):
    runner = runner_of(pool)
    canvas, mask = brick_image(64, 64, seed=5), rect_mask(64, 64, (8, 8, 32, 32))
    clients = [Client(pool.url, token=pool.token) for _ in range(4)]
    try:
        before = len(runner.recent)
        jobs = [client.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=n)
                for n, client in enumerate(clients)]
        batched = [job.result(timeout_s=120) for job in jobs]
    finally:
        for client in clients:
            client.close()
    ran = list(runner.recent)[before:]
    assert len(ran) == 4
    # Four jobs on two replicas within one batch wait: at least one replica ran two at once.
    assert max(job.batch_images for job in ran) >= 2
    with Client(pool.url, token=pool.token) as client:
        alone = client.fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=1, timeout_s=120)
    # A batch gives each job its own seed's image (as the single-process server's batches do).
    np.testing.assert_allclose(alone.arrays[0].astype(int), batched[1].arrays[0].astype(int), atol=2)


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cancel_reaches_the_replica_within_a_step(pool, kind):
    runner = runner_of(pool)
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 40, 40))
    with connect(pool, kind) as client, connect(pool, kind) as other:
        # 150 steps run for seconds on a CPU replica (about 30 ms a step here).
        job = client.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=150, seed=1)
        wait_for_steps(job)
        replica = runner.replica_of[job.job_id]
        cancelled_at = time.monotonic()
        job.cancel()
        with pytest.raises(JobCancelled):
            job.result(timeout_s=60)
        assert time.monotonic() - cancelled_at < 5
        before = len(runner.recent)
        started = time.monotonic()
        # Short jobs on both replicas at once: the cancelled job's replica takes its share
        # and answers at once, which it could not if it still ran the 150 steps.
        jobs = [c.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=n)
                for n in range(3) for c in (client, other)]
        for short in jobs:
            assert short.result(timeout_s=60).seeds
        elapsed = time.monotonic() - started
    ran = list(runner.recent)[before:]
    assert replica in {job.replica for job in ran}
    assert elapsed < 3.0


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_replica_killed_mid_job_fails_that_job_and_the_next_succeeds(pool):
    import ray

    runner = runner_of(pool)
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 40, 40))
    with Client(pool.url, token=pool.token) as client:
        job = client.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=150, seed=1)
        wait_for_steps(job)
        replica = runner.replica_of[job.job_id]
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=False)
        with pytest.raises(JobFailed) as caught:
            job.result(timeout_s=60)
        assert caught.value.code == "engine_failed"
        after = client.fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=1, timeout_s=120)
    assert after.seeds == [1]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_health_reports_the_pool(pool):
    with Client(pool.url, token=pool.token) as client:
        health = client.health()
    assert health["status"] == "ok"
    assert health["pool"]["status"] == "ok"
    deployments = health["pool"]["deployments"]
    assert {"genfill-classic-default", f"genfill-sd_inpaint-{INPAINT}"} <= set(deployments)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_the_ingress_outlives_the_pool_and_says_so(pool):
    # Last in this module: it ends the Ray instance the pool fixture's server started.
    import ray

    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 40, 40))
    with Client(pool.url, token=pool.token) as client:
        job = client.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=150, seed=1)
        wait_for_steps(job)
        ray.shutdown()
        with pytest.raises((EngineUnavailable, JobFailed)):
            job.result(timeout_s=30)
        deadline = time.monotonic() + 30
        while client.health()["pool"]["status"] != "unavailable":
            assert time.monotonic() < deadline, "the health endpoint never said the pool was gone"
            time.sleep(0.2)
        with pytest.raises(EngineUnavailable) as caught:
            client.fill(canvas, mask, variations=1, seed=1, timeout_s=30)
        assert caught.value.code == "engine_unavailable"
        assert client.health()["status"] == "ok"


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--replicas", "2"],
        ["serve", "--max-replicas", "4"],
        ["serve", "--models-per-replica", "2"],
        ["serve", "--ray", "auto", "--replicas", "0"],
        ["serve", "--ray", "auto", "--models-per-replica", "0"],
    ],
)
def test_pool_options_are_checked_before_anything_starts(argv, capsys):
    from genfill_server.cli import main

    assert main(argv) == 2
    assert "genfill:" in capsys.readouterr().err
