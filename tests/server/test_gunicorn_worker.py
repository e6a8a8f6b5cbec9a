"""server/gunicorn_worker.py, function by function, with gunicorn's own request and response objects: the JSON
error pages, closing the connection after an error answer to a request with a body, the bounded chunk-size lines,
and the worker's read timeout taken from the settings the master read (a real gunicorn master and worker). The
hostile requests on a real server are tested in tests/reliability."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import IterUnreader

from maskrcnn_serving.errors import MalformedChunkedBody
from maskrcnn_serving.server import gunicorn_worker, headers, process
from maskrcnn_serving.settings import Settings
from testsupport.server import free_port


def _written_error(status: int, reason: str, mesg: str) -> tuple[bytes, dict]:
    server, client = socket.socketpair()
    with server, client:
        gunicorn_worker.write_json_error(server, status, reason, mesg)
        server.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: client.recv(4096), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    return head, json.loads(body)["error"]


def test_error_pages_keep_a_4xx_message_and_hide_a_5xx_one():
    head, error = _written_error(403, "Forbidden", "Invalid proxy header from 10.0.0.1")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    for name, value in headers.for_status(403).items():  # the headers of every answer (issue 23, defect 8)
        assert f"\r\n{name}: {value}\r\n".encode() in head + b"\r\n", name
    assert error == {"code": "forbidden", "message": "Invalid proxy header from 10.0.0.1"}
    head, error = _written_error(500, "Internal Server Error", "Traceback (most recent call last): /srv/app.py")
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert error == {"code": "internal_error", "message": "Internal server error."}
    head, error = _written_error(400, "Bad Request", "")
    assert error["message"] == "Bad Request"  # gunicorn's reason when it gives no message


def _gunicorn_exchange(raw: bytes, status: str) -> bool:
    """A request parsed by gunicorn and answered ``status`` by an app behind the connection-closing wrapper;
    whether gunicorn then closes the connection."""
    server, client = socket.socketpair()
    with server, client:
        request = next(RequestParser(Config(), iter([raw]), ("127.0.0.1", 1)))
        response, environ = wsgi.create(request, server, ("127.0.0.1", 1), ("127.0.0.1", 8080), Config())

        def app(environ, start_response):
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", "2")])
            return [b"{}"]

        list(gunicorn_worker._close_after_body_errors(app)(environ, response.start_response))
        return response.should_close()


def test_an_error_answer_to_a_request_with_a_body_closes_the_connection():
    with_length = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    chunked = b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    without = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _gunicorn_exchange(with_length, "413 Payload Too Large")
    assert _gunicorn_exchange(chunked, "400 Bad Request")
    assert not _gunicorn_exchange(with_length, "200 OK")  # kept alive: the body was read
    assert not _gunicorn_exchange(without, "503 Service Unavailable")


def _reader(framing: bytes) -> gunicorn_worker.BoundedChunkedReader:
    request = next(RequestParser(Config(), iter([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]), ("h", 1)))
    return gunicorn_worker.BoundedChunkedReader(request, IterUnreader([framing[i:i + 7] for i in
                                                                      range(0, len(framing), 7)]))


def test_chunk_size_lines_up_to_the_limit_are_read_and_longer_ones_refused():
    longest = b"5;" + b"e" * (gunicorn_worker.MAX_CHUNK_LINE_BYTES - 2)
    assert _reader(longest + b"\r\nhello\r\n0\r\n\r\n").read(100) == b"hello"
    with pytest.raises(MalformedChunkedBody, match="chunk-size line is over"):
        _reader(longest + b"e\r\nhello\r\n0\r\n\r\n").read(100)
    reader = _reader(b"2\r\nhi\r\n0\r\n\r\n")
    assert reader.read(100) == b"hi" and reader.framing_bytes == len(b"2\r\n0\r\n\r\n")


# The gunicorn master of ``--run-gunicorn``, with every reading of settings from an environment reported on stderr.
COUNTING_MASTER = """
import os, sys
from maskrcnn_serving.settings import Settings
from_env = Settings.from_env.__func__
def reported(cls, environ, **overrides):
    print(f"Settings.from_env in {os.getpid()}", file=sys.stderr, flush=True)
    return from_env(cls, environ, **overrides)
Settings.from_env = classmethod(reported)
from maskrcnn_serving.server import process
sys.exit(process.main(sys.argv[1:]))
"""


def _gunicorn_master(settings: Settings, port: int, program: list[str], stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``--run-gunicorn`` on 127.0.0.1:``port`` with ``settings`` in a clean environment; ``program``: how Python
    runs it (``-m`` and the module, or ``-c`` and a wrapper)."""
    environ = process.child_environment(settings, {k: v for k, v in os.environ.items()
                                                   if not k.startswith(("MODEL_SERVER_", "SM_", "PROMETHEUS_"))})
    return subprocess.Popen([sys.executable, *program, "--run-gunicorn", "--bind", f"127.0.0.1:{port}",
                             "--log-level", "WARNING"], env=environ, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True)


def _wait_until_answering(master: subprocess.Popen, port: int) -> None:
    """Until a worker answers: once it has built its app (the model fails to load: 503)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
                probe.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if probe.recv(1024).startswith(b"HTTP/1.1 503"):
                    return
        except OSError:
            pass
        assert master.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


def test_the_worker_takes_its_client_timeout_from_the_settings_the_master_read_once(tmp_path):
    """A real gunicorn master (``--run-gunicorn``) and worker with ``client_timeout=1``: a client that sends half
    a request line and stops is dropped after about a second, not the default 20; and the settings were read from
    the environment once, by the master (the worker and its app use the master's, inherited when it forked)."""
    port = free_port()
    settings = Settings(model_dir=str(tmp_path / "no-model"), client_timeout=1.0, workers=1, front="none")
    master = _gunicorn_master(settings, port, ["-c", COUNTING_MASTER], stderr=subprocess.PIPE)
    try:
        _wait_until_answering(master, port)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"GET /pi")
            start = time.monotonic()
            assert client.recv(1024) == b""  # closed by the worker
            elapsed = time.monotonic() - start
        assert 0.8 <= elapsed < 5, elapsed
    finally:
        master.terminate()
        _, stderr = master.communicate(timeout=60)
    readings = [line for line in stderr.splitlines() if line.startswith("Settings.from_env")]
    assert readings == [f"Settings.from_env in {master.pid}"], stderr[-3000:]


def test_a_ping_request_line_is_recognized_from_its_first_bytes_left_unread():
    cases = {b"GET /ping HTTP/1.1\r\n": True, b"HEAD /ping HTTP/1.0\r\n": True, b"GET /ping?x=1 HTTP/1.1": True,
             b"GET /pingx HTTP/1.1\r\n": False, b"POST /ping HTTP/1.1\r\n": False, b"GET /model HTTP/1.1": False,
             b"GET /pi": False, b"": False}
    for start, expected in cases.items():
        server, client = socket.socketpair()
        with server, client:
            client.sendall(start)
            if not start:
                client.shutdown(socket.SHUT_WR)
            server.setblocking(False)
            assert gunicorn_worker.asks_for_ping(server) is expected, start
            if start:
                assert server.recv(100) == start  # only peeked: the request parser reads it all
    server, client = socket.socketpair()
    with server, client:
        server.setblocking(False)
        assert not gunicorn_worker.asks_for_ping(server)  # nothing to read (yet): a request thread's business


def test_ping_has_a_thread_no_request_can_take(tmp_path):
    """Issue 23, defect 3, gunicorn alone: a real worker with one request thread, held by an upload that stalls.
    /ping (GET, HEAD, with a query, twice on one connection) is answered at once on
    the worker's ping thread; any other route waits for the request thread."""
    port = free_port()
    settings = Settings(model_dir=str(tmp_path / "no-model"), client_timeout=4.0, workers=1, threads=1, front="none")
    master = _gunicorn_master(settings, port, ["-m", process.MODULE])

    def exchange(payload: bytes, connection: socket.socket | None = None) -> tuple[bytes, float]:
        """Send ``payload`` (on a new connection, closed after, unless one is given) and read one whole answer."""
        start = time.monotonic()
        sock = connection or socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            sock.sendall(payload)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = 0 if payload.startswith(b"HEAD") else int(re.search(rb"Content-Length: (\d+)", head).group(1))
            while len(body) < length:
                body += sock.recv(65536)
        finally:
            if connection is None:
                sock.close()
        return head, time.monotonic() - start

    try:
        _wait_until_answering(master, port)
        exchange(b"GET /model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # the worker's first answer
        answer, took = exchange(b"GET /model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and took < 1.0, took  # at once while the request thread is free
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            b"Content-Length: 1000\r\n\r\n\x89PNG")
            # The stalled request holds the request thread until the worker's model load fails (it waits for the
            # load, then answers 503 without reading the body): 1.4-2.3 s after the stall, by the machine's speed.
            stalled_answered: dict[str, object] = {}

            def read_stalled_answer() -> None:
                stalled_answered["head"] = stalled.recv(100)
                stalled_answered["at"] = time.monotonic()

            reader = threading.Thread(target=read_stalled_answer, daemon=True)
            reader.start()
            time.sleep(0.5)  # the request thread is reading its body
            for request in (b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b"HEAD /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b"GET /ping?from=checker HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
                answer, took = exchange(request)
                assert answer.startswith(b"HTTP/1.1 503") and took < 1.0, (request, answer[:100], took)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as kept:
                for _ in range(2):  # a kept-alive connection is peeked again at its next request
                    answer, took = exchange(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", kept)
                    assert answer.startswith(b"HTTP/1.1 503") and took < 1.0, took
            pinged = time.monotonic()
            answer, _ = exchange(b"GET /model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answered = time.monotonic()
            reader.join(30)
            # The pings were answered while the request thread was still held; /model only after it was let go.
            assert stalled_answered["head"].startswith(b"HTTP/1.1 503"), stalled_answered
            assert pinged < stalled_answered["at"] <= answered, (pinged, stalled_answered["at"], answered)
    finally:
        master.terminate()
        master.wait(timeout=60)

