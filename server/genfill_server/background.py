"""A server on its own thread and event loop, for ``genfill fill --local`` and embedding."""

from __future__ import annotations

import asyncio
import threading

from .app import GenfillServer, ServerConfig
from .engines import EngineSet, default_engines


class BackgroundServer:
    """Runs a ``GenfillServer`` on a daemon thread. ``url`` and ``token`` are set once started.

    Use as a context manager; ``stop()`` shuts it down cleanly and joins the thread.
    """

    def __init__(self, config: ServerConfig | None = None, engines: EngineSet | None = None) -> None:
        self.config = config or ServerConfig(write_state_file=False)
        self._engines = engines
        self.server: GenfillServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, "server not started"
        return self.server.url

    @property
    def token(self) -> str:
        assert self.server is not None, "server not started"
        return self.server.token

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        self._thread = threading.Thread(target=self._run, name="genfill-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"server did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self.server = GenfillServer(self.config, self._engines or default_engines())
            await self.server.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stopped.wait()
        await self.server.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=30)
