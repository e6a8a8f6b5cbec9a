"""Unit tests of the guards' logic (the end-to-end behaviour is in test_faults.py on a real server): deadline
derivation, the deadline predictor's queueing and chunking, error translation, gunicorn's JSON error pages."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from maskrcnn_serving import guards
from maskrcnn_serving.gunicorn_worker import write_json_error


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 63.0),  # 90 % of the seed's 70 s
        ({"MODEL_SERVER_TIMEOUT": "10"}, 9.0),
        ({"MODEL_SERVER_TIMEOUT": "5"}, 4.0),  # at least 1 s below the timeout
        ({"MODEL_SERVER_TIMEOUT": "1"}, 0.5),
        ({"MODEL_SERVER_TIMEOUT": "70", "MODEL_SERVER_REQUEST_DEADLINE": "2.5"}, 2.5),
        ({"MODEL_SERVER_REQUEST_DEADLINE": "0"}, None),
    ],
)
def test_deadline_is_below_the_invocation_timeout(environ, expected):
    assert guards.deadline_seconds(environ) == expected


def test_malformed_deadline_setting_is_refused():
    with pytest.raises(ValueError, match="MODEL_SERVER_REQUEST_DEADLINE"):
        guards.deadline_seconds({"MODEL_SERVER_REQUEST_DEADLINE": "soon"})


class SlowModel:
    """Takes ``seconds`` per image, one call at a time, and records how many images it computed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.images = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def predict(self, images, options):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.seconds * len(images))
        with self._lock:
            self.images += len(images)
            self.active -= 1
        return [f"result {i}" for i in range(len(images))]


def _in_request(deadline: float | None, function):
    """Run ``function`` on a fresh thread, as a request with ``deadline`` seconds would."""
    outcome: dict = {}

    def run() -> None:
        guards.start_request(deadline)
        start = time.monotonic()
        try:
            outcome["result"] = function()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_request_within_its_deadline_gets_every_result():
    model = SlowModel(0.01)
    predictor = guards.DeadlinePredictor(model, chunk_size=2)
    thread, outcome = _in_request(5.0, lambda: predictor.predict([np.zeros(1)] * 5, None))
    thread.join()
    assert outcome["result"] == ["result 0", "result 1", "result 0", "result 1", "result 0"]


def test_overrunning_request_fails_at_its_deadline_and_frees_the_model():
    model = SlowModel(0.2)
    predictor = guards.DeadlinePredictor(model, chunk_size=1)
    thread, outcome = _in_request(0.5, lambda: predictor.predict([np.zeros(1)] * 20, None))
    thread.join()
    assert isinstance(outcome["error"], guards.DeadlineExceeded) and outcome["error"].status == 504
    assert 0.45 <= outcome["seconds"] < 0.8
    time.sleep(0.3)  # the chunk running at the deadline finishes; no further chunk starts
    assert model.images <= 4
    follow_up, result = _in_request(1.0, lambda: predictor.predict([np.zeros(1)], None))
    follow_up.join()
    assert result["result"] == ["result 0"]


def test_queued_request_whose_deadline_passes_never_runs():
    model = SlowModel(0.6)
    predictor = guards.DeadlinePredictor(model, concurrency=1)
    first, first_outcome = _in_request(5.0, lambda: predictor.predict([np.zeros(1)], None))
    time.sleep(0.1)
    second, second_outcome = _in_request(0.2, lambda: predictor.predict([np.zeros(1)], None))
    first.join()
    second.join()
    assert first_outcome["result"] == ["result 0"]
    assert isinstance(second_outcome["error"], guards.DeadlineExceeded)
    assert "waiting for the model" in second_outcome["error"].message
    assert model.images == 1 and model.max_active == 1


def test_without_a_deadline_the_call_is_direct():
    model = SlowModel(0.0)
    guards.start_request(None)
    assert guards.DeadlinePredictor(model).predict([np.zeros(1)], None) == ["result 0"]


def test_resource_errors_become_422_and_others_stay_500():
    assert guards.translate_resource_error(MemoryError()).status == 422
    assert guards.translate_resource_error(MemoryError()).code == "insufficient_memory"
    assert guards.translate_resource_error(ValueError("x")) is None
    assert guards.translate_resource_error(RuntimeError("out of memory?")) is None


def test_body_read_errors():
    assert guards.body_read_error(TimeoutError()).status == 408
    malformed = guards.body_read_error(OSError("Invalid chunk size"))
    assert malformed.status == 400 and malformed.code == "malformed_body"


@pytest.mark.parametrize(("status", "reason", "expected"), [(400, "Bad Request", 400), (501, "Not Implemented", 400),
                                                            (431, "Request Header Fields Too Large", 431)])
def test_gunicorn_error_pages_are_json(status, reason, expected):
    server, client = socket.socketpair()
    with server, client:
        write_json_error(server, status, reason, "details <b>")
        server.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: client.recv(4096), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {expected} ".encode())
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert json.loads(body)["error"]["message"] == "details <b>"
