"""The clients against what a newer (or broken) server may send: a scripted peer on the wire.

Each test runs the real ``Client``, ``AsyncClient`` and bridge ``ServerConnection`` against
``fake_peer.FakePeer``, which sends frames the real server does not send today.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from genfill import AsyncClient, Client
from genfill.protocol import ResultWarning

from fake_peer import fake_peer, result_frames, send_all

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin_bridge"))

import genfill_bridge as gb  # noqa: E402

IMAGE = np.zeros((8, 8, 4), np.uint8)
MASK = np.zeros((8, 8), np.uint8)
MASK[2:4, 2:4] = 255
WARNING = {"code": "prompt_ignored", "message": "The classic engine ignores the prompt.", "hint": "new field"}


def _sdk_fill(kind: str, url: str, **options):
    if kind == "sync":
        with Client(url, token="t") as client:
            return client.fill(IMAGE, MASK, "a cat", timeout_s=10, **options)

    async def run():
        async with AsyncClient(url, token="t") as client:
            return await client.fill(IMAGE, MASK, "a cat", timeout_s=10, **options)

    return asyncio.run(run())


def _bridge_run(url: str, **kwargs) -> gb.JobResult:
    frame = gb.frames.encode_frame("rgba8", 8, 8, IMAGE.tobytes())
    image = gb.frames.frame_image_id(frame)
    with gb.ServerConnection(url, "t", open_timeout_s=5) as connection:
        return connection.run({image: frame}, {"image": image}, canvas=gb.Size(8, 8), **kwargs)


def _with_warnings(connection, submit):
    send_all(connection, result_frames(submit["job_id"], warnings=[WARNING, {"code": "x", "message": "Second."}]))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sdk_result_carries_the_servers_warnings(kind):
    with fake_peer(_with_warnings) as peer:
        result = _sdk_fill(kind, peer.url)
    assert result.warnings == [
        ResultWarning(code="prompt_ignored", message="The classic engine ignores the prompt."),
        ResultWarning(code="x", message="Second."),
    ]


def test_bridge_result_carries_the_warnings_messages():
    with fake_peer(_with_warnings) as peer:
        result = _bridge_run(peer.url)
    assert result.warnings == ["The classic engine ignores the prompt.", "Second."]


def test_results_without_warnings_have_none(server):
    with Client(server.url, token=server.token) as client:
        result = client.fill(IMAGE, MASK, variations=1, timeout_s=30)
    assert result.warnings == []
    with fake_peer() as peer:
        assert _bridge_run(peer.url).warnings == []
