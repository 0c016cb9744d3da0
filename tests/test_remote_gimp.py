"""The GIMP 3 plug-in, unchanged, in real GIMP against a server whose default engine is the
``bfl`` cloud engine, talking to a local fake of Black Forest Labs' API. Skipped where the
GIMP chroot is not provisioned (see ``test_gimp``). Nothing reaches the network."""

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
from test_gimp import (  # noqa: F401
    SELECTION,
    _batch,
    _mask,
    _photo,
    gimp_installed,
    template_home,
    workdir,
)

KEY = "bfl-gimp-test-key-SECRET"


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


def test_gimp_fills_through_the_cloud_engine(server, fake, workdir):  # noqa: F811
    args = {"prompt": "moss", "variations": 2, "seed": 21, "server-url": server.url, "server-token": server.token}
    out = _batch(workdir, "python-fu-genfill-fill", args)
    assert out["status"] == "success", out.get("message") or out["_stderr"]
    [group] = out["groups"]
    assert [child["box"] for child in group["children"]] == [list(SELECTION)] * 2
    submits = [r for r in fake.requests if r.path == "/v1/flux-pro-1.0-fill"]
    assert sorted(r.json()["seed"] for r in submits) == [21, 22]
    canvas, mask = _photo(), _mask()
    exported = np.asarray(Image.open(out["_host"](str(workdir.inside / "export.png"))).convert("RGBA"))
    assert np.array_equal(exported[mask == 0], canvas[mask == 0]), "pixels outside the selection changed"
    assert not np.array_equal(exported[mask > 0], canvas[mask > 0]), "the selection was not filled"
