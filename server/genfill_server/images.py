"""Uploaded images, content-addressed by the sha256 of their payload.

Images are decoded once on upload (so a bad file fails at once, with a clear error) and held
as arrays. Each client's holdings are bounded; an image uploaded by several clients is stored
once and dropped when its last holder disconnects or evicts it.
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from genfill.images import array_from_frame
from genfill.protocol import ErrorCode, FrameError, FrameHeader, ImageFormat, Limits, decode_frame
from PIL import Image, UnidentifiedImageError

from .errors import RequestError


@dataclass(frozen=True)
class StoredImage:
    image_id: str
    array: np.ndarray
    """``(H, W, 4)`` RGBA or ``(H, W)`` gray, uint8, read-only."""

    @property
    def nbytes(self) -> int:
        return self.array.nbytes


def decode_upload(frame: bytes, limits: Limits) -> StoredImage:
    """Checks and decodes one binary upload frame.

    Raises:
        RequestError: ``bad_message`` for a malformed frame, ``image_too_large`` over the pixel
            limits (checked from the header, before decoding), ``image_invalid`` for bytes that
            are not the image they claim to be.
    """
    try:
        header, payload = decode_frame(frame)
    except FrameError as exc:
        raise RequestError(ErrorCode.BAD_MESSAGE, f"bad binary frame: {exc}") from exc
    _check_size(header.width, header.height, limits)
    if header.format is not ImageFormat.PNG:
        array = array_from_frame(header, payload)
    else:
        array = _decode_png(header, bytes(payload), limits)
    array.setflags(write=False)
    return StoredImage(header.image_id, array)


def _check_size(width: int, height: int, limits: Limits) -> None:
    if width > limits.max_image_side or height > limits.max_image_side or width * height > limits.max_image_pixels:
        raise RequestError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image of {width}x{height} pixels is over the limit of {limits.max_image_pixels} pixels "
            f"({limits.max_image_side} a side)",
        )


def _decode_png(header: FrameHeader, payload: bytes, limits: Limits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=["PNG"])
            # The size in the PNG's own header decides the memory decoding takes: check it
            # before a single row is inflated (a 100k x 100k bomb is a few kilobytes).
            _check_size(image.width, image.height, limits)
            if (image.width, image.height) != (header.width, header.height):
                raise RequestError(
                    ErrorCode.IMAGE_INVALID,
                    f"frame header says {header.width}x{header.height}, the PNG is {image.width}x{image.height}",
                )
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses a PNG whose own header claims a bomb while opening it, before our size
        # check sees it: the answer is the same as for any image over the limits.
        raise RequestError(ErrorCode.IMAGE_TOO_LARGE, "the PNG's header claims more pixels than the server allows") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RequestError(ErrorCode.IMAGE_INVALID, "payload is not a readable PNG image") from exc
    if image.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "F") and image.mode != "LA":
        if image.mode in ("I", "I;16", "I;16B"):
            # 16-bit gray keeps its top 8 bits; Pillow's convert("L") would clip instead.
            array = np.asarray(image, dtype=np.uint32) >> 8
            return np.ascontiguousarray(np.clip(array, 0, 255).astype(np.uint8))
        return np.asarray(image.convert("L"))
    if image.mode == "RGBA":
        return np.asarray(image)
    return np.asarray(image.convert("RGBA"))


class ImageStore:
    """Holds uploaded images for the clients that uploaded or referenced them.

    Everyone with the server's token is in one trust domain, so an image one connection uploaded
    is reused by another (a plug-in reconnecting does not send its layer again). Each client may
    hold ``limits.max_held_upload_bytes_per_client`` bytes; past that its least recently used
    images are released, and an image is freed when its last holder releases it.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._images: dict[str, StoredImage] = {}
        self._holders: dict[str, set[int]] = {}
        self._held: dict[int, OrderedDict[str, int]] = {}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._images

    def claim(self, image_id: str, client: int) -> bool:
        """Makes ``client`` a holder of a stored image; ``False`` if the image is not stored."""
        image = self._images.get(image_id)
        if image is None:
            return False
        self.add(image, client)
        return True

    def get(self, image_id: str, client: int) -> StoredImage:
        if not self.claim(image_id, client):
            raise RequestError(ErrorCode.UNKNOWN_IMAGE, f"image {image_id[:12]}... is not on the server: upload it first")
        return self._images[image_id]

    def add(self, image: StoredImage, client: int) -> None:
        held = self._held.setdefault(client, OrderedDict())
        if image.nbytes > self._limits.max_held_upload_bytes_per_client:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, "image is larger than the upload bytes a client may hold")
        self._images.setdefault(image.image_id, image)
        self._holders.setdefault(image.image_id, set()).add(client)
        held[image.image_id] = image.nbytes
        held.move_to_end(image.image_id)
        while sum(held.values()) > self._limits.max_held_upload_bytes_per_client:
            oldest = next(iter(held))
            self._release(oldest, client)

    def held_bytes(self, client: int) -> int:
        """Bytes of images ``client`` holds."""
        return sum(self._held.get(client, {}).values())

    def release_client(self, client: int) -> None:
        for image_id in list(self._held.get(client, ())):
            self._release(image_id, client)
        self._held.pop(client, None)

    def _release(self, image_id: str, client: int) -> None:
        self._held.get(client, OrderedDict()).pop(image_id, None)
        holders = self._holders.get(image_id)
        if holders is None:
            return
        holders.discard(client)
        if not holders:
            del self._holders[image_id]
            del self._images[image_id]
