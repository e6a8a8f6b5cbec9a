"""The session's real servers (``live_server``, ``gunicorn_server`` and ``image_server`` fixtures in conftest.py):
``maskrcnn-serving serve`` with 2 workers on the demo model, from the venv behind nginx (the images' setup) and with
gunicorn alone (:class:`testsupport.server.ServerProcess`), and inside the serving image
(:class:`image_server.ImageServer`); otherwise the same settings. While one starts, it is probed with ``/ping`` and
``/invocations`` so that tests can check what a client sees before the warm-up has finished."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from maskrcnn_serving.server.front import find_nginx
from testsupport.server import ServerProcess

WORKERS = 2
# Small enough that a legacy answer with many detections trips it (the 413 test), large enough for normal answers.
MAX_RESPONSE_BYTES = 65536
# Seconds between two reads before a stalled client is dropped (the default is 20): short for the stalled-body tests.
CLIENT_TIMEOUT = 5.0
# The session servers' settings, as the environment variables a SageMaker model's container definition sets (the
# image server takes them so; the venv servers too).
SERVER_ENVIRONMENT = {
    "MODEL_SERVER_WORKERS": str(WORKERS),
    "MODEL_SERVER_THREADS": "4",
    "MODEL_SERVER_MAX_RESPONSE_BYTES": str(MAX_RESPONSE_BYTES),
    "MODEL_SERVER_READY_WAIT": "0",
    "MODEL_SERVER_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT),
}


def nginx_missing() -> str | None:
    """Why a server cannot run behind nginx here, or None."""
    return None if find_nginx() else "nginx is not installed (tests/run.sh installs it as root: apt-get install nginx)"


@dataclass
class StartupProbe:
    """What clients saw before every worker was ready: (seconds since start, route, status, JSON body)."""

    responses: list[tuple[float, str, int, dict | None]] = field(default_factory=list)

    def statuses(self, route: str) -> list[int]:
        return [status for _, r, status, _ in self.responses if r == route]


@dataclass
class LiveServer:
    """A started server (a venv ``ServerProcess`` or an ``ImageServer``), what its start looked like, and its
    front (``nginx`` or ``none``)."""

    server: ServerProcess
    startup: StartupProbe
    seconds_to_ready: float
    front: str
    client_timeout: float = CLIENT_TIMEOUT

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def process(self):
        return self.server.process

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def alive(self) -> bool:
        return self.server.alive()

    def log(self) -> str:
        return self.server.log()

    def worker_pids(self) -> set[int]:
        """The gunicorn workers now (their pids as this machine sees them, the image's included)."""
        return self.server.worker_pids()


def probe_startup(server, probe_image: bytes, front: str, timeout: float = 240.0) -> LiveServer:
    """Wait until every worker of the started ``server`` is ready, probing it meanwhile (:class:`StartupProbe`)."""
    probe = StartupProbe()
    request = {"img_id": "probe", "img_data": base64.b64encode(probe_image).decode()}
    close = {"Connection": "close"}

    def record(elapsed: float, status: int, body: dict | None) -> None:
        probe.responses.append((elapsed, "/ping", status, body))
        if status != 200:
            invocation = requests.post(f"{server.url}/invocations", json=request, timeout=30, headers=close)
            probe.responses.append((elapsed, "/invocations", invocation.status_code, invocation.json()))

    start = time.monotonic()
    try:
        server.wait_ready(timeout=timeout, on_ping=record)
    except BaseException:
        server.stop()
        raise
    return LiveServer(server, probe, time.monotonic() - start, front)


def start_live_server(model_dir: Path, log_path: Path, probe_image: bytes, front: str = "nginx") -> LiveServer:
    server = ServerProcess(model_dir, log_path, workers=WORKERS, env=SERVER_ENVIRONMENT, front=front).start()
    return probe_startup(server, probe_image, front)


def stop_live_server(server: LiveServer) -> None:
    """SIGTERM the server (graceful), then SIGKILL what lingers."""
    server.server.stop()

