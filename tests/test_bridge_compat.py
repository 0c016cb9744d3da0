"""An older plug-in keeps working against a newer server.

``tests/data/bridge_v1`` holds the bridge's ``client.py`` and ``messages.py`` as they were
before protocol features existed, unchanged. They run here against today's real server and
against a peer that sends what a newer server adds within protocol 1 (features in hello,
extra fields, result warnings), and must fill exactly as today's bridge does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fake_peer import fake_peer, hello, result_frames, send_all

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin_bridge"))
sys.path.insert(0, str(ROOT / "tests" / "data"))

import genfill_bridge as gb  # noqa: E402
from bridge_v1 import client as old_client  # noqa: E402
from bridge_v1 import messages as old_messages  # noqa: E402


def _canvas(width: int = 64, height: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 255, (height, width, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    mask = np.zeros((height, width), np.uint8)
    mask[10:30, 20:44] = 255
    return rgba, mask


def _job(options) -> tuple[dict[str, bytes], dict]:
    rgba, mask = _canvas()
    image = gb.frames.encode_frame("rgba8", rgba.shape[1], rgba.shape[0], rgba.tobytes())
    gray = gb.frames.encode_frame("gray8", mask.shape[1], mask.shape[0], mask.tobytes())
    image_id, mask_id = gb.frames.frame_image_id(image), gb.frames.frame_image_id(gray)
    return {image_id: image, mask_id: gray}, options.request(image_id, mask_id, None)


def test_the_frozen_copy_is_the_old_bridge():
    # It must stay what plug-ins in the field run: it refuses message types it does not know.
    assert old_messages.PROTOCOL_VERSION == 1
    with pytest.raises(gb.ProtocolMismatch, match="unknown type"):
        old_messages.parse_server_message('{"type": "telemetry"}')


def test_an_old_bridge_fills_against_the_current_server(server):
    frames, request = _job(old_messages.FillOptions(prompt="", variations=2, seed=11))
    events = []
    with old_client.ServerConnection(server.url, server.token) as connection:
        assert connection.hello["protocol_version"] == 1
        old = connection.run(frames, request, canvas=gb.Size(64, 48), on_event=events.append)
    assert [v.seed for v in old.variations] == [11, 12]
    assert events[0].kind == "accepted"

    # Today's bridge, same request: the same pixels.
    frames, request = _job(gb.FillOptions(prompt="", variations=2, seed=11))
    with gb.ServerConnection(server.url, server.token) as connection:
        new = connection.run(frames, request, canvas=gb.Size(64, 48))
    assert old.box == new.box
    assert [v.rgba for v in old.variations] == [v.rgba for v in new.variations]


def test_an_old_bridge_reads_what_a_newer_server_adds():
    def newer(connection, submit):
        job_id = submit["job_id"]
        send_all(
            connection,
            [
                {"type": "accepted", "job_id": job_id, "queue_position": 0, "worker": "gpu-1"},
                {"type": "progress", "job_id": job_id, "step": 1, "total": 1, "eta_s": 0.1},
                *result_frames(job_id, (20, 10, 24, 20), warnings=[{"code": "prompt_ignored", "message": "Ignored."}]),
            ],
        )

    newer_hello = hello(
        features=["references", "warnings", "capabilities"],
        engines=[
            {
                "name": "classic",
                "available": True,
                "modes": ["fill", "expand", "add", "remove"],
                "capabilities": {"modes": ["fill"], "prompt": False, "device_kind": "cpu"},
            }
        ],
    )
    frames, request = _job(old_messages.FillOptions(variations=1))
    with fake_peer(newer, hello_message=newer_hello) as peer:
        with old_client.ServerConnection(peer.url, "t") as connection:
            result = connection.run(frames, request, canvas=gb.Size(64, 48))
    assert result.box == gb.Box(20, 10, 24, 20)
    assert len(result.variations) == 1
