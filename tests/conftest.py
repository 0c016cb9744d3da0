"""Shared fixtures: a real genfill server on 127.0.0.1 port 0, and both SDK clients.

Scenarios run through ``Client`` and ``AsyncClient`` alike: ``any_client`` gives one or the
other behind the same blocking calls; the async client runs for real on its own event loop
thread, so each scenario exercises both transports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from genfill import AsyncClient, Client  # noqa: E402
from genfill_server.app import ServerConfig  # noqa: E402
from genfill_server.background import BackgroundServer  # noqa: E402

from blocking import Loop  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_state_file(tmp_path, monkeypatch):
    # No test may read or clobber a developer's running server's state file.
    monkeypatch.setenv("GENFILL_STATE_FILE", str(tmp_path / "state" / "server.json"))


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--pool", action="store_true",
        help="run the shared server fixtures' engines on a local Ray Serve pool (needs genfill[pool])",
    )


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--pool"):
        for item in items:
            if "server" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.ray)


def server_config(request: pytest.FixtureRequest, **fields) -> ServerConfig:
    """The config of a test module's shared server: in this process, or with ``--pool`` on a
    local Ray instance of 2 CPUs, two replicas an engine."""
    if request.config.getoption("--pool"):
        from genfill_server.pool import PoolConfig

        fields["pool"] = PoolConfig(
            replicas=2,
            num_cpus=0.25,
            init_options={"num_cpus": 2, "object_store_memory": 300 * 2**20, "_node_ip_address": "127.0.0.1"},
        )
    return ServerConfig(write_state_file=False, **fields)


@pytest.fixture(scope="module")
def server(request) -> Iterator[BackgroundServer]:
    with BackgroundServer(server_config(request)) as running:
        yield running


class BlockingJob:
    """An ``AsyncJob`` driven from test code as if it were a ``Job``."""

    def __init__(self, runner: Loop, job) -> None:
        self._runner = runner
        self._job = job
        self.job_id = job.job_id

    @property
    def state(self):
        return self._job.state

    def __iter__(self):
        async def collect():
            return [event async for event in self._job]

        return iter(self._runner.run(collect()))

    def result(self, timeout_s: float | None = None):
        return self._runner.run(self._job.result(timeout_s))

    def cancel(self) -> None:
        self._runner.run(self._job.cancel())


class BlockingAsyncClient:
    """``AsyncClient`` behind blocking calls, so one scenario serves both clients."""

    kind = "async"

    def __init__(self, url: str, token: str | None) -> None:
        self._runner = Loop()
        self.client = AsyncClient(url, token=token)

    def __enter__(self):
        self._runner.run(self.client.connect())
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._runner.run(self.client.aclose())
        finally:
            self._runner.close()

    @property
    def session(self):
        return self.client._session

    @property
    def hello(self):
        return self.client.hello

    def fill(self, *args, **kwargs):
        return self._runner.run(self.client.fill(*args, **kwargs))

    def expand(self, *args, **kwargs):
        return self._runner.run(self.client.expand(*args, **kwargs))

    def submit_fill(self, *args, **kwargs) -> BlockingJob:
        return BlockingJob(self._runner, self._runner.run(self.client.submit_fill(*args, **kwargs)))

    def health(self):
        return self._runner.run(self.client.health())

    def models(self):
        return self._runner.run(self.client.models())


class SyncClient(Client):
    kind = "sync"

    @property
    def session(self):
        return self._session


@pytest.fixture(params=["sync", "async"])
def client_factory(request, server):
    """Makes connected-on-enter clients of one kind: ``with client_factory() as c:``."""

    def make(url: str | None = None, token: str | None = None):
        url = url or server.url
        token = server.token if token is None else token
        if request.param == "sync":
            return SyncClient(url, token=token)
        return BlockingAsyncClient(url, token)

    make.kind = request.param
    return make


@pytest.fixture
def any_client(client_factory):
    with client_factory() as connected:
        yield connected


def brick_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGBA brick wall with noise: a regular texture a fill must continue."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    row = y // 12
    offset = (row % 2) * 12
    mortar = ((y % 12) < 2) | (((x + offset) % 24) < 2)
    rgb = np.empty((height, width, 3), np.float32)
    rgb[:] = (170, 70, 50)
    rgb[mortar] = (200, 200, 190)
    rgb += rng.normal(0, 6, rgb.shape)
    rgba = np.dstack([np.clip(rgb, 0, 255).astype(np.uint8), np.full((height, width), 255, np.uint8)])
    return rgba


def rect_mask(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 255
    return mask
