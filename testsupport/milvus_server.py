"""A real Milvus server for the tests: Milvus standalone 2.3.5 from the PyPI package ``milvus==2.3.5`` ("embedded
Milvus": a 57 MB wheel without dependencies that runs the Milvus server binary as a local process, gRPC on a port of
our choosing), installed into a venv of its own under the test cache (``$MASKRCNN_TEST_CACHE``, default
``~/.cache/maskrcnn-serving-tests``) so that it cannot disturb the project's pins. The server runs under
``testsupport/milvus_driver.py`` in that venv; :class:`MilvusServer` starts it, stops it mid-run and starts it
again (its data stays), and stops it for good.

One at a time on a machine: the package picks free ports for the server's own services, but its embedded etcd
always listens on 127.0.0.1:2380 for peers, so a second server started while one runs fails to start (and the
tests that need it skip, saying so).

When the package cannot be installed (no network to the package index, another platform), :func:`milvus_python`
raises :class:`MilvusUnavailable` with pip's own last words, for the tests to skip with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from maskrcnn_serving.lifetime import die_with_parent

MILVUS_PACKAGE = "milvus==2.3.5"
DRIVER = Path(__file__).with_name("milvus_driver.py")


class MilvusUnavailable(RuntimeError):
    """The Milvus server package cannot be installed or started here; the message says why."""


def cache_directory() -> Path:
    return Path(os.environ.get("MASKRCNN_TEST_CACHE") or Path.home() / ".cache" / "maskrcnn-serving-tests")


def milvus_python() -> Path:
    """The interpreter of the venv holding ``milvus==2.3.5``, made (once) under the cache directory."""
    venv = cache_directory() / ("venv-" + MILVUS_PACKAGE.replace("==", "-"))
    python = venv / "bin" / "python"
    marker = venv / "installed"
    if marker.is_file() and python.exists():
        return python
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", MILVUS_PACKAGE]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            said = [line for line in (result.stderr + result.stdout).splitlines()
                    if line.strip() and not line.startswith("WARNING: Location")]
            raise MilvusUnavailable(f"cannot install {MILVUS_PACKAGE} into {venv}: "
                                    f"{said[-1] if said else f'exit status {result.returncode}'}")
    marker.write_text(MILVUS_PACKAGE + "\n")
    return python


class MilvusServer:
    """Milvus standalone on ``127.0.0.1:port`` with its data in ``base_dir``; :meth:`start` first."""

    def __init__(self, base_dir: Path, port: int) -> None:
        self.base_dir, self.port = Path(base_dir), port
        self.url = f"http://127.0.0.1:{port}"
        self.pid: int | None = None  # the server binary's, while it runs
        self._driver: subprocess.Popen | None = None

    def start(self) -> MilvusServer:
        """Start the server (the driver too, the first time) and wait until it is healthy."""
        if self._driver is None:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._driver = subprocess.Popen(
                [str(milvus_python()), str(DRIVER), str(self.base_dir), str(self.port)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=die_with_parent())
        answer = self._command("start")
        if not answer.startswith("ready "):
            raise MilvusUnavailable(f"Milvus {MILVUS_PACKAGE} did not start: {answer} (logs in {self.base_dir}/logs)")
        _, pid, port = answer.split()
        if int(port) != self.port:
            raise MilvusUnavailable(f"Milvus started on port {port}, not {self.port}")
        self.pid = int(pid)
        return self

    def stop_server(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after a second, as the package does); its data stays for a restart."""
        self._command("stop")
        self.pid = None

    def close(self) -> None:
        if self._driver is not None and self._driver.poll() is None:
            try:
                self._command("quit")
                self._driver.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, MilvusUnavailable):
                self._driver.terminate()
                self._driver.wait(timeout=30)
        self._driver = None
        self.pid = None
        self._kill_orphaned_server()

    def _kill_orphaned_server(self) -> None:
        """Kill a server binary of this base directory still running (its driver died without stopping it)."""
        binary = str(self.base_dir / "bin" / "milvus").encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[0] == binary:
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours to read
                continue

    def _command(self, command: str) -> str:
        assert self._driver is not None and self._driver.stdin is not None and self._driver.stdout is not None
        self._driver.stdin.write(command + "\n")
        self._driver.stdin.flush()
        answer = self._driver.stdout.readline().strip()  # the driver answers every command, or exits
        if not answer and command != "quit":
            raise MilvusUnavailable(f"the Milvus driver exited (status {self._driver.poll()}) during {command!r}")
        return answer
