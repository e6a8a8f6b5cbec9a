"""server/guards.py, function by function, on real sockets and real processes: draining (bounded in bytes and time),
reading a body that stalls, is cut short or is declared too large, the memory headroom, resident memory and the
memory given back. The guards against hostile requests on a real server are tested in tests/reliability (this file is
not test_guards.py: test modules are imported by their names, and tests/reliability/test_guards.py has that one)."""

from __future__ import annotations

import io
import resource
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser

from maskrcnn_serving.errors import ClientTimeout, MalformedBody, RequestTooLarge
from maskrcnn_serving.server import guards


def _dribbling_stream(byte_every: float, total: int, timeout: float | None = None, buffering: int = 0):
    """A socket's read side whose peer sends one byte every ``byte_every`` seconds, ``total`` bytes, then closes
    (unbuffered, a read returns what has arrived; buffered, it waits for the size asked, as gunicorn's does)."""
    reader, writer = socket.socketpair()
    reader.settimeout(timeout)

    def send() -> None:
        with writer:
            for _ in range(total):
                try:
                    writer.sendall(b"x")
                except OSError:
                    return
                time.sleep(byte_every)

    threading.Thread(target=send, daemon=True).start()
    return reader, reader.makefile("rb", buffering=buffering)


def test_drain_stops_at_the_end_the_byte_bound_or_the_time_bound():
    assert guards.drain(io.BytesIO(b"x" * 1000), max_bytes=10_000, max_seconds=5) == 1000
    assert guards.drain(io.BytesIO(b"x" * 1000), max_bytes=100, max_seconds=5) == 100
    sock, stream = _dribbling_stream(0.05, total=1000)
    with sock, stream:
        start = time.monotonic()
        drained = guards.drain(stream, max_bytes=10_000, max_seconds=0.5)
        assert time.monotonic() - start < 1.5 and 3 <= drained <= 20


def test_drain_ends_quietly_on_a_stalled_client():
    sock, stream = _dribbling_stream(10.0, total=1, timeout=0.2)  # one byte, then silence
    with sock, stream:
        assert guards.drain(stream, max_bytes=10_000, max_seconds=5) == 1


def test_a_stalled_body_is_a_408():
    sock, stream = _dribbling_stream(10.0, total=1, timeout=0.3, buffering=-1)
    with sock, stream, pytest.raises(ClientTimeout) as raised:
        guards.read_body(stream, 100, limit=1000, drain_seconds=1)
    assert raised.value.message == ClientTimeout.stalled().message


def test_a_chunked_body_cut_short_is_a_400():
    raw = b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    request = next(RequestParser(Config(), iter([raw]), ("h", 1)))
    with pytest.raises(MalformedBody) as raised:
        guards.read_body(request.body, None, limit=1000, drain_seconds=1)
    assert raised.value.status == 400 and "NoMoreData" in raised.value.message


def test_a_body_declared_over_the_limit_says_its_size():
    with pytest.raises(RequestTooLarge) as raised:
        guards.read_body(io.BytesIO(b"x" * 30), 30, limit=10, drain_seconds=1)
    assert raised.value.message == RequestTooLarge.over_limit(10, 30).message


def test_memory_headroom_caps_the_data_segment_of_the_process():
    """In a child process: 0 sets no limit; 64 MB caps ``RLIMIT_DATA`` at the current size + 64 MB, under which a
    small allocation still works and a 256 MB one fails with MemoryError."""
    script = (
        "import resource\n"
        "from maskrcnn_serving.server import guards\n"
        "assert guards.apply_memory_headroom(0) is None\n"
        "assert resource.getrlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY\n"
        "limit = guards.apply_memory_headroom(64)\n"
        "assert resource.getrlimit(resource.RLIMIT_DATA)[0] == limit\n"
        "small = bytearray(16 << 20)\n"
        "try:\n"
        "    bytearray(256 << 20)\n"
        "except MemoryError:\n"
        "    print('refused')\n"
    )
    if resource.getrlimit(resource.RLIMIT_DATA)[0] != resource.RLIM_INFINITY:
        pytest.skip("this process already runs under a data-segment limit")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "refused", result.stderr[-2000:]


def test_resident_memory_follows_what_the_process_touches():
    before = guards.resident_bytes()
    block = np.ones(64 << 20, np.uint8)  # touched: resident
    assert guards.resident_bytes() - before >= 48 << 20
    del block


def test_memory_return_is_configured_per_worker_and_off_at_zero():
    returner = guards.configure_memory_return(0)
    assert guards.memory_return is returner and returner.limit is None
    returner.after_request()  # off: no reading, no trim
    assert returner.trims == 0
    returner = guards.configure_memory_return(1024)
    assert guards.memory_return is returner
    assert returner.warm_limit == returner.limit and returner.limit > guards.resident_bytes()
    returner.after_request()  # under its warm size + 1 GB: nothing to give back
    assert returner.trims == 0
    guards.configure_memory_return(0)
