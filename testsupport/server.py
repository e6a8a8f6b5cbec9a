"""A real ``maskrcnn-serving serve`` in a child process on 127.0.0.1, for load tests, soaks and HTTP tests.

The server gets a free port and a clean environment (no ``MODEL_SERVER_*`` / ``SM_*`` / ``PROMETHEUS_*`` variables
of the caller leak in; settings come from ``env`` and ``flags``), runs in its own process group, and logs to a file.
``front``: ``"nginx"`` (nginx in front of gunicorn, as the images run it), ``"none"`` (gunicorn alone), or None (the
server's own choice, ``MODEL_SERVER_FRONT``). The process tree is ``serve`` -> the gunicorn master -> its workers
(and ``serve`` -> nginx with a front): :func:`worker_pids` finds the workers from ``serve``'s pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

SERVER_VARIABLE_PREFIXES = ("MODEL_SERVER_", "SM_", "PROMETHEUS_", "MASKRCNN_")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model_dir: Path, port: int, flags: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "maskrcnn_serving.cli", "serve", "--model-dir", str(model_dir), "--host",
            "127.0.0.1", "--port", str(port), *flags]


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def gunicorn_master_pid(serve_pid: int) -> int | None:
    """The gunicorn master among ``serve``'s children (None while it is not started, or after it exited)."""
    for child in children(serve_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"--run-gunicorn" in cmdline.read():
                    return child
        except OSError:
            continue
    return None


def worker_pids(serve_pid: int) -> set[int]:
    """The gunicorn workers of the ``serve`` process ``serve_pid`` (for a ``serve`` from before the front, which
    was the gunicorn master itself: its children)."""
    master = gunicorn_master_pid(serve_pid)
    if master is None and children(serve_pid) and not any(
            b"nginx" in Path(f"/proc/{child}/cmdline").read_bytes() for child in children(serve_pid)):
        return set(children(serve_pid))
    return set() if master is None else set(children(master))


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``: resident now, ``VmHWM``: peak resident)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} for {pid}")


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without server settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_VARIABLE_PREFIXES)}
    return {**env, **(extra or {})}


def ping(url: str, timeout: float = 5.0) -> tuple[int, dict | None]:
    """``GET /ping`` on a new connection: status and JSON (200: ``{"status": "ready", "workers": [pids]}``); raises
    OSError while nothing listens."""
    request = urllib.request.Request(f"{url}/ping", headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if body else None


class ServerProcess:
    """``maskrcnn-serving serve`` on ``model_dir`` with ``workers`` workers; start it with :meth:`start`."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        workers: int = 2,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        front: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.workers = workers
        self.front = front
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        front_flags = [] if front is None else ["--front", front]
        self.command = serve_command(self.model_dir, self.port, ["--workers", str(workers), *front_flags, *flags])
        self.env = clean_environment(env)
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        return self

    def wait_ready(
        self,
        workers: int | None = None,
        exclude: set[int] = frozenset(),
        timeout: float = 300.0,
        on_ping: Callable[[float, int, dict | None], None] | None = None,
    ) -> set[int]:
        """Wait until ``/ping`` counts ``workers`` ready workers (default all) that are not in ``exclude``; returns
        them. ``on_ping(seconds since start, status, JSON body)`` sees every answered ping.
        Raises RuntimeError (with the log's tail) if the server exits or is not ready in time."""
        wanted = self.workers if workers is None else workers
        ready: set[int] = set()
        start = time.monotonic()
        while len(ready) < wanted:
            elapsed = time.monotonic() - start
            if not self.alive() or elapsed > timeout:
                raise RuntimeError(f"server not ready after {elapsed:.0f} s:\n{self.log()[-4000:]}")
            try:
                status, body = ping(self.url)
            except OSError:  # the master is still validating the model directory: nothing listens yet
                status, body = None, None
            if status == 200 and "workers" in body:
                ready = set(body["workers"]) - set(exclude)
            elif status == 200 and body["worker_pid"] not in exclude:  # a server from before issue 23: who answered
                ready.add(body["worker_pid"])
            if on_ping is not None and status is not None:
                on_ping(elapsed, status, body)
            time.sleep(0.05)
        return ready

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def worker_pids(self) -> set[int]:
        """The current gunicorn worker processes."""
        return worker_pids(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, graceful: bool = True, timeout: float = 40.0) -> int | None:
        """SIGTERM the master (graceful: it drains in-flight requests), or SIGKILL its process group; SIGKILL
        anyway when it lingers. Returns the exit code."""
        if self.alive():
            if graceful:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self.alive():
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
        return None if self.process is None else self.process.returncode
