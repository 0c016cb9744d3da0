"""Jobs and the fair queue that orders them.

Clients take turns: the queue serves one job of each client that has any before a second job
of any, so one client's 50 jobs do not starve another's one. Each device has one worker, which
takes the next job, runs it off the event loop, and stops it at the next step when cancelled.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from genfill.protocol import FillRequest, Submit


class ClientHandle:
    """The server's side of one connection, as jobs see it: an id and an outbox."""

    def __init__(self, client_id: int, outbox: asyncio.Queue) -> None:
        self.client_id = client_id
        self.outbox = outbox
        self.connected = True

    def send(self, item: str | bytes) -> None:
        """Queues a frame for the client; dropped once the client is gone."""
        if self.connected:
            self.outbox.put_nowait(item)


@dataclass(eq=False)
class Job:
    job_id: str
    client: ClientHandle
    submit: Submit
    canvas: np.ndarray
    selection: np.ndarray
    seeds: list[int]
    engine_name: str
    state: Literal["queued", "running", "finished"] = "queued"
    cancel_requested: threading.Event = field(default_factory=threading.Event)

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
