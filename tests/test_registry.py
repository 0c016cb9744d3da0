"""The model registry: discovery in the HF cache, folders and single files; architecture
detection; loading through the real code path; the CLI; a server with and without models.

Tiny random-weight pipelines (``tiny_models``) are saved with ``save_pretrained`` into a
temporary HF-cache layout (blobs, symlinked snapshots, ``refs/main``) and into plain folders,
and written as A1111-layout single files, then loaded back through ``ModelRegistry.load`` and
``default_engines``. Nothing here reaches the network: ``no_network`` fails any connection
that is not to this machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from genfill import Client
from genfill.protocol import ControlType, ErrorCode, FillRequest
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.cli import main as cli_main
from genfill_server.engines import default_engines
from genfill_server.engines.base import ControlSpec, EngineJob, EngineOptions
from genfill_server.registry import (
    CONFIGS_DIR,
    Architecture,
    ModelError,
    ModelRegistry,
    PullError,
    Source,
    detect_checkpoint,
    hf_hub_cache,
    pull,
    read_checkpoint_shapes,
)
from safetensors.torch import save_file

import tiny_models

REVISION = "0123456789abcdef0123456789abcdef01234567"


# Fixtures: where models live


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
            return real_connect(sock, address)
        raise AssertionError(f"test tried to reach the network: {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(pipeline, cache: Path, repo_id: str) -> Path:
    """Saves a pipeline the way ``huggingface_hub`` lays a download out: content in
    ``blobs/<sha256>``, the snapshot as relative symlinks, ``refs/main`` naming it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    pipeline.save_pretrained(snapshot)
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.move(file, blobs / digest)
        file.symlink_to(Path("../" * (len(file.relative_to(repo).parts) - 1)) / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(loaded, original) -> None:
    expected = state(original)
    got = state(loaded)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


# A1111 layout: the inverse of diffusers' single-file conversion, for tiny UNets, VAEs and CLIP


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def ldm_unet_key(key: str, config) -> str:
    per = config.layers_per_block + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.0.{_resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{per * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{per * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        has_attention = "CrossAttn" in config.up_block_types[int(m[1])]
        return f"output_blocks.{per * int(m[1]) + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(key)


_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def ldm_vae_key(key: str, config) -> tuple[str, bool]:
    """The LDM name of a VAE tensor, and whether it is an attention projection (stored there
    as a 1x1 convolution)."""
    blocks = len(config.up_block_types)
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = m[2]
        for new, old in _VAE_ATTENTION:
            if rest.startswith(new + "."):
                return f"{m[1]}.mid.attn_1.{old}{rest[len(new):]}", True
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    return key, False


def a1111_checkpoint(pipeline) -> dict[str, torch.Tensor]:
    """An SD1.5-family pipeline's weights in the original (CompVis / A1111) key layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in pipeline.unet.state_dict().items():
        out["model.diffusion_model." + ldm_unet_key(key, pipeline.unet.config)] = value.contiguous()
    for key, value in pipeline.vae.state_dict().items():
        ldm, attention = ldm_vae_key(key, pipeline.vae.config)
        if attention and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + ldm] = value.contiguous()
    for key, value in pipeline.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value.contiguous()
    return out


def tiny_configs(tmp_path: Path, **pipelines) -> Path:
    """A configs folder like the shipped one, for tiny models: each pipeline's configs, no
    weights and no tokenizer (single files must find theirs elsewhere)."""
    root = tmp_path / "configs"
    for name, pipeline in pipelines.items():
        folder = root / name.replace("_", "-")
        pipeline.save_pretrained(folder)
        for file in list(folder.rglob("*")):
            if file.is_file() and (file.suffix in (".safetensors", ".bin") or file.parent.name.startswith("tokenizer")):
                file.unlink()
        for sub in list(folder.iterdir()):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
    return root


def tiny_job(size: int = 64, seeds=(0,)) -> EngineJob:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    selection = np.zeros((size, size), np.uint8)
    selection[16:48, 16:48] = 255
    return EngineJob(image=image, selection=selection, denoise_mask=selection.copy(), seeds=list(seeds),
                     options=EngineOptions.of(prompt="a cat", steps=2, mode="fill", guidance=2.0))


def run_one(engine) -> list[np.ndarray]:
    steps = []
    images = engine.run(tiny_job(), lambda step, total, preview: steps.append((step, total)))
    assert steps and steps[-1][0] == steps[-1][1]
    return images


# Discovery and loading: the HF cache


def test_hf_cache_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_hub_cache() == tmp_path / "elsewhere"


def test_hf_cache_sd15_inpaint_loads_and_runs(hf_cache):
    original = tiny_models.tiny_sd15_inpaint(seed=1)
    put_in_hf_cache(original, hf_cache, "tiny-org/sd15-inpaint")
    registry = ModelRegistry()
    model = registry.get("tiny-org/sd15-inpaint")
    assert (model.architecture, model.inpaint, model.source, model.kind) == (Architecture.SD15, True, Source.HF_CACHE, "pipeline")
    assert model.native_size == 64  # sample_size 32 x VAE factor 2
    assert model.path.name == REVISION

    pipeline = registry.load(model)
    assert type(pipeline).__name__ == "StableDiffusionInpaintPipeline"
    assert pipeline.safety_checker is None
    assert_same_weights(pipeline.unet, original.unet)
    assert_same_weights(pipeline.text_encoder, original.text_encoder)

    engines = default_engines()
    info = engines.catalogue()
    assert info["default_engine"] == "classic"
    assert [m["name"] for m in info["models"]] == ["tiny-org/sd15-inpaint"]
    assert info["models"][0] == {
        "name": "tiny-org/sd15-inpaint", "engine": "sd_inpaint", "architecture": "sd15", "inpaint": True,
        "native_size": 64, "source": "hf_cache", "modes": ["fill", "remove", "expand", "add"], "control": [],
        "remote": False, "host": None,
    }
    engine = engines.get("sd_inpaint", "cpu", "tiny-org/sd15-inpaint")
    assert_same_weights(engine.pipeline.unet, original.unet)
    images = run_one(engine)
    assert len(images) == 1 and images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    engines.close()


def test_hf_cache_without_ref_uses_newest_snapshot_and_skips_incomplete(hf_cache):
    snapshot = put_in_hf_cache(tiny_models.tiny_sd15(), hf_cache, "tiny-org/sd15")
    (snapshot.parents[1] / "refs" / "main").unlink()
    broken = put_in_hf_cache(tiny_models.tiny_sd15(), hf_cache, "tiny-org/half-downloaded")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    registry = ModelRegistry()
    assert list(registry.models) == ["tiny-org/sd15"]
    assert registry.models["tiny-org/sd15"].inpaint is False


def test_sdxl_folder_loads_and_runs(tmp_path):
    original = tiny_models.tiny_sdxl_inpaint()
    original.save_pretrained(tmp_path / "models" / "xl-inpaint")
    tiny_models.tiny_sdxl().save_pretrained(tmp_path / "models" / "xl-base")
    registry = ModelRegistry([tmp_path / "models"], hf_cache=False)
    assert {n: (m.architecture, m.inpaint, m.source) for n, m in registry.models.items()} == {
        "xl-inpaint": (Architecture.SDXL, True, Source.FOLDER),
        "xl-base": (Architecture.SDXL, False, Source.FOLDER),
    }
    engines = default_engines(registry=registry, default_engine="sd_inpaint")
    assert engines.default_name == "sd_inpaint"
    models = engines.specs["sd_inpaint"].models
    assert [m.name for m in models] == ["xl-inpaint", "xl-base"]  # inpaint weights first
    engine = engines.get("sd_inpaint", "cpu")  # no model named: the first one
    assert_same_weights(engine.pipeline.text_encoder_2, original.text_encoder_2)
    run_one(engine)

    # Switching models closes the engine holding the previous one.
    base = engines.get("sd_inpaint", "cpu", "xl-base")
    assert engine.pipeline is None and base.pipeline is not None
    assert base.pipeline.unet.config.in_channels == 4
    engines.close()


def test_a_folder_that_is_itself_a_model(tmp_path):
    tiny_models.tiny_sd15().save_pretrained(tmp_path / "just-one")
    registry = ModelRegistry([tmp_path / "just-one"], hf_cache=False)
    assert list(registry.models) == ["just-one"]


def test_sd3_and_flux_are_detected_and_load(tmp_path):
    sd3 = tiny_models.tiny_sd3_inpaint()
    flux = tiny_models.tiny_flux_fill()
    sd3.save_pretrained(tmp_path / "models" / "sd3")
    flux.save_pretrained(tmp_path / "models" / "flux-fill")
    registry = ModelRegistry([tmp_path / "models"], hf_cache=False)
    assert (registry.models["sd3"].architecture, registry.models["sd3"].inpaint) == (Architecture.SD3, False)
    assert (registry.models["flux-fill"].architecture, registry.models["flux-fill"].inpaint) == (Architecture.FLUX, True)
    assert "text_encoder_3" in registry.models["sd3"].components
    loaded = registry.load("flux-fill")
    assert type(loaded).__name__ == "FluxFillPipeline"
    assert_same_weights(loaded.transformer, flux.transformer)
    loaded = registry.load("sd3")
    assert_same_weights(loaded.transformer, sd3.transformer)


def test_controlnets_are_control_providers_for_their_architecture(tmp_path):
    models = tmp_path / "models"
    tiny_models.tiny_sd15_controlnet().save_pretrained(models / "control_v11p_sd15_canny")
    tiny_models.tiny_sdxl_controlnet().save_pretrained(models / "controlnet-depth-sdxl-1.0")
    tiny_models.tiny_sd15_controlnet().save_pretrained(models / "mystery-controlnet")  # no type in its name
    registry = ModelRegistry([models], hf_cache=False)
    assert registry.models == {}
    canny = registry.controlnets["control_v11p_sd15_canny"]
    assert (canny.architecture, canny.control, canny.kind) == (Architecture.SD15, (ControlType.CANNY,), "controlnet")
    assert registry.controlnets["controlnet-depth-sdxl-1.0"].architecture is Architecture.SDXL
    assert "mystery-controlnet" not in registry.controlnets
    assert registry.controlnet_for(Architecture.SD15, ControlType.CANNY) is canny
    with pytest.raises(ModelError) as caught:
        registry.controlnet_for(Architecture.SD15, ControlType.DEPTH)
    assert caught.value.code is ErrorCode.WEIGHTS_NOT_INSTALLED
    loaded = registry.load_controlnet(canny)
    assert_same_weights(loaded, tiny_models.tiny_sd15_controlnet())


def test_controlnet_engine_serves_base_models_with_installed_controls(tmp_path):
    models = tmp_path / "models"
    original = tiny_models.tiny_sd15_inpaint()
    original.save_pretrained(models / "tiny-inpaint")
    tiny_models.tiny_sd15_controlnet().save_pretrained(models / "control_v11p_sd15_canny")
    engines = default_engines(model_dirs=[models], hf_cache=False)
    assert set(engines.specs) == {"classic", "sd_inpaint", "controlnet"}
    (info,) = engines.specs["controlnet"].models
    assert (info.name, info.control) == ("tiny-inpaint", [ControlType.CANNY])

    image_id = "0" * 64
    plain = FillRequest(image=image_id, model="tiny-inpaint")
    guided = FillRequest(image=image_id, model="tiny-inpaint", control=[{"type": "canny"}])
    assert engines.resolve(plain) == "sd_inpaint"
    assert engines.resolve(guided) == "controlnet"

    engine = engines.get("controlnet", "cpu", "tiny-inpaint")
    job = tiny_job()
    job = EngineJob(job.image, job.selection, job.denoise_mask, job.seeds,
                    replace(job.options, control=(ControlSpec("canny", strength=1.0, start=0.0, end=1.0),)))
    (image,) = engine.run(job, lambda *_: None)
    assert image.shape == (64, 64, 3)
    engines.close()


# Single files


def test_single_file_sd15_inpaint_loads_with_tokenizer_from_a_local_model(tmp_path, hf_cache):
    original = tiny_models.tiny_sd15_inpaint(seed=3)
    configs = tiny_configs(tmp_path, sd15_inpaint=original)
    checkpoint = tmp_path / "checkpoints" / "dreamy-inpainting.safetensors"
    checkpoint.parent.mkdir()
    save_file(a1111_checkpoint(original), checkpoint)

    found = detect_checkpoint(read_checkpoint_shapes(checkpoint))
    assert (found.architecture, found.inpaint, found.kind) == (Architecture.SD15, True, "pipeline")

    # No tokenizer anywhere: a clear error naming what to install.
    registry = ModelRegistry([checkpoint.parent], configs_dir=configs)
    model = registry.get("dreamy-inpainting")
    assert (model.source, model.architecture, model.inpaint, model.native_size) == (Source.SINGLE_FILE, Architecture.SD15, True, 64)
    with pytest.raises(ModelError) as caught:
        registry.load(model)
    assert caught.value.code is ErrorCode.WEIGHTS_NOT_INSTALLED
    assert "genfill models pull openai/clip-vit-large-patch14 --tokenizer" in caught.value.message

    # A diffusers model of the family in the HF cache lends its tokenizer.
    put_in_hf_cache(tiny_models.tiny_sd15(seed=9), hf_cache, "tiny-org/sd15")
    registry.refresh()
    pipeline = registry.load("dreamy-inpainting")
    assert type(pipeline).__name__ == "StableDiffusionInpaintPipeline"
    assert_same_weights(pipeline.unet, original.unet)
    assert_same_weights(pipeline.vae, original.vae)
    assert_same_weights(pipeline.text_encoder, original.text_encoder)
    assert pipeline.tokenizer.get_vocab() == original.tokenizer.get_vocab()

    engines = default_engines(registry=registry)
    assert {m.name: m.source for m in engines.specs["sd_inpaint"].models} == {
        "dreamy-inpainting": "single_file", "tiny-org/sd15": "hf_cache",
    }
    engine = engines.get("sd_inpaint", "cpu", "dreamy-inpainting")
    run_one(engine)
    engines.close()


def test_single_file_ckpt_and_sidecar_yaml(tmp_path):
    original = tiny_models.tiny_sd15(seed=4)
    configs = tiny_configs(tmp_path, sd15=original)
    checkpoint = tmp_path / "checkpoints" / "oldschool.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": a1111_checkpoint(original)}, checkpoint)
    checkpoint.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    tiny_models.tiny_clip_tokenizer(configs / "sd15" / "tokenizer")  # a tokenizer shipped with the configs
    registry = ModelRegistry([checkpoint.parent], hf_cache=False, configs_dir=configs)
    model = registry.get("oldschool")
    assert (model.architecture, model.inpaint, model.prediction_type) == (Architecture.SD15, False, "v_prediction")
    pipeline = registry.load(model)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert_same_weights(pipeline.unet, original.unet)


def shapes_of(names_and_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return dict(names_and_shapes)


U = "model.diffusion_model."


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
          "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
         (Architecture.SD15, False, "pipeline")),
        ({U + "input_blocks.0.0.weight": (320, 9, 3, 3), U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
         (Architecture.SD15, True, "pipeline")),
        ({U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
          "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
         (Architecture.SD2, False, "pipeline")),
        ({U + "input_blocks.0.0.weight": (320, 9, 3, 3), U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
         (Architecture.SD2, True, "pipeline")),
        ({U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "label_emb.0.0.weight": (1280, 2816),
          "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
          "conditioner.embedders.1.model.positional_embedding": (77, 1280)},
         (Architecture.SDXL, False, "pipeline")),
        ({U + "input_blocks.0.0.weight": (320, 9, 3, 3), U + "label_emb.0.0.weight": (1280, 2816)},
         (Architecture.SDXL, True, "pipeline")),
        ({"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 147456, 1536)},
         (Architecture.SD3, False, "pipeline")),
        ({U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)}, (Architecture.SD3, False, "pipeline")),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 384)}, (Architecture.FLUX, True, "pipeline")),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)}, (Architecture.FLUX, False, "pipeline")),
        ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
          "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
         (Architecture.SD15, False, "controlnet")),
        ({"input_hint_block.0.weight": (16, 3, 3, 3), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
         (Architecture.SD2, False, "controlnet")),
    ],
    ids=["sd15", "sd15-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint", "sd35", "sd3-prefixed", "flux-fill",
         "flux-dev", "controlnet-sd15", "controlnet-sd2"],
)
def test_detect_checkpoint(shapes, expected):
    found = detect_checkpoint(shapes)
    assert (found.architecture, found.inpaint, found.kind) == expected


@pytest.mark.parametrize(
    "shapes",
    [
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},  # a LoRA
        {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},  # a VAE
        {U + "input_blocks.0.0.weight": (320, 8, 3, 3)},  # instruct-pix2pix
        {U + "input_blocks.0.0.weight": (384, 4, 3, 3), U + "label_emb.0.0.weight": (1536, 2560),
         "conditioner.embedders.0.model.positional_embedding": (77, 1280)},  # the SDXL refiner
    ],
    ids=["lora", "vae", "pix2pix", "sdxl-refiner"],
)
def test_detect_checkpoint_rejects_what_cannot_fill(shapes):
    assert detect_checkpoint(shapes) is None


def test_unreadable_and_foreign_files_are_skipped(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)
    (folder / "notes.txt").write_text("hello")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, folder / "some-lora.safetensors")
    assert ModelRegistry([folder], hf_cache=False).models == {}


# The shipped configs


@pytest.mark.parametrize(
    ("name", "in_channels", "parameters"),
    [
        ("sd15", 4, {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd15-inpaint", 9, {"unet": 859_535_364}),
        ("sd2", 4, {"unet": 865_910_724, "text_encoder": 340_387_840}),
        ("sd2-inpaint", 9, {"unet": 865_925_124}),
        ("sdxl", 4, {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
        ("sdxl-inpaint", 9, {"unet": 2_567_478_084}),
    ],
)
def test_shipped_configs_build_the_released_models(name, in_channels, parameters):
    """Built on the meta device (no memory): parameter counts equal the released models'."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = CONFIGS_DIR / name
    index = json.loads((folder / "model_index.json").read_text())
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == in_channels
    assert not any(folder.rglob("*.safetensors"))
    for component, expected in parameters.items():
        library, class_name = index[component]
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        with init_empty_weights():
            if library == "diffusers":
                module = cls.from_config(cls.load_config(folder / component))
            else:
                module = cls(cls.config_class.from_pretrained(folder / component))
        assert sum(p.numel() for p in module.parameters()) == expected, component


# CLI and server


def test_models_command_lists_local_models_without_a_server(tmp_path, hf_cache, capsys):
    tiny_models.tiny_sd15_inpaint().save_pretrained(tmp_path / "models" / "my-inpaint")
    tiny_models.tiny_sd15_controlnet().save_pretrained(tmp_path / "models" / "control_sd15_lineart")
    assert cli_main(["models", "--models-dir", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    assert "my-inpaint" in out and "sd15" in out and "inpaint" in out
    assert "control_sd15_lineart" in out and "lineart" in out


def test_models_pull_fails_cleanly_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["models", "pull", "some-org/some-model"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    with pytest.raises(PullError, match="not a Hugging Face repo id"):
        pull("../etc")


def test_models_pull_without_network_is_one_line(tmp_path):
    """A fresh process with HF_HUB_OFFLINE unset and no route to the Hub."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "genfill_server", "models", "pull", "some-org/some-model"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genfill: cannot download some-org/some-model"), done.stderr


def test_server_without_models_serves_classic(hf_cache):
    with BackgroundServer(ServerConfig(write_state_file=False), default_engines()) as server:
        with Client(server.url, token=server.token) as client:
            assert client.hello.default_engine == "classic"
            assert client.hello.models == []
            assert [e.name for e in client.hello.engines] == ["classic"]


def test_server_with_a_models_dir_lists_them_in_hello(tmp_path, hf_cache):
    tiny_models.tiny_sd15_inpaint().save_pretrained(tmp_path / "models" / "tiny-inpaint")
    engines = default_engines(model_dirs=[tmp_path / "models"])
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as server:
        with Client(server.url, token=server.token) as client:
            hello = client.hello
            assert hello.default_engine == "classic"
            assert [(m.name, m.engine, m.architecture, m.inpaint) for m in hello.models] == [
                ("tiny-inpaint", "sd_inpaint", "sd15", True)
            ]
            assert {e.name for e in hello.engines} == {"classic", "sd_inpaint"}
            assert client.models()["models"][0]["name"] == "tiny-inpaint"


def test_unknown_default_engine_is_refused(hf_cache):
    with pytest.raises(ValueError, match="sd_inpaint"):
        default_engines(default_engine="sd_inpaint")
