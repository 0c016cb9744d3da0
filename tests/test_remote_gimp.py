"""The GIMP 3 plug-in, unchanged, in real GIMP against a server whose cloud engines
(``openai``, ``bfl``, ``imagen``) talk to local fakes of the providers' APIs. One GIMP batch
runs every case in turn through the PDB, as a script would: each provider's model fills,
removes and expands, each on a new image; then the dialog's drop-down entries are read from
the installed plug-in's bridge. Skipped where the GIMP chroot is not provisioned (see
``test_gimp``). Nothing reaches the network."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from genfill.protocol import Mode
from genfill_server.engines.remote import imagen, openai
from PIL import Image

from remote_fakes import CLOUD_MODELS, cloud_server
from test_gimp import (  # noqa: F401
    HEIGHT,
    SELECTION,
    WIDTH,
    ChrootDir,
    _batch,
    _mask,
    _photo,
    gimp_installed,
    template_home,
)

KEYS = {"openai": "sk-gimp-test-SECRET", "bfl": "bfl-gimp-test-key-SECRET", "imagen": "ya29.gimp-test-SECRET"}
PROVIDERS = ("openai", "bfl", "imagen")
MARGINS = {"left": 0, "right": 9, "top": 4, "bottom": 0}
SEED = 21


@pytest.fixture(scope="module")
def cloud(template_home):  # noqa: F811
    with cloud_server(KEYS) as (server, fakes):
        folder = ChrootDir()
        shutil.copytree(template_home[1], folder.host / "home", symlinks=True)
        connection = {"server-url": server.url, "server-token": server.token}
        runs = []
        for provider in PROVIDERS:
            model = CLOUD_MODELS[provider]
            for mode, args in (("fill", {"prompt": "moss", "variations": 2, "seed": SEED}),
                               ("remove", {"mode": "remove", "variations": 1, "seed": 1})):
                runs.append({"tag": f"{provider}-{mode}", "procedure": "python-fu-genfill-fill",
                             "args": {"model": model, **args, **connection},
                             "export": str(folder.inside / f"{provider}-{mode}.png")})
            runs.append({"tag": f"{provider}-expand", "procedure": "python-fu-genfill-expand", "selection": None,
                         "args": {"model": model, **MARGINS, "variations": 1, "seed": 3, **connection},
                         "export": str(folder.inside / f"{provider}-expand.png")})
        # More variations than the provider makes at once: refused before anything is sent.
        runs.append({"tag": "bfl-too-many", "procedure": "python-fu-genfill-fill", "export": None,
                     "args": {"model": CLOUD_MODELS["bfl"], "prompt": "moss", "variations": 6, **connection}})
        try:
            out = _batch(folder, runs[0]["procedure"], runs[0]["args"], runs=runs, labels=connection)
            yield out, fakes
        finally:
            shutil.rmtree(folder.host, ignore_errors=True)


def _requests(fakes, provider: str, mode: str):
    """The requests of one run, told apart by what each run sends differently."""
    fake = fakes[provider]
    if provider == "openai":
        prompt = "moss" if mode == "fill" else openai.DEFAULT_PROMPTS[Mode(mode)]
        return [r for r in fake.requests if r.path == "/v1/images/edits" and r.fields.get("prompt") == prompt]
    if provider == "bfl":
        posts = [r for r in fake.requests if r.method == "POST"]
        if mode == "expand":
            return [r for r in posts if r.path == "/v1/flux-pro-1.0-expand"]
        return [r for r in posts if r.path == "/v1/flux-pro-1.0-fill" and ("prompt" in r.json()) == (mode == "fill")]
    return [r for r in fake.requests if r.json()["parameters"]["editMode"] == imagen.EDIT_MODES[Mode(mode)]]


def _exported(out, tag: str) -> np.ndarray:
    return np.asarray(Image.open(out["_host"](out["runs"][tag]["export_path"])).convert("RGBA"))


@pytest.mark.parametrize("mode", ["fill", "remove"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gimp_fills_and_removes_through_each_cloud_model(cloud, provider, mode):
    out, fakes = cloud
    run = out["runs"][f"{provider}-{mode}"]
    assert run["status"] == "success", run.get("message") or out["_stderr"]
    variations = 2 if mode == "fill" else 1
    [group] = run["groups"]
    assert [child["box"] for child in group["children"]] == [list(SELECTION)] * variations
    assert [child["visible"] for child in group["children"]] == [True] + [False] * (variations - 1)
    canvas, mask = _photo(), _mask()
    exported = _exported(out, f"{provider}-{mode}")
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
def test_gimp_expands_through_each_cloud_model(cloud, provider):
    out, fakes = cloud
    run = out["runs"][f"{provider}-expand"]
    assert run["status"] == "success", run.get("message") or out["_stderr"]
    assert run["size"] == [WIDTH + MARGINS["right"], HEIGHT + MARGINS["top"]]
    exported = _exported(out, f"{provider}-expand")
    assert np.array_equal(exported[MARGINS["top"]:, :WIDTH], _photo()), "the original pixels moved or changed"
    assert exported[: MARGINS["top"], :, 3].all() and exported[:, WIDTH:, 3].all(), "the new area was not filled"
    assert len(_requests(fakes, provider, "expand")) == 1


def test_more_variations_than_the_provider_makes_is_said_plainly(cloud):
    out, _ = cloud
    run = out["runs"]["bfl-too-many"]
    assert run["status"] == "execution-error" and run["groups"] == []
    assert "variations=6 is over the bfl engine's limit of 4: ask for 4 or fewer" in run["message"], run["message"]
    # Nothing reached the provider: bfl-fill's test counts every task with this prompt.


def test_the_dialog_says_where_a_cloud_model_or_engine_sends_the_image(cloud):
    out, fakes = cloud
    for mode in ("fill", "remove", "expand"):
        labels = {value: label for label, value in out["choices"][mode]["models"]}
        engines = {value: label for label, value in out["choices"][mode]["engines"]}
        assert engines["classic"] == "classic" and engines[""] == "Server default (classic)"
        for provider, fake in fakes.items():
            host = fake.url.removeprefix("http://")
            assert labels[CLOUD_MODELS[provider]] == f"{CLOUD_MODELS[provider]} ({provider}) - image sent to {host}"
            # Picking the engine alone (its default model) sends the image just the same.
            assert engines[provider] == f"{provider} - image sent to {host}"
    for key in KEYS.values():
        assert key not in str({k: v for k, v in out.items() if k != "_host"})
