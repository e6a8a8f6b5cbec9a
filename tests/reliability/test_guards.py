"""Unit tests of the guards' logic (the end-to-end behaviour is in test_faults.py on a real server): deadline
derivation, the scheduler's deadlines (queueing, one batch at a time), body reading and draining, gunicorn's JSON
error pages. The translation of errors is tested in tests/test_errors.py."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from maskrcnn_serving.backends.base import PredictOptions, PreparedImage
from maskrcnn_serving.deadline import NO_DEADLINE, Deadline
from maskrcnn_serving.errors import DeadlineExceeded, to_serving_error
from maskrcnn_serving.scheduler import Scheduler
from maskrcnn_serving.server import guards
from maskrcnn_serving.server.gunicorn_worker import write_json_error
from maskrcnn_serving.settings import Settings


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
    assert Settings.from_env(environ).deadline_seconds == expected


def test_malformed_deadline_setting_is_refused():
    with pytest.raises(ValueError, match="MODEL_SERVER_REQUEST_DEADLINE"):
        Settings.from_env({"MODEL_SERVER_REQUEST_DEADLINE": "soon"})


class SlowModel:
    """Takes ``seconds`` per image, one call at a time, and records how many images it computed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.images = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, images, options):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.seconds * len(images))
        with self._lock:
            self.images += len(images)
            self.active -= 1
        return [f"result {i}" for i in range(len(images))]


def _images(count: int) -> list[PreparedImage]:
    return [PreparedImage(np.zeros((1, 1, 3), np.uint8), 1.0, (1, 1)) for _ in range(count)]


def _in_request(scheduler: Scheduler, count: int, deadline_seconds: float | None):
    """Run ``count`` images through ``scheduler`` on a fresh thread, as a request with that deadline would."""
    outcome: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            results = scheduler.run(_images(count), [PredictOptions()] * count, Deadline.after(deadline_seconds))
            outcome["result"] = [r.detections for r in results]
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_request_within_its_deadline_gets_every_result():
    with Scheduler(SlowModel(0.01), max_batch_size=2) as scheduler:
        thread, outcome = _in_request(scheduler, 5, 5.0)
        thread.join()
    assert outcome["result"] == ["result 0", "result 1", "result 0", "result 1", "result 0"]


def test_overrunning_request_fails_at_its_deadline_and_frees_the_model():
    model = SlowModel(0.2)
    with Scheduler(model, max_batch_size=1) as scheduler:
        thread, outcome = _in_request(scheduler, 20, 0.5)
        thread.join()
        assert isinstance(outcome["error"], DeadlineExceeded) and outcome["error"].status == 504
        assert 0.45 <= outcome["seconds"] < 0.8
        assert "the model was still running" in outcome["error"].message
        time.sleep(0.3)  # the batch running at the deadline finishes; no further batch starts
        assert model.images <= 4
        follow_up, result = _in_request(scheduler, 1, 1.0)
        follow_up.join()
    assert result["result"] == ["result 0"]


def test_queued_request_whose_deadline_passes_never_runs():
    model = SlowModel(0.6)
    with Scheduler(model, max_batch_size=1) as scheduler:
        first, first_outcome = _in_request(scheduler, 1, 5.0)
        time.sleep(0.1)
        second, second_outcome = _in_request(scheduler, 1, 0.2)
        first.join()
        second.join()
    assert first_outcome["result"] == ["result 0"]
    assert isinstance(second_outcome["error"], DeadlineExceeded)
    assert "waiting for the model" in second_outcome["error"].message
    assert model.images == 1 and model.max_active == 1


def test_without_a_deadline_the_call_waits_for_the_model():
    with Scheduler(SlowModel(0.0)) as scheduler:
        assert [r.detections for r in scheduler.run(_images(1), [PredictOptions()], NO_DEADLINE)] == ["result 0"]


def test_deadline_checks_name_the_stage():
    Deadline.after(None).check("decoding")
    with pytest.raises(DeadlineExceeded, match="decoding"):
        Deadline.after(-1.0).check("decoding")


def test_bodies_over_the_limit_are_drained_before_the_413():
    assert guards.read_body(io.BytesIO(b"x" * 10), 10, 10, 1.0) == b"x" * 10
    for declared in (None, 30):  # chunked (no length), or a declared length over the limit
        stream = io.BytesIO(b"x" * 30)
        with pytest.raises(guards.RequestTooLarge) as info:
            guards.read_body(stream, declared, 10, 1.0)
        assert info.value.status == 413 and info.value.code == "request_too_large"
        assert stream.read() == b""  # everything was read, so the client can read the answer
    huge = io.BytesIO(b"x" * (guards.DRAIN_MAX_BYTES + 100))
    with pytest.raises(guards.RequestTooLarge):
        guards.read_body(huge, None, 10, 5.0)
    assert len(huge.read()) == 100 - 11  # the limit + 1 bytes read, then drained up to the bound, no further


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
    assert json.loads(body)["error"]["code"] == {400: "bad_http_request", 431: "headers_too_large"}[expected]


# ------------------------------------------------------------------------------------------ chunked framing


def _chunked_body(framing: bytes, pieces: int = 1, monkeypatch=None):
    """A real gunicorn request parsed from ``framing`` (a chunked body) arriving in ``pieces`` reads, with the
    worker's bounded reader; returns (body bytes, trailers) or the exception the body read raised."""
    from gunicorn.config import Config
    from gunicorn.http import message
    from gunicorn.http.parser import RequestParser

    from maskrcnn_serving.server.gunicorn_worker import BoundedChunkedReader

    monkeypatch.setattr(message, "ChunkedReader", BoundedChunkedReader)
    raw = b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + framing
    step = max(1, len(raw) // pieces)
    request = next(RequestParser(Config(), iter([raw[i : i + step] for i in range(0, len(raw), step)]), ("h", 1)))
    try:
        return request.body.read(1 << 20), request.trailers
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


@pytest.mark.parametrize("framing", [
    b"1\r\nX\r\n0\r\nX T: a\r\n\r\n",  # invalid field name
    b"1\r\nX\r\n0\r\nX-T: " + b"a" * 9000 + b"\r\n\r\n",  # a 9,000-byte trailer
    b"1\r\nX\r\n0\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",  # 200 trailer fields
    b"1\r\nX\r\n0\r\nX-T: a\x00b\r\n\r\n",  # NUL
    b"1\r\nX\r\n0\r\nX-T: a\r\n  b\r\n\r\n",  # obs-fold
    b"1\r\nX\r\n0\r\nX-T: a\r\n" + b"b" * 20000,  # a trailer section that never ends
    b"1;" + b"e" * 24_000_000 + b"\r\nX\r\n0\r\n\r\n",  # a chunk size followed by a 24 MB extension
    b"1;e\r\nX\r\n" * 300_000 + b"0\r\n\r\n",  # 1.5 MB of chunk-size lines for 300 kB of data
    b"zz\r\nabc\r\n0\r\n\r\n",  # not a chunk size
], ids=["bad-name", "9000-byte", "200-fields", "nul", "obs-fold", "unterminated", "24MB-extension", "framing",
        "bad-size"])
def test_malformed_chunked_framing_is_a_400_in_linear_time(framing, monkeypatch):
    """Defects 6 and 7: gunicorn's trailer parse errors escaped the body reader (500), and chunk-size lines were
    read in quadratic time with no limit (a 24 MB extension: 33 s of CPU). The bounded reader raises an OSError
    for all of them, which read_body answers 400 malformed_body, at once."""
    start = time.process_time()
    outcome = _chunked_body(framing, pieces=max(1, len(framing) // 8192), monkeypatch=monkeypatch)
    assert isinstance(outcome, OSError), outcome
    error = to_serving_error(outcome, reading_body=True)
    assert error.status == 400 and error.code == "malformed_body"
    assert time.process_time() - start < 2.0


def test_valid_chunked_bodies_and_trailers_still_read(monkeypatch):
    body, trailers = _chunked_body(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 1\r\n\r\n", pieces=17,
                                   monkeypatch=monkeypatch)
    assert body == b"abcde" and trailers == [("X-CHECKSUM", "1")]
    assert _chunked_body(b"5\r\nhello\r\n0\r\n\r\n", monkeypatch=monkeypatch) == (b"hello", [])


# ------------------------------------------------------------------------------------------ memory given back


def test_memory_is_given_back_after_a_request_that_left_the_worker_over_its_margin(tmp_path):
    """A real heap in a fresh process: 256 MB of 64 kB blocks freed under a live block stay resident (glibc keeps
    them in its heap); after a request, MemoryReturn (margin 64 MB) gives them back to the kernel."""
    script = (
        "import ctypes\n"
        "from maskrcnn_serving.server import guards\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
        "returner = guards.configure_memory_return(64)\n"
        "blocks = [libc.malloc(65536) for _ in range(4097)]\n"
        "for block in blocks: libc.memset(block, 1, 65536)\n"
        # The last block stays: it came from the heap's top, above the others, so the heap cannot shrink from its
        # top (a small pin could come from a free chunk lower down, and then glibc trims by itself at free).
        "pin = blocks.pop()\n"
        "for block in blocks: libc.free(block)\n"
        "held = guards.resident_bytes()\n"
        "returner.after_request()\n"
        "print((held - guards.resident_bytes()) >> 20, returner.trims)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    returned_mb, trims = map(int, result.stdout.split())
    assert trims == 1 and returned_mb > 200, result.stderr[-2000:]


def test_memory_return_follows_growth_not_every_request(monkeypatch):
    rss = iter([1000, 1100, 1400, 1300, 1320, 1600, 1350])  # MB, one reading per call
    trims = []
    monkeypatch.setattr(guards, "resident_bytes", lambda: next(rss) << 20)
    monkeypatch.setattr(guards, "_malloc_trim", lambda: lambda pad: trims.append(pad))
    returner = guards.configure_memory_return(256)  # warm 1000 MB: the first trigger is 1256
    returner.after_request()  # 1100: under it
    returner.after_request()  # 1400: trim (1400 -> 1300); what stays sets the next trigger at 1556
    returner.after_request()  # 1320: under it, no trim although over warm + 256
    returner.after_request()  # 1600: trim again
    assert trims == [0, 0] and returner.trims == 2
    assert guards.MemoryReturn(0)._trim is None  # 0: never
