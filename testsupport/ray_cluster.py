"""A real Ray cluster on this machine (``ray start --head --block``), for the tests of ``--ray`` and for
benchmarks/ray_scale_out.py.

Its ports are all free ones (other Ray clusters may run on the machine), its files are in a temporary folder of its
own (short: Ray's unix sockets live there), and it uses Ray's token authentication with a token of its own (never
the user's ``~/.ray``). :attr:`RayHead.environment` is what a driver needs to join it; a local Ray that such a
driver starts itself (``--ray`` without an address) takes its token from there too and keeps its session files in
the cluster's folder. Stopped by the ids of the processes it started: never ``ray stop``, which stops every Ray of
this user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from testsupport.server import free_port

START_TIMEOUT_SECONDS = 180


@dataclass
class RayHead:
    address: str
    process: subprocess.Popen
    environment: dict[str, str]
    folder: Path

    def actor_processes(self, class_name: str = "PipelineActor") -> list[psutil.Process]:
        """The cluster's processes holding an actor of ``class_name`` (Ray titles an actor's process after it)."""
        actors = []
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if class_name in " ".join(process.cmdline()):
                    actors.append(process)
            except psutil.NoSuchProcess:
                continue
        return actors


@contextmanager
def ray_head(cpus: int = 2, environ: dict[str, str] | None = None) -> Iterator[RayHead]:
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    options = {"--port": port, "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
               "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
               "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
               "--object-manager-port": free_port()}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", str(cpus),
               "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
               "--temp-dir", str(folder), "--block", *[str(p) for option, v in options.items() for p in (option, v)]]
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    environment = dict(os.environ if environ is None else environ, RAY_AUTH_MODE="token",
                       RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(folder / "local"))
    log_path = folder / "head.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=environment)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while b"Ray runtime started" not in log_path.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield RayHead(f"127.0.0.1:{port}", head, environment, folder)
    finally:
        started = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        _, alive = psutil.wait_procs(started, timeout=30)
        for process in alive:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)
