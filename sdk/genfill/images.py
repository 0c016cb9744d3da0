"""Image conversions at the SDK's edges: user inputs to arrays, arrays to binary frames.

Pillow is used here only to decode and encode files; geometry lives in ``genfill.fill``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import InvalidInput, LimitExceeded
from .protocol import FrameHeader, ImageFormat, decode_frame, encode_frame

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageInput = Union["PILImage.Image", np.ndarray, str, os.PathLike]
"""A PIL image, a numpy array ((H, W), (H, W, 3) or (H, W, 4) uint8) or a path to an image file."""


def to_rgba(image: ImageInput, *, max_pixels: int | None = None) -> np.ndarray:
    """Returns an ``(H, W, 4)`` uint8 RGBA copy of ``image``.

    Args:
        image: a PIL image, an ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 (or bool)
            array, or a path to an image file.
        max_pixels: refuse a file with more pixels than this before decoding it; ``None``
            leaves only Pillow's own decompression-bomb limit.

    Raises:
        InvalidInput: the array has another shape or dtype, or the file is missing, not an
            image, truncated or corrupt (also a ``ValueError``).
        LimitExceeded: the file has more than ``max_pixels`` pixels.
    """
    array = _to_array(image, "RGBA", max_pixels)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InvalidInput(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.shape[2] == 3:
        alpha = np.full(array.shape[:2] + (1,), 255, dtype=np.uint8)
        array = np.concatenate([array, alpha], axis=2)
    return np.ascontiguousarray(array)


def to_mask(mask: ImageInput, *, max_pixels: int | None = None) -> np.ndarray:
    """Returns an ``(H, W)`` uint8 selection: 0 keeps, 255 replaces.

    A PIL image or file in mode L is used as is; RGB(A) inputs use their luminance, except that
    an RGBA mask whose colour is uniform uses its alpha (a selection exported as a layer).
    ``max_pixels`` and the errors are as for ``to_rgba``.
    """
    array = _to_array(mask, "L", max_pixels)
    if array.ndim == 3:
        if array.shape[2] == 4 and np.all(array[:, :, :3] == array[:1, :1, :3]):
            array = array[:, :, 3]
        elif array.shape[2] in (3, 4):
            rgb = array[:, :, :3].astype(np.uint32)
            array = ((rgb[:, :, 0] * 299 + rgb[:, :, 1] * 587 + rgb[:, :, 2] * 114 + 500) // 1000).astype(np.uint8)
        elif array.shape[2] == 1:
            array = array[:, :, 0]
    if array.ndim != 2:
        raise InvalidInput(f"mask must be (H, W) or an image, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _to_array(image: ImageInput, pil_mode: str, max_pixels: int | None = None) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_:
            array = image.astype(np.uint8) * 255
        elif image.dtype != np.uint8:
            raise InvalidInput(f"image arrays must be uint8 (0-255), got {image.dtype}")
        else:
            array = image.copy()
    elif isinstance(image, (str, os.PathLike)):
        if not os.fspath(image):
            raise InvalidInput("the image path is empty")
        array = _read_file(Path(image), pil_mode, max_pixels)
    elif hasattr(image, "mode") and hasattr(image, "convert"):
        _check_pixels(getattr(image, "size", (0, 0)), max_pixels, "the PIL image")
        try:
            array = _pil_to_array(image, pil_mode)
        except Exception as exc:  # noqa: BLE001 - Pillow's errors, mapped at the boundary
            raise InvalidInput(f"cannot convert the {image.mode} PIL image: {exc}") from exc
    else:
        raise InvalidInput(f"expected a PIL image, a numpy array or a path, got {type(image).__name__}")
    if array.ndim >= 2 and 0 in array.shape[:2]:
        raise InvalidInput(f"image is empty: shape {array.shape}")
    return array


def _check_pixels(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise LimitExceeded(f"{what} is {width}x{height} pixels, over the server's limit of {max_pixels} pixels")


def _read_file(path: Path, pil_mode: str, max_pixels: int | None) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise InvalidInput(f"no image file at {str(path)!r}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as opened:
            # Checked before decoding: a small file can hold a huge image, and decoding it
            # first is the allocation the limit exists to avoid.
            _check_pixels(opened.size, max_pixels, repr(str(path)))
            return _pil_to_array(opened, pil_mode)
    except LimitExceeded:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{str(path)!r} is too large for Pillow to decode safely: {exc}") from exc
    # Pillow reports broken files with OSError (truncated), SyntaxError (broken PNG chunks),
    # ValueError, EOFError or struct.error depending on the format plug-in; all mean the same here.
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"cannot read an image from {str(path)!r} (corrupt, truncated or not an image): {exc}") from exc


def _pil_to_array(image: PILImage.Image, pil_mode: str) -> np.ndarray:
    if pil_mode == "L" and image.mode in ("L", "1", "P", "I", "I;16", "F"):
        return np.asarray(image.convert("L"))
    if image.mode in ("RGBA", "RGB", "L"):
        return np.asarray(image)
    return np.asarray(image.convert("RGBA"))


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # compress_level 1: these frames cross loopback, where deflate time dominates transfer.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def frame_from_array(array: np.ndarray, fmt: ImageFormat = ImageFormat.RGBA8) -> bytes:
    """Encodes an ``(H, W, 4)`` RGBA or ``(H, W)`` gray uint8 array as a binary frame."""
    height, width = array.shape[:2]
    if fmt is ImageFormat.PNG:
        return encode_frame(fmt, width, height, encode_png(array))
    if fmt is ImageFormat.RGBA8 and (array.ndim != 3 or array.shape[2] != 4):
        raise ValueError(f"rgba8 frames need (H, W, 4) arrays, got {array.shape}")
    if fmt is ImageFormat.GRAY8 and array.ndim != 2:
        raise ValueError(f"gray8 frames need (H, W) arrays, got {array.shape}")
    return encode_frame(fmt, width, height, np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def array_from_frame(header: FrameHeader, payload: bytes | memoryview) -> np.ndarray:
    """Decodes a checked frame payload to an RGBA ``(H, W, 4)`` or gray ``(H, W)`` uint8 array."""
    if header.format is ImageFormat.RGBA8:
        return np.frombuffer(bytes(payload), dtype=np.uint8).reshape(header.height, header.width, 4)
    if header.format is ImageFormat.GRAY8:
        return np.frombuffer(bytes(payload), dtype=np.uint8).reshape(header.height, header.width)
    from PIL import Image

    with Image.open(io.BytesIO(bytes(payload))) as image:
        return _pil_to_array(image, "RGBA")


def decode_image_frame(frame: bytes) -> tuple[FrameHeader, np.ndarray]:
    header, payload = decode_frame(frame)
    return header, array_from_frame(header, payload)
