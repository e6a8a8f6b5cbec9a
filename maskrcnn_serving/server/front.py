"""The HTTP front of ``maskrcnn-serving serve``: nginx in front of gunicorn, as the seed containers had.

nginx owns the client connections and hands gunicorn (on a unix socket) only complete, valid requests: it reads
headers and bodies (chunked too) itself, so a slow or stalled client holds an nginx connection (thousands are cheap)
instead of one of gunicorn's few request threads; it enforces the body limit (413) and the header and line limits,
with the server's timeouts; it answers its own errors in the server's JSON format (each of its error statuses goes
through :func:`maskrcnn_serving.errors.to_serving_error`, as gunicorn's and the app's do) with the security headers
of every answer (:mod:`.headers`); it answers ``/ping`` itself, from the files the supervisor keeps
(:mod:`.readiness`), so a health check never waits behind inference; and it buffers each answer, so slow readers
cost no thread either. Settings come from :class:`Settings`; the config
is ``nginx.conf.template`` beside this module.

* :func:`choose`: which front ``MODEL_SERVER_FRONT`` asks for (``auto``: nginx when it is installed);
* :func:`render_config`: the nginx config for the server's settings;
* :class:`NginxFront`: nginx as a child process of ``serve`` (start, graceful stop, liveness); the supervisor is
  :mod:`maskrcnn_serving.server.process`.
"""

from __future__ import annotations

import grp
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from maskrcnn_serving.errors import (
    ClientTimeout,
    FrontError,
    HttpStatusError,
    NotReady,
    RequestTooLarge,
    ServingError,
    error_body,
    to_serving_error,
)
from maskrcnn_serving.server import headers, readiness
from maskrcnn_serving.settings import Settings

# Where nginx is looked for besides $PATH (/usr/sbin is not on an unprivileged user's default PATH on Debian).
NGINX_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")
WORKER_PROCESSES = 2
WORKER_CONNECTIONS = 1024
BODY_BUFFER_BYTES = 256 * 1024  # bodies beyond this are spooled to a temp file of nginx's own (runtime dir)
RESPONSE_BUFFER_BYTES = 64 * 1024
UPSTREAM_TIMEOUT_MARGIN = 5  # seconds over MODEL_SERVER_TIMEOUT before nginx gives up on gunicorn
ERROR_PAGE_PREFIX = "/__maskrcnn_errors/"  # internal locations of nginx's own JSON answers
NOT_READY_URI = "/__maskrcnn_ping/not_ready"  # internal location of /ping's 503 (the readiness directory's file)


def find_nginx() -> str | None:
    """The nginx binary: on $PATH, else in the usual sbin directories; None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    for directory in NGINX_DIRS:
        candidate = os.path.join(directory, "nginx")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def choose(front: str) -> str | None:
    """The nginx binary to run for ``front`` (``MODEL_SERVER_FRONT``), or None to run gunicorn alone."""
    if front == "none":
        return None
    binary = find_nginx()
    if binary is None and front == "nginx":
        raise FrontError("MODEL_SERVER_FRONT=nginx but nginx is not installed (apt-get install nginx).")
    return binary


def nginx_version(binary: str) -> tuple[int, ...]:
    """nginx's version (``nginx -v`` prints ``nginx version: nginx/1.22.1`` on stderr)."""
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False, timeout=30)
    match = re.search(r"nginx/(\d+(?:\.\d+)*)", result.stderr + result.stdout)
    return tuple(int(part) for part in match.group(1).split(".")) if match else (0,)


# What nginx's own error statuses tell the client; the error (its code, and the status sent) is the one
# errors.to_serving_error gives for the status. nginx says 494 for a header field over large_client_header_buffers,
# 414 for a request line over them.
NGINX_MESSAGES = {
    400: "The request is not valid HTTP (refused by the server's HTTP front).",
    404: "No such route.",
    405: "The method is not allowed.",
    411: "The request has a body but no length.",
    414: "The request line is too long.",
    494: "A request header field is too long.",
    500: "Internal server error in the HTTP front.",
    501: "The request uses a transfer coding the server does not support.",
    502: "No server worker could answer the request (one died or is restarting); retry it.",
    504: "The request did not finish in time; the server's worker did not answer.",
    505: "The HTTP version is not supported.",
}


def _error_pages(settings: Settings) -> list[tuple[int, ServingError]]:
    """nginx's error statuses and the error answered for each (the stalled request and the body limit have their
    errors' own messages, as the workers answer them)."""
    pages = [(status, to_serving_error(HttpStatusError(status, message))) for status, message in NGINX_MESSAGES.items()]
    return [*pages, (408, ClientTimeout.stalled()), (413, RequestTooLarge.over_limit(settings.max_request_bytes))]


def _nginx_string(text: str) -> str:
    """``text`` as a single-quoted nginx string (no variables may appear in it)."""
    if "$" in text:
        raise ValueError(f"nginx string with a variable: {text!r}")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_config(settings: Settings, listen: str, socket_path: Path, runtime_dir: Path, readiness_dir: Path) -> str:
    """The nginx config for ``settings``: listen on ``listen`` (``host:port``), proxy to gunicorn on
    ``socket_path``, keep pid and temp files in ``runtime_dir``, answer ``/ping`` from the files the supervisor
    keeps in ``readiness_dir`` (:mod:`.readiness`)."""
    error_pages = []
    for status, error in _error_pages(settings):  # internal URIs, not named locations: those fail ("empty URI")
        body = error_body(error.code, error.message).decode()  # for errors found while reading the request line
        error_pages.append(f"        error_page {status} ={error.status} {ERROR_PAGE_PREFIX}{status};\n"
                           f"        location = {ERROR_PAGE_PREFIX}{status} {{ internal; client_max_body_size 0; "
                           f"return {error.status} {_nginx_string(body)}; "  # (no second 413 on the way)
                           f"{headers.nginx_directives(error.status)} }}")
    user = ""
    if os.geteuid() == 0:  # nginx's workers would become `nobody`, who cannot reach gunicorn's socket or temp dirs
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    values = {
        "worker_processes": str(WORKER_PROCESSES),
        "worker_connections": str(WORKER_CONNECTIONS),
        "runtime_dir": str(runtime_dir),
        "user": user,
        "max_request_bytes": str(settings.max_request_bytes),
        "body_buffer_bytes": str(min(BODY_BUFFER_BYTES, settings.max_request_bytes)),
        "client_timeout": str(max(1, math.ceil(settings.client_timeout))),
        "socket": str(socket_path),
        "listen": listen,
        "response_buffers": str(max(4, math.ceil(settings.max_response_bytes / RESPONSE_BUFFER_BYTES) + 1)),
        "upstream_timeout": str(settings.timeout + UPSTREAM_TIMEOUT_MARGIN),
        "error_pages": "\n".join(error_pages),
        "readiness_dir": str(readiness_dir),
        "ready_file": readiness.READY_FILE,
        "not_ready_file": readiness.NOT_READY_FILE,
        "not_ready_uri": NOT_READY_URI,
        "ready_headers": headers.nginx_directives(200, headers.NO_STORE),
        "not_ready_headers": headers.nginx_directives(NotReady.status),
    }
    template = resources.files("maskrcnn_serving.server").joinpath("nginx.conf.template").read_text()
    rendered = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)
    return rendered


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NginxFront:
    """nginx on ``host:port`` in front of gunicorn's unix socket, as a child process; ``/ping`` from the files in
    ``readiness_dir``."""

    def __init__(self, binary: str, settings: Settings, host: str, port: int, socket_path: Path,
                 runtime_dir: Path, readiness_dir: Path) -> None:
        self.binary = binary
        self.version = nginx_version(binary)
        self.runtime_dir = Path(runtime_dir)
        self.config_path = self.runtime_dir / "nginx.conf"
        self.config_path.write_text(render_config(settings, listen_address(host, port), socket_path, runtime_dir,
                                                  readiness_dir))
        self.process: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        # -e (nginx >= 1.19.5): errors before the config is read go to stderr, not to a root-owned log file
        early_log = ["-e", "stderr"] if self.version >= (1, 19, 5) else []
        return [self.binary, "-p", str(self.runtime_dir), "-c", str(self.config_path), *early_log]

    def check(self) -> None:
        """``nginx -t``: refuse to start with a config nginx does not accept."""
        result = subprocess.run([*self.command, "-t", "-q"], capture_output=True, text=True, check=False,
                                timeout=60)
        if result.returncode != 0:
            raise FrontError(f"nginx refused its config: {result.stderr.strip()[-2000:]}")

    def start(self, preexec_fn: Callable[[], None] | None = None) -> NginxFront:
        """Start nginx; ``preexec_fn`` runs in the child before nginx is executed (the supervisor makes nginx die
        with it). nginx runs in a process group of its own, so that :meth:`stop` can reach workers that outlived
        their master (a master killed outright leaves its workers running, holding the port)."""
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn,
                                        process_group=0)
        return self

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float) -> None:
        """Graceful stop (SIGQUIT: stop listening, finish the requests in flight), at most ``timeout`` seconds, then
        fast (SIGTERM), then SIGKILL; then whatever is left of its process group (the workers of a master that
        died)."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=max(0.1, wait))
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the usual case: the master stopped its workers
            pass
