"""``ClientSession`` without any socket: frames in, routed events out.

What both clients rely on is decided here, so it is pinned here once: which waiting call
gets each reply, what a connection's end does to everything waiting, what is skipped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from genfill import errors
from genfill.protocol import PROTOCOL_VERSION, ImageStatus

from fake_peer import hello, result_frames

IMAGE = np.zeros((8, 8, 4), np.uint8)
MASK = np.zeros((8, 8), np.uint8)
MASK[2:4, 2:4] = 255


def _session(**hello_fields):
    from genfill.session import ClientSession

    session = ClientSession()
    session.receive_hello(json.dumps(hello(**hello_fields)))
    return session


def _status(ids, present=()):
    return json.dumps({"type": "image_status", "present": list(present), "missing": [i for i in ids if i not in present]})


def test_has_images_answers_go_to_waiters_in_order_even_after_one_gave_up():
    session = _session()
    first, second = session.prepare_fill(IMAGE, MASK), session.prepare_fill(IMAGE, MASK, job_id="two")
    answers_first, answers_second = [], []
    assert session.begin(first, answers_first.append) is not None
    # The first caller timed out; its late answer must not reach the second caller.
    assert session.begin(second, answers_second.append) is not None
    session.receive(_status(list(first.frames)))
    session.receive(_status(list(second.frames), present=list(second.frames)))
    assert isinstance(answers_first[0], ImageStatus) and answers_first[0].present == []
    assert answers_second[0].present == list(second.frames)


def test_a_connection_level_error_ends_the_oldest_has_images_wait():
    session = _session()
    answers = []
    session.begin(session.prepare_fill(IMAGE, MASK), answers.append)
    session.receive(json.dumps({"type": "error", "code": "rate_limited", "message": "Slow down."}))
    assert isinstance(answers[0], errors.LimitExceeded) and answers[0].code == "rate_limited"
    # With nothing waiting the same error is dropped, not raised.
    session.receive(json.dumps({"type": "error", "code": "rate_limited", "message": "Slow down."}))


def test_job_events_go_to_their_job_and_a_finished_job_is_forgotten():
    session = _session()
    prepared = session.prepare_fill(IMAGE, MASK, job_id="job-1")
    events = []
    state = session.start(prepared, events.append)
    session.receive(json.dumps({"type": "accepted", "job_id": "job-1", "queue_position": 2}))
    session.receive(json.dumps({"type": "accepted", "job_id": "someone-else", "queue_position": 0}))
    for frame in result_frames("job-1", (2, 2, 2, 2)):
        session.receive(frame)
    assert [(event.kind, event.queue_position) for event in events] == [("accepted", 2), ("result", None)]
    assert state.outcome().box == (2, 2, 2, 2)
    assert "job-1" not in session.jobs
    # The id is free again.
    session.start(session.prepare_fill(IMAGE, MASK, job_id="job-1"), events.append)


def test_unknown_message_types_are_skipped_with_a_debug_log(caplog):
    session = _session()
    events = []
    session.start(session.prepare_fill(IMAGE, MASK, job_id="j"), events.append)
    with caplog.at_level("DEBUG", logger="genfill"):
        session.receive(json.dumps({"type": "telemetry", "job_id": "j"}))
    assert events == [] and "unknown type 'telemetry'" in caplog.text


def test_connection_lost_ends_every_job_and_wait_and_refuses_later_calls():
    session = _session()
    events, answers = [], []
    state = session.start(session.prepare_fill(IMAGE, MASK, job_id="a"), events.append)
    session.begin(session.prepare_fill(IMAGE, MASK, job_id="b"), answers.append)
    lost = errors.ConnectionClosed("gone")
    session.connection_lost(lost)
    assert [event.kind for event in events] == ["error"] and answers == [lost]
    with pytest.raises(errors.ConnectionClosed, match="gone"):
        state.outcome()
    with pytest.raises(errors.ConnectionClosed, match="gone"):
        session.begin(session.prepare_fill(IMAGE, MASK), answers.append)
    with pytest.raises(errors.ConnectionClosed, match="gone"):
        session.ready()


def test_a_malformed_frame_is_a_protocol_error():
    session = _session()
    with pytest.raises(errors.ProtocolError, match="invalid message"):
        session.receive(json.dumps({"type": "progress", "job_id": "j", "step": "one"}))
    with pytest.raises(errors.ProtocolError, match="bad binary frame"):
        session.receive(b"GFIM" + bytes(60))


def test_only_another_major_version_is_refused():
    from genfill.session import ClientSession

    with pytest.raises(errors.ProtocolError, match=f"protocol {PROTOCOL_VERSION + 1}"):
        ClientSession().receive_hello(json.dumps(hello(protocol_version=PROTOCOL_VERSION + 1)))
    newer = _session(features=["references", "a_feature_from_the_future"], server_version="99.0.0")
    assert newer.hello.offers("references") and not newer.hello.offers("regions")


def test_references_are_checked_against_the_hello_before_anything_is_sent():
    reference = [{"image": np.zeros((4, 4, 3), np.uint8), "role": "reference"}]
    old = _session()
    prepared = old.prepare_fill(IMAGE, MASK, references=reference)
    answers = []
    with pytest.raises(errors.Unsupported, match="references"):
        old.begin(prepared, answers.append)
    assert answers == [] and old.frames_uploaded == 0
    assert _session(features=["references"]).begin(prepared, answers.append) is not None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"job_id": "has space"}, "job_id"),
        ({"result_format": "jpeg"}, "result_format"),
        ({"upload_format": "tiff"}, "tiff"),
        ({"mode": "paint"}, "paint"),
        ({"control": "canny"}, "controls must be a list"),
        ({"references": [{"role": "sketch", "image": np.zeros((8, 8), np.uint8)}]}, "sketch"),
        ({"references": [{"role": "reference"}]}, "references.0.image"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options_are_invalid_input_before_anything_is_sent(options, match):
    with pytest.raises(errors.InvalidInput, match=match) as caught:
        _session().prepare_fill(IMAGE, MASK, **options)
    assert isinstance(caught.value, ValueError)


def test_images_over_the_pixel_limit_are_refused_before_conversion():
    from PIL import Image

    session = _session(limits={"max_image_pixels": 100})
    with pytest.raises(errors.LimitExceeded, match="the PIL image is 30x30 pixels"):
        session.prepare_expand(Image.new("RGB", (30, 30)), left=1)
    with pytest.raises(errors.LimitExceeded, match="over the server's limit of 100 pixels"):
        session.prepare_fill(IMAGE, MASK, references=[{"image": np.zeros((11, 10, 3), np.uint8), "role": "reference"}])
