"""Faults: nothing lost, nothing wedged.

A client that disconnects mid-job gets its jobs cancelled and the queue moves on; an engine that
fails (a simulated CUDA out-of-memory included) fails only that job and is loaded afresh; a
server stopped by SIGTERM or SIGINT with jobs queued closes every connection with 1001 and a
reason, exits 0, removes its state file and leaves no process behind; a client that never reads
cannot grow the server's memory.

The test engines below stand in for GPU faults we cannot cause on a CPU-only machine; everything
else is genfill's real server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from genfill.protocol import Mode
from genfill_server.app import ServerConfig
from genfill_server.background import BackgroundServer
from genfill_server.engines import EngineSet, EngineSpec
from genfill_server.engines.base import EngineCapabilities, EngineDefaults, JobCancelledError, torch_errors
from websockets.exceptions import ConnectionClosed

from bad_input.wire import RawSocket, Session, assert_clean_error, box_mask, small_image, submit_message

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """What the test engines did, shared across the instances a factory makes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int]] = []
        self.instances = 0
        self.fail_next_load = False
        self.load_s = 0.0  # how long a load takes, as reading weights and compiling would

    def add(self, event: str, instance: int) -> None:
        with self.lock:
            self.events.append((event, instance))

    def names(self) -> list[str]:
        with self.lock:
            return [event for event, _ in self.events]


class ScriptedEngine:
    """Does what the prompt says: ``slow`` takes 200 steps of 20 ms, ``oom`` runs out of memory
    after two steps, ``crash`` raises an error full of internals; anything else is one step."""

    name = "scripted"
    capabilities = EngineCapabilities(prompt=True, modes=frozenset({Mode.FILL, Mode.REMOVE, Mode.ADD}))
    defaults = EngineDefaults()

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        with recorder.lock:
            recorder.instances += 1
            self.instance = recorder.instances

    def load(self) -> None:
        if self.recorder.fail_next_load:
            self.recorder.fail_next_load = False
            raise OSError("cannot open /home/artist/.cache/huggingface/model.safetensors")
        time.sleep(self.recorder.load_s)
        self.recorder.add("load", self.instance)

    def close(self) -> None:
        self.recorder.add("close", self.instance)

    def run(self, job, on_step):
        prompt = job.options.prompt
        steps = 200 if prompt == "slow" else 3
        self.recorder.add(f"start:{prompt}", self.instance)
        try:
            for step in range(1, steps + 1):
                if prompt == "slow":
                    time.sleep(0.02)
                on_step(step, steps, None)
                if step == 2 and prompt == "oom":
                    # torch's own class, raised as a CUDA allocation failure raises it; the
                    # engine maps it as genfill's torch engines do.
                    with torch_errors():
                        raise torch.OutOfMemoryError(
                            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity) "
                            "in /usr/lib/python3/site-packages/torch/nn/functional.py"
                        )
                if step == 2 and prompt == "crash":
                    raise RuntimeError('Traceback (most recent call last): File "/srv/genfill/secret.py", line 1')
        except JobCancelledError:
            self.recorder.add("cancelled", self.instance)
            raise
        self.recorder.add("finished", self.instance)
        return [job.image.copy() for _ in job.seeds]


def scripted_engines(recorder: Recorder) -> EngineSet:
    spec = EngineSpec(
        name="scripted",
        factory=lambda device, model: ScriptedEngine(recorder),
        capabilities=ScriptedEngine.capabilities,
        description="test engine",
    )
    return EngineSet(specs={"scripted": spec}, default_name="scripted")


@pytest.fixture
def scripted():
    recorder = Recorder()
    with BackgroundServer(ServerConfig(write_state_file=False), scripted_engines(recorder)) as running:
        yield running, recorder


async def upload_pair(session: Session, size: int = 32) -> tuple[str, str]:
    image = await session.upload(small_image(size, size))
    mask = await session.upload(box_mask(size, size, (8, 8, 8, 8)))
    return image, mask


async def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# Client disconnects mid-job


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_disconnect_mid_job_cancels_it_and_the_queue_moves_on(scripted, how):
    server, recorder = scripted
    leaver = await Session.open(server.url, server.token)
    image, mask = await upload_pair(leaver)
    for index in range(4):  # one running, three queued: 16 s of work if nothing is cancelled
        await leaver.send(submit_message(f"slow-{index}", image, mask, prompt="slow", variations=1))
    await leaver.wait_for(lambda m: m["type"] == "progress" and m["job_id"] == "slow-0")
    if how == "close":
        await leaver.close()
    else:
        leaver.ws.transport.abort()  # no close frame: the TCP connection just drops

    await wait_until(lambda: "cancelled" in recorder.names(), timeout_s=2)
    stayer = await Session.open(server.url, server.token)
    started = time.monotonic()
    image, mask = await upload_pair(stayer)
    await stayer.send(submit_message("next", image, mask, variations=1))
    outcome = await stayer.job_outcome("next", timeout_s=10)
    assert outcome["type"] == "result"
    assert time.monotonic() - started < 2, "the next client's job waited for the gone client's jobs"
    # Only the first slow job ever started; the queued ones were dropped with their client.
    assert recorder.names().count("start:slow") == 1
    assert "finished" in recorder.names()
    state = server.server
    assert state.scheduler.queued() == 0
    assert len(state._clients) == 1
    await stayer.close()
    await wait_until(lambda: not state._clients, timeout_s=5)
    assert all(state.images.held_bytes(client_id) == 0 for client_id in range(1, 10))


# Engine failure mid-job


@pytest.mark.parametrize(
    ("prompt", "code"), [("oom", "out_of_memory"), ("crash", "engine_failed")], ids=["simulated_cuda_oom", "crash"]
)
async def test_engine_failure_fails_only_that_job_and_reloads_the_engine(scripted, prompt, code):
    server, recorder = scripted
    session = await Session.open(server.url, server.token)
    image, mask = await upload_pair(session)
    await session.send(submit_message("doomed", image, mask, prompt=prompt, variations=1))
    await session.send(submit_message("queued", image, mask, variations=1))
    error = await session.job_outcome("doomed")
    assert error["type"] == "error" and error["code"] == code, error
    assert_clean_error(error)
    assert "CUDA" not in error["message"] and "secret" not in error["message"]
    # The job queued behind the failure runs on a freshly loaded engine.
    assert (await session.job_outcome("queued"))["type"] == "result"
    await session.run_valid_job("later")
    events = recorder.events
    assert ("close", 1) in events, "the failed engine instance was not closed"
    assert ("load", 2) in events, "the engine was not loaded again"
    assert [name for name, instance in events if instance == 2 and name == "finished"] == ["finished", "finished"]
    await session.close()


async def test_server_answers_others_while_an_engine_loads(scripted):
    server, recorder = scripted
    server.server.engines.recover("scripted")
    recorder.load_s = 4.0
    first = await Session.open(server.url, server.token)
    image, mask = await upload_pair(first)
    await first.send(submit_message("loads", image, mask, variations=1))
    await wait_until(lambda: recorder.instances == 2, timeout_s=5)  # the load has begun
    started = time.monotonic()
    second = await Session.open(server.url, server.token)  # handshake and hello
    await upload_pair(second, size=24)  # upload and answer
    pong = await first.ws.ping()
    await asyncio.wait_for(pong, timeout=1)
    assert time.monotonic() - started < 1.5, "the server stalled while an engine loaded"
    assert "load" not in [name for name, instance in recorder.events if instance == 2]
    assert (await first.job_outcome("loads", timeout_s=15))["type"] == "result"
    await first.close()
    await second.close()


async def test_engine_that_fails_to_load_reports_it_and_loads_next_time(scripted):
    server, recorder = scripted
    server.server.engines.recover("scripted")  # the next job loads a new instance
    recorder.fail_next_load = True
    session = await Session.open(server.url, server.token)
    image, mask = await upload_pair(session)
    await session.send(submit_message("first", image, mask, variations=1))
    error = await session.job_outcome("first")
    assert error["type"] == "error" and error["code"] == "engine_failed"
    assert_clean_error(error)
    await session.run_valid_job("second")
    await session.close()


# SIGTERM / SIGINT with jobs queued


def start_cli_server(state_file: Path, *extra: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "genfill_server", "serve", "--port", "0", "--state-file", str(state_file), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: orphans are easy to find
    )
    deadline = time.monotonic() + 30
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"server did not start: {process.communicate()[0]}")
        time.sleep(0.05)
    return process


def read_state(state_file: Path) -> dict:
    for _ in range(100):
        try:
            return json.loads(state_file.read_text())
        except ValueError:
            time.sleep(0.02)
    raise AssertionError("state file unreadable")


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_with_jobs_queued_closes_cleanly_and_restart_works(tmp_path, signum):
    state_file = tmp_path / "server.json"
    process = start_cli_server(state_file)
    try:
        state = read_state(state_file)
        assert state["pid"] == process.pid
        clients = [await Session.open(state["url"], state["token"]) for _ in range(3)]
        for number, client in enumerate(clients):
            image = await client.upload(small_image(256, 256, seed=number))
            mask = await client.upload(box_mask(256, 256, (40, 40, 170, 170)))
            for index in range(3):
                await client.send(submit_message(f"j{index}", image, mask, variations=8, seed=index))
            await client.wait_for(lambda m: m["type"] == "accepted" and m["job_id"] == "j2")
        await clients[0].wait_for(lambda m: m["type"] == "progress")
        started = time.monotonic()
        process.send_signal(signum)
        for client in clients:
            with pytest.raises(ConnectionClosed) as closed:
                await client.wait_for(lambda m: False, timeout_s=15)
            assert closed.value.rcvd is not None, "the server dropped the connection without a close frame"
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutting down")
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 15
        output = process.stdout.read()
        assert "Traceback" not in output, output
        assert not state_file.exists(), "the state file outlived the server"
        assert not process_group_alive(process.pid), "a process of the server's group is still running"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    restarted = start_cli_server(state_file)
    try:
        new_state = read_state(state_file)
        assert new_state["token"] != state["token"] and new_state["pid"] == restarted.pid
        session = await Session.open(new_state["url"], new_state["token"])
        await session.run_valid_job("after-restart")
        await session.close()
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=20) == 0
        assert not state_file.exists()
    finally:
        if restarted.poll() is None:
            restarted.kill()
            restarted.wait()


# A client that never reads

_FLOOD_SERVER = """
import asyncio, sys
from genfill.protocol import Limits
from genfill_server.app import GenfillServer, ServerConfig
from genfill_server.engines import default_engines

async def main():
    config = ServerConfig(
        write_state_file=False,
        max_outbox_bytes=8 * 2**20,
        limits=Limits(max_messages_per_second=1e6),
    )
    server = GenfillServer(config, default_engines())
    await server.start()
    print(server.url, server.token, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main())
"""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_client_that_never_reads_cannot_grow_server_memory():
    process = subprocess.Popen(
        [sys.executable, "-c", _FLOOD_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, token = process.stdout.readline().split()
        warm = await Session.open(url, token)
        await warm.run_valid_job("warm-up")
        baseline = rss_bytes(process.pid)

        # Each has_images names 64 unknown ids and is answered with all 64 back, about 4.5 kB:
        # 40k of them are 180 MB of answers the client never reads.
        flooder = RawSocket(url, token, timeout_s=2)
        assert flooder.status == 101
        ids = [os.urandom(32).hex() for _ in range(64)]
        message = json.dumps({"type": "has_images", "image_ids": ids}).encode()
        sent = 0
        peak = baseline

        def flood() -> None:
            nonlocal sent
            try:
                for _ in range(40_000):
                    flooder.send_frame(0x1, message)
                    sent += 1
            except (TimeoutError, ConnectionError):
                pass  # the server stopped reading from us: it cut us off

        thread = threading.Thread(target=flood)
        thread.start()
        while thread.is_alive():
            peak = max(peak, rss_bytes(process.pid))
            await asyncio.sleep(0.05)
        for _ in range(40):  # let the server work through what is buffered
            peak = max(peak, rss_bytes(process.pid))
            await asyncio.sleep(0.05)
        growth = peak - baseline
        assert growth < 64 * 2**20, f"server memory grew by {growth / 2**20:.0f} MiB for a client that never reads"

        # Everyone else is served as before, on the old connection and on a new one.
        await warm.run_valid_job("during", seed=1)
        other = await Session.open(url, token)
        started = time.monotonic()
        await other.run_valid_job("other")
        assert time.monotonic() - started < 5
        await warm.close()
        await other.close()
        flooder.close()
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "client 2 is not reading its messages" in process.stderr.read()
