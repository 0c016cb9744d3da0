"""Helpers that talk to a real genfill server over a raw websocket, without the SDK.

The bad-input, fault, security and load tests send exactly the bytes they mean to, so they use
websockets' own client (and, for frames websockets refuses to send, a plain socket) instead of
``genfill.Client``, which validates everything before it leaves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from genfill.images import frame_from_array
from genfill.protocol import ErrorCode, ImageFormat, frame_image_id
from websockets.asyncio.client import ClientConnection, connect

LEAK_MARKERS = ("/", "\\", "Traceback", 'File "')
"""Substrings no error message or close reason may contain: paths and stack traces."""


def open_ws(url: str, token: str | None, **options) -> connect:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    options.setdefault("compression", None)
    options.setdefault("max_size", None)
    options.setdefault("open_timeout", 10)
    return connect(url, additional_headers=headers, **options)


def small_image(width: int = 32, height: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.dstack([rgb, np.full((height, width), 255, np.uint8)])


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 255
    return mask


def submit_message(job_id: str, image: str, mask: str | None = None, **request) -> str:
    body = {"image": image, **request}
    if mask is not None:
        body["mask"] = mask
    return json.dumps({"type": "submit", "job_id": job_id, "request": body})


@dataclass
class Session:
    """One raw connection: every text message received is kept, binary frames by image id."""

    ws: ClientConnection
    messages: list[dict] = field(default_factory=list)
    frames: dict[str, bytes] = field(default_factory=dict)
    hello: dict | None = None
    _seen: int = 0

    @classmethod
    async def open(cls, url: str, token: str | None, **options) -> Session:
        ws = await open_ws(url, token, **options)
        session = cls(ws)
        session.hello = await session.next_message(timeout_s=10)
        assert session.hello["type"] == "hello", session.hello
        return session

    async def close(self) -> None:
        await self.ws.close()

    async def send(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def next_message(self, timeout_s: float = 30) -> dict:
        """The next text message not yet returned, reading more as needed."""
        while self._seen >= len(self.messages):
            await self._read(timeout_s)
        message = self.messages[self._seen]
        self._seen += 1
        return message

    async def _read(self, timeout_s: float) -> None:
        data = await asyncio.wait_for(self.ws.recv(), timeout_s)
        if isinstance(data, bytes):
            self.frames[frame_image_id(data)] = data
        else:
            self.messages.append(json.loads(data))

    async def wait_for(self, predicate, timeout_s: float = 30) -> dict:
        """Reads until a message matches ``predicate``; earlier ones stay in ``messages``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            message = await self.next_message(timeout_s=max(0.01, deadline - loop.time()))
            if predicate(message):
                return message

    async def upload(self, array: np.ndarray, fmt=None) -> str:
        if fmt is None:
            fmt = ImageFormat.GRAY8 if array.ndim == 2 else ImageFormat.RGBA8
        frame = frame_from_array(array, fmt)
        image_id = frame_image_id(frame)
        await self.send(frame)
        await self.wait_for(lambda m: m["type"] == "uploaded" and m["image_id"] == image_id or m["type"] == "error")
        return image_id

    async def job_outcome(self, job_id: str, timeout_s: float = 60) -> dict:
        """The first terminal message (result, error or cancelled) of ``job_id``, received
        already or waited for."""

        def terminal(message: dict) -> bool:
            return message.get("job_id") == job_id and message["type"] in ("result", "error", "cancelled")

        for message in self.messages:
            if terminal(message):
                return message
        return await self.wait_for(terminal, timeout_s)

    async def run_valid_job(self, job_id: str, *, size: int = 32, seed: int = 0) -> dict:
        """Uploads a small image and mask, fills, and checks the result arrived whole."""
        image = await self.upload(small_image(size, size, seed))
        mask = await self.upload(box_mask(size, size, (size // 4, size // 4, size // 4, size // 4)))
        await self.send(submit_message(job_id, image, mask, variations=1, seed=seed))
        outcome = await self.job_outcome(job_id)
        assert outcome["type"] == "result", outcome
        for variation in outcome["variations"]:
            assert variation["image"] in self.frames, "a result's image frame must arrive before it"
        return outcome

    def errors(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "error"]


def assert_clean_error(message: dict, echo: str | None = None) -> None:
    """An error message carries a stable code and no paths or stack traces; ``echo`` is client
    input it may quote."""
    assert message["type"] == "error", message
    assert message["code"] in {code.value for code in ErrorCode}, message
    text = message["message"]
    if echo is not None:
        text = text.replace(repr(echo)[1:-1], "").replace(echo, "")
    for marker in LEAK_MARKERS:
        assert marker not in text, message


# Raw frames, for what websockets' client refuses to send (bad UTF-8, data after close).


class RawSocket:
    """A websocket client on a plain socket: handshake, then hand-built frames."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 10, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode()
        fields = {
            "Host": f"{parts.hostname}:{parts.port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
        }
        if token is not None:
            fields["Authorization"] = f"Bearer {token}"
        fields.update(headers or {})
        lines = ["GET / HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self._buffer += chunk
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.response_head = head.decode("latin-1")

    def send_frame(self, opcode: int, payload: bytes, *, masked: bool = True) -> None:
        header = bytes([0x80 | opcode])
        length = len(payload)
        mask_bit = 0x80 if masked else 0
        if length < 126:
            header += bytes([mask_bit | length])
        elif length < 2**16:
            header += bytes([mask_bit | 126]) + struct.pack(">H", length)
        else:
            header += bytes([mask_bit | 127]) + struct.pack(">Q", length)
        if masked:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            header += key
        self.sock.sendall(header + payload)

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(0x8, struct.pack(">H", code))

    def _take(self, count: int) -> bytes | None:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def read_frame(self) -> tuple[int, bytes] | None:
        """``(opcode, payload)`` of the server's next frame; ``None`` at end of stream."""
        head = self._take(2)
        if head is None:
            return None
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._take(8))[0]
        payload = self._take(length)
        return head[0] & 0x0F, payload

    def read_until_close(self) -> tuple[list[tuple[int, bytes]], int | None, str]:
        """Frames until the server's close frame: ``(frames, close code, close reason)``."""
        frames = []
        while True:
            frame = self.read_frame()
            if frame is None:
                return frames, None, ""
            opcode, payload = frame
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                return frames, code, payload[2:].decode("utf-8", "replace")
            frames.append(frame)

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()
