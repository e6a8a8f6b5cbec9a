"""A real ``maskrcnn-serving serve`` (gunicorn, 2 workers, the demo model) on 127.0.0.1, for HTTP tests.

Started once per test session (``live_server`` fixture in conftest.py). While it starts, it is probed with
``/ping`` and ``/invocations`` so that tests can check what a client sees before the warm-up has finished.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

WORKERS = 2
# Small enough that a legacy answer with many detections trips it (the 413 test), large enough for normal answers.
MAX_RESPONSE_BYTES = 65536
START_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class StartupProbe:
    """What clients saw before every worker was ready: (seconds since start, route, status, JSON body)."""

    responses: list[tuple[float, str, int, dict | None]] = field(default_factory=list)

    def statuses(self, route: str) -> list[int]:
        return [status for _, r, status, _ in self.responses if r == route]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    startup: StartupProbe
    seconds_to_ready: float

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_live_server(model_dir: Path, log_path: Path, probe_image: bytes) -> LiveServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "maskrcnn_serving.cli", "serve", "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS), "--threads", "4",
        "--max-response-bytes", str(MAX_RESPONSE_BYTES), "--ready-wait", "0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_SERVER_", "SM_", "PROMETHEUS_"))}
    log_file = open(log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    probe = StartupProbe()
    request = {"img_id": "probe", "img_data": base64.b64encode(probe_image).decode()}
    ready_pids: set[int] = set()
    start = time.monotonic()
    # A new connection per probe: a kept-alive connection stays with one worker, and both must be seen ready.
    close = {"Connection": "close"}
    while len(ready_pids) < WORKERS:
        elapsed = time.monotonic() - start
        if process.poll() is not None or elapsed > START_TIMEOUT:
            stop_live_server(process)
            raise RuntimeError(f"server did not become ready in {elapsed:.0f} s:\n{log_path.read_text()[-4000:]}")
        try:
            ping = requests.get(f"{url}/ping", timeout=10, headers=close)
            probe.responses.append((elapsed, "/ping", ping.status_code, ping.json()))
            if ping.status_code == 200:
                ready_pids.add(ping.json()["worker_pid"])
            else:
                invocation = requests.post(f"{url}/invocations", json=request, timeout=30, headers=close)
                probe.responses.append((elapsed, "/invocations", invocation.status_code, invocation.json()))
        except requests.ConnectionError:
            pass  # the master is still validating the model directory: nothing listens yet
        time.sleep(0.05)
    return LiveServer(url, process, log_path, probe, time.monotonic() - start)


def stop_live_server(process: subprocess.Popen) -> None:
    """SIGTERM the gunicorn master (graceful), then SIGKILL its process group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
