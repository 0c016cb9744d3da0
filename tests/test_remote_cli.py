"""``genfill fill`` (the CLI, a subprocess) against ``genfill serve --remote openai,bfl,imagen``
(another subprocess) whose three cloud providers are local fakes: fill and remove with each
provider's model. The CLI has no expand (``genfill fill --mode`` offers fill, add and remove).
Nothing reaches the network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from genfill.protocol import Mode
from genfill_server.engines.remote import imagen, openai
from PIL import Image

from remote_fakes import FakeBFL, FakeImagen, FakeOpenAI, photo, selection_of

KEYS = {"openai": "sk-cli-test-1f0a-SECRET", "bfl": "bfl-cli-test-77c1-SECRET", "imagen": "ya29.cli-test-SECRET"}
MODELS = {"openai": "gpt-image-1", "bfl": "flux-pro-1.0-fill", "imagen": "imagen-3.0-capability-001"}
COMMON = 'native_size = 256\nretries = 0\nrequest_timeout_s = 10.0\ndeadline_s = 30.0\n'
WIDTH, HEIGHT = 96, 64
BOX = (60, 30, 20, 20)


def genfill(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "genfill_server", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """The three fakes and a ``genfill serve`` with all three providers on; yields the fakes
    and the environment a client needs (no keys in it)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    with FakeOpenAI(KEYS["openai"]) as fake_openai, FakeBFL(KEYS["bfl"]) as fake_bfl, \
            FakeImagen(KEYS["imagen"]) as fake_imagen:
        fake_bfl.pending_polls = 1
        config = tmp_path / "remote.toml"
        config.write_text(
            f'[openai]\nbase_url = "{fake_openai.url}"\nstream = false\n{COMMON}'
            f'[bfl]\nbase_url = "{fake_bfl.url}"\npoll_interval_s = 0.01\n{COMMON}'
            f'[imagen]\nbase_url = "{fake_imagen.url}"\nproject = "studio-42"\n{COMMON}'
        )
        state_file = tmp_path / "state" / "server.json"
        env = {**os.environ, "GENFILL_STATE_FILE": str(state_file), "PYTHONUNBUFFERED": "1",
               "OPENAI_API_KEY": KEYS["openai"], "BFL_API_KEY": KEYS["bfl"], "GOOGLE_ACCESS_TOKEN": KEYS["imagen"]}
        server = subprocess.Popen(
            [sys.executable, "-m", "genfill_server", "serve", "--port", "0", "--remote", "openai,bfl,imagen",
             "--remote-config", str(config)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not state_file.exists():
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "server did not write its state file"
                time.sleep(0.1)
            client_env = {k: v for k, v in env.items() if k not in ("OPENAI_API_KEY", "BFL_API_KEY", "GOOGLE_ACCESS_TOKEN")}
            yield {"openai": fake_openai, "bfl": fake_bfl, "imagen": fake_imagen}, client_env, tmp_path
        finally:
            server.send_signal(signal.SIGTERM)
            output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
        for key in KEYS.values():
            assert key not in output


def test_models_lists_each_cloud_model_with_its_host(cloud):
    fakes, env, _ = cloud
    models = genfill("models", env=env)
    assert models.returncode == 0, models.stderr
    for provider, fake in fakes.items():
        assert f"model {MODELS[provider]} (" in models.stdout and f"sends images to {fake.url[7:]})" in models.stdout


@pytest.mark.parametrize("mode", ["fill", "remove"])
@pytest.mark.parametrize("provider", ["openai", "bfl", "imagen"])
def test_cli_fills_and_removes_with_each_cloud_model(cloud, provider, mode):
    fakes, env, tmp_path = cloud
    fake = fakes[provider]
    fake.reset()
    if provider == "bfl":
        fake.pending_polls = 1
    canvas = photo(WIDTH, HEIGHT, seed=3)[..., :3]
    mask = selection_of(WIDTH, HEIGHT, BOX)
    source, mask_path, output = (tmp_path / f"{provider}-{mode}-{name}.png" for name in ("in", "mask", "out"))
    Image.fromarray(canvas).save(source)
    Image.fromarray(mask).save(mask_path)
    prompt = "a boat" if mode == "fill" else ""
    filled = genfill("fill", str(source), "--mask", str(mask_path), "--model", MODELS[provider], "--mode", mode,
                     "--variations", "1", "--seed", "4", "--prompt", prompt, "-o", str(output), env=env)
    assert filled.returncode == 0, filled.stderr
    assert f"wrote {output}" in filled.stdout
    # OpenAI takes no seed, nor does Imagen with its watermark on: the CLI says so.
    assert ("takes no seed" in filled.stderr) == (provider != "bfl"), filled.stderr
    result = np.asarray(Image.open(output).convert("RGB"))
    assert result.shape == canvas.shape
    np.testing.assert_array_equal(result[mask == 0], canvas[mask == 0])
    assert not np.array_equal(result[mask > 0], canvas[mask > 0]), "the selection was not filled"

    if provider == "openai":
        [request] = fake.requests
        assert request.path == "/v1/images/edits" and request.fields["model"] == MODELS[provider]
        assert request.fields["prompt"] == (prompt or openai.DEFAULT_PROMPTS[Mode.REMOVE])
    elif provider == "bfl":
        [request] = [r for r in fake.requests if r.method == "POST"]
        assert request.path == "/v1/flux-pro-1.0-fill"
        assert request.json().get("prompt") == (prompt or None) and request.json()["seed"] == 4
    else:
        [request] = fake.requests
        assert request.path.endswith(f"/models/{MODELS[provider]}:predict")
        body = request.json()
        assert body["parameters"]["editMode"] == imagen.EDIT_MODES[Mode(mode)]
        assert body["instances"][0]["prompt"] == prompt


@pytest.mark.parametrize("provider", ["openai", "bfl", "imagen"])
def test_cli_expands_with_each_cloud_model(cloud, provider):
    fakes, env, tmp_path = cloud
    fake = fakes[provider]
    fake.reset()
    canvas = photo(WIDTH, HEIGHT, seed=5)[..., :3]
    source, output = tmp_path / f"{provider}-expand-in.png", tmp_path / f"{provider}-expand-out.png"
    Image.fromarray(canvas).save(source)
    grown = genfill("expand", str(source), "--model", MODELS[provider], "--right", "24", "--top", "16",
                    "--variations", "1", "--seed", "4", "-o", str(output), env=env)
    assert grown.returncode == 0, grown.stderr
    result = np.asarray(Image.open(output).convert("RGBA"))
    assert result.shape == (HEIGHT + 16, WIDTH + 24, 4)
    np.testing.assert_array_equal(result[16:, :WIDTH, :3], canvas)
    assert (result[:16, :, 3] == 255).all() and (result[:, WIDTH:, 3] == 255).all()
    if provider == "bfl":
        assert [r.path for r in fake.requests if r.method == "POST"] == ["/v1/flux-pro-1.0-expand"]
    elif provider == "imagen":
        [request] = fake.requests
        assert request.json()["parameters"]["editMode"] == imagen.EDIT_MODES[Mode.EXPAND]
    else:
        [request] = fake.requests
        assert request.path == "/v1/images/edits"
