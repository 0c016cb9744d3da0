"""The Krita plug-in, unchanged, in real Krita 5 against a server whose default engine is the
``bfl`` cloud engine, talking to a local fake of Black Forest Labs' API. Skipped where Krita
is not installed (see ``test_krita``). Nothing reaches the network."""

from __future__ import annotations

import os

import numpy as np
import pytest
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines, providers
from genfill_server.engines.remote import bfl
from PIL import Image

from remote_fakes import FakeBFL
from test_krita import (  # noqa: F401
    SELECTION,
    _kritarunner,
    _photo,
    _selection_mask,
    krita_installed,
    template_home,
)

KEY = "bfl-krita-test-key-SECRET"


@pytest.fixture(scope="module")
def fake():
    with FakeBFL(KEY) as running:
        running.pending_polls = 1
        yield running


@pytest.fixture(scope="module")
def server(fake):
    os.environ["GENFILL_TEST_BFL_KEY"] = KEY
    try:
        engines = default_engines(
            hf_cache=False, default_engine="bfl", providers={"classic": providers.classic, "bfl": bfl.provide},
            remote={"bfl": {"base_url": fake.url, "api_key_env": "GENFILL_TEST_BFL_KEY", "poll_interval_s": 0.01,
                            "native_size": 256}},
        )
    finally:
        del os.environ["GENFILL_TEST_BFL_KEY"]
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def test_krita_fills_through_the_cloud_engine(server, fake, tmp_path, template_home):  # noqa: F811
    out = _kritarunner("fill", {"url": server.url, "token": server.token, "prompt": "sea", "variations": 2, "seed": 5},
                       tmp_path, template_home)
    assert out["ok"] is True, out["text"]
    [group] = out["groups"]
    assert [child["bounds"] for child in group["children"]] == [list(SELECTION)] * 2
    submits = [r for r in fake.requests if r.path == "/v1/flux-pro-1.0-fill"]
    assert sorted(r.json()["seed"] for r in submits) == [5, 6]
    canvas, mask = _photo(), _selection_mask()
    exported = np.asarray(Image.open(out["export"]).convert("RGBA"))
    assert np.array_equal(exported[mask == 0], canvas[mask == 0]), "pixels outside the selection changed"
    assert not np.array_equal(exported[mask > 0], canvas[mask > 0]), "the selection was not filled"
