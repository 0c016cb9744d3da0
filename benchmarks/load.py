"""Load: many concurrent clients, many jobs each, on the classic engine over loopback.

Prints jobs/s and p50/p99 latency (submit to result), and checks that nothing is lost or
duplicated, that every result reaches its own client with the right job id, and that the queue
is fair: every client's first result comes before any other client's last one.

    python benchmarks/load.py                      # 32 clients x 20 jobs on a 'genfill serve' it starts
    python benchmarks/load.py --clients 8 --jobs 5
    python benchmarks/load.py --url ws://127.0.0.1:7860 --token TOKEN

Exit status 0 when every check passes, 1 otherwise. Timings depend on the machine; the checks
do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from genfill.images import frame_from_array
from genfill.protocol import ImageFormat, frame_image_id
from websockets.asyncio.client import connect

WINDOW = 16
"""Jobs a client keeps submitted at once: the server's default per-client queue limit."""


@dataclass
class JobRecord:
    client: int
    job_id: str
    submitted: float
    finished: float | None = None
    rank: int | None = None
    """Position of this job's result among all results, in the order they arrived."""
    outcome: str | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass
class LoadReport:
    clients: int
    jobs_per_client: int
    records: dict[str, JobRecord] = field(default_factory=dict)
    terminal_counts: dict[str, int] = field(default_factory=dict)
    strays: list[str] = field(default_factory=list)
    """Messages a client got about job ids it never submitted."""
    missing_frames: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def latencies_s(self) -> list[float]:
        return sorted(r.finished - r.submitted for r in self.records.values() if r.finished is not None)

    @property
    def jobs_per_second(self) -> float:
        done = sum(1 for r in self.records.values() if r.outcome == "result")
        return done / max(self.ended - self.started, 1e-9)

    def percentile_s(self, q: float) -> float:
        values = self.latencies_s
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    def problems(self) -> list[str]:
        """Everything that went wrong; empty when the run was correct and fair."""
        found = []
        expected = self.clients * self.jobs_per_client
        if len(self.records) != expected:
            found.append(f"{len(self.records)} jobs submitted, expected {expected}")
        lost = [r.job_id for r in self.records.values() if r.outcome is None]
        if lost:
            found.append(f"{len(lost)} jobs lost: {lost[:5]}")
        failed = [f"{r.job_id}: {r.outcome}" for r in self.records.values() if r.outcome not in (None, "result")]
        if failed:
            found.append(f"{len(failed)} jobs did not succeed: {failed[:5]}")
        duplicated = [job_id for job_id, count in self.terminal_counts.items() if count > 1]
        if duplicated:
            found.append(f"{len(duplicated)} jobs answered more than once: {duplicated[:5]}")
        if self.strays:
            found.append(f"{len(self.strays)} messages reached the wrong client: {self.strays[:5]}")
        if self.missing_frames:
            found.append(f"{len(self.missing_frames)} results came without their image frames")
        # Each client's mask sits elsewhere, so its result box identifies it.
        boxes: dict[int, set] = {}
        for record in self.records.values():
            if record.box is not None:
                boxes.setdefault(record.client, set()).add(record.box)
        if any(len(found_boxes) != 1 for found_boxes in boxes.values()):
            found.append("a client got results for boxes other than its own")
        if len({next(iter(b)) for b in boxes.values() if b}) != len(boxes):
            found.append("two clients got the same result box")
        found.extend(self.unfairness())
        return found

    def unfairness(self) -> list[str]:
        firsts, lasts = {}, {}
        for record in self.records.values():
            if record.rank is None:
                continue
            firsts[record.client] = min(firsts.get(record.client, record.rank), record.rank)
            lasts[record.client] = max(lasts.get(record.client, record.rank), record.rank)
        found = []
        for client, first in firsts.items():
            for other, last in lasts.items():
                if other != client and first > last and self.jobs_per_client > 1:
                    found.append(f"client {client} waited for all of client {other}'s jobs")
                    return found
        slowest_first = max(firsts.values(), default=0)
        if slowest_first >= 2 * self.clients:
            found.append(f"a client's first result came {slowest_first}th of all, after two full rounds")
        return found


def _client_inputs(index: int, size: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(index)
    image = np.dstack([rng.integers(0, 256, (size, size, 3), dtype=np.uint8), np.full((size, size), 255, np.uint8)])
    mask = np.zeros((size, size), np.uint8)
    span = size - 12
    x, y = 2 + index % span, 2 + (index // span) * 3
    mask[y : y + 8, x : x + 8] = 255
    return frame_from_array(image), frame_from_array(mask, ImageFormat.GRAY8)


async def _client(index: int, url: str, token: str, report: LoadReport, size: int, ready, go: asyncio.Event, counter) -> None:
    jobs = report.jobs_per_client
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(url, additional_headers=headers, compression=None, max_size=None, open_timeout=30) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        image, mask = _client_inputs(index, size)
        for frame in (image, mask):
            await ws.send(frame)
            answer = json.loads(await ws.recv())
            assert answer["type"] == "uploaded", answer
        mine = [f"c{index:02d}-j{k:02d}" for k in range(jobs)]
        frames: set[str] = set()
        ready()
        await go.wait()

        async def submit(job_id: str) -> None:
            request = {"image": frame_image_id(image), "mask": frame_image_id(mask), "variations": 1, "seed": 1}
            report.records[job_id] = JobRecord(index, job_id, time.perf_counter())
            await ws.send(json.dumps({"type": "submit", "job_id": job_id, "request": request, "previews": False}))

        pending = list(mine)
        for job_id in pending[:WINDOW]:
            await submit(job_id)
        pending = pending[WINDOW:]
        open_jobs = set(mine[:WINDOW])
        while open_jobs:
            data = await ws.recv()
            if isinstance(data, bytes):
                frames.add(frame_image_id(data))
                continue
            message = json.loads(data)
            job_id = message.get("job_id")
            if job_id is not None and job_id not in mine:
                report.strays.append(f"client {index} got {message['type']} for {job_id}")
                continue
            if message["type"] not in ("result", "error", "cancelled"):
                continue
            report.terminal_counts[job_id] = report.terminal_counts.get(job_id, 0) + 1
            record = report.records[job_id]
            if record.outcome is not None:
                continue
            record.finished = time.perf_counter()
            record.rank = next(counter)
            record.outcome = message["type"] if message["type"] != "error" else f"error {message['code']}"
            if message["type"] == "result":
                box = message["box"]
                record.box = (box["x"], box["y"], box["width"], box["height"])
                if any(v["image"] not in frames for v in message["variations"]):
                    report.missing_frames.append(job_id)
            open_jobs.discard(job_id)
            if pending:
                next_id = pending.pop(0)
                open_jobs.add(next_id)
                await submit(next_id)


async def run_load(url: str, token: str, *, clients: int, jobs: int, size: int = 48, timeout_s: float = 300) -> LoadReport:
    """Runs ``clients`` concurrent clients with ``jobs`` jobs each and returns what happened."""
    import itertools

    report = LoadReport(clients, jobs)
    go = asyncio.Event()
    waiting = [clients]

    def ready() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            report.started = time.perf_counter()
            go.set()

    counter = itertools.count()
    tasks = [asyncio.create_task(_client(i, url, token, report, size, ready, go, counter)) for i in range(clients)]
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*tasks)
    except TimeoutError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    report.ended = time.perf_counter()
    return report


def summary(report: LoadReport) -> str:
    lat = report.latencies_s
    return (
        f"{report.clients} clients x {report.jobs_per_client} jobs: {len(lat)} results in "
        f"{report.ended - report.started:.2f} s, {report.jobs_per_second:.1f} jobs/s, "
        f"latency p50 {report.percentile_s(50) * 1000:.0f} ms, p99 {report.percentile_s(99) * 1000:.0f} ms"
    )


def _start_server(state_file: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "genfill_server", "serve", "--port", "0", "--state-file", str(state_file), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("genfill serve did not start")
        time.sleep(0.05)
    time.sleep(0.05)
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=20, help="jobs per client")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--timeout-s", type=float, default=300, help="give up after this long")
    parser.add_argument("--url", default=None, help="a running server (default: start 'genfill serve')")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    process = None
    with tempfile.TemporaryDirectory() as folder:
        url, token = args.url, args.token
        if url is None:
            state_file = Path(folder) / "server.json"
            process = _start_server(state_file)
            state = json.loads(state_file.read_text())
            url, token = state["url"], state["token"]
        try:
            report = asyncio.run(
                run_load(url, token, clients=args.clients, jobs=args.jobs, size=args.size, timeout_s=args.timeout_s)
            )
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    print(summary(report))
    problems = report.problems()
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("0 lost, 0 duplicated, every result on its own connection with its job id; fair queue")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
