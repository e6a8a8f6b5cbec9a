"""The gunicorn worker class of ``maskrcnn-serving serve``: gunicorn's ``gthread`` worker with two hardenings.

* **Slow clients.** ``gthread`` reads a request with a blocking socket and no timeout, so a client that sends its
  headers or body slowly (or stops) holds a request thread forever, and a handful of them starve the worker.
  Here every connection gets a socket timeout of ``MODEL_SERVER_CLIENT_TIMEOUT`` seconds (default 20): the time
  allowed between two reads, like nginx's ``client_body_timeout``. A stalled body gets a 408 JSON answer
  (:class:`maskrcnn_serving.errors.ClientTimeout`); stalled headers close the connection. After any error answer
  to a request with a body the connection is closed (the rest of the body may be unread).
* **JSON everywhere.** Requests gunicorn refuses before the app sees them (a request line or headers over its
  limits, malformed HTTP) are answered with the server's JSON error body instead of gunicorn's HTML page, with the
  same 4xx status. An unsupported ``Transfer-Encoding`` (gunicorn: 501) is answered 400: it is the client's error.
"""

from __future__ import annotations

import os

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from maskrcnn_serving.errors import error_body, error_for_status
from maskrcnn_serving.settings import Settings


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error``: the same status line, a JSON body."""
    if status_int == 501:
        status_int, reason = 400, "Bad Request"
    message = "Internal server error." if status_int >= 500 else (mesg or reason)
    body = error_body(error_for_status(status_int).code, message)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
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


class GuardedThreadWorker(ThreadWorker):
    """``gthread`` with a per-connection read timeout and JSON error pages (see the module docstring)."""

    def init_process(self) -> None:
        self.client_timeout = Settings.from_env(os.environ).client_timeout
        util.write_error = write_json_error  # the one function gunicorn's handle_error writes its pages with
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _close_after_body_errors(self.wsgi)

    def handle(self, conn):
        conn.sock.settimeout(self.client_timeout)
        return super().handle(conn)
