"""The ``openai`` engine against a local fake of OpenAI's image edits API (``remote_fakes``):
what it sends, what it makes of each answer and error, cancel, the per-provider limit, and the
real server, SDK and plug-in bridge end to end. Nothing here reaches the network."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from genfill import JobCancelled, JobFailed, LimitExceeded, Unsupported, fill
from genfill.protocol import ErrorCode, Mode
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines, providers
from genfill_server.engines.base import EngineError, JobCancelledError
from genfill_server.engines.remote import openai

from remote_fakes import (
    FakeOpenAI,
    Reply,
    assert_outside_unchanged,
    closed_port,
    decode_png,
    error,
    openai_sse,
    photo,
    provider_engines,
    run_engine,
    selection_of,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin_bridge"))
import genfill_bridge as gb  # noqa: E402

KEY = "sk-test-0123456789abcdef-SECRET"
FAST = {"retries": 2, "backoff_s": 0.01, "max_retry_after_s": 1.0, "request_timeout_s": 5.0, "deadline_s": 20.0,
        "native_size": 256}


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(fake):
    fake.reset()
    fake.partial_delay_s = 0.0


def engine_for(fake, limit: int = 2, **table) -> openai.OpenAIEngine:
    settings = openai.settings_from({"base_url": fake.url, **FAST, **table}, environ={"OPENAI_API_KEY": KEY})
    return openai.OpenAIEngine(settings, threading.BoundedSemaphore(limit))


def engines_for(url: str, **table):
    return provider_engines(openai, KEY, base_url=url, **FAST, **table)


@pytest.fixture(scope="module")
def server(fake):
    with BackgroundServer(ServerConfig(write_state_file=False), engines_for(fake.url, max_concurrent=2)) as running:
        yield running


# What is sent


def test_sends_multipart_with_bearer_key_and_mask_alpha_zero_where_it_edits(fake):
    result, canvas, selection = run_engine(engine_for(fake, stream=False), variations=2, prompt="a red boat")
    (request,) = fake.requests
    assert request.path == "/v1/images/edits"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["user-agent"].startswith("genfill/")
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert set(request.files) == {"image", "mask"}
    assert request.fields == {"model": "gpt-image-1", "prompt": "a red boat", "n": "2", "size": "1024x1024",
                              "output_format": "png"}
    image, mask = decode_png(request.files["image"]), decode_png(request.files["mask"])
    assert image.shape == (1024, 1024, 3) and mask.shape == (1024, 1024, 4)
    # Only the context crop went, scaled to the API size; the edit area (alpha 0) covers the
    # selection and nothing far from it, and the pixels kept are the crop's.
    context = fill.context_box(selection, native_size=256)
    to_api = fill.resize(np.ascontiguousarray(fill.crop(canvas, context)[..., :3]), fill.Size(1024, 1024))
    edit = fill.resize(fill.crop(selection, context), fill.Size(1024, 1024)) == 255
    far = fill.resize(fill.crop(selection, context), fill.Size(1024, 1024)) == 0
    far[:] = ndimage_free_erode(far, 40)
    assert (mask[..., 3][edit] == 0).all() and (mask[..., 3][far] == 255).all()
    assert set(np.unique(mask[..., 3])) == {0, 255}
    difference = np.abs(image.astype(int) - to_api.astype(int))[far]  # resampled twice (band, then API size)
    assert difference.mean() < 1 and difference.max() <= 8
    assert len(result.layers) == 2
    assert_outside_unchanged(result, canvas, selection)


def test_provider_options_are_sent_as_configured(fake):
    run_engine(engine_for(fake, stream=False, quality="high", background="opaque", input_fidelity="high",
                          models=["gpt-image-1.5"]))
    fields = fake.requests[0].fields
    assert (fields["quality"], fields["background"], fields["input_fidelity"], fields["model"]) == (
        "high", "opaque", "high", "gpt-image-1.5")


def test_an_empty_prompt_becomes_the_mode_s_instruction_and_remove_sends_no_object(fake):
    canvas_selection = {"size": (96, 80), "box": (30, 20, 24, 18)}
    run_engine(engine_for(fake, stream=False), mode=Mode.REMOVE, **canvas_selection)
    request = fake.requests[0]
    assert request.fields["prompt"] == openai.DEFAULT_PROMPTS[Mode.REMOVE]


@pytest.mark.parametrize(("width", "height", "expected"), [(96, 80, "1024x1024"), (200, 100, "1536x1024"),
                                                            (60, 140, "1024x1536")])
def test_the_api_size_follows_the_crop_s_aspect(fake, width, height, expected):
    box = (width // 3, height // 3, width // 3, height // 3)
    run_engine(engine_for(fake, stream=False), size=(width, height), box=box)
    assert fake.requests[0].fields["size"] == expected


def test_streamed_partial_images_become_previews(fake):
    steps = []
    result, canvas, selection = run_engine(
        engine_for(fake, partial_images=2), variations=2, on_step=lambda s, t, p: steps.append((s, t, p))
    )
    assert len(fake.requests) == 2
    assert all(r.fields["stream"] == "true" and r.fields["partial_images"] == "2" and r.fields["n"] == "1"
               for r in fake.requests)
    previews = [p for _, _, p in steps if p is not None]
    assert len(previews) == 4 and all(p.dtype == np.uint8 and p.ndim == 3 and max(p.shape) <= 256 for p in previews)
    assert steps[-1][:2] == (6, 6)
    assert_outside_unchanged(result, canvas, selection)


def ndimage_free_erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` shrunk by ``radius`` pixels (a square), in numpy alone."""
    padded = np.pad(mask, radius, constant_values=True)
    out = np.ones_like(mask)
    for dy in (-radius, 0, radius):
        for dx in (-radius, 0, radius):
            out &= padded[radius + dy : radius + dy + mask.shape[0], radius + dx : radius + dx + mask.shape[1]]
    return out


# Errors


def run_error(fake, *replies, **table) -> EngineError:
    fake.queue("/v1/images/edits", *replies)
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake, stream=False, **table))
    assert KEY not in caught.value.message
    return caught.value


def test_a_bad_key_is_remote_auth_failed_without_the_provider_s_message(fake):
    failure = run_error(fake, error(401, f"Incorrect API key provided: {KEY[:8]}***", "invalid_api_key"))
    assert failure.code == ErrorCode.REMOTE_AUTH_FAILED and "127.0.0.1" in failure.message
    assert "Incorrect" not in failure.message and len(fake.requests) == 1


def test_403_is_remote_auth_failed(fake):
    assert run_error(fake, error(403, "forbidden")).code == ErrorCode.REMOTE_AUTH_FAILED


def test_out_of_credits_is_remote_quota_exceeded(fake):
    assert run_error(fake, error(429, "You exceeded your current quota", "insufficient_quota")).code == (
        ErrorCode.REMOTE_QUOTA_EXCEEDED)
    assert run_error(fake, error(402, "pay")).code == ErrorCode.REMOTE_QUOTA_EXCEEDED


def test_moderation_is_moderated_with_the_provider_s_reason(fake):
    failure = run_error(fake, error(400, "Your request was rejected by the safety system.", "moderation_blocked"))
    assert failure.code == ErrorCode.MODERATED and "safety system" in failure.message


def test_429_retry_after_is_honoured_then_the_job_succeeds(fake):
    fake.queue("/v1/images/edits", error(429, "slow down", None, **{"Retry-After": "0.3"}))
    started = time.monotonic()
    run_engine(engine_for(fake, stream=False))
    assert time.monotonic() - started >= 0.3
    assert len(fake.requests) == 2


def test_a_retry_after_past_the_bound_fails_at_once(fake):
    failure = run_error(fake, error(429, "slow down", None, **{"Retry-After": "120"}))
    assert failure.code == ErrorCode.RATE_LIMITED and "120 s" in failure.message
    assert len(fake.requests) == 1


def test_429_past_the_retries_is_rate_limited(fake):
    failure = run_error(fake, *[error(429, "slow down", None, **{"Retry-After": "0"})] * 3)
    assert failure.code == ErrorCode.RATE_LIMITED and len(fake.requests) == 3


def test_5xx_is_retried_with_backoff_then_succeeds(fake):
    fake.queue("/v1/images/edits", error(500, "boom"), error(503, "busy"))
    started = time.monotonic()
    run_engine(engine_for(fake, stream=False, backoff_s=0.1))
    assert len(fake.requests) == 3
    assert time.monotonic() - started >= 0.1 + 0.2  # doubling waits


def test_5xx_past_the_retries_is_remote_unavailable(fake):
    failure = run_error(fake, *[error(502, "bad gateway")] * 3)
    assert failure.code == ErrorCode.REMOTE_UNAVAILABLE and len(fake.requests) == 3


def test_a_provider_that_does_not_answer_in_time_is_remote_timeout(fake):
    started = time.monotonic()
    failure = run_error(fake, Reply(200, {"data": []}, delay_s=3.0), request_timeout_s=0.3)
    assert failure.code == ErrorCode.REMOTE_TIMEOUT and time.monotonic() - started < 2.5


def test_a_job_past_its_deadline_is_remote_timeout(fake):
    fake.partial_delay_s = 0.5
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake, deadline_s=0.4, partial_images=3))
    assert caught.value.code == ErrorCode.REMOTE_TIMEOUT


def test_network_down_is_remote_unavailable_after_retries():
    settings = openai.settings_from({"base_url": f"http://127.0.0.1:{closed_port()}", **FAST},
                                    environ={"OPENAI_API_KEY": KEY})
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        run_engine(openai.OpenAIEngine(settings, threading.BoundedSemaphore(1)))
    assert caught.value.code == ErrorCode.REMOTE_UNAVAILABLE and "network" in caught.value.message
    assert time.monotonic() - started < 5


def test_an_error_event_in_the_stream_is_mapped(fake):
    fake.queue("/v1/images/edits", openai_sse(("error", {"type": "error", "error": {
        "code": "moderation_blocked", "message": "rejected by the safety system"}})))
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake))
    assert caught.value.code == ErrorCode.MODERATED


def test_a_stream_without_its_image_is_engine_failed(fake):
    fake.queue("/v1/images/edits", openai_sse())
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake))
    assert caught.value.code == ErrorCode.ENGINE_FAILED


# Cancel and the per-provider limit


def test_cancel_closes_the_request_in_flight(fake):
    hold = fake.hold()
    fake.queue("/v1/images/edits", Reply(200, {"data": []}, hold=hold))
    cancel = threading.Event()

    def on_step(step, total, preview):
        if cancel.is_set():
            raise JobCancelledError("j")

    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(lambda: run_engine(engine_for(fake, stream=False),
                                                                                      on_step=on_step))))
    thread.start()
    wait_until(lambda: fake.in_flight == 1)
    cancel.set()
    started = time.monotonic()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert isinstance(outcome[0], JobCancelledError)
    wait_until(lambda: fake.closed_early == 1, 5)
    hold.set()


def _catch(function):
    try:
        return function()
    except BaseException as exc:  # noqa: BLE001
        return exc


def test_no_more_than_max_concurrent_requests_reach_the_provider(fake):
    hold = fake.hold()
    engine = engine_for(fake, limit=2, stream=False)
    # Each job's request waits at the fake until released.
    original = fake.answer

    def held(request):
        hold.wait(10)
        return original(request)

    fake.answer = held
    try:
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(_catch(lambda: run_engine(engine)))) for _ in range(5)]
        for thread in threads:
            thread.start()
        wait_until(lambda: fake.in_flight == 2)
        time.sleep(0.3)
        assert fake.in_flight == 2 and len(fake.requests) == 2
        hold.set()
        for thread in threads:
            thread.join(20)
    finally:
        fake.answer = original
    assert fake.max_in_flight == 2 and len(fake.requests) == 5
    assert not any(isinstance(outcome, BaseException) for outcome in outcomes)


# The real server, SDK and bridge


def test_off_by_default(fake):
    engines = default_engines(hf_cache=False, providers={"classic": providers.classic, "openai": openai.provide})
    assert "openai" not in engines.specs


def test_models_list_the_remote_model_with_its_host_and_no_key(server, fake, any_client):
    catalogue = any_client.models()
    (model,) = [m for m in catalogue["models"] if m["engine"] == "openai"][:1]
    assert model["remote"] is True and model["host"] == fake.url.removeprefix("http://")
    assert model["name"] == "gpt-image-1" and model["source"] == "remote"
    assert KEY not in json.dumps(catalogue)
    hello_models = {m.name: m for m in any_client.hello.models}
    assert hello_models["gpt-image-1"].remote and hello_models["gpt-image-1"].host == model["host"]
    assert KEY not in any_client.hello.model_dump_json()


@pytest.mark.parametrize("mode", ["fill", "remove"])
def test_fill_through_the_sdk_is_bit_identical_outside_the_selection(server, fake, any_client, mode):
    canvas = photo(120, 90)
    selection = selection_of(120, 90, (40, 30, 30, 20))
    result = any_client.fill(canvas, selection, "a red boat" if mode == "fill" else "", model="gpt-image-1",
                             variations=2, mode=mode, timeout_s=30)
    assert result.engine == "openai" and len(result.arrays) == 2
    for index in range(2):
        composite = result.composite_array(index)
        np.testing.assert_array_equal(composite[selection == 0], canvas[selection == 0])
        # Inside, the provider's paint (colour matched to the context) shows.
        assert not np.array_equal(composite[selection == 255], canvas[selection == 255])
    assert all(r.path == "/v1/images/edits" for r in fake.requests)
    # The API takes no seed: the result says its recorded seeds cannot bring it back.
    assert "seed_not_reproducible" in [warning.code for warning in result.warnings]


def test_expand_through_the_sdk(server, fake, any_client):
    canvas = photo(100, 80)
    result = any_client.expand(canvas, right=40, engine="openai", variations=1, timeout_s=30)
    assert result.canvas_size == (140, 80)
    np.testing.assert_array_equal(result.composite_array(0)[:, :100], canvas)


def test_an_option_the_provider_lacks_is_refused_before_anything_is_sent(server, fake, any_client):
    canvas = photo(64, 64)
    with pytest.raises(Unsupported, match="steps"):
        any_client.fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="openai", steps=20, timeout_s=30)
    assert fake.requests == []


@pytest.mark.parametrize(("reply", "exception", "code"), [
    (error(401, "bad key", "invalid_api_key"), JobFailed, "remote_auth_failed"),
    (error(400, "rejected", "moderation_blocked"), JobFailed, "moderated"),
    (error(429, "slow", None, **{"Retry-After": "3600"}), LimitExceeded, "rate_limited"),
])
def test_provider_errors_reach_the_sdk_typed(server, fake, any_client, reply, exception, code):
    fake.queue("/v1/images/edits", reply)
    canvas = photo(64, 64)
    with pytest.raises(exception) as caught:
        any_client.fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="openai", variations=1, timeout_s=30)
    assert caught.value.code == code and KEY not in str(caught.value)


def test_cancel_through_the_sdk_stops_the_request(server, fake, any_client):
    hold = fake.hold()
    fake.queue("/v1/images/edits", Reply(200, {"data": []}, hold=hold))
    canvas = photo(64, 64)
    job = any_client.submit_fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="openai", variations=1)
    wait_until(lambda: fake.in_flight == 1)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(10)
    # The request was closed, not left waiting for an answer no one reads.
    wait_until(lambda: fake.closed_early == 1, 5)
    hold.set()


def test_a_slow_provider_does_not_hold_up_local_jobs(server, fake, any_client):
    hold = fake.hold()
    fake.queue("/v1/images/edits", Reply(200, {"data": []}, hold=hold))
    canvas = photo(64, 64)
    selection = selection_of(64, 64, (10, 10, 20, 20))
    remote = any_client.submit_fill(canvas, selection, engine="openai", variations=1)
    wait_until(lambda: fake.in_flight == 1)
    local = any_client.fill(canvas, selection, engine="classic", variations=1, timeout_s=30)
    assert local.engine == "classic" and fake.in_flight == 1
    remote.cancel()
    hold.set()


def test_the_key_is_never_logged(server, fake, any_client, caplog):
    caplog.set_level(logging.DEBUG)
    canvas = photo(64, 64)
    selection = selection_of(64, 64, (10, 10, 20, 20))
    any_client.fill(canvas, selection, engine="openai", variations=1, timeout_s=30)
    fake.queue("/v1/images/edits", error(500, "boom"), error(401, f"Incorrect API key provided: {KEY}"))
    with pytest.raises(JobFailed):
        any_client.fill(canvas, selection, engine="openai", variations=1, timeout_s=30)
    assert caplog.records and KEY not in caplog.text


def test_the_bridge_fills_with_the_remote_model(server, fake):
    class Document(gb.Document):
        def __init__(self):
            self.canvas = photo(80, 60)
            self.selection = selection_of(80, 60, (20, 15, 30, 20))
            self.inserted = []

        def size(self):
            return gb.Size(80, 60)

        def check_supported(self):
            pass

        def selection_bounds(self):
            return gb.Box(20, 15, 30, 20)

        def selection_pixels(self, box):
            return self.selection[box.y:box.bottom, box.x:box.right].tobytes()

        def pixels(self, box, source):
            return self.canvas[box.y:box.bottom, box.x:box.right].tobytes()

        def insert_results(self, name, box, layers, grow):
            self.inserted.append((box, layers))

    settings = gb.ServerSettings(url=server.url, token=server.token)
    catalogue = gb.fetch_catalogue(settings)
    remote = [m for m in catalogue["models"] if m.get("remote")]
    assert remote and remote[0]["host"] == fake.url.removeprefix("http://")
    # What a plug-in asks to mark a choice that sends the image away.
    assert gb.remote_host(catalogue, model="gpt-image-1") == remote[0]["host"]
    assert gb.remote_host(catalogue, engine="openai") == remote[0]["host"]
    assert gb.remote_host(catalogue, engine="classic") is None
    assert gb.remote_host(catalogue) is None  # the default engine is classic
    document = Document()
    # The fake answers every variation with the same image: one frame serves both.
    prepared = gb.prepare(document, gb.FillOptions(prompt="a boat", model="gpt-image-1", variations=2))
    result = gb.run(prepared, settings)
    gb.apply(document, prepared, result)
    (box, layers), = document.inserted
    assert len(layers) == 2
    for data in layers:
        layer = np.frombuffer(data, np.uint8).reshape(box.height, box.width, 4)
        outside = document.selection[box.y:box.bottom, box.x:box.right] == 0
        assert (layer[outside][:, 3] == 0).all() and (layer[~outside][:, 3] > 0).any()


def test_partial_images_reach_the_sdk_as_previews(server, fake, any_client):
    fake.partial_delay_s = 0.3  # the server sends a preview at most every 0.25 s
    canvas = photo(64, 64)
    job = any_client.submit_fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="openai", variations=1)
    previews = [event.preview for event in job if event.kind == "progress" and event.preview is not None]
    assert len(previews) >= 2 and all(p.ndim == 3 and p.shape[2] == 3 for p in previews)
    assert job.result(10).engine == "openai"
