"""The clients against what a newer (or broken) server may send: a scripted peer on the wire.

Each test runs the real ``Client``, ``AsyncClient`` and bridge ``ServerConnection`` against
``fake_peer.FakePeer``, which sends frames the real server does not send today (an unknown
message type, extra fields, an unknown error code, result warnings, silence, a close in the
middle of a job). Tests that need the real server say so by taking the ``server`` fixture.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from genfill import AsyncClient, Client, errors
from genfill.protocol import ResultWarning

from blocking import Blocking, Loop
from fake_peer import fake_peer, hello, result_frames, send_all

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin_bridge"))

import genfill_bridge as gb  # noqa: E402
from genfill_bridge.errors import ServerTimeout  # noqa: E402

IMAGE = np.zeros((8, 8, 4), np.uint8)
MASK = np.zeros((8, 8), np.uint8)
MASK[2:4, 2:4] = 255
WARNING = {"code": "prompt_ignored", "message": "The classic engine ignores the prompt.", "hint": "new field"}
QUICK = {"open_timeout_s": 2, "reply_timeout_s": 2, "job_timeout_s": 5}


@pytest.fixture(params=["sync", "async"])
def make_client(request):
    """Makes an unconnected SDK client of one kind: ``make_client(url, **options)``."""
    made = []
    loop = Loop() if request.param == "async" else None

    def make(url: str, token: str = "t", **options):
        if loop is None:
            client = Client(url, token=token, **options)
        else:
            client = Blocking(AsyncClient(url, token=token, **options), loop)
        made.append(client)
        return client

    make.kind = request.param
    yield make
    try:
        for client in made:
            client.close()
    finally:
        if loop is not None:
            loop.close()


def _bridge_run(url: str, *, open_timeout_s: float = 5, reply_timeout_s: float = 5, **kwargs) -> gb.JobResult:
    frame = gb.frames.encode_frame("rgba8", 8, 8, IMAGE.tobytes())
    image = gb.frames.frame_image_id(frame)
    with gb.ServerConnection(url, "t", open_timeout_s=open_timeout_s, reply_timeout_s=reply_timeout_s) as connection:
        return connection.run({image: frame}, {"image": image}, canvas=gb.Size(8, 8), **kwargs)


def _eventually(predicate, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# Result warnings


def _with_warnings(connection, submit):
    send_all(connection, result_frames(submit["job_id"], warnings=[WARNING, {"code": "x", "message": "Second."}]))


def test_sdk_result_carries_the_servers_warnings(make_client):
    with fake_peer(_with_warnings) as peer:
        result = make_client(peer.url).fill(IMAGE, MASK, "a cat", timeout_s=10)
    assert result.warnings == [
        ResultWarning(code="prompt_ignored", message="The classic engine ignores the prompt."),
        ResultWarning(code="x", message="Second."),
    ]


def test_bridge_result_carries_the_warnings_messages():
    with fake_peer(_with_warnings) as peer:
        result = _bridge_run(peer.url)
    assert result.warnings == ["The classic engine ignores the prompt.", "Second."]


def test_results_without_warnings_have_none(server):
    with Client(server.url, token=server.token) as client:
        result = client.fill(IMAGE, MASK, variations=1, timeout_s=30)
    assert result.warnings == []
    with fake_peer() as peer:
        assert _bridge_run(peer.url).warnings == []


# Lenient parsing: a newer server's additions are skipped, not fatal


def _newer_server(connection, submit):
    """Answers with what a newer server might send: an unknown message type for the job,
    extra fields on known messages, then ``cancelled`` with an extra field."""
    job_id = submit["job_id"]
    send_all(
        connection,
        [
            {"type": "accepted", "job_id": job_id, "queue_position": 0, "eta_s": 3.5},
            {"type": "telemetry", "job_id": job_id, "gpu_load": 0.9},
            {"type": "progress", "job_id": job_id, "step": 1, "total": 2, "phase": "denoise"},
            {"type": "cancelled", "job_id": job_id, "reason": "operator"},
        ],
    )


NEWER_HELLO = hello(
    features=["references", "warnings", "regions", "teleportation"],
    cluster={"nodes": 4},
    engines=[{"name": "classic", "available": True, "modes": ["fill", "expand", "hover"], "kind": "cpu"}],
)


def test_sdk_skips_unknown_messages_and_fields(make_client, caplog):
    with fake_peer(_newer_server, hello_message=NEWER_HELLO) as peer:
        client = make_client(peer.url)
        with caplog.at_level(logging.DEBUG, logger="genfill"):
            job = client.submit_fill(IMAGE, MASK)
            events = list(job.events(10))
            with pytest.raises(errors.JobCancelled):
                job.result(10)
        assert [event.kind for event in events] == ["accepted", "progress", "cancelled"]
        assert "unknown type 'telemetry'" in caplog.text
        assert client.hello.features == ["references", "warnings", "regions", "teleportation"]
        assert client.hello.engines[0].modes == ["fill", "expand"]
        # The connection stays up: a later job on it succeeds.
        peer.script = lambda connection, submit: send_all(connection, result_frames(submit["job_id"]))
        assert len(client.fill(IMAGE, MASK, timeout_s=10).arrays) == 1
        client.close()
        _eventually(lambda: peer.close_codes)
    assert peer.close_codes == [1000]


def test_bridge_skips_unknown_messages_and_fields(caplog):
    with fake_peer(_newer_server, hello_message=NEWER_HELLO) as peer:
        events = []
        with caplog.at_level(logging.DEBUG, logger="genfill_bridge"):
            with pytest.raises(gb.JobCancelled):
                _bridge_run(peer.url, on_event=events.append)
        _eventually(lambda: peer.close_codes)
    assert [event.kind for event in events] == ["accepted", "progress"]
    assert "unknown type 'telemetry'" in caplog.text
    assert peer.close_codes == [1000]


def _unknown_code(connection, submit):
    send_all(connection, [{"type": "error", "job_id": submit["job_id"], "code": "quota_exhausted", "message": "Out of credits."}])


def test_sdk_keeps_unknown_error_codes_as_the_base_error(make_client):
    with fake_peer(_unknown_code) as peer:
        client = make_client(peer.url)
        with pytest.raises(errors.GenfillError) as caught:
            client.fill(IMAGE, MASK, timeout_s=10)
        assert type(caught.value) is errors.GenfillError
        assert (caught.value.code, caught.value.message) == ("quota_exhausted", "Out of credits.")
        peer.script = lambda connection, submit: send_all(connection, result_frames(submit["job_id"]))
        assert len(client.fill(IMAGE, MASK, timeout_s=10).arrays) == 1
        client.close()
        _eventually(lambda: peer.close_codes)
    assert peer.close_codes == [1000]


def test_bridge_keeps_unknown_error_codes_as_the_base_error():
    with fake_peer(_unknown_code) as peer:
        with pytest.raises(gb.BridgeError) as caught:
            _bridge_run(peer.url)
        _eventually(lambda: peer.close_codes)
    assert peer.close_codes == [1000]
    assert type(caught.value) is gb.BridgeError
    assert caught.value.code == "quota_exhausted" and "Out of credits." in caught.value.message


def test_known_codes_keep_their_classes(make_client):
    def queue_full(connection, submit):
        send_all(connection, [{"type": "error", "job_id": submit["job_id"], "code": "queue_full", "message": "Full."}])

    with fake_peer(queue_full) as peer:
        with pytest.raises(errors.LimitExceeded):
            make_client(peer.url).fill(IMAGE, MASK, timeout_s=10)
        with pytest.raises(gb.JobFailed) as caught:
            _bridge_run(peer.url)
    assert caught.value.code == "queue_full"


# Capability negotiation


def test_another_major_version_is_refused(make_client):
    with fake_peer(hello_message=hello(protocol_version=2)) as peer:
        with pytest.raises(errors.ProtocolError, match="protocol 2"):
            make_client(peer.url).connect()
        with pytest.raises(gb.ProtocolMismatch, match="protocol 2"):
            _bridge_run(peer.url)


def test_bridge_reads_the_features_offered():
    with fake_peer(hello_message=NEWER_HELLO) as peer:
        with gb.ServerConnection(peer.url, "t") as connection:
            assert connection.features == {"references", "warnings", "regions", "teleportation"}
    with fake_peer() as peer:
        with gb.ServerConnection(peer.url, "t") as connection:
            assert connection.features == frozenset()


def test_references_need_the_servers_feature(make_client):
    reference = {"image": np.full((5, 7, 3), 200, np.uint8), "role": "reference", "weight": 0.5}
    with fake_peer() as peer:
        client = make_client(peer.url)
        with pytest.raises(errors.Unsupported, match="references") as caught:
            client.fill(IMAGE, MASK, references=[reference], timeout_s=10)
        assert caught.value.code == "unsupported"
        assert peer.received == [] and peer.uploads == []
        # Without references the same client goes on.
        assert len(client.fill(IMAGE, MASK, timeout_s=10).arrays) == 1


def test_references_are_uploaded_and_cut_with_the_region(make_client):
    canvas = np.zeros((2048, 2048, 4), np.uint8)
    mask = np.zeros((2048, 2048), np.uint8)
    mask[1000:1040, 1000:1040] = 255
    depth = np.full((2048, 2048, 3), 90, np.uint8)
    region_mask = np.zeros((2048, 2048), np.uint8)
    style = np.full((40, 30, 3), 7, np.uint8)
    references = [
        {"image": depth, "role": "control", "control_type": "depth", "weight": 0.8},
        {"image": region_mask, "role": "region_mask"},
        {"image": style, "role": "reference"},
    ]
    with fake_peer(lambda connection, submit: None, hello_message=hello(features=["references"])) as peer:
        client = make_client(peer.url)
        job = client.submit_fill(canvas, mask, references=references)
        _eventually(lambda: "submit" in peer.kinds())
        job.cancel()
    request = next(message for message in peer.received if message["type"] == "submit")["request"]
    region = request["region"]
    assert region["width"] < 2048 and region["height"] < 2048
    sent = {header.image_id: header for header in peer.uploads}
    roles = [(ref["role"], sent[ref["image"]].format, sent[ref["image"]].width, sent[ref["image"]].height) for ref in request["references"]]
    assert roles == [
        ("control", "rgba8", region["width"], region["height"]),
        ("region_mask", "gray8", region["width"], region["height"]),
        ("reference", "rgba8", 30, 40),
    ]
    assert request["references"][0]["control_type"] == "depth" and request["references"][0]["weight"] == 0.8


def test_a_context_reference_must_be_the_canvas_size(make_client):
    with fake_peer(hello_message=hello(features=["references"])) as peer:
        with pytest.raises(errors.InvalidInput, match="control image is 4x4, the canvas is 8x8"):
            make_client(peer.url).fill(
                IMAGE, MASK, references=[{"image": np.zeros((4, 4), np.uint8), "role": "control", "control_type": "canny"}]
            )


# Bounded waits


def test_a_server_that_never_says_hello_times_out(make_client):
    with fake_peer(send_hello=False) as peer:
        started = time.monotonic()
        with pytest.raises(errors.ConnectTimeout, match="within 0.5 s"):
            make_client(peer.url, open_timeout_s=0.5).connect()
        with pytest.raises(gb.ServerNotRunning, match="did not answer in time"):
            _bridge_run(peer.url, open_timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_an_unanswered_has_images_times_out(make_client):
    with fake_peer(answer_has_images=False) as peer:
        started = time.monotonic()
        with pytest.raises(errors.Timeout, match="has_images within 0.5 s"):
            make_client(peer.url, reply_timeout_s=0.5).fill(IMAGE, MASK)
        with pytest.raises(ServerTimeout, match="did not answer within 0.5 s"):
            _bridge_run(peer.url, reply_timeout_s=0.5)
    assert time.monotonic() - started < 5


def _accept_only(connection, submit):
    send_all(connection, [{"type": "accepted", "job_id": submit["job_id"], "queue_position": 0}])


def test_a_job_that_never_ends_times_out_and_is_cancelled(make_client):
    with fake_peer(_accept_only) as peer:
        client = make_client(peer.url)
        events = []
        started = time.monotonic()
        # With on_progress too: the sync client used to ignore timeout_s on this path.
        with pytest.raises(errors.Timeout, match="did not finish within 0.5 s"):
            client.fill(IMAGE, MASK, on_progress=events.append, timeout_s=0.5)
        assert time.monotonic() - started < 3
        assert [event.kind for event in events] == ["accepted"]
        _eventually(lambda: "cancel" in peer.kinds())
        job = client.submit_fill(IMAGE, MASK)
        with pytest.raises(errors.Timeout):
            list(job.events(0.3))
        with pytest.raises(TimeoutError):  # Timeout is a TimeoutError too
            job.result(0.3)


def test_client_default_job_timeout_applies(make_client):
    with fake_peer(_accept_only) as peer:
        with pytest.raises(errors.Timeout, match="within 0.5 s"):
            make_client(peer.url, job_timeout_s=0.5).fill(IMAGE, MASK)


def test_bridge_job_that_never_ends_times_out_and_is_cancelled():
    with fake_peer(_accept_only) as peer:
        with pytest.raises(ServerTimeout, match="within 0.5 s"):
            _bridge_run(peer.url, timeout_s=0.5)
        _eventually(lambda: "cancel" in peer.kinds())


def _close_mid_job(connection, submit):
    send_all(connection, [{"type": "accepted", "job_id": submit["job_id"], "queue_position": 0}])
    connection.close(1011, "boom")


def test_a_server_closing_mid_job_fails_the_job_at_once(make_client):
    with fake_peer(_close_mid_job) as peer:
        client = make_client(peer.url, job_timeout_s=60)
        started = time.monotonic()
        with pytest.raises(errors.ConnectionClosed, match="1011"):
            client.fill(IMAGE, MASK)
        with pytest.raises(errors.ConnectionClosed):
            client.fill(IMAGE, MASK)  # the client does not silently reconnect
        with pytest.raises(gb.ConnectionLost):
            _bridge_run(peer.url)
    assert time.monotonic() - started < 5


def test_a_malformed_message_closes_with_1002_and_fails_the_job(make_client):
    def broken(connection, submit):
        send_all(connection, [{"type": "accepted", "job_id": submit["job_id"]}])  # no queue_position

    with fake_peer(broken) as peer:
        with pytest.raises(errors.ProtocolError, match="invalid message"):
            make_client(peer.url).fill(IMAGE, MASK, timeout_s=10)
        _eventually(lambda: peer.close_codes)
    assert peer.close_codes == [1002]


def test_timeouts_must_be_positive_numbers(make_client):
    for bad in (0, -1, float("nan"), float("inf"), "10", True):
        with pytest.raises(errors.InvalidInput, match="must be a positive number"):
            make_client("ws://127.0.0.1:9", reply_timeout_s=bad)


# Lazy connect


def test_clients_connect_on_first_use(server, make_client):
    client = make_client(server.url, token=server.token)
    assert client.hello is None
    assert client.health()["status"] == "ok"
    assert client.hello is None  # HTTP endpoints need no websocket
    result = client.fill(IMAGE, MASK, variations=1, timeout_s=30)
    assert client.hello is not None and len(result.arrays) == 1
    client.close()
    with pytest.raises(errors.ConnectionClosed, match="was closed"):
        client.fill(IMAGE, MASK, variations=1)


def test_closing_an_unused_client_is_harmless(make_client):
    client = make_client("ws://127.0.0.1:9")
    client.close()
    with pytest.raises(errors.ConnectionClosed):
        client.connect()


def test_health_times_out_on_a_silent_server(make_client):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(errors.Timeout, match="within 0.5 s"):
            make_client(url).health(timeout_s=0.5)
    finally:
        listener.close()


def test_unknown_messages_in_raw_json_are_parsed_by_type():
    # What the session skips, the protocol module names: a boundary check of the two.
    from genfill.protocol import UnknownMessage, parse_server_message

    assert parse_server_message(json.dumps({"type": "telemetry", "job_id": "j"})) == UnknownMessage("telemetry", "j")


def test_references_against_the_real_server_end_unsupported(server, make_client):
    # The classic engine takes no references: a server without the feature is refused by the
    # SDK before anything is sent, one with it answers `unsupported` for this engine. The
    # caller sees the same class either way.
    client = make_client(server.url, token=server.token)
    offered = client.connect().offers("references")
    control = [{"image": np.full((8, 8, 3), 255, np.uint8), "role": "control", "control_type": "canny"}]
    with pytest.raises(errors.Unsupported) as caught:
        client.fill(IMAGE, MASK, engine="classic", references=control, timeout_s=30)
    assert caught.value.code == "unsupported"
    if not offered:
        assert "does not offer the 'references' feature" in caught.value.message
    assert len(client.fill(IMAGE, MASK, variations=1, timeout_s=30).arrays) == 1


def test_a_server_that_stops_reading_ends_the_upload_in_time(make_client):
    # The peer takes two frames, then reads no more: the third, 16 MB, outgrows the socket
    # buffers (4 MB at most here) and its send blocks until the client's deadline.
    canvas = np.zeros((2048, 2048, 4), np.uint8)
    mask = np.full((2048, 2048), 255, np.uint8)
    control = [{"type": "canny", "image": np.ones((2048, 2048, 4), np.uint8)}]
    with fake_peer(read_after_has_images=False) as peer:
        client = make_client(peer.url, reply_timeout_s=1)
        started = time.monotonic()
        with pytest.raises(errors.Timeout, match="took no data for 1 s"):
            client.submit_fill(canvas, mask, control=control)
        assert time.monotonic() - started < 10
        with pytest.raises(errors.ConnectionClosed):
            client.fill(IMAGE, MASK, timeout_s=5)


def test_bridge_upload_to_a_server_that_stops_reading_ends_in_time():
    frames = {}
    for fill_byte in (1, 2, 3):
        frame = gb.frames.encode_frame("rgba8", 2048, 1024, bytes([fill_byte]) * (2048 * 1024 * 4))
        frames[gb.frames.frame_image_id(frame)] = frame
    with fake_peer(read_after_has_images=False) as peer:
        started = time.monotonic()
        with gb.ServerConnection(peer.url, "t", reply_timeout_s=1) as connection:
            with pytest.raises(ServerTimeout, match="stopped taking data for 1 s"):
                connection.run(frames, {"image": next(iter(frames))}, canvas=gb.Size(2048, 1024))
        assert time.monotonic() - started < 10
