"""Switching cloud providers on: the remote config file, keys, ``genfill serve --remote`` and
``genfill fill`` against a local fake of OpenAI's API. Nothing reaches the network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from genfill_server.engines import default_engines, providers
from genfill_server.engines.remote import (
    Secret,
    bfl,
    check_remote_config,
    imagen,
    load_remote_config,
    openai,
)
from PIL import Image

from remote_fakes import FakeOpenAI, photo, selection_of

KEY = "sk-config-test-9d2e-SECRET"


def test_nothing_is_on_without_configuration(tmp_path):
    assert load_remote_config(None) == {}
    config = tmp_path / "remote.toml"
    config.write_text('[openai]\nquality = "high"\n[bfl]\nenabled = false\n')
    assert load_remote_config(config) == {}
    engines = default_engines(hf_cache=False, providers={
        "classic": providers.classic, "openai": openai.provide, "bfl": bfl.provide, "imagen": imagen.provide})
    assert set(engines.specs) == {"classic"}


def test_the_flag_or_enabled_switches_a_provider_on_with_its_table(tmp_path):
    config = tmp_path / "remote.toml"
    config.write_text('[openai]\nquality = "high"\n[bfl]\nenabled = true\nsafety_tolerance = 1\n[imagen]\nproject = "p"\n')
    assert load_remote_config(config, ["openai"]) == {"openai": {"quality": "high"}, "bfl": {"enabled": True, "safety_tolerance": 1}}
    assert load_remote_config(None, ["imagen"]) == {"imagen": {}}


@pytest.mark.parametrize(("text", "message"), [("[openai\n", "remote config"), ("openai = 3\n", "must be a table"),
                                               ("[openai]\nenabled = 'yes'\n", "true or false")])
def test_a_bad_config_file_is_refused(tmp_path, text, message):
    config = tmp_path / "remote.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_remote_config(config)


def test_keys_come_from_the_environment_or_a_private_file_never_the_config(tmp_path):
    settings = openai.settings_from({}, environ={"OPENAI_API_KEY": KEY})
    assert settings.key == Secret(KEY) and KEY not in repr(settings) and KEY not in str(settings.key)
    assert openai.settings_from({"api_key_env": "MINE"}, environ={"MINE": KEY}).key.reveal() == KEY
    key_file = tmp_path / "openai.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users: chmod 600"):
        openai.settings_from({"api_key_file": str(key_file)}, environ={})
    key_file.chmod(0o600)
    assert openai.settings_from({"api_key_file": str(key_file)}, environ={}).key.reveal() == KEY
    with pytest.raises(ValueError, match="not in the config file"):
        openai.settings_from({"api_key": KEY}, environ={})
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        openai.settings_from({}, environ={})


@pytest.mark.parametrize(("table", "message"), [
    ({"quality": "ultra"}, "openai.quality"), ({"background": "transparent"}, "openai.background"),
    ({"max_concurrent": 0}, "max_concurrent"), ({"colour": "red"}, "unknown setting colour"),
    ({"base_url": "ftp://x"}, "base_url"), ({"base_url": "https://api.openai.com/v1"}, "base_url"),
    ({"base_url": "http://api.openai.com"}, "must be https://"),
])
def test_bad_settings_name_the_setting(table, message):
    with pytest.raises(ValueError, match=message):
        openai.settings_from(table, environ={"OPENAI_API_KEY": KEY})


def test_check_remote_config():
    with pytest.raises(ValueError, match="no cloud provider is named 'dalle'"):
        check_remote_config({"dalle": {}})
    with pytest.raises(ValueError, match="BFL_API_KEY"):
        check_remote_config({"bfl": {"api_key_env": "BFL_API_KEY_UNSET_HERE"}})


def genfill(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "genfill_server", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_serve_refuses_a_provider_it_cannot_use(tmp_path):
    env = {**os.environ, "GENFILL_STATE_FILE": str(tmp_path / "s.json"), "GENFILL_REMOTE_CONFIG": ""}
    env.pop("OPENAI_API_KEY", None)
    completed = genfill("serve", "--port", "0", "--remote", "openai", env=env)
    assert completed.returncode == 2 and "OPENAI_API_KEY" in completed.stderr and "Traceback" not in completed.stderr
    completed = genfill("serve", "--port", "0", "--remote", "nope", env=env)
    assert completed.returncode == 2 and "no cloud provider is named 'nope'" in completed.stderr


def test_serve_remote_then_fill_and_models_through_the_cli(tmp_path):
    with FakeOpenAI(KEY) as fake:
        config = tmp_path / "remote.toml"
        config.write_text(f'[openai]\nbase_url = "{fake.url}"\nnative_size = 256\nstream = false\nretries = 0\n')
        state_file = tmp_path / "state" / "server.json"
        env = {**os.environ, "GENFILL_STATE_FILE": str(state_file), "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": KEY}
        server = subprocess.Popen(
            [sys.executable, "-m", "genfill_server", "serve", "--port", "0", "--remote", "openai",
             "--remote-config", str(config)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not state_file.exists():
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "server did not write its state file"
                time.sleep(0.1)
            client_env = {k: v for k, v in env.items() if k != "OPENAI_API_KEY"}
            models = genfill("models", env=client_env)
            assert models.returncode == 0, models.stderr
            assert f"model gpt-image-1 (gpt-image, openai, from remote; sends images to {fake.url[7:]})" in models.stdout
            canvas = photo(96, 64)[..., :3]
            mask = selection_of(96, 64, (60, 30, 20, 20))
            Image.fromarray(canvas).save(tmp_path / "in.png")
            Image.fromarray(mask).save(tmp_path / "mask.png")
            filled = genfill("fill", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--model",
                             "gpt-image-1", "--variations", "1", "--prompt", "a boat", "-o", str(tmp_path / "out.png"),
                             env=client_env)
            assert filled.returncode == 0, filled.stderr
            result = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
            np.testing.assert_array_equal(result[mask == 0], canvas[mask == 0])
            assert [r.fields["prompt"] for r in fake.requests] == ["a boat"]
        finally:
            server.send_signal(signal.SIGTERM)
            output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "cloud provider openai is on" in output and KEY not in output
