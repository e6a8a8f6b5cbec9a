"""The gunicorn worker class of ``maskrcnn-serving serve``: gunicorn's ``gthread`` worker, hardened.

* **Slow clients.** ``gthread`` reads a request with a blocking socket and no timeout, so a client that sends its
  headers or body slowly (or stops) holds a request thread forever, and a handful of them starve the worker.
  Here every connection gets a socket timeout of ``MODEL_SERVER_CLIENT_TIMEOUT`` seconds (default 20): the time
  allowed between two reads, like nginx's ``client_body_timeout``. A stalled body gets a 408 JSON answer
  (:class:`maskrcnn_serving.errors.ClientTimeout`); stalled headers close the connection. After any error answer
  to a request with a body the connection is closed (the rest of the body may be unread).
* **JSON everywhere.** Requests gunicorn refuses before the app sees them (a request line or headers over its
  limits, malformed HTTP) are answered with the server's JSON error body instead of gunicorn's HTML page, with the
  error :func:`maskrcnn_serving.errors.to_serving_error` gives for gunicorn's status (the same 4xx; an unsupported
  ``Transfer-Encoding``, gunicorn's 501, is the client's error: 400).
* **Bounded chunked framing.** gunicorn reads a chunk-size line (and the trailer section) by searching a growing
  buffer for its end, with no length limit: quadratic time, and a line of any length (a chunk size followed by a
  24 MB extension took 33 s of CPU, outside the body limit). :class:`BoundedChunkedReader` reads those lines in
  linear time, at most ``MAX_CHUNK_LINE_BYTES`` each and ``MAX_CHUNK_FRAMING_BYTES`` per body, and turns gunicorn's
  trailer parse errors (invalid names, NUL, obs-fold, too many or too long fields: exceptions the body reader's
  caller never expected, so 500s) into an ``OSError`` like its other framing errors, which
  :func:`maskrcnn_serving.server.guards.read_body` answers 400 ``malformed_body``.
* **A thread for /ping.** ``gthread`` hands every connection to one pool of ``MODEL_SERVER_THREADS`` request
  threads, so with gunicorn alone a health check waited behind every queued inference (seconds under load). Here a
  connection whose first bytes are a ``GET`` or ``HEAD`` of ``/ping`` goes to a pool of its own (one thread),
  which no other request can take; it answers from the readiness files (:mod:`.readiness`) in about a millisecond.
  What this cannot do without nginx: a client that sends ``GET /ping`` and then stalls holds that thread until
  the client timeout, and while no worker is alive nobody accepts the connection (behind nginx, nginx answers
  ``/ping`` itself in both cases).
* **Readiness.** A worker withdraws its readiness (:class:`.readiness.WorkerReadiness`) as soon as it starts to
  exit, so ``/ping`` stops counting it before it stops accepting.

The worker's settings are the server's, read once by the gunicorn master (its application,
:class:`maskrcnn_serving.server.process.GunicornApplication`, carries them into every worker it forks).
"""

from __future__ import annotations

import socket
from concurrent import futures
from http import HTTPStatus

from gunicorn import util
from gunicorn.http import message as gunicorn_message
from gunicorn.http.body import ChunkedReader
from gunicorn.http.errors import InvalidChunkSize, NoMoreData, ParseException
from gunicorn.workers.gthread import ThreadWorker

from maskrcnn_serving.errors import HttpStatusError, MalformedChunkedBody, error_body, to_serving_error
from maskrcnn_serving.server import guards, headers
from maskrcnn_serving.server.readiness import WorkerReadiness


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error``: the server's error for gunicorn's status, as JSON. gunicorn's
    message is shown when the answer is a 4xx (it says what is wrong with the request), never for a 5xx (it may hold
    internals)."""
    error = to_serving_error(HttpStatusError(status_int, mesg or reason))
    body = error_body(error.code, error.message if error.status < 500 else "Internal server error.")
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.for_status(error.status).items())
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{fields}\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


def _close_after_body_errors(app):
    """Close the connection after an error answer to a request with a body: the body may be unread (a 413 refused
    by its declared length, a 408 for a stalled upload), and keeping the connection would make gunicorn read the
    rest of it as the next request."""

    def wrapped(environ, start_response):
        def start(status: str, headers, exc_info=None):
            has_body = environ.get("CONTENT_LENGTH") not in (None, "", "0") or "chunked" in environ.get(
                "HTTP_TRANSFER_ENCODING", ""
            ).lower()
            response = getattr(start_response, "__self__", None)  # gunicorn's Response
            if has_body and int(status[:3]) >= 400 and hasattr(response, "force_close"):
                response.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions (nginx reads chunk lines of any length)
MAX_CHUNK_FRAMING_BYTES = 1 << 20  # chunk-size lines and trailers of one body together
MAX_TRAILER_BYTES = 8190  # the trailer section (gunicorn's limit for one header field)


class BoundedChunkedReader(ChunkedReader):
    """gunicorn's chunked body reader with bounded, linear-time chunk-size lines and trailers (module docstring)."""

    def __init__(self, req, unreader) -> None:
        self.framing_bytes = 0
        super().__init__(req, unreader)

    def _read_until(self, unreader, data: bytes, end: bytes, limit: int, what: str) -> tuple[bytes, bytes]:
        """(the bytes before ``end``, the bytes after it), reading more as needed; at most ``limit`` bytes."""
        buffer = bytearray(data)
        searched = 0
        while (index := buffer.find(end, searched)) < 0:
            searched = max(0, len(buffer) - len(end) + 1)
            if len(buffer) > limit:
                raise MalformedChunkedBody(f"The {what} is over {limit} bytes.")
            more = unreader.read()
            if not more:
                raise NoMoreData(bytes(buffer[-20:]))
            buffer += more
        if index > limit:
            raise MalformedChunkedBody(f"The {what} is over {limit} bytes.")
        self.framing_bytes += index + len(end)
        if self.framing_bytes > MAX_CHUNK_FRAMING_BYTES:
            raise MalformedChunkedBody(f"The chunked framing is over {MAX_CHUNK_FRAMING_BYTES} bytes.")
        return bytes(buffer[:index]), bytes(buffer[index + len(end) :])

    def parse_chunk_size(self, unreader, data=None):
        line, rest = self._read_until(unreader, data or b"", b"\r\n", MAX_CHUNK_LINE_BYTES, "chunk-size line")
        chunk_size, *extension = line.split(b";", 1)
        if extension:  # RFC 9112 7.1.1: whitespace before a chunk extension only
            chunk_size = chunk_size.rstrip(b" \t")
        if not chunk_size or any(c not in b"0123456789abcdefABCDEF" for c in chunk_size):
            raise InvalidChunkSize(chunk_size[:64])
        size = int(chunk_size, 16)
        if size == 0:
            try:
                self.parse_trailers(unreader, rest)
            except NoMoreData:
                pass
            return 0, None
        return size, rest

    def parse_trailers(self, unreader, data):
        buffer = data
        while len(buffer) < 2:  # the section ends at once with CRLF, or holds fields up to CRLF CRLF
            more = unreader.read()
            if not more:
                raise NoMoreData(buffer)
            buffer += more
        if buffer[:2] == b"\r\n":
            self.framing_bytes += 2
            unreader.unread(buffer[2:])
            return
        fields, rest = self._read_until(unreader, buffer, b"\r\n\r\n", MAX_TRAILER_BYTES, "trailer section")
        try:
            self.req.trailers = self.req.parse_headers(fields, from_trailer=True)
        except ParseException as exc:
            raise MalformedChunkedBody(f"Malformed trailer ({type(exc).__name__}).") from None
        unreader.unread(rest)


# The request lines that go to the ping thread: a GET or HEAD of /ping, with or without a query.
PING_REQUESTS = tuple(f"{method} /ping{end}".encode() for method in ("GET", "HEAD") for end in (" ", "?"))
_PING_PEEK_BYTES = max(len(prefix) for prefix in PING_REQUESTS)


def asks_for_ping(sock: socket.socket) -> bool:
    """Whether the next request on ``sock`` (non-blocking, readable) starts with a ``/ping`` request line: its first
    bytes, peeked (left for the request parser to read)."""
    try:
        start = sock.recv(_PING_PEEK_BYTES, socket.MSG_PEEK)
    except OSError:  # nothing to read after all, or an error the request thread will meet and handle
        return False
    return start.startswith(PING_REQUESTS)


class GuardedThreadWorker(ThreadWorker):
    """``gthread`` with a per-connection read timeout, JSON error pages, bounded chunked framing, a thread for
    ``/ping`` and readiness withdrawn on exit (see the module docstring)."""

    def init_process(self) -> None:
        settings = self.app.settings  # the master's settings (module docstring)
        self.client_timeout = settings.client_timeout
        self.readiness = WorkerReadiness(settings.readiness_dir) if settings.readiness_dir else None
        self.ping_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ping")
        util.write_error = write_json_error  # the one function gunicorn's handle_error writes its pages with
        gunicorn_message.ChunkedReader = BoundedChunkedReader  # the name Request.set_body_reader instantiates
        super().init_process()

    def enqueue_req(self, conn) -> None:
        """gthread's ``enqueue_req``, with ``/ping`` requests handed to the ping pool instead of the request pool
        (the socket is still non-blocking here: gthread makes it blocking in ``conn.init``)."""
        if not asks_for_ping(conn.sock):
            super().enqueue_req(conn)
            return
        conn.init()
        self._wrap_future(self.ping_pool.submit(self.handle, conn), conn)

    def run(self) -> None:
        try:
            super().run()
        finally:  # the loop ended (parent gone, a signal to quit or abort): this worker serves no more
            self.ping_pool.shutdown(wait=False)
            self._withdraw()

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: a graceful exit begins (the requests in flight finish); ``/ping`` stops counting this worker."""
        self._withdraw()
        super().handle_exit(sig, frame)

    def _withdraw(self) -> None:
        if self.readiness is not None:
            self.readiness.withdraw()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _close_after_body_errors(self.wsgi)

    def handle(self, conn):
        conn.sock.settimeout(self.client_timeout)
        return super().handle(conn)

    def handle_request(self, req, conn):
        try:
            return super().handle_request(req, conn)
        finally:  # the answer is sent: give memory back if a large request left the worker over its margin
            guards.memory_return.after_request()
