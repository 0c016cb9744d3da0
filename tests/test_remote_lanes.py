"""Each cloud provider's jobs wait in a lane of their own: one that is slow or at its limit
holds up neither local jobs nor another provider's. Local fakes only; nothing reaches the network."""

from __future__ import annotations

import os

import pytest
from genfill import Client
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines, providers
from genfill_server.engines.remote import bfl, openai

from remote_fakes import FakeBFL, FakeOpenAI, photo, selection_of, wait_until

KEY = "lanes-test-key-SECRET"


@pytest.fixture(scope="module")
def fakes():
    with FakeOpenAI(KEY) as fake_openai, FakeBFL(KEY) as fake_bfl:
        yield fake_openai, fake_bfl


@pytest.fixture(scope="module")
def server(fakes):
    fake_openai, fake_bfl = fakes
    os.environ["GENFILL_TEST_LANES_KEY"] = KEY
    common = {"api_key_env": "GENFILL_TEST_LANES_KEY", "native_size": 256, "poll_interval_s": 0.01}
    try:
        engines = default_engines(
            hf_cache=False,
            providers={"classic": providers.classic, "openai": openai.provide, "bfl": bfl.provide},
            remote={"openai": {"base_url": fake_openai.url, "stream": False, **common},
                    "bfl": {"base_url": fake_bfl.url, "max_concurrent": 1, **common}},
        )
    finally:
        del os.environ["GENFILL_TEST_LANES_KEY"]
    assert engines.own_lanes() == {"remote:openai": 2, "remote:bfl": 1}
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def test_a_provider_at_its_limit_holds_up_no_other(server, fakes):
    _, fake_bfl = fakes
    fake_bfl.pending_polls = 10**6  # BFL never finishes: its one place stays taken
    canvas = photo(64, 64)
    selection = selection_of(64, 64, (10, 10, 20, 20))
    with Client(server.url, token=server.token) as client:
        # More BFL jobs than the shared remote lane has workers.
        stuck = [client.submit_fill(canvas, selection, engine="bfl", variations=1) for _ in range(6)]
        wait_until(lambda: len(fake_bfl.tasks) == 1)
        result = client.fill(canvas, selection, engine="openai", variations=1, timeout_s=20)
        assert result.engine == "openai" and len(fake_bfl.tasks) == 1
        assert client.fill(canvas, selection, engine="classic", variations=1, timeout_s=20).engine == "classic"
        for job in stuck:
            job.cancel()
    fake_bfl.pending_polls = 0
