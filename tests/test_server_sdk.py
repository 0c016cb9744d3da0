"""The real server on 127.0.0.1 port 0 with the classic engine, through both SDK clients."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import numpy as np
import pytest
import websockets
from genfill import (
    AsyncClient,
    AuthenticationError,
    Box,
    Client,
    ConnectError,
    ConnectionClosed,
    EngineUnavailable,
    JobCancelled,
    LimitExceeded,
    ProtocolError,
)
from genfill.images import frame_from_array
from genfill.protocol import (
    ErrorCode,
    FillRequest,
    ImageFormat,
    Limits,
    Submit,
    encode_frame,
    frame_image_id,
    parse_server_message,
)
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer

from conftest import brick_image, rect_mask


def assert_unchanged_outside(canvas: np.ndarray, composite: np.ndarray, mask: np.ndarray) -> None:
    outside = mask == 0
    np.testing.assert_array_equal(composite[outside], canvas[outside])


def test_fill_returns_variations_and_keeps_unselected_pixels(any_client):
    canvas = brick_image(97, 83)
    mask = rect_mask(97, 83, (60, 0, 37, 21))  # odd size, touching the top and right edges
    result = any_client.fill(canvas, mask, seed=11)
    assert len(result.arrays) == 3
    assert result.seeds == [11, 12, 13]
    assert result.box == Box(60, 0, 37, 21)
    for index, layer in enumerate(result.arrays):
        assert layer.shape == (21, 37, 4)
        composite = result.composite_array(index)
        assert composite.shape == canvas.shape
        assert_unchanged_outside(canvas, composite, mask)
        assert not np.array_equal(composite[mask > 0], canvas[mask > 0])
    image = result.images[0]
    assert image.mode == "RGBA" and image.size == (37, 21)


def test_same_seed_gives_same_pixels_and_each_variation_is_reproducible(any_client):
    canvas = brick_image(64, 64, seed=3)
    mask = rect_mask(64, 64, (20, 20, 16, 16))
    first = any_client.fill(canvas, mask, seed=100, variations=2)
    again = any_client.fill(canvas, mask, seed=100, variations=2)
    for a, b in zip(first.arrays, again.arrays):
        np.testing.assert_array_equal(a, b)
    second_alone = any_client.fill(canvas, mask, seed=first.seeds[1], variations=1)
    np.testing.assert_array_equal(second_alone.arrays[0], first.arrays[1])


def test_progress_events_arrive_in_order(any_client):
    canvas = brick_image(80, 80)
    mask = rect_mask(80, 80, (30, 30, 20, 20))
    events = []
    any_client.fill(canvas, mask, variations=2, on_progress=events.append)
    kinds = [event.kind for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    steps = [event for event in events if event.kind == "progress"]
    assert steps, "no progress event"
    assert [event.step for event in steps] == sorted(event.step for event in steps)
    assert steps[-1].step == steps[-1].total


def test_expand_grows_the_canvas_and_keeps_the_original(any_client):
    canvas = brick_image(50, 40)
    result = any_client.expand(canvas, left=10, right=3, top=0, bottom=7, variations=1, seed=1)
    assert result.canvas_size == (63, 47)
    grown = result.composite_array(0)
    assert grown.shape == (47, 63, 4)
    np.testing.assert_array_equal(grown[0:40, 10:60], canvas)
    # The new area is filled and opaque.
    assert (grown[:, :10, 3] == 255).all() and (grown[40:, :, 3] == 255).all()


def test_soft_mask_changes_pixels_partly(any_client):
    canvas = brick_image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 128
    result = any_client.fill(canvas, mask, variations=1, seed=5)
    composite = result.composite_array(0)
    assert_unchanged_outside(canvas, composite, mask)
    alpha = np.zeros((64, 64), np.uint8)
    alpha[result.box.slices] = result.arrays[0][:, :, 3]
    assert alpha.max() <= 128


def test_large_canvas_sends_only_the_context(any_client):
    canvas = brick_image(4096, 2048)
    mask = rect_mask(4096, 2048, (3500, 1900, 40, 30))
    prepared = any_client.session.prepare_fill(canvas, mask, variations=1)
    assert prepared.request.region is not None
    sent = sum(len(frame) for frame in prepared.frames.values())
    assert sent < canvas.nbytes / 4
    result = any_client.fill(canvas, mask, variations=1, seed=2)
    assert result.box == Box(3500, 1900, 40, 30)
    assert_unchanged_outside(canvas, result.composite_array(0), mask)


def test_the_same_image_is_uploaded_once(client_factory):
    canvas = brick_image(64, 48)
    mask = rect_mask(64, 48, (8, 8, 8, 8))
    with client_factory() as first:
        first.fill(canvas, mask, variations=1)
        assert first.session.frames_uploaded == 2
        first.fill(canvas, mask, variations=1)
        assert first.session.frames_uploaded == 2
        other_mask = rect_mask(64, 48, (30, 30, 8, 8))
        first.fill(canvas, other_mask, variations=1)
        assert first.session.frames_uploaded == 3
        # Another connection asks first and does not send what the server holds.
        with client_factory() as second:
            second.fill(canvas, mask, variations=1)
            assert second.session.frames_uploaded == 0


def test_cancel_stops_a_running_job(client_factory):
    canvas = brick_image(1024, 1024)
    mask = rect_mask(1024, 1024, (100, 100, 700, 700))
    with client_factory() as client:
        job = client.submit_fill(canvas, mask, variations=8, seed=1)
        queued = client.submit_fill(canvas, mask, variations=1, seed=2)
        queued.cancel()
        started = time.monotonic()
        job.cancel()
        with pytest.raises(JobCancelled):
            job.result(timeout_s=60)
        assert time.monotonic() - started < 10
        with pytest.raises(JobCancelled):
            queued.result(timeout_s=60)
        # The queue is free again.
        small = client.fill(brick_image(32, 32), rect_mask(32, 32, (4, 4, 4, 4)), variations=1, timeout_s=60)
        assert len(small.arrays) == 1


def test_client_disconnect_mid_job_does_not_wedge_the_queue(server):
    canvas = brick_image(1024, 1024)
    mask = rect_mask(1024, 1024, (100, 100, 700, 700))
    leaver = Client(server.url, token=server.token)
    leaver.connect()
    leaver.submit_fill(canvas, mask, variations=8)
    leaver.submit_fill(canvas, mask, variations=8, seed=9)
    leaver.close()
    started = time.monotonic()
    with Client(server.url, token=server.token) as stayer:
        result = stayer.fill(brick_image(32, 32), rect_mask(32, 32, (4, 4, 4, 4)), variations=1, timeout_s=60)
    assert len(result.arrays) == 1
    assert time.monotonic() - started < 15


def test_resubmitting_a_job_id_never_starts_a_second_job(server):
    canvas = brick_image(64, 64)
    mask = rect_mask(64, 64, (10, 10, 10, 10))
    with Client(server.url, token=server.token) as client:
        first = client.fill(canvas, mask, variations=1, seed=4, job_id="retry-1")
        session = client._session
        prepared = session.prepare_fill(canvas, mask, variations=1, seed=4, job_id="retry-1")
        replay = client.submit(prepared).result(timeout_s=30)
        np.testing.assert_array_equal(first.arrays[0], replay.arrays[0])
        different = session.prepare_fill(canvas, mask, variations=1, seed=5, job_id="retry-1")
        with pytest.raises(ProtocolError) as caught:
            client.submit(different).result(timeout_s=30)
        assert caught.value.code == "job_id_in_use"


def test_queue_is_fair_between_clients(server):
    big = brick_image(256, 256)
    big_mask = rect_mask(256, 256, (60, 60, 120, 120))
    with Client(server.url, token=server.token) as greedy, Client(server.url, token=server.token) as modest:
        greedy_jobs = [greedy.submit_fill(big, big_mask, variations=1, seed=i) for i in range(5)]
        modest_job = modest.submit_fill(brick_image(32, 32), rect_mask(32, 32, (4, 4, 4, 4)), variations=1)
        events = list(modest_job)
        assert events[0].kind == "accepted"
        assert events[0].queue_position <= 1
        modest_job.result(timeout_s=60)
        finished_before = sum(job.state.finished for job in greedy_jobs)
        assert finished_before <= 2, "the modest client waited for the greedy client's queue"
        for job in greedy_jobs:
            job.result(timeout_s=120)


@pytest.mark.parametrize(
    ("options", "error", "code"),
    [
        ({"engine": "no-such-engine"}, EngineUnavailable, "engine_unavailable"),
        ({"model": "no-such-model"}, EngineUnavailable, "model_not_found"),
        ({"engine": "classic", "model": "no-such-model"}, EngineUnavailable, "model_not_found"),
    ],
)
def test_request_errors_map_to_exception_classes(any_client, options, error, code):
    with pytest.raises(error) as caught:
        any_client.fill(brick_image(16, 16), rect_mask(16, 16, (2, 2, 4, 4)), variations=1, **options)
    assert caught.value.code == code


def test_invalid_options_are_refused_before_sending(any_client):
    canvas, mask = brick_image(16, 16), rect_mask(16, 16, (2, 2, 4, 4))
    with pytest.raises(ValueError, match="strength"):
        any_client.fill(canvas, mask, strength=float("nan"))
    with pytest.raises(ValueError, match="selects nothing"):
        any_client.fill(canvas, np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="mask is 8x16"):
        any_client.fill(canvas, np.zeros((16, 8), np.uint8))
    with pytest.raises(LimitExceeded):
        any_client.fill(canvas, mask, variations=any_client.hello.limits.max_variations + 1)


def test_wrong_token_and_missing_server(server, client_factory):
    with pytest.raises(AuthenticationError):
        with client_factory(token="not-the-token"):
            pass
    with pytest.raises(ConnectError):
        with client_factory(url="ws://127.0.0.1:9"):
            pass


def test_health_and_models(any_client):
    assert any_client.health()["status"] == "ok"
    catalogue = any_client.models()
    assert catalogue["default_engine"] == "classic"
    assert {engine["name"] for engine in catalogue["engines"]} >= {"classic"}
    assert any_client.hello.default_engine == "classic"


def test_sync_client_refuses_to_block_an_event_loop(server):
    async def misuse():
        with Client(server.url, token=server.token) as client:
            client.fill(brick_image(8, 8), rect_mask(8, 8, (1, 1, 2, 2)))

    with pytest.raises(RuntimeError, match="use AsyncClient"):
        asyncio.run(misuse())
    with pytest.raises(TypeError, match="async with"):
        with AsyncClient(server.url, token=server.token):
            pass


def test_state_file_lets_clients_find_the_server(tmp_path):
    state_file = tmp_path / "state.json"
    config = ServerConfig(state_file=state_file)
    with BackgroundServer(config) as running:
        mode = stat.S_IMODE(os.stat(state_file).st_mode)
        assert mode == 0o600
        state = json.loads(state_file.read_text())
        assert state["url"] == running.url and state["token"] == running.token
        with Client(state_file=str(state_file)) as client:
            assert client.health()["status"] == "ok"
            result = client.fill(brick_image(16, 16), rect_mask(16, 16, (4, 4, 4, 4)), variations=1)
            assert len(result.arrays) == 1
    assert not state_file.exists()


# Raw protocol: what the SDK never sends, the server must still answer with a stable code.


async def _raw_session(server, *messages, limits_wait: float = 10.0):
    """Sends frames on a fresh connection and returns every server message until quiet."""
    received = []
    async with websockets.connect(
        server.url, additional_headers={"Authorization": f"Bearer {server.token}"}, compression=None
    ) as ws:
        hello = parse_server_message(await ws.recv())
        received.append(hello)
        for message in messages:
            await ws.send(message)
        while True:
            try:
                data = await asyncio.wait_for(ws.recv(), limits_wait if not received[1:] else 2.0)
            except TimeoutError:
                break
            if isinstance(data, str):
                received.append(parse_server_message(data))
    return received


def _submit(job_id: str, **fields) -> str:
    return Submit(job_id=job_id, request=FillRequest(**fields)).model_dump_json()


def test_raw_protocol_errors_have_stable_codes(server):
    canvas = brick_image(16, 16)
    image_frame = frame_from_array(canvas)
    image = frame_image_id(image_frame)
    mask_frame = frame_from_array(rect_mask(16, 16, (2, 2, 4, 4)), ImageFormat.GRAY8)
    mask = frame_image_id(mask_frame)
    empty_frame = frame_from_array(np.zeros((16, 16), np.uint8), ImageFormat.GRAY8)
    small_frame = frame_from_array(np.full((8, 16), 255, np.uint8), ImageFormat.GRAY8)
    unknown = "0" * 64
    cases = [
        ("{not json", ErrorCode.BAD_MESSAGE),
        (json.dumps({"type": "teleport"}), ErrorCode.BAD_MESSAGE),
        (_submit("a", image=unknown, mask=mask), ErrorCode.UNKNOWN_IMAGE),
        (_submit("b", image=image, mask=frame_image_id(empty_frame)), ErrorCode.EMPTY_SELECTION),
        (_submit("c", image=image, mask=frame_image_id(small_frame)), ErrorCode.SIZE_MISMATCH),
        (_submit("d", image=image, mask=mask, variations=99), ErrorCode.LIMIT_EXCEEDED),
        (_submit("e", image=image, mask=mask, steps=10_000), ErrorCode.LIMIT_EXCEEDED),
        (_submit("f", image=image), ErrorCode.INVALID_REQUEST),
        (json.dumps({"type": "submit", "job_id": "g", "request": {"image": image, "strength": 7}}), ErrorCode.INVALID_REQUEST),
        (json.dumps({"type": "cancel", "job_id": "nobody"}), ErrorCode.UNKNOWN_JOB),
    ]
    frames = [image_frame, mask_frame, empty_frame, small_frame] + [case for case, _ in cases]
    received = asyncio.run(_raw_session(server, *frames))
    errors = [message for message in received if message.type == "error"]
    assert [error.code for error in errors] == [code for _, code in cases]
    assert errors[2].job_id == "a"
    for error in errors:
        assert "Traceback" not in error.message and "/" not in error.message


def test_queue_limit_per_client():
    limits = Limits(max_queued_jobs_per_client=2)
    with BackgroundServer(ServerConfig(write_state_file=False, limits=limits)) as running:
        with Client(running.url, token=running.token) as client:
            busy = client.submit_fill(brick_image(1024, 1024), rect_mask(1024, 1024, (100, 100, 700, 700)), variations=8)
            small = brick_image(32, 32), rect_mask(32, 32, (4, 4, 8, 8))
            queued = [client.submit_fill(*small, variations=1, seed=i) for i in range(3)]
            with pytest.raises(LimitExceeded) as caught:
                queued[2].result(timeout_s=30)
            assert caught.value.code == "queue_full"
            busy.cancel()
            for job in queued[:2]:
                assert len(job.result(timeout_s=60).arrays) == 1


def test_unreadable_upload_is_refused(server):
    payload = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    frame = encode_frame(ImageFormat.PNG, 4, 4, payload)
    received = asyncio.run(_raw_session(server, frame))
    assert received[-1].type == "error" and received[-1].code == ErrorCode.IMAGE_INVALID



def test_stopping_the_server_tells_each_unfinished_job(client_factory):
    running = BackgroundServer(ServerConfig(write_state_file=False))
    running.start()
    try:
        with client_factory(url=running.url, token=running.token) as client:
            canvas, mask = brick_image(1024, 1024), rect_mask(1024, 1024, (100, 100, 700, 700))
            jobs = [client.submit_fill(canvas, mask, variations=8, seed=seed) for seed in (1, 2)]
            # A job the server has accepted, queued or running, is told why it will not finish.
            deadline = time.monotonic() + 30
            while any(job.state.status == "submitted" for job in jobs):
                assert time.monotonic() < deadline, "the server never accepted the jobs"
                time.sleep(0.01)
            running.stop()
            for job in jobs:
                with pytest.raises(ConnectionClosed) as caught:
                    job.result(timeout_s=30)
                assert caught.value.code == "shutting_down"
    finally:
        running.stop()


def test_kept_results_for_retries_are_bounded_in_bytes(server):
    # Each 2048x1024 result is 8 MiB of raw RGBA; only the newest few fit the replay budget.
    canvas = brick_image(2048, 1024)
    # Two small holes in opposite corners: a cheap fill whose box is the whole canvas.
    mask = rect_mask(2048, 1024, (0, 0, 8, 8)) | rect_mask(2048, 1024, (2040, 1016, 8, 8))
    with Client(server.url, token=server.token) as client:
        for index in range(10):
            client.fill(canvas[:64, :64], rect_mask(64, 64, (8, 8, 8, 8)), variations=1, job_id=f"small-{index}")
        state = next(iter(server.server._clients.values()))
        assert len(state.finished) == 10
        for index in range(10):
            result = client.fill(canvas, mask, variations=1, job_id=f"big-{index}")
            assert result.arrays[0].shape == (1024, 2048, 4)
        kept = sum(len(frame) for _, frames in state.finished.values() for frame in frames)
        assert kept <= 64 * 2**20
        assert "big-9" in state.finished and "small-0" not in state.finished
