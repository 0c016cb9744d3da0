"""Random requests, files, bytes and arrays thrown at the SDK against the real server.

Whatever goes in, a call ends within its deadline with a result or a ``genfill.errors``
exception: never a hang, never a bare ``TypeError``, ``KeyError``, ``OSError`` or
Pillow error. The session's parser gets random frames too and may only raise
``ProtocolError``.
"""

from __future__ import annotations

import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
from genfill import AsyncClient, Client, errors
from genfill.session import ClientSession, FillResult
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from blocking import Blocking, Loop

CALL_TIMEOUT_S = 20
# A call's own deadlines are a few seconds; the bound checked is theirs plus slack for a
# machine shared with other test runs.
WALL_BOUND_S = 30

FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _Clients:
    """One connected client of one kind, replaced if an example ended its connection (a
    typed error already), so later examples still reach the server."""

    def __init__(self, kind: str, server) -> None:
        self.kind = kind
        self.server = server
        self.loop = Loop() if kind == "async" else None
        self.client = None

    def get(self):
        if self.client is None or self.client._session.closed is not None:
            options = {"open_timeout_s": 5, "reply_timeout_s": 5, "job_timeout_s": CALL_TIMEOUT_S}
            if self.loop is None:
                self.client = Client(self.server.url, token=self.server.token, **options)
            else:
                self.client = Blocking(AsyncClient(self.server.url, token=self.server.token, **options), self.loop)
            self.client.connect()
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(scope="module", params=["sync", "async"])
def clients(request, server):
    made = _Clients(request.param, server)
    yield made
    made.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files a user may pass by path, broken in every way a disk can break them."""
    folder = tmp_path_factory.mktemp("fuzz-files")
    good = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), 128, np.uint8)).save(good, "PNG")
    png = good.getvalue()
    made = {
        "good.png": png,
        "truncated.png": png[: len(png) // 2],
        "header-only.png": png[:33],
        "empty.png": b"",
        "text.png": b"not an image at all\n",
        "bomb.png": _png_claiming(40000, 40000),
        "over-limit.png": _png_claiming(9000, 9000),
        "big-but-broken.png": _png_claiming(3000, 3000),
        "jpeg-garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
    }
    for name, data in made.items():
        (folder / name).write_bytes(data)
    (folder / "a-folder.png").mkdir()
    paths = [str(folder / name) for name in made] + [str(folder / "a-folder.png"), str(folder / "missing.png")]
    return paths


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


_DTYPES = st.sampled_from([np.uint8, np.uint8, np.uint8, np.bool_, np.float32, np.int16, np.uint16, np.int64])
_SHAPES = st.one_of(
    st.tuples(st.integers(0, 12), st.integers(0, 12)),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 2, 3, 4, 5])),
    st.tuples(st.integers(0, 4)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)


@st.composite
def arrays(draw):
    shape = draw(_SHAPES)
    dtype = draw(_DTYPES)
    values = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, shape)
    return values.astype(dtype)


@st.composite
def good_pair(draw):
    """A valid canvas and selection, so that many examples reach the server."""
    width, height = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    canvas = rng.integers(0, 256, (height, width, draw(st.sampled_from([3, 4]))), dtype=np.uint8)
    mask = (rng.random((height, width)) < draw(st.floats(0.05, 1))).astype(np.uint8) * draw(st.sampled_from([1, 128, 255]))
    return canvas, mask


def pairs(files):
    odd = st.sampled_from([None, 3, "", b"\x89PNG", [[1, 2], [3, 4]], object()])
    anything = st.one_of(arrays(), st.sampled_from(files), odd)
    return st.one_of(good_pair(), good_pair(), st.tuples(anything, anything), st.tuples(good_pair().map(lambda p: p[0]), anything))


_NUMBERS = st.one_of(
    st.none(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
)
_OPTION_VALUES = {
    "mode": st.sampled_from(["fill", "add", "remove", "expand", "FILL", "", "paint"]),
    "variations": _NUMBERS,
    "seed": _NUMBERS,
    "steps": _NUMBERS,
    "strength": _NUMBERS,
    "guidance": _NUMBERS,
    "grow_px": _NUMBERS,
    "feather_px": _NUMBERS,
    "blend_px": _NUMBERS,
    "scheduler": st.one_of(st.sampled_from(["euler", "ddim", "nope"]), _NUMBERS),
    "engine": st.one_of(st.sampled_from(["classic", "sd15", "x" * 70]), st.text(max_size=8)),
    "model": st.one_of(st.none(), st.text(max_size=8)),
    "negative_prompt": st.one_of(st.text(max_size=20), _NUMBERS),
    "job_id": st.one_of(st.text(max_size=70), st.sampled_from(["ok-1", "bad id", ""])),
    "result_format": st.sampled_from(["rgba8", "png", "jpeg", None]),
    "upload_format": st.sampled_from(["rgba8", "png", "gray8", None]),
    "previews": st.one_of(st.booleans(), st.none(), st.text(max_size=3)),
    "control": st.one_of(
            st.none(),
            st.text(max_size=4),
            st.lists(
                st.one_of(
                    st.sampled_from(["canny", "depth", "nope"]), st.dictionaries(st.text(max_size=6), _NUMBERS, max_size=3)
                ),
                max_size=3,
            ),
        ),
    "references": st.one_of(
            st.none(),
            st.integers(),
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["reference", "control", "init", "region_mask", "nope", None])},
                    optional={
                        "image": st.one_of(arrays(), st.text(max_size=4)),
                        "weight": _NUMBERS,
                        "control_type": st.sampled_from(["canny", None]),
                    },
                ),
                max_size=2,
            ),
        ),
    "bogus_option": _NUMBERS,
}


@st.composite
def request_options(draw, most: int = 3):
    """Up to ``most`` request options, each with a random (often invalid) value."""
    names = draw(st.lists(st.sampled_from(sorted(_OPTION_VALUES)), max_size=most, unique=True))
    return {name: draw(_OPTION_VALUES[name]) for name in names}


def _assert_typed_and_bounded(call) -> object:
    started = time.monotonic()
    try:
        outcome = call()
    except errors.GenfillError as exc:
        assert exc.message and isinstance(exc.message, str)
        outcome = exc
    elapsed = time.monotonic() - started
    if currently_in_test_context():
        event(type(outcome).__name__)
    assert elapsed < WALL_BOUND_S, f"call took {elapsed:.1f} s"
    return outcome


@FUZZ
@given(data=st.data())
def test_random_fill_requests_end_typed_and_in_time(clients, files, data):
    image, mask = data.draw(pairs(files), label="image, mask")
    prompt = data.draw(st.one_of(st.just(""), st.text(max_size=30), st.just("p" * 5000), _NUMBERS), label="prompt")
    options = data.draw(request_options(), label="options")
    outcome = _assert_typed_and_bounded(lambda: clients.get().fill(image, mask, prompt, timeout_s=CALL_TIMEOUT_S, **options))
    if isinstance(outcome, FillResult):
        assert outcome.arrays and all(array.dtype == np.uint8 and array.ndim == 3 for array in outcome.arrays)


@FUZZ
@given(data=st.data())
def test_random_expand_requests_end_typed_and_in_time(clients, files, data):
    image = data.draw(pairs(files), label="image")[0]
    margins = {
        side: data.draw(st.one_of(st.integers(0, 24), st.integers(0, 24), st.integers(-3, 24), st.just(20000), _NUMBERS), label=side)
        for side in data.draw(st.sets(st.sampled_from(["left", "right", "top", "bottom"]), min_size=1), label="sides")
    }
    options = data.draw(request_options(), label="options")
    options.pop("mode", None)
    _assert_typed_and_bounded(lambda: clients.get().expand(image, timeout_s=CALL_TIMEOUT_S, **margins, **options))


def test_every_broken_file_is_a_typed_error(clients, files):
    fuzz_client = clients.get()
    mask = np.full((12, 12), 255, np.uint8)
    outcomes = {}
    for path in files:
        outcome = _assert_typed_and_bounded(lambda path=path: fuzz_client.fill(path, mask, variations=1, timeout_s=CALL_TIMEOUT_S))
        outcomes[path.rsplit("/", 1)[-1]] = type(outcome).__name__
    assert outcomes.pop("good.png") == "FillResult"
    assert outcomes.pop("over-limit.png") == "LimitExceeded"
    assert set(outcomes.values()) == {"InvalidInput"}, outcomes


@settings(max_examples=200, deadline=None)
@given(
    frame=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),
        st.builds(
            lambda kind, extra: f'{{"type": "{kind}"{extra}}}',
            st.sampled_from(
                ["hello", "result", "error", "progress", "accepted", "image_status", "cancelled", "uploaded", "x"]
            ),
            st.sampled_from(["", ', "job_id": 3', ', "code": 1', ', "present": "a"']),
        ),
    )
)
def test_random_frames_only_ever_raise_protocol_errors(frame):
    session = ClientSession()
    try:
        session.receive(frame)
    except errors.ProtocolError:
        pass
    try:
        session.receive_hello(frame)
    except errors.GenfillError:
        pass


def test_nan_and_inf_timeouts_are_refused(clients):
    fuzz_client = clients.get()
    for bad in (math.nan, math.inf, -1.0, 0):
        with pytest.raises(errors.InvalidInput):
            fuzz_client.fill(np.zeros((4, 4, 4), np.uint8), np.full((4, 4), 255, np.uint8), timeout_s=bad)


_URLS = st.one_of(
    st.text(max_size=30),
    st.builds(lambda scheme, rest: scheme + rest, st.sampled_from(["ws://", "wss://", "http://", "ws:/"]), st.text(max_size=25)),
    st.sampled_from(["ws://127.0.0.1:99999", "ws://[::1", "ws://127.0.0.1:9/path?q", "ws://:0", "ws://user@127.0.0.1:9", "ws://127.0.0.1:0"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=st.one_of(st.none(), _URLS, st.integers()), token=st.one_of(st.none(), st.text(max_size=10)), state=st.integers(0, 4))
def test_random_connection_settings_end_typed_and_in_time(tmp_path_factory, url, token, state):
    folder = tmp_path_factory.mktemp("state")
    state_files = {
        0: None,
        1: folder / "missing.json",
        2: folder,
        3: folder / "list.json",
        4: folder / "fields.json",
    }
    (folder / "list.json").write_text("[1, 2]")
    (folder / "fields.json").write_text('{"url": 5, "token": null, "pid": "x", "version": 1}')
    state_file = state_files[state]

    def connect_and_ask():
        client = Client(url, token=token, state_file=None if state_file is None else str(state_file), open_timeout_s=2, reply_timeout_s=2)
        try:
            client.health()
        finally:
            client.close()

    _assert_typed_and_bounded(connect_and_ask)
    if url is not None:
        def connect():
            client = Client(url, token=token, open_timeout_s=2)
            try:
                client.connect()
            finally:
                client.close()

        _assert_typed_and_bounded(connect)
