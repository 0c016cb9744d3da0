"""``AsyncClient`` behind blocking calls, so one test body runs through both SDK clients."""

from __future__ import annotations

import asyncio
import inspect
import threading

from genfill.aio import AsyncJob


class Loop:
    """An event loop on a thread of its own, for driving coroutines from blocking test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Blocking:
    """An ``AsyncClient`` or ``AsyncJob`` behind blocking calls, run on its own loop thread,
    so a test body runs through both clients unchanged."""

    def __init__(self, target, loop: Loop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name):
        attribute = getattr(self._target, name)
        if name == "events":

            def collect(*args, **kwargs):
                async def gather():
                    return [event async for event in attribute(*args, **kwargs)]

                return iter(self._loop.run(gather()))

            return collect
        if inspect.iscoroutinefunction(attribute):

            def call(*args, **kwargs):
                out = self._loop.run(attribute(*args, **kwargs))
                return Blocking(out, self._loop) if isinstance(out, AsyncJob) else out

            return call
        return attribute

    def close(self) -> None:
        self._loop.run(self._target.aclose())
