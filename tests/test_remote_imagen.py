"""The ``imagen`` engine against a local fake of Vertex AI's Imagen edit API (``remote_fakes``):
the request, mask polarity, edit modes, seeds, filtered images, every error, cancel, the
per-provider limit, and the real server and SDK end to end. Nothing reaches the network."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
from genfill import JobCancelled, JobFailed, LimitExceeded, fill
from genfill.protocol import ErrorCode, Mode
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines.base import EngineError, JobCancelledError
from genfill_server.engines.remote import imagen

from remote_fakes import (
    FakeImagen,
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

TOKEN = "ya29.test-token-5e1b-SECRET"
FAST = {"retries": 2, "backoff_s": 0.01, "max_retry_after_s": 1.0, "request_timeout_s": 5.0, "deadline_s": 20.0,
        "native_size": 256, "project": "studio-42"}
PATH = "/v1/projects/studio-42/locations/us-central1/publishers/google/models/imagen-3.0-capability-001:predict"


@pytest.fixture(scope="module")
def fake():
    with FakeImagen(TOKEN) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(fake):
    fake.reset()
    fake.filtered = 0
    fake.filter_plan.clear()


def engine_for(fake, limit: int = 2, **table) -> imagen.ImagenEngine:
    settings = imagen.settings_from({"base_url": fake.url, **FAST, **table}, environ={"GOOGLE_ACCESS_TOKEN": TOKEN})
    return imagen.ImagenEngine(settings, threading.BoundedSemaphore(limit))


@pytest.fixture(scope="module")
def server(fake):
    engines = provider_engines(imagen, TOKEN, base_url=fake.url, **FAST)
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        yield running


def test_the_request_has_raw_and_mask_references_and_non_zero_marks_the_edit(fake):
    result, canvas, selection = run_engine(engine_for(fake), variations=3, prompt="a red boat", steps=40)
    (request,) = fake.requests
    assert request.path == PATH and request.headers["authorization"] == f"Bearer {TOKEN}"
    body = request.json()
    (instance,) = body["instances"]
    assert instance["prompt"] == "a red boat"
    raw, mask = instance["referenceImages"]
    assert (raw["referenceType"], raw["referenceId"], mask["referenceType"], mask["referenceId"]) == (
        "REFERENCE_TYPE_RAW", 1, "REFERENCE_TYPE_MASK", 2)
    assert mask["maskImageConfig"] == {"maskMode": "MASK_MODE_USER_PROVIDED", "dilation": 0.01}
    image = decode_png(base64.b64decode(raw["referenceImage"]["bytesBase64Encoded"], validate=True))
    mask_image = decode_png(base64.b64decode(mask["referenceImage"]["bytesBase64Encoded"], validate=True))
    context = fill.context_box(selection, native_size=256)
    work = fill.target_size(context.size, 256)
    assert image.shape == (work.height, work.width, 3) and mask_image.shape == (work.height, work.width)
    edit = fill.resize(fill.crop(selection, context), work) == 255
    assert (mask_image[edit] != 0).all() and (mask_image == 0).sum() > edit.size // 2
    parameters = body["parameters"]
    assert parameters == {"editMode": "EDIT_MODE_INPAINT_INSERTION", "sampleCount": 3,
                          "outputOptions": {"mimeType": "image/png"}, "includeRaiReason": True,
                          "editConfig": {"baseSteps": 40}}
    assert len(result.layers) == 3
    assert_outside_unchanged(result, canvas, selection)


@pytest.mark.parametrize(("mode", "edit_mode", "extra"), [
    (Mode.REMOVE, "EDIT_MODE_INPAINT_REMOVAL", {}),
    (Mode.ADD, "EDIT_MODE_INPAINT_INSERTION", {}),
    (Mode.EXPAND, "EDIT_MODE_OUTPAINT", {"expand": {"bottom": 24}}),
])
def test_modes_map_to_edit_modes(fake, mode, edit_mode, extra):
    result, canvas, selection = run_engine(engine_for(fake), mode=mode, **extra)
    body = fake.requests[0].json()
    assert body["parameters"]["editMode"] == edit_mode
    assert body["instances"][0]["referenceImages"][1]["maskImageConfig"]["dilation"] == imagen.DILATION[mode]
    assert_outside_unchanged(result, canvas, selection)


def test_a_seed_is_sent_only_without_the_watermark(fake):
    run_engine(engine_for(fake, add_watermark=False, dilation=0.05, safety_setting="block_only_high"))
    parameters = fake.requests[0].json()["parameters"]
    assert (parameters["seed"], parameters["addWatermark"], parameters["safetySetting"]) == (7, False, "block_only_high")
    assert fake.requests[0].json()["instances"][0]["referenceImages"][1]["maskImageConfig"]["dilation"] == 0.05


def test_only_an_engine_without_the_watermark_is_reproducible(fake):
    assert engine_for(fake).capabilities.reproducible is False
    assert engine_for(fake, add_watermark=False).capabilities.reproducible is True


def test_settings_need_a_project():
    with pytest.raises(ValueError, match="project"):
        imagen.settings_from({}, environ={"GOOGLE_ACCESS_TOKEN": TOKEN})


# Filtered images and errors


def test_filtered_images_are_asked_for_once_more(fake):
    fake.filter_plan.append(1)
    result, _, _ = run_engine(engine_for(fake), variations=3)
    assert [r.json()["parameters"]["sampleCount"] for r in fake.requests] == [3, 1]
    assert len(result.layers) == 3


def test_every_image_filtered_is_moderated(fake):
    fake.filtered = 4
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake), variations=2)
    assert caught.value.code == ErrorCode.MODERATED and len(fake.requests) == 2


def google_error(status: int, message: str, name: str, **headers) -> Reply:
    return Reply(status, {"error": {"code": status, "message": message, "status": name}}, headers)


@pytest.mark.parametrize(("reply", "code", "requests"), [
    (google_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"),
     ErrorCode.REMOTE_AUTH_FAILED, 1),
    (google_error(403, "Permission denied on resource project studio-42.", "PERMISSION_DENIED"),
     ErrorCode.REMOTE_AUTH_FAILED, 1),
    (google_error(400, "The prompt could not be submitted. It contains sensitive words that violate Google's "
                       "Responsible AI practices.", "INVALID_ARGUMENT"), ErrorCode.MODERATED, 1),
    (google_error(400, "Image is too large.", "INVALID_ARGUMENT"), ErrorCode.ENGINE_FAILED, 1),
    (google_error(429, "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model",
                  "RESOURCE_EXHAUSTED", **{"Retry-After": "600"}), ErrorCode.RATE_LIMITED, 1),
])
def test_errors_are_typed(fake, reply, code, requests):
    fake.queue(":predict", reply)
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake))
    assert caught.value.code == code and len(fake.requests) == requests
    assert TOKEN not in caught.value.message


def test_429_and_5xx_are_retried(fake):
    fake.queue(":predict", google_error(429, "Quota exceeded", "RESOURCE_EXHAUSTED", **{"Retry-After": "0.1"}),
               google_error(503, "The service is currently unavailable.", "UNAVAILABLE"))
    run_engine(engine_for(fake))
    assert len(fake.requests) == 3


def test_5xx_past_the_retries_is_remote_unavailable(fake):
    fake.queue(":predict", *[google_error(500, "Internal error encountered.", "INTERNAL")] * 3)
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake))
    assert caught.value.code == ErrorCode.REMOTE_UNAVAILABLE


def test_timeout_and_network_down(fake):
    fake.queue(":predict", Reply(200, {"predictions": []}, delay_s=3.0))
    with pytest.raises(EngineError) as caught:
        run_engine(engine_for(fake, request_timeout_s=0.3))
    assert caught.value.code == ErrorCode.REMOTE_TIMEOUT
    settings = imagen.settings_from({**FAST, "base_url": f"http://127.0.0.1:{closed_port()}"},
                                    environ={"GOOGLE_ACCESS_TOKEN": TOKEN})
    with pytest.raises(EngineError) as caught:
        run_engine(imagen.ImagenEngine(settings, threading.BoundedSemaphore(1)))
    assert caught.value.code == ErrorCode.REMOTE_UNAVAILABLE


def test_cancel_closes_the_request(fake):
    hold = fake.hold()
    fake.queue(":predict", Reply(200, {"predictions": []}, hold=hold))
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
    wait_until(lambda: fake.in_flight == 1)
    cancel.set()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], JobCancelledError)
    wait_until(lambda: fake.closed_early == 1, 5)
    hold.set()


def test_the_limit_holds_across_jobs(fake):
    original = fake.answer

    def slow(request):
        time.sleep(0.2)
        return original(request)

    fake.answer = slow
    try:
        engine = engine_for(fake, limit=1)
        threads = [threading.Thread(target=run_engine, args=(engine,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        fake.answer = original
    assert fake.max_in_flight == 1 and len(fake.requests) == 3


# The real server and SDK


def test_models_and_a_fill_through_the_sdk(server, fake, any_client):
    catalogue = any_client.models()
    model = next(m for m in catalogue["models"] if m["engine"] == "imagen")
    assert (model["name"], model["remote"], model["host"]) == (
        "imagen-3.0-capability-001", True, fake.url.removeprefix("http://"))
    assert TOKEN not in json.dumps(catalogue)
    canvas = photo(120, 90)
    selection = selection_of(120, 90, (40, 30, 30, 20))
    result = any_client.fill(canvas, selection, "a red boat", model="imagen-3.0-capability-001", variations=2,
                             timeout_s=30)
    assert result.engine == "imagen" and len(result.arrays) == 2
    np.testing.assert_array_equal(result.composite_array(1)[selection == 0], canvas[selection == 0])


@pytest.mark.parametrize("mode", ["remove", "expand"])
def test_remove_and_expand_through_the_sdk(server, fake, any_client, mode):
    canvas = photo(100, 80)
    if mode == "expand":
        result = any_client.expand(canvas, top=20, engine="imagen", variations=1, timeout_s=30)
        np.testing.assert_array_equal(result.composite_array(0)[20:], canvas)
    else:
        selection = selection_of(100, 80, (30, 30, 20, 20))
        result = any_client.fill(canvas, selection, engine="imagen", mode="remove", variations=1, timeout_s=30)
        np.testing.assert_array_equal(result.composite_array(0)[selection == 0], canvas[selection == 0])
    assert fake.requests[0].json()["parameters"]["editMode"] == imagen.EDIT_MODES[Mode(mode)]


@pytest.mark.parametrize(("reply", "exception", "code"), [
    (google_error(401, "bad credentials", "UNAUTHENTICATED"), JobFailed, "remote_auth_failed"),
    (google_error(429, "Quota exceeded", "RESOURCE_EXHAUSTED", **{"Retry-After": "999"}), LimitExceeded,
     "rate_limited"),
])
def test_errors_reach_the_sdk_typed(server, fake, any_client, reply, exception, code):
    fake.queue(":predict", reply)
    canvas = photo(64, 64)
    with pytest.raises(exception) as caught:
        any_client.fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="imagen", variations=1, timeout_s=30)
    assert caught.value.code == code


def test_cancel_through_the_sdk(server, fake, any_client):
    hold = fake.hold()
    fake.queue(":predict", Reply(200, {"predictions": []}, hold=hold))
    canvas = photo(64, 64)
    job = any_client.submit_fill(canvas, selection_of(64, 64, (10, 10, 20, 20)), engine="imagen", variations=1)
    wait_until(lambda: fake.in_flight == 1)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(10)
    wait_until(lambda: fake.closed_early == 1, 5)
    hold.set()
