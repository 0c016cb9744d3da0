"""Binary image frames and the byte shuffling editors need, in pure Python.

A frame is the 48-byte header of ``genfill.protocol.FrameHeader`` followed by the payload::

    magic "GFIM" | format u8 | flags u8 | reserved u16 | width u32 | height u32 | sha256[32]

all big-endian; the sha256 of the payload is the image id. Raw payloads are rows top to
bottom, 4 bytes a pixel (R, G, B, A) for ``rgba8`` and 1 byte for ``gray8``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from .errors import ProtocolMismatch

MAGIC = b"GFIM"
RGBA8 = "rgba8"
GRAY8 = "gray8"
PNG = "png"
_FORMAT_CODES = {RGBA8: 0, GRAY8: 1, PNG: 2}
_FORMATS_BY_CODE = {code: fmt for fmt, code in _FORMAT_CODES.items()}
_BYTES_PER_PIXEL = {RGBA8: 4, GRAY8: 1}
_HEADER = struct.Struct(">4sBBHII32s")
HEADER_BYTES = _HEADER.size


class Frame(NamedTuple):
    format: str
    width: int
    height: int
    image_id: str
    payload: bytes


def encode_frame(fmt: str, width: int, height: int, payload: bytes) -> bytes:
    """Builds a frame. Raises ``ValueError`` when a raw payload's length does not match."""
    expected = _BYTES_PER_PIXEL.get(fmt)
    if fmt not in _FORMAT_CODES:
        raise ValueError(f"unknown image format {fmt!r}")
    if expected is not None and len(payload) != width * height * expected:
        raise ValueError(f"{fmt} payload is {len(payload)} bytes, expected {width}x{height}x{expected}")
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, _FORMAT_CODES[fmt], 0, 0, width, height, digest) + bytes(payload)


def frame_image_id(frame: bytes) -> str:
    return frame[HEADER_BYTES - 32 : HEADER_BYTES].hex()


def decode_frame(frame: bytes) -> Frame:
    """Splits and checks a frame from the server.

    Raises:
        ProtocolMismatch: the header is malformed or does not match the payload.
    """
    if len(frame) < HEADER_BYTES:
        raise ProtocolMismatch(f"the server sent a binary frame of {len(frame)} bytes, shorter than its header")
    magic, code, _flags, _reserved, width, height, digest = _HEADER.unpack_from(frame)
    fmt = _FORMATS_BY_CODE.get(code)
    if magic != MAGIC or fmt is None:
        raise ProtocolMismatch("the server sent a binary frame this plug-in does not understand")
    payload = bytes(frame[HEADER_BYTES:])
    expected = _BYTES_PER_PIXEL.get(fmt)
    if expected is not None and len(payload) != width * height * expected:
        raise ProtocolMismatch(f"the server sent a {width}x{height} {fmt} frame with {len(payload)} bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise ProtocolMismatch("the server sent a binary frame whose payload does not match its sha256")
    return Frame(fmt, width, height, digest.hex(), payload)


def swap_red_blue(pixels: bytes) -> bytes:
    """BGRA <-> RGBA, 4 bytes a pixel (Krita and Qt keep 8-bit RGBA as B, G, R, A)."""
    if len(pixels) % 4:
        raise ValueError(f"{len(pixels)} bytes is not a whole number of 4-byte pixels")
    swapped = bytearray(pixels)
    swapped[0::4] = pixels[2::4]
    swapped[2::4] = pixels[0::4]
    return bytes(swapped)


def crop(pixels: bytes, width: int, box: tuple[int, int, int, int], channels: int) -> bytes:
    """The ``box`` (x, y, width, height) of a ``width``-wide image of ``channels`` bytes a pixel."""
    x, y, box_width, box_height = box
    stride = width * channels
    start = x * channels
    row_bytes = box_width * channels
    return b"".join(
        pixels[row * stride + start : row * stride + start + row_bytes] for row in range(y, y + box_height)
    )


def is_all_zero(pixels: bytes) -> bool:
    return not pixels.strip(b"\x00")
