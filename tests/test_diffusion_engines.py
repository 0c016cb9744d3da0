"""Diffusion engines on tiny random-weight pipelines: 2 steps at 64x64 on the CPU.

The pipelines come from ``tiny_models`` (built in code, nothing downloaded). Random weights
make the pictures meaningless, so the tests assert what the engines promise: shapes, a slice
recorded from a first run, determinism per seed, variations equal to single runs, soft masks
giving a gradient of change, cancel within one step, progress and previews, every mode and
scheduler, ControlNet, and bit-identical pixels outside the selection through ``run_fill``.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch
from genfill import fill
from genfill.protocol import ControlInput, FillRequest, Margins, Mode
from genfill_server.engines.base import EngineError, EngineJob, EngineOptions, JobCancelledError
from genfill_server.engines.controlnet import ControlNetEngine, control_image
from genfill_server.engines.flux_fill import FluxFillEngine
from genfill_server.engines.prefill import extend_edges, prefill, pull_push
from genfill_server.engines.sd3_inpaint import SD3InpaintEngine
from genfill_server.engines.sd_inpaint import SCHEDULERS, SDInpaintEngine, make_scheduler, noise_coefficients
from genfill_server.pipeline import prepare_canvas, run_fill

import tiny_models

SIZE = 64
IMAGE_ID = "0" * 64
MASK_ID = "1" * 64


def _image(size: int = SIZE) -> np.ndarray:
    """A smooth, structured test picture: gradients and a bright square."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.dstack([(xx * 255) // size, (yy * 255) // size, ((xx + yy) * 127) // size]).astype(np.uint8)
    image[size // 4 : size // 2, size // 8 : size // 2] = 230
    return image


def _square_selection(size: int = SIZE) -> np.ndarray:
    selection = np.zeros((size, size), np.uint8)
    selection[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return selection


def _job(seeds, selection=None, image=None, **options) -> EngineJob:
    selection = _square_selection() if selection is None else selection
    options = {"mode": "fill", "prompt": "a cat", "steps": 2, **options}
    return EngineJob(
        image=_image() if image is None else image,
        selection=selection,
        denoise_mask=selection,
        seeds=list(seeds),
        options=EngineOptions.of(**options),
    )


def _ignore(step, total, preview):
    pass


@pytest.fixture(scope="module")
def sd15_inpaint() -> SDInpaintEngine:
    engine = SDInpaintEngine(functools.partial(tiny_models.tiny_sd15_inpaint, vae_attention=False))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def sd15_plain() -> SDInpaintEngine:
    engine = SDInpaintEngine(functools.partial(tiny_models.tiny_sd15, vae_attention=False))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def controlnet_engine() -> ControlNetEngine:
    engine = ControlNetEngine(
        tiny_models.tiny_sd15_inpaint,
        {kind: tiny_models.tiny_sd15_controlnet for kind in ("canny", "lineart_standard", "shuffle", "depth", "inpaint")},
    )
    engine.load()
    return engine


# SD 1.5 inpainting


def test_native_size_and_family_come_from_the_model(sd15_inpaint):
    # sample_size 32 x VAE scale factor 2 (SD1.5 proper: 64 x 8 = 512).
    assert sd15_inpaint.native_size == 64
    assert sd15_inpaint.family == "sd15"
    assert sd15_inpaint.is_inpaint_model


def test_sd15_inpaint_shapes_slice_and_determinism(sd15_inpaint):
    first = sd15_inpaint.run(_job([3, 4]), _ignore)
    again = sd15_inpaint.run(_job([3, 4]), _ignore)
    assert [image.shape for image in first] == [(SIZE, SIZE, 3)] * 2
    assert all(image.dtype == np.uint8 for image in first)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert np.abs(first[0].astype(int) - first[1]).mean() > 1, "different seeds gave the same image"
    # Recorded from a first run (diffusers' convention); guards against silent loop changes.
    expected = np.array([[129, 82, 245], [47, 78, 98], [132, 207, 152]])
    np.testing.assert_allclose(first[0][32, 30:33].astype(int), expected, atol=4)


def test_variation_equals_single_run_with_its_seed(sd15_inpaint):
    batch = sd15_inpaint.run(_job([11, 12, 13], scheduler="euler_a"), _ignore)
    single = sd15_inpaint.run(_job([12], scheduler="euler_a"), _ignore)
    assert np.abs(batch[1].astype(int) - single[0]).max() <= 2


def _final_latents(engine, job) -> torch.Tensor:
    """Runs ``job`` and returns the latents the engine hands the VAE decoder."""
    captured = []
    handle = engine.pipeline.vae.decoder.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    try:
        engine.run(job, _ignore)
    finally:
        handle.remove()
    return captured[0]


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def test_soft_mask_gives_a_gradient_of_change(sd15_inpaint):
    # Measured on the latents: a random VAE decoder saturates and mixes pixels, so pixel
    # differences say more about it than about the engine. 0 to 255 from left to right.
    gradient = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8), (SIZE, 1))
    options = {"steps": 8, "scheduler": "ddim", "prompt": ""}
    reference = _final_latents(sd15_inpaint, _job([5], selection=np.zeros((SIZE, SIZE), np.uint8), **options))
    changed = _final_latents(sd15_inpaint, _job([5], selection=gradient, **options))
    change = (changed - reference).abs().mean(dim=(0, 1, 2)).numpy()
    mask_value = np.linspace(0, 1, change.shape[0])
    # A monotone trend: change rises with the mask value (rank correlation), and the most
    # selected quarter changes clearly more than the least selected one.
    assert np.corrcoef(_ranks(mask_value), _ranks(change))[0, 1] > 0.5
    quarter = change.shape[0] // 4
    assert change[-quarter:].mean() > 1.3 * change[:quarter].mean()


def test_cancel_stops_within_one_step_and_propagates(sd15_inpaint):
    calls = {"total": 0, "after_cancel": 0}
    cancelled = {"flag": False}

    def count(module, args, output):
        if cancelled["flag"]:
            calls["after_cancel"] += 1
        calls["total"] += 1
        if calls["total"] == 2:
            # The cancel request arrives while the second step's UNet call runs.
            cancelled["flag"] = True

    def on_step(step, total, preview):
        if cancelled["flag"]:
            raise JobCancelledError()

    handle = sd15_inpaint.pipeline.unet.register_forward_hook(count)
    try:
        with pytest.raises(JobCancelledError):
            sd15_inpaint.run(_job([1, 2], steps=10), on_step)
    finally:
        handle.remove()
    assert calls["total"] == 2
    assert calls["after_cancel"] <= 1


def test_progress_counts_every_step_and_carries_previews(sd15_inpaint):
    events = []
    sd15_inpaint.run(_job([1], steps=4), lambda step, total, preview: events.append((step, total, preview)))
    assert [(step, total) for step, total, _ in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    previews = [preview for _, _, preview in events if preview is not None]
    assert previews, "no preview delivered"
    assert previews[-1].shape == (SIZE // 2, SIZE // 2, 3) and previews[-1].dtype == np.uint8


def test_progress_spans_chunks_when_the_batch_is_limited(sd15_inpaint):
    events = []
    sd15_inpaint.max_batch = 1
    try:
        images = sd15_inpaint.run(_job([1, 2], steps=2), lambda step, total, preview: events.append((step, total)))
    finally:
        sd15_inpaint.max_batch = None
    assert events == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(images) == 2


@pytest.mark.parametrize("mode", ["fill", "add", "remove", "expand"])
def test_every_mode_runs(sd15_inpaint, mode):
    image = _image()
    selection = _square_selection()
    if mode == "expand":
        # What expand hands the engine: a margin of new, black pixels that is all selected.
        selection = np.zeros((SIZE, SIZE), np.uint8)
        selection[:, 40:] = 255
        image = image.copy()
        image[:, 40:] = 0
    out = sd15_inpaint.run(_job([7], selection=selection, image=image, mode=mode), _ignore)
    assert out[0].shape == (SIZE, SIZE, 3) and out[0].dtype == np.uint8


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs_and_is_deterministic(sd15_inpaint, scheduler):
    first = sd15_inpaint.run(_job([9], scheduler=scheduler), _ignore)[0]
    second = sd15_inpaint.run(_job([9], scheduler=scheduler), _ignore)[0]
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("start", [0, 3])
def test_noise_coefficients_reproduce_add_noise_at_every_step(scheduler, start):
    # The denoising loop re-noises the kept latents with these instead of add_noise; they
    # must follow the scheduler's state (step index, begin index) as add_noise does.
    config = tiny_models.tiny_sd15_inpaint().scheduler.config
    runner = make_scheduler(scheduler, config)
    runner.set_timesteps(8)
    timesteps = runner.timesteps[start * runner.order :]
    if hasattr(runner, "set_begin_index"):
        runner.set_begin_index(start * runner.order)
    generator = torch.Generator().manual_seed(0)
    x0, noise, latents = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    for t in timesteps:
        expected = runner.add_noise(x0, noise, t.reshape(1).repeat(2))
        # Schedules on the meta device have no values: reading them would raise, so the
        # coefficients come from the host copy alone, as on a GPU they must.
        host, runner.timesteps = runner.timesteps, runner.timesteps.to("meta")
        keep_scale, noise_scale = noise_coefficients(runner, t.reshape(1), host)
        assert runner.timesteps.device.type == "meta"
        runner.timesteps = host
        torch.testing.assert_close(x0 * keep_scale + noise * noise_scale, expected, rtol=1e-6, atol=1e-6)
        extra = {"generator": generator} if "generator" in inspect.signature(runner.step).parameters else {}
        latents = runner.step(torch.randn(2, 4, 8, 8, generator=generator), t, latents, **extra).prev_sample


def test_unknown_scheduler_is_a_request_error(sd15_inpaint):
    with pytest.raises(EngineError) as caught:
        sd15_inpaint.run(_job([1], scheduler="heun"), _ignore)
    assert caught.value.code == "invalid_request"


def test_strength_below_one_runs_fewer_steps(sd15_inpaint):
    events = []
    sd15_inpaint.run(_job([1], steps=4, strength=0.5), lambda step, total, preview: events.append(total))
    assert events == [2, 2]


# Ordinary checkpoints and SDXL


def test_four_channel_checkpoint_fills_by_latent_blending(sd15_plain):
    assert not sd15_plain.is_inpaint_model
    first = sd15_plain.run(_job([3]), _ignore)[0]
    assert first.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, sd15_plain.run(_job([3]), _ignore)[0])
    # The reference encodes the same pre-filled picture with nothing selected.
    prefilled = prefill(_image(), _square_selection(), "fill")
    reference = _final_latents(sd15_plain, _job([3], image=prefilled, selection=np.zeros((SIZE, SIZE), np.uint8)))
    filled = _final_latents(sd15_plain, _job([3]))
    # Latent cells outside the mask end as the original's latents exactly; inside they are new.
    inside = torch.zeros(SIZE // 2, SIZE // 2, dtype=torch.bool)
    inside[8:24, 8:24] = True
    torch.testing.assert_close(filled[..., ~inside], reference[..., ~inside], rtol=0, atol=0)
    assert (filled[..., inside] - reference[..., inside]).abs().mean() > 0.1


@pytest.mark.parametrize("builder", [tiny_models.tiny_sdxl_inpaint, tiny_models.tiny_sdxl])
def test_sdxl(builder):
    engine = SDInpaintEngine(builder)
    engine.load()
    assert engine.family == "sdxl" and engine.native_size == 64
    first = engine.run(_job([2, 3], guidance=5.0), _ignore)
    second = engine.run(_job([3], guidance=5.0), _ignore)
    assert [image.shape for image in first] == [(SIZE, SIZE, 3)] * 2
    assert np.abs(first[1].astype(int) - second[0]).max() <= 2


# ControlNet


def test_preprocessors_without_weights_give_control_images():
    image = _image()
    for kind in ("canny", "lineart_standard", "shuffle"):
        control = control_image(kind, image)
        assert control.shape == (SIZE, SIZE, 3) and control.dtype == np.uint8
        assert control.max() > control.min(), kind
    np.testing.assert_array_equal(control_image("shuffle", image), control_image("shuffle", image))


@pytest.mark.parametrize("kind", ["canny", "lineart_standard", "shuffle"])
def test_controlnet_guides_the_fill(controlnet_engine, kind):
    without = controlnet_engine.run(_job([4], control=[{"type": kind, "strength": 0.0}]), _ignore)[0]
    guided = controlnet_engine.run(_job([4], control=[{"type": kind, "strength": 1.0}]), _ignore)[0]
    assert guided.shape == (SIZE, SIZE, 3)
    assert np.abs(guided.astype(int) - without).mean() > 1


def test_controlnet_takes_a_given_control_image(controlnet_engine):
    derived = controlnet_engine.run(_job([4], control=[{"type": "canny"}]), _ignore)[0]
    edges = control_image("canny", _image())
    given = controlnet_engine.run(_job([4], control=[{"type": "canny", "image": edges}]), _ignore)[0]
    np.testing.assert_array_equal(derived, given)
    blank = controlnet_engine.run(_job([4], control=[{"type": "canny", "image": np.zeros((32, 32), np.uint8)}]), _ignore)[0]
    assert np.abs(blank.astype(int) - given).mean() > 0.01


def test_controlnet_stacks_controls_with_start_and_end(controlnet_engine):
    controls = [{"type": "inpaint"}, {"type": "canny", "start": 0.5, "end": 1.0, "strength": 0.8}]
    out = controlnet_engine.run(_job([4], control=controls), _ignore)
    assert out[0].shape == (SIZE, SIZE, 3)


def test_depth_without_annotator_weights_names_what_to_install(controlnet_engine):
    with pytest.raises(EngineError) as caught:
        controlnet_engine.run(_job([4], control=[{"type": "depth"}]), _ignore)
    assert caught.value.code == "weights_not_installed"
    assert "lllyasviel/Annotators" in str(caught.value)


def test_depth_with_its_own_control_image_needs_no_annotator(controlnet_engine):
    depth = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
    out = controlnet_engine.run(_job([4], control=[{"type": "depth", "image": depth}]), _ignore)
    assert out[0].shape == (SIZE, SIZE, 3)


def test_control_type_without_a_controlnet_is_weights_not_installed(controlnet_engine):
    with pytest.raises(EngineError) as caught:
        controlnet_engine.run(_job([4], control=[{"type": "pose"}]), _ignore)
    assert caught.value.code == "weights_not_installed"


# SD3 and Flux Fill (flow matching, wrapped pipelines); 30x30 checks the padding to 16


def _flow_engines():
    return [
        pytest.param(lambda: SD3InpaintEngine(tiny_models.tiny_sd3_inpaint), id="sd3"),
        pytest.param(
            lambda: FluxFillEngine(tiny_models.tiny_flux_fill, native_size=32, max_sequence_length=16), id="flux_fill"
        ),
    ]


@pytest.mark.parametrize("make", _flow_engines())
def test_flow_engines(make):
    engine = make()
    engine.load()
    assert engine.native_size == 32
    image, selection = _image(30), _square_selection(30)
    job = EngineJob(image, selection, selection, [1, 2], EngineOptions.of(mode="fill", prompt="a cat", steps=3))
    events = []
    batch = engine.run(job, lambda step, total, preview: events.append((step, total, preview)))
    assert [image.shape for image in batch] == [(30, 30, 3)] * 2
    assert [(step, total) for step, total, _ in events] == [(1, 3), (2, 3), (3, 3)]
    assert events[-1][2] is not None and events[-1][2].dtype == np.uint8
    single = engine.run(EngineJob(image, selection, selection, [2], EngineOptions.of(prompt="a cat", steps=3)), _ignore)
    assert np.abs(batch[1].astype(int) - single[0]).max() <= 2

    calls = []

    def cancel(step, total, preview):
        raise JobCancelledError()

    handle = engine.pipeline.transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with pytest.raises(JobCancelledError):
            engine.run(job, cancel)
    finally:
        handle.remove()
    assert len(calls) == 1
    with pytest.raises(EngineError) as caught:
        engine.run(EngineJob(image, selection, selection, [1], EngineOptions.of(scheduler="ddim")), _ignore)
    assert caught.value.code == "invalid_request"


# Pre-fill


def test_prefill_by_mode_keeps_unselected_pixels():
    image = _image()
    selection = _square_selection()
    hole = selection >= 128
    for mode in ("fill", "expand", "add", "remove"):
        out = prefill(image, selection, mode)
        np.testing.assert_array_equal(out[~hole], image[~hole])
        assert not np.array_equal(out[hole], image[hole]), mode
    assert (prefill(image, selection, "add")[hole] == 127).all()


def test_edge_extension_copies_the_nearest_known_pixel():
    image = np.zeros((6, 8, 3), np.uint8)
    image[:, :4] = np.arange(6, dtype=np.uint8)[:, None, None] * 40
    hole = np.zeros((6, 8), bool)
    hole[:, 4:] = True
    out = extend_edges(image, hole)
    np.testing.assert_array_equal(out[:, 7], image[:, 3])


def test_pull_push_fills_with_the_surroundings():
    image = np.full((16, 16, 3), 200, np.uint8)
    hole = np.zeros((16, 16), bool)
    hole[4:12, 4:12] = True
    image[hole] = 0
    assert (pull_push(image, hole)[hole] == 200).all()


# Through the fill pipeline


def _composite_all(canvas, result):
    return [fill.composite(canvas, layer, result.box) for layer in result.layers]


def test_run_fill_keeps_pixels_outside_the_selection_bit_identical(sd15_inpaint):
    rng = np.random.default_rng(1)
    canvas = np.dstack([rng.integers(0, 256, (80, 96, 3), dtype=np.uint8), np.full((80, 96), 255, np.uint8)])
    selection = np.zeros((80, 96), np.uint8)
    selection[30:50, 40:70] = 255
    request = FillRequest(image=IMAGE_ID, mask=MASK_ID, prompt="a cat", steps=2, variations=2, seed=5)
    canvas, selection = prepare_canvas(request, canvas, selection)
    events = []
    result = run_fill(sd15_inpaint, request, canvas, selection, [5, 6], lambda *event: events.append(event))
    assert len(result.layers) == 2 and events
    for composed in _composite_all(canvas, result):
        outside = selection == 0
        np.testing.assert_array_equal(composed[outside], canvas[outside])
        assert not np.array_equal(composed[~outside], canvas[~outside])


def test_run_fill_expand_keeps_the_original_pixels(sd15_inpaint):
    original = np.dstack([_image(48), np.full((48, 48), 255, np.uint8)])
    request = FillRequest(
        image=IMAGE_ID, mode=Mode.EXPAND, expand=Margins(right=16, bottom=8), steps=2, variations=1,
        scheduler="euler",
    )
    canvas, selection = prepare_canvas(request, original, None)
    result = run_fill(sd15_inpaint, request, canvas, selection, [8], _ignore)
    composed = _composite_all(canvas, result)[0]
    np.testing.assert_array_equal(composed[:48, :48], original)
    assert (composed[:, 48:, 3] == 255).all() and (composed[48:, :, 3] == 255).all()


def test_run_fill_with_controlnet_request(controlnet_engine):
    canvas = np.dstack([_image(), np.full((SIZE, SIZE), 255, np.uint8)])
    request = FillRequest(
        image=IMAGE_ID, mask=MASK_ID, steps=2, variations=1, control=[ControlInput(type="canny")]
    )
    canvas, selection = prepare_canvas(request, canvas, _square_selection())
    result = run_fill(controlnet_engine, request, canvas, selection, [3], _ignore)
    composed = _composite_all(canvas, result)[0]
    np.testing.assert_array_equal(composed[selection == 0], canvas[selection == 0])


def test_cpu_engines_run_in_float32(sd15_inpaint):
    assert sd15_inpaint.dtype == torch.float32
    assert sd15_inpaint.pipeline.unet.dtype == torch.float32
