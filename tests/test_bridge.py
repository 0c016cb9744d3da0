"""The plug-in bridge against the real server, with no editor: an in-memory ``Document``.

Also pins the bridge's hand-written wire format to the pydantic protocol models, so the two
cannot drift: every frame the bridge sends and receives in these tests is validated by
``genfill.protocol``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from genfill import Client, fill
from genfill import protocol as p
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin_bridge"))

import genfill_bridge as gb  # noqa: E402
from genfill_bridge import frames as bridge_frames  # noqa: E402
from genfill_bridge import messages  # noqa: E402


class MemoryDocument(gb.Document):
    """A document held in numpy arrays, standing in for an editor's image."""

    def __init__(self, canvas: np.ndarray, selection: np.ndarray | None) -> None:
        self.canvas = canvas
        self.selection = selection
        self.reads: list[gb.Box] = []
        self.inserted: list[tuple[str, gb.Box, list[bytes], gb.Margins | None]] = []

    def size(self) -> gb.Size:
        return gb.Size(self.canvas.shape[1], self.canvas.shape[0])

    def check_supported(self) -> None:
        if self.canvas.dtype != np.uint8:
            raise gb.UnsupportedDocument(f"{self.canvas.dtype} documents are not supported")

    def selection_bounds(self) -> gb.Box | None:
        if self.selection is None or not self.selection.any():
            return None
        return gb.Box(*fill.mask_box(self.selection))

    def selection_pixels(self, box: gb.Box) -> bytes:
        return self.selection[box.y : box.bottom, box.x : box.right].tobytes()

    def pixels(self, box: gb.Box, source: str) -> bytes:
        self.reads.append(box)
        return self.canvas[box.y : box.bottom, box.x : box.right].tobytes()

    def insert_results(self, name, box, layers, grow) -> None:
        self.inserted.append((name, box, layers, grow))


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(ServerConfig(write_state_file=False)) as background:
        yield background


def _settings(server) -> gb.ServerSettings:
    return gb.ServerSettings(url=server.url, token=server.token)


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], axis=2)
    noise = rng.integers(0, 24, (height, width, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    return np.dstack([rgb, np.full((height, width), 255, np.uint8)])


class Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[str, str | bytes]] = []

    def __call__(self, direction: str, data: str | bytes) -> None:
        self.frames.append((direction, data))

    def validate(self) -> list[str]:
        """Validates every frame with the pydantic models; returns the message types seen."""
        kinds = []
        for direction, data in self.frames:
            if isinstance(data, bytes):
                p.decode_frame(data)
                kinds.append(f"{direction}:binary")
            elif direction == "send":
                kinds.append(f"send:{p.parse_client_message(data).type}")
            else:
                kinds.append(f"recv:{p.parse_server_message(data).type}")
        return kinds


# Geometry and frames: the same answers as the SDK, without numpy


@pytest.mark.parametrize("seed", range(40))
def test_context_box_matches_sdk(seed):
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(1, 3000, 2))
    selection = np.zeros((height, width), np.uint8)
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
    selection[y0:y1, x0:x1] = 255
    mask_box = gb.Box(*fill.mask_box(selection))
    for native in (None, 512, 1024):
        expected = fill.context_box(selection, native_size=native)
        assert gb.context_box(mask_box, gb.Size(width, height), native_size=native) == tuple(expected)


@pytest.mark.parametrize(("fmt", "channels"), [("rgba8", 4), ("gray8", 1)])
@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 5), (17, 2)])
def test_frames_match_protocol(fmt, channels, width, height):
    payload = bytes(range(256)) * (width * height * channels // 256) + bytes(width * height * channels % 256)
    frame = bridge_frames.encode_frame(fmt, width, height, payload)
    assert frame == p.encode_frame(p.ImageFormat(fmt), width, height, payload)
    header, decoded = p.decode_frame(frame)
    assert (header.format, header.width, header.height) == (fmt, width, height)
    assert bridge_frames.decode_frame(frame) == (fmt, width, height, header.image_id, payload)


def test_decode_frame_refuses_a_lying_header():
    frame = bytearray(p.encode_frame(p.ImageFormat.RGBA8, 2, 2, bytes(16)))
    frame[-1] = 1
    with pytest.raises(gb.ProtocolMismatch, match="sha256"):
        bridge_frames.decode_frame(bytes(frame))


def test_swap_red_blue_and_crop():
    bgra = bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert bridge_frames.swap_red_blue(bgra) == bytes([3, 2, 1, 4, 7, 6, 5, 8])
    image = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(4, 5, 4)
    assert bridge_frames.crop(image.tobytes(), 5, (1, 2, 3, 2), 4) == image[2:4, 1:4].tobytes()


# Messages: what the bridge builds validates; what the server may send, the bridge reads


@pytest.mark.parametrize(
    "options",
    [
        gb.FillOptions(),
        gb.FillOptions(prompt="a red boat", negative_prompt="blur", mode="add", engine="classic", model="m",
                       strength=0.75, variations=8, seed=2**32 - 1, steps=30, source="visible"),
        gb.FillOptions(mode="remove", seed=0),
        gb.FillOptions(mode="expand", expand=gb.Margins(left=3, bottom=64)),
    ],
)
def test_requests_validate_against_the_protocol(options):
    image, mask = "a" * 64, "b" * 64
    is_expand = options.mode == "expand"
    request = options.request(image, None if is_expand else mask, None if is_expand else (0, 4, 9, 7))
    submit = p.parse_client_message(messages.submit("job-1", request))
    # Nothing the bridge sent was dropped or changed by validation.
    assert json.loads(submit.request.model_dump_json(exclude_unset=True)) == request
    assert p.parse_client_message(messages.has_images([image, mask])).image_ids == [image, mask]
    assert p.parse_client_message(messages.cancel("job-1")).job_id == "job-1"


def test_modes_match_protocol():
    assert set(gb.MODES) == {mode.value for mode in p.Mode}


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "painting"}, {"variations": 0}, {"seed": -1}, {"strength": 1.5}, {"mode": "expand"},
     {"expand": gb.Margins(left=4)}],
)
def test_fill_options_refuse_bad_values(kwargs):
    with pytest.raises(ValueError):
        gb.FillOptions(**kwargs)


def _server_message_examples() -> list[p.BaseModel]:
    image = "c" * 64
    return [
        p.Hello(server_version="1", protocol_version=1, engines=[p.EngineInfo(name="classic", available=True, modes=[p.Mode.FILL])],
                models=[], default_engine="classic", limits=p.Limits()),
        p.ImageStatus(present=[image], missing=[]),
        p.Uploaded(image_id=image, width=3, height=2),
        p.Accepted(job_id="j", queue_position=0),
        p.Progress(job_id="j", step=1, total=3),
        p.Result(job_id="j", box=p.WireBox(x=0, y=0, width=1, height=1), variations=[p.Variation(image=image, seed=3)], engine="classic"),
        p.Error(code=p.ErrorCode.QUEUE_FULL, message="queue full"),
        p.Cancelled(job_id="j"),
    ]


def test_bridge_reads_every_server_message():
    examples = _server_message_examples()
    union = typing.get_args(typing.get_args(p.ServerMessage)[0])
    assert {model.model_fields["type"].default for model in union} == set(messages.SERVER_FIELDS)
    assert {type(example) for example in examples} == set(union)
    for example in examples:
        parsed = messages.parse_server_message(example.model_dump_json())
        assert parsed["type"] == example.type
        # A field the bridge reads must be one the model always sends.
        for name in messages.SERVER_FIELDS[example.type]:
            assert name in type(example).model_fields


def test_bridge_passes_unknown_server_messages_on_to_be_skipped():
    # Issue 12 changed this: an unknown type was a ProtocolMismatch; a newer server's
    # additions are now handed back for the client to skip.
    telemetry = messages.parse_server_message(json.dumps({"type": "telemetry", "load": 0.5}))
    assert telemetry == {"type": "telemetry", "load": 0.5}
    assert not messages.is_known(telemetry)
    with pytest.raises(gb.ProtocolMismatch, match="lacks box"):
        messages.parse_server_message(json.dumps({"type": "result", "job_id": "j", "variations": [], "engine": "x"}))
    with pytest.raises(gb.ProtocolMismatch, match="without a type"):
        messages.parse_server_message(json.dumps({"kind": "result"}))


def test_bridge_knows_every_error_code():
    assert messages.ERROR_CODES == {code.value for code in p.ErrorCode}


def test_bridge_imports_with_the_standard_library_alone():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import genfill_bridge, genfill_bridge.client;"
        "bad = [m for m in ('numpy', 'pydantic', 'PIL', 'websockets') if m in sys.modules]; print(bad)"
    )
    # -S: no site-packages at all, as in an editor's embedded Python.
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT / "plugin_bridge")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Against the real server


def test_small_selection_on_a_large_canvas_sends_only_its_context(server):
    canvas = _photo(3001, 2003)
    selection = np.zeros(canvas.shape[:2], np.uint8)
    selection[0:37, 1200:1251] = 255  # odd size, touching the top edge
    document = MemoryDocument(canvas, selection)
    options = gb.FillOptions(prompt="sky", variations=2, seed=7)
    prepared = gb.prepare(document, options)
    assert document.reads == [prepared.region]
    assert prepared.region.width * prepared.region.height < canvas.shape[0] * canvas.shape[1] / 4
    assert prepared.upload_bytes < 6 * 2**20

    recorder = Recorder()
    events: list[gb.JobEvent] = []
    result = gb.run(prepared, _settings(server), on_event=events.append, trace=recorder)
    kinds = recorder.validate()
    assert kinds[:5] == ["recv:hello", "send:has_images", "recv:image_status", "send:binary", "send:binary"]
    assert "send:submit" in kinds and kinds[-1] == "recv:result"
    assert events[0].kind == "accepted" and any(e.kind == "progress" for e in events)
    assert [v.seed for v in result.variations] == [7, 8]

    gb.apply(document, prepared, result)
    name, box, layers, grow = document.inserted[0]
    assert (name, grow) == ("sky", None)
    assert gb.Box(1200, 0, 51, 37) == box  # the selection's own box: the server sends only what changes
    for layer in layers:
        rgba = np.frombuffer(layer, np.uint8).reshape(box.height, box.width, 4)
        outside = selection[box.y : box.bottom, box.x : box.right] == 0
        assert not rgba[outside].any()
        composite = fill.composite(canvas, rgba, fill.Box(*box))
        assert np.array_equal(composite[selection == 0], canvas[selection == 0])

    # The SDK, given the same request, produces the same pixels: the bridge sends the same thing.
    with Client(server.url, token=server.token) as client:
        expected = client.fill(canvas, selection, "sky", variations=2, seed=7)
    assert tuple(expected.box) == tuple(box)
    assert [a.tobytes() for a in expected.arrays] == layers


def test_expand_sends_the_canvas_and_returns_the_grown_box(server):
    canvas = _photo(33, 21)
    document = MemoryDocument(canvas, None)
    options = gb.FillOptions(mode="expand", expand=gb.Margins(left=5, top=3), variations=1, seed=1)
    prepared = gb.prepare(document, options)
    result = gb.run(prepared, _settings(server), trace=(recorder := Recorder()))
    recorder.validate()
    assert prepared.result_canvas == gb.Size(38, 24)
    assert gb.Box(0, 0, 38, 24).contains(result.box)
    gb.apply(document, prepared, result)
    assert document.inserted[0][3] == gb.Margins(left=5, top=3)


def test_no_selection_is_refused_before_connecting():
    document = MemoryDocument(_photo(8, 8), np.zeros((8, 8), np.uint8))
    with pytest.raises(gb.NoSelection, match="Nothing is selected"):
        gb.prepare(document, gb.FillOptions())


def test_cancel_stops_a_running_job(server):
    canvas = _photo(900, 700)
    selection = np.zeros(canvas.shape[:2], np.uint8)
    selection[100:600, 100:800] = 255
    prepared = gb.prepare(MemoryDocument(canvas, selection), gb.FillOptions(variations=8, seed=3))
    cancel = threading.Event()
    recorder = Recorder()

    def on_event(event: gb.JobEvent) -> None:
        if event.kind == "progress":
            cancel.set()

    started = time.monotonic()
    with pytest.raises(gb.JobCancelled):
        gb.run(prepared, _settings(server), on_event=on_event, cancel=cancel, trace=recorder)
    assert time.monotonic() - started < 30
    kinds = recorder.validate()
    assert "send:cancel" in kinds and kinds[-1] == "recv:cancelled"


def test_cancel_before_the_job_starts(server):
    canvas = _photo(64, 64)
    selection = np.zeros((64, 64), np.uint8)
    selection[10:20, 10:20] = 255
    prepared = gb.prepare(MemoryDocument(canvas, selection), gb.FillOptions(variations=1))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(gb.JobCancelled):
        gb.run(prepared, _settings(server), cancel=cancel)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _small_job() -> gb.PreparedFill:
    selection = np.zeros((16, 16), np.uint8)
    selection[4:9, 0:3] = 255
    return gb.prepare(MemoryDocument(_photo(16, 16), selection), gb.FillOptions(variations=1))


def test_server_not_running_is_said_plainly():
    started = time.monotonic()
    with pytest.raises(gb.ServerNotRunning, match="not running at ws://127.0.0.1:.*genfill serve"):
        gb.run(_small_job(), gb.ServerSettings(url=f"ws://127.0.0.1:{_free_port()}", token="x"))
    assert time.monotonic() - started < 5


def test_missing_state_file_is_said_plainly(tmp_path):
    with pytest.raises(gb.ServerNotRunning, match="not running.*no state file"):
        gb.run(_small_job(), gb.ServerSettings(state_file=str(tmp_path / "server.json")))


def test_state_file_gives_url_and_token(tmp_path):
    state_file = tmp_path / "state" / "server.json"
    with BackgroundServer(ServerConfig(state_file=state_file)) as server:
        result = gb.run(_small_job(), gb.ServerSettings(state_file=str(state_file)))
        assert result.box.x == 0 and len(result.variations) == 1
        # Another server's address never receives this server's token.
        url, token = gb.ServerSettings(url="ws://192.0.2.1:7860", state_file=str(state_file)).resolve()
        assert (url, token) == ("ws://192.0.2.1:7860", "")
        assert gb.ServerSettings(state_file=str(state_file)).resolve() == (server.url, server.token)


def test_wrong_token_is_said_plainly(server):
    with pytest.raises(gb.TokenRejected, match="refused the token"):
        gb.run(_small_job(), gb.ServerSettings(url=server.url, token="not-the-token"))


def test_server_stopping_mid_job_is_said_plainly():
    canvas = _photo(900, 700)
    selection = np.zeros(canvas.shape[:2], np.uint8)
    selection[100:600, 100:800] = 255
    prepared = gb.prepare(MemoryDocument(canvas, selection), gb.FillOptions(variations=8))
    background = BackgroundServer(ServerConfig(write_state_file=False))
    background.start()
    stopper = threading.Thread(target=background.stop)

    def on_event(event: gb.JobEvent) -> None:
        if event.kind == "progress" and not stopper.is_alive():
            stopper.start()

    try:
        with pytest.raises(gb.ConnectionLost, match="was stopped|closed the connection"):
            gb.run(prepared, _settings(background), on_event=on_event)
    finally:
        if stopper.is_alive():
            stopper.join()
        background.stop()


def test_vendored_websockets_is_the_one_used():
    from genfill_bridge import client

    assert client.connect.__module__ == "genfill_bridge._vendor.websockets.sync.client"
    assert (ROOT / "plugin_bridge/genfill_bridge/_vendor/websockets/LICENSE").is_file()


# The installer: per-user folders and kritarc


@pytest.mark.parametrize(
    ("platform", "env", "krita", "gimp"),
    [
        ("linux", {}, "/h/.local/share/krita/pykrita", "/h/.config/GIMP/3.0/plug-ins"),
        ("linux", {"XDG_DATA_HOME": "/d", "XDG_CONFIG_HOME": "/c"}, "/d/krita/pykrita", "/c/GIMP/3.0/plug-ins"),
        ("darwin", {}, "/h/Library/Application Support/krita/pykrita", "/h/Library/Application Support/GIMP/3.0/plug-ins"),
        ("win32", {"APPDATA": "/a"}, "/a/krita/pykrita", "/a/GIMP/3.0/plug-ins"),
    ],
)
def test_plugin_folders(platform, env, krita, gimp):
    from genfill_bridge import install

    assert install.plugin_folder("krita", platform=platform, env=env, home=Path("/h")) == Path(krita)
    assert install.plugin_folder("gimp", platform=platform, env=env, home=Path("/h")) == Path(gimp)


def test_enable_in_kritarc_keeps_the_rest(tmp_path):
    from genfill_bridge.install import enable_in_kritarc

    kritarc = tmp_path / "kritarc"
    kritarc.write_text("[General]\nx=1\n\n[python]\nenable_other=true\nenable_genfill_krita=false\n\n[Z]\ny=2\n")
    enable_in_kritarc(kritarc)
    enable_in_kritarc(kritarc)
    text = kritarc.read_text()
    assert text.count("enable_genfill_krita=true") == 1 and "enable_genfill_krita=false" not in text
    assert "[General]\nx=1" in text and "enable_other=true" in text and "[Z]\ny=2" in text


def test_install_copies_a_self_contained_plugin(tmp_path):
    from genfill_bridge import install

    gimp = install.install("gimp", tmp_path / "gimp")
    script = tmp_path / "gimp/genfill/genfill.py"
    assert gimp.files == [script] and os.access(script, os.X_OK)
    krita = install.install("krita", tmp_path / "krita")
    assert krita.enabled_in is None
    for folder in (tmp_path / "gimp/genfill", tmp_path / "krita/genfill_krita"):
        assert (folder / "genfill_bridge/_vendor/websockets/sync/client.py").is_file()
        assert not (folder / "genfill_bridge/install.py").exists()
        assert not list(folder.rglob("__pycache__"))


def test_catalogue_lists_the_servers_engines(server):
    catalogue = gb.fetch_catalogue(_settings(server))
    assert catalogue["default_engine"] in [engine["name"] for engine in catalogue["engines"]]
    assert p.Limits(**catalogue["limits"]).max_variations >= 1


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"XDG_STATE_HOME": "/tmp/somewhere-else"},
        {"GENFILL_STATE_FILE": "/tmp/explicit/server.json"},
    ],
)
def test_bridge_finds_the_state_file_where_the_server_writes_it(monkeypatch, environment):
    # The bridge keeps its own stdlib copy of the path rules (editors have no pydantic); it
    # must not drift from the SDK's, which the server uses to write the file.
    from genfill.state import default_state_path
    from genfill_bridge import settings

    for name in ("XDG_STATE_HOME", "GENFILL_STATE_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert settings.default_state_path() == default_state_path()


def test_a_cloud_model_is_labelled_with_the_host_its_image_goes_to():
    from genfill_bridge.catalogue import choices, model_label

    local = {"name": "sd15", "engine": "sd_inpaint"}
    cloud = {"name": "gpt-image-1", "engine": "openai", "remote": True, "host": "api.openai.com"}
    assert model_label(local) == "sd15 (sd_inpaint)"
    assert model_label(cloud) == "gpt-image-1 (openai) - image sent to api.openai.com"
    catalogue = {"default_engine": "classic", "engines": [], "models": [local, cloud]}
    labels = [label for label, _ in choices(catalogue, "fill").models]
    assert "gpt-image-1 (openai) - image sent to api.openai.com" in labels


def test_a_cloud_engine_is_labelled_with_the_host_its_image_goes_to():
    """Picking a cloud engine with its default model sends the image as picking the model does."""
    from genfill_bridge.catalogue import choices, engine_label

    engines = [{"name": "classic", "modes": ["fill"]}, {"name": "bfl", "modes": ["fill"]}]
    models = [{"name": "flux-pro-1.0-fill", "engine": "bfl", "remote": True, "host": "api.bfl.ai"}]
    catalogue = {"default_engine": "bfl", "engines": engines, "models": models}
    assert engine_label(catalogue, "classic") == "classic"
    assert engine_label(catalogue, "bfl") == "bfl - image sent to api.bfl.ai"
    assert choices(catalogue, "fill").engines == [
        ("Server default (bfl - image sent to api.bfl.ai)", ""), ("classic", "classic"),
        ("bfl - image sent to api.bfl.ai", "bfl")]


@pytest.mark.parametrize("native", [None, 512, 1024])
@pytest.mark.parametrize("canvas_size, selected", [((3000, 2000), (2500, 100, 80, 60)), ((301, 203), (250, 0, 51, 37)),
                                                   ((2400, 900), (10, 700, 900, 190))])
def test_preview_box_is_the_servers_context_box(canvas_size, selected, native):
    """The box previews picture: what the server crops from the region the bridge sends."""
    width, height = canvas_size
    x, y, w, h = selected
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 255
    region = gb.region_to_send(gb.Box(*selected), gb.Size(width, height))
    prepared = gb.PreparedFill(gb.FillOptions(), {}, {}, gb.Size(width, height), region, gb.Box(*selected))
    crop = mask[region.y : region.bottom, region.x : region.right]
    server = fill.context_box(crop, native_size=native)
    expected = (server.x + region.x, server.y + region.y, server.width, server.height)
    assert tuple(gb.preview_box(prepared, native)) == expected


def test_native_size_comes_from_the_model_else_the_engine():
    hello = {"default_engine": "sd", "engines": [{"name": "sd", "capabilities": {"native_size": 768}},
                                                 {"name": "classic", "capabilities": {}}],
             "models": [{"name": "tiny", "engine": "sd", "native_size": 64}]}
    assert gb.native_size_for(hello, {"model": "tiny"}) == 64
    assert gb.native_size_for(hello, {}) == 768
    assert gb.native_size_for(hello, {"engine": "classic"}) is None
    assert gb.native_size_for({}, {}) is None
