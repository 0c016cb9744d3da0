"""The Ray Serve pool with multiplexed models and autoscaling: the real server on 127.0.0.1
port 0 and a local Ray instance (2 CPUs) of its own. Replicas of the diffusion engine keep one
model each (``models_per_replica=1``) and every deployment autoscales between one and two
replicas, so the scenarios see a replica evict a model, a job whose replica died before the job
started sent again, and Serve add a replica under load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from genfill import Client, EngineUnavailable, JobFailed
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines

import tiny_models
from conftest import brick_image, rect_mask

FIRST, SECOND = "tiny-inpaint-a", "tiny-inpaint-b"
MULTIPLEXED_APP = "genfill-sd_inpaint-multiplexed"
CLASSIC_APP = "genfill-classic-default"

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tiny_models.tiny_sd15_inpaint(seed=1, vae_attention=False).save_pretrained(folder / FIRST)
    tiny_models.tiny_sd15_inpaint(seed=2, vae_attention=False).save_pretrained(folder / SECOND)
    return folder


@pytest.fixture(scope="module")
def pool(models):
    pytest.importorskip("ray.serve", reason="the pool needs genfill[pool] (tests/run.sh installs it)")
    from genfill_server.pool import PoolConfig

    config = PoolConfig(
        address="auto",
        autoscaling={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 600,
        },
        models_per_replica=1,
        max_batch_images=2,
        num_cpus=0.5,
        batch_wait_s=0.01,
        init_options={"num_cpus": 2, "object_store_memory": 300 * 2**20, "_node_ip_address": "127.0.0.1"},
    )
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(ServerConfig(write_state_file=False, pool=config), engines) as running:
        yield running


@pytest.fixture(scope="module")
def single(models):
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def runner_of(server):
    return server.server.scheduler.runner


def loaded_models() -> list[str | None]:
    """What the multiplexed deployment's replica holds, asked through its handle (with one
    replica running, every call reaches it)."""
    from ray import serve

    handle = serve.get_app_handle(MULTIPLEXED_APP)
    return handle.loaded_models.remote().result(timeout_s=30)


def same_as_single(pool, single, canvas, mask, **options) -> None:
    with Client(single.url, token=single.token) as client:
        expected = client.fill(canvas, mask, timeout_s=120, **options)
    with Client(pool.url, token=pool.token) as client:
        got = client.fill(canvas, mask, timeout_s=120, **options)
    assert (got.engine, got.seeds, got.box) == (expected.engine, expected.seeds, expected.box)
    for ours, theirs in zip(got.arrays, expected.arrays, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_replica_keeps_one_model_and_evicts_the_least_recently_used(pool, single):
    canvas, mask = brick_image(64, 64, seed=2), rect_mask(64, 64, (8, 8, 32, 32))
    # One deployment serves both models: each job's model is loaded on demand.
    for model in (FIRST, SECOND, FIRST):
        same_as_single(pool, single, canvas, mask, model=model, variations=1, steps=2, seed=7)
        assert loaded_models() == [model]
    with Client(pool.url, token=pool.token) as client:
        deployments = client.health()["pool"]["deployments"]
    assert MULTIPLEXED_APP in deployments
    assert not any(FIRST in name or SECOND in name for name in deployments)


def test_jobs_for_two_models_at_once_each_get_their_own_models_result(pool, single):
    canvas, mask = brick_image(64, 64, seed=6), rect_mask(64, 64, (16, 8, 24, 40))
    expected = {}
    with Client(single.url, token=single.token) as client:
        for model in (FIRST, SECOND):
            expected[model] = client.fill(canvas, mask, model=model, variations=1, steps=3, seed=4, timeout_s=120)
    assert not np.array_equal(expected[FIRST].arrays[0], expected[SECOND].arrays[0])
    clients = [Client(pool.url, token=pool.token) for _ in range(4)]
    try:
        jobs = [
            (model, client.submit_fill(canvas, mask, model=model, variations=1, steps=3, seed=4))
            for client, model in zip(clients, (FIRST, SECOND, FIRST, SECOND), strict=True)
        ]
        for model, job in jobs:
            np.testing.assert_array_equal(job.result(timeout_s=120).arrays[0], expected[model].arrays[0])
    finally:
        for client in clients:
            client.close()


def wait_for_steps(job, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while job.state.step < 1:
        assert time.monotonic() < deadline, "the job never reported a step"
        time.sleep(0.01)


def test_a_job_that_waited_on_a_replica_that_died_is_sent_again(pool):
    # Before the scaling scenario: the deployment still has one replica, so the second job
    # waits on it for the first one's batch to end.
    import ray

    runner = runner_of(pool)
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 40, 40))
    with Client(pool.url, token=pool.token) as client, Client(pool.url, token=pool.token) as other:
        running = client.submit_fill(canvas, mask, model=FIRST, variations=1, steps=150, seed=1)
        wait_for_steps(running)
        replica = runner.replica_of[running.job_id]
        resent = runner.resent
        waiting = other.submit_fill(canvas, mask, model=FIRST, variations=1, steps=2, seed=2)
        deadline = time.monotonic() + 30
        while not any(job.job_id == waiting.job_id for jobs in runner._taken.values() for job in jobs):
            assert time.monotonic() < deadline, "the second job never left the fair queue"
            time.sleep(0.01)
        time.sleep(1.0)  # for the handle call to reach the replica's batch queue
        assert waiting.job_id not in runner.replica_of  # it has not started
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=False)
        with pytest.raises(JobFailed) as caught:
            running.result(timeout_s=60)
        assert caught.value.code == "engine_failed"
        assert waiting.result(timeout_s=120).seeds == [2]
    assert runner.resent == resent + 1


def test_a_deployment_without_room_to_start_ends_its_jobs_with_engine_unavailable(pool):
    # A second server on the same Ray instance whose replicas ask for more CPUs than it has.
    from genfill_server.pool import PoolConfig
    from ray import serve

    config = PoolConfig(address="auto", num_cpus=8, deploy_timeout_s=3)
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 24, 24))
    with BackgroundServer(ServerConfig(write_state_file=False, pool=config), default_engines(hf_cache=False)) as greedy:
        with Client(greedy.url, token=greedy.token) as client:
            for _ in range(2):  # the deployment goes on starting; the next job waits its time too
                started = time.monotonic()
                with pytest.raises(EngineUnavailable, match="did not start within 3 s"):
                    client.fill(canvas, mask, variations=1, seed=1, timeout_s=60)
                assert time.monotonic() - started < 30
            assert client.health()["status"] == "ok"
        assert CLASSIC_APP in serve.status().applications
    # Closing that server took its deployment off the cluster; the pool's own still serves.
    assert CLASSIC_APP not in serve.status().applications
    assert MULTIPLEXED_APP in serve.status().applications


def test_a_deployment_grows_to_its_most_replicas_under_load(pool):
    runner = runner_of(pool)
    canvas = brick_image(64, 64, seed=4)
    before = len(runner.recent)
    failures: list[BaseException] = []
    stop = threading.Event()

    def replicas() -> set[str]:
        return {job.replica for job in list(runner.recent)[before:]}

    def client_thread(index: int) -> None:
        mask = rect_mask(64, 64, (4 + index, 4, 24, 24))
        try:
            with Client(pool.url, token=pool.token) as client:
                seed = 0
                while not stop.is_set():
                    seed += 1
                    client.fill(canvas, mask, model=FIRST, variations=1, steps=12, seed=seed, timeout_s=120)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=client_thread, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Serve's autoscaler looks at ongoing requests every few seconds: four clients keep
        # four jobs in flight for a target of one a replica, so it adds the second replica;
        # the first holds a batch of two at most, so the model's other jobs go to the second.
        deadline = time.monotonic() + 150
        while len(replicas()) < 2 and not failures:
            assert time.monotonic() < deadline, "the deployment never grew to two replicas"
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, failures
    assert {job.outcome for job in list(runner.recent)[before:]} == {"result"}
    with Client(pool.url, token=pool.token) as client:
        assert client.health()["pool"]["deployments"][MULTIPLEXED_APP]["replicas"] == 2
