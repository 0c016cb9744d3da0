"""Bad input through the real server: every case gets a typed error, and the server keeps serving.

The corpus is ``tests/bad_input/corpus.py``. Each case runs on a fresh raw websocket to a real
server; after it, a valid job succeeds on the same connection (or, if the server closed it as the
case requires, on a new one). Hypothesis then fuzzes the message parser, both through the server
and through the functions its handler calls.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from genfill.images import frame_from_array
from genfill.protocol import (
    FRAME_MAGIC,
    ErrorCode,
    ImageFormat,
    Limits,
    frame_image_id,
    parse_client_message,
    parse_server_message,
)
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.errors import RequestError
from genfill_server.images import decode_upload
from genfill_server.session import _job_id_of, _validation_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from bad_input.corpus import CASES, MAX_MESSAGE_BYTES, Close, Error, Fixtures, Result, fixture_arrays
from bad_input.wire import LEAK_MARKERS, RawSocket, Session, assert_clean_error, submit_message

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(write_state_file=False, limits=Limits(max_message_bytes=MAX_MESSAGE_BYTES))
    with BackgroundServer(config) as running:
        yield running


async def upload_fixtures(session: Session) -> Fixtures:
    ids = {name: await session.upload(array) for name, array in fixture_arrays().items()}
    assert not session.errors(), session.errors()
    return Fixtures(**ids)


def test_corpus_is_the_size_the_report_gives():
    assert len(CASES) == len({case.name for case in CASES}) >= 80


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_input_case(server, case):
    session = await Session.open(server.url, server.token)
    fixtures = await upload_fixtures(session)
    for frame in case.frames(fixtures):
        await session.send(frame)
    expect = case.expect
    if isinstance(expect, Close):
        with pytest.raises(ConnectionClosed) as closed:
            await session.wait_for(lambda message: False, timeout_s=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == expect.code
        for marker in LEAK_MARKERS:
            assert marker not in closed.value.rcvd.reason
        assert not session.errors()
        # The server closed this connection; it goes on serving new ones.
        session = await Session.open(server.url, server.token)
    elif isinstance(expect, Error):
        error = await session.wait_for(lambda message: message["type"] == "error", timeout_s=20)
        assert error["code"] == expect.code, error
        assert_clean_error(error, case.echo)
    elif isinstance(expect, Result):
        outcome = await session.job_outcome(expect.job_id)
        assert outcome["type"] == "result", outcome
        assert not session.errors(), session.errors()
    result = await session.run_valid_job("valid-after")
    assert result["job_id"] == "valid-after"
    if isinstance(expect, Error):
        # Exactly one error per bad message: nothing else went wrong on the way.
        assert [e["code"] for e in session.errors()] == [expect.code]
    await session.close()


async def test_duplicate_submit_never_starts_a_second_job(server):
    session = await Session.open(server.url, server.token)
    fixtures = await upload_fixtures(session)
    message = submit_message("same", fixtures.image, fixtures.mask, variations=2)  # no seed: the server draws one
    await session.send(message)
    await session.send(message)
    first = await session.job_outcome("same")
    await session.send(message)  # a retry after the result replays it
    second = await session.wait_for(lambda m: m["type"] in ("result", "error") and m.get("job_id") == "same")
    assert first["type"] == second["type"] == "result"
    # A second run would have drawn new seeds; a replay has the same ones.
    assert first["variations"] == second["variations"]
    accepted = [m for m in session.messages if m["type"] == "accepted" and m["job_id"] == "same"]
    assert [m["duplicate"] for m in accepted] in ([False, True], [False])
    assert not session.errors()
    await session.close()


# Frames websockets' client refuses to send, on a plain socket.


async def test_invalid_utf8_text_frame_closes_1007(server):
    raw = RawSocket(server.url, server.token)
    assert raw.status == 101
    raw.send_frame(0x1, b'{"type":"cancel","job_id":"\xff\xfe"}')
    frames, code, reason = raw.read_until_close()
    assert code == 1007
    assert [opcode for opcode, _ in frames] == [0x1]  # hello only
    raw.close()
    session = await Session.open(server.url, server.token)
    await session.run_valid_job("after-utf8")
    await session.close()


async def test_unmasked_client_frame_closes_1002(server):
    raw = RawSocket(server.url, server.token)
    raw.send_frame(0x1, b'{"type":"cancel","job_id":"a"}', masked=False)
    _, code, _ = raw.read_until_close()
    assert code == 1002
    raw.close()
    session = await Session.open(server.url, server.token)
    await session.run_valid_job("after-unmasked")
    await session.close()


async def test_messages_after_close_are_ignored(server):
    session = await Session.open(server.url, server.token)
    fixtures = await upload_fixtures(session)
    raw = RawSocket(server.url, server.token)
    hello = raw.read_frame()
    assert hello is not None and json.loads(hello[1])["type"] == "hello"
    raw.send_close(1000)
    # RFC 6455 5.5.1: after a close frame the endpoint sends no more data frames; a client
    # that does anyway must not get a job started.
    raw.send_frame(0x1, submit_message("ghost", fixtures.image, fixtures.mask, variations=1).encode())
    raw.send_frame(0x2, frame_from_array(np.zeros((4, 4, 4), np.uint8)))
    frames, code, _ = raw.read_until_close()
    assert code == 1000
    assert frames == []
    assert raw.at_eof()
    raw.close()
    assert server.server.scheduler.queued() == 0
    await session.run_valid_job("after-close")
    await session.close()


# Fuzzing


REQUEST_FIELDS = [
    "image", "mask", "region", "prompt", "negative_prompt", "mode", "engine", "model", "variations", "seed",
    "steps", "strength", "guidance", "scheduler", "grow_px", "feather_px", "blend_px", "expand", "control",
]
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.sampled_from(["fill", "expand", "remove", "canny", "png", "rgba8", "a" * 64, "../etc/passwd"])
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def message_dicts(image_ids: list[str]):
    image_id = st.sampled_from(image_ids) | st.text(alphabet="0123456789abcdef", min_size=63, max_size=65)
    request = st.dictionaries(
        st.sampled_from(REQUEST_FIELDS) | st.text(max_size=8),
        json_values | image_id | st.integers(min_value=0, max_value=20),
        max_size=6,
    ).map(lambda fields: {"image": image_ids[0], **fields})
    job_id = st.text(alphabet="abcXYZ019_.:-/ é", min_size=0, max_size=70) | json_values
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["submit", "cancel", "has_images", "hello", "result"]) | st.text(max_size=10) | json_values},
        optional={
            "job_id": job_id,
            "request": request | json_values,
            "image_ids": st.lists(image_id, max_size=70) | json_values,
            "result_format": st.sampled_from(["rgba8", "png", "jpeg"]) | json_values,
            "previews": json_values,
            "extra": json_values,
        },
    )


def text_frames(image_ids: list[str]):
    return (
        message_dicts(image_ids).map(lambda m: json.dumps(m, allow_nan=True))
        | json_values.map(lambda v: json.dumps(v, allow_nan=True))
        | st.text(max_size=200)
        | message_dicts(image_ids).map(lambda m: json.dumps(m)).flatmap(
            lambda s: st.integers(0, max(0, len(s) - 1)).map(lambda cut: s[:cut])
        )
    )


def binary_frames():
    header = st.builds(
        lambda fmt, flags, width, height, digest: struct.pack(">4sBBHII32s", FRAME_MAGIC, fmt, flags, 0, width, height, digest),
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 2**32 - 1) | st.integers(0, 64),
        st.integers(0, 2**32 - 1) | st.integers(0, 64),
        st.binary(min_size=32, max_size=32),
    )
    valid = st.builds(
        lambda w, h, fmt: frame_from_array(np.zeros((h, w, 4), np.uint8), fmt),
        st.integers(1, 16),
        st.integers(1, 16),
        st.sampled_from([ImageFormat.RGBA8, ImageFormat.PNG]),
    )
    mutated = st.tuples(valid, st.integers(0, 200), st.binary(min_size=1, max_size=8)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
    )
    return st.binary(max_size=300) | st.tuples(header, st.binary(max_size=300)).map(b"".join) | mutated | valid


FUZZ_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)


def test_fuzz_parser_and_error_mapping():
    """The handler's parse path never raises anything but a typed error, for any text."""
    ran = []
    codes = {code.value for code in ErrorCode}

    @settings(max_examples=2000, **FUZZ_SETTINGS)
    @given(text_frames(["b" * 64, "c" * 64]))
    def check(data: str) -> None:
        ran.append(data)
        assert _job_id_of(data) is None or isinstance(_job_id_of(data), str)
        try:
            parse_client_message(data)
        except ValidationError as exc:
            error = _validation_error(exc)
            assert error.code in codes
            assert not any(marker in error.message for marker in ("Traceback", 'File "'))

    check()
    print(f"\nparser fuzz: {len(ran)} examples")
    assert len(ran) >= 1000


def test_fuzz_binary_upload_decoding():
    ran = []
    limits = Limits()

    @settings(max_examples=2000, **FUZZ_SETTINGS)
    @given(binary_frames())
    def check(frame: bytes) -> None:
        ran.append(frame)
        try:
            image = decode_upload(frame, limits)
        except RequestError as exc:
            assert exc.code in (ErrorCode.BAD_MESSAGE, ErrorCode.IMAGE_INVALID, ErrorCode.IMAGE_TOO_LARGE)
        else:
            assert image.image_id == frame_image_id(frame)

    check()
    print(f"\nbinary decode fuzz: {len(ran)} examples")
    assert len(ran) >= 1000


@pytest.fixture(scope="module")
def fuzz_server():
    limits = Limits(max_message_bytes=2**20, max_messages_per_second=1e6)
    with BackgroundServer(ServerConfig(write_state_file=False, limits=limits)) as running:
        yield running


def test_fuzz_through_the_server(fuzz_server):
    """Random text and binary frames on one connection: every answer is a valid server message,
    every error has a stable code and no internals, the connection stays open, and a valid job
    on it succeeds afterwards."""
    headers = {"Authorization": f"Bearer {fuzz_server.token}"}
    ran = []
    with sync_connect(fuzz_server.url, additional_headers=headers, compression=None, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        image = frame_from_array(np.random.default_rng(0).integers(0, 255, (16, 16, 4), dtype=np.uint8))
        mask = np.zeros((16, 16), np.uint8)
        mask[4:10, 4:10] = 255
        mask_frame = frame_from_array(mask, ImageFormat.GRAY8)
        image_ids = [frame_image_id(image), frame_image_id(mask_frame)]

        def exchange(frame: str | bytes) -> list:
            """Sends ``frame`` and a marker has_images; returns what came back before the marker."""
            marker = os.urandom(32).hex()
            ws.send(frame)
            ws.send(json.dumps({"type": "has_images", "image_ids": [marker]}))
            answers = []
            while True:
                data = ws.recv(timeout=30)
                if isinstance(data, bytes):
                    continue
                message = parse_server_message(data)
                if message.type == "image_status" and message.missing == [marker]:
                    return answers
                answers.append(message)

        for frame in (image, mask_frame):
            exchange(frame)

        @settings(max_examples=1000, **FUZZ_SETTINGS)
        @given(text_frames(image_ids) | binary_frames())
        def check(frame) -> None:
            ran.append(frame)
            for message in exchange(frame):
                if message.type == "error":
                    assert_clean_error(message.model_dump(mode="json"))

        check()
        # Jobs the fuzzer happened to submit validly may still run; then a real one succeeds.
        ws.send(submit_message("fuzz-after", image_ids[0], image_ids[1], variations=1))
        while True:
            message = parse_server_message(_next_text(ws))
            if getattr(message, "job_id", None) == "fuzz-after" and message.type in ("result", "error", "cancelled"):
                break
        assert message.type == "result", message
    print(f"\nserver fuzz: {len(ran)} examples")
    assert len(ran) >= 500


def _next_text(ws) -> str:
    while True:
        data = ws.recv(timeout=60)
        if isinstance(data, str):
            return data
