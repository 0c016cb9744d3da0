"""Protocol models, binary frames and the error-code map."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from genfill import errors
from genfill.images import decode_image_frame, frame_from_array
from genfill.protocol import (
    FRAME_HEADER_BYTES,
    ErrorCode,
    FillRequest,
    FrameError,
    ImageFormat,
    decode_frame,
    encode_frame,
    frame_image_id,
    json_schema,
    parse_client_message,
)
from pydantic import ValidationError

IMAGE_ID = "a" * 64


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_maps_to_a_specific_class(code):
    error = errors.error_for_code(code.value, "message", job_id="j")
    assert type(error) is not errors.GenfillError
    assert isinstance(error, errors.GenfillError)
    assert (error.code, error.job_id, str(error)) == (code.value, "j", "message")


def test_unknown_code_still_raises_a_genfill_error():
    error = errors.error_for_code("from_the_future", "later")
    assert type(error) is errors.GenfillError


@pytest.mark.parametrize(
    "fields",
    [
        {"strength": float("nan")},
        {"strength": float("inf")},
        {"strength": 1.5},
        {"steps": 0},
        {"variations": 0},
        {"seed": -1},
        {"seed": 2**32},
        {"guidance": -1},
        {"grow_px": -2},
        {"mode": "paint"},
        {"unexpected": 1},
        {"image": "not-a-hash"},
        {"expand": {"left": 0}},
    ],
)
def test_fill_request_rejects_bad_fields(fields):
    with pytest.raises(ValidationError):
        FillRequest(**{"image": IMAGE_ID, **fields})


def test_client_messages_parse_by_type():
    message = parse_client_message(json.dumps({"type": "cancel", "job_id": "job-1"}))
    assert message.type == "cancel" and message.job_id == "job-1"
    with pytest.raises(ValidationError):
        parse_client_message(json.dumps({"type": "cancel", "job_id": "spaces are not allowed"}))


def test_schema_covers_both_directions():
    schema = json_schema()
    text = json.dumps(schema)
    for name in ("submit", "has_images", "cancel", "hello", "progress", "result", "error", "cancelled"):
        assert f'"{name}"' in text


@pytest.mark.parametrize("fmt", [ImageFormat.RGBA8, ImageFormat.PNG])
def test_frames_round_trip(fmt):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    frame = frame_from_array(rgba, fmt)
    header, decoded = decode_image_frame(frame)
    assert (header.width, header.height, header.format) == (7, 5, fmt)
    assert header.image_id == frame_image_id(frame)
    np.testing.assert_array_equal(decoded, rgba)


def test_gray_frames_round_trip():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    header, decoded = decode_image_frame(frame_from_array(gray, ImageFormat.GRAY8))
    assert header.format is ImageFormat.GRAY8
    np.testing.assert_array_equal(decoded, gray)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"GFIM", "shorter than its header"),
        (b"XXXX" + bytes(FRAME_HEADER_BYTES), "does not start with GFIM"),
        (encode_frame(ImageFormat.RGBA8, 2, 2, bytes(16))[:-1], "payload is 15 bytes"),
        (encode_frame(ImageFormat.RGBA8, 2, 2, bytes(16)) + b"x", "payload is 17 bytes"),
        (encode_frame(ImageFormat.RGBA8, 2, 2, bytes(16))[:-1] + b"\x01", "does not match the sha256"),
        (b"GFIM\x09" + bytes(FRAME_HEADER_BYTES - 5), "unknown image format"),
    ],
)
def test_lying_frames_are_refused(frame, message):
    with pytest.raises(FrameError, match=message):
        decode_frame(frame)


def test_fill_module_needs_numpy_only():
    code = "import genfill.fill, sys; assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
