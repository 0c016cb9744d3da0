"""The genfill server: a websocket app on one port, with two plain HTTP endpoints.

- ``GET /v1/health``: liveness, no token needed.
- ``GET /v1/models``: engines and models, token needed.
- websocket on ``/`` (or ``/v1/ws``): the protocol of ``genfill.protocol``, token needed.

Every request passes the same gate first (``_gate``): the Host header must name this server
(DNS rebinding), an Origin header must be allow-listed (``Origin: null`` never is), and, except
for health, ``Authorization: Bearer <token>`` must match, compared in constant time.

This module is the transport only: it moves frames between sockets and each connection's
``ServerSession`` (the protocol, without I/O) and starts the ``Scheduler`` (queues, workers,
batching, answers). See ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from genfill import __version__
from genfill.protocol import PROTOCOL_VERSION, Error, ErrorCode, Feature, Hello, Limits
from genfill.state import ServerState, remove_state, write_state
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .engines import EngineSet
from .errors import RequestError
from .images import ImageStore
from .jobs import ClientHandle
from .pool import PoolConfig, make_runner
from .scheduler import ClientState, Scheduler
from .session import ServerSession, SessionContext

logger = logging.getLogger("genfill.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
FEATURES = (Feature.REFERENCES, Feature.WARNINGS, Feature.CAPABILITIES)
"""What this server offers beyond protocol 1's first messages (``hello.features``)."""
# Uploads larger than this are decoded off the event loop: a large PNG would stall every client.
_DECODE_INLINE_BYTES = 2**20


@dataclass
class ServerConfig:
    """How a server runs. ``token=None`` makes a random one per launch."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    state_file: Path | None = None
    write_state_file: bool = True
    limits: Limits = field(default_factory=Limits)
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    max_outbox_bytes: int | None = 128 * 2**20
    """Bytes of answers that may wait for one client before it is cut off (see
    ``ClientHandle``); one result is always delivered whole. ``None`` disables the limit."""
    pool: PoolConfig | None = None
    """Run engines on a Ray Serve pool (``genfill_server.pool``); ``None`` runs them in this
    process, and Ray is never imported."""
    batching: bool = True
    """Run queued jobs that an engine can batch (same model, size, steps, scheduler, guidance,
    strength) in one engine batch (``run_many``)."""
    batch_wait_s: float = 0.05
    """How long a worker waits for more jobs to batch with the one it took, and only while
    some client is likely to submit soon (one about to submit would otherwise miss the batch
    and wait for the whole of it): one whose last jobs are being answered, or one without a
    job that sent something or was answered within the last second. The wait runs from the
    last answer sent, so clients that submit again as soon as they are answered meet in one
    batch; an idle connection delays nothing."""


class _RedactingLogger(logging.LoggerAdapter):
    """The logger handed to websockets, which logs every request header at DEBUG level,
    ``Authorization`` included: header values and the token never reach a log."""

    def __init__(self, logger: logging.Logger, secret: str) -> None:
        super().__init__(logger, {})
        self._secret = secret

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if self.isEnabledFor(level):
            if msg == "< %s: %s" and len(args) == 2 and str(args[0]).lower() == "authorization":
                args = (args[0], "[redacted]")
            msg = self._redact(msg)
            args = tuple(self._redact(arg) for arg in args)
        super().log(level, msg, *args, **kwargs)

    def _redact(self, value: object) -> object:
        if isinstance(value, str) and self._secret in value:
            return value.replace(self._secret, "[redacted]")
        return value


class GenfillServer:
    """Owns the listening socket, the queue, the workers and the engines.

    Use ``async with GenfillServer(config, engines) as server`` (or ``start()``/``stop()``);
    ``server.url`` and ``server.token`` are set once it listens.
    """

    def __init__(self, config: ServerConfig, engines: EngineSet) -> None:
        self.config = config
        self.engines = engines
        self.token = config.token or secrets.token_urlsafe(32)
        self.limits = config.limits
        self.images = ImageStore(config.limits)
        runner = None if config.pool is None else make_runner(engines, config.pool)
        self.scheduler = Scheduler(
            engines, config.devices, batching=config.batching, batch_wait_s=config.batch_wait_s, runner=runner
        )
        self._sessions = SessionContext(engines, self.images, self.scheduler, config.limits)
        self._next_client_id = 0
        self._server: Server | None = None
        self._closing: set[asyncio.Task] = set()
        self._allowed_hosts: set[str] = set()
        self._state_path: Path | None = None
        self.port: int | None = None
        # The engines and models are fixed for the server's life: every connection gets this hello.
        self._hello_json = self._hello().model_dump_json()

    @property
    def stopping(self) -> bool:
        return self._sessions.stopping

    @property
    def _clients(self) -> dict[int, ClientState]:
        return self.scheduler.clients

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"ws://{host}:{self.port}"

    async def __aenter__(self) -> GenfillServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        self._server = await serve(
            self._handle_connection,
            config.host,
            config.port,
            process_request=self._gate,
            compression=None,
            max_size=config.limits.max_message_bytes,
            # Bounded send buffers: a client that stops reading cannot make the server hold
            # more than a few frames for it.
            write_limit=2**20,
            server_header=f"genfill/{__version__}",
            logger=_RedactingLogger(logging.getLogger("websockets.server"), self.token),
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._allowed_hosts = self._hosts_for(config.host, self.port) | set(config.allowed_hosts)
        await self.scheduler.runner.start()
        self.scheduler.start()
        if config.write_state_file:
            self._state_path = write_state(
                ServerState(url=self.url, token=self.token, pid=os.getpid(), version=__version__), config.state_file
            )
        logger.info("genfill %s listening on %s", __version__, self.url)

    async def stop(self, reason: str = "server shutting down") -> None:
        """Stops accepting, tells connected clients why, ends the workers."""
        self._sessions.stopping = True
        for client in list(self._clients.values()):
            for job in list(client.jobs.values()):
                job.cancel_requested.set()
                # Said per job, so a client knows which of its jobs will never finish.
                client.handle.send(
                    Error(code=ErrorCode.SHUTTING_DOWN, message=f"{reason}: the job did not finish", job_id=job.job_id)
                    .model_dump_json()
                )
        if self._server is not None:
            self._server.close(close_connections=False)
            await self._drain_outboxes(timeout_s=2.0)
            # Concurrently: a client that never answers the close handshake must not delay the others.
            await asyncio.gather(
                *(connection.close(code=1001, reason=reason) for connection in list(self._server.connections)),
                return_exceptions=True,
            )
            await self._server.wait_closed()
        await self.scheduler.stop()
        await self.scheduler.runner.close()
        if self._state_path is not None:
            remove_state(self._state_path, self.token)
            self._state_path = None

    async def _drain_outboxes(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            client.handle.pending_bytes and client.handle.connected for client in self._clients.values()
        ):
            await asyncio.sleep(0.01)

    @staticmethod
    def _hosts_for(host: str, port: int) -> set[str]:
        if host in ("0.0.0.0", "::", ""):
            return set()
        names = {host, f"[{host}]"} | (set(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else set())
        return {f"{name}:{port}" for name in names}

    # HTTP gate and endpoints

    def _gate(self, connection: ServerConnection, request: Request) -> Response | None:
        # websockets hands over any method it parsed; every endpoint here is a GET.
        if request.method != "GET":
            return connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served\n")
        headers = request.headers
        host = headers.get("Host", "")
        if self._allowed_hosts and host.lower() not in self._allowed_hosts:
            return connection.respond(HTTPStatus.FORBIDDEN, "host not allowed\n")
        origin = headers.get("Origin")
        if origin is not None and origin not in self.config.allowed_origins:
            return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        path = request.path.split("?", 1)[0]
        if path == "/v1/health":
            health = {"status": "ok", "version": __version__, "protocol_version": PROTOCOL_VERSION}
            health.update(self.scheduler.runner.health() or {})
            return self._json(connection, health)
        if not self._authorized(headers.get("Authorization", "")):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "token missing or wrong\n")
        if path == "/v1/models":
            return self._json(connection, self.engines.catalogue())
        if path not in ("/", "/v1/ws"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.stopping:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        return None

    def _authorized(self, authorization: str) -> bool:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token.encode())

    @staticmethod
    def _json(connection: ServerConnection, payload: dict) -> Response:
        response = connection.respond(HTTPStatus.OK, json.dumps(payload))
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    # Websocket connections

    def _hello(self) -> Hello:
        return Hello(
            server_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            engines=self.engines.engine_infos(),
            models=self.engines.model_infos(),
            default_engine=self.engines.default_name,
            limits=self.limits,
            features=[str(feature) for feature in FEATURES],
        )

    async def _handle_connection(self, websocket: ServerConnection) -> None:
        self._next_client_id += 1
        handle = ClientHandle(
            self._next_client_id,
            self.config.max_outbox_bytes,
            on_overflow=lambda: self._cut_off(websocket, handle),
        )
        state = ClientState(handle)
        session = ServerSession(state, self._sessions)
        self._clients[handle.client_id] = state
        writer = asyncio.create_task(self._write_loop(websocket, handle))
        try:
            handle.send(self._hello_json)
            async for data in websocket:
                if not handle.connected:
                    break
                try:
                    session.check_rate()
                    if isinstance(data, bytes):
                        if len(data) > _DECODE_INLINE_BYTES:
                            image = await asyncio.to_thread(session.decode, data, self.limits)
                        else:
                            image = session.decode(data, self.limits)
                        session.receive_upload(image)
                    else:
                        session.receive_text(data)
                except RequestError as exc:
                    session.answer_error(exc, data)
        except ConnectionClosed:
            pass
        finally:
            session.close()
            del self._clients[handle.client_id]
            writer.cancel()

    async def _write_loop(self, websocket: ServerConnection, handle: ClientHandle) -> None:
        try:
            while True:
                item = await handle.next_frame()
                await websocket.send(item)
        except ConnectionClosed:
            handle.connected = False

    def _cut_off(self, websocket: ServerConnection, handle: ClientHandle) -> None:
        """Closes the connection of a client whose outbox overflowed: it stopped reading."""
        logger.warning("client %d is not reading its messages: closing its connection", handle.client_id)
        # The close frame waits behind the unread data; websockets aborts the TCP connection
        # after its close timeout, which ends the handler and cancels the client's jobs.
        task = asyncio.get_running_loop().create_task(
            websocket.close(code=1008, reason="client is not reading its messages")
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
