"""The bad-input corpus: every malformed, hostile or merely unusual thing a client can send.

Each ``Case`` names the frames to send on a fresh connection and what the server must answer:
an error with a stable code, a close code, or (for unusual but valid input) a normal answer.
Frames are built from a ``Fixtures`` of images the test uploaded beforehand, so cases can refer
to a real image id. ``test_bad_input.py`` runs every case against a real server and checks that
a valid job succeeds after each one.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from genfill.images import frame_from_array
from genfill.protocol import FRAME_MAGIC, ImageFormat, encode_frame
from PIL import Image

from .wire import box_mask, small_image, submit_message

MAX_MESSAGE_BYTES = 4 * 2**20
"""The message size limit of the corpus server: small, so the oversize cases stay cheap."""

SIZE = 32


@dataclass(frozen=True)
class Fixtures:
    """Image ids already on the server (uploaded by a connection the test keeps open)."""

    image: str
    mask: str
    empty_mask: str
    small_mask: str
    clear_alpha_mask: str
    transparent_image: str


def fixture_arrays() -> dict[str, np.ndarray]:
    mask_rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    mask_rgba[..., :3] = 255  # uniform colour, alpha 0 everywhere: a selection layer with nothing selected
    transparent = small_image(SIZE, SIZE, seed=3)
    transparent[..., 3] = 0
    return {
        "image": small_image(SIZE, SIZE, seed=1),
        "mask": box_mask(SIZE, SIZE, (8, 8, 12, 12)),
        "empty_mask": np.zeros((SIZE, SIZE), np.uint8),
        "small_mask": box_mask(SIZE // 2, SIZE // 2, (2, 2, 4, 4)),
        "clear_alpha_mask": mask_rgba,
        "transparent_image": transparent,
    }


@dataclass(frozen=True)
class Error:
    code: str


@dataclass(frozen=True)
class Close:
    code: int


@dataclass(frozen=True)
class Result:
    job_id: str


@dataclass(frozen=True)
class Uploaded:
    width: int
    height: int


Expect = Error | Close | Result | Uploaded


@dataclass(frozen=True)
class Case:
    name: str
    frames: Callable[[Fixtures], list[str | bytes]]
    expect: Expect
    echo: str | None = None
    """Client input the error message may quote back (it is the client's, not the server's)."""


def text(payload: str) -> Callable[[Fixtures], list[str | bytes]]:
    return lambda fx: [payload]


def binary(payload: bytes) -> Callable[[Fixtures], list[str | bytes]]:
    return lambda fx: [payload]


def submit(job_id: str = "bad", *, mask: str | None = "mask", image: str = "image", **request) -> Callable:
    """A submit of the corpus image; ``mask``/``image`` name a fixture or are a literal id."""

    def build(fx: Fixtures) -> list[str | bytes]:
        image_id = getattr(fx, image, image)
        mask_id = None if mask is None else getattr(fx, mask, mask)
        return [submit_message(job_id, image_id, mask_id, **request)]

    return build


def raw_submit(body: str) -> Callable:
    """A submit whose request JSON is spliced in as text (for NaN, Infinity, huge numbers)."""
    return lambda fx: [
        '{"type":"submit","job_id":"raw","request":{"image":"%s","mask":"%s",%s}}' % (fx.image, fx.mask, body)
    ]


# PNG builders


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose IHDR claims ``width`` x ``height`` RGBA pixels: a bomb that
    would take width*height*4 bytes to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    # The first rows, all zero: deflate turns 100k x 100k x 4 bytes into a few kilobytes.
    idat = zlib.compress(b"\x00" * (width * 4 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_frame(png: bytes, width: int, height: int) -> bytes:
    return encode_frame(ImageFormat.PNG, width, height, png)


def raw_header(fmt: int, width: int, height: int, payload: bytes, digest: bytes | None = None) -> bytes:
    digest = hashlib.sha256(payload).digest() if digest is None else digest
    return struct.pack(">4sBBHII32s", FRAME_MAGIC, fmt, 0, 0, width, height, digest) + payload


def _rgba_png() -> bytes:
    return png_bytes(Image.fromarray(small_image(SIZE, SIZE, seed=5)))


def _gray16_png() -> bytes:
    gray = (np.arange(SIZE * SIZE, dtype=np.uint32) * 61 % 2**16).astype("<u2")
    return png_bytes(Image.frombytes("I;16", (SIZE, SIZE), gray.tobytes()))


def _rgb16_png() -> bytes:
    """A 48-bit RGB PNG, written by hand: Pillow cannot save 16-bit colour."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 2**16, (SIZE, SIZE, 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(SIZE))
    ihdr = struct.pack(">IIBBBBB", SIZE, SIZE, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def _palette_png() -> bytes:
    image = Image.fromarray(small_image(SIZE, SIZE, seed=9)[..., :3]).quantize(colors=16)
    return png_bytes(image, transparency=0)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(small_image(SIZE, SIZE)[..., :3]).save(buffer, format="JPEG")
    return buffer.getvalue()


def upload_and_fill(job_id: str, frame: Callable[[], bytes], **request) -> Callable:
    """Uploads one image frame, then fills it with the corpus mask."""

    def build(fx: Fixtures) -> list[str | bytes]:
        data = frame()
        image_id = hashlib.sha256(data[48:]).hexdigest()
        return [data, submit_message(job_id, image_id, fx.mask, variations=1, **request)]

    return build


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


HEX_A = "a" * 64
CASES: list[Case] = [
    # Not JSON, or JSON that is no message.
    Case("invalid_json", text('{"type": "submit", "job_id": '), Error("bad_message")),
    Case("empty_text_frame", text(""), Error("bad_message")),
    Case("json_array", text("[]"), Error("bad_message")),
    Case("json_null", text("null"), Error("bad_message")),
    Case("json_number", text("42"), Error("bad_message")),
    Case("json_string", text('"submit"'), Error("bad_message")),
    Case("deeply_nested_json", text(_deep(100_000)), Error("bad_message")),
    Case("deeply_nested_field", text('{"type":"cancel","job_id":%s}' % _deep(50_000)), Error("bad_message")),
    Case("nul_bytes", text('{"type":"cancel","job_id":"a\\u0000b"}'), Error("bad_message")),
    # Unknown type, missing and extra fields, wrong types.
    Case("unknown_type", text('{"type":"explode","job_id":"a"}'), Error("bad_message")),
    Case("missing_type", text('{"job_id":"a"}'), Error("bad_message")),
    Case("type_not_string", text('{"type":5}'), Error("bad_message")),
    Case("submit_missing_job_id", lambda fx: ['{"type":"submit","request":{"image":"%s"}}' % fx.image], Error("bad_message")),
    Case("submit_missing_request", text('{"type":"submit","job_id":"a"}'), Error("invalid_request")),
    Case("request_missing_image", text('{"type":"submit","job_id":"a","request":{"prompt":"x"}}'), Error("invalid_request")),
    Case("cancel_extra_field", text('{"type":"cancel","job_id":"a","force":true}'), Error("bad_message")),
    Case("request_extra_field", submit(sampler="euler"), Error("invalid_request")),
    Case("request_path_field", submit(model_path="/etc/passwd"), Error("invalid_request")),
    Case("job_id_not_string", text('{"type":"cancel","job_id":7}'), Error("bad_message")),
    Case("job_id_path", text('{"type":"cancel","job_id":"../../etc/passwd"}'), Error("bad_message")),
    Case("job_id_too_long", text('{"type":"cancel","job_id":"%s"}' % ("j" * 65)), Error("bad_message")),
    Case("job_id_empty", text('{"type":"cancel","job_id":""}'), Error("bad_message")),
    Case("steps_string", submit(steps="ten"), Error("invalid_request")),
    Case("variations_fraction", submit(variations=2.5), Error("invalid_request")),
    Case("prompt_not_string", submit(prompt=["a", "b"]), Error("invalid_request")),
    Case("control_not_list", submit(control={"type": "canny"}), Error("invalid_request")),
    Case(
        "result_format_unknown",
        lambda fx: [json.dumps({"type": "submit", "job_id": "f", "result_format": "jpeg", "request": {"image": fx.image}})],
        Error("bad_message"),
    ),
    # NaN, infinity, negative and out-of-range numbers.
    Case("strength_nan", raw_submit('"strength":NaN'), Error("invalid_request")),
    Case("guidance_infinity", raw_submit('"guidance":Infinity'), Error("invalid_request")),
    Case("strength_minus_infinity", raw_submit('"strength":-Infinity'), Error("invalid_request")),
    Case("strength_huge_exponent", raw_submit('"strength":1e999'), Error("invalid_request")),
    Case("steps_negative", submit(steps=-5), Error("invalid_request")),
    Case("steps_zero", submit(steps=0), Error("invalid_request")),
    Case("steps_over_limit", submit(steps=1000), Error("limit_exceeded")),
    Case("steps_astronomic", raw_submit('"steps":' + "9" * 400), Error("limit_exceeded")),
    Case("seed_negative", submit(seed=-1), Error("invalid_request")),
    Case("seed_over_32_bits", submit(seed=2**32), Error("invalid_request")),
    Case("strength_negative", submit(strength=-0.5), Error("invalid_request")),
    Case("strength_over_one", submit(strength=1.5), Error("invalid_request")),
    Case("guidance_over_range", submit(guidance=31), Error("invalid_request")),
    Case("variations_zero", submit(variations=0), Error("invalid_request")),
    Case("variations_over_limit", submit(variations=9), Error("limit_exceeded")),
    Case("grow_px_huge", submit(grow_px=10**6), Error("invalid_request")),
    Case("region_negative", submit(region={"x": -1, "y": 0, "width": 4, "height": 4}), Error("invalid_request")),
    Case("mode_unknown", submit(mode="explode"), Error("invalid_request")),
    Case("too_many_controls", submit(control=[{"type": "canny"}] * 5), Error("invalid_request")),
    Case("prompt_1_mb", submit(prompt="a" * 2**20), Error("limit_exceeded")),
    Case("negative_prompt_1_mb", submit(negative_prompt="b" * 2**20), Error("limit_exceeded")),
    # Requests that reference images wrongly or make no sense together.
    Case("image_id_is_a_path", submit(image="/etc/passwd"), Error("invalid_request")),
    Case("unknown_image_hash", submit(image=HEX_A), Error("unknown_image")),
    Case("unknown_mask_hash", submit(mask=HEX_A), Error("unknown_image")),
    Case("mask_size_mismatch", submit(mask="small_mask"), Error("size_mismatch")),
    Case("empty_mask", submit(mask="empty_mask"), Error("empty_selection")),
    Case("mask_all_zero_alpha", submit(mask="clear_alpha_mask"), Error("empty_selection")),
    Case("fill_without_mask", submit(mask=None), Error("invalid_request")),
    Case("expand_without_margins", submit(mask=None, mode="expand"), Error("invalid_request")),
    Case("expand_margins_all_zero", submit(mask=None, mode="expand", expand={"left": 0}), Error("invalid_request")),
    Case(
        "expand_past_pixel_limit",
        submit(mask=None, mode="expand", expand={"left": 16384, "right": 16384, "top": 16384, "bottom": 16384}),
        Error("image_too_large"),
    ),
    Case("expand_margin_over_range", submit(mask=None, mode="expand", expand={"left": 10**6}), Error("invalid_request")),
    Case("unknown_engine", submit(engine="os.system"), Error("engine_unavailable")),
    Case("model_is_a_path", submit(model="../../../../etc/passwd"), Error("model_not_found"), echo="../../../../etc/passwd"),
    Case("has_images_too_many", lambda fx: [json.dumps({"type": "has_images", "image_ids": [HEX_A] * 65})], Error("bad_message")),
    Case("has_images_not_hex", text('{"type":"has_images","image_ids":["../x"]}'), Error("bad_message")),
    Case("cancel_unknown_job", text('{"type":"cancel","job_id":"nobody"}'), Error("unknown_job")),
    Case(
        "job_id_in_use",
        lambda fx: [
            submit_message("twice", fx.image, fx.mask, variations=1, seed=1),
            submit_message("twice", fx.image, fx.mask, variations=1, seed=2),
        ],
        Error("job_id_in_use"),
    ),
    # Binary frames that lie or are not images.
    Case("binary_empty", binary(b""), Error("bad_message")),
    Case("binary_no_header", binary(b"GFIM\x00"), Error("bad_message")),
    Case("binary_json", binary(b'{"type":"cancel","job_id":"a"}' + b" " * 40), Error("bad_message")),
    Case("binary_bad_magic", binary(raw_header(0, 1, 1, b"\0\0\0\0").replace(b"GFIM", b"JPEG", 1)), Error("bad_message")),
    Case("binary_unknown_format", binary(raw_header(9, 1, 1, b"\0\0\0\0")), Error("bad_message")),
    Case("binary_zero_width", binary(raw_header(0, 0, 1, b"")), Error("bad_message")),
    Case("binary_header_bigger_than_payload", binary(raw_header(0, 8, 8, b"\0" * 100)), Error("bad_message")),
    Case("binary_header_smaller_than_payload", binary(raw_header(0, 2, 2, b"\0" * 100)), Error("bad_message")),
    Case("binary_wrong_sha256", binary(raw_header(0, 1, 1, b"\0\0\0\0", digest=b"\1" * 32)), Error("bad_message")),
    Case("binary_side_over_limit", binary(raw_header(1, 20_000, 1, b"\0" * 20_000)), Error("image_too_large")),
    Case("png_not_an_image", lambda fx: [png_frame(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, 32, 32)], Error("image_invalid")),
    Case("png_random_bytes", lambda fx: [png_frame(np.random.default_rng(0).bytes(4096), 32, 32)], Error("image_invalid")),
    Case("png_truncated", lambda fx: [png_frame(_rgba_png()[: len(_rgba_png()) // 2], SIZE, SIZE)], Error("image_invalid")),
    Case("png_is_jpeg", lambda fx: [png_frame(_jpeg(), SIZE, SIZE)], Error("image_invalid")),
    Case("png_size_differs_from_header", lambda fx: [png_frame(_rgba_png(), SIZE + 1, SIZE)], Error("image_invalid")),
    Case("png_bomb_100k", lambda fx: [png_frame(png_claiming(100_000, 100_000), 100_000, 100_000)], Error("image_too_large")),
    Case("png_bomb_behind_small_header", lambda fx: [png_frame(png_claiming(100_000, 100_000), 64, 64)], Error("image_too_large")),
    # Unusual but valid input: accepted, and a job on it succeeds.
    Case("png_gray_16_bit", upload_and_fill("gray16", lambda: png_frame(_gray16_png(), SIZE, SIZE)), Result("gray16")),
    Case("png_rgb_16_bit", upload_and_fill("rgb16", lambda: png_frame(_rgb16_png(), SIZE, SIZE)), Result("rgb16")),
    Case("png_palette", upload_and_fill("palette", lambda: png_frame(_palette_png(), SIZE, SIZE)), Result("palette")),
    Case("raw_gray8_image", upload_and_fill("gray8", lambda: frame_from_array(small_image()[..., 0], ImageFormat.GRAY8)), Result("gray8")),
    Case("image_all_zero_alpha", submit("clear", image="transparent_image", variations=1), Result("clear")),
    Case("one_pixel_image", upload_and_fill("tiny", lambda: frame_from_array(small_image(1, 1))), Error("size_mismatch")),
    # Over the message size limit: websockets closes with 1009 before the frame is buffered.
    Case("text_frame_over_limit", text('{"type":"cancel","job_id":"%s"}' % ("x" * MAX_MESSAGE_BYTES)), Close(1009)),
    Case("binary_frame_over_limit", binary(b"\0" * (MAX_MESSAGE_BYTES + 1)), Close(1009)),
]
