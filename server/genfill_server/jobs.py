"""Jobs and the fair queue that orders them.

Clients take turns: the queue serves one job of each client that has any before a second job
of any, so one client's 50 jobs do not starve another's one. The scheduler
(``genfill_server.scheduler``) keeps one queue a lane and runs the workers.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from genfill.protocol import FillRequest, ImageReference, ResultWarning, Submit

from .engines.base import DeviceKind


class ClientHandle:
    """The server's side of one connection, as jobs see it: an id and a bounded outbox.

    websockets' ``write_limit`` bounds only the transport's buffer; the outbox in front of it
    is bounded here, so a client that stops reading cannot make the server hold its answers
    without end. Progress messages are dropped first, once ``progress_backlog_bytes`` are
    waiting. An answer that must arrive (a result, an error, a reply) that would take the
    outbox past ``max_pending_bytes`` cuts the client off instead: the outbox is emptied and
    ``on_overflow`` is called once, to close the connection. A group of frames sent together
    (a result's images and its message) is always taken whole when nothing else is waiting,
    however large it is, so one big result never counts as overflow.

    Args:
        client_id: the connection's id on this server.
        max_pending_bytes: bytes that may wait for the client; ``None`` disables the limit.
        on_overflow: ``None`` or a callable run (on the event loop) when the client is cut off.
    """

    # Per-frame bookkeeping, so a flood of tiny messages is counted too.
    FRAME_OVERHEAD_BYTES = 64

    def __init__(
        self,
        client_id: int,
        max_pending_bytes: int | None = 128 * 2**20,
        on_overflow: Callable[[], None] | None = None,
        progress_backlog_bytes: int = 2**20,
    ) -> None:
        self.client_id = client_id
        self.connected = True
        self.overflowed = False
        self.pending_bytes = 0
        self.dropped_progress = 0
        self.max_pending_bytes = max_pending_bytes
        self.progress_backlog_bytes = progress_backlog_bytes
        self._on_overflow = on_overflow
        self._outbox: deque[str | bytes] = deque()
        self._ready = asyncio.Event()

    def send(self, item: str | bytes) -> None:
        """Queues a frame for the client; dropped once the client is gone."""
        self.send_all([item])

    def send_all(self, items: list[str | bytes]) -> bool:
        """Queues frames that belong together; ``False`` if they were not queued."""
        if not self.connected:
            return False
        size = sum(len(item) + self.FRAME_OVERHEAD_BYTES for item in items)
        limit = self.max_pending_bytes
        if limit is not None and self.pending_bytes and self.pending_bytes + size > limit:
            self._overflow()
            return False
        self._queue(items, size)
        return True

    def send_progress(self, items: list[str | bytes]) -> bool:
        """Queues progress frames, or drops them if the client is behind; ``False`` if dropped."""
        if not self.connected:
            return False
        if self.pending_bytes >= self.progress_backlog_bytes:
            self.dropped_progress += 1
            return False
        return self.send_all(items)

    async def next_frame(self) -> str | bytes:
        """Waits for the next queued frame and takes it out of the outbox."""
        while not self._outbox:
            self._ready.clear()
            await self._ready.wait()
        item = self._outbox.popleft()
        self.pending_bytes -= len(item) + self.FRAME_OVERHEAD_BYTES
        return item

    def _queue(self, items: list[str | bytes], size: int) -> None:
        self._outbox.extend(items)
        self.pending_bytes += size
        self._ready.set()

    def _overflow(self) -> None:
        self.connected = False
        self.overflowed = True
        self._outbox.clear()
        self.pending_bytes = 0
        if self._on_overflow is not None:
            self._on_overflow()


@dataclass(eq=False)
class Job:
    job_id: str
    client: ClientHandle
    submit: Submit
    canvas: np.ndarray
    selection: np.ndarray
    seeds: list[int]
    engine_name: str
    lane: str = DeviceKind.GPU
    """The lane it waits in: its engine's device kind, or its engine's own lane."""
    references: tuple[tuple[ImageReference, np.ndarray], ...] = ()
    """The request's extra images, decoded, each with its reference (a ``ControlInput`` with
    an image among them, as a ``control`` reference); ``crop="context"`` ones are the size of
    ``canvas``."""
    warnings: tuple[ResultWarning, ...] = ()
    """What its result will say the engine accepted but ignored."""
    state: Literal["queued", "running", "answering", "finished"] = "queued"
    """``answering``: the engine is done with it and its result is being made."""
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    batch_key: tuple | None = None
    """What the job must share with others to run in one engine batch; ``None`` for alone.
    Set by the worker, per engine (``batch_key_engine``)."""
    batch_key_engine: object = None

    @property
    def request(self) -> FillRequest:
        return self.submit.request


class FairQueue:
    """Round-robin over clients, first-in first-out within a client."""

    def __init__(self) -> None:
        self._by_client: OrderedDict[int, deque[Job]] = OrderedDict()
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._by_client.values())

    def count(self, client_id: int) -> int:
        return len(self._by_client.get(client_id, ()))

    def put(self, job: Job) -> int:
        """Enqueues ``job`` and returns its position (jobs that run before it)."""
        self._by_client.setdefault(job.client.client_id, deque()).append(job)
        self._nonempty.set()
        return self.position(job)

    async def wait(self) -> None:
        """Returns once a job is queued; takes none."""
        while not self._by_client:
            self._nonempty.clear()
            await self._nonempty.wait()

    async def get(self) -> Job:
        while not self._by_client:
            self._nonempty.clear()
            await self._nonempty.wait()
        client_id, jobs = next(iter(self._by_client.items()))
        job = jobs.popleft()
        # The client just served goes to the back of the rotation.
        del self._by_client[client_id]
        if jobs:
            self._by_client[client_id] = jobs
        return job

    def take(self, matches: Callable[[Job], bool], limit: int) -> list[Job]:
        """Takes up to ``limit`` more jobs for which ``matches`` is true, in the order ``get``
        would serve them: clients in rotation, one job per client per round, and only a
        client's first queued job (a client's own jobs keep their order). Each client served
        goes to the back of the rotation, as with ``get``."""
        taken: list[Job] = []
        progress = True
        while progress and len(taken) < limit:
            progress = False
            for client_id in list(self._by_client):
                jobs = self._by_client[client_id]
                if not matches(jobs[0]):
                    continue
                taken.append(jobs.popleft())
                del self._by_client[client_id]
                if jobs:
                    self._by_client[client_id] = jobs
                progress = True
                if len(taken) >= limit:
                    break
        return taken

    def remove(self, job: Job) -> bool:
        jobs = self._by_client.get(job.client.client_id)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self._by_client[job.client.client_id]
        return True

    def position(self, job: Job) -> int:
        own_id = job.client.client_id
        own = self._by_client.get(own_id)
        if own is None or job not in own:
            return 0
        rank = own.index(job)
        ahead = rank
        before_own = True
        for client_id, jobs in self._by_client.items():
            if client_id == own_id:
                before_own = False
                continue
            # Clients ahead in the rotation get one more turn before this job's.
            ahead += min(len(jobs), rank + 1 if before_own else rank)
        return ahead
