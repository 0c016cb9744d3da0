"""A scripted websocket peer that speaks genfill's wire format, for the clients' boundary tests.

The real server never sends what a *newer* server might (an unknown message type, an extra
field, an unknown error code, result warnings), nor what a broken one might (a close in the
middle of a job, silence). ``FakePeer`` sends exactly what a test scripts, so each client's
parser and waits are tested against those frames through its real websocket code.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from genfill import protocol as p
from websockets.sync.server import ServerConnection, serve

Script = Callable[[ServerConnection, dict[str, Any]], None]
"""``script(connection, submit)`` answers one ``submit`` message (a dict) on ``connection``."""


def hello(**overrides: Any) -> dict[str, Any]:
    """A valid hello as a dict; ``overrides`` replace or add top-level fields."""
    message = p.Hello(
        server_version="9.9.9",
        protocol_version=p.PROTOCOL_VERSION,
        engines=[p.EngineInfo(name="classic", available=True, modes=list(p.Mode))],
        models=[],
        default_engine="classic",
        limits=p.Limits(),
    ).model_dump(mode="json")
    message.update(overrides)
    return message


def result_frames(job_id: str, box: tuple[int, int, int, int] = (0, 0, 2, 2), **extra: Any) -> list[str | bytes]:
    """One RGBA variation frame and the ``result`` that uses it; ``extra`` adds result fields."""
    x, y, width, height = box
    frame = p.encode_frame(p.ImageFormat.RGBA8, width, height, np.full((height, width, 4), 9, np.uint8).tobytes())
    image = p.frame_image_id(frame)
    message = {
        "type": "result",
        "job_id": job_id,
        "box": {"x": x, "y": y, "width": width, "height": height},
        "variations": [{"image": image, "seed": 1}],
        "engine": "classic",
        "seconds": 0.01,
    }
    message.update(extra)
    return [frame, json.dumps(message)]


def send_all(connection: ServerConnection, frames: list[str | bytes | dict]) -> None:
    for frame in frames:
        connection.send(json.dumps(frame) if isinstance(frame, dict) else frame)


class FakePeer:
    """Serves on 127.0.0.1, port 0: sends ``hello_message``, answers ``has_images`` with every
    image missing, takes uploads, and hands each ``submit`` to ``script``.

    Args:
        script: answers each submit; ``None`` sends a small result.
        hello_message: the first message; ``None`` sends ``hello()``.
        send_hello: ``False`` stays silent after the handshake (a server that hangs).
        answer_has_images: ``False`` never answers ``has_images``.
        read_after_has_images: ``False`` stops reading once it has answered ``has_images``
            (a wedged server: with ``max_queue=1`` the socket buffers fill and stay full).

    ``received`` lists every text message the peer got, parsed; ``uploads`` the
    ``FrameHeader`` of every binary frame; ``close_codes`` the close code of each
    connection that ended.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        hello_message: dict[str, Any] | None = None,
        send_hello: bool = True,
        answer_has_images: bool = True,
        read_after_has_images: bool = True,
    ) -> None:
        self.script = script or (lambda connection, submit: send_all(connection, result_frames(submit["job_id"])))
        self.hello_message = hello() if hello_message is None else hello_message
        self.send_hello = send_hello
        self.answer_has_images = answer_has_images
        self.read_after_has_images = read_after_has_images
        self._stop = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.uploads: list[p.FrameHeader] = []
        self.close_codes: list[int | None] = []
        listener = socket.socket()
        if not read_after_has_images:
            # Set before listen() so accepted sockets inherit it (and lose autotuning): the
            # client's sends stall after a few MB instead of after loopback's tens of MB.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self._server = serve(self._handle, sock=listener, compression=None, max_size=2**28, max_queue=1, close_timeout=1)
        self.url = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handle(self, connection: ServerConnection) -> None:
        if self.send_hello:
            connection.send(json.dumps(self.hello_message))
        try:
            for data in connection:
                if isinstance(data, bytes):
                    self.uploads.append(p.decode_frame(data)[0])
                    continue
                message = json.loads(data)
                self.received.append(message)
                if message["type"] == "has_images" and self.answer_has_images:
                    connection.send(json.dumps({"type": "image_status", "present": [], "missing": message["image_ids"]}))
                    if not self.read_after_has_images:
                        self._stop.wait(30)
                        break
                elif message["type"] == "submit":
                    self.script(connection, message)
        except Exception:  # noqa: BLE001 - a client closing mid-script ends the script, nothing more
            pass
        self.close_codes.append(connection.close_code)

    def kinds(self) -> list[str]:
        return [message["type"] for message in self.received]

    def __enter__(self) -> FakePeer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._thread.join(5)


@contextmanager
def fake_peer(script: Script | None = None, **kwargs: Any) -> Iterator[FakePeer]:
    with FakePeer(script, **kwargs) as peer:
        yield peer
