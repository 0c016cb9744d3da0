"""The engine contract: declared capabilities, typed options, providers found by entry point,
a lane per device kind, image references by role, and what the server tells clients of them.

Everything runs against the real server on 127.0.0.1 port 0, through raw websockets where the
test must see the exact messages, and through the SDK where it checks what a user gets.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from genfill import Client
from genfill.errors import Unsupported
from genfill.protocol import ControlType, ErrorCode, Feature, FillRequest, Mode, ReferenceRole
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import (
    BUILTIN_PROVIDERS,
    ENTRY_POINT_GROUP,
    EngineSet,
    EngineSpec,
    default_engines,
    discover_providers,
)
from genfill_server.engines import providers as builtin
from genfill_server.engines.base import (
    GATED_OPTIONS,
    DeviceKind,
    EngineCapabilities,
    EngineDefaults,
    JobCancelledError,
)
from genfill_server.errors import RequestError

from bad_input.wire import Session, box_mask, small_image, submit_message

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def run(coroutine):
    return asyncio.run(coroutine)


async def _outcome(server, **request) -> dict:
    session = await Session.open(server.url, server.token)
    try:
        image = await session.upload(small_image(32, 32))
        mask = await session.upload(box_mask(32, 32, (8, 8, 12, 12)))
        await session.send(submit_message("job", image, mask, variations=1, **request))
        return await session.job_outcome("job", timeout_s=30)
    finally:
        await session.close()


@pytest.fixture(scope="module")
def classic_server():
    with BackgroundServer(ServerConfig(write_state_file=False)) as running:
        yield running


# Capabilities and options


@pytest.mark.parametrize(
    ("option", "value"),
    [("steps", 10), ("guidance", 4.0), ("scheduler", "ddim"), ("strength", 0.5), ("negative_prompt", "blur"),
     ("control", [{"type": "canny"}])],
)
def test_classic_refuses_each_option_it_cannot_honour_by_name(classic_server, option, value):
    outcome = run(_outcome(classic_server, **{option: value}))
    assert outcome["type"] == "error" and outcome["code"] == ErrorCode.UNSUPPORTED
    assert repr(option) in outcome["message"]


def test_an_ignored_prompt_is_accepted_with_a_warning(classic_server):
    outcome = run(_outcome(classic_server, prompt="a red boat"))
    assert outcome["type"] == "result"
    assert [warning["code"] for warning in outcome["warnings"]] == ["prompt_ignored"]
    assert "prompt" in outcome["warnings"][0]["message"]
    quiet = run(_outcome(classic_server, prompt=""))
    assert quiet["type"] == "result" and quiet["warnings"] == []


def test_sdk_raises_unsupported_for_an_option_the_engine_lacks(classic_server):
    canvas = small_image(32, 32)
    with Client(classic_server.url, token=classic_server.token) as client:
        with pytest.raises(Unsupported, match="steps"):
            client.fill(canvas, box_mask(32, 32, (4, 4, 8, 8)), steps=5)
        # The connection and the server keep serving.
        result = client.fill(canvas, box_mask(32, 32, (4, 4, 8, 8)), variations=1)
    assert len(result.arrays) == 1


def test_hello_lists_features_and_each_engines_capabilities(classic_server):
    with Client(classic_server.url, token=classic_server.token) as client:
        hello = client.hello
    assert {Feature.REFERENCES, Feature.WARNINGS, Feature.CAPABILITIES} <= set(hello.features)
    (classic,) = [engine for engine in hello.engines if engine.name == "classic"]
    capabilities = classic.capabilities
    assert capabilities is not None
    assert capabilities.prompt is False and capabilities.options == [] and capabilities.device_kind == "cpu"
    assert set(capabilities.modes) == set(Mode)


def test_capabilities_check_names_what_it_refuses():
    capabilities = EngineCapabilities(prompt=True, options=frozenset({"steps"}), modes=frozenset({Mode.FILL}))
    image = "0" * 64
    assert capabilities.check("e", FillRequest(image=image, steps=3, prompt="x")) == []
    cases = [
        (FillRequest(image=image, mode=Mode.ADD), ErrorCode.INVALID_REQUEST, "mode"),
        (FillRequest(image=image, guidance=2.0), ErrorCode.UNSUPPORTED, "'guidance'"),
        (FillRequest(image=image, references=[{"image": image, "role": "reference"}]), ErrorCode.UNSUPPORTED, "reference"),
        (FillRequest(image=image, references=[{"image": image, "role": "control", "control_type": "canny"}]),
         ErrorCode.UNSUPPORTED, "control"),
        (FillRequest(image=image, variations=9), ErrorCode.LIMIT_EXCEEDED, "variations"),
    ]
    for request, code, word in cases:
        with pytest.raises(RequestError) as caught:
            capabilities.check("e", request)
        assert caught.value.code is code and word in caught.value.message


def test_capabilities_refuse_options_that_do_not_exist():
    with pytest.raises(ValueError, match="unknown options"):
        EngineCapabilities(options=frozenset({"stepz"}))
    with pytest.raises(ValueError, match="control"):
        EngineCapabilities(control_types=frozenset({ControlType.CANNY}))
    assert set(GATED_OPTIONS) <= set(FillRequest.model_fields)


def test_each_diffusion_family_declares_what_its_engine_class_declares():
    # The provider lists capabilities without importing torch; they must be the class's.
    from genfill_server.engines.controlnet import ControlNetEngine
    from genfill_server.engines.flux_fill import FluxFillEngine
    from genfill_server.engines.sd3_inpaint import SD3InpaintEngine
    from genfill_server.engines.sd_inpaint import SDInpaintEngine

    classes = {"sd_inpaint": SDInpaintEngine, "sd3_inpaint": SD3InpaintEngine, "flux_fill": FluxFillEngine}
    fields = ("prompt", "options", "device_kind", "batching", "uses_prefill", "needs_colour_match", "modes")
    for family in builtin._FAMILIES:
        declared = classes[family.name].capabilities
        assert {f: getattr(family.capabilities, f) for f in fields} == {f: getattr(declared, f) for f in fields}
    listed, declared = builtin._CONTROLNET, ControlNetEngine.capabilities
    assert {f: getattr(listed, f) for f in fields} == {f: getattr(declared, f) for f in fields}


# Providers by entry point


def test_pyproject_registers_exactly_the_builtin_providers():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"][ENTRY_POINT_GROUP] == BUILTIN_PROVIDERS


_PROVIDER_MODULE = '''
from genfill_server.engines.base import DeviceKind, EngineCapabilities, EngineDefaults
from genfill_server.engines.spec import EngineSpec


class MirrorEngine:
    """Fills the selection with the image flipped left to right."""

    name = "mirror"
    capabilities = EngineCapabilities(prompt=False, device_kind=DeviceKind.CPU)
    defaults = EngineDefaults()

    def load(self):
        pass

    def close(self):
        pass

    def run(self, job, on_step):
        on_step(1, 1, None)
        return [job.image[:, ::-1].copy() for _ in job.seeds]


def provide(context):
    yield EngineSpec("mirror", lambda device, model: MirrorEngine(), MirrorEngine.capabilities, "test engine")


def broken(context):
    raise RuntimeError("this provider always fails")
'''


@pytest.fixture
def third_party_package(tmp_path, monkeypatch):
    """An installed package with an engine provider, as pip would lay it out: a module and a
    dist-info whose entry_points.txt registers it, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "genfill_mirror_provider.py").write_text(_PROVIDER_MODULE)
    info = site / "genfill_mirror-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: genfill-mirror\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nmirror = genfill_mirror_provider:provide\n"
        "broken = genfill_mirror_provider:broken\nmissing = genfill_no_such_module:provide\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("genfill_mirror_provider", None)


def test_an_installed_package_adds_an_engine_through_its_entry_point(third_party_package, caplog):
    providers = discover_providers()
    assert list(providers)[: len(BUILTIN_PROVIDERS)] == list(BUILTIN_PROVIDERS)
    assert "mirror" in providers and "missing" not in providers  # an import error is logged, not raised
    engines = default_engines(hf_cache=False)
    assert "mirror" in engines.specs and "classic" in engines.specs
    assert "broken" in caplog.text
    canvas = small_image(32, 32)
    mask = box_mask(32, 32, (8, 8, 8, 8))
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as server:
        with Client(server.url, token=server.token) as client:
            assert "mirror" in {engine.name for engine in client.hello.engines}
            result = client.fill(canvas, mask, engine="mirror", variations=1)
    assert result.engine == "mirror"
    composite = result.composite_array(0)
    np.testing.assert_array_equal(composite[mask == 0], canvas[mask == 0])
    assert not np.array_equal(composite[mask > 0], canvas[mask > 0])


def test_builtin_providers_work_without_installed_metadata(monkeypatch):
    # A source tree that was never pip-installed has no entry points at all.
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    assert list(discover_providers()) == list(BUILTIN_PROVIDERS)
    assert "classic" in default_engines(hf_cache=False).specs


# Lanes


class _Gate:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()


class _HeldEngine:
    """A GPU-kind engine that runs until the test releases it."""

    name = "held"
    capabilities = EngineCapabilities(prompt=True, device_kind=DeviceKind.GPU)
    defaults = EngineDefaults()

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    def load(self):
        pass

    def close(self):
        pass

    def run(self, job, on_step):
        self.gate.started.set()
        while not self.gate.release.wait(0.01):
            on_step(1, 2, None)  # raises JobCancelledError once cancelled
        return [job.image.copy() for _ in job.seeds]


def test_a_cpu_engine_job_does_not_wait_behind_a_gpu_engine_job():
    gate = _Gate()
    classic = default_engines(hf_cache=False).specs["classic"]
    held = EngineSpec("held", lambda device, model: _HeldEngine(gate), _HeldEngine.capabilities)
    engines = EngineSet(specs={"held": held, "classic": classic}, default_name="classic")

    async def scenario(server) -> None:
        gpu = await Session.open(server.url, server.token)
        cpu = await Session.open(server.url, server.token)
        image = await gpu.upload(small_image(32, 32))
        mask = await gpu.upload(box_mask(32, 32, (8, 8, 8, 8)))
        await cpu.upload(small_image(32, 32))
        await cpu.upload(box_mask(32, 32, (8, 8, 8, 8)))
        await gpu.send(submit_message("long", image, mask, engine="held", variations=1))
        assert await asyncio.to_thread(gate.started.wait, 10)
        started = time.monotonic()
        await cpu.send(submit_message("quick", image, mask, engine="classic", variations=1))
        quick = await cpu.job_outcome("quick", timeout_s=20)
        assert quick["type"] == "result"
        assert not gate.release.is_set(), "the classic job waited for the GPU job to end"
        assert time.monotonic() - started < 10
        gate.release.set()
        assert (await gpu.job_outcome("long", timeout_s=20))["type"] == "result"
        await gpu.close()
        await cpu.close()

    with BackgroundServer(ServerConfig(write_state_file=False), engines) as server:
        try:
            run(scenario(server))
        finally:
            gate.release.set()
    assert JobCancelledError  # the engine's cancel path is the shared one


# References


def test_a_reference_of_a_role_the_engine_lacks_is_refused_and_the_server_keeps_serving(classic_server):
    async def scenario() -> list[dict]:
        session = await Session.open(classic_server.url, classic_server.token)
        image = await session.upload(small_image(32, 32))
        mask = await session.upload(box_mask(32, 32, (8, 8, 8, 8)))
        reference = await session.upload(small_image(16, 16, seed=3))
        outcomes = []
        for job_id, references in [
            ("ref", [{"image": reference, "role": ReferenceRole.REFERENCE}]),
            ("ctl", [{"image": image, "role": "control", "control_type": "canny"}]),
        ]:
            await session.send(submit_message(job_id, image, mask, variations=1, references=references))
            outcomes.append(await session.job_outcome(job_id, timeout_s=30))
        await session.send(submit_message("after", image, mask, variations=1))
        outcomes.append(await session.job_outcome("after", timeout_s=30))
        await session.close()
        return outcomes

    refused_reference, refused_control, after = run(scenario())
    assert refused_reference["code"] == ErrorCode.UNSUPPORTED and "reference" in refused_reference["message"]
    assert refused_control["code"] == ErrorCode.UNSUPPORTED and "control" in refused_control["message"]
    assert after["type"] == "result"


def test_reference_fields_are_checked_by_role():
    image = "0" * 64
    with pytest.raises(ValueError, match="control_type"):
        FillRequest(image=image, references=[{"image": image, "role": "control"}])
    with pytest.raises(ValueError, match="only for role"):
        FillRequest(image=image, references=[{"image": image, "role": "init", "control_type": "canny"}])
    with pytest.raises(ValueError, match="extra"):
        FillRequest(image=image, references=[{"image": image, "role": "init", "colour": "red"}])
    request = FillRequest(image=image, references=[{"image": image, "role": "reference"}, {"image": image, "role": "init"}])
    assert [r.cropped for r in request.references] == [False, True]
