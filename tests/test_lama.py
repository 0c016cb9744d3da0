"""The lama engine: a tiny random-weight LaMa generator of big-lama's architecture, saved in
each file type users have and loaded back through the engine's own loading code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from genfill_server.engines.base import Engine, EngineError, EngineJob
from genfill_server.engines.lama import (
    LamaConfig,
    LamaEngine,
    build_generator,
    config_of,
    find_weights,
    inpaint,
    load_generator,
)

TINY = LamaConfig(base_channels=8, blocks=2)


def tiny_generator():
    torch.manual_seed(0)
    generator = build_generator(TINY)
    # Random running statistics, so that loading them (or not) shows in the output.
    for module in generator.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return generator.eval()


def save(generator, path):
    state = {key: value.clone() for key, value in generator.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        # The authors' Lightning checkpoint: generator, discriminator and loss networks.
        lightning = {f"generator.{key}": value for key, value in state.items()}
        lightning["discriminator.model0.0.weight"] = torch.zeros(1)
        lightning["loss_resnet_pl.impl.conv1.weight"] = torch.zeros(1)
        torch.save({"state_dict": lightning, "epoch": 3}, str(path))
    else:
        torch.save(state, str(path))


def photo(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    hole = np.zeros((size, size), bool)
    hole[20:44, 16:40] = True
    return image, hole


def test_big_lama_has_the_authors_layout():
    names = set(build_generator().state_dict())
    # Keys of the generator in the authors' big-lama best.ckpt, without "generator.".
    for key in (
        "model.1.ffc.convl2l.weight",
        "model.4.ffc.convl2g.weight",
        "model.5.conv1.ffc.convg2g.conv1.0.weight",
        "model.5.conv1.ffc.convg2g.conv1.1.bias",
        "model.5.conv1.ffc.convg2g.fu.conv_layer.weight",
        "model.22.conv2.bn_g.running_var",
        "model.24.weight",
        "model.34.weight",
    ):
        assert key in names, key
    assert config_of(build_generator().state_dict()) == LamaConfig()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_weights_load_back_through_the_engine_and_give_the_same_pixels(tmp_path, suffix):
    generator = tiny_generator()
    path = tmp_path / f"big-lama{suffix}"
    save(generator, path)
    loaded = load_generator(path)
    assert config_of(loaded.state_dict()) == TINY

    image, hole = photo()
    expected = inpaint(generator, image, hole)
    engine = LamaEngine(path)
    assert isinstance(engine, Engine) and engine.name == "lama"
    engine.load()
    steps = []
    job = EngineJob(image=image, selection=hole.astype(np.uint8) * 255, denoise_mask=hole.astype(np.uint8) * 255, seeds=[1, 2])
    results = engine.run(job, lambda step, total, preview: steps.append((step, total)))
    engine.close()
    assert len(results) == 2 and steps[-1] == (1, 1)
    for result in results:
        assert result.shape == image.shape and result.dtype == np.uint8
        assert np.array_equal(result[~hole], image[~hole])
        np.testing.assert_allclose(result[hole].astype(int), expected[hole].astype(int), atol=1)
    # The hole really comes from the network: a generator with other weights differs there.
    torch.manual_seed(5)
    other = build_generator(TINY).eval()
    assert np.abs(inpaint(other, image, hole)[hole].astype(int) - expected[hole]).mean() > 1


def test_odd_sizes_are_padded_and_cropped_back():
    generator = tiny_generator()
    rng = np.random.default_rng(3)
    for height, width in [(37, 53), (8, 8), (5, 3)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        hole = np.zeros((height, width), bool)
        hole[height // 3 : height // 3 + 2, 1:] = True
        result = inpaint(generator, image, hole)
        assert result.shape == image.shape
        assert np.array_equal(result[~hole], image[~hole])


def test_a_file_without_a_lama_generator_is_refused(tmp_path):
    path = tmp_path / "lama.pt"
    torch.save({"unet.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(EngineError) as caught:
        LamaEngine(path).load()
    assert caught.value.code == "engine_unavailable" and "lama.pt" in str(caught.value)
    with pytest.raises(ValueError, match="must be one of"):
        load_generator(tmp_path / "big-lama.onnx")


def test_weights_are_found_by_name_in_the_models_folders(tmp_path):
    assert find_weights([tmp_path]) is None
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sd15.safetensors").write_bytes(b"")
    assert find_weights([tmp_path / "missing", tmp_path]) is None
    (tmp_path / "big-lama.ckpt").write_bytes(b"")
    assert find_weights([tmp_path / "missing", tmp_path]) == tmp_path / "big-lama.ckpt"


def test_an_empty_selection_is_refused(tmp_path):
    path = tmp_path / "big-lama.pt"
    save(tiny_generator(), path)
    image, _ = photo()
    empty = np.zeros(image.shape[:2], np.uint8)
    with pytest.raises(EngineError) as caught:
        LamaEngine(path).run(EngineJob(image=image, selection=empty, denoise_mask=empty, seeds=[0]), lambda *a: None)
    assert caught.value.code == "empty_selection"


def test_the_server_offers_lama_when_weights_are_installed_and_removal_prefers_it(tmp_path):
    from genfill.protocol import FillRequest
    from genfill_server.engines import default_engines

    def request(mode: str, **options) -> FillRequest:
        return FillRequest(image="a" * 64, mask="b" * 64, prompt="", mode=mode, **options)

    without = default_engines([tmp_path], hf_cache=False)
    assert "lama" not in without.specs and without.resolve(request("remove")) == "classic"

    save(tiny_generator(), tmp_path / "big-lama.safetensors")
    engines = default_engines([tmp_path], hf_cache=False)
    assert engines.resolve(request("remove")) == "lama"
    assert engines.resolve(request("fill")) == "classic"
    assert engines.resolve(request("remove", engine="classic")) == "classic"
    engine = engines.get("lama", "cpu")
    image, hole = photo()
    selection = hole.astype(np.uint8) * 255
    [result] = engine.run(EngineJob(image=image, selection=selection, denoise_mask=selection, seeds=[0]), lambda *a: None)
    assert np.array_equal(result[~hole], image[~hole])
    engines.close()
