"""The ``bfl`` engine against a local fake of Black Forest Labs' API (``remote_fakes``):
submit, poll, fetch; what is sent; the polling sequences and every error; cancel; the
per-provider limit; the real server, SDK and bridge end to end. Nothing reaches the network."""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from genfill import JobCancelled, JobFailed, fill
from genfill.protocol import ErrorCode, Mode
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines.base import EngineError, JobCancelledError
from genfill_server.engines.remote import bfl

from remote_fakes import (
    FakeBFL,
    Reply,
    assert_outside_unchanged,
    closed_port,
    decode_png,
    photo,
    provider_engines,
    run_engine,
    selection_of,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin_bridge"))
import genfill_bridge as gb  # noqa: E402

KEY = "bfl-test-key-7f3a9c-SECRET"
FAST = {"retries": 2, "backoff_s": 0.01, "max_retry_after_s": 1.0, "request_timeout_s": 5.0, "deadline_s": 20.0,
        "poll_interval_s": 0.01, "native_size": 256}


@pytest.fixture(scope="module")
def fake():
    with FakeBFL(KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(fake):
    fake.reset()


def engine_for(fake, limit: int = 2, **table) -> bfl.BFLEngine:
    settings = bfl.settings_from({"base_url": fake.url, **FAST, **table}, environ={"BFL_API_KEY": KEY})
    return bfl.BFLEngine(settings, threading.BoundedSemaphore(limit))


@pytest.fixture(scope="module")
def server(fake):
    engines = provider_engines(bfl, KEY, base_url=fake.url, **FAST)
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def posts(fake):
    return [r for r in fake.requests if r.method == "POST"]


# What is sent, and the polling


def test_fill_submits_base64_image_and_white_mask_with_x_key_then_polls_and_fetches(fake):
    result, canvas, selection = run_engine(engine_for(fake), variations=2, prompt="a red boat", steps=30, guidance=20.0)
    submits = posts(fake)
    assert [r.path for r in submits] == ["/v1/flux-pro-1.0-fill"] * 2
    for request, seed in zip(sorted(submits, key=lambda r: r.json()["seed"]), (7, 8)):
        body = request.json()
        assert request.headers["x-key"] == KEY and "authorization" not in request.headers
        assert set(body) == {"image", "mask", "prompt", "seed", "steps", "guidance", "output_format",
                             "safety_tolerance", "prompt_upsampling"}
        assert (body["prompt"], body["seed"], body["steps"], body["guidance"]) == ("a red boat", seed, 30, 20.0)
        assert (body["output_format"], body["safety_tolerance"], body["prompt_upsampling"]) == ("png", 2, False)
        image = decode_png(base64.b64decode(body["image"], validate=True))
        mask = decode_png(base64.b64decode(body["mask"], validate=True))
        assert mask.ndim == 2 and mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
        # White marks the area to fill: it covers the selection, scaled like the crop.
        context = fill.context_box(selection, native_size=256)
        edit = fill.resize(fill.crop(selection, context), fill.Size(image.shape[1], image.shape[0])) == 255
        assert (mask[edit] == 255).all() and (mask == 0).sum() > edit.size // 2
    polls = [r for r in fake.requests if r.path == "/v1/get_result"]
    assert len(polls) == 2 * (fake.pending_polls + 1) and all(r.headers["x-key"] == KEY for r in polls)
    deliveries = [r for r in fake.requests if r.path.startswith("/delivery/")]
    assert len(deliveries) == 2 and all("x-key" not in r.headers for r in deliveries)
    assert len(result.layers) == 2
    assert_outside_unchanged(result, canvas, selection)


def test_an_empty_prompt_is_left_out_and_remove_sends_the_crop_prefilled(fake):
    run_engine(engine_for(fake), mode=Mode.REMOVE)
    body = posts(fake)[0].json()
    assert "prompt" not in body and "steps" not in body


def test_polling_progress_is_reported(fake):
    fake.pending_polls = 4
    steps = []
    run_engine(engine_for(fake), on_step=lambda s, t, p: steps.append((s, t)))
    assert steps[-1] == (100, 100)
    assert len({s for s, _ in steps}) >= 4  # it moved with the provider's progress


def test_expand_uses_the_expand_endpoint_with_margins(fake):
    result, canvas, selection = run_engine(engine_for(fake), mode=Mode.EXPAND, expand={"right": 40, "top": 16},
                                           size=(100, 80), box=(0, 0, 1, 1))
    (request,) = posts(fake)
    assert request.path == "/v1/flux-pro-1.0-expand"
    body = request.json()
    assert "mask" not in body and body["right"] > 0 and body["top"] > 0 and body["left"] == body["bottom"] == 0
    # The known part of the crop went, and the margins grow it back to the crop's size.
    image = decode_png(base64.b64decode(body["image"]))
    work = fill.target_size(fill.context_box(selection, native_size=256).size, 256)
    assert (image.shape[1] + body["left"] + body["right"], image.shape[0] + body["top"] + body["bottom"]) == work
    assert_outside_unchanged(result, canvas, selection)


def test_known_rectangle():
    selection = np.full((6, 8), 255, np.uint8)
    selection[1:4, 2:8] = 0
    assert bfl.known_rectangle(selection) == (1, 2, 2, 0)
    selection[2, 3] = 255
    assert bfl.known_rectangle(selection) is None
    assert bfl.known_rectangle(np.zeros((3, 3), np.uint8)) is None


@pytest.mark.parametrize(("option", "value"), [("steps", 5), ("guidance", 1.0)])
def test_an_out_of_range_option_is_refused_before_anything_is_sent(fake, option, value):
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake), **{option: value})
    assert caught.value.code == ErrorCode.INVALID_REQUEST and option in caught.value.message
    assert fake.requests == []


# Errors


def run_error(fake, **table) -> EngineError:
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake, **table))
    assert KEY not in caught.value.message
    return caught.value


@pytest.mark.parametrize(("status", "code"), [("Request Moderated", ErrorCode.MODERATED),
                                              ("Content Moderated", ErrorCode.MODERATED),
                                              ("Error", ErrorCode.ENGINE_FAILED)])
def test_a_task_that_ends_badly(fake, status, code):
    fake.final_status = status
    assert run_error(fake).code == code


def test_a_bad_key_is_remote_auth_failed(fake):
    fake.queue("/v1/flux-pro-1.0-fill", Reply(403, {"detail": "Not authenticated - Invalid Authentication"}))
    assert run_error(fake).code == ErrorCode.REMOTE_AUTH_FAILED


def test_out_of_credits_is_remote_quota_exceeded(fake):
    fake.queue("/v1/flux-pro-1.0-fill", Reply(402, {"detail": "Insufficient credits"}))
    assert run_error(fake).code == ErrorCode.REMOTE_QUOTA_EXCEEDED


def test_too_many_active_tasks_is_retried_as_retry_after_asks(fake):
    fake.queue("/v1/flux-pro-1.0-fill", Reply(429, {"detail": "too many active tasks"}, {"Retry-After": "0.2"}))
    started = time.monotonic()
    run_engine(engine_for(fake))
    assert time.monotonic() - started >= 0.2 and len(posts(fake)) == 2


def test_a_failing_poll_is_retried(fake):
    fake.queue("/v1/get_result", Reply(503, {"detail": "unavailable"}), Reply(500, {"detail": "oops"}))
    run_engine(engine_for(fake))
    assert len([r for r in fake.requests if r.path == "/v1/get_result"]) == fake.pending_polls + 3


def test_5xx_past_the_retries_is_remote_unavailable(fake):
    fake.queue("/v1/flux-pro-1.0-fill", *[Reply(500, {"detail": "oops"})] * 3)
    assert run_error(fake).code == ErrorCode.REMOTE_UNAVAILABLE and len(posts(fake)) == 3


def test_a_validation_error_carries_the_provider_s_words(fake):
    fake.queue("/v1/flux-pro-1.0-fill", Reply(422, {"detail": [{"loc": ["body", "image"], "msg": "Image too small"}]}))
    failure = run_error(fake)
    assert failure.code == ErrorCode.ENGINE_FAILED and "Image too small" in failure.message


def test_a_task_that_never_finishes_is_remote_timeout(fake):
    fake.pending_polls = 10**6
    assert run_error(fake, deadline_s=0.5).code == ErrorCode.REMOTE_TIMEOUT


def test_network_down_is_remote_unavailable():
    settings = bfl.settings_from({"base_url": f"http://127.0.0.1:{closed_port()}", **FAST}, environ={"BFL_API_KEY": KEY})
    with pytest.raises(EngineError) as caught:
        run_engine(bfl.BFLEngine(settings, threading.BoundedSemaphore(1)))
    assert caught.value.code == ErrorCode.REMOTE_UNAVAILABLE


def test_the_key_never_goes_to_a_polling_url_on_another_host(fake):
    fake.polling_host = f"http://127.0.0.2:{closed_port()}"
    failure = run_error(fake)
    assert failure.code == ErrorCode.ENGINE_FAILED and "another host" in failure.message
    assert [r.path for r in fake.requests] == ["/v1/flux-pro-1.0-fill"]


def test_regional_https_polling_hosts_are_trusted():
    from genfill_server.engines.remote._common import same_origin

    assert same_origin("https://api.us1.bfl.ai/v1/get_result?id=1", "https://api.bfl.ai", ".bfl.ai")
    assert not same_origin("http://api.us1.bfl.ai/v1/get_result?id=1", "https://api.bfl.ai", ".bfl.ai")
    assert not same_origin("https://api.bfl.ai.evil.example/x", "https://api.bfl.ai", ".bfl.ai")


# Cancel and the limit


def test_cancel_stops_polling(fake):
    fake.pending_polls = 10**6
    cancel = threading.Event()
    outcome = []

    def on_step(step, total, preview):
        if cancel.is_set():
            raise JobCancelledError("j")

    def target():
        try:
            run_engine(engine_for(fake), on_step=on_step)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    wait_until(lambda: len(fake.requests) > 3)
    cancel.set()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], JobCancelledError)
    polls = len(fake.requests)
    time.sleep(0.2)
    assert len(fake.requests) == polls


def test_no_more_than_max_concurrent_tasks_at_the_provider(fake):
    fake.pending_polls = 3
    run_engine(engine_for(fake, limit=1), variations=3)
    assert fake.max_active == 1 and len(posts(fake)) == 3
    fake.reset()
    fake.pending_polls = 20
    run_engine(engine_for(fake, limit=2), variations=3)
    assert fake.max_active == 2


# The real server, SDK and bridge


def test_models_list_the_remote_model(server, fake, any_client):
    catalogue = any_client.models()
    model = next(m for m in catalogue["models"] if m["engine"] == "bfl")
    assert (model["name"], model["remote"], model["host"]) == ("flux-pro-1.0-fill", True, fake.url.removeprefix("http://"))
    assert KEY not in json.dumps(catalogue) and KEY not in any_client.hello.model_dump_json()


@pytest.mark.parametrize("mode", ["fill", "remove"])
def test_fill_through_the_sdk(server, fake, any_client, mode):
    canvas = photo(120, 90)
    selection = selection_of(120, 90, (40, 30, 30, 20))
    result = any_client.fill(canvas, selection, "a red boat", engine="bfl", variations=2, seed=11, mode=mode,
                             timeout_s=30)
    assert result.engine == "bfl" and result.seeds == [11, 12]
    assert sorted(r.json()["seed"] for r in posts(fake)) == [11, 12]
    for index in range(2):
        composite = result.composite_array(index)
        np.testing.assert_array_equal(composite[selection == 0], canvas[selection == 0])


def test_expand_through_the_sdk(server, fake, any_client):
    canvas = photo(100, 80)
    result = any_client.expand(canvas, left=24, bottom=16, engine="bfl", variations=1, timeout_s=30)
    assert result.canvas_size == (124, 96)
    np.testing.assert_array_equal(result.composite_array(0)[:80, 24:], canvas)
    assert [r.path for r in posts(fake)] == ["/v1/flux-pro-1.0-expand"]


def test_moderated_reaches_the_sdk_typed(server, fake, any_client):
    fake.final_status = "Content Moderated"
    canvas = photo(64, 64)
    with pytest.raises(JobFailed) as caught:
        any_client.fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="bfl", variations=1, timeout_s=30)
    assert caught.value.code == "moderated"


def test_cancel_through_the_sdk_stops_polling(server, fake, any_client):
    fake.pending_polls = 10**6
    canvas = photo(64, 64)
    job = any_client.submit_fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="bfl", variations=1)
    wait_until(lambda: len(fake.requests) > 2)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(10)
    time.sleep(0.3)
    polls = len(fake.requests)
    time.sleep(0.3)
    assert len(fake.requests) == polls


def test_the_bridge_expands_with_the_remote_engine(server, fake):
    class Document(gb.Document):
        canvas = photo(60, 40)

        def size(self):
            return gb.Size(60, 40)

        def check_supported(self):
            pass

        def selection_bounds(self):
            return None

        def selection_pixels(self, box):
            raise AssertionError("expand needs no selection")

        def pixels(self, box, source):
            return self.canvas[box.y:box.bottom, box.x:box.right].tobytes()

        def insert_results(self, name, box, layers, grow):
            self.inserted = (box, layers, grow)

    settings = gb.ServerSettings(url=server.url, token=server.token)
    document = Document()
    prepared = gb.prepare(document, gb.FillOptions(mode="expand", engine="bfl", variations=1,
                                                   expand=gb.Margins(right=20)))
    result = gb.run(prepared, settings)
    gb.apply(document, prepared, result)
    box, _layers, grow = document.inserted
    assert grow == gb.Margins(right=20) and box.right <= 80
    assert [r.path for r in posts(fake)] == ["/v1/flux-pro-1.0-expand"]


def test_the_key_is_never_logged(fake, caplog):
    caplog.set_level(logging.DEBUG)
    fake.queue("/v1/flux-pro-1.0-fill", Reply(503, {"detail": f"echoing {KEY}"}))
    fake.queue("/v1/get_result", Reply(500, {"detail": "oops"}))
    run_engine(engine_for(fake))
    fake.queue("/v1/flux-pro-1.0-fill", Reply(403, {"detail": f"bad key {KEY}"}))
    with pytest.raises(EngineError):
        run_engine(engine_for(fake))
    assert "retrying" in caplog.text and KEY not in caplog.text
