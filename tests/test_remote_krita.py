"""The Krita plug-in, unchanged, in real Krita 5 against a server whose cloud engines
(``openai``, ``bfl``, ``imagen``) talk to local fakes of the providers' APIs. One kritarunner
start runs every case in turn: each provider's model fills, removes and expands, each on a
fresh document; then the docker's Model drop-down is read. Skipped where Krita is not
installed (see ``test_krita``). Nothing reaches the network."""

from __future__ import annotations

import numpy as np
import pytest
from genfill.protocol import Mode
from genfill_server.engines.remote import imagen, openai
from PIL import Image

from remote_fakes import CLOUD_MODELS, cloud_server
from test_krita import (  # noqa: F401
    HEIGHT,
    SELECTION,
    WIDTH,
    _kritarunner,
    _photo,
    _selection_mask,
    krita_installed,
    template_home,
)

KEYS = {"openai": "sk-krita-test-SECRET", "bfl": "bfl-krita-test-key-SECRET", "imagen": "ya29.krita-test-SECRET"}
PROVIDERS = ("openai", "bfl", "imagen")
MARGINS = {"left": 7, "bottom": 5}
SEED = 5


def _runs() -> list[dict]:
    runs = []
    for provider in PROVIDERS:
        model = CLOUD_MODELS[provider]
        runs += [
            {"name": f"{provider}-fill", "options": {"model": model, "prompt": "sea", "variations": 2, "seed": SEED}},
            {"name": f"{provider}-remove", "options": {"model": model, "mode": "remove", "variations": 1, "seed": 1}},
            {"name": f"{provider}-expand", "options": {"model": model, "mode": "expand", "expand": MARGINS,
                                                       "variations": 1, "seed": 1}},
        ]
    # More variations than the provider makes at once: refused before anything is sent.
    runs.append({"name": "bfl-too-many", "options": {"model": CLOUD_MODELS["bfl"], "prompt": "sea", "variations": 6}})
    return runs


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, template_home):  # noqa: F811
    with cloud_server(KEYS) as (server, fakes):
        tmp_path = tmp_path_factory.mktemp("krita-cloud")
        out = _kritarunner("cloud", {"url": server.url, "token": server.token, "runs": _runs()}, tmp_path, template_home)
        yield out, fakes


def _requests(fakes, provider: str, mode: str):
    """The requests of one run, told apart by what each run sends differently."""
    fake = fakes[provider]
    if provider == "openai":
        prompt = "sea" if mode == "fill" else openai.DEFAULT_PROMPTS[Mode(mode)]
        return [r for r in fake.requests if r.path == "/v1/images/edits" and r.fields.get("prompt") == prompt]
    if provider == "bfl":
        posts = [r for r in fake.requests if r.method == "POST"]
        if mode == "expand":
            return [r for r in posts if r.path == "/v1/flux-pro-1.0-expand"]
        return [r for r in posts if r.path == "/v1/flux-pro-1.0-fill" and ("prompt" in r.json()) == (mode == "fill")]
    return [r for r in fake.requests if r.json()["parameters"]["editMode"] == imagen.EDIT_MODES[Mode(mode)]]


@pytest.mark.parametrize("mode", ["fill", "remove"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_krita_fills_and_removes_through_each_cloud_model(cloud, provider, mode):
    out, fakes = cloud
    run = out["runs"][f"{provider}-{mode}"]
    assert run["ok"] is True, run["text"]
    variations = 2 if mode == "fill" else 1
    [group] = run["groups"]
    assert [child["bounds"] for child in group["children"]] == [list(SELECTION)] * variations
    assert [child["visible"] for child in group["children"]] == [True] + [False] * (variations - 1)
    canvas, mask = _photo(), _selection_mask()
    exported = np.asarray(Image.open(run["export"]).convert("RGBA"))
    assert exported.shape == canvas.shape
    assert np.array_equal(exported[mask == 0], canvas[mask == 0]), "pixels outside the selection changed"
    assert not np.array_equal(exported[mask > 0], canvas[mask > 0]), "the selection was not filled"
    requests = _requests(fakes, provider, mode)
    if provider == "imagen":
        [request] = requests  # one request, sampleCount variations
        assert request.json()["parameters"]["sampleCount"] == variations
    else:
        assert len(requests) == variations  # one request (OpenAI streamed) or task (BFL) a variation
    if provider == "bfl":
        assert sorted(r.json()["seed"] for r in requests) == ([SEED, SEED + 1] if mode == "fill" else [1])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_krita_expands_through_each_cloud_model(cloud, provider):
    out, fakes = cloud
    run = out["runs"][f"{provider}-expand"]
    assert run["ok"] is True, run["text"]
    assert run["size"] == [WIDTH + MARGINS["left"], HEIGHT + MARGINS["bottom"]]
    exported = np.asarray(Image.open(run["export"]).convert("RGBA"))
    assert exported.shape == (HEIGHT + MARGINS["bottom"], WIDTH + MARGINS["left"], 4)
    assert np.array_equal(exported[:HEIGHT, MARGINS["left"]:], _photo()), "the original pixels moved or changed"
    assert exported[:, : MARGINS["left"], 3].all() and exported[HEIGHT:, :, 3].all(), "the new area was not filled"
    assert len(_requests(fakes, provider, "expand")) == 1


def test_more_variations_than_the_provider_makes_is_said_plainly(cloud):
    out, _ = cloud
    run = out["runs"]["bfl-too-many"]
    assert run["ok"] is False and run["groups"] == []
    assert "variations=6 is over the bfl engine's limit of 4: ask for 4 or fewer" in run["text"], run["text"]
    # Nothing reached the provider: bfl-fill's test counts every task with this prompt.


def test_the_docker_says_where_a_cloud_model_or_engine_sends_the_image(cloud):
    out, fakes = cloud
    assert out["labels_from"] == "docker", out.get("docker_exception")
    labels = {value: label for label, value in out["model_labels"]}
    engines = {value: label for label, value in out["engine_labels"]}
    assert engines["classic"] == "classic" and engines[""] == "(server default): classic"
    for provider, fake in fakes.items():
        host = fake.url.removeprefix("http://")
        assert labels[CLOUD_MODELS[provider]] == f"{CLOUD_MODELS[provider]} ({provider}) - image sent to {host}"
        # Picking the engine alone (its default model) sends the image just the same.
        assert engines[provider] == f"{provider} - image sent to {host}"
    for key in KEYS.values():
        assert key not in str(out)
