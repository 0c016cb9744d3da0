"""Diffusion engines end to end: tiny models on disk, found by the registry, served by the real
server, driven by both SDK clients."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from genfill import EngineUnavailable, JobCancelled
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import default_engines

import tiny_models
from bad_input.wire import Session, submit_message
from conftest import brick_image, rect_mask, server_config

INPAINT = "tiny-inpaint"
PLAIN = "tiny-plain"


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    models = tmp_path_factory.mktemp("models")
    tiny_models.tiny_sd15_inpaint(vae_attention=False).save_pretrained(models / INPAINT)
    tiny_models.tiny_sd15(vae_attention=False).save_pretrained(models / PLAIN)
    tiny_models.tiny_sd15_controlnet().save_pretrained(models / "control_v11p_sd15_canny")
    engines = default_engines(model_dirs=[models], hf_cache=False)
    with BackgroundServer(server_config(request), engines) as running:
        yield running


def unchanged_outside(canvas, result, mask, index=0):
    composite = result.composite_array(index)
    np.testing.assert_array_equal(composite[mask == 0], canvas[mask == 0])
    return composite


def test_hello_lists_the_installed_models(any_client):
    names = {model.name for model in any_client.hello.models}
    assert {INPAINT, PLAIN} <= names
    engines = {engine.name for engine in any_client.hello.engines}
    assert {"classic", "sd_inpaint", "controlnet"} <= engines


def test_inpaint_fill_with_progress_previews_and_seeds(any_client):
    canvas = brick_image(96, 80)
    mask = rect_mask(96, 80, (60, 50, 36, 30))  # touching the right and bottom edges
    events = []
    result = any_client.fill(canvas, mask, "a window", model=INPAINT, variations=2, steps=4, seed=21,
                             on_progress=events.append)
    assert result.engine == "sd_inpaint" and result.seeds == [21, 22]
    assert result.box.right == 96 and result.box.bottom == 80
    for index in range(2):
        composite = unchanged_outside(canvas, result, mask, index)
        assert not np.array_equal(composite[mask > 0], canvas[mask > 0])
    progress = [event for event in events if event.kind == "progress"]
    assert progress[-1].step == progress[-1].total == 4
    assert any(event.preview is not None and event.preview.shape[2] == 3 for event in progress)
    again = any_client.fill(canvas, mask, "a window", model=INPAINT, variations=1, steps=4, seed=22)
    np.testing.assert_allclose(again.arrays[0].astype(int), result.arrays[1].astype(int), atol=2)


@pytest.mark.parametrize("mode", ["fill", "add", "remove"])
@pytest.mark.parametrize("model", [INPAINT, PLAIN])
def test_every_mode_on_inpaint_and_ordinary_checkpoints(server, model, mode):
    from genfill import Client

    canvas = brick_image(64, 64, seed=2)
    mask = rect_mask(64, 64, (0, 20, 17, 23))  # odd size, touching the left edge
    with Client(server.url, token=server.token) as client:
        result = client.fill(canvas, mask, "", model=model, mode=mode, variations=1, steps=2, seed=5)
    unchanged_outside(canvas, result, mask)
    assert result.box.x == 0


def test_expand_with_a_diffusion_model(any_client):
    canvas = brick_image(48, 40)
    result = any_client.expand(canvas, right=16, bottom=8, prompt="more wall", model=INPAINT, variations=1, steps=2, seed=1)
    grown = result.composite_array(0)
    assert grown.shape == (48, 64, 4)
    np.testing.assert_array_equal(grown[:40, :48], canvas)
    assert (grown[:, 48:, 3] == 255).all()


def test_soft_selection_is_kept_soft(any_client):
    canvas = brick_image(64, 64, seed=4)
    mask = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    result = any_client.fill(canvas, mask, model=INPAINT, variations=1, steps=3, seed=2)
    composite = unchanged_outside(canvas, result, mask)
    change = np.abs(composite[:, :, :3].astype(int) - canvas[:, :, :3].astype(int)).mean(axis=(0, 2))
    assert change[:16].mean() < change[48:].mean()


def test_controlnet_with_derived_and_supplied_control_images(any_client):
    canvas = brick_image(64, 64, seed=5)
    mask = rect_mask(64, 64, (16, 16, 32, 32))
    derived = any_client.fill(canvas, mask, model=INPAINT, control=["canny"], variations=1, steps=2, seed=3)
    assert derived.engine == "controlnet"
    unchanged_outside(canvas, derived, mask)
    edges = np.zeros((64, 64), np.uint8)
    edges[:, ::8] = 255
    supplied = any_client.fill(canvas, mask, model=INPAINT, control=[{"type": "canny", "image": edges}],
                               variations=1, steps=2, seed=3)
    unchanged_outside(canvas, supplied, mask)
    assert not np.array_equal(supplied.arrays[0], derived.arrays[0])


def test_preprocessor_without_weights_says_what_to_install(any_client):
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 16, 16))
    with pytest.raises(EngineUnavailable) as caught:
        any_client.fill(canvas, mask, model=INPAINT, control=["depth"], variations=1, steps=2)
    assert caught.value.code == "weights_not_installed"
    assert "depth" in str(caught.value)


def test_cancel_a_diffusion_job(client_factory):
    canvas, mask = brick_image(64, 64), rect_mask(64, 64, (8, 8, 40, 40))
    with client_factory() as client:
        job = client.submit_fill(canvas, mask, model=INPAINT, variations=1, steps=150, seed=1)
        job.cancel()
        with pytest.raises(JobCancelled):
            job.result(timeout_s=120)
        after = client.fill(canvas, mask, model=INPAINT, variations=1, steps=2, seed=1, timeout_s=120)
        unchanged_outside(canvas, after, mask)


@pytest.mark.parametrize(("builder", "engine"), [("tiny_sd3_inpaint", "sd3_inpaint"), ("tiny_flux_fill", "flux_fill")])
def test_sd3_and_flux_fill_through_the_server(tmp_path, builder, engine):
    from genfill import Client

    getattr(tiny_models, builder)().save_pretrained(tmp_path / "models" / "tiny")
    engines = default_engines(model_dirs=[tmp_path / "models"], hf_cache=False)
    assert engine in engines.specs
    canvas = brick_image(64, 64, seed=6)
    mask = rect_mask(64, 64, (40, 8, 24, 19))  # touching the right edge
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as running:
        with Client(running.url, token=running.token) as client:
            result = client.fill(canvas, mask, "a door", model="tiny", variations=2, steps=2, seed=8)
            again = client.fill(canvas, mask, "a door", model="tiny", variations=1, steps=2, seed=9)
            grown = client.expand(canvas, top=8, model="tiny", variations=1, steps=2, seed=1)
    assert result.engine == engine
    for index in range(2):
        unchanged_outside(canvas, result, mask, index)
    # A batch of two and a batch of one round differently in float32, by a level at most.
    np.testing.assert_allclose(again.arrays[0].astype(int), result.arrays[1].astype(int), atol=2)
    np.testing.assert_array_equal(grown.composite_array(0)[8:], canvas)


def test_a_control_reference_is_the_same_as_a_control_input_with_its_image(server):
    # One path for every extra image: a ControlInput's image is read as a control reference,
    # so both spellings give the same pixels (and so the same result image id).
    canvas = brick_image(64, 64, seed=5)
    mask = rect_mask(64, 64, (16, 16, 32, 32))
    edges = np.zeros((64, 64), np.uint8)
    edges[:, ::8] = 255

    async def scenario() -> tuple[dict, dict, dict]:
        session = await Session.open(server.url, server.token)
        image = await session.upload(canvas)
        selection = await session.upload(mask)
        control = await session.upload(edges)
        common = {"model": INPAINT, "variations": 1, "steps": 2, "seed": 3}
        await session.send(submit_message("input", image, selection, control=[{"type": "canny", "image": control}], **common))
        await session.send(submit_message(
            "reference", image, selection,
            references=[{"image": control, "role": "control", "control_type": "canny"}], **common,
        ))
        await session.send(submit_message(
            "small", image, selection,
            references=[{"image": await session.upload(edges[:32]), "role": "control", "control_type": "canny"}],
            **common,
        ))
        outcomes = [await session.job_outcome(job_id, timeout_s=120) for job_id in ("input", "reference", "small")]
        await session.close()
        return tuple(outcomes)

    as_input, as_reference, too_small = asyncio.run(scenario())
    assert as_input["type"] == as_reference["type"] == "result"
    assert as_input["engine"] == as_reference["engine"] == "controlnet"
    assert as_input["variations"][0]["image"] == as_reference["variations"][0]["image"]
    assert too_small["type"] == "error" and too_small["code"] == "size_mismatch"
