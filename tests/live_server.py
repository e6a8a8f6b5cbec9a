"""The session's real servers (``live_server`` and ``gunicorn_server`` fixtures in conftest.py): ``maskrcnn-serving
serve`` with 2 workers on the demo model (:class:`testsupport.server.ServerProcess`), behind nginx (the
images' setup) and with gunicorn alone; otherwise the same settings. While the first starts, it is probed with
``/ping`` and ``/invocations`` so that tests can check what a client sees before the warm-up has finished."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from testsupport.server import ServerProcess

WORKERS = 2
# Small enough that a legacy answer with many detections trips it (the 413 test), large enough for normal answers.
MAX_RESPONSE_BYTES = 65536
# Seconds between two reads before a stalled client is dropped (the default is 20): short for the stalled-body tests.
CLIENT_TIMEOUT = 5.0


@dataclass
class StartupProbe:
    """What clients saw before every worker was ready: (seconds since start, route, status, JSON body)."""

    responses: list[tuple[float, str, int, dict | None]] = field(default_factory=list)

    def statuses(self, route: str) -> list[int]:
        return [status for _, r, status, _ in self.responses if r == route]


@dataclass
class LiveServer:
    server: ServerProcess
    startup: StartupProbe
    seconds_to_ready: float
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


def start_live_server(model_dir: Path, log_path: Path, probe_image: bytes, front: str = "nginx") -> LiveServer:
    flags = ["--threads", "4", "--max-response-bytes", str(MAX_RESPONSE_BYTES), "--ready-wait", "0",
             "--client-timeout", str(CLIENT_TIMEOUT)]
    server = ServerProcess(model_dir, log_path, workers=WORKERS, flags=flags, front=front).start()
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
        server.wait_ready(timeout=240.0, on_ping=record)
    except BaseException:
        server.stop()
        raise
    return LiveServer(server, probe, time.monotonic() - start)


def stop_live_server(server: LiveServer) -> None:
    """SIGTERM the gunicorn master (graceful), then SIGKILL its process group if it lingers."""
    server.server.stop()
